"""Free bits (pyro_diffmvae.objectives.free_bits) against the closed-form Gaussian KL computed by hand."""

import math

import pytest
import torch
from hydra import compose, initialize_config_module
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO

from pyro_diffmvae.builders import build_objective
from pyro_diffmvae.objectives import FreeBitsELBO, elbo_terms, latent_kl_per_dim, make_objective
from test_objectives import NAMES, X, make_batch, make_vae, poe_by_hand, q_shared  # the same toy experts

TOL = dict(rtol=1e-5, atol=1e-5)


def _full_batch(B=6):
    torch.manual_seed(0)
    return {n: torch.randn(B, X) for n in NAMES}


def _kl_by_hand(vae, batch):
    """(B, D) KL(q(z | x_b) || N(0, I)) per dimension, q the PoE of every expert and the prior expert:
    0.5 (mu^2 + sigma^2 - 1 - log sigma^2)."""
    mu, logvar = poe_by_hand([q_shared(vae, n, batch[n]) for n in NAMES], prior=True)
    return 0.5 * (mu**2 + logvar.exp() - 1 - logvar)


def _loss(objective, vae, batch, seed=3):
    torch.manual_seed(seed)
    return objective.loss(vae, batch)


def test_zero_free_bits_is_pyros_subset_elbo_with_the_subsets_enumerated():
    # λ = 0 must be the ELBO: the same value as Pyro's TraceMeanField_ELBO on the same draws, with subsets
    # enumerated (ω-scaled and ω>0-masked sites) and missing modalities. Catches a per-dimension KL that
    # drops the ω weights or the mask, keeps β inside the clamped KL, or a likelihood term scaled differently.
    vae = make_vae(fusion="mopoe", subset_strategy="enumerate")
    batch = make_batch()
    ours = _loss(make_objective("elbo_free_bits", nats_per_dim=0.0), vae, batch)
    torch.manual_seed(3)
    ref = TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, batch)
    torch.testing.assert_close(ours, ref, **TOL)
    # the per-dimension KLs add up to the ELBO's KL (elbo_terms: kl_divergence of the whole site, divided by β)
    guide_trace = poutine.trace(vae.guide).get_trace(batch)
    model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(batch)
    per_dim = latent_kl_per_dim(model_trace, guide_trace, vae.beta)["z"]
    assert per_dim.shape == (vae.latent_dim,)
    torch.manual_seed(5)
    kl = elbo_terms(vae, batch)["kl"] * 6
    torch.testing.assert_close(per_dim.sum(), kl, **TOL)


def test_the_kl_is_clamped_per_dimension_on_the_batch_mean():
    # β = 1.3, B = 6, D = 2, PoE with the prior expert: with λ between the two dimensions' batch-mean KLs,
    # -L_λ - (-L_0) = β B Σ_d (max(λ, k̄_d) - k̄_d), the closed-form KL by hand. Catches the clamp applied per
    # example (a larger value here), to the summed KL (one dimension would not be lifted alone), or to β·KL.
    vae, batch = make_vae(fusion="poe"), _full_batch()
    with torch.no_grad():
        k = _kl_by_hand(vae, batch)  # (B, D)
    mean = k.mean(0)
    lam = float(mean.mean())  # between the two dimensions
    assert mean.min() < lam < mean.max()
    expected = vae.beta * 6 * (torch.clamp(mean, min=lam) - mean).sum()
    per_example = vae.beta * (torch.clamp(k, min=lam) - k).sum()
    assert not torch.isclose(expected, per_example, rtol=1e-3)  # the two conventions differ on this batch
    gap = _loss(FreeBitsELBO(lam), vae, batch) - _loss(FreeBitsELBO(0.0), vae, batch)
    torch.testing.assert_close(gap, expected, **TOL)


def test_dimensions_below_the_free_bits_get_no_kl_gradient():
    # λ above every dimension's KL: the loss is -Σ loglik + β B D λ, so its gradient is the ELBO's minus the
    # KL's (the KL by hand, differentiable through the encoders). Catches a clamp that still passes the KL's
    # gradient (e.g. a straight-through max) or one that cuts the likelihood's gradient too.
    vae, batch = make_vae(fusion="poe"), _full_batch()
    params = [p for p in vae.parameters() if p.requires_grad]
    big = float(_kl_by_hand(vae, batch).mean(0).max().detach()) + 1.0
    g_big = torch.autograd.grad(_loss(FreeBitsELBO(big), vae, batch), params, allow_unused=True)
    loss0 = _loss(FreeBitsELBO(0.0), vae, batch)
    g_free = torch.autograd.grad(loss0 - vae.beta * _kl_by_hand(vae, batch).sum(), params, allow_unused=True)
    for a, b in zip(g_big, g_free):
        torch.testing.assert_close(torch.zeros(()) if a is None else a, torch.zeros(()) if b is None else b, **TOL)
    assert any(a is not None and a.abs().sum() > 0 for a in g_big)  # the likelihood's gradient is still there
    terms = FreeBitsELBO(big).terms(vae, batch)
    assert terms["kl_dims_below_free_bits"] == vae.latent_dim


@pytest.mark.parametrize("bad", [-0.1, math.nan, math.inf, "0.1", True, None])
def test_a_bad_free_bits_value_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=r"free bits: nats_per_dim must be a finite number >= 0, got"):
        FreeBitsELBO(bad)


def test_the_config_selects_free_bits_with_its_value():
    # model.objective=elbo_free_bits with model.objective_params.nats_per_dim: the objective a run trains.
    # Catches the parameter being dropped (λ = 0: plain ELBO under another name) and a missing λ passing.
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["model.objective=elbo_free_bits", "+model.objective_params.nats_per_dim=0.25"])
        objective = build_objective(cfg)
        assert isinstance(objective, FreeBitsELBO) and objective.nats_per_dim == 0.25
        with pytest.raises(TypeError, match=r"objective 'elbo_free_bits': bad hyperparameters \[\]"):
            build_objective(compose("config", overrides=["model.objective=elbo_free_bits"]))
