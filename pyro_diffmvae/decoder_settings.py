"""A sampling setting of every diffusion decoder of a model, changed for a block and restored after it."""

from __future__ import annotations

import contextlib

__all__ = ["diffusion_decoder_setting"]


@contextlib.contextmanager
def diffusion_decoder_setting(vae, attribute: str, value):
    """Set ``decoder.<attribute> = value`` on every diffusion decoder of ``vae`` for the block (``value=None``: each
    decoder keeps its own); yields ``{modality: value in use}`` for the diffusion decoders (empty without any) and
    restores every decoder's own value on exit, also after an error. The decoder's setter validates the value."""
    decoders = {m: mod.decoder for m, mod in vae.modalities.items() if mod.is_diffusion}
    before = {m: getattr(d, attribute) for m, d in decoders.items()}
    try:
        if value is not None:
            for d in decoders.values():
                setattr(d, attribute, value)
        yield {m: getattr(d, attribute) for m, d in decoders.items()}
    finally:
        for m, d in decoders.items():
            setattr(d, attribute, before[m])
