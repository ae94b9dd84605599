r"""How well a diffusion decoder denoises, by diffusion time: the diagnostic behind a failed sampler.

For data :math:`x_0`, a latent :math:`z` and a time :math:`t`, noise :math:`x_t = \alpha_t x_0 + \sigma_t\epsilon`
(the VP-SDE's marginal, :class:`~pyro_diffmvae.sde.VPSDE`; ``docs/design.md`` §1) and read the network's
prediction :math:`\hat\epsilon = \hat\epsilon_\theta(x_t, z, t)` and the data prediction it implies,
:math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t`. The errors

.. math::
    e_\epsilon(t) = \sqrt{\mathbb E\,\|\hat\epsilon - \epsilon\|^2 / d}, \qquad
    e_{x_0}(t) = \sqrt{\mathbb E\,\|\hat x_0 - x_0\|^2 / d} = \frac{\sigma_t}{\alpha_t}\, e_\epsilon(t)

(root mean square per dimension) say where the network is inaccurate; the error of :math:`\hat x_0`'s per-channel
mean over the pixels (``mean_channel_rmse``, images only) is the colour shift a sampler inherits from the
high-noise steps. Every sampler that steps through :math:`\hat x_0` (DDIM, DPM-Solver++) multiplies the
ε-error by :math:`\sigma_t/\alpha_t` (≈ 150 at :math:`t = 1` for the default VP schedule), so an ε-predicting
network has to reach :math:`e_\epsilon(1) \approx \alpha_1\,\mathrm{std}(x_0)` — the Bayes error — for its
samples' colours to be right. A v-predicting network's :math:`\hat x_0` error stays bounded there by
construction.

The Bayes-optimal denoiser of Gaussian data :math:`x_0 \sim \mathcal N(m, s^2 I)` has, per dimension,
:math:`e_\epsilon^2 = \alpha^2 s^2/(\alpha^2 s^2 + \sigma^2)` and :math:`e_{x_0}^2 = s^2\sigma^2/(\alpha^2 s^2 +
\sigma^2)`: the closed forms the tests check against.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..sde import VPSDE, right_pad

#: default times: dense near t = 1, where ε-prediction's data prediction is ill-conditioned
DEFAULT_TIMES = (0.05, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 1.0)


@torch.no_grad()
def denoising_error_by_time(
    eps_net: Callable,
    sde: VPSDE,
    x0: torch.Tensor,
    z: torch.Tensor | None,
    times: Sequence[float] = DEFAULT_TIMES,
    generator: torch.Generator | None = None,
) -> list[dict]:
    r"""One row per time of ``times``: ``{"t", "alpha", "sigma", "eps_rmse", "x0_rmse", "mean_channel_rmse"}``
    (module docstring), each a Monte Carlo estimate over the rows of ``x0`` (one noise draw each).

    :param eps_net: ``eps_net(x_t, z, t)`` → ε̂ of ``x_t``'s shape (a decoder's ``eps_net``; a v-predicting
        network is wrapped to return ε).
    :param x0: clean data ``(n, *event_shape)``; ``mean_channel_rmse`` is ``None`` unless it is ``(n, C, H, W)``.
    :param z: the latents the network is conditioned on, ``(n, D)``, or ``None``.
    """
    if x0.ndim < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 must be a non-empty batch (n, *event_shape), got shape {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 contains non-finite values (NaN or inf)")
    if z is not None and z.shape[0] != x0.shape[0]:
        raise ValueError(f"z has {z.shape[0]} rows for {x0.shape[0]} examples of x0")
    bad = [t for t in times if not 0.0 < float(t) <= 1.0]
    if bad or not times:
        raise ValueError(f"times must be a non-empty sequence in (0, 1], got {list(times)}")
    rows = []
    for t in times:
        tt = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)
        alpha, sigma = right_pad(sde.alpha(tt), x0), right_pad(sde.sigma(tt), x0)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
        x_t = sde.perturb(x0, tt, eps)
        eps_hat = eps_net(x_t, z, tt)
        x0_hat = (x_t - sigma * eps_hat) / alpha
        mean_channel = None
        if x0.ndim == 4:
            mean_channel = (x0_hat.mean((2, 3)) - x0.mean((2, 3))).pow(2).mean().sqrt().item()
        rows.append({"t": float(t), "alpha": alpha.flatten()[0].item(), "sigma": sigma.flatten()[0].item(),
                     "eps_rmse": (eps_hat - eps).pow(2).mean().sqrt().item(),
                     "x0_rmse": (x0_hat - x0).pow(2).mean().sqrt().item(),
                     "mean_channel_rmse": mean_channel})
    return rows
