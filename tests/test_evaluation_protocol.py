"""The evaluation protocol, its standard errors and the bound ledger, on a toy model whose generations
are fixed by hand (``FakeVAE``): every expected number below is computed by hand.

Toy data set: test example i has the label y_i (``LABELS``, cycled) and three modalities ``a``, ``b``,
``c`` of shape (4,): onehot(y_i) and, last, the index i (so the fake model knows which example it
generates for). ``a`` and ``b`` are read back as the argmax of the first three entries; ``c`` is not
read back and is scored by F1. ``FakeVAE.generate`` writes, for a target t:

* t not given: ``a`` right for i < 6 (of each 8), ``b`` right for even i; ``c`` = onehot(y) for even i
  and onehot(y) + onehot(y + 1) for odd i, then the index (F1 over the four entries, the index a one
  in both for i >= 1: 1 for even i, 2·2/(3 + 2) = 4/5 for odd i);
* t given (regenerated, the all-targets convention): always the wrong label y + 1.
"""

import math
from types import SimpleNamespace

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from omegaconf import OmegaConf

from pyro_diffmvae.data.registry import register_dataset
from pyro_diffmvae.data.spec import DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec
from pyro_diffmvae.evaluation.protocol import resolve_protocol
from pyro_diffmvae.evaluation.routines import evaluate_with_labels
from pyro_diffmvae.evaluation.uncertainty import (balanced_accuracy, binomial_se, bootstrap_indices, bootstrap_mean_se,
                                                  mean_and_se)
from pyro_diffmvae.metrics.f1 import per_example_f1, sample_f1

LABELS = [0, 1, 2, 0, 1, 2, 0, 0]  # class counts 4 / 2 / 2
NAMES = ["a", "b", "c"]


