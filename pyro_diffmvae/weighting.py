r"""Likelihood weightings :math:`\lambda(t)` of the denoising score-matching loss (paper eq. 2).

The weighted DSM loss of a diffusion decoder, written on the score and then on the
ε-parameterisation :math:`s_\theta = -\hat\epsilon_\theta/\sigma_t`, is

.. math::

    J(\lambda) = \tfrac12\int_\epsilon^T \lambda(t)\,
      \mathbb E\|s_\theta(x_t, t) - \nabla\log p_{0t}(x_t\mid x_0)\|^2 dt
    = \tfrac12\int_\epsilon^T \frac{\lambda(t)}{\sigma_t^2}\,
      \mathbb E\|\hat\epsilon_\theta(x_t, t) - \epsilon\|^2 dt .

Named weightings:

``"likelihood"``  :math:`\lambda = g^2 = \beta`: Diff-MVAE. With the constants of
                  :mod:`pyro_diffmvae.sde` this is a lower bound on :math:`\log p(x\mid z)`
                  (Song et al. 2021, Thm. 1), so the Pyro ELBO is a true ELBO.
``"simple"``      :math:`\lambda = \sigma_t^2`: the unweighted ε-MSE :math:`\|\hat\epsilon-\epsilon\|^2`
                  of Ho et al. (2020). This is the paper's Diff-MVAE* ("λ(t) = 1"), which it
                  justifies by Ho et al. and LSGM, whose unweighted objective is the ε-MSE.
                  Not a bound.
``"unit"``        :math:`\lambda = 1` on the score form. Not a bound; its per-draw variance is
                  enormous (the weight :math:`1/\sigma_t^2` reaches ~10⁶ near :math:`t=\epsilon`).
``"high_noise"``  :math:`\lambda = \sigma_t^2\,\mathrm{clip}(1/\mathrm{SNR}_t, 1, 20)`,
                  :math:`\mathrm{SNR}_t = \alpha_t^2/\sigma_t^2`: the ε-MSE up-weighted where the noise
                  dominates (up to 20×), i.e. towards the x₀-error there. At high noise only z can tell
                  the decoder what to draw, and the plain ε-MSE barely rewards using it. Not a bound.
``"v_mse"``       :math:`\lambda = \sigma_t^2/\alpha_t^2`: the ε-MSE divided by :math:`\alpha_t^2`, which is
                  the v-MSE :math:`\|\hat v - v\|^2 = (1+\mathrm{SNR}_t)\|\hat x_0 - x_0\|^2` of
                  Salimans & Ho (2022). At high noise it is the plain x₀-error, so the decoder is
                  paid in full for drawing from z what x_t no longer shows. Pair it with
                  ``prediction="v"`` (its weight reaches ~2·10⁴ at t = T on the default SDE, which an
                  ε-network's error would turn into a huge-variance loss). Not a bound.

Any callable ``weighting(t, sde) -> Tensor`` (same shape as ``t``) is accepted too.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

__all__ = [
    "WEIGHTINGS",
    "Weighting",
    "likelihood_weighting",
    "simple_weighting",
    "unit_weighting",
    "high_noise_weighting",
    "v_mse_weighting",
    "get_weighting",
]


def likelihood_weighting(t: torch.Tensor, sde) -> torch.Tensor:
    r""":math:`\lambda(t) = g^2(t)`: the maximum-likelihood weighting (a true bound)."""
    return sde.g2(t)


def simple_weighting(t: torch.Tensor, sde) -> torch.Tensor:
    r""":math:`\lambda(t) = \sigma_t^2`: the unweighted ε-MSE (paper's Diff-MVAE*)."""
    return sde.sigma2(t)


def unit_weighting(t: torch.Tensor, sde) -> torch.Tensor:
    r""":math:`\lambda(t) = 1` on the score form."""
    return torch.ones_like(t)


def high_noise_weighting(t: torch.Tensor, sde, cap: float = 20.0) -> torch.Tensor:
    r""":math:`\lambda(t) = \sigma_t^2\,\mathrm{clip}(\sigma_t^2/\alpha_t^2, 1, \mathrm{cap})`."""
    sigma2 = sde.sigma2(t)
    inv_snr = sigma2 / sde.alpha(t) ** 2
    return sigma2 * inv_snr.clamp(1.0, cap)


def v_mse_weighting(t: torch.Tensor, sde) -> torch.Tensor:
    r""":math:`\lambda(t) = \sigma_t^2/\alpha_t^2`: the v-MSE (= ε-MSE / α², = (1+SNR)·x₀-MSE)."""
    return sde.sigma2(t) / sde.alpha(t) ** 2


WEIGHTINGS: dict[str, Callable] = {
    "likelihood": likelihood_weighting,
    "simple": simple_weighting,
    "unit": unit_weighting,
    "high_noise": high_noise_weighting,
    "v_mse": v_mse_weighting,
}

Weighting = Union[str, Callable[[torch.Tensor, object], torch.Tensor]]


def get_weighting(weighting: Weighting) -> tuple[str, Callable]:
    """Resolve a weighting name or callable to ``(name, fn)``.

    A callable keeps its ``__name__`` (or ``"custom"``) as its name. An unknown name raises a
    ``ValueError`` that lists the known ones.
    """
    if isinstance(weighting, str):
        if weighting not in WEIGHTINGS:
            raise ValueError(
                f"unknown weighting {weighting!r}; known weightings: {sorted(WEIGHTINGS)} "
                "(or pass a callable lambda(t, sde))"
            )
        return weighting, WEIGHTINGS[weighting]
    if callable(weighting):
        return getattr(weighting, "__name__", "custom"), weighting
    raise TypeError(f"weighting must be a name or a callable lambda(t, sde), got {type(weighting).__name__}")
