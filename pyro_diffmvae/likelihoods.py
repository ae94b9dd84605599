r"""Likelihoods of the generative model; chiefly the diffusion decoder's :class:`ScoreMatchingLikelihood`.

A diffusion decoder defines :math:`p_\theta(x\mid z)` implicitly through a conditional score network
:math:`s_\theta(x_t, z, t) = -\hat\epsilon_\theta(x_t, z, t)/\sigma_t`. Its exact log-density is
intractable; what Pyro needs from an observed site is a ``log_prob`` whose expectation is
differentiable in :math:`\theta` and :math:`z`. :class:`ScoreMatchingLikelihood` returns minus the
weighted denoising score-matching (DSM) loss (paper eq. 2), estimated by Monte Carlo over
:math:`(t, \epsilon)`:

.. math::

    \log p_\theta(x\mid z) \;\approx\; -\Big[C(x) + \tfrac12\,
      \mathbb E_{t\sim p(t),\,\epsilon}\Big(\frac{\lambda(t)}{\sigma_t^2\, p(t)}
      \|\hat\epsilon_\theta(\alpha_t x + \sigma_t\epsilon, z, t) - \epsilon\|^2\Big)\Big].

With :math:`\lambda = g^2` and :math:`C(x) = \tfrac d2\log2\pi + \tfrac12(\alpha_T^2\|x\|^2 +
d\sigma_T^2) - \tfrac d2\log(\sigma_T^2/\sigma_\epsilon^2)` its expectation is a *lower bound* on
:math:`\log p_\theta(x\mid z)` (Song et al. 2021, Thm. 1; ``docs/design.md`` §1), so the Pyro ELBO
built on it is a true ELBO. With any other weighting it is only a training objective; the
:attr:`ScoreMatchingLikelihood.objective` string says which one an instance computes.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from pyro.distributions import TorchDistribution, constraints

from . import samplers as _samplers
from .sde import VPSDE
from .weighting import Weighting, get_weighting, likelihood_weighting

__all__ = ["ScoreMatchingLikelihood"]

EpsNet = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor], torch.Tensor]


class ScoreMatchingLikelihood(TorchDistribution):
    r"""Diffusion-decoder likelihood :math:`p_\theta(x\mid z)` scored by weighted denoising score matching.

    :param eps_net: ε-predictor ``eps_net(x_t, z, t)`` with ``x_t`` of shape ``(n, *event_shape)``,
        ``z`` of shape ``(n, D)`` (or ``None``) and ``t`` of shape ``(n,)``.
    :param z: conditioning latents of shape ``batch_shape + (D,)``; ``None`` for an
        unconditional model (then ``batch_shape`` is given explicitly).
    :param sde: the :class:`~pyro_diffmvae.sde.VPSDE` (default ``VPSDE()``).
    :param weighting: ``"likelihood"`` (λ = g², a bound), ``"simple"`` (unweighted ε-MSE, the
        paper's Diff-MVAE*), ``"unit"``, or a callable ``λ(t, sde)``; see :mod:`~pyro_diffmvae.weighting`.
    :param event_shape: shape of one observation, e.g. ``(3, 32, 32)``.
    :param num_draws: Monte Carlo draws of :math:`(t, \epsilon)` per example and ``log_prob`` call.
    :param time_sampling: ``"uniform"``, ``"importance"`` (:math:`q(t)\propto\beta/\sigma^2`) or
        ``"auto"`` (importance for the likelihood weighting, where it makes the weight constant;
        uniform otherwise).
    :param include_constants: add the bound's constants :math:`C(x)`. Default (``None``): on for
        ``weighting="likelihood"``, off otherwise. ``True`` with another weighting is an error.
    :param control_variate: replace :math:`\|\hat\epsilon-\epsilon\|^2` by
        :math:`\|\hat\epsilon-\epsilon\|^2 - d\alpha_t^2` and drop the constant
        :math:`\tfrac d2\log(\sigma_T^2/\sigma_\epsilon^2)` (its exact integral). Same expectation
        and gradients, several-fold smaller spread of the reported value. Needs the bound.
    :param sampler: ``"ddim"``, ``"sde"`` or ``"ode"`` for :meth:`sample`.
    :param sampler_steps: steps for :meth:`sample` (``None``: the sampler's default).
    :param sampler_kwargs: extra keyword arguments for the sampler (e.g. ``x0_range`` for DDIM).
    :param batch_shape: batch shape when ``z`` is ``None``.

    Example::

        >>> with pyro.plate("data", x.shape[0]):
        ...     z = pyro.sample("z", dist.Normal(0, 1).expand([D]).to_event(1))
        ...     pyro.sample("x", ScoreMatchingLikelihood(unet, z, event_shape=(3, 32, 32)), obs=x)
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self,
        eps_net: EpsNet,
        z: torch.Tensor | None,
        sde: VPSDE | None = None,
        weighting: Weighting = "likelihood",
        event_shape=(),
        *,
        num_draws: int = 1,
        time_sampling: str = "auto",
        include_constants: bool | None = None,
        control_variate: bool = False,
        sampler: str = "ddim",
        sampler_steps: int | None = None,
        sampler_kwargs: dict | None = None,
        batch_shape=None,
        validate_args: bool | None = None,
    ):
        self.eps_net = eps_net
        self.sde = sde if sde is not None else VPSDE()
        self.weighting_name, self.weighting = get_weighting(weighting)
        self.is_likelihood_weighting = self.weighting is likelihood_weighting
        event_shape = torch.Size(event_shape)
        if any(s <= 0 for s in event_shape):
            raise ValueError(f"event_shape must have positive sizes, got {tuple(event_shape)}")
        if not isinstance(num_draws, int) or num_draws < 1:
            raise ValueError(f"num_draws must be a positive int, got {num_draws!r}")
        if time_sampling == "auto":
            time_sampling = "importance" if self.is_likelihood_weighting else "uniform"
        if time_sampling not in ("uniform", "importance"):
            raise ValueError(
                f"unknown time_sampling {time_sampling!r}; known: 'auto', 'uniform', 'importance'"
            )
        if include_constants is None:
            include_constants = self.is_likelihood_weighting
        if include_constants and not self.is_likelihood_weighting:
            raise ValueError(
                f"include_constants=True needs weighting='likelihood', got {self.weighting_name!r}: "
                "the constants turn minus the DSM loss into a lower bound on log p(x|z) only when "
                "lambda(t) = g^2(t) (Song et al. 2021, Thm. 1); with another weighting the value is "
                "not a bound, and adding the constants would only make it look like one"
            )
        if control_variate and not include_constants:
            raise ValueError(
                "control_variate=True needs the bound (weighting='likelihood' with constants): the "
                "control variate d*alpha_t^2 integrates to the bound's constant d/2*log(sigma_T^2/sigma_eps^2) "
                "only under the likelihood weighting"
            )
        if sampler not in _samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known samplers: {sorted(_samplers.SAMPLERS)}")
        self.num_draws = num_draws
        self.time_sampling = time_sampling
        self.include_constants = bool(include_constants)
        self.control_variate = bool(control_variate)
        self.sampler = sampler
        self.sampler_steps = sampler_steps
        self.sampler_kwargs = dict(sampler_kwargs or {})

        if z is not None:
            if not isinstance(z, torch.Tensor) or z.dim() < 1:
                raise ValueError(
                    f"z must be a tensor of shape batch_shape + (D,), got "
                    f"{tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__}"
                )
            if batch_shape is not None and torch.Size(batch_shape) != z.shape[:-1]:
                raise ValueError(
                    f"batch_shape {tuple(batch_shape)} disagrees with z's batch shape {tuple(z.shape[:-1])}"
                )
            batch_shape = z.shape[:-1]
        self.z = z
        super().__init__(torch.Size(batch_shape or ()), event_shape, validate_args=validate_args)
        if self._validate_args and z is not None and not torch.isfinite(z).all():
            raise ValueError("ScoreMatchingLikelihood: z contains non-finite values (NaN or inf)")

    # ------------------------------------------------------------------ facts
    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    @property
    def is_bound(self) -> bool:
        """Whether ``log_prob`` estimates a lower bound on log p(x|z) (likelihood weighting + constants)."""
        return self.is_likelihood_weighting and self.include_constants

    @property
    def objective(self) -> str:
        """A sentence naming what ``log_prob`` computes."""
        if self.is_bound:
            return "lower bound on log p(x|z) (likelihood weighting g^2 with the bound's constants)"
        return (
            f"minus the weighted DSM loss with weighting {self.weighting_name!r} "
            f"({'with' if self.include_constants else 'without'} constants); not a bound on log p(x|z)"
        )

    @property
    def event_size(self) -> int:
        return math.prod(self.event_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        z = None if self.z is None else self.z.expand(batch_shape + self.z.shape[-1:])
        new = self._get_checked_instance(ScoreMatchingLikelihood, _instance)
        new.__dict__.update(self.__dict__)
        new.z = z
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    # -------------------------------------------------------------- checking
    def _check_value(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"ScoreMatchingLikelihood.log_prob expects a tensor, got {type(x).__name__}")
        n = len(self.event_shape)
        if x.dim() < n or x.shape[x.dim() - n :] != self.event_shape:
            raise ValueError(
                f"ScoreMatchingLikelihood: observation has shape {tuple(x.shape)}, but its trailing "
                f"dims must equal event_shape {tuple(self.event_shape)}"
            )
        if not x.is_floating_point():
            raise ValueError(f"ScoreMatchingLikelihood: observation must be floating point, got {x.dtype}")
        if not torch.isfinite(x).all():
            raise ValueError("ScoreMatchingLikelihood: observation contains non-finite values (NaN or inf)")
        try:
            torch.broadcast_shapes(x.shape[: x.dim() - n], self.batch_shape)
        except RuntimeError:
            raise ValueError(
                f"ScoreMatchingLikelihood: observation batch shape {tuple(x.shape[: x.dim() - n])} does "
                f"not broadcast with the distribution's batch shape {tuple(self.batch_shape)}"
            ) from None

    # -------------------------------------------------------------- log_prob
    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        r"""Minus the weighted DSM loss (plus the bound's constants when enabled), shape = broadcast batch shape.

        Per example, with :math:`K` = ``num_draws`` draws :math:`t_k\sim p(t)`,
        :math:`\epsilon_k\sim\mathcal N(0,I)`:

        .. math::

            -\Big[C(x) + \frac1K\sum_k \tfrac12\, \frac{\lambda(t_k)}{\sigma_{t_k}^2 p(t_k)}
            \big(\|\hat\epsilon_\theta(\alpha_{t_k}x + \sigma_{t_k}\epsilon_k, z, t_k)-\epsilon_k\|^2
            - c_k\big)\Big],

        :math:`c_k = d\alpha_{t_k}^2` with the control variate (then :math:`C` omits the
        :math:`\tfrac d2\log(\sigma_T^2/\sigma_\epsilon^2)` term), else 0.
        """
        if self._validate_args:
            self._check_value(x)
        n_event = len(self.event_shape)
        batch_shape = torch.broadcast_shapes(x.shape[: x.dim() - n_event], self.batch_shape)
        n = math.prod(batch_shape)
        k = self.num_draws
        x_flat = x.expand(batch_shape + self.event_shape).reshape((n,) + self.event_shape)
        x_rep = x_flat.unsqueeze(0).expand((k,) + x_flat.shape).reshape((k * n,) + self.event_shape)
        z_rep = None
        if self.z is not None:
            z_flat = self.z.expand(batch_shape + self.z.shape[-1:]).reshape(n, -1)
            z_rep = z_flat.unsqueeze(0).expand((k,) + z_flat.shape).reshape(k * n, -1)

        t, density = self.sde.sample_time((k * n,), self.time_sampling, device=x.device, dtype=x.dtype)
        noise = torch.randn_like(x_rep)
        x_t = self.sde.perturb(x_rep, t, noise)
        eps_hat = self.eps_net(x_t, z_rep, t)
        if eps_hat.shape != x_t.shape:
            raise ValueError(
                f"eps_net returned shape {tuple(eps_hat.shape)}, expected the input's shape {tuple(x_t.shape)}"
            )
        event_dims = tuple(range(1, 1 + n_event))
        # under autocast eps_hat may be bf16/fp16: the squared error and its sums are taken in float32
        # (float64 data stays float64)
        acc = torch.promote_types(noise.dtype, torch.float32)
        sq_err = (eps_hat.to(acc) - noise.to(acc)).pow(2)
        sq_err = sq_err.sum(event_dims) if event_dims else sq_err
        if self.control_variate:
            sq_err = sq_err - self.event_size * self.sde.alpha(t) ** 2
        lam = self.weighting(t, self.sde)
        if not isinstance(lam, torch.Tensor) or lam.shape != t.shape:
            got = tuple(lam.shape) if isinstance(lam, torch.Tensor) else type(lam).__name__
            raise ValueError(f"weighting {self.weighting_name!r} returned {got} for t of shape {tuple(t.shape)}: "
                             "a weighting(t, sde) must return a tensor of t's shape (one lambda(t) per time)")
        weight = lam / self.sde.sigma2(t) / density
        loss = (0.5 * weight * sq_err).reshape(k, n).mean(0)

        if self.include_constants:
            loss = loss + self.sde.prior_nll(x_flat, n_event)
            if not self.control_variate:
                loss = loss - self.sde.bound_constant(self.event_size)
        return -loss.reshape(batch_shape)

    # ---------------------------------------------------------------- sample
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """Draw x ~ p_θ(x|z) with the reverse-time sampler ``self.sampler`` (no gradients)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        n = math.prod(shape)
        z_flat = None
        if self.z is not None:
            z_flat = self.z.expand(shape + self.z.shape[-1:]).reshape(n, -1).detach()
        device = self.z.device if self.z is not None else None
        dtype = self.z.dtype if self.z is not None else torch.get_default_dtype()
        with torch.no_grad():
            x = _samplers.sample(
                self.eps_net,
                (n,) + tuple(self.event_shape),
                self.sde,
                method=self.sampler,
                steps=self.sampler_steps,
                z=z_flat,
                device=device,
                dtype=dtype,
                **self.sampler_kwargs,
            )
        return x.reshape(shape + self.event_shape)

    def rsample(self, sample_shape=torch.Size()):
        raise NotImplementedError(
            "ScoreMatchingLikelihood has no reparameterised sampler: a reverse-time diffusion sample "
            "is a long chain of network calls that is neither cheap nor needed to differentiate for "
            "training (the likelihood is scored, never sampled, during SVI). Use .sample() for draws."
        )

    def __repr__(self):
        return (
            f"ScoreMatchingLikelihood(batch_shape={tuple(self.batch_shape)}, event_shape="
            f"{tuple(self.event_shape)}, weighting={self.weighting_name!r}, time_sampling="
            f"{self.time_sampling!r}, num_draws={self.num_draws}, is_bound={self.is_bound})"
        )
