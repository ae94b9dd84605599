"""The multimodal model/guide pair on a linear-Gaussian model where everything is closed form."""

import math

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch import nn

from pyro_diffmvae.fusion import poe, subset_family
from pyro_diffmvae.likelihoods import ScoreMatchingLikelihood
from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.objectives import elbo_terms

D = 2
W = {"a": torch.tensor([1.5, -0.7]), "b": torch.tensor([0.4, 2.0]), "c": torch.tensor([-1.0, 1.0])}
BIAS = {"a": torch.tensor([0.3, 0.0]), "b": torch.tensor([-1.0, 0.5]), "c": torch.tensor([0.0, 0.0])}
S = {"a": 0.5, "b": 0.8, "c": 0.3}


class DiagLinear(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w.clone()), nn.Parameter(b.clone())

    def forward(self, z):
        return z * self.w + self.b


class ExactExpert(nn.Module):
    """q_m(z | x^m) ∝ p(x^m | z) for x^m = w ⊙ z + b + s·noise: N((x − b)/w, s²/w²); ``shift`` perturbs it."""

    def __init__(self, w, b, s, shift=0.0):
        super().__init__()
        self.w, self.b, self.s = nn.Parameter(w.clone()), b, s
        self.shift = shift

    def forward(self, x):
        mu = (x - self.b) / self.w + self.shift
        return mu, torch.log(self.s**2 / self.w**2).expand_as(mu)


def make_vae(names=("a", "b", "c"), shift=0.0, **kwargs):
    mods = [
        Modality(n, ExactExpert(W[n], BIAS[n], S[n], shift), FeedForwardDecoder(DiagLinear(W[n], BIAS[n]), (D,), "normal", scale=S[n]))
        for n in names
    ]
    return MultimodalVAE(mods, D, **kwargs)


def sample_data(n, names=("a", "b", "c")):
    z = torch.randn(n, D)
    return {m: z * W[m] + BIAS[m] + S[m] * torch.randn(n, D) for m in names}


def log_marginal(x, names):
    """log p(x_names): per latent dim j, the vector (x^m_j)_m ~ N(b_j, w_j w_jᵀ + diag(s²))."""
    total = 0.0
    for j in range(D):
        w = torch.stack([W[m][j] for m in names])
        cov = torch.outer(w, w) + torch.diag(torch.tensor([S[m] ** 2 for m in names]))
        mean = torch.stack([BIAS[m][j] for m in names])
        xj = torch.stack([x[m][..., j] for m in names], -1)
        total = total + torch.distributions.MultivariateNormal(mean, cov).log_prob(xj)
    return total


def closed_form_elbo(x, q_mu, q_var, names):
    """E_q[Σ_m log p(x^m|z)] − KL(q ‖ N(0, I)) for diagonal Gaussian q, per example."""
    ell = 0.0
    for m in names:
        resid = x[m] - (q_mu * W[m] + BIAS[m])
        ell = ell + (-0.5 * math.log(2 * math.pi * S[m] ** 2) - (resid**2 + W[m] ** 2 * q_var) / (2 * S[m] ** 2)).sum(-1)
    kl = 0.5 * (q_var + q_mu**2 - 1 - q_var.log()).sum(-1)
    return ell - kl


def subset_posterior(x, subset, shift=0.0, prior=None):
    """PoE of the exact experts of ``subset``; the prior expert only in the product of all three
    modalities (MoPoE as published, and PoE over the full set) unless ``prior`` says otherwise."""
    prior = len(set(subset)) == 3 if prior is None else prior
    mu = torch.stack([(x[m] - BIAS[m]) / W[m] + shift for m in subset], -2)
    lv = torch.stack([torch.log(S[m] ** 2 / W[m] ** 2).expand_as(x[m]) for m in subset], -2)
    m, lv = poe(mu, lv, prior_expert=prior)
    return m, lv.exp()


def test_elbo_equals_log_marginal_at_exact_posterior():
    # fusion="poe" with exact likelihood experts: PoE with the prior is the exact posterior, so
    # log p(x, z) − log q(z) = log p(x) for every draw (Trace_ELBO has no analytic-KL noise).
    vae = make_vae(fusion="poe")
    x = sample_data(5)
    for _ in range(3):
        elbo = -Trace_ELBO(max_plate_nesting=2).loss(vae.model, vae.guide, x)
        assert elbo == pytest.approx(log_marginal(x, "abc").sum().item(), rel=1e-5)


