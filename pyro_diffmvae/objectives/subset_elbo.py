r"""The subset ELBO (Diff-MVAE, MoPoE; paper eq. 3–5) through Pyro's ``TraceMeanField_ELBO``.

The model's own model/guide pair (:class:`~pyro_diffmvae.model.MultimodalVAE`) states the
generative model and the fused posterior; this objective is

.. math:: -\mathcal L = -\sum_{A\in S}\omega_A\Big\{\mathbb E_{q(z\mid x_A)}\Big[\sum_m\lambda_m\log p(x^m\mid z)\Big]
          - \beta\,\mathrm{KL}\big(q(z\mid x_A)\,\Vert\,p(z)\big)\Big\}

estimated by ``TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide,
batch)`` (analytic Gaussian KL; the subsets sampled or enumerated by the guide). This is the one
place in the package that constructs a ``TraceMeanField_ELBO``. Swap the divergence or the
estimator here (or subclass :class:`ELBO` in a file of your own) and everything that trains,
validates and logs follows.

It is a lower bound on :math:`\log p(x)` when β ≥ 1 (β > 1: a looser one), every λ_m = 1 and every decoder's
``log_prob`` bounds its log-likelihood (a diffusion decoder with ``weighting="likelihood"``):
each subset's term is an ELBO with :math:`q(z\mid x_A)` as the variational distribution, and a
convex combination of lower bounds is one (``docs/design.md`` §1).
"""

from __future__ import annotations

from typing import Mapping

import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.distributions.util import scale_and_mask
from pyro.infer import TraceMeanField_ELBO
from pyro.poutine.util import site_is_subsample

from .base import Objective, beta_elbo_is_bound

__all__ = ["ELBO", "elbo_terms", "elbo_traces"]


class ELBO(Objective):
    r"""Minus the subset ELBO of the model's own model/guide pair (module docstring).

    :param num_particles: ELBO particles (vectorised draws are not used: diffusion decoders
        already draw (t, ε) per example).

    The conditional for generation is the model's fusion's (``vae.fusion_posterior``: the PoE of
    the given experts for ``mopoe``/``poe``, their mixture for ``moe``); a two-stage model
    conditions through its own ``posterior``/``generate``.
    """

    name = "elbo"

    def __init__(self, num_particles: int = 1):
        self.num_particles = int(num_particles)
        if self.num_particles < 1:
            raise ValueError(f"num_particles must be a positive int, got {num_particles!r}")
        self.elbo = TraceMeanField_ELBO(num_particles=self.num_particles, max_plate_nesting=2)

    def loss(self, vae, batch: Mapping) -> torch.Tensor:
        return self.elbo.differentiable_loss(vae.model, vae.guide, batch)

    def terms(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        """:func:`elbo_terms` (one draw) plus ``"loss"`` = −elbo."""
        terms = elbo_terms(vae, batch)
        terms["loss"] = -terms["elbo"]
        return terms

    def is_bound(self, vae) -> bool:
        return bool(getattr(vae, "proper_prior", True)) and beta_elbo_is_bound(vae, vae.beta)

    def __repr__(self):
        return f"ELBO(num_particles={self.num_particles})"


def elbo_traces(vae, batch: Mapping):
    """One draw of the guide and the model replayed on it, log-densities computed: ``(guide_trace, model_trace)``."""
    guide_trace = poutine.trace(vae.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(batch)
    model_trace.compute_log_prob()
    return guide_trace, model_trace


def elbo_terms(vae, batch: Mapping, traces=None) -> dict[str, torch.Tensor]:
    r"""The parts of the (subset) ELBO estimate for one draw, per example of the batch.

    Returns ``{"loglik/<name>": Σ weighted log p(x^m|z), "kl": KL(q‖p) (without β; summed over the
    latent sites when there are several), "elbo": the
    objective that ``TraceMeanField_ELBO`` maximises, i.e. Σ_m loglik − β·KL}``, each divided by
    the batch size. ω weights and availability masks are applied as in the ELBO. ``traces``: the
    :func:`elbo_traces` of a draw already made (default: a new draw).
    """
    guide_trace, model_trace = elbo_traces(vae, batch) if traces is None else traces
    B = vae.parse_batch(batch)[2]
    out: dict[str, torch.Tensor] = {}
    elbo = 0.0
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["is_observed"]:
            out[f"loglik/{name[2:]}"] = site["log_prob_sum"] / B
            elbo = elbo + site["log_prob_sum"]
        else:
            q = guide_trace.nodes[name]
            kl = kl_divergence(q["fn"], site["fn"])
            kl = scale_and_mask(kl, q["scale"], q["mask"]).sum()
            out["kl"] = out.get("kl", 0.0) + kl / vae.beta / B  # summed over latent sites (one per modality in two_stage)
            elbo = elbo - kl
    out["elbo"] = elbo / B
    return out
