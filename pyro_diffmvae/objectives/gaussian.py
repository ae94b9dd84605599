r"""Gaussian densities, KLs and estimators shared by the baseline objectives.

Randomness: every reparameterised draw of the objectives comes from :func:`standard_normal`
(plain torch randomness; each objective's docstring states the order of its draws), called as
``gaussian.standard_normal(...)``, so that a test can record or replace the draws by patching this
one function.
"""

from __future__ import annotations

import math

import torch

__all__ = ["ESTIMATORS", "standard_normal", "std_normal_log_prob", "normal_log_prob", "kl_normal", "masked",
           "weighted_log_likelihood", "resolve_beta", "check_estimator", "stratum_bound", "mixture_log_density"]

ESTIMATORS = ("elbo", "iwae", "dreg")


def standard_normal(shape, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype and device (the one source of
    reparameterisation noise of the objectives)."""
    return torch.randn(tuple(shape), dtype=like.dtype, device=like.device)


def std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dim."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)), summed over the last dim (broadcasting)."""
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).sum(-1)


def kl_normal(mu_q, logvar_q, mu_p=None, logvar_p=None) -> torch.Tensor:
    r"""Closed-form :math:`\mathrm{KL}(\mathcal N(\mu_q,\sigma_q^2)\Vert\mathcal N(\mu_p,\sigma_p^2))`
    (diagonal), summed over the last dim; the standard normal when ``mu_p`` is ``None``."""
    if mu_p is None:
        return 0.5 * (torch.exp(logvar_q) + mu_q**2 - 1.0 - logvar_q).sum(-1)
    return 0.5 * ((torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0 + logvar_p - logvar_q).sum(-1)


def masked(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value`` where ``mask`` holds, else 0 (``torch.where``, so masked entries pass no gradient)."""
    return torch.where(mask, value, torch.zeros_like(value))


def weighted_log_likelihood(vae, name: str, z: torch.Tensor, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda_n \log p(x_n\mid z)` of modality ``name``: ``z`` is ``S + (B, D)``, ``x`` is
    ``(B, ...)``; rows where the modality is unavailable give 0. Returns ``S + (B,)``."""
    modality = vae.modalities[name]
    lp = modality.decoder(z).log_prob(x)
    return masked(lp, available.expand_as(lp)) * modality.weight


def resolve_beta(beta, vae) -> float:
    """The objective's β, or the model's (``vae.beta``) when it has none."""
    return float(vae.beta if beta is None else beta)


def check_estimator(estimator: str, num_samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {list(ESTIMATORS)}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")


def stratum_bound(lw: torch.Tensor, estimator: str, latents: list[torch.Tensor]) -> torch.Tensor:
    r"""Per-stratum estimate from log-weights ``lw`` of shape ``(S, K, B)`` → ``(S, B)``.

    * ``"elbo"``: :math:`\frac1K\sum_k \log w_k`;
    * ``"iwae"``: :math:`\log\frac1K\sum_k w_k`;
    * ``"dreg"``: the IWAE *value* with the doubly-reparameterised gradient (Tucker, Lawson, Gu &
      Maddison, "Doubly Reparameterized Gradient Estimators for Monte Carlo Objectives", arXiv 2018,
      ICLR 2019): ``lw`` must have been computed with the variational parameters detached inside
      :math:`\log q`, so that the encoders receive gradient only through the reparameterised
      ``latents``; the surrogate
      :math:`\sum_k \mathrm{sg}(\tilde w_k)\log w_k` gives the decoders
      :math:`\sum_k\tilde w_k\nabla_\theta\log w_k` (the IWAE gradient), and a hook multiplies the
      gradient reaching each latent by :math:`\tilde w_k` again, so the encoders receive
      :math:`\sum_k\tilde w_k^2\,\partial_z\log w_k\,\partial_\phi z_k`, with
      :math:`\tilde w_k = w_k/\sum_j w_j` normalised within the stratum (as in MMVAE's
      ``m_dreg_looser``).
    """
    K = lw.shape[1]
    if estimator == "elbo":
        return lw.mean(1)
    value = torch.logsumexp(lw, 1) - math.log(K)
    if estimator == "iwae":
        return value
    with torch.no_grad():
        w_tilde = torch.softmax(lw, 1)  # (S, K, B)
    for latent in latents:  # each (S, K, B, d)
        if latent.requires_grad:
            latent.register_hook(lambda grad, w=w_tilde: grad * w.unsqueeze(-1))
    surrogate = (w_tilde * lw).sum(1)
    return value.detach() + surrogate - surrogate.detach()


def mixture_log_density(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\frac{1}{|O_b|}\sum_{n\in O_b} q(z\mid x_n)` for ``z`` of shape ``S + (B, D)`` and
    experts ``(B, M, D)``; returns ``S + (B,)``."""
    log_q = normal_log_prob(z.unsqueeze(-2), mu, logvar)  # S + (B, M)
    log_q = torch.where(available.expand_as(log_q), log_q, torch.full_like(log_q, -math.inf))
    return torch.logsumexp(log_q, -1) - torch.log(available.sum(-1).to(z.dtype))
