"""Diffusion warm-up (pyro_diffmvae.training.diffusion_warmup, ``trainer.diffusion_warmup_steps``): the diffusion
decoders' likelihood sites left out of the program for the first K steps, checked against the full ELBO of the
same draw, a hand-written schedule, and the ε-networks' call counts in a Lightning run."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch import nn

from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.objectives import ELBO, HintELBO, elbo_terms
from pyro_diffmvae.settings import check_settings
from pyro_diffmvae.training.diffusion_warmup import DiffusionWarmup, diffusion_modalities
from pyro_diffmvae.training.module import DiffMVAEModule

D, X = 2, 3
TOL = dict(rtol=1e-5, atol=1e-5)


class CountingEps(nn.Module):
    """ε̂([x_t, h], z, t) = A [x_t, h] + (1 + t) Σ_j z_j, counting its calls."""

    def __init__(self, in_features):
        super().__init__()
        self.lin = nn.Linear(in_features, X, bias=False)
        self.calls = 0

    def forward(self, x, z, t):
        self.calls += 1
        return self.lin(x) + (1.0 + t)[:, None] * z.sum(-1, keepdim=True)


class Split(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(X, 2 * D)

    def forward(self, x):
        return tuple(self.net(x).chunk(2, -1))


def make_vae(hint=True, feed_forward=True):
    """``a`` (diffusion, with a Laplace hint when ``hint``), ``b`` (diffusion, no hint) and, when ``feed_forward``,
    ``c`` (a feed-forward Normal decoder)."""
    torch.manual_seed(0)
    h = FeedForwardDecoder(nn.Linear(D, X), (X,), "laplace", scale=0.3, learn_scale=True) if hint else None
    mods = [Modality("a", Split(), DiffusionDecoder(CountingEps(2 * X if hint else X), (X,), hint=h)),
            Modality("b", Split(), DiffusionDecoder(CountingEps(X), (X,)))]
    if feed_forward:
        mods.append(Modality("c", Split(), FeedForwardDecoder(nn.Linear(D, X), (X,), "normal", scale=0.5)))
    return MultimodalVAE(mods, D, fusion="mopoe")


def make_batch(names="abc", B=6):
    torch.manual_seed(1)
    batch = {n: torch.randn(B, X).clamp(-1, 1) for n in names}
    batch["available"] = {n: torch.ones(B, dtype=torch.bool) for n in names}
    batch["available"]["a"][2] = False
    return batch


def counter(vae, name):
    """The CountingEps of a diffusion modality (inside the HintedEps wrapper where it has a hint)."""
    eps = vae.modalities[name].decoder.eps_net
    return getattr(eps, "net", eps)


def calls(vae):
    return [counter(vae, n).calls for n in "ab"]


def test_leaving_the_diffusion_sites_out_is_the_full_elbo_minus_their_terms_of_the_same_draw():
    # The same seed draws the same subsets and z; the feed-forward site and the KL are deterministic given z,
    # so ELBO_warm-up = ELBO - loglik_a - loglik_b exactly, with the KL and loglik_c unchanged, and neither
    # ε-network runs. Catches: a diffusion site still scored (or its network still run, the cost the warm-up
    # saves), another site dropped with it, or the KL changed.
    vae, batch = make_vae(), make_batch()
    torch.manual_seed(5)
    full = elbo_terms(vae, batch)
    before = calls(vae)
    vae.unscored = diffusion_modalities(vae)
    torch.manual_seed(5)
    warm = elbo_terms(vae, batch)
    assert calls(vae) == before and set(warm) == {"loglik/c", "kl", "elbo"}
    torch.testing.assert_close(warm["elbo"], full["elbo"] - full["loglik/a"] - full["loglik/b"], **TOL)
    torch.testing.assert_close(warm["kl"], full["kl"], **TOL)
    torch.testing.assert_close(warm["loglik/c"], full["loglik/c"], **TOL)
    # the hint term stays: HintELBO during warm-up = -(ELBO_warm-up) B - γ Σ hint log-likelihoods
    torch.manual_seed(5)
    terms = HintELBO(2.0).terms(vae, batch)
    torch.testing.assert_close(terms["loss"], -warm["elbo"] - 2.0 * terms["hint_loglik/a"], **TOL)


def _module(vae, objective=None):
    return SimpleNamespace(vae=vae, objective=objective if objective is not None else ELBO())


def test_the_sites_are_left_out_before_step_k_and_scored_in_validation_after_training_and_on_failure():
    # K = 3: steps 0, 1, 2 leave {a, b} out, step 3 and later score everything; validation always scores the
    # full objective and the warm-up resumes after it. Catches an off-by-one at K, best.ckpt chosen on the
    # warm-up objective, or a model left without its diffusion terms after training (evaluation, log-likelihoods).
    vae = make_vae()
    warm, module = DiffusionWarmup(3), _module(vae)
    seen = []
    for step in (0, 1, 2, 3, 9):
        warm.on_train_batch_start(SimpleNamespace(global_step=step), module, None, 0)
        seen.append(set(vae.unscored))
    assert seen == [{"a", "b"}, {"a", "b"}, {"a", "b"}, set(), set()]
    warm.on_train_batch_start(SimpleNamespace(global_step=1), module, None, 0)
    warm.on_validation_start(None, module)
    assert vae.unscored == frozenset()
    warm.on_validation_end(SimpleNamespace(global_step=1), module)
    assert vae.unscored == {"a", "b"}
    warm.on_exception(None, module, RuntimeError("boom"))
    assert vae.unscored == frozenset()


def test_a_warm_up_with_nothing_left_to_train_z_and_bad_step_counts_are_refused():
    # Only diffusion modalities and no hint term: the warm-up objective is the KL alone (z collapses). With a hint
    # trained by elbo_hint (γ > 0) it is accepted. A model without diffusion decoders has nothing to warm up.
    only_diffusion = make_vae(feed_forward=False)
    with pytest.raises(ValueError, match="the warm-up objective would be the KL alone"):
        DiffusionWarmup(2).on_train_batch_start(SimpleNamespace(global_step=0), _module(only_diffusion), None, 0)
    with pytest.raises(ValueError, match="the warm-up objective would be the KL alone"):
        DiffusionWarmup(2).on_train_batch_start(SimpleNamespace(global_step=0), _module(only_diffusion, HintELBO(0.0)),
                                                None, 0)
    DiffusionWarmup(2).on_train_batch_start(SimpleNamespace(global_step=0), _module(only_diffusion, HintELBO(1.0)), None, 0)
    assert only_diffusion.unscored == {"a", "b"}
    feed_forward_only = MultimodalVAE([Modality("c", Split(), FeedForwardDecoder(nn.Linear(D, X), (X,), "normal"))], D)
    with pytest.raises(ValueError, match="needs a model with diffusion decoders"):
        DiffusionWarmup(2).on_train_batch_start(SimpleNamespace(global_step=0), _module(feed_forward_only), None, 0)
    for bad in (0, -1, True, 2.0, "3"):
        with pytest.raises(ValueError, match="diffusion warm-up steps must be a positive int"):
            DiffusionWarmup(bad)


def test_in_a_lightning_run_the_diffusion_networks_train_only_from_step_k(tmp_path):
    # 5 steps with K = 2 (log_parts_every = 0, no validation): the ε-networks run in steps 2, 3, 4 only — one
    # call each per step — and their weights are unchanged by the warm-up steps, while the encoders train from
    # step 0. Catches a callback Lightning never calls, a warm-up that still runs the networks, or one that never ends.
    vae = make_vae()
    batch = make_batch()
    examples = [{**{n: batch[n][i] for n in "abc"}, "available": {n: batch["available"][n][i] for n in "abc"}}
                for i in range(6)]
    loader = torch.utils.data.DataLoader(examples, batch_size=6)
    module = DiffMVAEModule(vae, lr=1e-2, objective=HintELBO(1.0), seed=0, log_parts_every=0)
    unet_a0 = counter(vae, "a").lin.weight.detach().clone()
    encoder_a0 = vae.modalities["a"].encoder.net.weight.detach().clone()
    per_step = []

    class Count(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, b, i):
            per_step.append(calls(vae))
            if trainer.global_step == 2:  # after the last warm-up step
                torch.testing.assert_close(counter(vae, "a").lin.weight, unet_a0)
                assert not torch.equal(vae.modalities["a"].encoder.net.weight, encoder_a0)

    trainer = L.Trainer(max_steps=5, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[DiffusionWarmup(2), Count()])
    trainer.fit(module, loader)
    assert per_step == [[0, 0], [0, 0], [1, 1], [2, 2], [3, 3]]
    assert vae.unscored == frozenset()


def test_the_setting_is_checked():
    from hydra import compose, initialize_config_module
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["trainer.diffusion_warmup_steps=-1"])
    with pytest.raises(ValueError, match=r"trainer.diffusion_warmup_steps=-1: must be an integer >= 0"):
        check_settings(cfg, "train")