def test_elbo_strictly_below_for_other_encoders():
    vae = make_vae(fusion="poe", shift=0.4)
    x1 = sample_data(1)
    copies = {m: v.expand(20_000, D) for m, v in x1.items()}
    per_example = -TraceMeanField_ELBO(max_plate_nesting=2).loss(vae.model, vae.guide, copies) / 20_000
    mu, var = subset_posterior(x1, "abc", shift=0.4)
    closed = closed_form_elbo(x1, mu, var, "abc").item()
    assert per_example == pytest.approx(closed, abs=0.02)
    assert closed < log_marginal(x1, "abc").item() - 0.1


def test_enumerate_equals_hand_written_weighted_sum_with_same_draws():
    vae = make_vae(fusion="mopoe", subset_strategy="enumerate")
    x = sample_data(4)
    torch.manual_seed(3)
    loss = TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, x)
    # by hand: the guide draws eps of shape (K, B, D) once; per subset, E-term with that draw and analytic KL
    torch.manual_seed(3)
    fam = subset_family(["a", "b", "c"], "all")
    eps = torch.randn(fam.shape[0], 4, D)
    total = 0.0
    for k, row in enumerate(fam.tolist()):
        names = [n for n, keep in zip("abc", row) if keep]
        mu, var = subset_posterior(x, names)
        z = mu + var.sqrt() * eps[k]
        ll = sum(torch.distributions.Normal(z * W[m] + BIAS[m], S[m]).log_prob(x[m]).sum(-1) for m in "abc")
        kl = 0.5 * (var + mu**2 - 1 - var.log()).sum(-1)
        total = total + ((ll - kl) / fam.shape[0]).sum()
    torch.testing.assert_close(-loss, total, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("strategy", ["sample", "enumerate"])
def test_strategies_agree_with_closed_form_in_expectation(strategy):
    vae = make_vae(fusion="mopoe", subset_strategy=strategy)
    x1 = sample_data(1)
    fam = subset_family(["a", "b", "c"], "all")
    closed = 0.0
    for row in fam.tolist():
        names = [n for n, keep in zip("abc", row) if keep]
        mu, var = subset_posterior(x1, names)
        closed += closed_form_elbo(x1, mu, var, "abc").item() / fam.shape[0]
    n, reps = 2000, 20
    copies = {m: v.expand(n, D) for m, v in x1.items()}
    means = torch.tensor([-TraceMeanField_ELBO(max_plate_nesting=2).loss(vae.model, vae.guide, copies) / n for _ in range(reps)])
    se = means.std() / math.sqrt(reps)
    assert abs(means.mean().item() - closed) < 4 * se + 1e-3
    # the subset ELBO is strictly below log p(x) even with exact experts (gap = Σ ω_A KL(p(z|x_A)‖p(z|x)))
    assert closed < log_marginal(x1, "abc").item() - 0.05


def test_missing_modality_uses_only_observed_subsets():
    vae = make_vae(fusion="mopoe", subset_strategy="sample")
    x = sample_data(3)
    x["b"] = x["b"].clone()
    x["b"][1] = float("nan")  # unavailable rows may hold anything
    x["c"] = x["c"].clone()
    x["c"][1] = float("nan")
    available = {"b": torch.tensor([True, False, True]), "c": torch.tensor([True, False, True])}
    batch = dict(x, available=available)
    w = vae.subset_weights(vae.parse_batch(batch)[1])
    assert w[1].tolist() == [1.0, 0, 0, 0, 0, 0, 0]  # only {a}
    for _ in range(5):
        guide_trace = poutine.trace(vae.guide).get_trace(batch)
        q = guide_trace.nodes["z"]["fn"].base_dist
        assert guide_trace.nodes["z"]["infer"]["subset_index"][1].item() == 0  # the subset {a}
        mu, var = subset_posterior({"a": x["a"][1:2]}, "a")
        torch.testing.assert_close(q.loc[1], mu[0])
        torch.testing.assert_close(q.scale[1] ** 2, var[0])
    loss = TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in vae.parameters() if p.grad is not None)


class TinyEps(nn.Module):
    def __init__(self, d, zd, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d + zd + 1, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, d))

    def forward(self, x_t, z, t):
        return self.net(torch.cat([x_t, z, t[:, None]], -1))


