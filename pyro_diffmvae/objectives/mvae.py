r"""MVAE (Wu & Goodman 2018): the sub-sampled sum of subset ELBOs, each reconstructing its own subset."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..fusion import poe, subset_family
from . import gaussian
from .base import Objective, product_of_experts_posterior
from .gaussian import kl_normal, masked, resolve_beta, weighted_log_likelihood

__all__ = ["MVAE"]


class MVAE(Objective):
    r"""MVAE (Wu & Goodman 2018, "Multimodal Generative Models for Scalable Weakly-Supervised
    Learning", §3 "sub-sampled training paradigm"): PoE inference network with the prior expert,
    trained on a *sum* of ELBOs of subsets,

    .. math:: \mathcal L(X) = \mathrm{ELBO}(X) + \sum_{m}\mathrm{ELBO}(x_m) + \sum_{j=1}^{k}\mathrm{ELBO}(X_j),
    .. math:: \mathrm{ELBO}(A) = \mathbb E_{q(z\mid x_A)}\Big[\sum_{m\in A}\lambda_m\log p(x_m\mid z)\Big]
              - \beta\,\mathrm{KL}\big(q(z\mid x_A)\,\Vert\,p(z)\big),\qquad
              q(z\mid x_A)\propto p(z)\prod_{m\in A}q(z\mid x_m),

    i.e. each term reconstructs **only the modalities of its own subset** (the unimodal ELBO of
    :math:`x_m` scores :math:`x_m` alone), as in the paper and its code (``elbo_loss`` of the
    joint, image-only and text-only passes, summed). :math:`X_j` are ``num_random_subsets`` random
    subsets of size 2 … M−1 (drawn per call without replacement from all such subsets with plain
    torch randomness; none when M ≤ 2). One reparameterised draw per term.

    Missing modalities: each example uses its observed set :math:`O_b`: the joint term is
    :math:`\mathrm{ELBO}(O_b)` when :math:`|O_b|\ge 2` (with one observed modality it would repeat
    that modality's unimodal term, and the paper's unpaired examples get only the unimodal ELBO),
    unimodal terms for :math:`m\in O_b`, and a random subset counts when it lies inside
    :math:`O_b` and differs from it.

    :param num_random_subsets: k (default 0).
    :param beta: KL weight β (default: ``vae.beta``).
    :param prior_expert: multiply in the prior expert (MVAE always does; default True).

    ``terms``: ``loss`` and ``kl`` (summed over the terms, without β). Not a bound on log p(X):
    it sums bounds on log p(X) and on each log p(x_m). Generation conditions on the PoE of the
    given experts with the prior expert (:meth:`conditional`).

    Noise (:func:`~pyro_diffmvae.objectives.gaussian.standard_normal`): one ``(T, B, D)`` draw, T = 1 + M + k terms in the order joint,
    singletons (modality order), random subsets (in the order of :func:`subset_family` ``"all"``).
    """

    name = "mvae"
    conditional_kind = "product"

    def __init__(self, num_random_subsets: int = 0, beta: float | None = None, prior_expert: bool = True):
        if not (isinstance(num_random_subsets, int) and num_random_subsets >= 0):
            raise ValueError(f"num_random_subsets must be a non-negative int, got {num_random_subsets!r}")
        if beta is not None and not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.num_random_subsets = num_random_subsets
        self.beta = beta
        self.prior_expert = bool(prior_expert)

    def term_subsets(self, vae, device=None) -> tuple[torch.Tensor, int]:
        """The term subsets ``(T, M)``: joint, singletons, then the random subsets of this call;
        and the number of fixed (non-random) terms."""
        M = len(vae.names)
        fixed = subset_family(vae.names, "mvae") if M > 1 else torch.ones(1, 1, dtype=torch.bool)
        rows = [fixed]
        if self.num_random_subsets and M > 2:
            every = subset_family(vae.names, "all")
            size = every.sum(-1)
            candidates = every[(size >= 2) & (size <= M - 1)]
            k = min(self.num_random_subsets, candidates.shape[0])
            pick = torch.randperm(candidates.shape[0])[:k].sort().values
            rows.append(candidates[pick])
        out = torch.cat(rows, 0)
        return (out if device is None else out.to(device)), fixed.shape[0]

    def per_example(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # (B, M, D)
        subsets, n_fixed = self.term_subsets(vae, available.device)  # (T, M)
        T, M = subsets.shape
        is_joint = torch.zeros(T, dtype=torch.bool, device=available.device)
        if M > 1:
            is_joint[0] = True
        is_random = torch.arange(T, device=available.device) >= n_fixed
        masks = subsets[:, None, :] & available[None]  # (T, B, M): experts and reconstructed modalities
        inside = ~(subsets[:, None, :] & ~available[None]).any(-1)  # (T, B): subset ⊆ O_b
        n_obs = available.sum(-1)
        valid = torch.where(is_joint[:, None], (n_obs >= 2)[None].expand(T, B), inside)
        valid = valid & ~(is_random[:, None] & (masks == available[None]).all(-1))
        safe = torch.where(valid[..., None], masks, available[None].expand_as(masks))  # never an empty product
        mu_t, logvar_t = poe(mu.unsqueeze(0), logvar.unsqueeze(0), safe, self.prior_expert)  # (T, B, D)
        z = mu_t + torch.exp(0.5 * logvar_t) * gaussian.standard_normal(mu_t.shape, mu_t)
        kl = kl_normal(mu_t, logvar_t)  # (T, B)
        elbo = -resolve_beta(self.beta, vae) * kl
        for j, name in enumerate(vae.names):
            if name not in data:
                continue
            idx = torch.nonzero(subsets[:, j]).flatten()  # the terms that reconstruct this modality
            ll = weighted_log_likelihood(vae, name, z[idx], data[name], masks[idx, :, j])
            elbo = elbo.index_add(0, idx, ll)
        return {"loss": -masked(elbo, valid).sum(0), "kl": masked(kl, valid).sum(0)}

    def conditional(self, vae, batch: Mapping, given: Sequence[str]):
        """The PoE of the given experts (with the prior expert when ``prior_expert``), as in training."""
        return product_of_experts_posterior(vae, batch, given, self.prior_expert)

    def __repr__(self):
        return f"MVAE(num_random_subsets={self.num_random_subsets}, beta={self.beta}, prior_expert={self.prior_expert})"
