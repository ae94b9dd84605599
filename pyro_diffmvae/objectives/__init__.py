r"""Training objectives: the subset ELBO and the baselines' objectives, each one :class:`Objective`.

An objective is the one place that says what trains a model (:mod:`~pyro_diffmvae.objectives.base`
states the protocol): its ``loss`` (to minimise, summed over the batch), its named ``terms`` for
logging and validation, whether it ``is_bound`` on log p(x), and the ``conditional`` the trained
model generates from. The Lightning module, :func:`~pyro_diffmvae.training.fit_svi`, validation,
checkpoint selection and the non-finite diagnosis all take an objective; changing the ELBO is
editing (or subclassing) one file.

* ``elbo`` (:mod:`.subset_elbo`) — Pyro's ``TraceMeanField_ELBO`` on ``vae.model``/``vae.guide``:
  the Diff-MVAE / MoPoE subset ELBO (paper eq. 3–5; ``docs/design.md`` §2) with the vae's fusion;
* ``elbo_free_bits`` (:mod:`.free_bits`) — that ELBO with free bits: each latent dimension's batch-mean
  KL counts as at least λ nats (Kingma et al. 2016), a lever against posterior collapse;
* ``elbo_hint`` (:mod:`.hint_elbo`) — that ELBO plus γ times the log-likelihood of the feed-forward hint
  decoders that hinted diffusion decoders see (:mod:`pyro_diffmvae.nets.hint`; DiffuseVAE), so that z carries
  what a feed-forward decoder needs;
* ``mvae`` (:mod:`.mvae`) — Wu & Goodman 2018, the sub-sampled ELBO(X) + Σ_m ELBO(x_m) (+ k
  subsets); PoE with the prior expert;
* ``mmvae`` (:mod:`.mmvae`) — Shi et al. 2019, the stratified bound weighted with the mixture
  density; MoE of the unimodal experts;
* ``mvtcae`` (:mod:`.mvtcae`) — Hwang et al. 2021, the total-correlation objective with α, β; PoE
  without the prior expert;
* ``mmvae_plus`` (:mod:`.mmvae_plus`) — Palumbo et al. 2023, shared z (MoE) plus private w_m with
  auxiliary priors r(w_m); needs the networks of :mod:`pyro_diffmvae.nets.mmvae_plus`.

Usage (``pyro_diffmvae.builders.build_objective(cfg)`` does the same from ``cfg.model.objective``,
a name here or a mapping with a hydra ``_target_``)::

    objective = make_objective("mmvae", estimator="dreg", num_samples=10)
    loss = objective.loss(vae, batch) / batch_size   # −bound per example
    loss.backward()

Why the baselines are objects over the model's pieces and not model/guide pairs: MVAE's terms
reconstruct *different* modality sets (a model/guide pair would need a likelihood mask per term,
which ``MultimodalVAE.model`` does not have; its ``subsets="mvae"`` family is the ω-weighted variant
in which every term reconstructs every observed modality — not Wu & Goodman's objective); MMVAE
and MMVAE+ importance-weight with the *mixture* density :math:`\log\frac1M\sum_n q(z\mid x_n)` of
samples drawn per stratum, which no Pyro guide site expresses; MVTCAE adds KL terms between
posteriors (:math:`\mathrm{KL}(q(z\mid X)\Vert q(z\mid x_m))`) that are not part of any ELBO.

Missing modalities: every objective follows ``MultimodalVAE``: a modality absent from the batch is
missing for all examples and ``batch["available"]`` marks missing rows; each example's objective
is the baseline's objective over *its* observed set :math:`O_b` (how each baseline reduces is said
in its docstring).

Randomness: all reparameterised noise is drawn with
:func:`~pyro_diffmvae.objectives.gaussian.standard_normal`, so a test can record or replace it.

Equation numbers are not quoted for the baselines: the formulas are written out in each
docstring instead, next to the section of the paper and the function of the authors' released
code they follow.
"""

from __future__ import annotations

from .base import (CallableObjective, Objective, as_objective, mixture_of_experts_posterior,
                   product_of_experts_posterior, weights_are_unit, beta_elbo_is_bound)
from .gaussian import ESTIMATORS
from .free_bits import FreeBitsELBO, latent_kl_per_dim
from .hint_elbo import HintELBO, hint_log_likelihoods
from .mmvae import MMVAE
from .mmvae_plus import MMVAEPlus
from .mvae import MVAE
from .mvtcae import MVTCAE
from .subset_elbo import ELBO, elbo_terms
from ..nets.mmvae_plus import PrivateLatentDecoder, SharedPrivateEncoder  # re-exported: they lived here

__all__ = [
    "Objective",
    "CallableObjective",
    "as_objective",
    "OBJECTIVES",
    "ESTIMATORS",
    "make_objective",
    "register_objective",
    "bind_objective",
    "ELBO",
    "elbo_terms",
    "FreeBitsELBO",
    "latent_kl_per_dim",
    "HintELBO",
    "hint_log_likelihoods",
    "MVAE",
    "MMVAE",
    "MVTCAE",
    "MMVAEPlus",
    "product_of_experts_posterior",
    "mixture_of_experts_posterior",
    "weights_are_unit",
    "beta_elbo_is_bound",
    "SharedPrivateEncoder",
    "PrivateLatentDecoder",
]

#: objective name -> class; ``make_objective(name, **hyperparameters)`` builds one
OBJECTIVES: dict[str, type] = {
    "elbo": ELBO,
    "elbo_free_bits": FreeBitsELBO,
    "elbo_hint": HintELBO,
    "mvae": MVAE,
    "mmvae": MMVAE,
    "mvtcae": MVTCAE,
    "mmvae_plus": MMVAEPlus,
}


def register_objective(name: str, cls: type) -> type:
    """Add an objective class under ``name`` (for ``make_objective`` and ``model.objective=<name>``);
    an existing name is an error (nothing is silently replaced)."""
    if name in OBJECTIVES:
        raise ValueError(f"an objective named {name!r} is already registered ({OBJECTIVES[name].__name__})")
    if not (isinstance(cls, type) and issubclass(cls, Objective)):
        raise TypeError(f"register_objective: {cls!r} is not a subclass of pyro_diffmvae.objectives.Objective")
    OBJECTIVES[name] = cls
    return cls


def make_objective(name: str = "elbo", **hyperparameters) -> Objective:
    """The objective ``name`` with its hyperparameters."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**hyperparameters)
    except TypeError as err:
        raise TypeError(f"objective {name!r}: bad hyperparameters {sorted(hyperparameters)} ({err})") from None


def bind_objective(vae, objective=None, num_particles: int = 1) -> Objective:
    """The objective that trains ``vae`` — ``objective`` (an :class:`Objective`, or a callable
    ``(vae, batch) -> loss`` wrapped by :func:`as_objective`), default ``ELBO(num_particles)`` — with
    ``vae.conditional`` set to its conditional, so that the trained model generates as it does."""
    objective = ELBO(num_particles) if objective is None else as_objective(objective)
    vae.conditional = objective.conditional
    return objective
