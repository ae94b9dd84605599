r"""Likelihoods in the evaluation: the model's joint log-likelihood, and each diffusion decoder's
reconstruction bound in bits per dimension.

``joint_log_likelihood`` — :math:`-\log p(x)` of all modalities together, per test example, by
:func:`~pyro_diffmvae.loglik.log_likelihood` (IWAE with the model's own posterior as proposal,
``evaluation.loglik_samples`` particles; diffusion decoders by ``evaluation.loglik_decoder``: the
λ = g² bound with ``evaluation.loglik_draws`` draws, or the probability-flow ODE), on the first
``evaluation.loglik_examples`` test examples (0: not computed). Continuous image modalities (a
normal or Laplace likelihood, or a diffusion decoder, on ``(C, H, W)`` images of 8-bit data in
[-1, 1]) are dequantised first, :math:`x + u/127.5` with :math:`u\sim U[0,1)^d` (seeded), so the
density bounds the discrete probability of the 8-bit image; discrete modalities (masks, attributes,
tokens) are probabilities already. Reported: the mean NLL in nats per example ± its SE over the
examples, and in bits per dimension of the discrete data,

.. math:: \mathrm{bpd} = \frac{\mathrm{NLL} + d_c\log 127.5}{d\,\ln 2},

with :math:`d_c` the continuous dimensions (their bin width 1/127.5) and :math:`d` all of them;
plus the mean Monte Carlo SE of the per-example estimates, whether the number is a lower bound on
:math:`\log p(x)` (so the NLL an upper bound) and whether it converges as K grows. Two-stage models
(SBM-VAE-C, MLD) define no joint density to estimate: ``{"supported": False, "reason": ...}``.

``<m>_reconstruction_bound_bpd`` — a *reconstruction* bound, not a bound on :math:`-\log p(x)`: the
score-matching bound of :math:`-\log p(x^m\mid z)` with the likelihood
weighting (whatever weighting the decoder trained with), dequantised, per dimension in bits, at the
posterior mean :math:`z = \mathbb E\,q(z\mid x)` of the first ``evaluation.bpd_examples`` test
examples, averaged over ``evaluation.bpd_draws`` diffusion times (mean ± standard error). It bounds
:math:`-\log p(x^m\mid z)` at one :math:`z` computed from all modalities (including :math:`x^m`), so
it measures how well the decoder reconstructs, not the model's marginal likelihood. (Metrics
written before this name held it as ``<m>_bound_bpd``.)
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..data.spec import ModalitySpec
from ..loglik import log_likelihood
from ..metrics.likelihood import diffusion_bpd
from ..two_stage import TwoStageVAE
from .subsets import collate, slice_batch
from .uncertainty import mean_and_se

__all__ = ["joint_log_likelihood", "diffusion_reconstruction_bound_bpd", "diffusion_bound_bpd"]

#: the width of one 8-bit level of data scaled to [-1, 1]
_LEVEL = 1.0 / 127.5
_CONTINUOUS = ("normal", "laplace")


def _is_8bit_image(vae, name: str, spec: ModalitySpec) -> bool:
    return len(spec.shape) == 3 and (vae.modalities[name].is_diffusion or spec.likelihood in _CONTINUOUS)


def _dequantised(batch: Mapping, continuous: Sequence[str], seed: int, device) -> dict:
    """The batch on ``device``, its ``continuous`` modalities plus seeded uniform noise of one 8-bit level."""
    g = torch.Generator().manual_seed(seed)
    out = {m: x.to(device) if torch.is_tensor(x) else x for m, x in batch.items()}
    for m in continuous:
        out[m] = out[m] + (torch.rand(out[m].shape, generator=g, dtype=out[m].dtype) * _LEVEL).to(device)
    return out


def _non_negative_int(ev, key: str, default: int) -> int:
    value = ev.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"evaluation.{key} must be a non-negative integer, got {value!r}")
    return int(value)


@torch.no_grad()
def joint_log_likelihood(vae, test_set, specs: Mapping[str, ModalitySpec], ev, batch_size: int, device=None,
                         seed: int = 0) -> dict | None:
    """``metrics["joint_log_likelihood"]`` (module docstring), ``batch_size`` test examples at a time on
    ``device``; ``None`` when ``evaluation.loglik_examples`` is 0."""
    n = min(_non_negative_int(ev, "loglik_examples", 256), len(test_set))
    if n == 0:
        return None
    if isinstance(vae, TwoStageVAE):
        return {"supported": False, "reason": "two-stage models (SBM-VAE-C, MLD) have no shared latent z and no "
                                              "posterior density to importance-sample with (pyro_diffmvae.loglik)"}
    k, draws = _non_negative_int(ev, "loglik_samples", 16), _non_negative_int(ev, "loglik_draws", 8)
    decoder = ev.get("loglik_decoder", "bound")
    names = list(vae.names)
    continuous = [m for m in names if _is_8bit_image(vae, m, specs[m])]
    values, stderrs, result = [], [], None
    for start in range(0, n, batch_size):
        batch = _dequantised(collate(test_set, range(start, min(n, start + batch_size))), continuous, seed + start, device)
        result = log_likelihood(vae, batch, num_samples=k, decoder_likelihood=decoder, num_draws=draws)
        values.append(result.value)
        stderrs.append(result.stderr)
    nll = -torch.cat(values)
    mean, se = mean_and_se(nll)
    dims = result.num_dims
    dims_continuous = sum(math.prod(specs[m].shape) for m in continuous)
    to_bpd = 1.0 / (dims * math.log(2.0))
    mc = torch.cat(stderrs)
    return {"supported": True, "examples": n, "num_samples": k, "decoder_likelihood": decoder,
            "num_draws": draws, "estimator": result.estimator,
            "is_lower_bound": result.is_lower_bound, "converges": result.converges,
            "nll_nats": mean, "nll_nats_se": se,
            "bits_per_dim": (mean + dims_continuous * math.log(127.5)) * to_bpd, "bits_per_dim_se": se * to_bpd,
            "mean_monte_carlo_se_nats": float(mc.nanmean()) if torch.isfinite(mc).any() else None,
            "num_dims": dims, "dequantised": continuous}


def diffusion_reconstruction_bound_bpd(vae, truth: Mapping, names: Sequence[str], ev, n: int) -> dict[str, dict]:
    """``{"<m>_reconstruction_bound_bpd": {"mean", "se", "examples"}}`` for every diffusion-decoded modality ``m``."""
    out = {}
    for m in names:
        if vae.modalities[m].is_diffusion:
            k = min(ev.bpd_examples, n)
            z = vae.posterior(slice_batch(truth, slice(0, k))).mean
            mean, se = diffusion_bpd(vae.modalities[m].decoder, truth[m][:k], z, num_draws=ev.bpd_draws)
            out[f"{m}_reconstruction_bound_bpd"] = {"mean": float(mean), "se": float(se), "examples": k}
    return out


diffusion_bound_bpd = diffusion_reconstruction_bound_bpd  # the name before it said what it bounds
