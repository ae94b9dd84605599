r"""A user's weighting λ(t), defined outside the package (docs/extending.md, "A weighting").

The sigmoid weighting of Kingma & Gao (2023) on the ε-MSE: with the log signal-to-noise ratio
:math:`\log\mathrm{SNR}_t = \log\alpha_t^2 - \log\sigma_t^2`, the ε-MSE is weighted by
:math:`\mathrm{sigmoid}(b - \log\mathrm{SNR}_t)`; in the score-form convention of
:mod:`pyro_diffmvae.weighting` (the ε-MSE carries :math:`\lambda(t)/\sigma_t^2`) that is

.. math:: \lambda(t) = \sigma_t^2\,\mathrm{sigmoid}(b - \log\mathrm{SNR}_t).

Not a bound on log p(x | z).
"""

import torch


def sigmoid_weighting(t: torch.Tensor, sde, bias: float = 0.0) -> torch.Tensor:
    log_snr = 2.0 * sde.log_alpha(t) - torch.log(sde.sigma2(t))
    return sde.sigma2(t) * torch.sigmoid(bias - log_snr)
