"""The GPU path, checked on CPU: bf16 autocast keeps the ELBO's reductions in float32, channels-last
gives the same loss, a compiled ε-network gives the same output and the same checkpoint keys, and the
trainer keys (precision, channels_last, compile, accumulate_grad_batches) reach Lightning.

CPU autocast (``torch.autocast("cpu", dtype=torch.bfloat16)``) runs convolutions and linear layers in
bf16 as CUDA autocast does, so the dtype contract is the same; speed is measured by
``experiments/benchmarks/bench_throughput.py``, not here.
"""

import copy

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_module
from torch import nn

from pyro_diffmvae.builders import build_model
from pyro_diffmvae.likelihoods import ScoreMatchingLikelihood
from pyro_diffmvae.modality import FeedForwardDecoder
from pyro_diffmvae.nets.unet import ConditionalUNet
from pyro_diffmvae.train import (DiffMVAEModule, batch_to_channels_last, compile_eps_nets, diffusion_eps_nets,
                                 eps_nets_to_channels_last, make_trainer, uncompile_eps_nets)

# bf16 has an 8-bit significand (relative rounding 2^-9 ≈ 2e-3 per op). When these tests were written,
# bf16 autocast moved the per-example DSM loss of the small UNet below by at most 2e-4 relative (5 nets,
# both weightings) and the tiny model's negative ELBO by 3e-5; the tolerance leaves a wide margin.
BF16_RTOL = 1e-2


def redraw_zero_layers(net: nn.Module, std: float = 0.02) -> nn.Module:
    """The UNet's zero-initialised layers make its output exactly 0 (layout and precision would not
    matter); draw them at random so the comparisons mean something."""
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, std)
    return net


def small_unet(z_dim=8, image_size=16) -> ConditionalUNet:
    torch.manual_seed(0)
    return redraw_zero_layers(ConditionalUNet(in_channels=3, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                                              attention_resolutions=(8,), image_size=image_size, z_dim=z_dim))


class DtypeRecorder(nn.Module):
    """Calls ``net`` and records the dtype of its output."""

    def __init__(self, net):
        super().__init__()
        self.net, self.dtypes = net, []

    def forward(self, x_t, z, t):
        out = self.net(x_t, z, t)
        self.dtypes.append(out.dtype)
        return out


def tiny_cfg(*overrides, cache_dir=None):
    extra = [f"dataset.cache_dir={cache_dir}"] if cache_dir else []
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=["experiment=tiny", *extra, *overrides])


def tiny_vae():
    torch.manual_seed(0)
    vae = build_model(tiny_cfg())
    for net in diffusion_eps_nets(vae).values():
        redraw_zero_layers(net)
    return vae


def tiny_batch(B=6, S=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
            "mask": (torch.rand(B, 1, S, S, generator=g) < 0.4).float(),
            "attributes": (torch.rand(B, 17, generator=g) < 0.5).float()}


# ------------------------------------------------------------------------------------ mixed precision
@pytest.mark.parametrize("weighting", ["likelihood", "simple"])
def test_bf16_autocast_score_matching_log_prob_is_float32_and_close_to_fp32(weighting):
    net = DtypeRecorder(small_unet())
    z = torch.randn(8, 8)
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    lik = ScoreMatchingLikelihood(net, z, event_shape=(3, 16, 16), weighting=weighting)
    torch.manual_seed(5)
    ref = lik.log_prob(x)
    torch.manual_seed(5)  # the same (t, eps) draws
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = lik.log_prob(x)
    assert net.dtypes == [torch.float32, torch.bfloat16]  # the network really ran in bf16
    assert ref.dtype == low.dtype == torch.float32
    assert torch.isfinite(low).all()
    rel = ((low - ref).abs() / ref.abs()).max().item()
    assert rel < BF16_RTOL, rel