def _onehot(y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(y % 3, 3).float()


class ToyTest(torch.utils.data.Dataset):
    def __init__(self, size: int):
        self.labels = torch.tensor([LABELS[i % len(LABELS)] for i in range(size)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = torch.cat([_onehot(self.labels[i]), torch.tensor([float(i)])])
        return {"a": x, "b": x.clone(), "c": x.clone(), "meta": {"label": self.labels[i], "index": i}}


def _read(x):
    return x[:, :3].argmax(-1, keepdim=True)


SPEC = register_dataset(DatasetSpec(
    name="protocol_toy", title="protocol toy", build=lambda cfg: None,
    modalities=lambda cfg: {"a": ModalitySpec((4,), "normal", read=_read), "b": ModalitySpec((4,), "normal", read=_read),
                            "c": ModalitySpec((4,), "bernoulli", f1=True)},
    evaluation=EvaluationSpec("labels", labels=lambda cfg, train_set: LabelSpec((3,), lambda b: b["meta"]["label"].reshape(-1, 1).long()))),
    replace=True)


class FakeVAE:
    """Deterministic generations (module docstring); ``calls`` records (given, example indices) of every call."""

    names = NAMES
    latent_prior = None

    def __init__(self):
        self.calls = []

    def eval(self):
        return self

    def generate(self, batch, given, targets, sampler=None, steps=None):
        index = batch[given[0]][:, 3].long()
        self.calls.append((tuple(given), index.tolist()))
        y = torch.tensor([LABELS[i % len(LABELS)] for i in index.tolist()])
        right = {"a": index % 8 < 6, "b": index % 2 == 0}
        out = {}
        for t in targets:
            if t in given:
                label = y + 1
            elif t == "c":
                out[t] = torch.cat([_onehot(y) + (index % 2 == 1).float()[:, None] * _onehot(y + 1), index[:, None]], 1)
                continue
            else:
                label = torch.where(right[t], y, y + 1)
            out[t] = torch.cat([_onehot(label), index[:, None].float()], 1)
        return out

    def posterior(self, batch, given=None):
        B = next(v for k, v in batch.items() if k != "meta").shape[0]
        return dist.Normal(torch.zeros(B, 2), torch.ones(B, 2)).to_event(1)

    def sample(self, k, **_):
        return {m: torch.cat([_onehot(torch.zeros(k, dtype=torch.long)), torch.zeros(k, 1)], 1) for m in NAMES}


def _cfg(**evaluation):
    ev = dict(protocol="standard", num_examples=None, max_subsets_per_size=None, batch_size=3, sampler="ddim",
              sampler_steps=5, bootstrap=50, bootstrap_seed=0, fd_bootstrap=True, balanced_accuracy=True,
              coherence_all_targets=True, probe_train_size=16, clip_model=None, fid_inception_weights=None)
    ev.update(evaluation)
    return OmegaConf.create({"dataset": {"name": "protocol_toy"}, "evaluation": ev,
                             "latent_prior": {"sampler": "ddim", "sampler_steps": 5}})


def _evaluate(tmp_path, size=8, **evaluation):
    vae = FakeVAE()
    metrics = evaluate_with_labels(vae, ToyTest(size), ToyTest(16), _cfg(**evaluation), tmp_path, figures=False)
    return vae, metrics


def test_coherence_conventions_differ_as_computed_by_hand(tmp_path):
    """Catches: averaging the regenerated given modalities into the default coherence (it would read
    0.25, not 0.5, given a); a per-example mean taken over the wrong targets; the SE of a mean over
    targets computed as if the targets were independent examples; chunks (batch_size 3 of 8) scored twice
    or dropped."""
    _, metrics = _evaluate(tmp_path)
    cond = metrics["conditional"]
    # given a: b right for even i -> 0.5 (binomial SE sqrt(.25/8)); all targets: mean of (a regenerated = 0, b)
    assert cond["a"]["coherence"] == pytest.approx(0.5)
    assert cond["a"]["coherence_se"] == pytest.approx(math.sqrt(0.25 / 8))
    assert cond["a"]["coherence_all_targets"] == pytest.approx(0.25)
    # per-example values 0.5 (even), 0 (odd): population variance 0.0625
    assert cond["a"]["coherence_all_targets_se"] == pytest.approx(math.sqrt(0.0625 / 8))
    assert cond["a"]["a_coherence_regenerated"] == 0.0
    assert cond["b"]["coherence"] == pytest.approx(0.75) and cond["b"]["coherence_all_targets"] == pytest.approx(0.375)
    # given c (not read back): missing a and b, per example (1, .5, 1, .5, 1, .5, .5, 0) -> 5/8; c regenerated is not read
    assert cond["c"]["coherence"] == pytest.approx(0.625) and cond["c"]["coherence_all_targets"] == pytest.approx(0.625)
    assert metrics["coherence_by_num_given"]["1"] == pytest.approx((0.5 + 0.75 + 0.625) / 3)
    assert metrics["coherence_all_targets_by_num_given"]["1"] == pytest.approx((0.25 + 0.375 + 0.625) / 3)
    # F1 of c (never given in "a"): 1 for even, 4/5 for odd
    assert cond["a"]["c_f1"] == pytest.approx(0.9)
    assert metrics["protocol"]["label"] == "standard" and metrics["num_examples"] == 8


def test_balanced_accuracy_by_hand(tmp_path):
    """Catches: balanced accuracy computed as plain accuracy (0.75 here), or per-class recalls weighted
    by class size; the per-class binomial SEs combined wrongly."""
    _, metrics = _evaluate(tmp_path)
    row = metrics["conditional"]["b"]  # a right for i < 6: class 0 (i = 0, 3, 6, 7) 2/4, class 1 1.0, class 2 1.0
    assert row["a_coherence"] == pytest.approx(0.75)
    assert row["a_balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert row["a_balanced_accuracy_se"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4) / 3)
    value, se = balanced_accuracy(torch.tensor([True, False, True, True]), torch.tensor([0, 0, 1, 1]))
    assert (value, se) == pytest.approx((0.75, math.sqrt(0.25 / 2) / 2))


def test_binomial_se_and_mean_se():
    """Catches: the SE of a rate with n − 1 or without the square root, or of a mean of per-example
    values with the sample (not population) variance, which breaks the binomial case."""
    assert binomial_se(0.2, 100) == pytest.approx(0.04)
    assert binomial_se(1.0, 10) == 0.0
    hits = torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0, 0, 0])
    assert mean_and_se(hits) == pytest.approx((0.2, binomial_se(0.2, 10)))
    with pytest.raises(ValueError, match="n >= 1"):
        binomial_se(0.5, 0)


def test_bootstrap_se_of_f1_matches_a_numpy_recomputation_with_the_same_seed(tmp_path):
    """Catches: a bootstrap that is not seeded (two runs differ), resamples labels instead of examples,
    uses ddof=0, or an F1 SE that is not a bootstrap over the examples at all."""
    f1 = per_example_f1(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]]),
                        torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]]))
    assert f1.tolist() == pytest.approx([2 / 3, 1.0, 2 / 3, 0.0])
    assert float(f1.mean()) == pytest.approx(sample_f1(torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]]),
                                                       torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0], [1, 0, 0]])))
    idx = torch.randint(0, 4, (200, 4), generator=torch.Generator().manual_seed(7)).numpy()
    expected = np.std(f1.numpy()[idx].mean(1), ddof=1)
    assert bootstrap_mean_se(f1, 200, 7) == pytest.approx(expected)
    assert torch.equal(bootstrap_indices(4, 200, 7), torch.from_numpy(idx))
    # inside the evaluation: the toy c F1 values (1, 4/5, ...) with evaluation.bootstrap_seed = 0
    _, metrics = _evaluate(tmp_path, bootstrap=30)
    values = np.array([1.0 if i % 2 == 0 else 0.8 for i in range(8)])
    idx = torch.randint(0, 8, (30, 8), generator=torch.Generator().manual_seed(0)).numpy()
    assert metrics["conditional"]["a"]["c_f1_se"] == pytest.approx(np.std(values[idx].mean(1), ddof=1))
    _, without = _evaluate(tmp_path, bootstrap=0)
    assert "c_f1_se" not in without["conditional"]["a"]


