r"""The variance-preserving SDE (VP-SDE) of Song et al. (2021) and its closed-form quantities.

Forward process on :math:`t \in [\epsilon, T]`:

.. math::

    dx = -\tfrac12 \beta(t)\, x\, dt + \sqrt{\beta(t)}\, dW, \qquad
    \beta(t) = \beta_{\min} + t(\beta_{\max} - \beta_{\min}).

With :math:`B(t) = \int_0^t \beta = \beta_{\min} t + \tfrac12(\beta_{\max}-\beta_{\min}) t^2`,
the perturbation kernel is :math:`x_t \mid x_0 \sim \mathcal N(\alpha_t x_0, \sigma_t^2 I)`,
:math:`\alpha_t = e^{-B/2}`, :math:`\sigma_t^2 = 1 - e^{-B} = -\mathrm{expm1}(-B)` and
:math:`g^2(t) = \beta(t)`. The prior is :math:`\pi = \mathcal N(0, I)`.

The score-matching bound of the diffusion decoder (paper eq. 2; Song et al. 2021, Thm. 1,
specialised to the VP-SDE on :math:`[\epsilon, T]`, see ``docs/design.md`` §1) is

.. math::

    -\log p_\theta(x) \le \underbrace{\tfrac d2\log 2\pi + \tfrac12(\alpha_T^2\|x\|^2 + d\sigma_T^2)}
    _{\texttt{prior\_nll}}
    + \tfrac12\int_\epsilon^T \frac{\beta}{\sigma_t^2}\,
      \mathbb E\|\hat\epsilon_\theta(\alpha_t x + \sigma_t\epsilon, t) - \epsilon\|^2 dt
    - \underbrace{\tfrac d2 \log(\sigma_T^2 / \sigma_\epsilon^2)}_{\texttt{bound\_constant}}.

The time density :math:`q(t) \propto \beta(t)/\sigma_t^2` makes the integrand's weight constant.
Its antiderivative is :math:`F(t) = \log(e^{B(t)} - 1)` (since :math:`F' = \beta e^B/(e^B-1) =
\beta/\sigma^2`), so :math:`Z = F(T) - F(\epsilon)` and the inverse CDF is closed form:
:math:`B = \mathrm{softplus}(F(\epsilon) + uZ)`, then :math:`t = 2B / (\beta_{\min} +
\sqrt{\beta_{\min}^2 + 2(\beta_{\max}-\beta_{\min})B})`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["VPSDE", "right_pad"]

_LOG_2PI = math.log(2.0 * math.pi)


def _as_time(t, like: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    dtype = like.dtype if like is not None else torch.get_default_dtype()
    device = like.device if like is not None else None
    return torch.as_tensor(t, dtype=dtype, device=device)


@dataclass(frozen=True)
class VPSDE:
    """Variance-preserving SDE with a linear β schedule.

    All methods take times as tensors (any shape) or Python floats and work elementwise, in the
    dtype and on the device of the input.

    Example::

        >>> sde = VPSDE()
        >>> t, q_t = sde.sample_time((4,), method="importance")
        >>> x_t = sde.alpha(t)[:, None] * x0 + sde.sigma(t)[:, None] * torch.randn_like(x0)
    """

    beta_min: float = 0.1
    beta_max: float = 20.0
    eps: float = 1e-5
    T: float = 1.0

    def __post_init__(self):
        for name in ("beta_min", "beta_max", "eps", "T"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"VPSDE {name} must be a finite real number, got {value!r} ({type(value).__name__})")
        if not (self.beta_min > 0.0 and self.beta_max >= self.beta_min):
            raise ValueError(
                f"VPSDE needs 0 < beta_min <= beta_max, got beta_min={self.beta_min}, "
                f"beta_max={self.beta_max}"
            )
        if not (0.0 < self.eps < self.T):
            raise ValueError(f"VPSDE needs 0 < eps < T, got eps={self.eps}, T={self.T}")

    # ----------------------------------------------------------------- schedule
    def beta(self, t):
        r""":math:`\beta(t) = \beta_{\min} + t(\beta_{\max}-\beta_{\min})`."""
        t = _as_time(t)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def g2(self, t):
        r"""Squared diffusion coefficient :math:`g^2(t) = \beta(t)`."""
        return self.beta(t)

    def integrated_beta(self, t):
        r""":math:`B(t) = \int_0^t \beta(s) ds = \beta_{\min} t + \tfrac12 (\beta_{\max}-\beta_{\min}) t^2`."""
        t = _as_time(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def log_alpha(self, t):
        r""":math:`\log\alpha_t = -B(t)/2`."""
        return -0.5 * self.integrated_beta(t)

    def alpha(self, t):
        r"""Signal scale :math:`\alpha_t = e^{-B(t)/2}`."""
        return torch.exp(self.log_alpha(t))

    def sigma2(self, t):
        r"""Noise variance :math:`\sigma_t^2 = 1 - e^{-B(t)}`, computed as ``-expm1(-B)``."""
        return -torch.expm1(-self.integrated_beta(t))

    def sigma(self, t):
        r""":math:`\sigma_t`."""
        return torch.sqrt(self.sigma2(t))

    def half_log_snr(self, t):
        r"""Half log signal-to-noise ratio :math:`\lambda_t = \log(\alpha_t/\sigma_t)
        = -\tfrac12 B(t) - \tfrac12\log(1 - e^{-B(t)})`, decreasing in :math:`t` (DPM-Solver's time variable)."""
        B = self.integrated_beta(_as_time(t))
        return -0.5 * B - 0.5 * torch.log(-torch.expm1(-B))

    def time_from_half_log_snr(self, lam):
        r"""Inverse of :meth:`half_log_snr`: :math:`e^{-2\lambda} = e^{B} - 1`, so
        :math:`B = \mathrm{softplus}(-2\lambda)`, then :math:`t = 2B/(\beta_{\min} +
        \sqrt{\beta_{\min}^2 + 2\Delta B})` (the root of :math:`B(t) = B` used by :meth:`importance_icdf`)."""
        B = F.softplus(-2.0 * _as_time(lam))
        delta = self.beta_max - self.beta_min
        return 2.0 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * delta * B))

    def drift(self, x: torch.Tensor, t) -> torch.Tensor:
        r"""Forward drift :math:`f(x, t) = -\tfrac12\beta(t) x`; ``t`` broadcasts over ``x``'s batch dim."""
        beta = self.beta(_as_time(t, x))
        return -0.5 * right_pad(beta, x) * x

    def diffusion(self, t):
        r"""Forward diffusion coefficient :math:`g(t) = \sqrt{\beta(t)}`."""
        return torch.sqrt(self.beta(t))

    # ------------------------------------------------------------- marginals
    def perturb(self, x0: torch.Tensor, t, noise: torch.Tensor | None = None) -> torch.Tensor:
        r"""Draw :math:`x_t = \alpha_t x_0 + \sigma_t \epsilon` from the perturbation kernel.

        ``t`` has the shape of ``x0``'s leading (batch) dims; ``noise`` defaults to fresh
        standard normal draws.
        """
        t = _as_time(t, x0)
        if noise is None:
            noise = torch.randn_like(x0)
        return right_pad(self.alpha(t), x0) * x0 + right_pad(self.sigma(t), x0) * noise

    def probability_flow_drift(self, x: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        r"""Drift of the probability-flow ODE of an ε-model, :math:`\tilde f = f - \tfrac12 g^2 s_\theta
        = -\tfrac12\beta(t)\,(x - \hat\epsilon/\sigma_t)` (forward time; ``eps`` = :math:`\hat\epsilon(x, t)`)."""
        t = _as_time(t, x)
        return -0.5 * right_pad(self.beta(t), x) * (x - eps / right_pad(self.sigma(t), x))

    def score_from_eps(self, eps: torch.Tensor, t) -> torch.Tensor:
        r"""Score of an ε-parameterised model: :math:`s = -\hat\epsilon / \sigma_t`."""
        return -eps / right_pad(self.sigma(_as_time(t, eps)), eps)

    # ------------------------------------------------------- bound constants
    def prior_nll(self, x0: torch.Tensor, event_dim: int) -> torch.Tensor:
        r"""Closed form of :math:`-\mathbb E_{x_T\mid x_0}[\log\pi(x_T)]` for :math:`\pi = \mathcal N(0, I)`.

        .. math:: \tfrac d2\log 2\pi + \tfrac12(\alpha_T^2 \|x_0\|^2 + d\,\sigma_T^2),

        summed over the last ``event_dim`` dims of ``x0`` (``d`` is their total size).
        """
        dims = tuple(range(x0.dim() - event_dim, x0.dim()))
        d = _event_size(x0, event_dim)
        sq_norm = x0.pow(2).sum(dims) if dims else x0.pow(2)
        alpha2_T = math.exp(-self._B(self.T))
        sigma2_T = -math.expm1(-self._B(self.T))
        return 0.5 * d * _LOG_2PI + 0.5 * (alpha2_T * sq_norm + d * sigma2_T)

    def prior_log_prob(self, x_T: torch.Tensor, event_dim: int) -> torch.Tensor:
        r""":math:`\log\pi(x_T)` for the prior :math:`\pi = \mathcal N(0, I)` at time T, summed over the last
        ``event_dim`` dims: :math:`-\tfrac d2\log 2\pi - \tfrac12\|x_T\|^2`."""
        dims = tuple(range(x_T.dim() - event_dim, x_T.dim()))
        sq_norm = x_T.pow(2).sum(dims) if dims else x_T.pow(2)
        return -0.5 * _event_size(x_T, event_dim) * _LOG_2PI - 0.5 * sq_norm

    def bound_constant(self, d: int) -> float:
        r"""The constant :math:`\tfrac d2 \log(\sigma_T^2/\sigma_\epsilon^2)` subtracted in the bound.

        It equals :math:`\tfrac12\int_\epsilon^T \frac{\beta}{\sigma^2}\, d\,\alpha_t^2\, dt`
        (since :math:`\frac{d}{dt}\log\sigma_t^2 = \beta\alpha_t^2/\sigma_t^2`), which is what
        the control variate of :class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood` uses.
        """
        return 0.5 * d * (math.log(-math.expm1(-self._B(self.T))) - math.log(-math.expm1(-self._B(self.eps))))

    # --------------------------------------------------------- time sampling
    def _B(self, t: float) -> float:
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t * t

    def _F(self, t: float) -> float:
        """Antiderivative of β/σ²: F(t) = log(expm1(B(t)))."""
        return math.log(math.expm1(self._B(t)))

    @property
    def importance_normaliser(self) -> float:
        r""":math:`Z = \int_\epsilon^T \beta/\sigma_t^2\, dt = F(T) - F(\epsilon)`, :math:`F = \log(e^{B}-1)`."""
        return self._F(self.T) - self._F(self.eps)

    def importance_density(self, t):
        r"""Density of :math:`q(t) = \beta(t)/(\sigma_t^2 Z)` on :math:`[\epsilon, T]`."""
        t = _as_time(t)
        return self.beta(t) / self.sigma2(t) / self.importance_normaliser

    def importance_icdf(self, u: torch.Tensor) -> torch.Tensor:
        r"""Inverse CDF of :math:`q(t)`: :math:`B = \mathrm{softplus}(F(\epsilon) + uZ)`, then solve
        :math:`B(t) = B` with the cancellation-free root :math:`t = 2B/(\beta_{\min} +
        \sqrt{\beta_{\min}^2 + 2\Delta B})`, :math:`\Delta = \beta_{\max}-\beta_{\min}`."""
        B = F.softplus(self._F(self.eps) + u * self.importance_normaliser)
        delta = self.beta_max - self.beta_min
        t = 2.0 * B / (self.beta_min + torch.sqrt(self.beta_min**2 + 2.0 * delta * B))
        return t.clamp(self.eps, self.T)

    def sample_time(
        self,
        shape,
        method: str = "uniform",
        device=None,
        dtype=None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""Draw diffusion times and return ``(t, density)`` for importance reweighting.

        ``method="uniform"``: :math:`t \sim U[\epsilon, T]`, density :math:`1/(T-\epsilon)`.
        ``method="importance"``: :math:`t \sim q(t) \propto \beta/\sigma^2` via its inverse CDF.
        """
        dtype = dtype or torch.get_default_dtype()
        u = torch.rand(shape, device=device, dtype=dtype, generator=generator)
        if method == "uniform":
            t = self.eps + (self.T - self.eps) * u
            return t, torch.full_like(t, 1.0 / (self.T - self.eps))
        if method == "importance":
            t = self.importance_icdf(u)
            return t, self.importance_density(t)
        raise ValueError(f"unknown time sampling method {method!r}; known: 'uniform', 'importance'")


def right_pad(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Append singleton dims to ``v`` (shape = x's leading dims) so it broadcasts over ``x``."""
    if v.dim() == 0:
        return v
    return v.reshape(v.shape + (1,) * (x.dim() - v.dim()))


def _event_size(x: torch.Tensor, event_dim: int) -> int:
    return math.prod(x.shape[x.dim() - event_dim :]) if event_dim else 1
