"""Tests for ``pyro_diffmvae.nets.unet.ConditionalUNet``.

All nets here are tiny (base_channels=16, one residual block per level,
batch 2) so the whole file runs in a few seconds on CPU.

Note on zero initialisation: as in DDPM, the last conv of every residual
block, every attention output projection and the network's output conv start
at zero, so a freshly built net outputs exactly 0 and does not depend on z or
t.  Dependence tests therefore either (a) re-initialise all zero-initialised
layers with small normal weights (``_unzero``), or (b) take a few Adam steps on
a regression loss, which is what happens in training: step 1 makes the output
conv non-zero, step 2 the residual branches, and from then on z and t matter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pyro_diffmvae.nets.unet import AttentionBlock, ConditionalUNet, Downsample, Upsample

B = 2
Z_DIM = 5


def _net(**kw) -> ConditionalUNet:
    cfg = dict(
        in_channels=3,
        base_channels=16,
        channel_mults=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),
        image_size=32,
        z_dim=Z_DIM,
        num_heads=2,
        num_groups=8,
    )
    cfg.update(kw)
    return ConditionalUNet(**cfg)


def _inputs(net: ConditionalUNet, batch: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, net.in_channels, net.image_size, net.image_size, generator=g)
    z = None if net.z_dim is None else torch.randn(batch, net.z_dim, generator=g)
    t = torch.rand(batch, generator=g)
    return x, z, t


@torch.no_grad()
def _unzero(net: ConditionalUNet, std: float = 0.05, seed: int = 0) -> ConditionalUNet:
    """Re-initialise every exactly-zero conv weight with N(0, std^2)."""
    g = torch.Generator().manual_seed(seed)
    n = 0
    for m in net.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and not m.weight.any():
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * std)
            n += 1
    assert n > 0
    return net


def _trained(net: ConditionalUNet, steps: int = 4) -> ConditionalUNet:
    """A few Adam steps regressing random targets (mimics early training)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, z, t = _inputs(net, seed=1)
    target = torch.randn_like(x)
    for _ in range(steps):
        opt.zero_grad()
        ((net(x, z, t) - target) ** 2).mean().backward()
        opt.step()
    return net


# --------------------------------------------------------------------------- #
# shapes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize(
    "image_size, kw",
    [
        (28, dict(channel_mults=(1, 2))),
        (28, dict(channel_mults=(1, 2, 2, 2), attention_resolutions=(7,))),  # 28->14->7->4
        (32, dict(channel_mults=(1, 2, 2), attention_resolutions=(16,))),
        (64, dict(channel_mults=(1, 2, 2), attention_resolutions=(16,))),
        (128, dict(base_channels=8, channel_mults=(1, 1, 2))),
    ],
)
def test_output_shape(in_channels, image_size, kw):
    net = _unzero(_net(in_channels=in_channels, image_size=image_size, **kw))
    x, z, t = _inputs(net)
    out = net(x, z, t)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_odd_resolutions_are_tracked():
    net = _net(image_size=28, channel_mults=(1, 2, 2, 2))
    assert net.resolutions == (28, 14, 7, 4)


def test_out_channels_override():
    net = _net(in_channels=1, out_channels=2)
    x, z, t = _inputs(net)
    assert net(x, z, t).shape == (B, 2, 32, 32)


def test_zero_init_output_is_zero():
    net = _net()
    x, z, t = _inputs(net)
    assert torch.equal(net(x, z, t), torch.zeros_like(x))


def test_t_scalar_broadcast():
    net = _unzero(_net())
    x, z, _ = _inputs(net)
    ref = net(x, z, torch.full((B,), 0.3))
    for t in (0.3, torch.tensor(0.3), torch.tensor([0.3])):
        torch.testing.assert_close(net(x, z, t), ref)


