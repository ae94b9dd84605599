r"""The multimodal VAE with diffusion decoders as a Pyro model/guide pair (paper eq. 3–5).

Generative model (``model``), per example :math:`b`:

.. math:: z_b \sim \mathcal N(0, I), \qquad x_b^m \sim p_\theta(x^m\mid z_b)\ \text{for each observed } m,

where a missing modality's site is masked (``poutine.mask``) with a placeholder observation —
never ``obs=None``, which would make Pyro *sample* the site (a full reverse SDE for a diffusion
decoder) at every training step.

Guide (``guide``): encoders give experts :math:`q(z\mid x^m)`; for a subset :math:`A` of the observed
modalities, :math:`q(z\mid x_A)` is the fusion's product of :math:`A`'s experts
(:class:`~pyro_diffmvae.fusion.Fusion`: the PoE, with the prior expert in the product of all
modalities only for ``mopoe``). The subset ELBO (eq. 3–5) is

.. math:: \mathcal L = \sum_{A\in S}\omega_A\Big\{\mathbb E_{q(z\mid x_A)}\Big[\sum_m \lambda_m\log p(x^m\mid z)\Big]
          - \beta\,\mathrm{KL}(q(z\mid x_A)\Vert p(z))\Big\},

with :math:`\omega_A` renormalised per example over the subsets of its observed modalities.

* ``subset_strategy="sample"`` (default): one subset :math:`A_b\sim\omega_b` per example, drawn with
  plain torch randomness inside the guide — an unbiased one-decoder-pass estimate of :math:`\mathcal L`.
* ``subset_strategy="enumerate"``: a ``pyro.plate("subsets", K, dim=-2)`` with
  ``poutine.scale(ω)`` and ``poutine.mask(ω > 0)`` — exact over subsets, K decoder passes.

Both train with stock ``TraceMeanField_ELBO(max_plate_nesting=2)`` (analytic Gaussian KL).
β and the likelihood weights :math:`\lambda_m` are ``poutine.scale`` factors, visible in the trace.

A batch is a mapping ``{name: tensor (B, *event_shape), "available": {name: bool (B,)}}``; a
modality absent from the mapping is missing for every example; ``"available"`` defaults to all
present; the key ``"meta"`` is ignored (labels and the like).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Callable, Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from .fusion import FUSIONS, SUBSET_STRATEGIES, Fusion, SubsetFamily, make_fusion, subset_family, subset_weights
from .modality import Modality
from .objectives.subset_elbo import elbo_terms  # re-exported: it lived here before objectives/ held it

__all__ = ["MultimodalVAE", "FUSIONS", "SUBSET_STRATEGIES", "Conditional", "elbo_terms"]

RESERVED_KEYS = ("available", "meta")

#: ``conditional(vae, batch, given) -> q(z | x_given)``: how a model generates from given modalities
Conditional = Callable[["MultimodalVAE", Mapping, Sequence[str]], dist.TorchDistribution]


class MultimodalVAE(PyroModule):
    r"""Multimodal VAE (Diff-MVAE when some decoders are diffusion decoders) as a Pyro program.

    :param modalities: the :class:`~pyro_diffmvae.modality.Modality` list (names unique).
    :param latent_dim: size D of z.
    :param fusion: a :class:`~pyro_diffmvae.fusion.Fusion`, or the name of one of
        :data:`~pyro_diffmvae.fusion.FUSIONS`: ``"mopoe"`` (all non-empty subsets, the prior expert
        in the full product only), ``"poe"`` (the observed set, with the prior expert) or ``"moe"``
        (singletons, no prior expert; generation given several modalities from their mixture).
    The next four override the fusion's settings (``None``: the fusion's):

    :param subset_strategy: ``"sample"`` or ``"enumerate"`` (see module docstring).
    :param subsets: the subset family: ``"all"``, ``"mvae"``, ``"singletons"``, ``"full"`` or a
        list of subsets of names. With ``"full"`` each example uses all of *its* observed modalities.
    :param subset_weights: ω over the family (default uniform), renormalised per example.
    :param prior_expert: where the prior expert N(0, I) goes: ``"none"``, ``"full"`` (the product
        of all modalities), ``"every"`` (every product); True / False mean ``"every"`` / ``"none"``.
    :param beta: KL weight β.
    :param name: the prefix of this module's parameters in Pyro's param store.

    ``conditional`` (attribute, default ``None``: the fusion's, :meth:`fusion_posterior`) is how
    :meth:`posterior` and :meth:`generate` condition on given modalities; the training objective
    sets it (:meth:`pyro_diffmvae.objectives.Objective.conditional`), so that an MMVAE generates
    from the mixture it was trained with.
    """

    def __init__(
        self,
        modalities: Sequence[Modality],
        latent_dim: int,
        fusion: str | Fusion = "mopoe",
        subset_strategy: str | None = None,
        subsets: SubsetFamily | None = None,
        subset_weights: Sequence[float] | None = None,
        prior_expert: str | bool | None = None,
        beta: float = 1.0,
        name: str = "mvae",
    ):
        super().__init__()
        names = [m.name for m in modalities]
        if not names:
            raise ValueError("MultimodalVAE needs at least one modality")
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {names}")
        clash = [n for n in names if n in RESERVED_KEYS]
        if clash:
            raise ValueError(f"modality names {clash} clash with reserved batch keys {list(RESERVED_KEYS)}")
        fusion = make_fusion(fusion, subset_strategy=subset_strategy, subsets=subsets,
                             subset_weights=subset_weights, prior_expert=prior_expert)
        if not beta > 0:
            raise ValueError(f"beta must be positive, got {beta}")
        if not (isinstance(latent_dim, int) and latent_dim > 0):
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        family = fusion.subsets
        self.modalities = nn.ModuleDict({m.name: m for m in modalities})
        self.names = names
        self.latent_dim = latent_dim
        self.fusion = fusion
        self.subset_strategy = fusion.subset_strategy
        self.per_example_full = isinstance(family, str) and family == "full"
        self.register_buffer("subsets", subset_family(names, family))
        if fusion.subset_weights is None:
            base = torch.ones(self.subsets.shape[0])
        else:
            base = torch.as_tensor(list(fusion.subset_weights), dtype=torch.get_default_dtype())
            if base.shape != (self.subsets.shape[0],) or (base < 0).any() or base.sum() <= 0:
                raise ValueError(
                    f"subset_weights must be {self.subsets.shape[0]} non-negative numbers with a positive "
                    f"sum (one per subset), got {list(map(float, base.flatten()))}"
                )
        self.register_buffer("base_subset_weights", base / base.sum())
        self.prior_expert = fusion.prior_expert
        self.beta = float(beta)
        self.pyro_name = name
        self.latent_prior = None  # an optional LatentScorePrior for unconditional generation
        self.conditional: Conditional | None = None  # None: the fusion's (set by the training objective)
        self.proper_prior = True  # p(z) is a distribution (False: the flat prior of deterministic autoencoders)
        # modalities whose likelihood site the program leaves out (their decoders are not run); empty but while
        # a diffusion warm-up (pyro_diffmvae.training.diffusion_warmup) trains the rest of the model first
        self.unscored: frozenset[str] = frozenset()

    # ------------------------------------------------------------------ batch
    def parse_batch(self, batch: Mapping) -> tuple[dict[str, torch.Tensor], torch.Tensor, int]:
        """Check a batch; return ``(data, available (B, M) bool, B)``.

        ``data`` holds the modalities present in the batch, with unavailable rows replaced by a
        zero placeholder (their sites are masked out, so the placeholder is never scored).
        """
        if not isinstance(batch, Mapping):
            raise TypeError(f"a batch must be a mapping of modality name -> tensor, got {type(batch).__name__}")
        unknown = [k for k in batch if k not in self.modalities and k not in RESERVED_KEYS]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in batch; known modalities: {self.names}")
        present = [n for n in self.names if n in batch]
        if not present:
            raise ValueError(f"the batch holds none of the modalities {self.names}")
        sizes = {n: batch[n].shape[0] if isinstance(batch[n], torch.Tensor) and batch[n].dim() else None for n in present}
        B = sizes[present[0]]
        if B is None or any(s != B for s in sizes.values()):
            raise ValueError(f"modalities disagree on the batch size: {sizes}")
        avail_in = batch.get("available", {}) or {}
        unknown = [k for k in avail_in if k not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in batch['available']; known: {self.names}")
        device = batch[present[0]].device
        available = torch.zeros(B, len(self.names), dtype=torch.bool, device=device)
        data = {}
        for j, name in enumerate(self.names):
            if name not in batch:
                if name in avail_in and torch.as_tensor(avail_in[name]).any():
                    raise ValueError(f"batch['available'][{name!r}] marks examples available but the batch has no {name!r}")
                continue
            x = batch[name]
            a = avail_in.get(name)
            a = torch.ones(B, dtype=torch.bool, device=device) if a is None else torch.as_tensor(a, device=device)
            if a.shape != (B,) or a.dtype != torch.bool:
                raise ValueError(
                    f"batch['available'][{name!r}] must be a bool tensor of shape ({B},), got "
                    f"{a.dtype} of shape {tuple(a.shape)}"
                )
            all_available = bool(a.all())
            self.modalities[name].check_data(x if all_available else x[a])
            if not all_available:
                x = torch.where(a.reshape((B,) + (1,) * (x.dim() - 1)), x, torch.zeros_like(x))
            available[:, j] = a
            data[name] = x
        empty = torch.nonzero(~available.any(-1)).flatten().tolist()
        if empty:
            raise ValueError(f"examples {empty[:10]} of the batch have no modality available")
        return data, available, B

    # ---------------------------------------------------------------- experts
    def experts(self, data: Mapping[str, torch.Tensor], available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Stack the unimodal experts: ``(mu, logvar)`` of shape ``(B, M, D)``; modalities absent
        from ``data`` get zeros (they are masked out by ``available``).

        The experts come out in at least float32 (:func:`_latent_dtype`): under autocast the
        encoders run in bf16/fp16, but their outputs are upcast here, so the fusion (sums of
        precisions :math:`e^{-\log\sigma_m^2}`), the reparameterised :math:`z = \mu + \sigma\varepsilon`
        and the KL are computed in float32; the decoders autocast :math:`z` themselves."""
        B, D = available.shape[0], self.latent_dim
        mus, logvars = [], []
        for name in self.names:
            if name in data:
                mu, logvar = self.modalities[name].encode(data[name])
                if mu.shape != (B, D) or logvar.shape != (B, D):
                    raise ValueError(
                        f"encoder of {name!r} returned shapes {tuple(mu.shape)}, {tuple(logvar.shape)}; "
                        f"expected ({B}, {D}) each"
                    )
            else:
                mu = logvar = available.new_zeros((B, D), dtype=_float_dtype(data))
            mus.append(mu.to(_latent_dtype(mu.dtype)))
            logvars.append(logvar.to(_latent_dtype(logvar.dtype)))
        return torch.stack(mus, -2), torch.stack(logvars, -2)

    def subset_weights(self, available: torch.Tensor | Mapping) -> torch.Tensor:
        """ω per example and subset, ``(B, K)``, renormalised over the valid subsets.

        ``available`` is the ``(B, M)`` availability tensor or a batch."""
        if isinstance(available, Mapping):
            available = self.parse_batch(available)[1]
        if self.per_example_full:
            return torch.ones(available.shape[0], 1, device=available.device)
        return subset_weights(self.subsets, available, self.base_subset_weights)

    def subset_masks(self, available: torch.Tensor) -> torch.Tensor:
        """The experts of each subset's product per example, ``(K, B, M)``. A subset an example lacks
        (ω = 0: masked out of the ELBO) gets the example's observed set, so that no product is empty."""
        if self.per_example_full:
            return available[None]
        masks = self.subsets[:, None, :] & available[None]
        lacking = (self.subsets[:, None, :] & ~available[None]).any(-1)  # (K, B)
        return torch.where(lacking[..., None], available[None], masks)

    @contextmanager
    def _subset_context(self, weights: torch.Tensor):
        """Plates, ω-scale and ω>0-mask of the subset strategy (the same in model and guide)."""
        B, K = weights.shape
        with ExitStack() as stack:
            if self.subset_strategy == "enumerate":
                omega = weights.T  # (K, B); poutine.scale rejects 0, so zeros are masked instead
                stack.enter_context(pyro.plate("subsets", K, dim=-2))
                stack.enter_context(pyro.plate("data", B, dim=-1))
                stack.enter_context(poutine.scale(scale=torch.where(omega > 0, omega, torch.ones_like(omega))))
                stack.enter_context(poutine.mask(mask=omega > 0))
            else:
                stack.enter_context(pyro.plate("data", B, dim=-1))
            yield

    # -------------------------------------------------------------- programs
    def model(self, batch: Mapping) -> None:
        r"""p(z) ∏_m p(x^m | z)^{λ_m}, missing modalities masked; β on the prior site.

        The parameters are registered with Pyro's param store by the guide (``pyro.module``), which
        SVI always runs; registering them here too would only cost time."""
        data, available, B = self.parse_batch(batch)
        with self._subset_context(self.subset_weights(available)):
            self.joint(data, available)

    def joint(self, data: Mapping[str, torch.Tensor], available: torch.Tensor, private_latents: bool = False) -> None:
        r"""The generative program inside the caller's plates: ``z ~ N(0, I)`` (β-scaled), then
        ``x_<name> ~ p(x^m | z)`` for each modality of ``data`` (masked where ``available`` ``(B, M)``
        is false, λ_m-scaled; left out for the names in ``self.unscored``). :meth:`model` runs it in the subset
        plates; the log-likelihood estimator (:func:`pyro_diffmvae.loglik.log_likelihood`) replays it under a
        particle plate.

        ``private_latents``: a modality whose decoder takes a private latent (MMVAE+'s
        :class:`~pyro_diffmvae.nets.mmvae_plus.PrivateLatentDecoder`, which has ``private_dim``) gets a
        site ``w_<name> ~ N(0, I)`` and is decoded from :math:`[z, w]`. Without it (training) such a
        decoder draws :math:`w\sim p(w)` itself, outside the program."""
        with poutine.scale(scale=self.beta):
            zero = available.new_zeros((), dtype=_latent_dtype(_float_dtype(data)))  # z in >= float32, as in the guide
            z = pyro.sample("z", dist.Normal(zero, 1.0).expand([self.latent_dim]).to_event(1))
        for j, name in enumerate(self.names):
            if name not in data or name in self.unscored:
                continue
            modality = self.modalities[name]
            with poutine.mask(mask=available[:, j]), poutine.scale(scale=modality.weight):
                u = z
                private_dim = getattr(modality.decoder, "private_dim", None) if private_latents else None
                if private_dim:
                    w = pyro.sample(f"w_{name}", dist.Normal(zero, 1.0).expand([private_dim]).to_event(1))
                    u = torch.cat([z, w], -1)
                pyro.sample(f"x_{name}", modality.decoder(u), obs=data[name])

    def guide(self, batch: Mapping) -> None:
        r"""q(z | x_A) = PoE_A (subset drawn per example, or all subsets enumerated); β on z."""
        pyro.module(self.pyro_name, self)
        data, available, B = self.parse_batch(batch)
        mu, logvar = self.experts(data, available)
        weights = self.subset_weights(available)
        masks = self.subset_masks(available)  # (K, B, M)
        if self.subset_strategy == "sample":
            k = torch.multinomial(weights, 1).squeeze(-1)  # plain torch randomness, not a Pyro site
            expert_mask = masks[k, torch.arange(B, device=k.device)]
            mu_z, logvar_z = self.fusion.product(mu, logvar, expert_mask)
        else:
            mu_z, logvar_z = self.fusion.product(mu.unsqueeze(0), logvar.unsqueeze(0), masks)
        # the drawn subsets (sample strategy) are recorded in the site's infer dict for inspection
        infer = {"subset_index": k} if self.subset_strategy == "sample" else {}
        with self._subset_context(weights), poutine.scale(scale=self.beta):
            pyro.sample("z", dist.Normal(mu_z, torch.exp(0.5 * logvar_z)).to_event(1), infer=infer)

    # ------------------------------------------------------------ inference
    def posterior(self, batch: Mapping, given: Sequence[str] | None = None) -> dist.TorchDistribution:
        """q(z | x_given), batch shape ``(B,)``: the conditional the model generates from — the training
        objective's (``self.conditional``) when one is set, else the fusion's (:meth:`fusion_posterior`).
        ``given`` defaults to every modality."""
        given = self.names if given is None else list(given)
        if self.conditional is not None:
            return self.conditional(self, batch, given)
        return self.fusion_posterior(batch, given)

    def given_mask(self, available: torch.Tensor, given: Sequence[str]) -> torch.Tensor:
        """``(B, M)``: which modalities are given and available (``available`` from :meth:`parse_batch`);
        an unknown name in ``given`` is an error."""
        unknown = [g for g in given if g not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in given; known: {self.names}")
        return available & torch.tensor([n in given for n in self.names], device=available.device)

    def given_experts(self, batch: Mapping, given: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The experts ``(mu, logvar)`` ``(B, M, D)`` of the batch and the mask ``(B, M)`` of the
        modalities that are given and available (:meth:`given_mask`). An example with none of them
        gets an all-false row: :meth:`generate` refuses it (:meth:`check_given_observed`), PoE
        conditionals without the prior expert refuse it, and a product with the prior expert is the prior."""
        data, available, B = self.parse_batch(batch)
        mask = self.given_mask(available, given)
        mu, logvar = self.experts({n: x for n, x in data.items() if n in given}, mask)
        return mu, logvar, mask

    def check_given_observed(self, batch: Mapping, given: Sequence[str]) -> None:
        """ValueError naming the examples of ``batch`` that have none of the ``given`` modalities
        (their conditional would silently be the unconditional prior)."""
        _, available, _ = self.parse_batch(batch)
        none = (~self.given_mask(available, given).any(-1)).nonzero().flatten().tolist()
        if none:
            raise ValueError(f"generate: examples {none[:10]}{' ...' if len(none) > 10 else ''} of the batch "
                             f"({len(none)} of {available.shape[0]}) have none of the given modalities {list(given)}: "
                             "there is nothing to condition them on (drop them, or use sample())")

    def fusion_posterior(self, batch: Mapping, given: Sequence[str]) -> dist.TorchDistribution:
        """The fusion's conditional (:meth:`~pyro_diffmvae.fusion.Fusion.given`): for ``mopoe`` and
        ``poe`` the product of the given observed experts (with the prior expert where the fusion
        places it), for ``moe`` their uniform mixture."""
        mu, logvar, mask = self.given_experts(batch, given)
        if self.prior_expert != "every" and not mask.any(-1).all():
            raise ValueError(f"some examples observe none of the given modalities {list(given)}")
        return self.fusion.given(mu, logvar, mask)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, targets: Sequence[str] | None = None, sampler: str | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Decode latents into the target modalities (feed-forward: the mean; diffusion: a sample)."""
        targets = self.names if targets is None else list(targets)
        unknown = [t for t in targets if t not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in targets; known: {self.names}")
        return {t: self.modalities[t].decoder.generate(z, sampler=sampler, steps=steps) for t in targets}

    @torch.no_grad()
    def reconstruct(self, batch: Mapping, sampler: str | None = None, steps: int | None = None) -> dict[str, torch.Tensor]:
        """Decode every modality from the posterior mean given all observed modalities."""
        z = self.posterior(batch).mean
        return self.decode(z, sampler=sampler, steps=steps)

    @torch.no_grad()
    def generate(
        self,
        batch: Mapping,
        given: Sequence[str],
        targets: Sequence[str] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        use_mean: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Any-to-any conditional generation: z ~ q(z | x_given) (its mean with ``use_mean``),
        then each target (default: the modalities not given) from its decoder."""
        if isinstance(given, str) or not given:
            raise ValueError(f"generate: given={given!r} must be a non-empty list of modality names (of {self.names}); "
                             "for unconditional samples use sample()")
        self.check_given_observed(batch, given)
        targets = [n for n in self.names if n not in given] if targets is None else list(targets)
        q = self.posterior(batch, given)
        z = q.mean if use_mean else q.sample()
        return self.decode(z, targets, sampler=sampler, steps=steps)

    @torch.no_grad()
    def sample(
        self, n: int, prior: str = "normal", targets: Sequence[str] | None = None, sampler: str | None = None, steps: int | None = None,
        prior_sampler: str | None = None, prior_steps: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Unconditional generation: z from N(0, I) (``prior="normal"``) or from the latent score
        prior (``prior="score"``, needs ``self.latent_prior``), then every target modality."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"sample: n must be a positive integer (the number of samples), got {n!r}")
        if prior_steps is not None and (isinstance(prior_steps, bool) or not isinstance(prior_steps, int) or prior_steps < 1):
            raise ValueError(f"sample: prior_steps must be a positive integer or None (the prior's default), got {prior_steps!r}")
        device = self.subsets.device
        if prior == "normal":
            z = torch.randn(n, self.latent_dim, device=device)
        elif prior == "score":
            if self.latent_prior is None:
                raise ValueError("prior='score' needs a fitted latent prior: set model.latent_prior (see LatentScorePrior)")
            z = self.latent_prior.sample(n, sampler=prior_sampler, steps=prior_steps)
        else:
            raise ValueError(f"unknown prior {prior!r}; known: 'normal', 'score'")
        return self.decode(z, targets, sampler=sampler, steps=steps)


def _latent_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype latents are computed in: ``dtype`` promoted to at least float32 (bf16/fp16 -> float32,
    float64 stays). bf16 keeps 8 significant bits (relative rounding 2^-9); a product of experts in
    bf16 would round each precision and their sum, and z = mu + sigma * eps would lose the small
    sigma * eps against a large mu."""
    return torch.promote_types(dtype, torch.float32)


def _float_dtype(data: Mapping[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the first floating-point modality (tokens are integers), else the default."""
    for x in data.values():
        if x.is_floating_point():
            return x.dtype
    return torch.get_default_dtype()

