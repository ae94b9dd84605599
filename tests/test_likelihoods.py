import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO, TraceMeanField_ELBO
from scipy import integrate

from conftest import GaussianEpsPredictor, gaussian_nll
from pyro_diffmvae.likelihoods import ScoreMatchingLikelihood
from pyro_diffmvae.sde import VPSDE
from pyro_diffmvae.weighting import WEIGHTINGS, get_weighting


def per_draw_nll(lik, x, n):
    """n independent one-draw estimates of -log_prob(x) (x has only event dims)."""
    return -lik.log_prob(x.expand((n,) + x.shape))


def quadrature_bound(sde, x, mean, var, scale=1.0):
    """The bound of docs/design.md §1 for a linear predictor, by quadrature (float64)."""
    x = x.double().numpy()
    d = x.size

    def integrand(t):
        B = float(sde.integrated_beta(torch.tensor(t, dtype=torch.float64)))
        a2, s2, beta = math.exp(-B), -math.expm1(-B), sde.beta_min + t * (sde.beta_max - sde.beta_min)
        v = a2 * var + s2
        # eps_hat - eps = c σ α (x - m)/v + eps (c σ²/v - 1)
        err = (scale**2 * s2 * a2 * (x - mean) ** 2 / v**2 + (scale * s2 / v - 1) ** 2).sum()
        return 0.5 * beta / s2 * err

    integral, _ = integrate.quad(integrand, sde.eps, sde.T, points=[1e-4, 1e-3, 1e-2, 0.1], limit=500)
    return float(sde.prior_nll(torch.tensor(x), 1)) + integral - sde.bound_constant(d)


@pytest.mark.parametrize("d", [1, 16])
def test_bound_is_tight_for_exact_predictor(sde, d):
    mean, var = 0.5, 0.7
    x = mean + math.sqrt(var) * torch.randn(d)
    lik = ScoreMatchingLikelihood(GaussianEpsPredictor(sde, mean, var), None, sde, event_shape=(d,))
    assert lik.is_bound and "lower bound" in lik.objective
    draws = per_draw_nll(lik, x, 400_000)
    se = draws.std().item() / math.sqrt(draws.numel())
    true_nll = gaussian_nll(x.double(), mean, var).item()
    # The bound exceeds -log p_theta(x) by at most KL(p_T||pi)+O(d*B(eps)) ~ 1e-4 here.
    assert abs(draws.mean().item() - true_nll) < 4 * se + 1e-3 * d
    # the quadrature value of the same bound is within 1e-3 of the true NLL (not Monte Carlo)
    assert abs(quadrature_bound(sde, x, mean, var) - true_nll) < 1e-3


@pytest.mark.parametrize("d", [1, 16])
def test_bound_is_strictly_larger_for_wrong_predictor(sde, d):
    mean, var = 0.5, 0.7
    x = mean + math.sqrt(var) * torch.randn(d)
    wrong = ScoreMatchingLikelihood(GaussianEpsPredictor(sde, mean, var, scale=1.3), None, sde, event_shape=(d,))
    draws = per_draw_nll(wrong, x, 400_000)
    se = draws.std().item() / math.sqrt(draws.numel())
    true_nll = gaussian_nll(x.double(), mean, var).item()
    quad = quadrature_bound(sde, x, mean, var, scale=1.3)
    assert abs(draws.mean().item() - quad) < 4 * se
    assert draws.mean().item() - true_nll > 6 * se
    assert quad - true_nll > 0.1 * d


def test_control_variate_same_mean_smaller_spread(sde):
    d, mean, var = 64, 0.0, 1.0
    x = torch.randn(d)
    net = GaussianEpsPredictor(sde, mean, var, scale=1.1)
    plain = per_draw_nll(ScoreMatchingLikelihood(net, None, sde, event_shape=(d,)), x, 200_000)
    cv = per_draw_nll(ScoreMatchingLikelihood(net, None, sde, event_shape=(d,), control_variate=True), x, 200_000)
    se = math.hypot(plain.std().item(), cv.std().item()) / math.sqrt(200_000)
    assert abs(plain.mean().item() - cv.mean().item()) < 4 * se
    assert cv.std() < 0.7 * plain.std()


def test_num_draws_averages(sde):
    d = 4
    x = torch.randn(d)
    net = GaussianEpsPredictor(sde, 0.0, 1.0)
    one = per_draw_nll(ScoreMatchingLikelihood(net, None, sde, event_shape=(d,)), x, 20_000)
    many = per_draw_nll(ScoreMatchingLikelihood(net, None, sde, event_shape=(d,), num_draws=16), x, 20_000)
    assert many.std() < 0.35 * one.std()  # ~1/sqrt(16) = 0.25
    assert abs(many.mean() - one.mean()) < 4 * one.std() / math.sqrt(20_000) * 1.1


