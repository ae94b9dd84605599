import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pyro_diffmvae.sde import VPSDE


def test_schedule_closed_forms(sde):
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    beta = 0.1 + t * 19.9
    B = 0.1 * t + 0.5 * 19.9 * t**2
    torch.testing.assert_close(sde.beta(t), beta)
    torch.testing.assert_close(sde.g2(t), beta)
    torch.testing.assert_close(sde.integrated_beta(t), B)
    torch.testing.assert_close(sde.alpha(t), torch.exp(-B / 2))
    torch.testing.assert_close(sde.sigma2(t), 1 - torch.exp(-B))
    torch.testing.assert_close(sde.alpha(t) ** 2 + sde.sigma2(t), torch.ones_like(t))
    # B is the integral of beta
    for ti in [0.3, 1.0]:
        val, _ = integrate.quad(lambda s: 0.1 + 19.9 * s, 0, ti)
        assert math.isclose(float(sde.integrated_beta(torch.tensor(ti, dtype=torch.float64))), val, rel_tol=1e-12)


def test_sigma2_uses_expm1_at_tiny_t(sde):
    # In float32, 1 - exp(-B) at B ~ 1e-9 loses all digits; -expm1(-B) keeps them.
    t = torch.tensor(1e-8, dtype=torch.float32)
    exact = -math.expm1(-(0.1 * 1e-8 + 0.5 * 19.9 * 1e-16))
    assert math.isclose(float(sde.sigma2(t)), exact, rel_tol=1e-5)


def test_perturb_moments(sde):
    x0 = torch.full((200_000,), 1.5)
    t = torch.full((200_000,), 0.3)
    xt = sde.perturb(x0, t)
    a, s = float(sde.alpha(torch.tensor(0.3))), float(sde.sigma(torch.tensor(0.3)))
    assert abs(xt.mean().item() - a * 1.5) < 4 * s / math.sqrt(2e5)
    assert abs(xt.var().item() - s**2) < 0.01
    noise = torch.randn(4, 3)
    torch.testing.assert_close(sde.perturb(torch.ones(4, 3), torch.full((4,), 0.3), noise), a + s * noise)


def test_drift_and_score_from_eps(sde):
    x = torch.randn(5, 2, 3)
    t = torch.full((5,), 0.4)
    torch.testing.assert_close(sde.drift(x, t), -0.5 * sde.beta(t)[:, None, None] * x)
    eps = torch.randn(5, 2, 3)
    torch.testing.assert_close(sde.score_from_eps(eps, t), -eps / sde.sigma(t)[:, None, None])


def test_prior_nll_matches_monte_carlo(sde):
    # -E_{x_T|x_0} log N(x_T; 0, I) in closed form vs Monte Carlo; weak SDE so alpha_T is not ~0.
    weak = VPSDE(beta_max=2.0)
    x0 = torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float64)
    closed = weak.prior_nll(x0, event_dim=1)
    t = torch.full((400_000,), weak.T, dtype=torch.float64)
    xT = weak.perturb(x0.expand(400_000, 3), t)
    nll = 0.5 * 3 * math.log(2 * math.pi) + 0.5 * (xT**2).sum(-1)
    se = nll.std() / math.sqrt(nll.numel())
    assert abs(nll.mean() - closed) < 4 * se
    # and by hand: d/2 log 2pi + (alpha_T^2 ||x||^2 + d sigma_T^2)/2
    B = 0.1 + 0.5 * 1.9
    hand = 1.5 * math.log(2 * math.pi) + 0.5 * (math.exp(-B) * 5.25 + 3 * (1 - math.exp(-B)))
    assert math.isclose(float(closed), hand, rel_tol=1e-12)


def test_bound_constant_is_integral_of_control_variate(sde):
    # d/2 log(sigma_T^2/sigma_eps^2) = 1/2 ∫ beta/sigma^2 * d alpha^2 dt
    d = 7

    def f(t):
        B = 0.1 * t + 0.5 * 19.9 * t * t
        return 0.5 * d * (0.1 + 19.9 * t) * math.exp(-B) / -math.expm1(-B)

    val, _ = integrate.quad(f, sde.eps, sde.T, points=[1e-4, 1e-3, 1e-2, 0.1], limit=500)
    assert math.isclose(sde.bound_constant(d), val, rel_tol=1e-8)


@pytest.mark.parametrize("params", [dict(), dict(beta_max=2.0, eps=1e-3), dict(beta_min=1.0, beta_max=1.0, T=0.5)])
def test_importance_density_normalised_and_sampled(params):
    sde = VPSDE(**params)
    dens = lambda t: float(sde.importance_density(torch.tensor(t, dtype=torch.float64)))
    total, _ = integrate.quad(dens, sde.eps, sde.T, points=[10 * sde.eps, 100 * sde.eps, 0.1], limit=500)
    assert math.isclose(total, 1.0, rel_tol=1e-7)
    t, q = sde.sample_time((20_000,), method="importance", dtype=torch.float64)
    assert t.min() >= sde.eps and t.max() <= sde.T
    torch.testing.assert_close(q, sde.importance_density(t))

    def cdf(tt):
        tt = np.clip(tt, sde.eps, sde.T)
        F = np.log(np.expm1(sde.beta_min * tt + 0.5 * (sde.beta_max - sde.beta_min) * tt**2))
        return (F - sde._F(sde.eps)) / sde.importance_normaliser

    assert stats.kstest(t.numpy(), cdf).pvalue > 1e-3
    # a wrong CDF (uniform) is rejected: the test can fail
    assert stats.kstest(t.numpy(), stats.uniform(sde.eps, sde.T - sde.eps).cdf).pvalue < 1e-6


def test_uniform_time_sampling(sde):
    t, p = sde.sample_time((50_000,), method="uniform")
    assert t.min() >= sde.eps and t.max() <= sde.T
    torch.testing.assert_close(p, torch.full_like(t, 1 / (sde.T - sde.eps)))
    assert stats.kstest(t.numpy(), stats.uniform(sde.eps, sde.T - sde.eps).cdf).pvalue > 1e-3


def test_bad_parameters_and_methods():
    with pytest.raises(ValueError, match="beta_min"):
        VPSDE(beta_min=0.0)
    with pytest.raises(ValueError, match="beta_min <= beta_max"):
        VPSDE(beta_min=2.0, beta_max=1.0)
    with pytest.raises(ValueError, match="eps < T"):
        VPSDE(eps=1.0)
    with pytest.raises(ValueError, match="uniform.*importance"):
        VPSDE().sample_time((3,), method="loguniform")


def test_half_log_snr_closed_form_and_inverse():
    # λ = log(α/σ) with α² = e^{-B}, σ² = 1 - e^{-B}; by hand at t = 0.5: B = 0.05 + 0.5 * 19.9 * 0.25 = 2.5375,
    # λ = -B/2 - log(1 - e^{-B})/2 = -1.22757. Fails with λ = log(α²/σ²) or a wrong inverse root.
    sde = VPSDE()
    t = torch.tensor([1e-5, 0.1, 0.5, 1.0], dtype=torch.float64)
    B = 0.1 * t + 0.5 * 19.9 * t**2
    expected = 0.5 * torch.log(torch.exp(-B) / -torch.expm1(-B))
    torch.testing.assert_close(sde.half_log_snr(t), expected, rtol=1e-12, atol=0)
    assert float(sde.half_log_snr(torch.tensor(0.5, dtype=torch.float64))) == pytest.approx(-1.22757, abs=1e-5)
    torch.testing.assert_close(sde.time_from_half_log_snr(sde.half_log_snr(t)), t, rtol=1e-9, atol=0)
