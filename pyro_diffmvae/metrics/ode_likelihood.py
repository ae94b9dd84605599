r"""The probability-flow ODE log-likelihood of a diffusion model (Song et al. 2021, §4.3 and App. D.2).

An ε-model :math:`\hat\epsilon_\theta(x, z, t)` under the VP-SDE defines the probability-flow ODE
(forward time, :meth:`~pyro_diffmvae.sde.VPSDE.probability_flow_drift`)

.. math:: \frac{dx}{dt} = \tilde f(x, t) = -\tfrac12\beta(t)\big(x - \hat\epsilon_\theta(x, z, t)/\sigma_t\big),

whose flow carries :math:`x_\epsilon = x` to :math:`x_T` and transports densities by the
instantaneous change of variables :math:`\frac{d}{dt}\log p_t(x_t) = -\nabla\cdot\tilde f(x_t, t)`.
Integrated from :math:`\epsilon` to :math:`T`,

.. math:: \log p_\theta(x\mid z) = \log\pi(x_T) + \int_\epsilon^T \nabla\cdot\tilde f(x_t, t)\,dt,
          \qquad \pi = \mathcal N(0, I),

the exact log-density, up to the solver's error, of the model that the ODE defines from
:math:`x_T\sim\pi` (the ``ode`` sampler of :mod:`~pyro_diffmvae.samplers` without its final
denoising step). What it is a density of:

* **of** :math:`x` **at time** :math:`\epsilon` (where the score-matching bound's integral starts too);
  for the exact score that is :math:`p_\epsilon`, the data density scaled by :math:`\alpha_\epsilon` and
  smoothed by :math:`\mathcal N(0, \sigma_\epsilon^2)`, and the flow ends at :math:`p_T`, which the
  formula replaces by :math:`\pi` (:math:`\alpha_T^2\approx 4\cdot10^{-5}` for the default schedule);
* **of the ODE model**, not of the reverse-SDE model whose likelihood the λ = g² score-matching bound
  bounds (:class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood`); the two models coincide when
  :math:`s_\theta` is the true score, and only then is the bound below this value.

**Divergence.** ``"exact"``: :math:`\nabla\cdot\tilde f = \sum_i e_i^\top J e_i` with :math:`J =
\partial\tilde f/\partial x`, d vector-Jacobian products (autograd) per evaluation — for small d.
``"hutchinson"`` (Hutchinson 1989; FFJORD, Grathwohl et al. 2019): :math:`\nabla\cdot\tilde f\approx
v^\top J v` with Rademacher probes :math:`v`, each fixed along the whole trajectory, so that the
integral of :math:`v^\top J v` is unbiased for the integral of the trace. The state :math:`x_t` does
not depend on the probes, so one solve carries P accumulators :math:`\Delta_p =
\int v_p^\top J v_p\,dt`; the estimate uses their mean, and its standard error
:math:`\mathrm{sd}_p(\Delta_p)/\sqrt P` covers the probes' noise (not the solver's error).
``"auto"``: exact up to :data:`EXACT_TRACE_MAX_DIM` dimensions, Hutchinson above.

**Solver.** :func:`scipy.integrate.solve_ivp` (adaptive, RK45 by default; ``rtol = atol = 1e-5`` as in
Song et al.): scipy is already a dependency and has error-controlled ODE solvers; the package's
``torchsde`` integrates SDEs on a fixed grid (the ``ode`` sampler is an SDE with zero noise) and has
no adaptive ODE solver, and ``torchdiffeq`` is not a dependency. The state travels between torch and
numpy (float64) at each evaluation.

**Dequantisation.** The value is a continuous density of :math:`x` on the model's scale. For 8-bit
data :math:`x = k/s - 1` the discrete likelihood obeys :math:`\log P(k)\ge\mathbb E_{u\sim U[0,1)^d}
\log p(x + u/s) - d\log s` (Jensen; :mod:`pyro_diffmvae.metrics.likelihood`): pass the dequantised
``x + torch.rand_like(x) / s`` and convert with :func:`~pyro_diffmvae.metrics.likelihood.bits_per_dim`,
which adds the :math:`d\log s` offset.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from scipy.integrate import solve_ivp

from ..sde import VPSDE

__all__ = ["ode_log_likelihood", "ODELogLikelihood", "resolve_divergence", "DIVERGENCES", "EXACT_TRACE_MAX_DIM"]

DIVERGENCES = ("auto", "exact", "hutchinson")
#: ``divergence="auto"`` computes the exact trace up to this many dimensions (d VJPs per evaluation)
EXACT_TRACE_MAX_DIM = 64


class ODELogLikelihood(NamedTuple):
    """Per example: ``value`` log p(x | z) in nats ``(N,)`` (float64), ``stderr`` of the Hutchinson
    probes ``(N,)`` (0 for the exact trace, NaN for one probe), ``draws`` the estimate of each probe
    ``(P, N)`` (``value[None]`` for the exact trace; ``value`` is their mean), and the solver's
    ``evaluations``."""

    value: torch.Tensor
    stderr: torch.Tensor
    draws: torch.Tensor
    evaluations: int


def resolve_divergence(divergence: str, dim: int) -> str:
    """``"exact"`` or ``"hutchinson"``: ``divergence`` itself, or for ``"auto"`` exact when ``dim`` ≤
    :data:`EXACT_TRACE_MAX_DIM`."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; known: {list(DIVERGENCES)}")
    if divergence == "auto":
        return "exact" if dim <= EXACT_TRACE_MAX_DIM else "hutchinson"
    return divergence