def test_bf16_autocast_feed_forward_likelihoods_get_float32_parameters():
    z = torch.randn(5, 4)
    dec = {
        "bernoulli": FeedForwardDecoder(nn.Linear(4, 6), (6,), "bernoulli"),
        "normal": FeedForwardDecoder(nn.Linear(4, 6), (6,), "normal", learn_scale=True),
        "laplace": FeedForwardDecoder(nn.Linear(4, 6), (6,), "laplace"),
        "categorical": FeedForwardDecoder(nn.Linear(4, 3 * 7), (3,), "categorical", num_classes=7),
    }
    dec["categorical"].net = nn.Sequential(nn.Linear(4, 21), nn.Unflatten(1, (3, 7)))
    values = {"bernoulli": torch.rand(5, 6).round(), "normal": torch.randn(5, 6), "laplace": torch.randn(5, 6),
              "categorical": torch.randint(0, 7, (5, 3))}
    for kind, d in dec.items():
        ref = d(z).log_prob(values[kind])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert d.net(z).dtype == torch.bfloat16  # the network output is bf16 ...
            p = d(z)
            lp = p.log_prob(values[kind])
        base = p.base_dist
        param = base.logits if kind in ("bernoulli", "categorical") else base.loc
        assert param.dtype == torch.float32, kind  # ... the distribution is built in float32
        assert lp.dtype == torch.float32, kind
        torch.testing.assert_close(lp, ref, rtol=BF16_RTOL, atol=BF16_RTOL * ref.abs().mean().item())


