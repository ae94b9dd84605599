"""ε / x0 / v network parameterisations (nets/parameterization.py) and the v-MSE weighting."""

import pytest
import torch
from torch import nn

from pyro_diffmvae.modality import DiffusionDecoder
from pyro_diffmvae.nets.parameterization import EpsFromPrediction
from pyro_diffmvae.sde import VPSDE
from pyro_diffmvae.weighting import get_weighting

SDE = VPSDE()
S2 = 0.3  # data variance of x0 ~ N(0, S2 I)


def _gains(t):
    """Posterior-mean gains of x0 ~ N(0, S2): E[x0|x_t] = a x_t, E[eps|x_t] = b x_t (closed form)."""
    alpha, sigma2 = SDE.alpha(t), SDE.sigma2(t)
    var_t = alpha**2 * S2 + sigma2
    return (alpha * S2 / var_t).unsqueeze(-1), (sigma2.sqrt() / var_t).unsqueeze(-1)


class ExactPosteriorMean(nn.Module):
    """The optimal predictor of ``target`` in {eps, x0, v} for Gaussian data, by hand."""

    def __init__(self, target):
        super().__init__()
        self.target = target

    def forward(self, x_t, z, t):
        a, b = _gains(t)
        if self.target == "x0":
            return a * x_t
        if self.target == "eps":
            return b * x_t
        alpha, sigma = SDE.alpha(t).unsqueeze(-1), SDE.sigma(t).unsqueeze(-1)
        return (alpha * b - sigma * a) * x_t  # E[v|x_t], v = alpha eps - sigma x0


@pytest.mark.parametrize("prediction", ["x0", "v"])
def test_optimal_x0_and_v_networks_convert_to_the_optimal_eps_network(prediction):
    x_t = torch.randn(7, 4)
    t = torch.tensor([1e-3, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0])
    eps_from = EpsFromPrediction(ExactPosteriorMean(prediction), SDE, prediction)
    torch.testing.assert_close(eps_from(x_t, None, t), ExactPosteriorMean("eps")(x_t, None, t), rtol=1e-4, atol=1e-5)


def test_converted_eps_error_is_snr_times_x0_error_and_alpha2_times_v_error():
    torch.manual_seed(0)
    x0, eps = torch.randn(5, 6), torch.randn(5, 6)
    t = torch.tensor([0.02, 0.3, 0.5, 0.7, 0.99])
    x_t = SDE.perturb(x0, t, eps)
    out = torch.randn(5, 6)  # an arbitrary network output
    alpha, sigma = SDE.alpha(t), SDE.sigma(t)

    class Const(nn.Module):
        def forward(self, x_t, z, t):
            return out

    err_x0 = (EpsFromPrediction(Const(), SDE, "x0")(x_t, None, t) - eps).pow(2).sum(-1)
    torch.testing.assert_close(err_x0, alpha**2 / sigma**2 * (out - x0).pow(2).sum(-1), rtol=1e-4, atol=1e-5)
    v = alpha.unsqueeze(-1) * eps - sigma.unsqueeze(-1) * x0
    err_v = (EpsFromPrediction(Const(), SDE, "v")(x_t, None, t) - eps).pow(2).sum(-1)
    torch.testing.assert_close(err_v, alpha**2 * (out - v).pow(2).sum(-1), rtol=1e-4, atol=1e-5)
    assert EpsFromPrediction(Const(), SDE, "eps")(x_t, None, t) is out


def test_v_mse_weighting_is_eps_mse_over_alpha_squared():
    name, fn = get_weighting("v_mse")
    t = torch.tensor([0.1, 0.5, 0.9])
    # lambda / sigma^2 = 1 / alpha^2 = exp(B(t)), B(t) = b_min t + (b_max - b_min) t^2 / 2
    B = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    torch.testing.assert_close(fn(t, SDE) / SDE.sigma2(t), torch.exp(B), rtol=1e-5, atol=0)
    assert name == "v_mse"


def test_decoder_bound_is_the_same_for_every_exact_parameterisation():
    x = torch.randn(3, 4) * S2**0.5
    z = torch.zeros(3, 1)
    values = {}
    for prediction in ("eps", "x0", "v"):
        dec = DiffusionDecoder(ExactPosteriorMean(prediction), (4,), SDE, weighting="likelihood", prediction=prediction)
        torch.manual_seed(1)
        values[prediction] = dec(z).log_prob(x)
        assert dec.is_bound
    # x0 divides by sigma_t, whose float32 rounding near t = eps costs a little precision
    torch.testing.assert_close(values["v"], values["eps"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(values["x0"], values["eps"], rtol=1e-3, atol=1e-2)


def test_unknown_prediction_is_named():
    with pytest.raises(ValueError, match="unknown prediction 'score'.*eps"):
        DiffusionDecoder(nn.Identity(), (4,), prediction="score")
