"""Tests of pyro_diffmvae.log_likelihood (pyro_diffmvae/loglik.py), the probability-flow ODE
log-likelihood (metrics/ode_likelihood.py) and LatentScorePrior.log_prob, against closed forms.

The linear-Gaussian model is notebook 02's with two modalities: z ~ N(0, I_2), x^m = w_m * z + b_m + s_m ξ
(diagonal maps), so log p(x_O) = log N(x_O; b_O, W_O W_Oᵀ + diag s²) with W_O the stacked diag(w_m),
the likelihood experts are exact and their PoE with the prior expert is the exact posterior p(z | x_O).
"""

import math

import pytest
import torch
from torch import nn

import pyro_diffmvae
from conftest import GaussianEpsPredictor, gaussian_nll
from pyro_diffmvae import DiffusionDecoder, FeedForwardDecoder, LatentScorePrior, Modality, MultimodalVAE, VPSDE
from pyro_diffmvae.loglik import LogLikelihood, log_likelihood
from pyro_diffmvae.metrics import bits_per_dim, diffusion_nll, ode_log_likelihood
from pyro_diffmvae.nets.mmvae_plus import PrivateLatentDecoder, SharedPrivateEncoder
from pyro_diffmvae.objectives import MMVAE, MMVAEPlus, bind_objective
from pyro_diffmvae.two_stage import TwoStageVAE

D = 2
W = torch.tensor([[1.5, -0.8], [0.7, 1.2]], dtype=torch.float64)
BIAS = torch.tensor([[0.3, -0.2], [-0.5, 0.1]], dtype=torch.float64)
S = torch.tensor([0.6, 0.8], dtype=torch.float64)
NAMES = ["m0", "m1"]


@pytest.fixture(autouse=True, scope="module")
def _float64_one_thread():
    # closed forms are compared in float64; the tensors are tiny (one thread avoids stalls on a shared machine)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


class DiagAffine(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = w, b

    def forward(self, z):
        return self.w * z + self.b


class LikelihoodExpert(nn.Module):
    """q_m(z | x^m) ∝ p(x^m | z): mean (x − b)/w, variance s²/w²; plus a fixed perturbation."""

    def __init__(self, w, b, s, dmu=0.0, dlogvar=0.0):
        super().__init__()
        self.w, self.b, self.dmu = w, b, dmu
        self.logvar = 2 * math.log(s) - torch.log(w**2) + dlogvar

    def forward(self, x):
        mu = (x - self.b) / self.w + self.dmu
        return mu, self.logvar.expand_as(mu)


class ExactConditionalEps(nn.Module):
    """ε*(x_t, z, t) = σ_t (x_t − α_t (w z + b)) / (α_t² s² + σ_t²), the exact predictor of p(x | z) = N(w z + b, s²)."""

    def __init__(self, w, b, s, sde):
        super().__init__()
        self.w, self.b, self.s, self.sde = w, b, float(s), sde

    def forward(self, x_t, z, t):
        a, s2 = self.sde.alpha(t)[:, None], self.sde.sigma2(t)[:, None]
        return s2.sqrt() * (x_t - a * (self.w * z + self.b)) / (a**2 * self.s**2 + s2)


class CorrelatedGaussianEps(nn.Module):
    """The exact ε of data N(0, Σ): ε* = σ_t (α_t² Σ + σ_t² I)⁻¹ x_t (a non-diagonal Jacobian)."""

    def __init__(self, cov, sde):
        super().__init__()
        self.cov, self.sde = cov, sde

    def forward(self, x_t, z, t):
        a2, s2 = self.sde.alpha(t) ** 2, self.sde.sigma2(t)
        v = a2[:, None, None] * self.cov + s2[:, None, None] * torch.eye(len(self.cov))
        return s2.sqrt()[:, None] * torch.linalg.solve(v, x_t.unsqueeze(-1)).squeeze(-1)


def linear_vae(fusion="poe", prior_expert="every", dmu=0.0, dlogvar=0.0, diffusion=None, **kwargs):
    mods = []
    for m, name in enumerate(NAMES):
        decoder = FeedForwardDecoder(DiagAffine(W[m], BIAS[m]), (D,), "normal", scale=float(S[m]))
        if m == diffusion:  # trained with the unweighted eps-MSE: the bound must not use that weighting
            decoder = DiffusionDecoder(ExactConditionalEps(W[m], BIAS[m], S[m], VPSDE()), (D,), weighting="simple")
        mods.append(Modality(name, LikelihoodExpert(W[m], BIAS[m], float(S[m]), dmu, dlogvar), decoder))
    return MultimodalVAE(mods, D, fusion=fusion, prior_expert=prior_expert, **kwargs)


def log_marginal(x, names):
    """log p(x_O) = log N(x_O; b_O, W_O W_Oᵀ + diag s²)."""
    idx = [NAMES.index(n) for n in names]
    W_O = torch.cat([torch.diag(W[m]) for m in idx])
    cov = W_O @ W_O.T + torch.diag(torch.cat([S[m].expand(D) ** 2 for m in idx]))
    mean = torch.cat([BIAS[m] for m in idx])
    return torch.distributions.MultivariateNormal(mean, cov).log_prob(torch.cat([x[n] for n in names], -1))


def linear_batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, D, generator=g)
    return {name: W[m] * z + BIAS[m] + S[m] * torch.randn(n, D, generator=g) for m, name in enumerate(NAMES)}


