"""The GPU path: channels-last memory format and ``torch.compile`` for the diffusion decoders' ε-networks.

These are what ``DiffMVAEModule(channels_last=..., compile=...)`` applies. Neither changes the
parameters' names or objects, so optimizers, state dicts and checkpoints are the same with or without.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..model import MultimodalVAE

__all__ = ["diffusion_eps_nets", "eps_nets_to_channels_last", "batch_to_channels_last", "compile_eps_nets",
           "uncompile_eps_nets"]


def diffusion_eps_nets(vae: MultimodalVAE) -> dict[str, torch.nn.Module]:
    """The ε-networks (``decoder.eps_net``) of the diffusion decoders, by modality name."""
    return {name: m.decoder.eps_net for name, m in vae.modalities.items() if m.is_diffusion}


def eps_nets_to_channels_last(vae: MultimodalVAE) -> MultimodalVAE:
    """Put the diffusion decoders' ε-networks (their 4-D conv weights) in ``torch.channels_last``, in place.

    The parameters stay the same objects (only their strides change), so state-dict keys, optimizers
    and checkpoints are unaffected; a channels-last checkpoint loads into a contiguous model and back.
    On GPUs, channels-last convolutions (NHWC) are the fast path of cuDNN under bf16/fp16.
    """
    for net in diffusion_eps_nets(vae).values():
        net.to(memory_format=torch.channels_last)
    return vae


def batch_to_channels_last(batch: Any) -> Any:
    """The batch with every 4-D floating-point tensor (the images) in ``torch.channels_last``
    (nested mappings, e.g. ``batch["available"]``, are walked; other values are returned as they are)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: batch_to_channels_last(v) for k, v in batch.items()}
    return batch


def compile_eps_nets(vae: MultimodalVAE, backend: str = "inductor", mode: str | None = None,
                     **kwargs: Any) -> MultimodalVAE:
    """``torch.compile`` the forward of every diffusion decoder's ε-network, in place.

    Uses :meth:`torch.nn.Module.compile`, which compiles the module's call and leaves the module
    itself (and so its parameter names: no ``_orig_mod.`` prefix) as it is: checkpoints written while
    compiled load into an uncompiled model. :func:`uncompile_eps_nets` undoes it.
    """
    for net in diffusion_eps_nets(vae).values():
        net.compile(backend=backend, mode=mode, **kwargs)
    return vae


def uncompile_eps_nets(vae: MultimodalVAE) -> MultimodalVAE:
    """Undo :func:`compile_eps_nets` (the ε-networks run eagerly again)."""
    for net in diffusion_eps_nets(vae).values():
        net._compiled_call_impl = None
    return vae
