r"""A diffusion decoder that sees z as an image: the ε-network conditioned on a feed-forward decoding of z
(issue 14, a lever; the DiffuseVAE construction of Pandey et al. 2022, *DiffuseVAE: efficient, controllable
and high-fidelity generation from low-dimensional latents*).

With ``model.unet.hint=true`` a diffusion modality gets a **hint**: a feed-forward decoder
:math:`p_\phi(x\mid z)` of the modality (the one a feed-forward model would use: Laplace with the conv
decoder on PolyMNIST), whose mean :math:`\hat x_\phi(z)` is concatenated to :math:`x_t` as extra input
channels of the ε-network (built with twice the image's channels in, the image's channels out):

.. math:: \hat\epsilon_\theta(x_t, z, t) = \mathrm{UNet}_\theta\big([\,x_t,\ \hat x_\phi(z)\,],\ z,\ t\big).

z then reaches the network at every pixel and at full resolution, spatially aligned with :math:`x_t` —
where the time embedding (``z_proj``) and the 4×4 map (``z_spatial_channels``) give it only a vector
and a coarse map. At high noise, where :math:`x_t` says almost nothing, the network can read what to
draw where from :math:`\hat x_\phi(z)`.

The decoder is still an ε-network :math:`\hat\epsilon(x_t, z, t)`: :math:`\hat x_\phi` is a deterministic
function of z, so the likelihood, its bound (with λ = g²) and the samplers are unchanged, and φ is trained
by the diffusion loss through the concatenation. :class:`~pyro_diffmvae.objectives.HintELBO`
(``model.objective=elbo_hint``) adds γ times the hint's own log-likelihood :math:`\log p_\phi(x\mid z)`, so
that :math:`\hat x_\phi(z)` is a reconstruction (DiffuseVAE's first stage, trained jointly here); with
γ > 0 that objective is not a bound.

**Residual** (``model.unet.hint_residual=true``; DiffuseVAE's second formulation). The network denoises
the residual :math:`r = x - \hat x_\phi(z)` instead of x: it is given
:math:`r_t = x_t - \alpha_t\hat x_\phi(z)` (the residual's forward process with x's noise, since
:math:`x_t = \alpha_t x + \sigma_t\epsilon`) and its prediction of the residual is mapped back to one of x,

.. math:: \hat\epsilon = \hat\epsilon_r, \qquad \hat x_0 = \hat x_\phi(z) + \hat r_0, \qquad
          \hat v = \hat v_r - \sigma_t\,\hat x_\phi(z)
          \quad (v = \alpha_t\epsilon - \sigma_t x_0 = v_r - \sigma_t\hat x_\phi).

This is a reparametrisation of the ε-network of x, not a new model: the score of x is the residual's,
:math:`\nabla\log p_t(x_t\mid z) = \nabla\log p^r_t(x_t - \alpha_t\hat x_\phi(z)\mid z)`, and the reverse
SDE of x with it is the residual's reverse SDE shifted by :math:`\alpha_t\hat x_\phi(z)` (the VP drift
:math:`f_t = \dot\alpha_t/\alpha_t` carries the shift exactly). So the ε-MSE, the bound with λ = g², the
bits/dim, the ODE log-likelihood and the samplers' x̂₀ clipping are all computed on x as before and stay
what they were; only the starting point of sampling differs from DiffuseVAE's, by
:math:`\alpha_T\hat x_\phi(z)` (α_T ≈ 0.007 on the default SDE). What changes is the network's default,
where it starts and where it has learnt nothing: a network that predicts :math:`\hat r_0 = 0` draws
:math:`\hat x_\phi(z)` itself, and one that predicts :math:`\hat v_r = 0` (the exact v of r ~ N(0, I)) draws
:math:`\hat x_\phi(z)` plus unit Gaussian noise: the feed-forward decoding of z, not the data's mean image.

**Starting from the hint** (``hint_start`` = :math:`t_0` of a :class:`~pyro_diffmvae.modality.DiffusionDecoder`,
``evaluation.hint_start``, ``sample.hint_start``; SDEdit of Meng et al. 2022 with the hint as the guide, as
DiffuseVAE does for its controllable generation). Generation starts at :math:`t_0` from

.. math:: x_{t_0} = \alpha_{t_0}\hat x_\phi(z) + \sigma_{t_0}\epsilon, \qquad \epsilon\sim\mathcal N(0, I),

instead of at T from N(0, I), and integrates the same reverse process from :math:`t_0` to ε. It draws from the
model only where the model's marginal at :math:`t_0` is this Gaussian, i.e. where the residual
:math:`x - \hat x_\phi(z)` is negligible beside :math:`\sigma_{t_0}/\alpha_{t_0}`; otherwise it is a dial between the
hint (:math:`t_0 \to 0` returns :math:`\hat x_\phi(z)`) and the diffusion decoder's own samples (:math:`t_0 = T`),
reported as such. For data :math:`x = \hat x_\phi(z) + s\,n`, :math:`n\sim\mathcal N(0, I)`, the exact probability
flow maps the start to :math:`\hat x_\phi(z) + s\,\sigma_{t_0}/\sqrt{\alpha_{t_0}^2 s^2 + \sigma_{t_0}^2}\;\epsilon`:
the residual's spread shrunk by that factor (``tests/test_hint.py``).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ..decoder_settings import diffusion_decoder_setting
from ..samplers import is_start_time
from ..sde import VPSDE
from .parameterization import PREDICTIONS

__all__ = ["HintedEps", "find_hint", "find_hinted", "memoised_hints", "check_hint_start", "noised_hint", "hint_start"]


class HintedEps(nn.Module):
    r"""``net([x_t, hint_mean(z)], z, t)``: an ε-network that also sees the feed-forward decoding of z; with
    ``residual=True``, ``net([x_t - α_t hint_mean(z), hint_mean(z)], z, t)`` predicts the residual's target,
    mapped back to x's (module docstring).

    :param net: the network, taking ``x_t``'s channels plus the hint's (a
        :class:`~pyro_diffmvae.nets.unet.ConditionalUNet` with ``in_channels = 2C``, ``out_channels = C``).
        It predicts ``prediction`` (of x, or with ``residual`` of the residual); the conversion to ε is
        :class:`~pyro_diffmvae.nets.parameterization.EpsFromPrediction`'s, outside this module.
    :param hint: a :class:`~pyro_diffmvae.modality.FeedForwardDecoder` of the modality (Normal or Laplace: its
        mean is an image of ``x_t``'s shape).
    :param residual: denoise the residual ``x - hint_mean(z)`` (needs ``sde`` and ``prediction``).
    :param sde: the :class:`~pyro_diffmvae.sde.VPSDE` whose α_t, σ_t shift the input and the prediction.
    :param prediction: what ``net`` predicts, ``"eps"``, ``"x0"`` or ``"v"``.
    """

    def __init__(self, net: nn.Module, hint: nn.Module, residual: bool = False, sde: VPSDE | None = None,
                 prediction: str = "eps"):
        super().__init__()
        likelihood = getattr(hint, "likelihood", None)
        if likelihood not in ("normal", "laplace"):
            raise ValueError(f"a hint must be a feed-forward decoder with a normal or laplace likelihood (its mean is an "
                             f"image), got {type(hint).__name__} with likelihood {likelihood!r}")
        if not isinstance(residual, bool):
            raise ValueError(f"residual must be True or False, got {residual!r}")
        if residual and sde is None:
            raise ValueError("a residual hint shifts x_t by alpha_t times the hint and needs the SDE (sde=...)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; known: {list(PREDICTIONS)}")
        self.net = net
        self.hint = hint
        self.residual = residual
        self.sde = sde
        self.prediction = prediction
        self._memo: list | None = None  # [z, hint] of the last call, inside memoised_hints only

    def hint_mean(self, z: torch.Tensor) -> torch.Tensor:
        """``hint.mean(z)``; inside :func:`memoised_hints` without gradients, the last result again for equal z."""
        if self._memo is None or torch.is_grad_enabled():
            return self.hint.mean(z)
        if self._memo and self._memo[0].shape == z.shape and torch.equal(self._memo[0], z):
            return self._memo[1]
        hint = self.hint.mean(z)
        self._memo[:] = [z.clone(), hint]
        return hint

    def forward(self, x_t: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        if z is None:
            raise ValueError("a hinted ε-network decodes z into its hint; got z=None")
        hint = self.hint_mean(z)
        if hint.shape != x_t.shape:
            raise ValueError(f"the hint decoder gives images of shape {tuple(hint.shape)}, x_t has shape {tuple(x_t.shape)}")
        hint = hint.to(x_t.dtype)
        if not self.residual:
            return self.net(torch.cat([x_t, hint], 1), z, t)
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        alpha = self.sde.alpha(t).reshape(shape).to(x_t.dtype)
        out = self.net(torch.cat([x_t - alpha * hint, hint], 1), z, t)  # the residual's r_t = x_t - α_t x̂_φ(z)
        if self.prediction == "x0":
            return out + hint  # x̂₀ = x̂_φ(z) + r̂₀
        if self.prediction == "v":
            return out - self.sde.sigma(t).reshape(shape).to(out.dtype) * hint  # v = v_r - σ_t x̂_φ(z)
        return out  # ε of x is ε of r

    def extra_repr(self) -> str:
        return f"residual={self.residual}" + (f", prediction={self.prediction!r}" if self.residual else "")


def find_hinted(eps_net: nn.Module) -> HintedEps | None:
    """The :class:`HintedEps` inside ``eps_net`` (through wrappers that hold their network as ``.net``), or None."""
    net = eps_net
    while isinstance(net, nn.Module):
        if isinstance(net, HintedEps):
            return net
        net = getattr(net, "net", None)
    return None


def find_hint(eps_net: nn.Module) -> nn.Module | None:
    """The hint decoder inside ``eps_net`` (through wrappers that hold their network as ``.net``), or None."""
    hinted = find_hinted(eps_net)
    return None if hinted is None else hinted.hint


def check_hint_start(t0, sde: VPSDE) -> float | None:
    """``None`` (generation starts at T from N(0, I)) or a start time t0 in (ε, T] of ``sde``."""
    if t0 is None:
        return None
    if not is_start_time(t0, sde):
        raise ValueError(f"hint_start must be None or a time in (eps, T] = ({sde.eps:g}, {sde.T:g}], got {t0!r}")
    return float(t0)


def noised_hint(hint_mean, z: torch.Tensor, t0: float, sde: VPSDE,
                generator: torch.Generator | None = None) -> torch.Tensor:
    r""":math:`x_{t_0} = \alpha_{t_0}\hat x_\phi(z) + \sigma_{t_0}\epsilon`, flattened to ``(n, *event)`` with n the
    number of z's (``z`` of shape ``(..., D)``): the start of generation from the hint (module docstring).
    ``hint_mean`` maps z to :math:`\hat x_\phi(z)`: a hint decoder's ``mean``, or :meth:`HintedEps.hint_mean`,
    which inside :func:`memoised_hints` hands the sampler's first step the same decoding again."""
    mean = hint_mean(z.reshape(-1, z.shape[-1]))
    t = torch.tensor(float(t0), dtype=torch.float64)
    alpha, sigma = float(sde.alpha(t)), float(sde.sigma(t))
    noise = torch.randn(mean.shape, device=mean.device, dtype=mean.dtype, generator=generator)
    return alpha * mean + sigma * noise


@contextmanager
def memoised_hints(module):
    """Within the block (and without gradients), each :class:`HintedEps` of ``module`` decodes a z into its hint
    once and reuses it while it is called with equal z: a sampler calls the ε-network at every step with the
    same z, and the hint decoder costs about a tenth of a PolyMNIST UNet call. The memo is dropped on exit, so
    weights changed between two blocks are always seen. ``module`` may be any ε-callable (a plain function
    has no hints)."""
    hinted = [m for m in module.modules() if isinstance(m, HintedEps)] if isinstance(module, nn.Module) else []
    for m in hinted:
        m._memo = []
    try:
        yield
    finally:
        for m in hinted:
            m._memo = None


def hint_start(vae, t0: float | None):
    """Generate with every diffusion decoder of ``vae`` started at ``t0`` from its noised hint for the block
    (``None``: each decoder's own setting); yields ``{modality: t0 in use}`` and restores each decoder's setting
    on exit. A decoder without a hint refuses a ``t0``, with the reason."""
    return diffusion_decoder_setting(vae, "hint_start", t0)