def test_bf16_autocast_elbo_is_float32_and_close_to_fp32():
    vae = tiny_vae()
    module = DiffMVAEModule(vae, seed=0)
    batch = tiny_batch()
    torch.manual_seed(3)
    ref = module.negative_elbo(batch)
    torch.manual_seed(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = module.negative_elbo(batch)
    low.backward()
    assert low.dtype == torch.float32 and torch.isfinite(low)
    assert abs(low.item() - ref.item()) / abs(ref.item()) < BF16_RTOL
    grads = [p.grad for p in vae.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


# ------------------------------------------------------------------------------------ fp32 latents
def record_encoder_outputs(vae):
    """Forward hooks recording each encoder's ``(mu, logvar)`` output, per modality name."""
    outputs = {}
    for name, modality in vae.modalities.items():
        modality.encoder.register_forward_hook(lambda mod, args, out, name=name: outputs.__setitem__(name, out))
    return outputs


def hand_poe(mu, logvar, mask, placement):
    r"""The Gaussian product by its definition, in float64: precision :math:`\tau = [1] + \sum_m
    \mathbb 1_m e^{-\log\sigma_m^2}`, mean :math:`\tau^{-1}\sum_m \mathbb 1_m e^{-\log\sigma_m^2}\mu_m`.
    ``mu, logvar (B, M, D)``, ``mask (B, M)``; the prior expert's 1 where ``placement`` puts it
    (``every`` product, only the ``full`` one, or ``none``); returns ``(mean, log-variance)``."""
    mu, logvar, m = mu.double(), logvar.double(), mask.double()[..., None]
    precisions = m * torch.exp(-logvar)
    prior = {"every": torch.ones_like(mask[..., 0]), "none": torch.zeros_like(mask[..., 0]),
             "full": mask.all(-1)}[placement].double()[..., None]
    tau = precisions.sum(-2) + prior
    return (precisions * mu).sum(-2) / tau, -torch.log(tau)


def missing_some_batch():
    batch = tiny_batch()
    batch["available"] = {"image": torch.tensor([False, True, True, True, True, True]),
                          "mask": torch.tensor([True, False, True, True, False, True])}
    return batch


@pytest.mark.parametrize("strategy", ["sample", "enumerate"])
def test_bf16_autocast_guide_latents_are_float32_and_match_the_fp32_fusion(strategy):
    """Under bf16 autocast the encoders run in bf16 but the guide fuses their outputs and draws z in
    float32: q(z|x_A) equals the float32 product of the very bf16 expert outputs to float32 round-off
    (a bf16 fusion is off by ~1e-3 relative); the diffusion decoder still runs its UNet in bf16."""
    import pyro
    from pyro import poutine

    vae = tiny_vae()
    vae.subset_strategy = strategy
    batch = missing_some_batch()
    outputs = record_encoder_outputs(vae)
    unet_io = []
    vae.modalities["image"].decoder.eps_net.net.register_forward_hook(  # the UNet (inside the v -> eps wrapper)
        lambda mod, args, out: unet_io.append((args[1].dtype, out.dtype)))
    pyro.clear_param_store()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        guide_trace = poutine.trace(vae.guide).get_trace(batch)
        model_trace = poutine.trace(poutine.replay(vae.model, trace=guide_trace)).get_trace(batch)
        model_trace.compute_log_prob()
    assert set(outputs) == set(vae.names)
    assert all(t.dtype == torch.bfloat16 for out in outputs.values() for t in out)  # the encoders ran in bf16
    site = guide_trace.nodes["z"]
    q = site["fn"].base_dist
    assert q.loc.dtype == q.scale.dtype == site["value"].dtype == torch.float32
    assert model_trace.nodes["z"]["fn"].base_dist.loc.dtype == torch.float32  # the prior site matches
    assert unet_io and all(io == (torch.float32, torch.bfloat16) for io in unet_io)  # fp32 z in, bf16 UNet
    # the reference: the fp32 (here float64) product of the same bf16 expert outputs
    data, available, B = vae.parse_batch(batch)
    mu = torch.stack([outputs[n][0].float() for n in vae.names], -2)
    logvar = torch.stack([outputs[n][1].float() for n in vae.names], -2)
    masks = vae.subset_masks(available)  # (K, B, M)
    if strategy == "sample":
        masks = masks[site["infer"]["subset_index"], torch.arange(B)]
    ref_mu, ref_logvar = hand_poe(mu, logvar, masks, vae.prior_expert)
    torch.testing.assert_close(q.loc, ref_mu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.scale, torch.exp(0.5 * ref_logvar).float(), rtol=1e-5, atol=1e-6)


def test_bf16_autocast_posterior_and_experts_are_float32():
    vae = tiny_vae()
    batch = missing_some_batch()
    outputs = record_encoder_outputs(vae)
    data, available, _ = vae.parse_batch(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mu, logvar = vae.experts(data, available)
        assert mu.dtype == logvar.dtype == torch.float32
        assert all(t.dtype == torch.bfloat16 for out in outputs.values() for t in out)
        # the upcast is exact: the experts are the bf16 outputs themselves
        assert torch.equal(mu[:, 0], outputs["image"][0].float())
        q = vae.posterior(batch, given=["image", "attributes"])
        z = q.rsample()
    assert q.base_dist.loc.dtype == q.base_dist.scale.dtype == z.dtype == torch.float32
    mask = available & torch.tensor([True, False, True])
    ref_mu, ref_logvar = hand_poe(torch.stack([outputs[n][0].float() for n in vae.names], -2),
                                  torch.stack([outputs[n][1].float() for n in vae.names], -2), mask, vae.prior_expert)
    torch.testing.assert_close(q.base_dist.loc, ref_mu.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.base_dist.scale, torch.exp(0.5 * ref_logvar).float(), rtol=1e-5, atol=1e-6)
    assert vae.posterior(batch).base_dist.loc.dtype == torch.float32  # and without autocast


# ------------------------------------------------------------------------------------ channels-last
def test_channels_last_gives_the_same_loss_and_gradients(monkeypatch):
    # torch.randn_like fills a channels-last tensor in memory order, so with the same seed a
    # channels-last batch draws the same numbers at permuted positions (an equally distributed ε, a
    # different loss value). Draw ε in the logical order for both layouts to compare like with like.
    monkeypatch.setattr(torch, "randn_like",
                        lambda x, **kw: torch.randn(x.shape, dtype=kw.get("dtype") or x.dtype, device=x.device))
    vae = tiny_vae()
    vae_cl = copy.deepcopy(vae)
    batch = tiny_batch()
    plain = DiffMVAEModule(vae, seed=0)
    cl = DiffMVAEModule(vae_cl, seed=0, channels_last=True)  # converts the UNet at construction
    conv = vae_cl.modalities["image"].decoder.eps_net.net.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    batch_cl = cl.on_after_batch_transfer(batch, 0)
    assert batch_cl["image"].is_contiguous(memory_format=torch.channels_last)
    assert batch_cl["mask"].is_contiguous(memory_format=torch.channels_last)
    assert batch_cl["attributes"] is batch["attributes"]
    torch.testing.assert_close(batch_cl["image"], batch["image"])
    losses, grads = [], []
    for module, b in ((plain, batch), (cl, batch_cl)):
        torch.manual_seed(7)
        loss = module.negative_elbo(b)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in module.vae.parameters()])
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    # the convolutions sum in another order: float32 round-off, within 1e-4 of each gradient's scale plus
    # 1e-6 of the largest gradient (the biases feeding a GroupNorm have an exact gradient of 0, so
    # theirs is pure round-off in both layouts)
    top = max(g.abs().max().item() for g in grads[0])
    for g0, g1 in zip(*grads):
        assert (g0 - g1).abs().max() <= 1e-4 * g0.abs().max() + 1e-6 * top
    # the same parameter names; a channels-last state dict loads into a contiguous model
    assert list(vae.state_dict()) == list(vae_cl.state_dict())
    fresh = tiny_vae()
    fresh.load_state_dict(vae_cl.state_dict())
    assert fresh.modalities["image"].decoder.eps_net.net.conv_in.weight.is_contiguous()
    # ... and a contiguous one into a channels-last model, which keeps its layout
    fresh_cl = eps_nets_to_channels_last(tiny_vae())
    fresh_cl.load_state_dict(vae.state_dict())
    weight = fresh_cl.modalities["image"].decoder.eps_net.net.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(weight, vae.modalities["image"].decoder.eps_net.net.conv_in.weight)


def test_batch_to_channels_last_walks_nested_mappings():
    avail = {"image": torch.tensor([True, False])}
    batch = {"image": torch.zeros(2, 3, 4, 4), "available": avail, "tokens": torch.zeros(2, 3, 4, 4, dtype=torch.long)}
    out = batch_to_channels_last(batch)
    assert out["image"].is_contiguous(memory_format=torch.channels_last)
    assert out["available"]["image"] is avail["image"]
    assert out["tokens"] is batch["tokens"]  # integer data untouched


# ------------------------------------------------------------------------------------ torch.compile
def test_compiled_eps_net_same_output_and_same_state_dict_keys():
    """``aot_eager`` traces the network with dynamo and AOT autograd (the parts of ``torch.compile``
    the wiring depends on) without a C++ compiler; the inductor backend is checked in the slow test."""
    vae = tiny_vae()
    net = vae.modalities["image"].decoder.eps_net
    x, z, t = torch.randn(4, 3, 16, 16), torch.randn(4, 8), torch.rand(4)
    ref = net(x, z, t)
    keys = list(vae.state_dict())
    compile_eps_nets(vae, backend="aot_eager")
    assert net._compiled_call_impl is not None
    out = net(x, z, t)
    torch.testing.assert_close(out, ref)
    out.sum().backward()  # compiled backward
    assert all(p.grad is not None for p in net.parameters())
    assert list(vae.state_dict()) == keys  # no "_orig_mod." prefix
    uncompile_eps_nets(vae)
    assert net._compiled_call_impl is None


@pytest.mark.slow
def test_inductor_compiled_eps_net_matches_eager():
    """The default backend (inductor) on this CPU build (it needs a C++ compiler; ~1 min to compile)."""
    net = small_unet()
    x, z, t = torch.randn(4, 3, 16, 16), torch.randn(4, 8), torch.rand(4)
    ref = net(x, z, t)
    keys = list(net.state_dict())
    net.compile(backend="inductor")
    try:
        out = net(x, z, t)
    except Exception as err:  # e.g. torch._dynamo.exc.BackendCompilerFailed without a C++ toolchain
        pytest.skip(f"torch.compile's inductor backend is unavailable on this CPU build: {type(err).__name__}: "
                    f"{str(err).splitlines()[0][:200]}")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert list(net.state_dict()) == keys


class Recorder(L.Callback):
    """Records the batches seen, whether the ε-net was compiled, the layout of the images and the
    module's state-dict keys while fitting."""

    def __init__(self):
        self.batches, self.compiled, self.keys = 0, [], None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches += 1
        self.compiled.append(pl_module.vae.modalities["image"].decoder.eps_net._compiled_call_impl is not None)
        assert batch["image"].is_contiguous(memory_format=torch.channels_last)
        self.keys = list(pl_module.state_dict())


def test_lightning_fit_with_compile_channels_last_and_accumulation(tmp_path):
    """2 optimizer steps over 4 batches (accumulate_grad_batches=2), compiled (aot_eager) and
    channels-last; the checkpoint's keys are the uncompiled model's and it loads into one."""
    vae = tiny_vae()
    keys = list(DiffMVAEModule(copy.deepcopy(vae)).state_dict())
    module = DiffMVAEModule(vae, seed=0, log_parts_every=0, channels_last=True, compile=True,
                            compile_backend="aot_eager")
    rec = Recorder()
    trainer = make_trainer(max_steps=2, accumulate_grad_batches=2, default_root_dir=str(tmp_path), logger=False,
                           enable_progress_bar=False, enable_checkpointing=False, limit_val_batches=0,
                           callbacks=[rec], accelerator="cpu")
    assert trainer.accumulate_grad_batches == 2
    data = [tiny_batch(B=4, seed=s) for s in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer.fit(module, loader)
    assert trainer.global_step == 2 and rec.batches == 4
    assert all(rec.compiled)  # compiled while fitting ...
    assert vae.modalities["image"].decoder.eps_net._compiled_call_impl is None  # ... eager afterwards
    assert rec.keys == keys
    path = tmp_path / "fit.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert list(state) == keys
    fresh = DiffMVAEModule(tiny_vae())
    fresh.load_state_dict(state)  # strict
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(value, state[name])


# ------------------------------------------------------------------------------------ configs
def test_trainer_config_defaults_and_gpu_preset():
    cpu = tiny_cfg().trainer
    assert (cpu.precision, cpu.channels_last, cpu.compile, cpu.accumulate_grad_batches) == ("32-true", False, False, 1)
    assert (cpu.compile_backend, cpu.compile_mode) == ("inductor", None)
    gpu = tiny_cfg("trainer=gpu").trainer
    assert (gpu.accelerator, gpu.precision, gpu.channels_last, gpu.compile) == ("gpu", "bf16-mixed", True, False)


def test_run_train_passes_the_gpu_keys_to_the_module_and_trainer(tmp_path, monkeypatch):
    import pyro_diffmvae.train as train
    from pyro_diffmvae.cli import run_train

    built = {}

    class Stop(Exception):
        pass

    real_make_trainer = train.make_trainer

    def make_trainer_spy(**kwargs):
        trainer = real_make_trainer(**kwargs)

        def fit(module, *args, **kw):
            built["module"] = module
            raise Stop

        trainer.fit = fit
        built["trainer"] = trainer
        return trainer

    monkeypatch.setattr(train, "make_trainer", make_trainer_spy)
    cfg = tiny_cfg("trainer.accumulate_grad_batches=2", "trainer.channels_last=true", "trainer.compile=true",
                   "trainer.compile_backend=aot_eager", "trainer.compile_mode=reduce-overhead",
                   "trainer.precision=bf16-mixed", "trainer.accelerator=cpu", cache_dir=tmp_path / "cache")
    with pytest.raises(Stop):
        run_train(cfg, tmp_path / "run")
    trainer, module = built["trainer"], built["module"]
    assert trainer.accumulate_grad_batches == 2
    assert trainer.precision == "bf16-mixed"
    assert module.channels_last and module.compile_eps
    assert (module.compile_backend, module.compile_mode) == ("aot_eager", "reduce-overhead")
    conv = module.vae.modalities["image"].decoder.eps_net.net.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