class MLPEncoder(nn.Module):
    def __init__(self, d, zd, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.SiLU(), nn.Linear(hidden, 2 * zd))

    def forward(self, x):
        h = self.net(x.flatten(1).float())
        return h.chunk(2, -1)


def test_diffusion_decoder_is_never_sampled_during_training(monkeypatch):
    def forbid(*a, **k):
        raise AssertionError("ScoreMatchingLikelihood.sample() called during a training step")

    monkeypatch.setattr(ScoreMatchingLikelihood, "sample", forbid)
    mods = [
        Modality("img", MLPEncoder(6, 3), DiffusionDecoder(TinyEps(6, 3), (6,), weighting="simple")),
        Modality("attr", MLPEncoder(4, 3), FeedForwardDecoder(nn.Linear(3, 4), (4,), "bernoulli")),
    ]
    for strategy in ["sample", "enumerate"]:
        vae = MultimodalVAE(mods, 3, subset_strategy=strategy)
        batch = {"img": torch.randn(5, 6), "attr": torch.randint(0, 2, (5, 4)).float(),
                 "available": {"img": torch.tensor([True, False, False, True, False])}}
        TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, batch).backward()
        # the image modality absent from the whole batch: its site is skipped
        TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, {"attr": batch["attr"]}).backward()