@pytest.mark.parametrize("name", ["simple", "unit"])
def test_non_likelihood_weightings_value_and_constants_error(sde, name):
    d = 8
    x = torch.randn(d)
    net = GaussianEpsPredictor(sde, 0.0, 1.0, scale=0.9)
    lik = ScoreMatchingLikelihood(net, None, sde, weighting=name, event_shape=(d,))
    assert not lik.is_bound and "not a bound" in lik.objective
    assert lik.time_sampling == "uniform"
    # hand-computed per-draw value for fixed draws: 1/2 * lambda/sigma^2 * (T-eps) * ||eps_hat - eps||^2
    torch.manual_seed(3)
    value = -lik.log_prob(x)
    torch.manual_seed(3)
    t = sde.eps + (sde.T - sde.eps) * torch.rand(1)
    noise = torch.randn(1, d)
    x_t = sde.perturb(x[None], t, noise)
    sq = ((net(x_t, None, t) - noise) ** 2).sum()
    lam = WEIGHTINGS[name](t, sde)
    torch.testing.assert_close(value, (0.5 * lam / sde.sigma2(t) * (sde.T - sde.eps) * sq).squeeze())
    with pytest.raises(ValueError, match="needs weighting='likelihood'.*not a bound"):
        ScoreMatchingLikelihood(net, None, sde, weighting=name, event_shape=(d,), include_constants=True)
    with pytest.raises(ValueError, match="control_variate=True needs the bound"):
        ScoreMatchingLikelihood(net, None, sde, weighting=name, event_shape=(d,), control_variate=True)


def test_callable_weighting_and_unknown_name(sde):
    name, fn = get_weighting(lambda t, s: 2 * s.g2(t))
    assert name == "<lambda>"
    lik = ScoreMatchingLikelihood(GaussianEpsPredictor(sde), None, sde, weighting=lambda t, s: 2 * s.g2(t), event_shape=(3,))
    assert not lik.is_bound
    with pytest.raises(ValueError, match=r"known weightings: \[.high_noise., .likelihood., .simple., .unit., .v_mse.\]"):
        get_weighting("g2")
    with pytest.raises(ValueError, match="unknown time_sampling"):
        ScoreMatchingLikelihood(GaussianEpsPredictor(sde), None, sde, event_shape=(3,), time_sampling="log")


def test_log_prob_broadcasting_matches_explicit_expansion(sde):
    d, D = 3, 2
    net = GaussianEpsPredictor(sde, z_to_mean=True)
    z = torch.randn(4, 1, D)  # e.g. an enumeration / second plate dim at -2
    x = torch.randn(5, d)
    lik = ScoreMatchingLikelihood(net, z, sde, event_shape=(d,))
    torch.manual_seed(7)
    lp = lik.log_prob(x)
    assert lp.shape == (4, 5)
    torch.manual_seed(7)
    lp_explicit = ScoreMatchingLikelihood(net, z.expand(4, 5, D), sde, event_shape=(d,)).log_prob(x.expand(4, 5, d))
    torch.testing.assert_close(lp, lp_explicit)
    # each entry equals the value computed alone with the same draws? (values depend on z's mean)
    assert not torch.allclose(lp[0], lp[1])


def test_expand_and_sample_shapes(sde):
    d, D = 2, 3
    net = GaussianEpsPredictor(sde, z_to_mean=True, var=0.25)
    z = torch.randn(D)
    lik = ScoreMatchingLikelihood(net, z, sde, event_shape=(d,), sampler="ddim", sampler_steps=20)
    big = lik.expand((4, 5))
    assert big.batch_shape == (4, 5) and big.event_shape == (d,)
    assert big.log_prob(torch.randn(d)).shape == (4, 5)
    assert big.num_draws == lik.num_draws and big.is_bound
    s = big.sample((2,))
    assert s.shape == (2, 4, 5, d) and not s.requires_grad


def test_sample_follows_conditional_gaussian(sde):
    # exact predictor of N(z_0, 0.25 I): samples have mean z_0 and variance 0.25
    d = 2
    z = torch.tensor([[2.0, 0.0], [-1.0, 0.0]])
    net = GaussianEpsPredictor(sde, var=0.25, z_to_mean=True)
    for sampler, steps in [("ddim", 200), ("ode", 200), ("sde", 300)]:
        lik = ScoreMatchingLikelihood(net, z, sde, event_shape=(d,), sampler=sampler, sampler_steps=steps)
        x = lik.sample((4000,))
        assert x.shape == (4000, 2, d)
        torch.testing.assert_close(x.mean((0, 2)), z[:, 0], atol=0.04, rtol=0)
        torch.testing.assert_close(x.var(0).mean(-1), torch.full((2,), 0.25), atol=0.03, rtol=0)


