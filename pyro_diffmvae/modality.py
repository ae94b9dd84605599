r"""Modalities: an encoder (expert) and a decoder (likelihood) per data type.

A :class:`Modality` pairs

* an **encoder** ``x -> (mu, logvar)``, the expert :math:`q(z\mid x^m) = \mathcal N(\mu, \mathrm{diag}\, e^{\mathrm{logvar}})`;
* a **decoder** ``z -> Distribution`` with batch shape ``z.shape[:-1]`` and the modality's event shape:
  either a :class:`FeedForwardDecoder` (Bernoulli for masks and attributes, Normal/Laplace for
  simple images, Categorical over tokens) or a :class:`DiffusionDecoder`, whose likelihood is a
  :class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood` over a z-conditioned ε-network.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro.distributions as dist
import torch
from torch import nn

from .nets.hint import HintedEps, check_hint_start, find_hint, find_hinted, memoised_hints, noised_hint
from .nets.parameterization import EpsFromPrediction
from .likelihoods import ScoreMatchingLikelihood
from . import samplers as _samplers
from .guidance import GuidedEps, check_cond_dropout, check_guidance, drop_conditioning
from .sampling_precision import SAMPLE_PRECISIONS, AutocastEps, check_sample_precision, warn_if_bf16_is_emulated
from .sde import VPSDE
from .weighting import Weighting

__all__ = ["Modality", "FeedForwardDecoder", "DiffusionDecoder", "FEED_FORWARD_LIKELIHOODS"]

FEED_FORWARD_LIKELIHOODS = ("bernoulli", "normal", "laplace", "categorical")


class FeedForwardDecoder(nn.Module):
    r"""A feed-forward likelihood :math:`p(x\mid z) = \mathcal D(\mathrm{net}(z))`.

    :param net: maps ``(n, D)`` latents to ``(n, *event_shape)`` parameters (logits for Bernoulli,
        locations for Normal/Laplace) or ``(n, *event_shape, num_classes)`` logits for Categorical.
    :param event_shape: shape of one observation (for Categorical: the token positions, e.g. ``(L,)``).
    :param likelihood: ``"bernoulli"``, ``"normal"``, ``"laplace"`` or ``"categorical"``.
    :param scale: the Normal/Laplace scale (initial value when learned).
    :param learn_scale: learn one log-scale shared by all dims.
    :param num_classes: vocabulary size, for Categorical.
    """

    is_diffusion = False

    def __init__(
        self,
        net: nn.Module,
        event_shape: Sequence[int],
        likelihood: str = "bernoulli",
        scale: float = 1.0,
        learn_scale: bool = False,
        num_classes: int | None = None,
    ):
        super().__init__()
        if likelihood not in FEED_FORWARD_LIKELIHOODS:
            raise ValueError(f"unknown likelihood {likelihood!r}; known: {list(FEED_FORWARD_LIKELIHOODS)}")
        if likelihood == "categorical" and not num_classes:
            raise ValueError("a categorical likelihood needs num_classes (the vocabulary size)")
        if likelihood in ("normal", "laplace") and not scale > 0:
            raise ValueError(f"the {likelihood} scale must be positive, got {scale}")
        self.net = net
        self.event_shape = torch.Size(event_shape)
        self.likelihood = likelihood
        self.num_classes = num_classes
        log_scale = torch.tensor(math.log(scale)) if likelihood in ("normal", "laplace") else torch.tensor(0.0)
        if learn_scale:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def _params(self, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[:-1]
        out = self.net(z.reshape(-1, z.shape[-1]))
        tail = self.event_shape + ((self.num_classes,) if self.likelihood == "categorical" else ())
        if out.shape[1:] != tail:
            raise ValueError(
                f"decoder net returned shape {tuple(out.shape)}, expected (n, {', '.join(map(str, tail))})"
            )
        return out.reshape(batch + tail)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        """The likelihood p(x | z), batch shape ``z.shape[:-1]``."""
        params = self._params(z)
        if params.dtype in (torch.float16, torch.bfloat16):  # autocast: the likelihood in float32
            params = params.float()
        n = len(self.event_shape)
        if self.likelihood == "bernoulli":
            return dist.Bernoulli(logits=params, validate_args=False).to_event(n)
        if self.likelihood == "categorical":
            return dist.Categorical(logits=params).to_event(n)
        cls = dist.Normal if self.likelihood == "normal" else dist.Laplace
        return cls(params, self.log_scale.exp().expand(params.shape)).to_event(n)

    def mean(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean at z, differentiable: probabilities (Bernoulli) or locations (Normal/Laplace).
        A Categorical has no mean: :meth:`generate` gives its most likely token."""
        if self.likelihood == "categorical":
            raise ValueError("a categorical likelihood has no mean; generate() gives the most likely token")
        params = self._params(z)
        return torch.sigmoid(params) if self.likelihood == "bernoulli" else params

    @torch.no_grad()
    def generate(self, z: torch.Tensor, mean: bool = True, **_) -> torch.Tensor:
        """Decode z: the likelihood's mean (probabilities, locations; the most likely token for
        Categorical) when ``mean=True``, else a sample."""
        if not mean:
            return self(z).sample()
        if self.likelihood == "categorical":
            return self._params(z).argmax(-1)
        return self.mean(z)

    def check_data(self, name: str, x: torch.Tensor) -> None:
        if self.likelihood == "categorical":
            if x.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
                raise ValueError(f"modality {name!r}: categorical data must be integer tokens, got {x.dtype}")
            if x.numel() and (x.min() < 0 or x.max() >= self.num_classes):
                raise ValueError(
                    f"modality {name!r}: tokens must lie in [0, {self.num_classes}), got range "
                    f"[{int(x.min())}, {int(x.max())}]"
                )
            return
        if not x.is_floating_point():
            raise ValueError(f"modality {name!r}: data must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError(f"modality {name!r}: data contains non-finite values (NaN or inf)")
        if self.likelihood == "bernoulli" and x.numel():
            low, high = torch.aminmax(x)
            if low < 0 or high > 1:
                raise ValueError(
                    f"modality {name!r}: Bernoulli data must lie in [0, 1], got range [{float(low):.3g}, {float(high):.3g}]"
                )


class DiffusionDecoder(nn.Module):
    r"""A diffusion decoder: :math:`p_\theta(x\mid z)` scored by :class:`ScoreMatchingLikelihood`.

    :param eps_net: ε-predictor ``eps_net(x_t, z, t)``, e.g. a
        :class:`~pyro_diffmvae.nets.unet.ConditionalUNet` with ``z_dim`` = latent size.
    :param event_shape: e.g. ``(3, 32, 32)``.
    :param weighting: passed to
        :class:`ScoreMatchingLikelihood` (``"likelihood"`` for Diff-MVAE, ``"simple"`` for Diff-MVAE*).
    :param num_draws: see ``weighting`` above.
    :param time_sampling: see ``weighting`` above.
    :param include_constants: see ``weighting`` above.
    :param control_variate: see ``weighting`` above.
    :param sampler: the default reverse-time sampler for generation
        (``"sde"`` with 1000 steps in the paper's Diff-MVAE, ``"ddim"`` with 50 in Diff-MVAE*).
    :param sampler_steps: see ``sampler`` above.
    :param prediction: what ``eps_net`` predicts: ``"eps"`` (default), ``"x0"`` or ``"v"``. Any
        other than ``"eps"`` is wrapped in :class:`~pyro_diffmvae.nets.parameterization.EpsFromPrediction`,
        so ``self.eps_net`` is always an ε-predictor and the objective (and bound) is unchanged.
    :param output_range: clamp generated samples to this ``(low, high)`` data range (e.g. images
        in [-1, 1]); with DDIM the denoised estimate is also clipped at every step. ``None``
        leaves samples as the sampler returns them.
    :param cond_dropout: probability p of replacing z by a learned null latent while training
        (:mod:`~pyro_diffmvae.guidance`); 0 (default) keeps the ELBO. Needs ``latent_dim``.
    :param guidance: the guidance weight w of generation, :math:`\hat\epsilon(x, \varnothing) +
        w(\hat\epsilon(x, z) - \hat\epsilon(x, \varnothing))`; 1 (default) is no guidance. Any other
        value needs a decoder trained with ``cond_dropout > 0``. Settable later (``decoder.guidance = w``).
    :param sample_precision: ``"fp32"`` (default) or ``"bf16"``: the network's calls in :meth:`generate` under
        bf16 autocast, the sampler in float32 (:mod:`~pyro_diffmvae.sampling_precision`; faster on CPUs with
        AVX512-BF16 and on GPUs). Settable later (``decoder.sample_precision = "bf16"``).
    :param latent_dim: the size of z, for the null latent (only with ``cond_dropout > 0``).
    :param hint: a feed-forward decoder of the modality whose mean :math:`\hat x_\phi(z)` the ε-network also
        sees, concatenated to :math:`x_t` (:class:`~pyro_diffmvae.nets.hint.HintedEps`; ``eps_net`` then takes
        twice the image's channels). ``None`` (default): no hint. The objective is unchanged by it.
    :param hint_residual: with a hint, ``eps_net`` denoises the residual :math:`x - \hat x_\phi(z)` (DiffuseVAE's
        second formulation; a reparametrisation of the ε-network of x, so the likelihood, bound and samplers are
        unchanged: :mod:`~pyro_diffmvae.nets.hint`). False (default): it denoises x.
    :param hint_start: with a hint, :meth:`generate` starts the sampler at time :math:`t_0` = ``hint_start`` from
        the forward-noised hint, :math:`x_{t_0} = \alpha_{t_0}\hat x_\phi(z) + \sigma_{t_0}\epsilon` (SDEdit with
        the hint as the guide; :func:`~pyro_diffmvae.nets.hint.check_hint_start`), instead of at T from N(0, I).
        Not a sample of the model; a dial from the hint (small t0) to the diffusion decoder (t0 = T). ``None``
        (default): off. Settable later (``decoder.hint_start = 0.5``).
    """

    is_diffusion = True

    def __init__(
        self,
        eps_net: nn.Module,
        event_shape: Sequence[int],
        sde: VPSDE | None = None,
        weighting: Weighting = "likelihood",
        num_draws: int = 1,
        time_sampling: str = "auto",
        include_constants: bool | None = None,
        control_variate: bool = False,
        sampler: str = "ddim",
        sampler_steps: int | None = None,
        output_range: tuple[float, float] | None = None,
        prediction: str = "eps",
        cond_dropout: float = 0.0,
        guidance: float = 1.0,
        latent_dim: int | None = None,
        sample_precision: str = "fp32",
        hint: nn.Module | None = None,
        hint_residual: bool = False,
        hint_start: float | None = None,
    ):
        super().__init__()
        self.cond_dropout = check_cond_dropout(cond_dropout)
        if self.cond_dropout > 0 and (isinstance(latent_dim, bool) or not isinstance(latent_dim, int) or latent_dim < 1):
            raise ValueError(f"cond_dropout > 0 learns a null latent and needs latent_dim (a positive int), got {latent_dim!r}")
        # the learned null latent (starts at the prior mean); absent without conditioning dropout
        self.null_z = nn.Parameter(torch.zeros(latent_dim)) if self.cond_dropout > 0 else None
        self.guidance = guidance
        self.sample_precision = sample_precision
        self.output_range = None if output_range is None else (float(output_range[0]), float(output_range[1]))
        self.event_shape = torch.Size(event_shape)
        self.sde = sde if sde is not None else VPSDE()
        self.prediction = prediction
        if hint_residual and hint is None:
            raise ValueError("hint_residual=True denoises x minus the hint's mean and needs a hint (hint=...)")
        if hint is not None:
            eps_net = HintedEps(eps_net, hint, residual=hint_residual, sde=self.sde, prediction=prediction)
        self.eps_net = eps_net if prediction == "eps" else EpsFromPrediction(eps_net, self.sde, prediction)
        self.likelihood_kwargs = dict(
            weighting=weighting,
            num_draws=num_draws,
            time_sampling=time_sampling,
            include_constants=include_constants,
            control_variate=control_variate,
            sampler=sampler,
            sampler_steps=sampler_steps,
        )
        self._likelihood(torch.zeros(1, 1))  # fail early on bad settings (no network call happens here)
        self.hint_start = hint_start

    @property
    def guidance(self) -> float:
        """The guidance weight w of :meth:`generate` (1: none)."""
        return self._guidance

    @guidance.setter
    def guidance(self, w: float) -> None:
        w = check_guidance(w)
        if w != 1.0 and self.null_z is None:
            raise ValueError(f"guidance {w} needs the unconditional network of a decoder trained with cond_dropout > 0 "
                             "(model.diffusion.cond_dropout); this one was not")
        self._guidance = w

    @property
    def sample_precision(self) -> str:
        """``"fp32"`` or ``"bf16"``: the precision of the network's calls in :meth:`generate`."""
        return self._sample_precision

    @sample_precision.setter
    def sample_precision(self, name: str) -> None:
        self._sample_precision = check_sample_precision(name)

    @property
    def hint(self) -> nn.Module | None:
        """The feed-forward hint decoder the ε-network sees (:mod:`~pyro_diffmvae.nets.hint`), or None."""
        return find_hint(self.eps_net)

    @property
    def hint_start(self) -> float | None:
        """The time t0 at which :meth:`generate` starts from the forward-noised hint, or None (from N(0, I) at T)."""
        return self._hint_start

    @hint_start.setter
    def hint_start(self, t0: float | None) -> None:
        if t0 is not None and self.hint is None:
            raise ValueError(f"hint_start={t0!r} starts sampling from the forward-noised hint of a hinted decoder "
                             "(model.unet.hint=true); this decoder has no hint")
        self._hint_start = check_hint_start(t0, self.sde)

    @property
    def is_bound(self) -> bool:
        """Whether the likelihood's ``log_prob`` is a lower bound on log p(x|z) (never with conditioning dropout,
        whose dropped examples' decoder term does not depend on z)."""
        return self._likelihood(torch.zeros(1, 1)).is_bound and self.cond_dropout == 0.0

    @property
    def objective(self) -> str:
        """What the likelihood's ``log_prob`` computes, in words."""
        text = self._likelihood(torch.zeros(1, 1)).objective
        return text if self.cond_dropout == 0.0 else f"{text}; with conditioning dropout p = {self.cond_dropout}: not a bound"

    def forward(self, z: torch.Tensor) -> ScoreMatchingLikelihood:
        """The likelihood p_θ(x | z), batch shape ``z.shape[:-1]``; while training with ``cond_dropout > 0``
        each example's z is replaced by the null latent with that probability."""
        if self.training and self.null_z is not None:
            z = drop_conditioning(z, self.null_z, self.cond_dropout)
        return self._likelihood(z)

    def _likelihood(self, z: torch.Tensor) -> ScoreMatchingLikelihood:
        return ScoreMatchingLikelihood(self.eps_net, z, self.sde, event_shape=self.event_shape, **self.likelihood_kwargs)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, sampler: str | None = None, steps: int | None = None, **_) -> torch.Tensor:
        """Draw x ~ p_θ(x | z) with the reverse-time sampler (default: the decoder's own)."""
        kwargs = dict(self.likelihood_kwargs)
        if sampler is not None:
            kwargs["sampler"] = sampler
        if steps is not None:
            kwargs["sampler_steps"] = steps
        if kwargs["sampler"] in _samplers.X0_CLIPPING_SAMPLERS and self.output_range is not None:
            kwargs["sampler_kwargs"] = {"x0_range": self.output_range}  # clip x0-hat at every DDIM / DPM-Solver++ step
        eps_net = self.eps_net if self.guidance == 1.0 else GuidedEps(self.eps_net, self.null_z, self.guidance)
        if SAMPLE_PRECISIONS[self.sample_precision] is not None:
            warn_if_bf16_is_emulated(z.device)
            eps_net = AutocastEps(eps_net, SAMPLE_PRECISIONS[self.sample_precision])
        with memoised_hints(self.eps_net):  # the hint of z once per call, not once per sampler step
            if self.hint_start is not None:
                kwargs["sampler_kwargs"] = {**kwargs.get("sampler_kwargs", {}), "t_start": self.hint_start,
                                            "x_T": noised_hint(find_hinted(self.eps_net).hint_mean, z, self.hint_start,
                                                               self.sde)}
            x = ScoreMatchingLikelihood(eps_net, z, self.sde, event_shape=self.event_shape, **kwargs).sample()
        return x if self.output_range is None else x.clamp(*self.output_range)

    def check_data(self, name: str, x: torch.Tensor) -> None:
        if not x.is_floating_point():
            raise ValueError(f"modality {name!r}: data must be floating point, got {x.dtype}")
        if x.numel() == 0:  # no example of the batch has this modality
            return
        # one pass and one device sync for both checks: a NaN makes min and max NaN, an inf one of them inf
        lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(f"modality {name!r}: data contains non-finite values (NaN or inf)")
        if self.output_range is not None:
            low, high = self.output_range
            margin = DATA_RANGE_MARGIN * (high - low)
            if lo < low - margin or hi > high + margin:
                raise ValueError(f"modality {name!r}: data lie in [{lo:.4g}, {hi:.4g}], outside the decoder's data range "
                                 f"[{low:g}, {high:g}] (allowed margin {margin:g}): scale the data (e.g. images to "
                                 "[-1, 1]) before training; the diffusion's noise schedule assumes that range")


