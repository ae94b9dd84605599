"""Extension without editing the package: a weighting, a fusion and an objective, each one Python
file plus one yaml under ``tests/extension/`` (outside the package), named in the config by hydra
``_target_`` and found through ``hydra.searchpath`` — the recipes of ``docs/extending.md``."""

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pyro_diffmvae.builders import build_model, build_objective, build_weighting
from pyro_diffmvae.fusion import poe
from pyro_diffmvae.objectives import ELBO

EXTENSION = Path(__file__).resolve().parent / "extension"
SEARCHPATH = f"hydra.searchpath=[file://{EXTENSION / 'configs'}]"

sys.path.insert(0, str(EXTENSION))  # the user's modules, as PYTHONPATH would give them
import lab_fusion  # noqa: E402
import lab_objective  # noqa: E402
import lab_weighting  # noqa: E402


def _cfg(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=[SEARCHPATH, "experiment=tiny", *overrides])


def _batch(cfg, n=6):
    from pyro_diffmvae.builders import build_datasets
    from torch.utils.data import DataLoader

    train, _, _ = build_datasets(cfg)
    return next(iter(DataLoader(train, batch_size=n)))


def test_user_weighting_is_the_decoders_and_has_its_params(tmp_path):
    """Fails if builders ignore ``weighting.fn`` (the decoder would get the name ``sigmoid``, an
    unknown weighting) or drop its params (bias 2.0 → the default 0.0 changes every value)."""
    cfg = _cfg("weighting=sigmoid", f"dataset.cache_dir={tmp_path}")
    decoder = build_model(cfg).modalities["image"].decoder
    weighting = decoder.likelihood_kwargs["weighting"]
    assert isinstance(weighting, functools.partial) and weighting.func is lab_weighting.sigmoid_weighting
    assert weighting.keywords == {"bias": 2.0}
    assert decoder.is_bound is False
    # by hand, on the VP-SDE of the config (beta_min 0.1, beta_max 20): B(t) = 0.1 t + 9.95 t^2,
    # sigma^2 = 1 - exp(-B), logSNR = -B - log(sigma^2); lambda = sigma^2 sigmoid(2 - logSNR)
    t = torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)
    expected = []
    for s in t.tolist():
        B = 0.1 * s + 9.95 * s**2
        s2 = 1.0 - math.exp(-B)
        log_snr = -B - math.log(s2)
        expected.append(s2 / (1.0 + math.exp(-(2.0 - log_snr))))
    torch.testing.assert_close(weighting(t, decoder.sde), torch.tensor(expected, dtype=torch.float64))


def test_user_fusion_rule_widens_the_product_by_its_temperature(tmp_path):
    """Fails if builders ignore ``fusion.combine`` or its ``temperature``, or if the guide and the
    conditional bypass the fusion's rule (both would give the plain PoE variance)."""
    cfg = _cfg("fusion=tempered_mopoe", "model=mopoe", f"dataset.cache_dir={tmp_path}")
    vae = build_model(cfg)
    assert vae.fusion.name == "tempered_mopoe" and vae.fusion.combine.func is lab_fusion.tempered_poe
    # the rule by hand: experts N(1, 1) and N(3, 1), no prior: PoE N(2, 1/2); tempered (tau 2) N(2, 1)
    mu, logvar = torch.tensor([[[1.0], [3.0]]]), torch.zeros(1, 2, 1)
    mu_z, logvar_z = vae.fusion.combine(mu, logvar, None, False)
    torch.testing.assert_close((mu_z, logvar_z.exp()), (torch.tensor([[2.0]]), torch.tensor([[1.0]])))
    # the model's conditional given two modalities: twice the PoE variance of their experts
    batch = _batch(cfg)
    vae.eval()
    with torch.no_grad():
        given = ["image", "mask"]
        q = vae.posterior(batch, given)
        mu_e, logvar_e, mask = vae.given_experts(batch, given)
        mu_p, logvar_p = poe(mu_e, logvar_e, mask, False)
    torch.testing.assert_close(q.base_dist.loc, mu_p)
    torch.testing.assert_close(q.base_dist.scale ** 2, 2.0 * logvar_p.exp())