def test_rsample_raises_with_explanation(sde):
    lik = ScoreMatchingLikelihood(GaussianEpsPredictor(sde), torch.zeros(2, 1), sde, event_shape=(3,))
    assert not lik.has_rsample
    with pytest.raises(NotImplementedError, match="no reparameterised sampler"):
        lik.rsample()


def test_validation_errors(sde):
    net = GaussianEpsPredictor(sde)
    lik = ScoreMatchingLikelihood(net, torch.zeros(4, 2), sde, event_shape=(3, 2), validate_args=True)
    with pytest.raises(ValueError, match=r"shape \(4, 2, 3\).*event_shape \(3, 2\)"):
        lik.log_prob(torch.zeros(4, 2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        lik.log_prob(torch.full((4, 3, 2), float("nan")))
    with pytest.raises(ValueError, match="floating point"):
        lik.log_prob(torch.zeros(4, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"batch shape \(5,\) does not broadcast.*\(4,\)"):
        lik.log_prob(torch.zeros(5, 3, 2))
    with pytest.raises(ValueError, match="z contains non-finite"):
        ScoreMatchingLikelihood(net, torch.full((4, 2), float("inf")), sde, event_shape=(3,), validate_args=True)
    with pytest.raises(ValueError, match="unknown sampler"):
        ScoreMatchingLikelihood(net, torch.zeros(4, 2), sde, event_shape=(3,), sampler="euler")
    bad_net = lambda x_t, z, t: x_t[..., :1]
    with pytest.raises(ValueError, match=r"eps_net returned shape \(4, 1\), expected.*\(4, 3\)"):
        ScoreMatchingLikelihood(bad_net, torch.zeros(4, 2), sde, event_shape=(3,)).log_prob(torch.zeros(4, 3))


# ------------------------------------------------------------------ Pyro integration
class TinyEpsNet(torch.nn.Module):
    """eps_net(x_t, z, t): an MLP on [x_t, z, t]."""

    def __init__(self, d, D):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(d + D + 1, 32), torch.nn.SiLU(), torch.nn.Linear(32, d))

    def forward(self, x_t, z, t):
        return self.net(torch.cat([x_t, z, t[:, None]], -1))


def make_model_guide(d, D, n_data, subsample_size=None):
    eps_net = TinyEpsNet(d, D)
    encoder = torch.nn.Linear(d, 2 * D)

    def model(x):
        pyro.module("eps_net", eps_net)
        with pyro.plate("data", n_data, subsample_size=subsample_size) as idx:
            z = pyro.sample("z", dist.Normal(torch.zeros(D), 1.0).to_event(1))
            xb = x[idx] if x is not None else None
            pyro.sample("x", ScoreMatchingLikelihood(eps_net, z, event_shape=(d,), sampler_steps=5), obs=xb)

    def guide(x):
        pyro.module("encoder", encoder)
        with pyro.plate("data", n_data, subsample_size=subsample_size) as idx:
            h = encoder(x[idx])
            pyro.sample("z", dist.Normal(h[:, :D], torch.nn.functional.softplus(h[:, D:]) + 1e-3).to_event(1))

    return model, guide, eps_net, encoder


@pytest.mark.parametrize("elbo_cls", [Trace_ELBO, TraceMeanField_ELBO])
def test_observed_site_under_elbos_gradients_reach_eps_net_and_z(elbo_cls):
    pyro.clear_param_store()
    d, D, n = 3, 2, 8
    model, guide, eps_net, encoder = make_model_guide(d, D, n)
    x = torch.randn(n, d)
    loss = elbo_cls(max_plate_nesting=1).differentiable_loss(model, guide, x)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in eps_net.parameters())
    # the encoder's gradient flows through z into the likelihood (and the KL)
    assert encoder.weight.grad.abs().sum() > 0
    # SVI steps run and change parameters
    before = [p.detach().clone() for p in eps_net.parameters()]
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo_cls(max_plate_nesting=1))
    for _ in range(3):
        assert math.isfinite(svi.step(x))
    assert any(not torch.equal(b, p) for b, p in zip(before, eps_net.parameters()))


def test_gradient_through_z_reaches_likelihood_alone(sde):
    # z enters log_prob (not only the KL): d log_prob / dz is non-zero
    z = torch.zeros(4, 2, requires_grad=True)
    net = GaussianEpsPredictor(sde, z_to_mean=True)
    ScoreMatchingLikelihood(net, z, sde, event_shape=(3,)).log_prob(torch.ones(4, 3)).sum().backward()
    assert z.grad[:, 0].abs().min() > 0


