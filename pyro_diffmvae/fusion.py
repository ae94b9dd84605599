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
"""

from __future__ import annotations

import itertools
from typing import Sequence, Union

import torch

__all__ = [
    "poe",
    "moe_sample",
    "subset_family",
    "subset_weights",
    "SUBSET_FAMILIES",
    "SubsetFamily",
]

SUBSET_FAMILIES = ("all", "mvae", "singletons", "full")
SubsetFamily = Union[str, Sequence[Sequence[str]]]


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
    :param prior_expert: include :math:`\mathcal N(0, I)` as an extra expert.
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
    mask = mask.to(torch.bool)
    mask, mu, logvar = torch.broadcast_tensors(mask.unsqueeze(-1), mu, logvar)
    zeros = torch.zeros_like(mu)
    mu = torch.where(mask, mu, zeros)
    log_precision = torch.where(mask, -torch.where(mask, logvar, zeros), torch.full_like(mu, -float("inf")))
    if prior_expert:
        prior_shape = mu.shape[:-2] + (1, mu.shape[-1])
        mu = torch.cat([mu, mu.new_zeros(prior_shape)], dim=-2)
        log_precision = torch.cat([log_precision, log_precision.new_zeros(prior_shape)], dim=-2)
    elif not mask.any(-2).all():
        raise ValueError("poe: a product has no expert (all masked out and prior_expert=False)")
    logvar_joint = -torch.logsumexp(log_precision, dim=-2)
    weights = torch.softmax(log_precision, dim=-2)
    mu_joint = (weights * mu).sum(-2)
    return mu_joint, logvar_joint


def moe_sample(
    mu: torch.Tensor, logvar: torch.Tensor, mask: torch.Tensor | None = None, generator=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Pick one available unimodal expert per example uniformly (a draw of the MoE's component).

    :param mu, logvar: ``(B, M, D)``; ``mask``: ``(B, M)`` availability.
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
