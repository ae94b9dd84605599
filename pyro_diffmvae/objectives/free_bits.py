r"""The subset ELBO with free bits: a lever against posterior collapse (issue 14). Free bits are from Kingma et al.
2016, *Improved variational inference with inverse autoregressive flow*.

A decoder that can model its modality without z (a diffusion decoder above all) makes switching the
encoder off the cheaper optimum: every nat put into z costs β nats of KL before the decoder learns to
use it. Free bits waive that cost up to λ nats per latent dimension (``nats_per_dim``; not the likelihood
weights λ_m), measured on the batch:

.. math:: -\mathcal L_\lambda = -\sum_b \Big[\sum_m \lambda_m \log p(x^m_b\mid z_b)\Big]
          + \beta\, B \sum_d \max\Big(\lambda,\ \frac1B \sum_b \mathrm{KL}_{b,d}\Big),
          \qquad \mathrm{KL}_{b,d} = \sum_A \omega_{A,b}\,\mathrm{KL}\big(q_d(z_d\mid x_{A,b})\,\Vert\,p(z_d)\big)

(the subset sum over the ω-weighted, sampled or enumerated subsets of the guide, as in
:mod:`.subset_elbo`; one such sum per latent site when a model has several). For a Gaussian q and
p = N(0, 1), :math:`\mathrm{KL}_d = \tfrac12(\mu_d^2 + \sigma_d^2 - 1 - \log\sigma_d^2)`. A dimension whose
batch-mean KL is below λ gets no KL gradient; above it the objective is the ELBO's. λ = 0 is the ELBO.

Since :math:`\max(\lambda, k) \ge k`, :math:`\mathcal L_\lambda` is never above the batch's ELBO: it stays a
lower bound on the mean :math:`\log p(x)` wherever the ELBO is one (a looser one, optimised towards another
posterior). The KL is clamped on the batch mean, not per example, as Kingma et al. do, so that an example
may still carry more than λ in a dimension that others do not use.

One draw of z per particle (Pyro's ``TraceMeanField_ELBO`` cannot clamp a KL it sums inside), through the
same traces as :func:`~pyro_diffmvae.objectives.elbo_terms`.
"""

from __future__ import annotations

from typing import Mapping

import torch
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from .base import non_negative_hyperparameter
from .subset_elbo import ELBO, elbo_terms, elbo_traces

__all__ = ["FreeBitsELBO", "latent_kl_per_dim"]


def latent_kl_per_dim(model_trace, guide_trace, beta: float) -> dict[str, torch.Tensor]:
    r"""``{latent site: (D,) Σ_b KL_{b,d}}``: each latent site's KL per dimension, summed over the examples
    and the ω-weighted subsets, without β (the sites carry β as their ``poutine.scale``)."""
    out = {}
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["is_observed"]:
            continue
        q, p = guide_trace.nodes[name]["fn"], site["fn"]
        q_base, p_base = getattr(q, "base_dist", None), getattr(p, "base_dist", None)
        if q_base is None or p_base is None or getattr(q, "reinterpreted_batch_ndims", None) != 1:
            raise TypeError(f"free bits need a latent site with one event dimension (Independent(..., 1)); "
                            f"site {name!r} has {type(q).__name__} in the guide and {type(p).__name__} in the model")
        kl = kl_divergence(q_base, p_base)  # (..., B, D)
        scale, mask = guide_trace.nodes[name]["scale"], guide_trace.nodes[name]["mask"]
        scale = scale / beta if not torch.is_tensor(scale) else (scale / beta).unsqueeze(-1)
        mask = mask.unsqueeze(-1) if torch.is_tensor(mask) else mask
        out[name] = scale_and_mask(kl, scale, mask).reshape(-1, kl.shape[-1]).sum(0)
    return out


class FreeBitsELBO(ELBO):
    r"""Minus the subset ELBO with free bits: each latent dimension's batch-mean KL counts as at least
    ``nats_per_dim`` (module docstring). ``model.objective=elbo_free_bits`` with
    ``model.objective_params.nats_per_dim=λ``.

    :param nats_per_dim: λ ≥ 0, in nats per latent dimension; 0 is the subset ELBO.
    :param num_particles: draws of z (and of each decoder's noise) averaged per step.
    """

    name = "elbo_free_bits"

    def __init__(self, nats_per_dim: float, num_particles: int = 1):
        self.nats_per_dim = non_negative_hyperparameter(nats_per_dim, "free bits: nats_per_dim")
        super().__init__(num_particles)

    def _one_draw(self, vae, batch: Mapping):
        """``(-L_λ summed over the batch, the per-dimension KLs, the draw's traces)``."""
        traces = guide_trace, model_trace = elbo_traces(vae, batch)
        B = vae.parse_batch(batch)[2]
        loglik = sum(site["log_prob_sum"] for site in model_trace.nodes.values()
                     if site["type"] == "sample" and site["is_observed"])
        kl = latent_kl_per_dim(model_trace, guide_trace, vae.beta)
        penalty = sum(torch.clamp(k / B, min=self.nats_per_dim).sum() for k in kl.values())
        return -loglik + vae.beta * B * penalty, kl, traces

    def loss(self, vae, batch: Mapping) -> torch.Tensor:
        """``-L_λ`` summed over the batch, averaged over the particles (differentiable)."""
        return sum(self._one_draw(vae, batch)[0] for _ in range(self.num_particles)) / self.num_particles

    def terms(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        """:func:`elbo_terms` (the ELBO, not clamped) plus ``"loss"`` = ``-L_λ`` per example, both of one draw,
        and ``"kl_dims_below_free_bits"``: the latent dimensions whose batch-mean KL is below λ (collapsed, or
        not yet used)."""
        loss, kl, traces = self._one_draw(vae, batch)
        terms = elbo_terms(vae, batch, traces)
        B = vae.parse_batch(batch)[2]
        terms["loss"] = loss / B
        terms["kl_dims_below_free_bits"] = sum((k / B < self.nats_per_dim).sum() for k in kl.values()).float()
        return terms

    def __repr__(self):
        return f"FreeBitsELBO(nats_per_dim={self.nats_per_dim}, num_particles={self.num_particles})"
