"""The joint log-likelihood of the evaluation (``metrics["joint_log_likelihood"]``,
:func:`pyro_diffmvae.evaluation.likelihood.joint_log_likelihood`): the same numbers as
:func:`pyro_diffmvae.log_likelihood` on the same dequantised examples, bits/dim by hand, and what is
reported for models it cannot score."""

import math

import pyro
import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pyro_diffmvae import log_likelihood
from pyro_diffmvae.builders import build_model
from pyro_diffmvae.evaluation.likelihood import joint_log_likelihood
from pyro_diffmvae.evaluation.report import write_report
from pyro_diffmvae.evaluation.subsets import collate

def _cfg(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=["experiment=tiny", "model=mopoe", "dataset.diffusion_modalities=[]", *overrides])


class ToySet(torch.utils.data.Dataset):
    """The tiny preset's modalities: images on the 8-bit grid of [-1, 1], a binary mask, 17 binary attributes."""

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(1)
        self.data = {"image": torch.randint(0, 256, (n, 3, 16, 16), generator=g).float() / 127.5 - 1,
                     "mask": (torch.rand(n, 1, 16, 16, generator=g) > 0.5).float(),
                     "attributes": (torch.rand(n, 17, generator=g) > 0.5).float()}

    def __len__(self):
        return len(self.data["image"])

    def __getitem__(self, i):
        return {m: x[i] for m, x in self.data.items()}


def _specs(cfg):
    from pyro_diffmvae.data.registry import get_dataset

    return get_dataset(cfg).modalities(cfg)


def test_joint_nll_is_the_mean_of_log_likelihood_on_the_dequantised_examples_and_bpd_is_by_hand(tmp_path):
    """Catches: the evaluation scoring images without dequantisation (or masks with it), losing or
    repeating examples across its chunks, a sign error (NLL = +log p), or a bits/dim that ignores the
    bin width of the continuous dimensions or counts the discrete ones as continuous."""
    cfg = _cfg()
    vae = build_model(cfg).eval()
    data = ToySet(6)
    ev = OmegaConf.create({"loglik_examples": 5, "loglik_samples": 3, "loglik_draws": 2})
    pyro.set_rng_seed(0)
    joint = joint_log_likelihood(vae, data, _specs(cfg), ev, batch_size=2, seed=10)

    pyro.set_rng_seed(0)
    values = []
    for start in (0, 2, 4):  # the same chunks, with the same dequantisation noise
        batch = collate(data, range(start, min(5, start + 2)))
        g = torch.Generator().manual_seed(10 + start)
        batch["image"] = batch["image"] + torch.rand(batch["image"].shape, generator=g) / 127.5
        values.append(log_likelihood(vae, batch, num_samples=3, num_draws=2).value)
    nll = -torch.cat(values).double()
    assert joint["examples"] == 5 and joint["dequantised"] == ["image"]
    assert joint["nll_nats"] == pytest.approx(float(nll.mean()), rel=1e-9)
    assert joint["nll_nats_se"] == pytest.approx(float(nll.std(unbiased=False) / math.sqrt(5)), rel=1e-6)
    d_image, d = 3 * 16 * 16, 3 * 16 * 16 + 16 * 16 + 17
    assert joint["num_dims"] == d
    assert joint["bits_per_dim"] == pytest.approx((float(nll.mean()) + d_image * math.log(127.5)) / (d * math.log(2)))
    assert joint["is_lower_bound"] and joint["converges"]  # feed-forward decoders: an IWAE lower bound

    write_report({"joint_log_likelihood": joint}, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert f"{joint['nll_nats']:.2f} ± {joint['nll_nats_se']:.2f} nats" in report
    assert "an upper bound on −log p(x) in expectation" in report


def test_zero_examples_is_off_and_bad_values_are_named():
    """Catches: ``loglik_examples: 0`` still running the estimator, or a negative / non-integer setting
    accepted silently."""
    cfg = _cfg()
    vae = build_model(cfg).eval()
    assert joint_log_likelihood(vae, ToySet(2), _specs(cfg), OmegaConf.create({"loglik_examples": 0}), 2) is None
    with pytest.raises(ValueError, match="evaluation.loglik_samples"):
        joint_log_likelihood(vae, ToySet(2), _specs(cfg), OmegaConf.create({"loglik_samples": -1}), 2)


def test_two_stage_models_are_reported_as_unsupported():
    """Catches: a two-stage model crashing the evaluation (log_likelihood raises NotImplementedError
    for it), or being given a number it does not have."""
    cfg = _cfg("model=sbm_vae_c")
    vae = build_model(cfg).eval()
    joint = joint_log_likelihood(vae, ToySet(2), _specs(cfg), OmegaConf.create({}), 2)
    assert joint["supported"] is False and "two-stage" in joint["reason"]
