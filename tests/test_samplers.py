import pytest
import torch

from pyro_diffmvae import samplers
from pyro_diffmvae.sde import VPSDE

MEAN = torch.tensor([1.0, -0.5])
COV = torch.tensor([[1.0, 0.8], [0.8, 1.5]])


class CorrelatedGaussianEps(torch.nn.Module):
    r"""Exact ε-predictor of N(MEAN, COV): ε* = σ_t (α_t² Σ + σ_t² I)⁻¹ (x_t − α_t μ).

    With ``z``, the mean is shifted by z (conditional generation)."""

    def __init__(self, sde):
        super().__init__()
        self.sde = sde

    def forward(self, x, z, t):
        a, s2 = self.sde.alpha(t), self.sde.sigma2(t)
        cov_t = a[:, None, None] ** 2 * COV + s2[:, None, None] * torch.eye(2)
        mean = MEAN if z is None else MEAN + z
        r = x - a[:, None] * mean
        return s2.sqrt()[:, None] * torch.linalg.solve(cov_t, r.unsqueeze(-1)).squeeze(-1)


# (sampler, steps, tolerance on mean, tolerance on covariance entries); 20,000 samples give a
# Monte Carlo std of ~0.01 on the mean and ~0.015 on the covariance; the rest is discretisation.
CASES = [("sde", 500, 0.04, 0.07), ("ode", 200, 0.04, 0.06), ("ddim", 200, 0.04, 0.06)]


@pytest.mark.parametrize("method,steps,tol_mean,tol_cov", CASES)
def test_samplers_reproduce_correlated_gaussian(method, steps, tol_mean, tol_cov):
    sde = VPSDE()
    x = samplers.sample(CorrelatedGaussianEps(sde), (20_000, 2), sde, method=method, steps=steps)
    torch.testing.assert_close(x.mean(0), MEAN, atol=tol_mean, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), COV, atol=tol_cov, rtol=0)


@pytest.mark.parametrize("method", ["sde", "ode", "ddim"])
def test_samplers_fail_with_a_wrong_score(method):
    # the same check rejects a predictor scaled by 0.5: the tolerances above are discriminating
    sde = VPSDE()
    exact = CorrelatedGaussianEps(sde)
    x = samplers.sample(lambda x, z, t: 0.5 * exact(x, z, t), (5_000, 2), sde, method=method, steps=100)
    assert (torch.cov(x.T) - COV).abs().max() > 0.2


@pytest.mark.parametrize("method", ["sde", "ode", "ddim"])
def test_conditioning_z_is_passed(method):
    sde = VPSDE()
    z = torch.tensor([[3.0, 0.0], [0.0, -3.0]]).repeat(2000, 1)
    x = samplers.sample(CorrelatedGaussianEps(sde), (4000, 2), sde, method=method, steps=100, z=z)
    torch.testing.assert_close(x[0::2].mean(0), MEAN + torch.tensor([3.0, 0.0]), atol=0.08, rtol=0)
    torch.testing.assert_close(x[1::2].mean(0), MEAN + torch.tensor([0.0, -3.0]), atol=0.08, rtol=0)


def test_image_shaped_states_and_callback():
    sde = VPSDE()
    net = lambda x, z, t: 0.1 * x
    for method in ["sde", "ode", "ddim"]:
        seen = []
        x = samplers.sample(net, (3, 1, 4, 4), sde, method=method, steps=7, callback=lambda i, n: seen.append((i, n)))
        assert x.shape == (3, 1, 4, 4)
        assert seen == [(i, 7) for i in range(1, 8)]


def test_deterministic_samplers_and_seeded_sde():
    sde = VPSDE()
    net = CorrelatedGaussianEps(sde)
    x_T = torch.randn(10, 2)
    for method in ["ode", "ddim"]:
        a = samplers.sample(net, (10, 2), sde, method=method, steps=20, x_T=x_T)
        b = samplers.sample(net, (10, 2), sde, method=method, steps=20, x_T=x_T)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(5)
    a = samplers.sample_reverse_sde(net, (10, 2), sde, steps=20)
    torch.manual_seed(5)
    b = samplers.sample_reverse_sde(net, (10, 2), sde, steps=20)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(6)
    c = samplers.sample_reverse_sde(net, (10, 2), sde, steps=20)
    assert not torch.allclose(a, c)


def test_network_evaluations_per_sampler():
    # torchsde's contract check evaluates the drift once before solving; it is cached, so a
    # k-step solve costs k network calls (+1 for the final denoising step).
    sde = VPSDE()
    calls = []
    net = lambda x, z, t: calls.append(1) or 0.1 * x
    for method, steps in [("sde", 10), ("ode", 10), ("ddim", 10)]:
        calls.clear()
        samplers.sample(net, (2, 3), sde, method=method, steps=steps)
        assert len(calls) == steps + 1, method
    calls.clear()
    samplers.sample(net, (2, 3), sde, method="ddim", steps=10, denoise=False)
    assert len(calls) == 10


def test_bad_arguments():
    sde = VPSDE()
    net = lambda x, z, t: x
    with pytest.raises(ValueError, match="unknown sampler 'euler'.*\\['ddim', 'ode', 'sde'\\]"):
        samplers.sample(net, (2, 2), sde, method="euler")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        samplers.sample_ddim(net, (2, 2), sde, steps=0)
    with pytest.raises(ValueError, match=r"z must have shape \(batch=2, D\), got \(3, 4\)"):
        samplers.sample_reverse_sde(net, (2, 2), sde, steps=3, z=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="at least 2 dims"):
        samplers.sample_ddim(net, (5,), sde)
    with pytest.raises(ValueError, match=r"x_T must have shape \(2, 2\)"):
        samplers.sample_probability_flow(net, (2, 2), sde, steps=3, x_T=torch.zeros(3, 2))


def test_ddim_x0_clipping():
    sde = VPSDE()
    net = CorrelatedGaussianEps(sde)
    x_T = torch.randn(500, 2)
    free = samplers.sample_ddim(net, (500, 2), sde, steps=20, x_T=x_T)
    wide = samplers.sample_ddim(net, (500, 2), sde, steps=20, x_T=x_T, x0_range=(-100.0, 100.0))
    torch.testing.assert_close(free, wide, rtol=1e-4, atol=1e-4)  # a range that never binds changes nothing
    tight = samplers.sample_ddim(net, (500, 2), sde, steps=20, x_T=x_T, x0_range=(-0.5, 0.5))
    assert tight.min() >= -0.5 and tight.max() <= 0.5 and free.abs().max() > 1.0