def test_user_objective_is_built_and_has_the_elbos_expectation(tmp_path):
    """Fails if builders ignore ``model.objective._target_`` (the package's ELBO would be built), and
    checks the user's estimator: with the same seed the guide draws the same z and the decoders the
    same noise, so loss_mc − loss_analytic = Σ[log q(z) − log p(z)] − KL, mean zero over seeds."""
    cfg = _cfg("model=diffmvae_star_mc_kl", "model.diffusion_decoders=false", f"dataset.cache_dir={tmp_path}")
    objective = build_objective(cfg)
    assert type(objective) is lab_objective.MonteCarloKLELBO and objective.num_particles == 1
    vae, batch, analytic = build_model(cfg), _batch(cfg), ELBO()
    diffs = []
    with torch.no_grad():
        for seed in range(64):
            torch.manual_seed(seed)
            mc = objective.loss(vae, batch)
            torch.manual_seed(seed)
            diffs.append((mc - analytic.loss(vae, batch)).item())
    diffs = torch.tensor(diffs, dtype=torch.float64)
    assert diffs.std() > 1e-3  # a Monte-Carlo KL, not the closed form
    assert diffs.mean().abs() < 4 * diffs.std() / math.sqrt(len(diffs))
    terms = objective.terms(vae, batch)
    assert set(terms) >= {"loss", "loss_mc_kl", "elbo", "kl", "loglik/image"}


def _run_app(app, *overrides, cwd):
    code = f"import sys; from pyro_diffmvae.cli import {app}_main as main; sys.argv[0] = 'diffmvae-{app}'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(EXTENSION), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code, SEARCHPATH, *overrides], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=600)


def test_user_weighting_fusion_and_objective_train_evaluate_and_sample_through_the_cli(tmp_path):
    """The three user extensions at once through diffmvae-train / -evaluate / -sample. Fails if the
    stored config loses a ``_target_`` (the reloaded model would differ), if the trainer does not log
    and validate the user objective's own terms, or if any app cannot rebuild the user's parts."""
    from pyro_diffmvae.cli import load_run

    user = ["weighting=sigmoid", "fusion=tempered_mopoe", "model=diffmvae_star_mc_kl", "experiment=tiny",
            f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls"]
    res = _run_app("train", *user, f"hydra.run.dir={tmp_path}/train", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "train"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"] == {**metrics["training"], "objective": "lab_objective.MonteCarloKLELBO", "steps": 6}
    assert "image" in metrics["conditional"]
    header = (run / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/loss_mc_kl", "val/loss", "train/loss_mc_kl"} <= set(header)
    sys.path.insert(0, str(EXTENSION))
    vae, cfg = load_run(run / "model.pt")
    assert vae.fusion.combine.func is lab_fusion.tempered_poe
    assert vae.modalities["image"].decoder.likelihood_kwargs["weighting"].func is lab_weighting.sigmoid_weighting
    assert type(build_objective(cfg)) is lab_objective.MonteCarloKLELBO
    # evaluate and sample rebuild the user's parts from the stored config: only their own settings are given
    res = _run_app("evaluate", f"checkpoint={run}/model.pt", *user[-2:], f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_examples"] == 8
    res = _run_app("sample", f"checkpoint={run}/model.pt", "sample.prior=normal",
                   f"hydra.run.dir={tmp_path}/sample", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert torch.load(tmp_path / "sample" / "samples" / "samples.pt")["image"].shape == (4, 3, 16, 16)


def test_a_bad_user_target_is_named(tmp_path):
    """A ``weighting.fn`` without ``_target_`` or naming nothing importable fails with the key named."""
    from omegaconf import OmegaConf

    cfg = _cfg(f"dataset.cache_dir={tmp_path}")
    OmegaConf.update(cfg, "weighting.fn", {"bias": 1.0}, force_add=True)
    with pytest.raises(ValueError, match="weighting.fn must be a mapping with a _target_"):
        build_weighting(cfg)
    OmegaConf.update(cfg, "weighting.fn", {"_target_": "lab_weighting.no_such_weighting"}, force_add=True)
    with pytest.raises(Exception, match="no_such_weighting"):
        build_weighting(cfg)
