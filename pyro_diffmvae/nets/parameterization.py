r"""What the denoising network predicts: ε, x₀ or v, always handed on as an ε-prediction.

Everything downstream (the likelihood's ε-MSE, the samplers, the bits/dim bound) is written on
:math:`\hat\epsilon_\theta(x_t, z, t)`. A network may instead predict another linear function of
:math:`(x_0, \epsilon)`; for the VP SDE (:math:`\alpha_t^2 + \sigma_t^2 = 1`, :math:`x_t = \alpha_t
x_0 + \sigma_t\epsilon`) the three usual targets convert exactly:

.. math::

    \text{x0:}\quad \hat\epsilon = (x_t - \alpha_t \hat x_0)/\sigma_t, \qquad
    \text{v:}\quad v = \alpha_t\epsilon - \sigma_t x_0,\;\; \hat\epsilon = \sigma_t x_t + \alpha_t \hat v

(Salimans & Ho 2022, §4). The objective is unchanged by the choice: the ε-MSE of the converted
prediction is :math:`\|\hat\epsilon-\epsilon\|^2 = \mathrm{SNR}_t\|\hat x_0 - x_0\|^2 =
\alpha_t^2\|\hat v - v\|^2`, so any weighting :math:`\lambda(t)` (a bound with ``"likelihood"``)
means what it meant. What changes is the conditioning of the network's task: with ε-prediction
the implied :math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t` amplifies a network error by
:math:`\sigma_t/\alpha_t` (≈ 90 at t = 0.95 on the default SDE), so at high noise, where only z
says what to draw, a small ε error is a large image error; a v-network's :math:`\hat x_0 =
\alpha_t x_t - \sigma_t\hat v` is bounded there.
"""

from __future__ import annotations

import torch
from torch import nn

from ..sde import VPSDE

__all__ = ["PREDICTIONS", "EpsFromPrediction"]

PREDICTIONS = ("eps", "x0", "v")


class EpsFromPrediction(nn.Module):
    r"""Wrap a network that predicts ``prediction`` ∈ {eps, x0, v} so that it returns :math:`\hat\epsilon`.

    :param net: ``net(x_t, z, t) -> Tensor`` of ``x_t``'s shape.
    :param sde: the :class:`~pyro_diffmvae.sde.VPSDE` whose :math:`\alpha_t, \sigma_t` convert.
    :param prediction: ``"eps"`` (returned as is), ``"x0"`` or ``"v"``.
    """

    def __init__(self, net: nn.Module, sde: VPSDE, prediction: str = "eps"):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; known: {list(PREDICTIONS)}")
        self.net = net
        self.sde = sde
        self.prediction = prediction

    def forward(self, x_t: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor | float) -> torch.Tensor:
        out = self.net(x_t, z, t)
        if self.prediction == "eps":
            return out
        t = torch.as_tensor(t, dtype=x_t.dtype, device=x_t.device)
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        alpha = self.sde.alpha(t).reshape(shape)
        sigma = self.sde.sigma(t).reshape(shape)
        if self.prediction == "x0":
            return (x_t - alpha * out) / sigma
        return sigma * x_t + alpha * out  # v

    def extra_repr(self) -> str:
        return f"prediction={self.prediction!r}"