def repeated(x, n):
    return {k: v.repeat(n, 1) for k, v in x.items()}


# ------------------------------------------------------------------------ IWAE on closed forms
def test_the_exact_posterior_as_proposal_gives_log_p_x_with_zero_variance():
    """Catches: a wrong log-weight — the proposal's density left out or counted twice, the model's
    β / λ_m scales (β = 2, λ = 3 here) or a missing site entering the weights, the replay not using
    the proposal's z — and a conditional that is not log p(x₁, x₂) − log p(x₁); also the result's
    bookkeeping (nll, num_dims, bits_per_dim's convention)."""
    vae = linear_vae(beta=2.0)
    vae.modalities["m1"].weight = 3.0
    x = linear_batch(5)
    joint = log_likelihood(vae, x, num_samples=3)
    assert isinstance(joint, LogLikelihood) and joint.value.shape == (5,)
    assert torch.allclose(joint.value, log_marginal(x, NAMES), rtol=0, atol=1e-10)
    assert joint.stderr.max() < 1e-10 and joint.is_lower_bound and joint.converges and joint.num_dims == 4
    cond = log_likelihood(vae, x, given=["m0"], num_samples=3)
    assert torch.allclose(cond.value, log_marginal(x, NAMES) - log_marginal(x, ["m0"]), rtol=0, atol=1e-10)
    assert not cond.is_lower_bound and cond.converges and cond.num_dims == 2 and cond.targets == ("m1",)
    assert "ratio of two estimates" in cond.estimator
    assert torch.equal(cond.nll, -cond.value)
    assert torch.allclose(cond.bits_per_dim(), bits_per_dim(-cond.value, 2, 127.5))


def test_the_joint_estimate_increases_with_k_and_reaches_the_closed_form():
    """Catches: an estimator that is not the IWAE (a mean of log-weights does not improve with K; a
    wrong normalisation log K shifts every K differently) and a standard error that misstates the
    Monte Carlo error at large K; also particle chunks (the last one shorter) combined wrongly."""
    vae = linear_vae(fusion="mopoe", prior_expert="full", dmu=0.3, dlogvar=0.5)
    x = linear_batch(1)
    truth = float(log_marginal(x, NAMES))
    torch.manual_seed(1)
    means = []
    for K in (1, 4, 64):
        values = log_likelihood(vae, repeated(x, 400), num_samples=K).value
        means.append((float(values.mean()), float(values.std() / 20)))
    for (lo, se_lo), (hi, se_hi) in zip(means, means[1:]):
        assert hi - lo > 3 * math.hypot(se_lo, se_hi)
    assert means[-1][0] < truth + 3 * means[-1][1]
    x = linear_batch(6, seed=3)
    big = log_likelihood(vae, x, num_samples=20_000, chunk_size=6_000)
    assert ((big.value - log_marginal(x, NAMES)).abs() < 4 * big.stderr + 1e-3).all(), (big.value - log_marginal(x, NAMES), big.stderr)
    assert (big.stderr < 0.05).all()


