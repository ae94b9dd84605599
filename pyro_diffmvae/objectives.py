r"""Training objectives of the model-family baselines, as callables ``objective(vae, batch) -> loss``.

Every objective here is the quantity to **minimise**, summed over the examples of the batch (divide
by the batch size for a per-example loss), computed from the shared pieces of a
:class:`~pyro_diffmvae.model.MultimodalVAE`: its batch parser (availability masks), its unimodal
experts ``vae.experts``, :func:`~pyro_diffmvae.fusion.poe`, and each modality's decoder likelihood
``decoder(z).log_prob(x)`` weighted by the modality's likelihood weight :math:`\lambda_m`
(``Modality.weight``). Nothing is copied from the model: the same networks train under every
objective, and ``vae.generate``/``vae.posterior`` serve all of them.

* ``elbo`` — Pyro's ``TraceMeanField_ELBO`` on ``vae.model``/``vae.guide``: the default, the
  Diff-MVAE / MoPoE subset ELBO of DESIGN §1 with the vae's own fusion;
* ``mvae`` — Wu & Goodman 2018, the sub-sampled ELBO(X) + Σ_m ELBO(x_m) (+ k subsets); PoE with
  the prior expert;
* ``mmvae`` — Shi et al. 2019, the stratified bound weighted with the mixture density; MoE of the
  unimodal experts;
* ``mvtcae`` — Hwang et al. 2021, the total-correlation objective with α, β; PoE without the prior
  expert;
* ``mmvae_plus`` — Palumbo et al. 2023, shared z (MoE) plus private w_m with auxiliary priors
  r(w_m); needs the networks :func:`~pyro_diffmvae.builders.build_model` makes for it.

Usage (``build_objective(cfg)`` does the same from ``cfg.model.objective`` and
``cfg.model.objective_params``)::

    objective = make_objective("mmvae", estimator="dreg", num_samples=10)
    loss = objective(vae, batch) / batch_size   # −bound per example
    loss.backward()

Why these are callables and not model/guide pairs (DESIGN §2): MVAE's terms reconstruct
*different* modality sets (a model/guide pair would need a likelihood mask per term, which
``MultimodalVAE.model`` does not have; its ``subsets="mvae"`` family is the ω-weighted variant in
which every term reconstructs every observed modality — not Wu & Goodman's objective); MMVAE and
MMVAE+ importance-weight with the *mixture* density :math:`\log\frac1M\sum_n q(z\mid x_n)` of samples
drawn per stratum, which no Pyro guide site expresses; MVTCAE adds KL terms between posteriors
(:math:`\mathrm{KL}(q(z\mid X)\Vert q(z\mid x_m))`) that are not part of any ELBO.

Missing modalities: every objective follows ``MultimodalVAE``: a modality absent from the batch is
missing for all examples and ``batch["available"]`` marks missing rows; each example's objective
is the baseline's objective over *its* observed set :math:`O_b` (how each baseline reduces is said
in its docstring).

Randomness: all reparameterised noise is drawn with :func:`_randn` (plain torch randomness, in the
order each docstring states), so a test can record or replace it.

Equation numbers are not quoted: the formulas are written out in each docstring instead, next to
the section of the paper and the function of the authors' released code they follow.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping

import torch
from torch import nn

from .fusion import poe, subset_family

__all__ = [
    "OBJECTIVES",
    "ESTIMATORS",
    "make_objective",
    "build_objective",
    "ELBO",
    "MVAE",
    "MMVAE",
    "MVTCAE",
    "MMVAEPlus",
    "SharedPrivateEncoder",
    "PrivateLatentDecoder",
]

ESTIMATORS = ("elbo", "iwae", "dreg")


def _randn(shape, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise of ``shape`` with ``like``'s dtype and device (the one source of
    reparameterisation noise in this module)."""
    return torch.randn(tuple(shape), dtype=like.dtype, device=like.device)


def _std_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dim."""
    return -0.5 * (z**2).sum(-1) - 0.5 * z.shape[-1] * math.log(2 * math.pi)


def _normal_log_prob(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag exp(logvar)), summed over the last dim (broadcasting)."""
    return (-0.5 * ((z - mu) ** 2 * torch.exp(-logvar) + logvar + math.log(2 * math.pi))).sum(-1)


