r"""The objective protocol: one object says what trains a model, what is logged, and how it generates.

Every training objective — the subset ELBO through Pyro's ELBOs (:class:`~pyro_diffmvae.objectives.ELBO`)
and each baseline — is an :class:`Objective`:

* :meth:`Objective.loss` — the quantity to **minimise**, summed over the examples of the batch
  (the Lightning module and :func:`~pyro_diffmvae.training.fit_svi` divide it by the batch size);
  ``objective(vae, batch)`` is the same;
* :meth:`Objective.terms` — its named parts for logging, each a mean over the batch, always with
  ``"loss"`` (per example; the value validation reports and checkpoint selection monitors) and,
  for the subset ELBO, ``"elbo"``, ``"kl"`` and ``"loglik/<modality>"``;
* :meth:`Objective.is_bound` — whether :math:`-\text{loss}` is (an unbiased estimate of) a lower
  bound on :math:`\log p(x)` for this model;
* :meth:`Objective.conditional` — the conditional :math:`q(z\mid x_A)` the trained model generates
  from given a subset :math:`A` (PoE for the PoE/MoPoE family, the mixture of the given experts
  for MMVAE and MMVAE+). Training sets it on the model (``vae.conditional``), so that
  ``vae.posterior`` / ``vae.generate`` — and so coherence, the latent probe and the figures —
  use the conditional of the objective that trained it.

A subclass implements :meth:`per_example` (a dict of ``(B,)`` tensors holding ``"loss"`` and any
parts); :meth:`loss` and :meth:`terms` follow from it. An objective needs nothing else from the
package: see ``docs/extending.md`` for a new one in a file of its own.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import math

import pyro.distributions as dist
import torch

from ..fusion import mixture_of_experts, poe

__all__ = ["Objective", "CallableObjective", "as_objective", "product_of_experts_posterior",
           "mixture_of_experts_posterior", "weights_are_unit", "beta_elbo_is_bound", "non_negative_hyperparameter"]


class Objective:
    """Base class of training objectives (module docstring). Subclasses set :attr:`name` and
    implement :meth:`per_example` (or override :meth:`loss` and :meth:`terms` together)."""

    name = "objective"
    #: what :meth:`conditional` is, for reports, when a subclass overrides it: ``"product"`` or
    #: ``"mixture"`` of the given experts (``None``: the model's fusion's)
    conditional_kind: str | None = None

    def per_example(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        """``{"loss": (B,), <part>: (B,), ...}``: the loss to minimise and its parts, per example."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_example(vae, batch)")

    def loss(self, vae, batch: Mapping) -> torch.Tensor:
        """The quantity to minimise, summed over the batch (differentiable)."""
        return self.per_example(vae, batch)["loss"].sum()

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        return self.loss(vae, batch)

    def terms(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        """The named parts, each averaged over the batch; ``"loss"`` is the loss per example."""
        return {key: value.mean() for key, value in self.per_example(vae, batch).items()}

    def is_bound(self, vae) -> bool:
        """Whether −loss / B estimates a lower bound on log p(x) for ``vae`` (default: no)."""
        return False

    def conditional(self, vae, batch: Mapping, given: Sequence[str]) -> dist.TorchDistribution:
        """q(z | x_given) for generation (default: the model's fusion, ``vae.fusion_posterior``)."""
        return vae.fusion_posterior(batch, given)


class CallableObjective(Objective):
    """A plain ``loss(vae, batch) -> Tensor`` (summed over the batch) as an :class:`Objective`: its
    only term is ``"loss"``, it claims no bound, and generation uses the model's fusion."""

    def __init__(self, loss, name: str | None = None):
        if not callable(loss):
            raise TypeError(f"an objective must be an Objective or a callable (vae, batch) -> loss, got {type(loss).__name__}")
        self.fn = loss
        self.name = name or getattr(loss, "__name__", "callable")

    def loss(self, vae, batch: Mapping) -> torch.Tensor:
        return self.fn(vae, batch)

    def terms(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        return {"loss": self.fn(vae, batch) / vae.parse_batch(batch)[2]}

    def __repr__(self):
        return f"CallableObjective({self.name})"


def as_objective(objective) -> Objective:
    """``objective`` itself when it is an :class:`Objective`, else a :class:`CallableObjective` of it."""
    return objective if isinstance(objective, Objective) else CallableObjective(objective)


def product_of_experts_posterior(vae, batch: Mapping, given: Sequence[str], prior_expert: bool) -> dist.TorchDistribution:
    """The PoE of the given observed experts (with the prior expert N(0, I) when ``prior_expert``),
    batch shape ``(B,)``: the conditional of MVAE and MVTCAE."""
    mu, logvar, mask = vae.given_experts(batch, given)
    if not prior_expert and not mask.any(-1).all():
        raise ValueError(f"some examples observe none of the given modalities {list(given)}")
    mu_z, logvar_z = poe(mu, logvar, mask, prior_expert)
    return dist.Normal(mu_z, torch.exp(0.5 * logvar_z)).to_event(1)


def mixture_of_experts_posterior(vae, batch: Mapping, given: Sequence[str]) -> dist.TorchDistribution:
    """The uniform mixture of the given observed experts, batch shape ``(B,)``: a draw picks one
    given modality's expert uniformly, as MMVAE's and MMVAE+'s code condition on several modalities."""
    mu, logvar, mask = vae.given_experts(batch, given)
    return mixture_of_experts(mu, logvar, mask)


def weights_are_unit(vae, beta: float) -> bool:
    """β = 1, every likelihood weight λ_m = 1 and every decoder's ``log_prob`` a log-likelihood or a
    lower bound on it (a diffusion decoder's ``is_bound``): the conditions under which an
    importance-weighted or variational objective bounds log p(x)."""
    return beta == 1.0 and all(
        m.weight == 1.0 and bool(getattr(m.decoder, "is_bound", True)) for m in vae.modalities.values())


def beta_elbo_is_bound(vae, beta: float) -> bool:
    r"""Whether a β-weighted ELBO, :math:`E_q[\log p(x\mid z)] - \beta\,\mathrm{KL}(q\Vert p)`, bounds log p(x):
    for β ≥ 1 it lies below the ELBO (the KL is non-negative), so it is a (looser) bound when the likelihoods
    are unweighted and every decoder's ``log_prob`` bounds its log-likelihood (:func:`weights_are_unit`
    with β = 1); β < 1 can exceed log p(x). Importance-weighted estimators put β inside the log-mean-exp,
    where β > 1 is no bound: they use :func:`weights_are_unit`."""
    return beta >= 1.0 and weights_are_unit(vae, 1.0)


def non_negative_hyperparameter(value, what: str) -> float:
    """``value`` as a float when it is a finite real number ≥ 0 (not a bool, not a string), else a ValueError
    ``"<what> must be a finite number >= 0, got <value>"``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)