def test_the_conditional_estimate_reaches_log_p_x2_given_x1():
    """Catches: the conditional taken as log E_{q(z|x₁)}[p(x₂|z)] (right only when q(z|x₁) is the exact
    posterior; with MoPoE's prior-free singleton product and a perturbed expert it is not), or a
    denominator log p^(x₁) that scores other modalities than the given ones."""
    vae = linear_vae(fusion="mopoe", prior_expert="full", dmu=-0.2, dlogvar=0.4)
    x = linear_batch(6, seed=4)
    est = log_likelihood(vae, x, given="m1", targets=["m0"], num_samples=20_000)
    truth = log_marginal(x, NAMES) - log_marginal(x, ["m1"])
    assert ((est.value - truth).abs() < 4 * est.stderr + 1e-3).all(), (est.value - truth, est.stderr)


def test_mmvae_uses_the_mixture_proposal_and_reaches_the_closed_form():
    """Catches: MMVAE scored with a PoE proposal (not the conditional it was trained with) or with the
    log-density of one component instead of the mixture's logsumexp − log M (either converges to a
    wrong value, or is refused nowhere)."""
    vae = linear_vae(fusion="moe", prior_expert="none", dlogvar=0.3)
    bind_objective(vae, MMVAE())
    x = linear_batch(6, seed=5)
    est = log_likelihood(vae, x, num_samples=20_000)
    assert "mixture of experts" in est.estimator
    assert ((est.value - log_marginal(x, NAMES)).abs() < 4 * est.stderr + 1e-3).all(), (est.value - log_marginal(x, NAMES), est.stderr)


def test_mmvae_plus_private_latents_are_importance_sampled():
    """Catches: MMVAE+ decoders scored with w drawn inside the decoder (not a site of the program, no
    p(w)/q(w|x) in the weight), a private latent of a modality outside the scored set left in, or
    the private posterior not used: on x_m = A_m z + C_m w_m + b_m + s_m ξ the joint and the
    conditional reach their Gaussian closed forms."""
    g = torch.Generator().manual_seed(7)
    A, C, b = torch.randn(2, 2, 1, generator=g), torch.randn(2, 2, 1, generator=g), torch.randn(2, 2, generator=g)
    s = torch.tensor([0.5, 0.7])

    class Linear(nn.Module):
        """u -> u Mᵀ + c, or (mean, log-variance) of a Gaussian regression with variance ``var``."""

        def __init__(self, M, c, var=None):
            super().__init__()
            self.M, self.c, self.var = M, c, var

        def forward(self, u):
            out = u @ self.M.T + self.c
            return out if self.var is None else (out, torch.log(self.var).expand_as(out))

    def regression(L, m):
        """q(· | x_m): the exact posterior of the latent with loading L given x_m alone, variance × 1.5."""
        gain = L.T @ torch.linalg.inv(A[m] @ A[m].T + C[m] @ C[m].T + s[m] ** 2 * torch.eye(2))
        return Linear(gain, -gain @ b[m], 1.5 * (1 - gain @ L).diagonal())

    mods = [Modality(n, SharedPrivateEncoder(regression(A[m], m), regression(C[m], m)),
                     PrivateLatentDecoder(FeedForwardDecoder(Linear(torch.cat([A[m], C[m]], 1), b[m]), (2,), "normal", scale=float(s[m])), 1, 1))
            for m, n in enumerate(NAMES)]
    vae = MultimodalVAE(mods, 1)
    bind_objective(vae, MMVAEPlus())

    def logp(x, idx):
        cov = (torch.cat([A[m] for m in idx]) @ torch.cat([A[m] for m in idx]).T + torch.block_diag(*[C[m] @ C[m].T for m in idx])
               + torch.diag(torch.cat([s[m].expand(2) ** 2 for m in idx])))
        return torch.distributions.MultivariateNormal(torch.cat([b[m] for m in idx]), cov).log_prob(torch.cat([x[NAMES[m]] for m in idx], -1))

    z, w = torch.randn(4, 1, generator=g), torch.randn(2, 4, 1, generator=g)
    x = {n: z @ A[m].T + w[m] @ C[m].T + b[m] + s[m] * torch.randn(4, 2, generator=g) for m, n in enumerate(NAMES)}
    joint = log_likelihood(vae, x, num_samples=20_000)
    cond = log_likelihood(vae, x, given=["m0"], num_samples=20_000)
    assert "q(w_m0 | x_m0) q(w_m1 | x_m1)" in joint.estimator
    assert ((joint.value - logp(x, [0, 1])).abs() < 4 * joint.stderr + 1e-3).all(), (joint.value - logp(x, [0, 1]), joint.stderr)
    truth = logp(x, [0, 1]) - logp(x, [0])
    assert ((cond.value - truth).abs() < 4 * cond.stderr + 1e-3).all(), (cond.value - truth, cond.stderr)


