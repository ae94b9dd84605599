"""KL warm-up (pyro_diffmvae.training.kl_warmup) against hand-computed schedules."""

from types import SimpleNamespace

import pytest

from pyro_diffmvae.training.kl_warmup import KLWarmup


def _module(vae_beta=2.5, objective_beta=None):
    return SimpleNamespace(vae=SimpleNamespace(beta=vae_beta), objective=SimpleNamespace(beta=objective_beta))


def test_beta_grows_linearly_and_validation_and_the_end_use_the_full_beta():
    # K = 4, β = 2.5: steps 0, 1, 2, 3, 10 -> 0.625, 1.25, 1.875, 2.5, 2.5. Catches an off-by-one (β = 0 at
    # step 0 would fail Pyro's positive-scale check), a schedule that overshoots, validation scored at the
    # warm-up β (best.ckpt would prefer early steps), or a β left scaled after training.
    warm, module = KLWarmup(4), _module()
    seen = []
    for step in (0, 1, 2, 3, 10):
        warm.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        seen.append(module.vae.beta)
    assert seen == pytest.approx([0.625, 1.25, 1.875, 2.5, 2.5])
    warm.on_train_batch_start(SimpleNamespace(global_step=1), module, None, 0)
    warm.on_validation_start(None, module)
    assert module.vae.beta == 2.5
    warm.on_validation_end(SimpleNamespace(global_step=1), module)
    assert module.vae.beta == pytest.approx(1.25)
    warm.on_train_end(None, module)
    assert module.vae.beta == 2.5


def test_an_objective_with_its_own_beta_is_scaled_too_and_restored_on_failure():
    warm, module = KLWarmup(10), _module(vae_beta=1.0, objective_beta=2.0)
    warm.on_train_batch_start(SimpleNamespace(global_step=4), module, None, 0)
    assert (module.vae.beta, module.objective.beta) == pytest.approx((0.5, 1.0))
    warm.on_exception(None, module, RuntimeError("boom"))
    assert (module.vae.beta, module.objective.beta) == (1.0, 2.0)
    with pytest.raises(ValueError, match="KL warm-up steps must be a positive int, got 0"):
        KLWarmup(0)