def test_standard_scores_every_subset_on_every_example_and_quick_the_named_ones(tmp_path):
    """Catches: the standard protocol silently limited (the old 64 examples / 2 subsets per size), a
    chunk of the split skipped, or quick not being what its name says."""
    vae, metrics = _evaluate(tmp_path, size=70)
    seen = {}
    for given, index in vae.calls:
        seen.setdefault(given, []).extend(index)
    assert len(seen) == 2 ** 3 - 2 and set(metrics["conditional"]) == {"+".join(g) for g in seen}
    assert all(sorted(v) == list(range(70)) for v in seen.values())
    assert metrics["protocol"]["label"] == "standard" and metrics["protocol"]["num_given_subsets"] == 6

    vae, metrics = _evaluate(tmp_path, size=70, protocol="quick")
    seen = {}
    for given, index in vae.calls:
        seen.setdefault(given, []).extend(index)
    assert list(seen) == [("a",), ("b",), ("a", "b"), ("a", "c")]
    assert all(sorted(v) == list(range(64)) for v in seen.values())
    assert metrics["protocol"]["label"] == "quick" and metrics["num_examples"] == 64

    _, metrics = _evaluate(tmp_path, size=70, num_examples=10)
    assert metrics["protocol"]["label"] == "standard (modified: num_examples=10)"


@pytest.mark.parametrize("key, value, message", [
    ("protocol", "full", r"unknown evaluation.protocol 'full'; known: \['quick', 'standard'\]"),
    ("num_examples", 0, "num_examples must be a positive integer or null"),
    ("max_subsets_per_size", -1, "max_subsets_per_size must be a positive integer or null"),
    ("bootstrap", -3, "bootstrap must be 0"),
    ("bootstrap", 1, "bootstrap must be 0"),
])
def test_bad_protocol_values_are_named(key, value, message):
    """Catches: a typo in the protocol name falling back to a default, or a non-positive size
    evaluating nothing (or everything) without a word."""
    ev = OmegaConf.create({"protocol": "standard", key: value})
    with pytest.raises(ValueError, match=message):
        resolve_protocol(ev, 10, NAMES)