#: how far (as a fraction of the range's width) diffusion-decoded data may lie outside the decoder's
#: ``output_range``: room for dequantisation noise and resampling overshoot, not for data in another scale
DATA_RANGE_MARGIN = 0.05


class Modality(nn.Module):
    r"""One modality: its name, expert encoder, decoder and likelihood weight.

    :param name: the key of this modality in a batch.
    :param encoder: ``x -> (mu, logvar)``, each ``(n, latent_dim)``.
    :param decoder: a :class:`FeedForwardDecoder` or :class:`DiffusionDecoder`.
    :param weight: likelihood weight (applied with ``poutine.scale`` at its observed site).
    """

    def __init__(self, name: str, encoder: nn.Module, decoder: nn.Module, weight: float = 1.0):
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"a modality needs a non-empty string name, got {name!r}")
        if not weight > 0:
            raise ValueError(f"modality {name!r}: likelihood weight must be positive, got {weight}")
        if not hasattr(decoder, "event_shape") or not hasattr(decoder, "check_data"):
            raise TypeError(f"modality {name!r}: decoder must be a FeedForwardDecoder or DiffusionDecoder")
        self.name = name
        self.encoder = encoder
        self.decoder = decoder
        self.weight = float(weight)

    @property
    def event_shape(self) -> torch.Size:
        return self.decoder.event_shape

    @property
    def is_diffusion(self) -> bool:
        return bool(getattr(self.decoder, "is_diffusion", False))

    def check_data(self, x: torch.Tensor) -> None:
        """Raise a ValueError naming this modality if ``x`` has the wrong shape, dtype or range."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"modality {self.name!r}: expected a tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.event_shape):
            raise ValueError(
                f"modality {self.name!r}: expected shape (batch, {', '.join(map(str, self.event_shape))}), "
                f"got {tuple(x.shape)}"
            )
        self.decoder.check_data(self.name, x)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.encoder(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"modality {self.name!r}: encoder must return (mu, logvar)")
        return out[0], out[1]