# ------------------------------------------------------------------- the diffusion decoder terms
def test_ode_log_likelihood_of_the_exact_predictor_is_the_gaussian_closed_form(sde):
    """Catches: a wrong probability-flow drift (sign, the ½ of g²), a divergence integrated the wrong
    way (ε → T), the prior at T or the time interval wrong: for data N(μ, s²I) the flow is linear,
    x_T = α_T μ + √(v_T/v_ε)(x − α_ε μ) with v_t = α_t² s² + σ_t², so the ODE model's density is
    log π(x_T) + (d/2) log(v_T/v_ε) exactly, and that is log N(x; μ, s²) up to π ≠ p_T (α_T μ ≈ 0.003)."""
    mu, var = 0.5, 0.3
    x = mu + math.sqrt(var) * torch.randn(8, 3)
    got = ode_log_likelihood(GaussianEpsPredictor(sde, mean=mu, var=var), x, None, sde, divergence="exact")
    v = lambda t: sde.alpha(torch.tensor(t)) ** 2 * var + sde.sigma2(torch.tensor(t))  # noqa: E731
    x_T = sde.alpha(torch.tensor(sde.T)) * mu + torch.sqrt(v(sde.T) / v(sde.eps)) * (x - sde.alpha(torch.tensor(sde.eps)) * mu)
    flow = sde.prior_log_prob(x_T, 1) + 1.5 * torch.log(v(sde.T) / v(sde.eps))
    assert torch.allclose(got.value, flow, rtol=0, atol=2e-4)
    assert torch.allclose(got.value, -gaussian_nll(x, mu, var), rtol=0, atol=0.03)
    assert torch.equal(got.stderr, torch.zeros(8)) and got.draws.shape == (1, 8)


def test_hutchinson_is_unbiased_within_its_standard_error(sde):
    """Catches: probes redrawn along the trajectory or not Rademacher, a wrong mean over probes, or a
    standard error that does not describe the probes' spread: on a correlated Gaussian (non-diagonal
    Jacobian, so vᵀJv ≠ tr J) Hutchinson agrees with the exact trace within 4 SE, and its SE is not zero."""
    cov = torch.tensor([[1.0, 0.6, 0.2], [0.6, 0.8, -0.3], [0.2, -0.3, 0.5]])
    net = CorrelatedGaussianEps(cov, sde)
    x = torch.distributions.MultivariateNormal(torch.zeros(3), cov).sample((6,))
    exact = ode_log_likelihood(net, x, None, sde, divergence="exact")
    assert torch.allclose(exact.value, torch.distributions.MultivariateNormal(torch.zeros(3), cov).log_prob(x), rtol=0, atol=2e-3)
    hutch = ode_log_likelihood(net, x, None, sde, divergence="hutchinson", num_probes=64, generator=torch.Generator().manual_seed(0))
    assert (hutch.stderr > 1e-3).all() and hutch.draws.shape == (64, 6)
    assert ((hutch.value - exact.value).abs() < 4 * hutch.stderr).all(), (hutch.value - exact.value, hutch.stderr)


