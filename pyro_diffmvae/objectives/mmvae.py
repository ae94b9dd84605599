r"""MMVAE (Shi et al. 2019): the stratified bound importance-weighted with the mixture of experts."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..fusion import poe, subset_family
from . import gaussian
from .base import Objective, beta_elbo_is_bound, mixture_of_experts_posterior, weights_are_unit
from .gaussian import check_estimator, masked, mixture_log_density, resolve_beta, std_normal_log_prob, stratum_bound, weighted_log_likelihood

__all__ = ["MMVAE"]


class MMVAE(Objective):
    r"""MMVAE (Shi, Siddharth, Paige & Torr 2019, "Variational Mixture-of-Experts Autoencoders for
    Multi-Modal Deep Generative Models", §3): the joint posterior is the uniform mixture of the
    unimodal experts, :math:`q(z\mid X) = \frac1M\sum_m q(z\mid x_m)`, and the bound is estimated
    with **stratified sampling** — K reparameterised draws :math:`z_m^{1:K}\sim q(z\mid x_m)` per
    expert — importance-weighted with the mixture density:

    .. math:: \mathcal L(X) = \frac1M\sum_m \mathbb E_{z_m^{1:K}\sim q(z\mid x_m)}\Big[\log\frac1K\sum_k w(z_m^k)\Big],\qquad
              \log w(z) = \sum_n\lambda_n\log p(x_n\mid z) + \beta\big(\log p(z) - \log q(z\mid X)\big),

    with :math:`\log q(z\mid X)=\operatorname{logsumexp}_n\log q(z\mid x_n) - \log M`. This is the
    "looser" bound of the authors' code (``m_iwae_looser``/``m_dreg_looser``: the average over
    modalities outside the log), which the authors' README recommends and uses for its released models.
    β = 1 is MMVAE (β ≠ 1 weights the log-ratio as MMVAE+'s code does).

    :param estimator: ``"elbo"`` — :math:`\frac1K\sum_k\log w` per stratum (K = 1: the stratified
        ELBO :math:`\frac1M\sum_m[\log p(z_m)+\sum_n\log p(x_n\mid z_m)-\log q(z_m\mid X)]`);
        ``"iwae"`` — the bound above; ``"dreg"`` — its value with the doubly-reparameterised
        gradient (see :func:`stratum_bound`; the paper's choice, K = 30 for MNIST-SVHN, 50 for CUB).
    :param num_samples: K.
    :param beta: weight of the log prior/posterior ratio (default ``vae.beta``).

    **DReG caveat.** Tucker et al.'s identity (replace the score-function term by
    :math:`\tilde w^2`-weighted path derivatives) holds when the samples come from the density in
    the weight. Here stratum m draws from :math:`q(z\mid x_m)` but weights with the mixture, so for
    K > 1 this is MMVAE's estimator (the same as ``m_dreg_looser``), not an exactly unbiased
    gradient of the bound; for K = 1 it is the "sticking the landing" path gradient, whose dropped
    term :math:`\frac1M\sum_m\mathbb E_{q_m}[\nabla_\phi\log q(z\mid X)] = \mathbb E_{q(z\mid X)}[\nabla_\phi\log q(z\mid X)] = 0`
    is unbiasedly zero. MMVAE's learnable prior variance (``--learn-prior``) and Laplace
    posteriors are not reproduced: p(z) = N(0, I) and the experts are Gaussian (the shared
    encoders of this library).

    Missing modalities: per example, the strata and the mixture run over its observed set
    :math:`O_b` (M → :math:`|O_b|`), and every observed modality is scored.

    Noise (:func:`~pyro_diffmvae.objectives.gaussian.standard_normal`): one ``(M, K, B, D)`` draw (stratum m uses row m; rows of modalities absent
    from the batch are drawn but unused).
    """

    name = "mmvae"
    conditional_kind = "mixture"

    def __init__(self, estimator: str = "elbo", num_samples: int = 1, beta: float | None = None):
        check_estimator(estimator, num_samples)
        self.estimator, self.num_samples, self.beta = estimator, num_samples, beta

    def per_example(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # (B, M, D)
        M, K, D = mu.shape[1], self.num_samples, mu.shape[2]
        mu_s, std_s = mu.transpose(0, 1)[:, None], torch.exp(0.5 * logvar).transpose(0, 1)[:, None]  # (M, 1, B, D)
        z = mu_s + std_s * gaussian.standard_normal((M, K, B, D), mu)  # z[m] ~ q(z | x_m)
        dreg = self.estimator == "dreg"
        mu_q, logvar_q = (mu.detach(), logvar.detach()) if dreg else (mu, logvar)
        lw = resolve_beta(self.beta, vae) * (std_normal_log_prob(z) - mixture_log_density(z, mu_q, logvar_q, available))
        for name in data:
            lw = lw + weighted_log_likelihood(vae, name, z, data[name], available[:, vae.names.index(name)])
        per_stratum = stratum_bound(lw, self.estimator, [z])  # (M, B)
        strata = available.T  # (M, B)
        bound = masked(per_stratum, strata).sum(0) / available.sum(-1).to(per_stratum.dtype)
        return {"loss": -bound}

    def conditional(self, vae, batch: Mapping, given: Sequence[str]):
        """The uniform mixture of the given experts: one given modality's expert, chosen uniformly."""
        return mixture_of_experts_posterior(vae, batch, given)

    def is_bound(self, vae) -> bool:
        """The stratified bound is below log p(X) (Jensen per stratum, then over the strata) when the
        likelihoods are unweighted and β = 1, or β ≥ 1 for the ``elbo`` estimator (β outside any log-mean-exp)."""
        beta = resolve_beta(self.beta, vae)
        return beta_elbo_is_bound(vae, beta) if self.estimator == "elbo" else weights_are_unit(vae, beta)

    def __repr__(self):
        return f"MMVAE(estimator={self.estimator!r}, num_samples={self.num_samples}, beta={self.beta})"