def test_subsampled_plate_scales_log_prob():
    pyro.clear_param_store()
    d, D, n, m = 3, 2, 20, 5
    model, guide, _, _ = make_model_guide(d, D, n, subsample_size=m)
    x = torch.randn(n, d)
    guide_trace = poutine.trace(guide).get_trace(x)
    trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    trace.compute_log_prob()
    site = trace.nodes["x"]
    assert site["scale"] == pytest.approx(n / m)
    assert site["unscaled_log_prob"].shape == (m,)
    torch.testing.assert_close(site["log_prob"], site["unscaled_log_prob"] * n / m)
    torch.testing.assert_close(site["log_prob_sum"], site["unscaled_log_prob"].sum() * n / m)


def test_predictive_samples_through_sample():
    sde = VPSDE()
    net = GaussianEpsPredictor(sde, var=0.25, z_to_mean=True)
    calls = []

    class CountingNet(torch.nn.Module):
        def forward(self, x_t, z, t):
            calls.append(x_t.shape[0])
            return net(x_t, z, t)

    counting = CountingNet()

    def model(x=None):
        with pyro.plate("data", 6):
            z = pyro.sample("z", dist.Normal(torch.tensor([3.0, 0.0]), 1e-3).to_event(1))
            pyro.sample("x", ScoreMatchingLikelihood(counting, z, sde, event_shape=(2,), sampler_steps=200), obs=x)

    out = Predictive(model, num_samples=200, parallel=True)()
    assert out["x"].shape == (200, 6, 2)
    # the vectorised draw is one DDIM run: 200 steps + the final denoising step, all 1200 at once
    assert calls.count(1200) == 201
    assert abs(out["x"].mean().item() - 3.0) < 0.05
    assert abs(out["x"].var().item() - 0.25) < 0.03


def test_second_plate_at_dim_minus_two_and_enumeration(sde):
    """Inside a subsets plate at dim -2 and under parallel enumeration of a discrete site,
    log_prob broadcasts and the ELBO equals the hand-written marginalisation."""
    from pyro.infer import TraceEnum_ELBO, config_enumerate

    d, B = 2, 5
    net = GaussianEpsPredictor(sde, var=0.5, z_to_mean=True)
    locs = torch.tensor([[-1.0, 0.0], [0.5, 0.0], [2.0, 0.0]])
    weights = torch.tensor([0.2, 0.3, 0.5])
    x = torch.randn(B, d)

    @config_enumerate
    def model(x):
        with pyro.plate("data", B, dim=-1):
            c = pyro.sample("c", dist.Categorical(weights))
            pyro.sample("x", ScoreMatchingLikelihood(net, locs[c], sde, event_shape=(d,)), obs=x)

    guide = lambda x: None
    torch.manual_seed(21)
    loss = torch.tensor(TraceEnum_ELBO(max_plate_nesting=1).loss(model, guide, x))
    torch.manual_seed(21)
    lp = ScoreMatchingLikelihood(net, locs[:, None, :], sde, event_shape=(d,)).log_prob(x)  # (3, B)
    assert lp.shape == (3, B)
    expected = -torch.logsumexp(weights.log()[:, None] + lp, 0).sum()
    torch.testing.assert_close(loss, expected.to(loss.dtype))

    # a second plate at dim -2 (as in the subset-enumerating guide): z of shape (K, B, D)
    def model2(x):
        with pyro.plate("subsets", 3, dim=-2), pyro.plate("data", B, dim=-1):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", ScoreMatchingLikelihood(net, z, sde, event_shape=(d,)), obs=x)

    trace = poutine.trace(model2).get_trace(x)
    trace.compute_log_prob()
    assert trace.nodes["x"]["log_prob"].shape == (3, B)


def test_high_noise_weighting_closed_form(sde):
    from pyro_diffmvae.weighting import high_noise_weighting

    t = torch.tensor([1e-3, 0.3, 0.6, 1.0], dtype=torch.float64)
    a2, s2 = sde.alpha(t) ** 2, sde.sigma2(t)
    expected = s2 * torch.clamp(s2 / a2, 1.0, 20.0)
    torch.testing.assert_close(high_noise_weighting(t, sde), expected)
    assert high_noise_weighting(t, sde)[0] == s2[0]  # low noise: the plain eps-MSE weight
    assert high_noise_weighting(t, sde)[-1] == pytest.approx(20 * s2[-1].item())  # capped at 20x
    lik = ScoreMatchingLikelihood(GaussianEpsPredictor(sde), None, sde, weighting="high_noise", event_shape=(3,))
    assert not lik.is_bound and lik.time_sampling == "uniform"