def test_the_likelihood_weighted_bound_is_below_the_ode_log_likelihood(sde):
    """Catches: the bound's constants dropped or mis-signed, or the bound taken with the decoder's
    training weighting: with the exact predictor the λ = g² bound with constants is, in expectation,
    at most the exact log-density (and within a few hundredths of a nat of it)."""
    x = 0.2 + math.sqrt(0.5) * torch.randn(4, 3)
    net = GaussianEpsPredictor(sde, mean=0.2, var=0.5)
    ode = ode_log_likelihood(net, x, None, sde, divergence="exact").value
    draws = -diffusion_nll(net, x, None, num_draws=4096, dequantize=False, sde=sde, reduce=False)
    mean, se = draws.mean(0), draws.std(0) / 64
    assert (mean < ode + 4 * se).all() and (mean > ode - 4 * se - 0.05).all(), (mean - ode, se)


def test_log_likelihood_with_a_diffusion_decoder(sde):
    """Catches: a diffusion decoder scored by its training weighting ("simple", not a bound), the
    ODE not conditioned on the particle's z, and — for the bound — independent (t, ε) draws per
    particle, whose noise the log-mean-exp turns into a bias of several nats *above* log p(x), or a
    standard error blind to the noise the particles share."""
    vae = linear_vae(diffusion=0)
    x = linear_batch(3, seed=8)
    truth = log_marginal(x, NAMES)
    ode = log_likelihood(vae, x, num_samples=4, decoder_likelihood="ode")
    assert ode.is_lower_bound and ode.converges and "exact divergence" in ode.estimator
    assert torch.allclose(ode.value, truth, rtol=0, atol=0.05)
    torch.manual_seed(3)
    bound = log_likelihood(vae, repeated(x, 60), num_samples=32, decoder_likelihood="bound", num_draws=16)
    assert bound.is_lower_bound and not bound.converges and "(lambda = g^2) bound" in bound.estimator
    gap = (bound.value - truth.repeat(60)).reshape(60, 3)
    mean, se = gap.mean(0), gap.std(0) / math.sqrt(60)
    assert (mean < 4 * se).all() and (mean > -4 * se - 0.5).all(), (mean, se)
    assert ((bound.stderr.reshape(60, 3).mean(0) / gap.std(0)) - 1).abs().max() < 0.5  # the SE covers the shared draws' noise


def test_the_noise_bias_estimate_is_its_second_order_value():
    """Catches: a wrong second-order correction of the decoder noise inside the log-mean-exp (a wrong
    normalisation, or one that charges common noise): for equal weights and independent draws of
    variance σ² it is ½σ²/J (1 − 1/K) in expectation, for noise common to all particles exactly 0."""
    from pyro_diffmvae.loglik import _noise_bias

    J, K, B, sigma = 8, 4, 20_000, 3.0
    log_w = torch.zeros(K, B)
    independent = sigma * torch.randn(J, K, B)
    expected = 0.5 * sigma**2 / J * (1 - 1 / K)
    assert abs(float(_noise_bias(log_w, [independent]).mean()) - expected) < 0.02 * expected
    common = (sigma * torch.randn(J, 1, B)).expand(J, K, B)
    assert float(_noise_bias(log_w + torch.randn(K, B), [common + 5.0]).abs().max()) < 1e-12