def test_batch_elements_independent():
    net = _unzero(_net()).eval()
    x, z, t = _inputs(net, batch=3)
    full = net(x, z, t)
    torch.testing.assert_close(net(x[1:2], z[1:2], t[1:2]), full[1:2], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- #
# dependence on z and t
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("make", [_unzero, _trained], ids=["reinit", "adam_steps"])
def test_output_depends_on_z(make):
    net = make(_net(attention_resolutions=(16,)))
    x, z, t = _inputs(net)
    net.zero_grad()
    net(x, z, t).square().sum().backward()
    grad = sum(p.grad.abs().sum() for p in net.z_proj.parameters())
    assert grad > 0

    with torch.no_grad():
        out1 = net(x, z, t)
        out2 = net(x, z + 1.0, t)
    assert not torch.allclose(out1, out2)


@pytest.mark.parametrize("make", [_unzero, _trained], ids=["reinit", "adam_steps"])
def test_output_depends_on_t(make):
    net = make(_net())
    x, z, _ = _inputs(net)
    net.zero_grad()
    net(x, z, torch.full((B,), 0.5)).square().sum().backward()
    grad = sum(p.grad.abs().sum() for p in net.time_embed.parameters())
    assert grad > 0

    with torch.no_grad():
        out1 = net(x, z, 0.1)
        out2 = net(x, z, 0.9)
    assert not torch.allclose(out1, out2)


# --------------------------------------------------------------------------- #
# conditional vs unconditional
# --------------------------------------------------------------------------- #
def test_unconditional_net():
    net = _unzero(_net(z_dim=None))
    assert net.z_proj is None
    x, z, t = _inputs(net)
    assert z is None
    assert net(x, None, t).shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        net(x, torch.randn(B, Z_DIM), t)


def test_conditional_net_requires_z():
    net = _net()
    x, _, t = _inputs(net)
    with pytest.raises(ValueError, match=rf"z_dim={Z_DIM}.*\(2, {Z_DIM}\)"):
        net(x, None, t)


# --------------------------------------------------------------------------- #
# input validation
# --------------------------------------------------------------------------- #
def _raises_with(fn, *fragments):
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"


def test_bad_inputs():
    net = _net()
    x, z, t = _inputs(net)
    # wrong number of channels
    _raises_with(lambda: net(torch.randn(B, 1, 32, 32), z, t), "(2, 1, 32, 32)", "(B, 3, 32, 32)")
    # 3-D input
    _raises_with(lambda: net(torch.randn(3, 32, 32), z, t), "(3, 32, 32)", "(B, 3, 32, 32)")
    # wrong spatial size
    _raises_with(lambda: net(torch.randn(B, 3, 28, 28), z, t), "(2, 3, 28, 28)", "image_size=32")
    # wrong z_dim
    _raises_with(lambda: net(x, torch.randn(B, Z_DIM + 1), t), "(2, 6)", f"(2, {Z_DIM})")
    # z batch mismatch
    _raises_with(lambda: net(x, torch.randn(B + 1, Z_DIM), t), "(3, 5)", "(2, 3, 32, 32)", "(2, 5)")
    # t batch mismatch
    _raises_with(lambda: net(x, z, torch.rand(B + 1)), "(3,)", "(2,)")
    # t with wrong dims
    _raises_with(lambda: net(x, z, torch.rand(B, 1)), "(2, 1)", "(2,)")


# --------------------------------------------------------------------------- #
# architecture
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(
    "image_size, mults, attn_res, mid",
    [
        (32, (1, 2, 2), (16,), True),
        (32, (1, 2, 2), (16, 8), False),
        (28, (1, 2, 2, 2), (14, 4), False),
        (32, (1, 2), (), False),
    ],
)
def test_attention_placement(image_size, mults, attn_res, mid):
    nrb = 1
    net = _net(
        image_size=image_size,
        channel_mults=mults,
        attention_resolutions=attn_res,
        num_res_blocks=nrb,
        mid_attention=mid,
    )
    level_attn = [
        m for name, m in net.named_modules() if isinstance(m, AttentionBlock) and name != "mid_attn"
    ]
    # per level: nrb blocks down + (nrb + 1) up
    n_levels = sum(r in attn_res for r in net.resolutions)
    assert len(level_attn) == n_levels * (2 * nrb + 1)
    assert {m.resolution for m in level_attn} == set(attn_res) & set(net.resolutions)
    assert (net.mid_attn is not None) == mid

    # the blocks really run at the requested resolutions
    seen = []
    hooks = [
        m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape[-1]))
        for m in level_attn
    ]
    x, z, t = _inputs(net)
    net(x, z, t)
    for h in hooks:
        h.remove()
    assert sorted(seen) == sorted(m.resolution for m in level_attn)


def test_missing_attention_resolution_warns():
    with pytest.warns(UserWarning, match="do not occur"):
        _net(image_size=28, attention_resolutions=(16,))


def test_sampling_module_counts():
    net = _net(channel_mults=(1, 2, 2, 2), image_size=28)
    assert sum(isinstance(m, Downsample) for m in net.modules()) == 3
    assert sum(isinstance(m, Upsample) for m in net.modules()) == 3


def test_group_norm_clamped():
    # 16 + 32 = 48 channels in an up block; 32 groups does not divide 48
    net = _net(num_groups=32)
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_channels % m.num_groups == 0
    x, z, t = _inputs(net)
    assert net(x, z, t).shape == x.shape


def test_spatial_z_conditioning_changes_output_through_input_map():
    torch.manual_seed(0)
    net = ConditionalUNet(in_channels=3, base_channels=16, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), image_size=16, z_dim=4, z_spatial_channels=2)
    assert net.conv_in.in_channels == 5
    torch.nn.init.normal_(net.conv_out.weight, std=0.05)
    with torch.no_grad():  # remove the AdaGN path of z so that only the spatial map carries it
        for p in net.z_proj.parameters():
            p.zero_()
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    a = net(x, torch.zeros(2, 4), t)
    b = net(x, torch.ones(2, 4), t)
    assert (a - b).abs().max() > 1e-4
