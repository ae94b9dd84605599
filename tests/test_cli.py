"""The hydra apps end to end at a tiny size, config composition, and their errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from pyro_diffmvae.builders import build_model

CONFIG_DIR = Path(__file__).resolve().parents[1] / "pyro_diffmvae" / "configs"
GROUPS = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in
          ["dataset", "model", "weighting", "fusion", "trainer", "experiment"]}


def run_app(app: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    code = f"import sys; from pyro_diffmvae.cli import {app}_main as main; sys.argv[0] = 'diffmvae-{app}'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_config_group_option_composes_and_builds(group, option):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=[f"{group}={option}", "experiment=tiny"] if group != "experiment" else [f"{group}={option}"])
    if cfg.dataset.name == "cub" and not Path(cfg.dataset.root).is_dir():
        pytest.skip(f"the CUB vocabulary is built from the captions under {cfg.dataset.root}, which is absent")
    vae = build_model(cfg)
    assert vae.latent_dim == cfg.model.latent_dim
    assert vae.fusion.name == ("two_stage" if cfg.model.get("two_stage") else cfg.fusion.name)
    assert vae.names == list(cfg.dataset.modalities)
    if not cfg.model.diffusion_decoders:  # MoPoE: every decoder feed-forward
        assert not any(m.is_diffusion for m in vae.modalities.values())
        return
    image = vae.modalities[cfg.dataset.diffusion_modalities[0]].decoder
    assert image.likelihood_kwargs["weighting"] == cfg.weighting.name
    assert image.is_bound == (cfg.weighting.name == "likelihood")


def _compose(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=list(overrides))


def test_defaults_are_diffmvae_star_v():
    cfg = _compose()
    assert (cfg.model.name, cfg.weighting.name, cfg.model.diffusion.prediction, cfg.model.diffusion.sampler,
            cfg.model.diffusion.sampler_steps) == ("diffmvae_star_v", "v_mse", "v", "ddim", 50)
    assert cfg.dataset.name == "shapes" and list(cfg.dataset.diffusion_modalities) == ["image"]
    assert cfg.latent_prior.fit and cfg.trainer.accelerator == "auto"


# Each diffusion preset names one objective (issue 14, honest names): the paper's Diff-MVAE* is the
# unweighted ε-MSE with ε-prediction, Diff-MVAE the likelihood weighting with the reverse SDE, and
# this library's v-variant has its own name. Catches a preset whose name and objective disagree (as
# "diffmvae_star" meant the v-MSE before), and a command-line weighting that the preset overrides.
@pytest.mark.parametrize("overrides,expected", [
    (["model=diffmvae_star"], ("diffmvae_star", "simple", "eps", "ddim", 50)),
    (["model=diffmvae_star_v"], ("diffmvae_star_v", "v_mse", "v", "ddim", 50)),
    (["model=diffmvae_star_vpred"], ("diffmvae_star_vpred", "simple", "v", "ddim", 50)),
    (["experiment=celebamask_hq_diffmvae_star_vpred_cpu"], ("diffmvae_star_vpred", "simple", "v", "ddim", 50)),
    (["model=diffmvae"], ("diffmvae", "likelihood", "eps", "sde", 1000)),
    (["model=diffmvae_vpred"], ("diffmvae_vpred", "likelihood", "v", "sde", 1000)),
    (["experiment=celebamask_hq_diffmvae_vpred_cpu"], ("diffmvae_vpred", "likelihood", "v", "sde", 1000)),
    (["model=diffmvae_star", "weighting=v_mse"], ("diffmvae_star", "v_mse", "eps", "ddim", 50)),  # the user wins
    *[([f"experiment={d}_diffmvae_star_cpu"], ("diffmvae_star", "simple", "eps", "ddim", 50))
      for d in ("shapes", "polymnist", "celebamask_hq", "cub")],
    *[([f"experiment={d}_diffmvae_star_v_cpu"], ("diffmvae_star_v", "v_mse", "v", "ddim", 50))
      for d in ("shapes", "polymnist", "celebamask_hq", "cub")],
    (["experiment=celebamask_hq_diffmvae_cpu"], ("diffmvae", "likelihood", "eps", "sde", 1000)),
    (["experiment=celebamask_hq_diffmvae_star"], ("diffmvae_star", "simple", "eps", "ddim", 50)),
])
def test_diffusion_presets_run_the_objective_their_name_says(overrides, expected):
    cfg = _compose(*overrides)
    assert (cfg.model.name, cfg.weighting.name, cfg.model.diffusion.prediction, cfg.model.diffusion.sampler,
            cfg.model.diffusion.sampler_steps) == expected


def test_v_variant_presets_differ_from_the_paper_presets_only_in_the_model():
    # Catches a *_diffmvae_star_v_cpu preset that drifts from its paper twin in data, sizes or budget.
    for d in ("shapes", "polymnist", "celebamask_hq", "cub"):
        paper, v = _compose(f"experiment={d}_diffmvae_star_cpu"), _compose(f"experiment={d}_diffmvae_star_v_cpu")
        assert {k: v[k] for k in v if k not in ("model", "weighting")} == {k: paper[k] for k in paper if k not in ("model", "weighting")}
        assert dict(v.model, name=None, diffusion=None) == dict(paper.model, name=None, diffusion=None)


@pytest.mark.parametrize("paper_model", ["diffmvae_star", "diffmvae"])
def test_the_vpred_preset_is_the_paper_preset_with_another_prediction_target_only(paper_model):
    # diffmvae_star_vpred / diffmvae_vpred claim the paper's Diff-MVAE* / Diff-MVAE objective: the same weighting
    # (simple / likelihood), data, sizes and budget, only the network's prediction target changed. Catches a vpred
    # preset that also changes the weighting (it would then be another objective under the paper's name) or
    # anything else of its paper twin.
    paper = _compose(f"experiment=celebamask_hq_{paper_model}_cpu")
    vpred = _compose(f"experiment=celebamask_hq_{paper_model}_vpred_cpu")
    assert (paper.model.diffusion.prediction, vpred.model.diffusion.prediction) == ("eps", "v")
    vpred.model.name, vpred.model.diffusion.prediction = paper.model.name, paper.model.diffusion.prediction
    assert vpred == paper


def test_model_image_decoder_picks_the_feed_forward_image_decoder():
    # Catches model.image_decoder=compact being ignored (every image decoder still the 10x dearer ConvDecoder),
    # the diffusion decoders being replaced too, and an unknown name passing silently.
    from pyro_diffmvae.nets.decoders import CompactConvDecoder, ConvDecoder

    def image_nets(*overrides):
        vae = build_model(_compose("experiment=polymnist_mopoe_cpu", *overrides))
        return {type(m.decoder.net).__name__ for m in vae.modalities.values()}

    assert image_nets() == {ConvDecoder.__name__}
    assert image_nets("model.image_decoder=compact") == {CompactConvDecoder.__name__}
    with pytest.raises(ValueError, match=r"unknown model.image_decoder 'tiny'; known: \['compact', 'conv'\]"):
        build_model(_compose("experiment=polymnist_mopoe_cpu", "model.image_decoder=tiny"))


TABLE3_CPU = ["celebamask_hq_diffmvae_star_cpu", "celebamask_hq_diffmvae_star_v_cpu", "celebamask_hq_diffmvae_star_vpred_cpu",
              "celebamask_hq_diffmvae_cpu", "celebamask_hq_diffmvae_vpred_cpu",
              "celebamask_hq_mopoe_star_cpu", "celebamask_hq_mopoe_cpu", "celebamask_hq_mvtcae_cpu", "celebamask_hq_mmvae_plus_cpu"]


def test_the_cpu_table3_presets_differ_only_in_the_model():
    # Issue 14 item 4: the same data, encoders, latent size and trainer for every row of the CPU Table 3.
    # Catches a preset that changes the image size, the modalities, the latent or the budget of one model.
    base = _compose(f"experiment={TABLE3_CPU[0]}")
    for preset in TABLE3_CPU:
        cfg = _compose(f"experiment={preset}")
        for key in ("dataset", "trainer", "evaluation", "fusion", "latent_prior"):
            assert cfg[key] == base[key], (preset, key)
        assert (cfg.model.latent_dim, cfg.model.encoder_width, cfg.model.decoder_width) == (32, 32, 32), preset
    assert [_compose(f"experiment={p}").model.name for p in TABLE3_CPU] == [
        "diffmvae_star", "diffmvae_star_v", "diffmvae_star_vpred", "diffmvae", "diffmvae_vpred", "mopoe_star", "mopoe", "mvtcae", "mmvae_plus"]


def test_the_polymnist_lever_presets_differ_from_their_twin_only_in_the_lever():
    # Catches a lever preset of issue 14's PolyMNIST table that also changes the data, budget, sizes or
    # evaluation of its row (its numbers would then not measure the lever).
    twin = _compose("experiment=polymnist_diffmvae_star_v_cpu")
    shared = _compose("experiment=polymnist_diffmvae_star_v_shared_cpu")
    guided = _compose("experiment=polymnist_diffmvae_star_v_shared_guided_cpu")
    assert shared.model.unet.shared is True and twin.model.unet.shared is False
    assert (guided.model.diffusion.cond_dropout, guided.evaluation.guidance) == (0.1, 2.0)
    guided.model.diffusion.cond_dropout, guided.evaluation.guidance = 0.0, None
    assert guided == shared
    shared.model.unet.shared = False
    assert shared == twin
    hint = _compose("experiment=polymnist_diffmvae_star_v_shared_hint_cpu")
    hint_guided = _compose("experiment=polymnist_diffmvae_star_v_shared_hint_guided_cpu")
    assert (hint_guided.model.diffusion.cond_dropout, hint_guided.evaluation.guidance) == (0.1, 2.0)
    warmup = _compose("experiment=polymnist_diffmvae_star_v_shared_hint_guided_warmup_cpu")
    assert warmup.trainer.diffusion_warmup_steps == 1000
    warmup.trainer.diffusion_warmup_steps = 0
    assert warmup == hint_guided
    hint_guided.model.diffusion.cond_dropout, hint_guided.evaluation.guidance = 0.0, None
    assert hint_guided == hint


def _levers(script: Path) -> list[tuple[str, list[str]]]:
    """The (name, overrides) rows of a lever script's ``LEVERS=( "name|overrides" ... )`` array."""
    text = script.read_text()
    block = text[text.index("LEVERS=(") + len("LEVERS=("):]
    block = block[:block.index("\n)")]
    rows = [line.strip().strip('"') for line in block.splitlines() if line.strip().startswith('"')]
    return [(row.split("|", 1)[0], row.split("|", 1)[1].split()) for row in rows]


