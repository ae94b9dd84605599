r"""Fusion of unimodal Gaussian experts: PoE, MoE, subset families and their weights (paper eq. 3–5).

Each modality :math:`m` has an expert :math:`q(z\mid x^m) = \mathcal N(\mu_m, \mathrm{diag}\,\sigma_m^2)`.

* **PoE** of a subset :math:`A` (optionally with the prior :math:`\mathcal N(0, I)` as an extra
  expert) is Gaussian with precision the sum of precisions, computed in log-precision so that it
  is stable at extreme log-variances:

  .. math:: \log\sigma_A^2 = -\operatorname{logsumexp}_{m\in A}(-\log\sigma_m^2), \qquad
            \mu_A = \sum_{m\in A}\operatorname{softmax}_{m\in A}(-\log\sigma_m^2)\,\mu_m .

  A missing expert gets log-precision :math:`-\infty` (weight 0); its mean and log-variance
  are replaced by zeros *before* the arithmetic, so NaN placeholders cannot leak into outputs
  or gradients.

  The fusion is computed in at least float32: bf16/fp16 experts (the encoders' outputs under
  autocast) are upcast first: bf16 keeps 8 significant bits, so each bf16 operation of the
  log-sum-exp and the weighted mean would add a relative error of up to :math:`2^{-9}\approx 2\cdot10^{-3}`.
* **MoE** is the uniform mixture of the unimodal experts (MMVAE).
* **MoPoE** is the mixture over a subset family :math:`S` of :math:`\mathrm{PoE}_A`, with weights
  :math:`\omega_A`. The subset ELBO (eq. 3–5) is
  :math:`\sum_{A\in S}\omega_A\{\mathbb E_{q(z\mid x_A)}[\sum_m\log p(x^m\mid z)] - \mathrm{KL}(q(z\mid x_A)\Vert p(z))\}`.
  Per example only subsets of the *observed* modalities are valid; their weights are renormalised.

Subsets are boolean rows of a ``(K, M)`` tensor over the modalities in a fixed order.

**Fusions** (:class:`Fusion`) put these pieces together: a *product rule* (``combine``, default
:func:`poe`) that turns the experts of one subset into :math:`q(z\mid x_A)`, the subset family
:math:`S`, its weights :math:`\omega`, the subset strategy of the guide, **where the prior expert
goes**, and the *conditional* a model generates from. The prior expert placements:

* ``"none"``: in no product (MoE; MVTCAE's ``ivw_fusion``);
* ``"full"``: only in the product of *all* modalities, as in the MoPoE authors' code
  (``poe_fusion`` adds :math:`\mathcal N(0, I)` when the subset holds every modality) and in
  MultiVae; a single modality's subset is then that modality's expert. The default of ``mopoe``;
* ``"every"``: in every product (MVAE). With the prior in every product an expert can switch
  itself off — a log-variance of +∞ gives :math:`q(z\mid x_m) = p(z)` and a zero KL — which is
  why MoPoE does not do it.

:data:`FUSIONS` holds the named ones (``poe``, ``moe``, ``mopoe``); :func:`make_fusion` builds one
from a name, a :class:`Fusion` or a mapping of overrides.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence, Union

import pyro.distributions as dist
import torch

__all__ = [
    "poe",
    "moe_sample",
    "subset_family",
    "subset_weights",
    "SUBSET_FAMILIES",
    "SubsetFamily",
    "Fusion",
    "FUSIONS",
    "COMBINE_RULES",
    "PRIOR_EXPERT_PLACEMENTS",
    "SUBSET_STRATEGIES",
    "CONDITIONALS",
    "make_fusion",
    "prior_expert_flags",
    "mixture_of_experts",
]

SUBSET_FAMILIES = ("all", "mvae", "singletons", "full")
SubsetFamily = Union[str, Sequence[Sequence[str]]]
PRIOR_EXPERT_PLACEMENTS = ("none", "full", "every")
SUBSET_STRATEGIES = ("sample", "enumerate")
CONDITIONALS = ("product", "mixture")


def poe(
    mu: torch.Tensor,
    logvar: torch.Tensor,
    mask: torch.Tensor | None = None,
    prior_expert: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Product of Gaussian experts in log-precision form.

    :param mu: expert means, shape ``(..., M, D)``.
    :param logvar: expert log-variances, shape ``(..., M, D)``.
    :param mask: boolean ``(..., M)``: which experts take part (default: all).
    :param prior_expert: include :math:`\mathcal N(0, I)` as an extra expert: a bool, or a bool
        tensor broadcastable to ``mu.shape[:-2]`` (one flag per product: MoPoE multiplies it into
        the product of the full set only).
    :returns: ``(mu_A, logvar_A)`` of shape ``(..., D)``, in at least float32 (bf16/fp16 experts
        are upcast before the arithmetic; float64 stays float64).
    :raises ValueError: if some product has no expert at all (``prior_expert=False`` and an
        all-false mask row).
    """
    if mu.shape != logvar.shape:
        raise ValueError(f"poe: mu has shape {tuple(mu.shape)} but logvar has {tuple(logvar.shape)}")
    if mu.dim() < 2:
        raise ValueError(f"poe: experts must have shape (..., M, D), got {tuple(mu.shape)}")
    mu, logvar = _at_least_float32(mu), _at_least_float32(logvar)
    if mask is None:
        mask = torch.ones(mu.shape[:-1], dtype=torch.bool, device=mu.device)
    if mask.dtype != torch.bool:
        raise ValueError(f"poe: mask must be a bool tensor (which experts take part), got dtype {mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, mu.shape[:-1])
    except RuntimeError:
        raise ValueError(f"poe: mask of shape {tuple(mask.shape)} does not broadcast to the experts' (..., M) = "
                         f"{tuple(mu.shape[:-1])}") from None
    mask, mu, logvar = torch.broadcast_tensors(mask.unsqueeze(-1), mu, logvar)
    zeros = torch.zeros_like(mu)
    mu = torch.where(mask, mu, zeros)
    log_precision = torch.where(mask, -torch.where(mask, logvar, zeros), torch.full_like(mu, -float("inf")))
    with_prior = torch.as_tensor(prior_expert, dtype=torch.bool, device=mu.device)
    if with_prior.any():
        prior_shape = mu.shape[:-2] + (1, mu.shape[-1])
        # log-precision 0 (the expert N(0, I)) where the flag holds, -inf (absent) elsewhere
        prior_log_precision = torch.where(with_prior.reshape(with_prior.shape + (1, 1)),
                                          log_precision.new_zeros(()), log_precision.new_full((), -float("inf")))
        mu = torch.cat([mu, mu.new_zeros(prior_shape)], dim=-2)
        log_precision = torch.cat([log_precision, prior_log_precision.expand(prior_shape)], dim=-2)
    if not (mask.any(-2)[..., 0] | with_prior).all():
        raise ValueError("poe: a product has no expert (all masked out and no prior expert)")
    logvar_joint = -torch.logsumexp(log_precision, dim=-2)
    weights = torch.softmax(log_precision, dim=-2)
    mu_joint = (weights * mu).sum(-2)
    return mu_joint, logvar_joint


def moe_sample(
    mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor | None = None, generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Pick one available unimodal expert per example uniformly (a draw of the MoE's component).

    :param mu: ``(B, M, D)``; ``mask``: ``(B, M)`` availability.
    :param logvar: see ``mu`` above.
    :returns: ``(mu_k, logvar_k, k)`` with ``k`` the chosen expert index per example; ``mu_k`` and
        ``logvar_k`` in at least float32, as in :func:`poe`.
    """
    mu, logvar = _at_least_float32(mu), _at_least_float32(logvar)
    B, M = mu.shape[:2]
    mask = torch.ones(B, M, dtype=torch.bool, device=mu.device) if mask is None else mask.to(torch.bool)
    if not mask.any(-1).all():
        raise ValueError("moe_sample: an example has no available expert")
    k = torch.multinomial(mask.to(mu.dtype), 1, generator=generator).squeeze(-1)
    idx = k[:, None, None].expand(B, 1, mu.shape[-1])
    return mu.gather(1, idx).squeeze(1), logvar.gather(1, idx).squeeze(1), k


def _at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` upcast to float32 when it is bf16/fp16 (autocast outputs); float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def subset_family(names: Sequence[str], family: SubsetFamily = "all") -> torch.Tensor:
    """The subset family as a boolean ``(K, M)`` tensor over ``names`` (in that order).

    ``"all"``: every non-empty subset (MoPoE, 2^M − 1 of them, by size then lexicographically);
    ``"mvae"``: the full set and the singletons (MVAE's sub-sampled ELBO);
    ``"singletons"``: one subset per modality (MMVAE/MoE);
    ``"full"``: the full set alone (PoE); or a list of subsets given by modality names.
    """
    names = list(names)
    M = len(names)
    if M == 0:
        raise ValueError("subset_family: no modalities")
    if isinstance(family, str):
        if family == "all":
            rows = [c for r in range(1, M + 1) for c in itertools.combinations(range(M), r)]
        elif family == "mvae":
            rows = [tuple(range(M))] + [(m,) for m in range(M)] if M > 1 else [(0,)]
        elif family == "singletons":
            rows = [(m,) for m in range(M)]
        elif family == "full":
            rows = [tuple(range(M))]
        else:
            raise ValueError(f"unknown subset family {family!r}; known: {list(SUBSET_FAMILIES)} or a list of subsets")
    else:
        rows = []
        for subset in family:
            unknown = [n for n in subset if n not in names]
            if unknown:
                raise ValueError(f"subset {list(subset)} names unknown modalities {unknown}; known: {names}")
            if len(subset) == 0:
                raise ValueError("subset_family: empty subset in the family")
            rows.append(tuple(sorted(names.index(n) for n in subset)))
        if len(set(rows)) != len(rows):
            raise ValueError(f"subset_family: repeated subsets in {family}")
    out = torch.zeros(len(rows), M, dtype=torch.bool)
    for i, row in enumerate(rows):
        out[i, list(row)] = True
    return out


def subset_weights(
    subsets: torch.Tensor, available: torch.Tensor, base_weights: torch.Tensor | None = None
) -> torch.Tensor:
    r"""Per-example subset weights :math:`\omega_{bA}`, renormalised over the valid subsets.

    A subset is valid for example ``b`` when all its modalities are available there.

    :param subsets: ``(K, M)`` boolean family.
    :param available: ``(B, M)`` boolean availability.
    :param base_weights: ``(K,)`` non-negative weights (default uniform).
    :returns: ``(B, K)`` weights, rows summing to one, zero on invalid subsets.
    :raises ValueError: if an example has no valid subset (e.g. no modality at all).
    """
    subsets = subsets.to(available.device)
    valid = ~(subsets[None, :, :] & ~available[:, None, :].to(torch.bool)).any(-1)  # (B, K)
    if base_weights is None:
        base_weights = torch.ones(subsets.shape[0], device=available.device)
    w = valid.to(base_weights.dtype) * base_weights.to(available.device)
    total = w.sum(-1, keepdim=True)
    if (total <= 0).any():
        bad = torch.nonzero(total.squeeze(-1) <= 0).flatten().tolist()
        raise ValueError(
            f"examples {bad[:10]} have no valid subset in the family (no modality available, or none "
            "of the family's subsets is contained in the available ones)"
        )
    return w / total


# ------------------------------------------------------------------------------------- fusions
def prior_expert_flags(masks: torch.Tensor, placement: str) -> torch.Tensor | bool:
    """Whether each product includes the prior expert, for expert masks ``(..., M)``:
    ``"none"`` → False, ``"every"`` → True, ``"full"`` → the mask holds every modality."""
    if placement == "none":
        return False
    if placement == "every":
        return True
    if placement == "full":
        return masks.all(-1)
    raise ValueError(f"unknown prior expert placement {placement!r}; known: {list(PRIOR_EXPERT_PLACEMENTS)}")


def mixture_of_experts(mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor) -> dist.TorchDistribution:
    r"""The uniform mixture :math:`\frac{1}{|A_b|}\sum_{m\in A_b}\mathcal N(\mu_m, \sigma_m^2)` of the
    experts ``(B, M, D)`` where ``mask`` ``(B, M)`` holds, as a distribution of batch shape ``(B,)``
    and event shape ``(D,)``: a draw picks one masked expert uniformly, then draws from it (how
    MMVAE and MMVAE+ condition on several modalities). Its ``mean`` is the average of the means."""
    mu, logvar = _at_least_float32(mu), _at_least_float32(logvar)
    mask = mask.to(torch.bool)
    if not mask.any(-1).all():
        raise ValueError("mixture_of_experts: an example has no expert to mix (all masked out)")
    logits = torch.where(mask, torch.zeros_like(mu[..., 0]), torch.full_like(mu[..., 0], -float("inf")))
    components = dist.Normal(mu, torch.exp(0.5 * logvar)).to_event(1)  # batch (B, M), event (D,)
    return dist.MixtureSameFamily(dist.Categorical(logits=logits), components)


#: product rules by name: ``(mu (..., M, D), logvar, mask (..., M), prior_expert) -> (mu_A, logvar_A)``
COMBINE_RULES: dict[str, Callable] = {"poe": poe}


@dataclasses.dataclass(frozen=True)
class Fusion:
    r"""How the guide fuses unimodal experts, and how the model conditions on given modalities.

    For each subset :math:`A` of the family, :math:`q(z\mid x_A)` is ``combine`` applied to the
    experts of :math:`A` (with the prior expert where ``prior_expert`` places it); the subset ELBO
    (paper eq. 3–5) weights the subsets with :math:`\omega` renormalised per example over the
    subsets of its observed modalities.

    :param name: shown in reports.
    :param combine: the product rule of a subset, ``(mu (..., M, D), logvar, mask (..., M) bool,
        prior_expert: bool or bool tensor (...)) -> (mu_A, logvar_A)`` each ``(..., D)``; a name of
        :data:`COMBINE_RULES` or a callable (default :func:`poe`).
    :param subsets: the subset family (:func:`subset_family`); ``"full"`` means each example's own
        observed set.
    :param subset_weights: ω over the family (default uniform).
    :param subset_strategy: ``"sample"`` (one subset per example, drawn in the guide) or
        ``"enumerate"`` (every subset, ω-scaled).
    :param prior_expert: ``"none"``, ``"full"`` or ``"every"`` (module docstring).
    :param conditional: ``"product"`` — generation given :math:`A` draws from ``combine`` over
        :math:`A`'s experts (PoE, MoPoE); ``"mixture"`` — from the uniform mixture of :math:`A`'s
        experts (MoE, :func:`mixture_of_experts`).
    """

    name: str
    combine: Callable | str = "poe"
    subsets: SubsetFamily = "all"
    subset_weights: Sequence[float] | None = None
    subset_strategy: str = "sample"
    prior_expert: str = "full"
    conditional: str = "product"

    def __post_init__(self):
        if isinstance(self.combine, str):
            if self.combine not in COMBINE_RULES:
                raise ValueError(f"unknown fusion product rule {self.combine!r}; known: {sorted(COMBINE_RULES)} "
                                 "or a callable (mu, logvar, mask, prior_expert) -> (mu, logvar)")
            object.__setattr__(self, "combine", COMBINE_RULES[self.combine])
        if not callable(self.combine):
            raise TypeError(f"fusion {self.name!r}: combine must be callable, got {type(self.combine).__name__}")
        if self.prior_expert not in PRIOR_EXPERT_PLACEMENTS:
            raise ValueError(f"fusion {self.name!r}: unknown prior expert placement {self.prior_expert!r}; "
                             f"known: {list(PRIOR_EXPERT_PLACEMENTS)}")
        if self.subset_strategy not in SUBSET_STRATEGIES:
            raise ValueError(f"unknown subset_strategy {self.subset_strategy!r}; known: {list(SUBSET_STRATEGIES)}")
        if self.conditional not in CONDITIONALS:
            raise ValueError(f"fusion {self.name!r}: unknown conditional {self.conditional!r}; known: {list(CONDITIONALS)}")

    def product(self, mu: torch.Tensor, logvar: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`q(z\mid x_A)` for expert masks ``(..., M)`` (experts ``(..., M, D)``, broadcast):
        ``combine`` with the prior expert where the placement puts it."""
        return self.combine(mu, logvar, masks, prior_expert_flags(masks, self.prior_expert))

    def given(self, mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor) -> dist.TorchDistribution:
        r"""The conditional :math:`q(z\mid x_A)` a model generates from, for experts ``(B, M, D)`` and
        the given-and-available mask ``(B, M)``: batch shape ``(B,)``, event ``(D,)``."""
        if self.conditional == "mixture":
            return mixture_of_experts(mu, logvar, mask)
        mu_z, logvar_z = self.product(mu, logvar, mask)
        return dist.Normal(mu_z, torch.exp(0.5 * logvar_z)).to_event(1)

    def replace(self, **overrides) -> "Fusion":
        """A copy with the non-``None`` ``overrides`` (``prior_expert`` may be a bool: True → ``"every"``,
        False → ``"none"``)."""
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if isinstance(overrides.get("prior_expert"), bool):
            overrides["prior_expert"] = "every" if overrides["prior_expert"] else "none"
        return dataclasses.replace(self, **overrides)


#: the named fusions; MoPoE as published (prior expert in the full product only)
FUSIONS: dict[str, Fusion] = {
    "mopoe": Fusion("mopoe", subsets="all", prior_expert="full", conditional="product"),
    "poe": Fusion("poe", subsets="full", prior_expert="every", conditional="product"),
    "moe": Fusion("moe", subsets="singletons", prior_expert="none", conditional="mixture"),
}


def make_fusion(fusion: str | Fusion | Mapping = "mopoe", **overrides) -> Fusion:
    """A :class:`Fusion` from a name of :data:`FUSIONS`, a :class:`Fusion`, or a mapping with a
    ``name`` (of :data:`FUSIONS`, whose settings it starts from; another name starts from the
    :class:`Fusion` defaults) and any of its fields; then the non-``None`` ``overrides``."""
    if isinstance(fusion, Fusion):
        return fusion.replace(**overrides)
    if isinstance(fusion, str):
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; known: {sorted(FUSIONS)} (or a Fusion / a mapping of its fields)")
        return FUSIONS[fusion].replace(**overrides)
    if isinstance(fusion, Mapping):
        settings = dict(fusion)
        fields = {f.name for f in dataclasses.fields(Fusion)}
        unknown = sorted(set(settings) - fields)
        if unknown:
            raise ValueError(f"unknown fusion settings {unknown}; known: {sorted(fields)}")
        name = settings.get("name")
        if not isinstance(name, str):
            raise ValueError(f"a fusion needs a name, got {name!r}")
        base = FUSIONS.get(name, Fusion(name))
        return base.replace(**{k: v for k, v in settings.items() if k != "name"}).replace(**overrides)
    raise TypeError(f"a fusion is a name, a Fusion or a mapping, got {type(fusion).__name__}")