def test_beta_and_likelihood_weights_show_in_trace():
    mods = [
        Modality("a", ExactExpert(W["a"], BIAS["a"], S["a"]), FeedForwardDecoder(DiagLinear(W["a"], BIAS["a"]), (D,), "normal", scale=S["a"]), weight=2.5),
        Modality("b", ExactExpert(W["b"], BIAS["b"], S["b"]), FeedForwardDecoder(DiagLinear(W["b"], BIAS["b"]), (D,), "normal", scale=S["b"])),
    ]
    vae = MultimodalVAE(mods, D, beta=0.25)
    x = sample_data(3, "ab")
    guide_trace = poutine.trace(vae.guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(x)
    assert model_trace.nodes["z"]["scale"] == 0.25 and guide_trace.nodes["z"]["scale"] == 0.25
    assert model_trace.nodes["x_a"]["scale"] == 2.5 and model_trace.nodes["x_b"]["scale"] == 1.0
    # elbo_terms matches the loss: Σ λ_m loglik − β KL
    torch.manual_seed(4)
    loss = TraceMeanField_ELBO(max_plate_nesting=2).loss(vae.model, vae.guide, x)
    torch.manual_seed(4)
    terms = elbo_terms(vae, x)
    assert -loss / 3 == pytest.approx(terms["elbo"].item(), rel=1e-5)
    assert terms["elbo"].item() == pytest.approx((terms["loglik/a"] + terms["loglik/b"] - 0.25 * terms["kl"]).item(), rel=1e-5)


def test_posterior_generate_reconstruct_sample():
    vae = make_vae()
    x = sample_data(4)
    q = vae.posterior(x, given=["b"])
    mu, var = subset_posterior(x, "b")
    torch.testing.assert_close(q.mean, mu)
    torch.testing.assert_close(q.variance, var)
    out = vae.generate(x, given=["a"], use_mean=True)
    assert set(out) == {"b", "c"}
    mu_a, _ = subset_posterior(x, "a")
    torch.testing.assert_close(out["b"], mu_a * W["b"] + BIAS["b"])
    rec = vae.reconstruct(x)
    assert set(rec) == {"a", "b", "c"} and rec["a"].shape == (4, D)
    s = vae.sample(7)
    assert s["c"].shape == (7, D)
    with pytest.raises(ValueError, match="needs a fitted latent prior"):
        vae.sample(2, prior="score")
    with pytest.raises(ValueError, match="unknown prior"):
        vae.sample(2, prior="uniform")


class LowPrecisionExpert(nn.Module):
    """An expert whose outputs are bf16, as an encoder's are under autocast."""

    def __init__(self, expert):
        super().__init__()
        self.expert = expert

    def forward(self, x):
        return tuple(t.to(torch.bfloat16) for t in self.expert(x))


def test_latents_are_computed_in_at_least_float32():
    """bf16 expert outputs are fused and z drawn in float32 (model prior too); float64 models stay float64."""
    x = sample_data(5)
    vae = make_vae()
    for m in vae.modalities.values():
        m.encoder = LowPrecisionExpert(m.encoder)
    mu, logvar = vae.experts(x, torch.ones(5, 3, dtype=torch.bool))
    assert mu.dtype == logvar.dtype == torch.float32
    guide = poutine.trace(vae.guide).get_trace(x)
    model = poutine.trace(poutine.replay(vae.model, trace=guide)).get_trace(x)
    assert guide.nodes["z"]["value"].dtype == guide.nodes["z"]["fn"].base_dist.loc.dtype == torch.float32
    assert model.nodes["z"]["fn"].base_dist.loc.dtype == torch.float32
    q = vae.posterior(x, given=["a", "c"])
    assert q.mean.dtype == torch.float32
    # the fusion of the bf16-rounded experts, computed in float32
    low = {n: tuple(t.to(torch.bfloat16).float() for t in vae.modalities[n].encoder.expert(x[n])) for n in "ac"}
    tau = sum(torch.exp(-low[n][1]) for n in "ac")  # MoPoE: no prior expert in a proper subset's product
    torch.testing.assert_close(q.mean, sum(torch.exp(-low[n][1]) * low[n][0] for n in "ac") / tau, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.variance, 1 / tau, rtol=1e-6, atol=1e-6)

    vae64 = make_vae().double()
    x64 = {n: v.double() for n, v in x.items()}
    guide = poutine.trace(vae64.guide).get_trace(x64)
    assert guide.nodes["z"]["value"].dtype == torch.float64
    q = vae64.posterior(x64, given=["b"])
    mean, var = subset_posterior(x64, "b")
    assert q.mean.dtype == torch.float64
    torch.testing.assert_close(q.mean, mean, rtol=1e-6, atol=1e-6)  # W, BIAS are float32 constants
    torch.testing.assert_close(q.variance, var, rtol=1e-6, atol=1e-6)


def test_bad_input_errors():
    vae = make_vae()
    x = sample_data(3)
    with pytest.raises(ValueError, match=r"unknown modality names \['d'\].*known modalities: \['a', 'b', 'c'\]"):
        vae.parse_batch(dict(x, d=torch.zeros(3, 2)))
    with pytest.raises(ValueError, match=r"modality 'a': expected shape \(batch, 2\), got \(3, 3\)"):
        vae.parse_batch(dict(x, a=torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="modality 'b': data must be floating point"):
        vae.parse_batch(dict(x, b=torch.zeros(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match="modality 'c': data contains non-finite"):
        vae.parse_batch(dict(x, c=torch.full((3, 2), float("nan"))))
    with pytest.raises(ValueError, match="disagree on the batch size"):
        vae.parse_batch(dict(x, c=torch.zeros(4, 2)))
    none = {m: torch.tensor([True, False, True]) for m in "abc"}
    with pytest.raises(ValueError, match=r"examples \[1\] of the batch have no modality"):
        vae.parse_batch(dict(x, available=none))
    with pytest.raises(ValueError, match=r"must be a bool tensor of shape \(3,\)"):
        vae.parse_batch(dict(x, available={"a": torch.ones(3)}))
    with pytest.raises(ValueError, match="unknown fusion"):
        make_vae(fusion="sum")
    with pytest.raises(ValueError, match="unknown subset_strategy"):
        make_vae(subset_strategy="all")
    with pytest.raises(ValueError, match="names must be unique"):
        MultimodalVAE([Modality("a", nn.Identity(), FeedForwardDecoder(nn.Identity(), (2,)))] * 2, 2)
    bern = Modality("m", MLPEncoder(2, 2), FeedForwardDecoder(nn.Linear(2, 2), (2,), "bernoulli"))
    with pytest.raises(ValueError, match=r"Bernoulli data must lie in \[0, 1\]"):
        MultimodalVAE([bern], 2).parse_batch({"m": torch.full((2, 2), 3.0)})


def test_custom_subset_weights_follow_default_dtype():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        vae = make_vae(subset_weights=[1, 2, 3, 1, 1, 1, 1], subset_strategy="enumerate")
        assert vae.base_subset_weights.dtype == torch.float64
        assert vae.base_subset_weights[0].item() == pytest.approx(0.1, abs=1e-15)
        x = {m: v.double() for m, v in sample_data(2).items()}
        torch.testing.assert_close(vae.subset_weights(x)[0], torch.tensor([1, 2, 3, 1, 1, 1, 1.0], dtype=torch.float64) / 10)
    finally:
        torch.set_default_dtype(old)
    with pytest.raises(ValueError, match="subset_weights must be 7 non-negative numbers"):
        make_vae(subset_weights=[1, 2])