def test_latent_score_prior_log_prob_and_prior_score(sde):
    """Catches: LatentScorePrior.log_prob not the ODE density (for the exact ε of N(0, I), ε̂ = σ_t z_t,
    the flow is the identity and log p = log N(z; 0, I)), and prior="score" not replacing log N(z; 0, I)
    in the weights (with that prior the estimate is again exactly log p(x))."""
    class StandardNormalEps(nn.Module):
        def forward(self, z_t, cond, t):
            return sde.sigma(t)[:, None] * z_t

    prior = LatentScorePrior(D, eps_net=StandardNormalEps(), sde=sde)
    z = torch.randn(5, D)
    assert torch.allclose(prior.log_prob(z), -gaussian_nll(z, 0.0, 1.0), rtol=0, atol=1e-6)
    wide = LatentScorePrior(D, eps_net=GaussianEpsPredictor(sde, var=2.0), sde=sde)
    assert torch.allclose(wide.log_prob(z), -gaussian_nll(z, 0.0, 2.0), rtol=0, atol=2e-3)
    vae = linear_vae()
    x = linear_batch(3, seed=9)
    vae.latent_prior = prior
    score = log_likelihood(vae, x, given=["m0"], num_samples=2, prior="score")
    assert "latent score prior" in score.estimator
    assert torch.allclose(score.value, log_marginal(x, NAMES) - log_marginal(x, ["m0"]), rtol=0, atol=1e-5)
    vae.latent_prior = wide  # a different prior must change the estimate
    assert (log_likelihood(vae, x, num_samples=2, prior="score").value - log_marginal(x, NAMES)).abs().min() > 0.05


# ------------------------------------------------------------------------------ bad input, layout
@pytest.mark.parametrize("kwargs, batch_edit, match", [
    (dict(decoder_likelihood="exact"), None, r"unknown decoder_likelihood 'exact'; known: \['bound', 'ode'\]"),
    (dict(prior="flow"), None, r"unknown prior 'flow'; known: \['normal', 'score'\]"),
    (dict(prior="score"), None, "prior='score' needs a fitted latent prior"),
    (dict(num_samples=0), None, "num_samples must be a positive int, got 0"),
    (dict(divergence="trace"), None, r"unknown divergence 'trace'; known: \['auto', 'exact', 'hutchinson'\]"),
    (dict(given=["m2"]), None, r"given names unknown modalities \['m2'\]"),
    (dict(given=["m0"], targets=["m0", "m1"]), None, r"targets \['m0'\] are also given"),
    (dict(given=["m0", "m1"]), None, "no targets to score: every modality is given"),
    (dict(), "drop", "target modality 'm1' is missing from the batch"),
    (dict(given="m1"), "unavailable", r"given modality 'm1' is unavailable for examples \[1\]"),
])
def test_bad_input_is_refused_with_a_clear_error(kwargs, batch_edit, match):
    """Catches: a misspelt option silently falling back to a default, a modality scored that is not
    in the batch (its zero placeholder would be scored as data), conditioning on a modality twice."""
    batch = linear_batch(3)
    if batch_edit == "drop":
        del batch["m1"]
    elif batch_edit == "unavailable":
        batch["available"] = {"m1": torch.tensor([True, False, True])}
    with pytest.raises(ValueError, match=match):
        log_likelihood(linear_vae(), batch, **kwargs)


def test_two_stage_models_are_refused():
    """Catches: a two-stage model (no shared z, a flat prior for MLD) scored as if it had one."""
    mods = [Modality(n, LikelihoodExpert(W[m], BIAS[m], float(S[m])), FeedForwardDecoder(DiagAffine(W[m], BIAS[m]), (D,), "normal"))
            for m, n in enumerate(NAMES)]
    with pytest.raises(NotImplementedError, match="two-stage models .*no shared latent z"):
        log_likelihood(TwoStageVAE(mods, D), linear_batch(2))


def test_the_package_exports_the_function_and_the_module_still_imports():
    """Catches: ``pyro_diffmvae.log_likelihood`` shadowed by (or shadowing) a module of the same name."""
    import importlib

    module = importlib.import_module("pyro_diffmvae.loglik")
    assert pyro_diffmvae.log_likelihood is module.log_likelihood and callable(pyro_diffmvae.log_likelihood)
    assert pyro_diffmvae.LogLikelihood is LogLikelihood