def ode_log_likelihood(
    model,
    x: torch.Tensor,
    z: torch.Tensor | None = None,
    sde: VPSDE | None = None,
    *,
    divergence: str = "auto",
    num_probes: int = 4,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "RK45",
    generator: torch.Generator | None = None,
    probes: torch.Tensor | None = None,
) -> ODELogLikelihood:
    r"""Per-example :math:`\log p_\theta(x\mid z)` by the probability-flow ODE (module docstring).

    :param model: anything with ``eps_net`` and ``sde`` (a
        :class:`~pyro_diffmvae.modality.DiffusionDecoder`, a
        :class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood`, a
        :class:`~pyro_diffmvae.prior.LatentScorePrior`) or an ε-network ``eps_net(x_t, z, t)`` (then
        ``sde`` defaults to ``VPSDE()``).
    :param x: ``(N, *event_shape)`` data on the model's scale.
    :param z: ``(N, D)`` conditioning latents, or ``None`` for an unconditional model.
    :param divergence: ``"exact"``, ``"hutchinson"`` or ``"auto"``.
    :param num_probes: Rademacher probes per example (Hutchinson).
    :param rtol: passed to :func:`scipy.integrate.solve_ivp`.
    :param atol: see ``rtol`` above.
    :param method: see ``rtol`` above.
    :param generator: for the probes.
    :param probes: Hutchinson's Rademacher probes ``(P, N, *event_shape)`` to use instead of fresh
        ones (e.g. the same probes for several latents of one example; ignored for the exact trace);
        ``num_probes`` is then P.
    """
    if hasattr(model, "eps_net") and hasattr(model, "sde"):
        eps_net, sde = model.eps_net, model.sde
    elif callable(model):
        eps_net, sde = model, (sde if sde is not None else VPSDE())
    else:
        raise TypeError(f"ode_log_likelihood expects an eps_net or an object with eps_net and sde, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty float tensor of shape (N, *event_shape)")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values")
    n, event_shape = x.shape[0], tuple(x.shape[1:])
    if z is not None and (z.dim() != 2 or z.shape[0] != n):
        raise ValueError(f"z must have shape (N, D) with N = {n}, got {tuple(z.shape)}")
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}")
    d = math.prod(event_shape)
    exact = resolve_divergence(divergence, d) == "exact"
    if exact:  # the basis vectors e_i, the same for every example
        probes = torch.eye(d, dtype=x.dtype, device=x.device).reshape((d, 1) + event_shape).expand((d,) + tuple(x.shape))
    elif probes is None:
        probes = torch.randint(0, 2, (num_probes,) + tuple(x.shape), generator=generator).to(x) * 2 - 1
    elif probes.dim() != x.dim() + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (P, {', '.join(map(str, x.shape))}), got {tuple(probes.shape)}")
    else:
        probes, num_probes = probes.to(x), probes.shape[0]
    n_state = x.numel()
    evaluations = 0

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        r""":math:`(\tilde f(x_t, t), (v_p^\top J v_p)_p)`, flattened."""
        nonlocal evaluations
        evaluations += 1
        with torch.enable_grad():
            x_t = torch.from_numpy(y[:n_state]).to(x).reshape(x.shape).requires_grad_(True)
            tt = torch.full((n,), t, dtype=x.dtype, device=x.device)
            drift = sde.probability_flow_drift(x_t, eps_net(x_t, z, tt), tt)
            quad = [(torch.autograd.grad(drift, x_t, v, retain_graph=True)[0] * v).reshape(n, -1).sum(-1) for v in probes]
        return np.concatenate([drift.detach().double().cpu().numpy().ravel(), torch.stack(quad).double().cpu().numpy().ravel()])

    y0 = np.concatenate([x.detach().double().cpu().numpy().ravel(), np.zeros(len(probes) * n)])
    sol = solve_ivp(rhs, (sde.eps, sde.T), y0, method=method, rtol=rtol, atol=atol)
    if not sol.success:
        raise RuntimeError(f"the probability-flow ODE solve failed: {sol.message}")
    end = torch.from_numpy(sol.y[:, -1]).to(x.device)
    x_T = end[:n_state].reshape(x.shape)
    acc = end[n_state:].reshape(len(probes), n)
    log_prior = sde.prior_log_prob(x_T, len(event_shape))
    if exact:
        value = log_prior + acc.sum(0)
        return ODELogLikelihood(value, torch.zeros_like(value), value[None], evaluations)
    draws = log_prior + acc
    stderr = draws.std(0) / math.sqrt(num_probes) if num_probes > 1 else torch.full_like(log_prior, float("nan"))
    return ODELogLikelihood(draws.mean(0), stderr, draws, evaluations)
