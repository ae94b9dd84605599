import math

import pytest
import torch

from pyro_diffmvae.sde import VPSDE


class GaussianEpsPredictor(torch.nn.Module):
    r"""Linear ε-predictor of an isotropic Gaussian N(mean, var·I) (optionally z-dependent mean).

    For data N(m, s²I) the VP-SDE marginal is p_t = N(α_t m, v_t I), v_t = α_t² s² + σ_t², and the
    exact ε-predictor is ε*(x_t, t) = σ_t (x_t − α_t m)/v_t. ``scale`` multiplies it (a wrong
    predictor for scale ≠ 1). With ``z_to_mean=True`` the mean is z[:, :1] (broadcast over x).
    """

    def __init__(self, sde, mean=0.0, var=1.0, scale=1.0, z_to_mean=False):
        super().__init__()
        self.sde, self.mean, self.var, self.scale, self.z_to_mean = sde, mean, var, scale, z_to_mean

    def forward(self, x_t, z, t):
        pad = (-1,) + (1,) * (x_t.dim() - 1)
        alpha, sigma2 = self.sde.alpha(t).reshape(pad), self.sde.sigma2(t).reshape(pad)
        mean = z[:, :1].reshape(pad) if self.z_to_mean else self.mean
        v = alpha**2 * self.var + sigma2
        return self.scale * sigma2.sqrt() * (x_t - alpha * mean) / v


def gaussian_nll(x, mean, var):
    """−log N(x; mean, var·I) summed over the last dim."""
    d = x.shape[-1]
    return 0.5 * d * math.log(2 * math.pi * var) + 0.5 * ((x - mean) ** 2).sum(-1) / var


@pytest.fixture
def sde():
    return VPSDE()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