UNIT_WEIGHTS = "model.likelihood_weights={mask: 1.0, attributes: 1.0}"


@pytest.mark.parametrize("weighting, extra, bound", [("likelihood", [UNIT_WEIGHTS], True), ("simple", [UNIT_WEIGHTS], False),
                                                     ("v_mse", [UNIT_WEIGHTS], False), ("likelihood", [], False),
                                                     ("likelihood", [UNIT_WEIGHTS, "model.beta=2.5"], True),
                                                     ("likelihood", [UNIT_WEIGHTS, "model.beta=0.5"], False)])
def test_the_ledger_says_whether_the_trained_objective_is_a_bound(weighting, extra, bound, tmp_path):
    """Catches: a ledger that reports a bound for a non-bound weighting (Diff-MVAE*, simple or v_mse),
    or for the likelihood weighting with the shapes preset's λ_mask = 3, λ_attributes = 10, or with β < 1
    (it can exceed log p(x)), or none for the likelihood weighting with unit λ, at β = 1 or β = 2.5 (below the
    ELBO: a looser bound, MoPoE's setting); a missing weighting name or prediction target; a
    conditional not read from the model."""
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model, build_objective
    from pyro_diffmvae.evaluation.ledger import bound_ledger

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", f"weighting={weighting}", *extra])
    vae = build_model(cfg)
    metrics = {"protocol": {"label": "standard"}, "image_reconstruction_bound_bpd": {"mean": 1.0, "se": 0.1, "examples": 4}}
    ledger = bound_ledger(vae, cfg, metrics, build_objective(cfg))
    assert ledger["is_bound"] is bound
    assert bound_ledger(vae, cfg, metrics)["is_bound"] is bound  # the objective bound to vae.conditional
    assert ledger["objective"] == "elbo" and ledger["beta"] == cfg.model.beta and ledger["protocol"] == "standard"
    (m, decoder), = ledger["diffusion_decoders"].items()
    assert decoder["weighting"] == weighting and decoder["prediction"] == cfg.model.diffusion.prediction
    assert ledger["conditional"].startswith("product of the given experts (fusion mopoe")
    assert "reconstruction bound, not a bound on -log p(x)" in ledger["estimators"]["image_reconstruction_bound_bpd"]


@pytest.mark.parametrize("overrides, says", [
    ([], "diffmvae_star_v — Diff-MVAE*-v, this library's recommended variant"),
    (["model=diffmvae_star"], "diffmvae_star — the paper's Diff-MVAE*: the unweighted eps-MSE"),
    (["model=diffmvae"], "diffmvae — the paper's Diff-MVAE: the likelihood weighting"),
    (["model=diffmvae_star_vpred"], "diffmvae_star_vpred — the paper's Diff-MVAE* objective (the unweighted eps-MSE"),
    (["model=diffmvae_vpred"], "diffmvae_vpred — the paper's Diff-MVAE objective (the likelihood weighting lambda = g^2"),
    (["model=diffmvae_star_vpred", "model.diffusion.prediction=eps"],
     "diffmvae_star_vpred as changed by this run (prediction eps instead of v: the same objective"),
    (["model=diffmvae_star", "weighting=v_mse"],
     "diffmvae_star as changed by this run (weighting v_mse instead of simple: a different objective)"),
    (["model=diffmvae_star", "model.diffusion.prediction=v"],
     "diffmvae_star as changed by this run (prediction v instead of eps: the same objective, another parameterisation)"),
    (["model=diffmvae_star", "model.diffusion_decoders=false"], "diffmvae_star with feed-forward decoders only"),
    (["model=mopoe"], "mopoe"),
])
def test_the_ledger_names_the_model_and_any_change_to_its_objective(overrides, says):
    """Catches: a report that calls a run Diff-MVAE* after its weighting was changed on the command line
    (the name alone would claim the paper's objective), or that names no model at all."""
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation.ledger import bound_ledger

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", *overrides])
    ledger = bound_ledger(build_model(cfg), cfg, {"protocol": {"label": "standard"}})
    assert ledger["model"].startswith(says)


