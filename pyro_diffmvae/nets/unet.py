"""Conditional UNet noise predictor ``eps_theta(x_t, z, t)`` for diffusion decoders.

The network follows the DDPM / ADM ("improved DDPM", Dhariwal & Nichol 2021)
UNet layout, with the diffae-style (Preechakul et al. 2022) conditioning on a
latent code ``z``:

* **Conditioning vector.**  The diffusion time ``t in [0, 1]`` is multiplied by
  1000 (so it covers the same range as the integer step index of DDPM), passed
  through a sinusoidal embedding of width ``base_channels`` and a two-layer MLP
  (``Linear -> SiLU -> Linear``) of width ``time_embed_dim``.  If the net is
  conditional (``z_dim`` is set), a second MLP, ``z_proj``, maps ``z`` to the
  same width and is *added*::

      emb = MLP_t(sinusoid(1000 * t)) + z_proj(z)

* **Residual blocks with AdaGN (scale-shift norm).**  Every ``ResBlock`` computes::

      h = conv1(SiLU(GroupNorm(x)))
      scale, shift = Linear(SiLU(emb)).chunk(2)
      h = GroupNorm(h) * (1 + scale) + shift
      h = conv2(Dropout(SiLU(h)))
      out = skip(x) + h

  so ``t`` and ``z`` modulate every block of the network.
* **Self-attention.**  Multi-head self-attention (on GroupNorm'd features,
  added residually) after each residual block whose feature map has a spatial
  size listed in ``attention_resolutions``, plus (``mid_attention=True``, the
  DDPM default) one in the middle block at the lowest resolution.
* **Down / up sampling.**  Downsampling is a stride-2 3x3 conv with padding 1,
  so a side of length ``n`` becomes ``ceil(n / 2)`` (28 -> 14 -> 7 -> 4).
  Upsampling is nearest-neighbour interpolation to the *exact* spatial size of
  the skip connection it is about to be concatenated with, followed by a 3x3
  conv, so odd intermediate sizes round-trip correctly.
* **Zero initialisation.**  As in DDPM/ADM, the last conv of every residual
  block, the output projection of every attention block and the output conv of
  the network are initialised to zero.  Every block therefore starts as the
  identity and the freshly built net outputs exactly ``0`` for every input.  In
  particular the output does *not* depend on ``z`` or ``t`` at initialisation;
  that dependence appears after the first few optimiser steps (first the output
  conv becomes non-zero, then the residual branches).  The tests check the
  dependence after re-initialising those layers and also after a few Adam steps.

The net is an epsilon-predictor: given ``x_t = alpha_t x_0 + sigma_t eps`` it
predicts ``eps``.  The score of the perturbed data distribution used by the
reverse SDE / probability-flow ODE is then ``s(x_t, z, t) = -eps_theta(x_t, z, t)
/ sigma_t``.

Resolutions are tracked at construction time starting from ``image_size`` and
applying ``ceil(n / 2)`` per downsample; the net only accepts square inputs of
side ``image_size`` so that attention is placed where it was requested.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "timestep_embedding",
    "TimestepEmbedding",
    "ResBlock",
    "AttentionBlock",
    "Downsample",
    "Upsample",
    "ConditionalUNet",
]


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def _largest_divisor_at_most(n: int, k: int) -> int:
    """Largest divisor of ``n`` that is ``<= k`` (at least 1)."""
    d = max(1, min(n, k))
    while n % d:
        d -= 1
    return d


def _group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    """GroupNorm with ``num_groups`` clamped to a divisor of ``channels``."""
    return nn.GroupNorm(_largest_divisor_at_most(channels, num_groups), channels)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero all parameters of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _shape(x: torch.Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (already scaled) times ``t`` of shape ``(B,)``.

    Returns ``(B, dim)``: ``[cos(t * f_k), sin(t * f_k)]`` with frequencies
    ``f_k = max_period ** (-k / half)``; odd ``dim`` is zero-padded.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


# --------------------------------------------------------------------------- #
# building blocks
# --------------------------------------------------------------------------- #
class TimestepEmbedding(nn.Module):
    """``t in [0, 1]`` -> sinusoid(``time_scale * t``) -> Linear -> SiLU -> Linear."""

    def __init__(self, sinusoid_dim: int, embed_dim: int, time_scale: float = 1000.0):
        super().__init__()
        self.sinusoid_dim = sinusoid_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(sinusoid_dim, embed_dim),
            nn.SiLU(),
            nn.Linear(embed_dim, embed_dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(self.time_scale * t, self.sinusoid_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    """Residual block with AdaGN: ``GroupNorm(h) * (1 + scale) + shift``.

    ``(scale, shift) = Linear(SiLU(emb))``.  The second conv is zero-initialised
    so the block starts as ``skip(x)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_dim: int,
        dropout: float = 0.0,
        num_groups: int = 32,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.norm1 = _group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels))
        self.norm2 = _group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = (
            nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over the ``H * W`` positions.

    ``num_heads`` is reduced to the largest divisor of ``channels`` not above it.
    ``resolution`` is informational (the feature-map side length it runs at).
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 4,
        num_groups: int = 32,
        resolution: int | None = None,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = _largest_divisor_at_most(channels, num_heads)
        self.resolution = resolution
        self.norm = _group_norm(channels, num_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        qkv = self.qkv(self.norm(x).reshape(b, c, hgt * wid))  # (B, 3C, L)
        # (B, 3C, L) -> 3 x (B, heads, L, C/heads)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, hgt * wid)
        q, k, v = qkv.permute(1, 0, 2, 4, 3).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, C/heads)
        h = h.permute(0, 1, 3, 2).reshape(b, c, hgt * wid)
        return x + self.proj_out(h).reshape(b, c, hgt, wid)


class Downsample(nn.Module):
    """Stride-2 3x3 conv (padding 1): side ``n`` -> ``ceil(n / 2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to an exact ``size`` followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))


class _LevelBlock(nn.Module):
    """A ``ResBlock`` optionally followed by an ``AttentionBlock``."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)


# --------------------------------------------------------------------------- #
# the UNet
# --------------------------------------------------------------------------- #
class ConditionalUNet(nn.Module):
    """UNet epsilon-predictor ``eps_theta(x_t, z, t)`` (see module docstring).

    Args:
        in_channels: channels of ``x_t``.
        out_channels: channels of the output; defaults to ``in_channels``.
        base_channels: width of the first level; level ``i`` has
            ``base_channels * channel_mults[i]`` channels.
        channel_mults: one multiplier per resolution level; there are
            ``len(channel_mults) - 1`` downsamples.
        num_res_blocks: residual blocks per level on the way down (``+1`` on
            the way up, which also consumes the downsample's skip).
        attention_resolutions: feature-map side lengths at which self-attention
            follows each residual block.  Side lengths start at ``image_size``
            and become ``ceil(n / 2)`` per downsample.
        image_size: side length of the (square) inputs.
        z_dim: dimension of the latent ``z``; ``None`` builds an unconditional
            net (``forward`` then requires ``z=None``).
        time_embed_dim: width of the conditioning vector (default
            ``4 * base_channels``).
        num_heads: attention heads (reduced to a divisor of the channel count).
        dropout: dropout inside the residual blocks.
        num_groups: GroupNorm groups (reduced to a divisor of the channel count).
        mid_attention: put an attention block in the middle block (lowest
            resolution) regardless of ``attention_resolutions``, as in DDPM.
        z_spatial_channels: if > 0 (and ``z_dim`` is set), ``z`` is also given to
            the net *spatially*: a linear map of ``z`` to a
            ``(z_spatial_channels, 4, 4)`` map, upsampled (bilinear) to the
            image size and concatenated to ``x_t`` before the first conv. At high
            noise only ``z`` can say what to draw where; this path makes that
            information available at every pixel, not only through the
            normalisation scale/shift.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mults: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attention_resolutions: Sequence[int] = (16,),
        image_size: int = 32,
        z_dim: int | None = None,
        time_embed_dim: int | None = None,
        num_heads: int = 4,
        dropout: float = 0.0,
        num_groups: int = 32,
        mid_attention: bool = True,
        z_spatial_channels: int = 0,
    ):
        super().__init__()
        channel_mults = tuple(int(m) for m in channel_mults)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        if in_channels < 1 or base_channels < 1 or image_size < 1:
            raise ValueError(
                "in_channels, base_channels and image_size must be positive; got "
                f"{in_channels}, {base_channels}, {image_size}"
            )
        if not channel_mults or any(m < 1 for m in channel_mults):
            raise ValueError(f"channel_mults must be non-empty positive ints; got {channel_mults}")
        if num_res_blocks < 1:
            raise ValueError(f"num_res_blocks must be >= 1; got {num_res_blocks}")
        if z_dim is not None and z_dim < 1:
            raise ValueError(f"z_dim must be a positive int or None; got {z_dim}")

        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.base_channels = base_channels
        self.channel_mults = channel_mults
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.image_size = image_size
        self.z_dim = z_dim
        self.time_embed_dim = 4 * base_channels if time_embed_dim is None else time_embed_dim

        # Side length of the feature maps at each level.
        resolutions = [image_size]
        for _ in channel_mults[1:]:
            resolutions.append((resolutions[-1] + 1) // 2)
        self.resolutions = tuple(resolutions)
        missing = sorted(set(attention_resolutions) - set(resolutions))
        if missing:
            warnings.warn(
                f"attention_resolutions {missing} do not occur in this net (level "
                f"resolutions {self.resolutions}); no attention will be placed there",
                stacklevel=2,
            )

        emb_dim = self.time_embed_dim
        self.time_embed = TimestepEmbedding(base_channels, emb_dim)
        self.z_proj = (
            None
            if z_dim is None
            else nn.Sequential(nn.Linear(z_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        )

        def level_block(cin: int, cout: int, res: int) -> _LevelBlock:
            attn = (
                AttentionBlock(cout, num_heads, num_groups, resolution=res)
                if res in attention_resolutions
                else None
            )
            return _LevelBlock(ResBlock(cin, cout, emb_dim, dropout, num_groups), attn)

        # ---- down path: every module's output is a skip connection ----
        self.z_spatial_channels = int(z_spatial_channels) if z_dim is not None else 0
        self.z_map = (
            nn.Linear(z_dim, self.z_spatial_channels * 16) if self.z_spatial_channels > 0 else None
        )
        self.conv_in = nn.Conv2d(in_channels + self.z_spatial_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_channels = [base_channels]
        ch = base_channels
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(level_block(ch, base_channels * mult, resolutions[level]))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        # ---- middle ----
        self.mid_res1 = ResBlock(ch, ch, emb_dim, dropout, num_groups)
        self.mid_attn = (
            AttentionBlock(ch, num_heads, num_groups, resolution=resolutions[-1])
            if mid_attention
            else None
        )
        self.mid_res2 = ResBlock(ch, ch, emb_dim, dropout, num_groups)

        # ---- up path: each level block consumes one skip; Upsample consumes none ----
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mults))):
            for i in range(num_res_blocks + 1):
                cin = ch + skip_channels.pop()
                self.up.append(level_block(cin, base_channels * mult, resolutions[level]))
                ch = base_channels * mult
            if level != 0:
                self.up.append(Upsample(ch))
        assert not skip_channels

        # ---- output ----
        self.norm_out = _group_norm(ch, num_groups)
        self.conv_out = _zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    # ------------------------------------------------------------------ #
    def _check_inputs(
        self, x_t: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor | float
    ) -> torch.Tensor:
        """Validate shapes; return ``t`` as a float tensor of shape ``(B,)``."""
        if not torch.is_tensor(x_t) or x_t.dim() != 4:
            got = _shape(x_t) if torch.is_tensor(x_t) else type(x_t).__name__
            raise ValueError(
                "x_t must be a 4-D tensor of shape (B, C, H, W) = "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size}); got {got}"
            )
        b, c, hgt, wid = x_t.shape
        if c != self.in_channels:
            raise ValueError(
                f"x_t has {c} channels but the net expects {self.in_channels}: expected shape "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {_shape(x_t)}"
            )
        if hgt != self.image_size or wid != self.image_size:
            raise ValueError(
                f"x_t has spatial size ({hgt}, {wid}) but the net was built for "
                f"image_size={self.image_size}: expected shape "
                f"(B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {_shape(x_t)}"
            )

        if self.z_dim is None:
            if z is not None:
                raise ValueError(
                    "this net is unconditional (z_dim=None) so z must be None; got z of "
                    f"shape {_shape(z) if torch.is_tensor(z) else type(z).__name__}"
                )
        else:
            if z is None:
                raise ValueError(
                    f"this net is conditional (z_dim={self.z_dim}): z of shape "
                    f"(B, {self.z_dim}) = ({b}, {self.z_dim}) is required, got None"
                )
            if not torch.is_tensor(z) or z.dim() != 2 or z.shape[1] != self.z_dim:
                got = _shape(z) if torch.is_tensor(z) else type(z).__name__
                raise ValueError(
                    f"z must have shape (B, z_dim) = ({b}, {self.z_dim}); got {got}"
                )
            if z.shape[0] != b:
                raise ValueError(
                    f"batch size mismatch: x_t has shape {_shape(x_t)} (B={b}) but z has "
                    f"shape {_shape(z)} (B={z.shape[0]}); expected ({b}, {self.z_dim})"
                )

        t = torch.as_tensor(t, device=x_t.device)
        if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
            raise ValueError(f"t must be a real-valued tensor; got dtype {t.dtype}")
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(b)
        elif t.dim() != 1 or t.shape[0] != b:
            raise ValueError(
                f"t must be a scalar or have shape (B,) = ({b},) matching x_t of shape "
                f"{_shape(x_t)}; got shape {_shape(t)}"
            )
        return t.float()

    def embed(self, z: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        """Conditioning vector ``emb = MLP_t(sinusoid(1000 t)) [+ z_proj(z)]``."""
        emb = self.time_embed(t)
        if self.z_proj is not None:
            emb = emb + self.z_proj(z)
        return emb

    def forward(
        self, x_t: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor | float
    ) -> torch.Tensor:
        """Predict the noise ``eps`` of ``x_t`` (same shape as ``x_t``).

        Args:
            x_t: noisy images, ``(B, in_channels, image_size, image_size)``.
            z: latent codes ``(B, z_dim)``, or ``None`` for an unconditional net.
            t: diffusion times in ``[0, 1]``: ``(B,)``, a 0-dim tensor or a
                Python number (broadcast over the batch).  The range is not
                checked (that would force a device sync).
        """
        t = self._check_inputs(x_t, z, t)
        emb = self.embed(z, t)

        if self.z_map is not None:
            z_map = self.z_map(z).reshape(z.shape[0], self.z_spatial_channels, 4, 4)
            z_map = F.interpolate(z_map, size=x_t.shape[-2:], mode="bilinear", align_corners=False)
            h = self.conv_in(torch.cat([x_t, z_map.to(x_t.dtype)], 1))
        else:
            h = self.conv_in(x_t)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else block(h, emb)
            skips.append(h)

        h = self.mid_res1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h)
        h = self.mid_res2(h, emb)

        for block in self.up:
            if isinstance(block, Upsample):
                # resize to the exact size of the next skip (handles odd sizes)
                h = block(h, skips[-1].shape[-2:])
            else:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)

        return self.conv_out(F.silu(self.norm_out(h)))