def _kl_normal(mu_q, logvar_q, mu_p=None, logvar_p=None) -> torch.Tensor:
    r"""Closed-form :math:`\mathrm{KL}(\mathcal N(\mu_q,\sigma_q^2)\Vert\mathcal N(\mu_p,\sigma_p^2))`
    (diagonal), summed over the last dim; the standard normal when ``mu_p`` is ``None``."""
    if mu_p is None:
        return 0.5 * (torch.exp(logvar_q) + mu_q**2 - 1.0 - logvar_q).sum(-1)
    return 0.5 * ((torch.exp(logvar_q) + (mu_q - mu_p) ** 2) * torch.exp(-logvar_p) - 1.0 + logvar_p - logvar_q).sum(-1)


def _masked(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``value`` where ``mask`` holds, else 0 (``torch.where``, so masked entries pass no gradient)."""
    return torch.where(mask, value, torch.zeros_like(value))


def _log_lik(vae, name: str, z: torch.Tensor, x: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    r""":math:`\lambda_n \log p(x_n\mid z)` of modality ``name``: ``z`` is ``S + (B, D)``, ``x`` is
    ``(B, ...)``; rows where the modality is unavailable give 0. Returns ``S + (B,)``."""
    modality = vae.modalities[name]
    lp = modality.decoder(z).log_prob(x)
    return _masked(lp, available.expand_as(lp)) * modality.weight


def _beta(beta, vae) -> float:
    return float(vae.beta if beta is None else beta)


def _check_estimator(estimator: str, num_samples: int) -> None:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; known: {list(ESTIMATORS)}")
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")


def _stratum_bound(lw: torch.Tensor, estimator: str, latents: list[torch.Tensor]) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------- ELBO
class ELBO:
    r"""The default objective: minus the ELBO of the vae's own model/guide pair,
    ``TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, batch)``
    (the Diff-MVAE / MoPoE subset ELBO of DESIGN §1 with the vae's fusion and subset strategy).

    :param num_particles: ELBO particles.
    """

    name = "elbo"

    def __init__(self, num_particles: int = 1):
        from pyro.infer import TraceMeanField_ELBO

        self.num_particles = int(num_particles)
        self.elbo = TraceMeanField_ELBO(num_particles=self.num_particles, max_plate_nesting=2)

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        return self.elbo.differentiable_loss(vae.model, vae.guide, batch)

    def __repr__(self):
        return f"ELBO(num_particles={self.num_particles})"


# ---------------------------------------------------------------------------------------- MVAE
class MVAE:
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

    Noise (``_randn``): one ``(T, B, D)`` draw, T = 1 + M + k terms in the order joint,
    singletons (modality order), random subsets (in the order of :func:`subset_family` ``"all"``).
    """

    name = "mvae"

    def __init__(self, num_random_subsets: int = 0, beta: float | None = None, prior_expert: bool = True):
        if not (isinstance(num_random_subsets, int) and num_random_subsets >= 0):
            raise ValueError(f"num_random_subsets must be a non-negative int, got {num_random_subsets!r}")
        if beta is not None and not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.num_random_subsets = num_random_subsets
        self.beta = beta
        self.prior_expert = bool(prior_expert)

    def terms(self, vae, device=None) -> tuple[torch.Tensor, int]:
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

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # (B, M, D)
        subsets, n_fixed = self.terms(vae, available.device)  # (T, M)
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
        z = mu_t + torch.exp(0.5 * logvar_t) * _randn(mu_t.shape, mu_t)
        elbo = -_beta(self.beta, vae) * _kl_normal(mu_t, logvar_t)  # (T, B)
        for j, name in enumerate(vae.names):
            if name not in data:
                continue
            idx = torch.nonzero(subsets[:, j]).flatten()  # the terms that reconstruct this modality
            ll = _log_lik(vae, name, z[idx], data[name], masks[idx, :, j])
            elbo = elbo.index_add(0, idx, ll)
        return -_masked(elbo, valid).sum()

    def __repr__(self):
        return f"MVAE(num_random_subsets={self.num_random_subsets}, beta={self.beta}, prior_expert={self.prior_expert})"


# --------------------------------------------------------------------------------------- MMVAE
def _mixture_log_q(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    r""":math:`\log\frac{1}{|O_b|}\sum_{n\in O_b} q(z\mid x_n)` for ``z`` of shape ``S + (B, D)`` and
    experts ``(B, M, D)``; returns ``S + (B,)``."""
    log_q = _normal_log_prob(z.unsqueeze(-2), mu, logvar)  # S + (B, M)
    log_q = torch.where(available.expand_as(log_q), log_q, torch.full_like(log_q, -math.inf))
    return torch.logsumexp(log_q, -1) - torch.log(available.sum(-1).to(z.dtype))


class MMVAE:
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
        gradient (see :func:`_stratum_bound`; the paper's choice, K = 30 for MNIST-SVHN, 50 for CUB).
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

    Noise (``_randn``): one ``(M, K, B, D)`` draw (stratum m uses row m; rows of modalities absent
    from the batch are drawn but unused).
    """

    name = "mmvae"

    def __init__(self, estimator: str = "elbo", num_samples: int = 1, beta: float | None = None):
        _check_estimator(estimator, num_samples)
        self.estimator, self.num_samples, self.beta = estimator, num_samples, beta

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # (B, M, D)
        M, K, D = mu.shape[1], self.num_samples, mu.shape[2]
        mu_s, std_s = mu.transpose(0, 1)[:, None], torch.exp(0.5 * logvar).transpose(0, 1)[:, None]  # (M, 1, B, D)
        z = mu_s + std_s * _randn((M, K, B, D), mu)  # z[m] ~ q(z | x_m)
        dreg = self.estimator == "dreg"
        mu_q, logvar_q = (mu.detach(), logvar.detach()) if dreg else (mu, logvar)
        lw = _beta(self.beta, vae) * (_std_normal_log_prob(z) - _mixture_log_q(z, mu_q, logvar_q, available))
        for name in data:
            lw = lw + _log_lik(vae, name, z, data[name], available[:, vae.names.index(name)])
        per_stratum = _stratum_bound(lw, self.estimator, [z])  # (M, B)
        strata = available.T  # (M, B)
        bound = _masked(per_stratum, strata).sum(0) / available.sum(-1).to(per_stratum.dtype)
        return -bound.sum()

    def __repr__(self):
        return f"MMVAE(estimator={self.estimator!r}, num_samples={self.num_samples}, beta={self.beta})"


# -------------------------------------------------------------------------------------- MVTCAE
class MVTCAE:
    r"""MVTCAE (Hwang, Kim, Hong & Kim 2021, "Multi-View Representation Learning via Total
    Correlation Objective", NeurIPS; the final objective of §3):

    .. math:: \mathcal L(X) = \frac{M-\alpha}{M}\,\mathbb E_{q(z\mid X)}\Big[\sum_m\lambda_m\log p(x_m\mid z)\Big]
              - \beta\Big[(1-\alpha)\,\mathrm{KL}\big(q(z\mid X)\Vert p(z)\big)
              + \frac{\alpha}{M}\sum_m \mathrm{KL}\big(q(z\mid X)\Vert q(z\mid x_m)\big)\Big],

    with :math:`q(z\mid X)` the PoE of the M view experts **without** the prior expert (the
    authors' ``ivw_fusion``), one reparameterised draw, closed-form Gaussian KLs. The weights
    match the authors' code (``run_epochs.py``: ``rec_weight = (M − tc_ratio)/M``,
    ``cvib_weight = tc_ratio/M``, ``vib_weight = 1 − tc_ratio``; α is their ``tc_ratio``). The
    shorter form sometimes quoted, :math:`\sum_m\mathbb E\log p - \beta[(1-\alpha)\mathrm{KL}_p + \alpha\sum_m\mathrm{KL}_m]`,
    lacks the (M−α)/M reconstruction weight and the 1/M on the view KLs; the authors' form is the
    one implemented.

    Missing modalities: per example, X is its observed set :math:`O_b` and M is :math:`|O_b|`
    (with one view the objective is (1 − α) times a β-VAE ELBO of that view).

    :param alpha: α ∈ [0, 1] (authors' PolyMNIST run: 5/6).
    :param beta: β (default ``vae.beta``; authors' PolyMNIST run: 2.5).
    :param prior_expert: include N(0, I) in the PoE (default False, as the authors).

    Noise (``_randn``): one ``(B, D)`` draw.
    """

    name = "mvtcae"

    def __init__(self, alpha: float = 5.0 / 6.0, beta: float | None = None, prior_expert: bool = False):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        if beta is not None and not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.alpha, self.beta, self.prior_expert = float(alpha), beta, bool(prior_expert)

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        data, available, _ = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # (B, M, D)
        mu_j, logvar_j = poe(mu, logvar, available, self.prior_expert)  # (B, D)
        z = mu_j + torch.exp(0.5 * logvar_j) * _randn(mu_j.shape, mu_j)
        rec = sum(_log_lik(vae, n, z, data[n], available[:, vae.names.index(n)]) for n in data)
        kl_prior = _kl_normal(mu_j, logvar_j)
        kl_views = _masked(_kl_normal(mu_j.unsqueeze(1), logvar_j.unsqueeze(1), mu, logvar), available).sum(-1)
        m = available.sum(-1).to(mu.dtype)
        a = self.alpha
        objective = (m - a) / m * rec - _beta(self.beta, vae) * ((1 - a) * kl_prior + a / m * kl_views)
        return -objective.sum()

    def __repr__(self):
        return f"MVTCAE(alpha={self.alpha}, beta={self.beta}, prior_expert={self.prior_expert})"


# ------------------------------------------------------------------------------------- MMVAE+
class SharedPrivateEncoder(nn.Module):
    r"""MMVAE+ encoder of one modality: the shared expert :math:`q(z\mid x_m)` (``forward``, so the
    modality still works everywhere a :class:`~pyro_diffmvae.modality.Modality` encoder is expected)
    and the private posterior :math:`q(w_m\mid x_m)` (:meth:`private`).

    :param shared: ``x -> (mu_z, logvar_z)``, each ``(B, D)``.
    :param private: ``x -> (mu_w, logvar_w)``, each ``(B, D_w)`` (MMVAE+'s code also uses two
        separate trunks, one per latent).
    """

    def __init__(self, shared: nn.Module, private: nn.Module):
        super().__init__()
        self.shared, self.private_encoder = shared, private

    def forward(self, x):
        return self.shared(x)

    def private(self, x):
        """``(mu_w, logvar_w)`` in at least float32 (upcast from bf16/fp16 under autocast, like the
        shared experts in ``MultimodalVAE.experts``)."""
        out = self.private_encoder(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("the private encoder must return (mu_w, logvar_w)")
        return tuple(v.to(torch.promote_types(v.dtype, torch.float32)) for v in out)


class PrivateLatentDecoder(nn.Module):
    r"""MMVAE+ decoder of one modality: wraps a decoder over :math:`u = [z, w_m]` (size D + D_w) and
    holds the learnable scale of the auxiliary prior :math:`r_m(w_m) = \mathcal N(0, \mathrm{diag}\,s_m^2)`
    used for cross-modal reconstruction during training.

    Called with ``D + D_w`` latents it is the wrapped decoder. Called with ``D`` latents (as
    ``MultimodalVAE.model``, ``decode``, ``generate`` and ``sample`` do) it draws
    :math:`w_m\sim p(w)=\mathcal N(0, I)` and decodes :math:`[z, w_m]` — MMVAE+'s conditional and
    unconditional generation (the authors' ``self_and_cross_modal_generation_forward`` and
    ``generate_unconditional`` draw w from the prior p(w)).

    :param decoder: a :class:`~pyro_diffmvae.modality.FeedForwardDecoder` or ``DiffusionDecoder``
        whose network takes ``latent_dim + private_dim`` inputs (``build_model`` sizes it so).
    :param latent_dim: D (shared); ``private_dim``: D_w.
    :param aux_scale: initial scale of r(w) (learned).

    Other attributes (``event_shape``, ``check_data``, ``is_diffusion``, ``eps_net`` …) are the
    wrapped decoder's.
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, private_dim: int, aux_scale: float = 1.0):
        super().__init__()
        if not (private_dim > 0 and latent_dim > 0):
            raise ValueError(f"latent_dim and private_dim must be positive, got {latent_dim}, {private_dim}")
        if not aux_scale > 0:
            raise ValueError(f"aux_scale must be positive, got {aux_scale}")
        self.decoder = decoder
        self.latent_dim, self.private_dim = int(latent_dim), int(private_dim)
        self.aux_log_scale = nn.Parameter(torch.full((self.private_dim,), math.log(aux_scale)))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decoder"), name)

    def aux_scale(self) -> torch.Tensor:
        """The scale :math:`s_m` of the auxiliary prior r(w_m), shape ``(D_w,)``."""
        return self.aux_log_scale.exp()

    def _with_private(self, u: torch.Tensor) -> torch.Tensor:
        if u.shape[-1] == self.latent_dim + self.private_dim:
            return u
        if u.shape[-1] != self.latent_dim:
            raise ValueError(
                f"PrivateLatentDecoder expects latents of size {self.latent_dim} (z) or "
                f"{self.latent_dim + self.private_dim} ([z, w]), got {tuple(u.shape)}"
            )
        w = _randn(u.shape[:-1] + (self.private_dim,), u)  # w ~ p(w) = N(0, I)
        return torch.cat([u, w], -1)

    def forward(self, u: torch.Tensor):
        return self.decoder(self._with_private(u))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.decoder.generate(self._with_private(z), **kwargs)


class MMVAEPlus:
    r"""MMVAE+ (Palumbo, Daunhawer & Vogt 2023, "MMVAE+: Enhancing the Generative Quality of
    Multimodal VAEs without Compromises", ICLR; §3): every modality has a shared latent z (experts
    mixed as in MMVAE) and a private latent :math:`w_m` with posterior :math:`q(w_m\mid x_m)`, prior
    :math:`p(w_m)=\mathcal N(0,I)` and an auxiliary prior :math:`r_n(w_n)` with learned scale; the
    decoders take :math:`[z, w]`. Stratum m draws :math:`z_m^k\sim q(z\mid x_m)`,
    :math:`w_m^k\sim q(w_m\mid x_m)`, and for every other modality n a fresh
    :math:`\tilde w_n^k\sim r_n(w_n)` (reparameterised, so :math:`s_n` learns through the
    cross-modal likelihoods); the log-weight is

    .. math:: \log w_m^k = \lambda_m\log p(x_m\mid z_m^k, w_m^k) + \sum_{n\ne m}\lambda_n\log p(x_n\mid z_m^k,\tilde w_n^k)
              + \beta\big[\log p(z_m^k) + \log p(w_m^k) - \log q(z_m^k\mid X) - \log q(w_m^k\mid x_m)\big],

    with :math:`q(z\mid X)` the mixture density of :class:`MMVAE`, and the objective
    :math:`\frac1M\sum_m\log\frac1K\sum_k w_m^k` (``"iwae"``/``"dreg"``) or
    :math:`\frac1M\sum_m\frac1K\sum_k\log w_m^k` (``"elbo"``). This is the authors' ``_m_elbo`` /
    ``m_dreg`` (their ``--obj elbo`` is the IWAE form, equal to ours at K = 1); for DReG the
    hook weights both :math:`z_m^k` and :math:`w_m^k` and both posteriors' parameters are
    detached, as there (see :func:`_stratum_bound` and the caveat of :class:`MMVAE`).

    The vae must be built with :class:`SharedPrivateEncoder` encoders and
    :class:`PrivateLatentDecoder` decoders (``build_model`` does so when
    ``model.objective=mmvae_plus``: private encoders of size ``model.private_latent_dim`` and
    decoders over ``latent_dim + private_latent_dim`` inputs). Not reproduced: the authors'
    Laplace posteriors/priors of the PolyMNIST run (their CUB run is Gaussian, as here) and their
    softmax/softplus scale parameterisations (here ``exp`` of a learned log-scale, r initialised at 1).

    Missing modalities: strata, mixture and reconstructed targets run over each example's observed
    set :math:`O_b`.

    :param estimator: ``"elbo"``, ``"iwae"`` or ``"dreg"``; ``num_samples``: K;
        ``beta``: β (default ``vae.beta``; authors: 2.5 on PolyMNIST, 1.0 on CUB).

    Noise (``_randn``): one ``(M, K, B, D)`` draw for z; then for each modality m of the batch (in
    modality order) a ``(K, B, D_w)`` draw for :math:`w_m`, followed by one ``(K, B, D_w)`` draw for
    each other modality n of the batch (modality order) for :math:`\tilde w_n`.
    """

    name = "mmvae_plus"

    def __init__(self, estimator: str = "elbo", num_samples: int = 1, beta: float | None = None):
        _check_estimator(estimator, num_samples)
        self.estimator, self.num_samples, self.beta = estimator, num_samples, beta

    @staticmethod
    def check_vae(vae) -> None:
        bad = [n for n, m in vae.modalities.items()
               if not (isinstance(m.encoder, SharedPrivateEncoder) and isinstance(m.decoder, PrivateLatentDecoder))]
        if bad:
            raise ValueError(
                f"the mmvae_plus objective needs SharedPrivateEncoder encoders and PrivateLatentDecoder decoders "
                f"(private latents); modalities {bad} lack them — build the model with model.objective=mmvae_plus "
                "and model.private_latent_dim set"
            )

    def __call__(self, vae, batch: Mapping) -> torch.Tensor:
        self.check_vae(vae)
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # shared, (B, M, D)
        M, K, D = mu.shape[1], self.num_samples, mu.shape[2]
        beta = _beta(self.beta, vae)
        dreg = self.estimator == "dreg"
        z = mu.transpose(0, 1)[:, None] + torch.exp(0.5 * logvar).transpose(0, 1)[:, None] * _randn((M, K, B, D), mu)
        mu_q, logvar_q = (mu.detach(), logvar.detach()) if dreg else (mu, logvar)
        log_ratio_z = _std_normal_log_prob(z) - _mixture_log_q(z, mu_q, logvar_q, available)  # (M, K, B)
        present = [n for n in vae.names if n in data]
        lws, ws = [], []
        zero = torch.zeros(K, B, dtype=mu.dtype, device=mu.device)
        for j, name in enumerate(vae.names):
            if name not in data:
                lws.append(zero)
                continue
            mu_w, logvar_w = vae.modalities[name].encoder.private(data[name])  # (B, D_w)
            w = mu_w + torch.exp(0.5 * logvar_w) * _randn((K,) + tuple(mu_w.shape), mu_w)
            ws.append(w)
            mu_wq, logvar_wq = (mu_w.detach(), logvar_w.detach()) if dreg else (mu_w, logvar_w)
            lw = beta * (log_ratio_z[j] + _std_normal_log_prob(w) - _normal_log_prob(w, mu_wq, logvar_wq))
            for n in present:
                dec = vae.modalities[n].decoder
                if n == name:
                    w_n = w
                else:  # w~_n ~ r_n(w_n), reparameterised through the learned auxiliary scale
                    w_n = dec.aux_scale() * _randn((K, B, dec.private_dim), mu)
                u = torch.cat([z[j], w_n], -1)
                lw = lw + _log_lik(vae, n, u, data[n], available[:, vae.names.index(n)])
            lws.append(lw)
        lw = torch.stack(lws)  # (M, K, B)
        if dreg:  # hooks on z (all strata) and on each stratum's w
            per_stratum = _stratum_bound(lw, self.estimator, [z])
            if lw.requires_grad:
                w_tilde = torch.softmax(lw.detach(), 1)
                rows = [j for j, n in enumerate(vae.names) if n in data]
                for j, w in zip(rows, ws):
                    if w.requires_grad:
                        w.register_hook(lambda grad, wt=w_tilde[j]: grad * wt.unsqueeze(-1))
        else:
            per_stratum = _stratum_bound(lw, self.estimator, [])
        bound = _masked(per_stratum, available.T).sum(0) / available.sum(-1).to(per_stratum.dtype)
        return -bound.sum()

    def __repr__(self):
        return f"MMVAEPlus(estimator={self.estimator!r}, num_samples={self.num_samples}, beta={self.beta})"


# ------------------------------------------------------------------------------------ registry
#: objective name -> class; ``make_objective(name, **hyperparameters)`` builds one
OBJECTIVES: dict[str, type] = {
    "elbo": ELBO,
    "mvae": MVAE,
    "mmvae": MMVAE,
    "mvtcae": MVTCAE,
    "mmvae_plus": MMVAEPlus,
}


def make_objective(name: str = "elbo", **hyperparameters) -> Callable[..., torch.Tensor]:
    """The objective ``name`` with its hyperparameters: a callable ``(vae, batch) -> loss``, the
    quantity to minimise summed over the batch."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
    try:
        return OBJECTIVES[name](**hyperparameters)
    except TypeError as err:
        raise TypeError(f"objective {name!r}: bad hyperparameters {sorted(hyperparameters)} ({err})") from None


def build_objective(cfg) -> Callable[..., torch.Tensor]:
    """The objective of a hydra configuration: ``cfg.model.objective`` (default ``"elbo"``) with
    the hyperparameters ``cfg.model.objective_params`` (a mapping, default empty). For ``mvae`` and
    ``mvtcae`` a non-null ``cfg.model.prior_expert`` is passed on, so that training and
    ``vae.posterior`` use the same product. β is the model's (``cfg.model.beta`` → ``vae.beta``)
    unless ``objective_params`` sets ``beta``."""
    from omegaconf import OmegaConf

    model = cfg.model
    name = model.get("objective", "elbo") or "elbo"
    params = model.get("objective_params", None)
    params = {} if params is None else dict(OmegaConf.to_container(params, resolve=True))
    if name in ("mvae", "mvtcae") and model.get("prior_expert", None) is not None:
        params.setdefault("prior_expert", bool(model.prior_expert))
    return make_objective(name, **params)
