r"""The subset ELBO plus the hint decoders' reconstruction term (issue 14, a lever; DiffuseVAE's first stage,
trained jointly). The hint is :mod:`pyro_diffmvae.nets.hint`: a feed-forward decoder :math:`p_{\phi_m}(x^m\mid z)`
whose mean the diffusion decoder's ε-network sees beside :math:`x_t`.

.. math:: -\mathcal L_\gamma = -\mathcal L \;-\; \gamma \sum_b \sum_{A\in S}\omega_{A,b}\,
          \mathbb E_{q(z\mid x_{A,b})}\Big[\sum_{m\,\in\,\text{hinted},\ \text{observed}}\log p_{\phi_m}(x^m_b\mid z)\Big]

with :math:`\mathcal L` the subset ELBO of :mod:`.subset_elbo` (paper eq. 3–5), estimated on the **same** draw
of the subsets and of z (one draw per particle, through :func:`~pyro_diffmvae.objectives.elbo_traces`; the
KL in closed form, as ``TraceMeanField_ELBO`` computes it). The hint term asks z to carry what a feed-forward
decoder needs to reconstruct :math:`x^m` — the digit's identity, its colour and position — so that the
diffusion decoder has something to read; it is the Laplace or Normal log-likelihood a feed-forward model
(MoPoE) trains on.

With γ > 0 this is not a bound on log p(x): the image is scored twice, once by each decoder (the joint model
is still the diffusion decoder's, so :func:`~pyro_diffmvae.loglik.log_likelihood` still estimates it). γ = 0
is the subset ELBO of a model with hinted decoders, and a bound when that ELBO is.
"""

from __future__ import annotations

from typing import Mapping

import torch

from .base import non_negative_hyperparameter
from .subset_elbo import ELBO, elbo_terms, elbo_traces

__all__ = ["HintELBO", "hint_log_likelihoods"]


def hint_log_likelihoods(vae, batch: Mapping, guide_trace, parsed=None) -> dict[str, torch.Tensor]:
    r"""``{modality: (B,) Σ_A ω_{A,b} log p_φ(x^m_b | z_{A,b})}`` for each modality whose diffusion decoder has a
    hint, at the guide trace's z (its draw of the subsets), 0 where the modality is missing. A model without
    any hinted decoder is an error (the term would silently be zero). ``parsed``: ``vae.parse_batch(batch)`` when
    the caller has it already."""
    hints = {name: mod.decoder.hint for name, mod in vae.modalities.items() if getattr(mod.decoder, "hint", None) is not None}
    if not hints:
        raise ValueError("elbo_hint: no decoder of this model has a hint (model.unet.hint=true gives the diffusion "
                         "decoders one); without one the hint term is empty")
    if "z" not in guide_trace.nodes:
        raise ValueError(f"elbo_hint needs a model with one shared latent site 'z' (MultimodalVAE); this guide samples "
                         f"{[n for n, s in guide_trace.nodes.items() if s['type'] == 'sample']}")
    data, available, _ = vae.parse_batch(batch) if parsed is None else parsed
    z = guide_trace.nodes["z"]["value"]  # (B, D) with sampled subsets, (K, B, D) with enumerated ones
    omega = None if z.dim() == 2 else vae.subset_weights(available).T  # (K, B)
    out = {}
    for name, hint in hints.items():
        if name not in data:
            continue
        j = vae.names.index(name)
        lp = hint(z).log_prob(data[name])  # (B,) or (K, B)
        if omega is not None:
            lp = (torch.where(omega > 0, lp, torch.zeros_like(lp)) * omega).sum(0)
        out[name] = torch.where(available[:, j], lp, torch.zeros_like(lp))
    return out


class HintELBO(ELBO):
    r"""Minus the subset ELBO minus γ times the hint decoders' log-likelihood (module docstring).
    ``model.objective=elbo_hint`` with ``model.objective_params.hint_weight=γ``; needs ``model.unet.hint=true``.

    :param hint_weight: γ ≥ 0; 0 is the subset ELBO.
    :param num_particles: draws of the subsets, z and each decoder's noise, averaged per step.
    """

    name = "elbo_hint"

    def __init__(self, hint_weight: float, num_particles: int = 1):
        self.hint_weight = non_negative_hyperparameter(hint_weight, "elbo_hint: hint_weight")
        super().__init__(num_particles)

    def _one_draw(self, vae, batch: Mapping):
        """``(-L_γ summed over the batch, the ELBO's terms (batch means), the hint log-likelihoods (B,), B)`` of one
        draw."""
        parsed = vae.parse_batch(batch)
        B = parsed[2]
        traces = elbo_traces(vae, batch)
        terms = elbo_terms(vae, batch, traces)
        hints = hint_log_likelihoods(vae, batch, traces[0], parsed)
        loss = -terms["elbo"] * B - self.hint_weight * sum(lp.sum() for lp in hints.values())
        return loss, terms, hints, B

    def loss(self, vae, batch: Mapping) -> torch.Tensor:
        """``-L_γ`` summed over the batch, averaged over the particles (differentiable)."""
        return sum(self._one_draw(vae, batch)[0] for _ in range(self.num_particles)) / self.num_particles

    def terms(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        """:func:`elbo_terms` of one draw (the ELBO without the hint term), ``"hint_loglik/<modality>"`` (each a
        mean over the batch) and ``"loss"`` = ``-L_γ`` per example, of the same draw."""
        loss, terms, hints, B = self._one_draw(vae, batch)
        terms.update({f"hint_loglik/{name}": lp.sum() / B for name, lp in hints.items()})
        terms["loss"] = loss / B
        return terms

    def is_bound(self, vae) -> bool:
        return self.hint_weight == 0.0 and super().is_bound(vae)

    def __repr__(self):
        return f"HintELBO(hint_weight={self.hint_weight}, num_particles={self.num_particles})"