def test_every_celebamask_lever_composes_with_its_preset_and_passes_the_settings_check():
    # Catches a lever row whose override names a key that does not exist or a value out of range: the lever
    # script would start a 17-minute run that fails, or (a misspelt key) one that silently measures the baseline.
    from pyro_diffmvae.builders import build_objective
    from pyro_diffmvae.settings import check_settings

    levers = _levers(Path(__file__).parents[1] / "experiments" / "levers_celebamask_hq.sh")
    assert [name for name, _ in levers][:2] == ["baseline", "eps_mse"] and len(levers) >= 8
    base = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu")
    for name, overrides in levers:
        cfg = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *overrides)
        check_settings(cfg, "train")
        build_objective(cfg)
        assert (cfg == base) == (name == "baseline"), name  # every other row changes something
    free_bits = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *dict(levers)["free_bits_0.25"])
    assert build_objective(free_bits).nats_per_dim == 0.25
    heavier = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *dict(levers)["attributes_weight_30"])
    assert (heavier.model.likelihood_weights.attributes, base.model.likelihood_weights.attributes) == (30.0, 10.0)
    guided = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *dict(levers)["cond_dropout_0.1_w2"])
    more_dropout = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *dict(levers)["cond_dropout_0.2_w2"])
    assert more_dropout.model.diffusion.cond_dropout == 0.2
    more_dropout.model.diffusion.cond_dropout = 0.1
    assert more_dropout == guided  # the larger p is that row's only change from the guided row
    guided_free_bits = _compose("experiment=celebamask_hq_diffmvae_star_v_cpu",
                                *dict(levers)["free_bits_0.25_cond_dropout_0.1_w2"])
    assert build_objective(guided_free_bits).nats_per_dim == 0.25
    assert (guided_free_bits.model.diffusion.cond_dropout, guided_free_bits.evaluation.guidance) == (0.1, 2.0)
    # the combined row is exactly the free-bits row's overrides plus the guided row's, nothing else
    assert guided_free_bits == _compose("experiment=celebamask_hq_diffmvae_star_v_cpu", *dict(levers)["free_bits_0.25"],
                                        *dict(levers)["cond_dropout_0.1_w2"])