def test_the_ledger_names_the_mixture_of_mmvae():
    """Catches: the report claiming the fusion's product for a model trained (and generating) with MMVAE's mixture."""
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation.ledger import conditional_name

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", "model=mmvae"])
    assert conditional_name(build_model(cfg)).startswith("mixture of the given experts (MMVAE.conditional")


def test_encode_once_reuses_the_experts_of_a_chunk_without_changing_generations():
    """Catches: the encoder cache of the evaluation returning another tensor's expert (wrong
    generations), or not caching at all (each of the 2^M − 2 subsets re-encoding its modalities)."""
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation.routines import encode_once

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", "model=mopoe", "dataset.diffusion_modalities=[]"])
    vae = build_model(cfg).eval()
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, "mask": (torch.rand(4, 1, 16, 16, generator=g) > 0.5).float()}
    subsets = [["image"], ["mask"], ["image", "mask"]]
    plain = [vae.posterior(batch, given=s).mean for s in subsets]
    calls = []
    encoder = vae.modalities["image"].encoder
    handle = encoder.register_forward_hook(lambda *a: calls.append(1))
    with encode_once(vae):
        cached = [vae.posterior(batch, given=s).mean for s in subsets]
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(plain, cached))
    assert len(calls) == 1  # the image expert once for its two subsets
    assert "encode" not in vars(vae.modalities["image"])  # restored


def test_channels_last_decodes_the_same_and_restores_the_weights():
    """Catches: the channels-last evaluation changing what a decoder generates (beyond float round-off),
    leaving the weights channels-last after the evaluation (a later training step or checkpoint would
    see another layout), or converting anything when ``evaluation.channels_last=false``."""
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation.routines import channels_last

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", "model=mopoe", "dataset.diffusion_modalities=[]"])
    vae = build_model(cfg).eval()
    convs = [c for c in vae.modules() if isinstance(c, torch.nn.ConvTranspose2d)]
    assert convs, "the tiny preset's feed-forward image decoder has transposed convolutions"
    z = torch.randn(5, cfg.model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = vae.decode(z)
        with channels_last(OmegaConf.create({"channels_last": True}), vae):
            assert all(c.weight.is_contiguous(memory_format=torch.channels_last) and not c.weight.is_contiguous()
                       for c in convs)
            fast = vae.decode(z)
        with channels_last(OmegaConf.create({"channels_last": False}), vae):
            assert all(c.weight.is_contiguous() for c in convs)
    assert all(c.weight.is_contiguous() for c in convs)
    for m in plain:
        torch.testing.assert_close(fast[m], plain[m], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("paired", [True, False])
def test_batched_fd_bootstrap_equals_one_fd_per_resample(paired):
    """Catches a batched bootstrap that differs from its definition (the SD, divisor B − 1, of
    fd_of_features over the seeded resamples): a wrong covariance divisor, unpaired indices for
    conditional FDs, or resamples lost between batches (137 resamples of 300: several batches)."""
    import numpy as np

    from pyro_diffmvae.evaluation.uncertainty import bootstrap_fd_se, bootstrap_indices, fd_of_features

    torch.manual_seed(0)
    real, fake = torch.randn(300, 5), 1.3 * torch.randn(300, 5) + 0.2
    idx_r = bootstrap_indices(300, 137, 4)
    idx_f = idx_r if paired else bootstrap_indices(300, 137, 5)
    by_definition = np.std([fd_of_features(real[i], fake[j]) for i, j in zip(idx_r, idx_f)], ddof=1)
    assert bootstrap_fd_se(real, fake, 137, 4, paired=paired) == pytest.approx(by_definition, rel=1e-9)
    # 300 x 5 x 20 values per batch: 20 resamples a batch, 7 batches
    assert bootstrap_fd_se(real, fake, 137, 4, paired=paired, batch_values=300 * 5 * 20) == pytest.approx(by_definition, rel=1e-9)
    with pytest.raises(ValueError, match="non-finite"):
        bootstrap_fd_se(real, fake * float("nan"), 10, 0)