@pytest.mark.parametrize("twin_preset", ["celebamask_hq_diffmvae_star_v_cpu", "celebamask_hq_diffmvae_star_vpred_cpu"])
def test_the_guided_table3_presets_differ_from_their_twins_only_in_dropout_and_guidance(twin_preset):
    # A guided row of the CPU Table 3 must be its twin (Diff-MVAE*-v; the paper's objective with a v-network)
    # with conditioning dropout, evaluated at w = 2, and nothing else. Catches a guided preset that drops the
    # dropout (guidance would then be refused), evaluates at another weight, or changes the objective, the
    # data, the budget or the sampler of its row.
    twin = _compose(f"experiment={twin_preset}")
    guided = _compose(f"experiment={twin_preset.removesuffix('_cpu')}_guided_cpu")
    assert guided.model.diffusion.cond_dropout == 0.1 and twin.model.diffusion.cond_dropout == 0.0
    assert guided.evaluation.guidance == 2.0 and twin.evaluation.guidance is None
    guided.model.diffusion.cond_dropout, guided.evaluation.guidance = 0.0, None
    assert guided == twin


def test_train_evaluate_sample_end_to_end(tmp_path):
    common = [f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls"]
    res = run_app("train", "experiment=tiny", f"hydra.run.dir={tmp_path}/train", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    run = tmp_path / "train"
    for name in ["model.pt", "pretrained/model.safetensors", "pretrained/config.json", "metrics.json", "report.md",
                 "loss_curves.png", "checkpoints/last.ckpt",
                 "checkpoints/best.ckpt", "figures/conditional.png", "figures/unconditional.png"]:
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["conditional"]) >= {"image", "mask", "attributes", "mask+attributes", "all (reconstruction)"}
    assert 0.0 <= metrics["conditional"]["image"]["attributes_f1"] <= 1.0
    assert set(metrics["unconditional"]) == {"normal", "score"}
    assert metrics["fd_name"] == "FD_classifier"
    assert "| given |" in (run / "report.md").read_text()
    # evaluate and sample load the saved model (and a Lightning checkpoint)
    # the run's own evaluation and sample settings (tiny's sizes) without naming the preset again
    res = run_app("evaluate", f"checkpoint={run}/model.pt", f"hydra.run.dir={tmp_path}/eval", *common, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["num_examples"] == 8
    res = run_app("sample", f"checkpoint={run}/checkpoints/last.ckpt", "sample.prior=normal",
                  f"hydra.run.dir={tmp_path}/sample", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    samples = torch.load(tmp_path / "sample" / "samples" / "samples.pt")
    assert samples["image"].shape == (4, 3, 16, 16) and samples["image"].abs().max() <= 1.0
    # the portable folder the run wrote (safetensors + JSON) gives the same samples as model.pt
    for name, checkpoint in [("from_pt", run / "model.pt"), ("from_folder", run / "pretrained")]:
        res = run_app("sample", f"checkpoint={checkpoint}", f"hydra.run.dir={tmp_path}/{name}", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-3000:]
    from_pt, from_folder = (torch.load(tmp_path / n / "samples" / "samples.pt") for n in ("from_pt", "from_folder"))
    assert all(torch.equal(from_pt[k], from_folder[k]) for k in from_pt) and from_pt["image"].shape[0] == 4
    # guidance needs a decoder trained with conditioning dropout: refused, by name, for this one
    res = run_app("sample", f"checkpoint={run}/model.pt", "sample.guidance=2.0", f"hydra.run.dir={tmp_path}/guided",
                  cwd=tmp_path)
    assert res.returncode == 2 and "guidance 2.0 needs the unconditional network" in res.stderr
    # the same run directory is never overwritten
    res = run_app("train", "experiment=tiny", f"hydra.run.dir={run}", *common, cwd=tmp_path)
    assert res.returncode != 0 and "already holds results" in res.stderr


def test_app_errors(tmp_path):
    res = run_app("train", "experiment=tiny", "trainer.no_such_key=1", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert res.returncode != 0 and "no_such_key" in res.stderr
    res = run_app("train", "fusion=sum", f"hydra.run.dir={tmp_path}/b", cwd=tmp_path)
    assert res.returncode != 0 and "fusion" in res.stderr and "sum" in res.stderr
    res = run_app("evaluate", f"checkpoint={tmp_path}/missing.pt", f"hydra.run.dir={tmp_path}/c", cwd=tmp_path)
    assert res.returncode == 2 and "does not exist" in res.stderr
    res = run_app("sample", f"hydra.run.dir={tmp_path}/d", cwd=tmp_path)
    assert res.returncode == 2 and "needs checkpoint=" in res.stderr
    res = run_app("train", "experiment=tiny", "dataset.modalities=[image,sound]", f"hydra.run.dir={tmp_path}/e", cwd=tmp_path)
    assert res.returncode == 2 and "unknown modalit" in res.stderr and "'sound'" in res.stderr


# one baseline through the app in the default suite (20 s each on 2 cores); every model's config builds
# in test_every_config_group_option_composes_and_builds and every objective trains in test_objectives.py
@pytest.mark.parametrize("model", ["mvae", *(pytest.param(m, marks=pytest.mark.slow) for m in ("mmvae", "mvtcae", "mmvae_plus"))])
def test_baseline_models_train_with_their_objective(tmp_path, model):
    """Catches: a baseline's model config that composes but does not run through diffmvae-train, or
    that trains with another objective than its own (metrics.json names it)."""
    from pyro_diffmvae.builders import build_objective
    from pyro_diffmvae.objectives import OBJECTIVES

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=[f"model={model}", "experiment=tiny"])
    assert isinstance(build_objective(cfg), OBJECTIVES[model])
    res = run_app("train", f"model={model}", "experiment=tiny", "evaluation.enabled=false", "latent_prior.fit=false",
                  f"hydra.run.dir={tmp_path}/run", f"dataset.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["training"]["objective"] == model and metrics["training"]["steps"] == 6


def test_two_stage_baseline_trains_fits_stage_2_and_reloads(tmp_path):
    """model=mld end to end: stage 1 by the trainer, stage 2 in the latent-prior phase, evaluation
    (the score row exists), and model.pt reloads as a TwoStageVAE whose stage 2 completes the latents
    with the observed blocks unchanged."""
    import torch

    from pyro_diffmvae.cli import load_run
    from pyro_diffmvae.two_stage import JointLatentDiffusion, TwoStageVAE

    res = run_app("train", "model=mld", "experiment=tiny", "model.two_stage.prior_steps=5", "model.two_stage.prior_hidden=16",
                  f"hydra.run.dir={tmp_path}/run",
                  f"dataset.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "stage 2 of mld" in res.stdout and "(5 steps)" in res.stdout
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(metrics["unconditional"]) == {"normal", "score"}
    vae, cfg = load_run(tmp_path / "run" / "model.pt")
    assert isinstance(vae, TwoStageVAE) and isinstance(vae.latent_prior, JointLatentDiffusion)
    u = torch.randn(3, vae.joint_dim)
    observed = torch.tensor([True, False, True])
    done = vae.latent_prior.sample_conditional(u, observed, steps=3)
    d = cfg.model.latent_dim
    assert torch.equal(done[:, :d], u[:, :d]) and torch.equal(done[:, 2 * d:], u[:, 2 * d:])
    assert not torch.equal(done[:, d:2 * d], u[:, d:2 * d])
    res = run_app("train", "model=mld", "experiment=tiny", "latent_prior.fit=false", f"hydra.run.dir={tmp_path}/b",
                  f"dataset.cache_dir={tmp_path}/cache", cwd=tmp_path)
    assert res.returncode == 2 and "needs latent_prior.fit=true" in res.stderr
