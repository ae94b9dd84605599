"""Feed-forward decoder networks ``z -> likelihood parameters`` (used inside FeedForwardDecoder)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvDecoder", "MLPDecoder", "TokenDecoder"]


class ConvDecoder(nn.Module):
    """Transposed-conv decoder ``z -> (C, S, S)`` logits/locations, starting from a 4×4 map."""

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 32):
        super().__init__()
        self.start = 4
        ups, size = 0, self.start
        while size < image_size:
            size *= 2
            ups += 1
        ch = width * 2 ** min(ups, 2)
        self.fc = nn.Sequential(nn.Linear(latent_dim, 256), nn.SiLU(), nn.Linear(256, ch * self.start**2))
        layers = []
        for i in range(ups):
            out = width * 2 ** min(ups - i - 1, 2)
            layers += [nn.SiLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
            ch = out
        layers += [nn.SiLU(), nn.Conv2d(ch, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)
        self.ch0, self.image_size = width * 2 ** min(ups, 2), image_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.net(self.fc(z).reshape(z.shape[0], self.ch0, self.start, self.start))
        if h.shape[-1] != self.image_size:  # sizes that are not 4·2^k: crop the centre
            off = (h.shape[-1] - self.image_size) // 2
            h = h[..., off : off + self.image_size, off : off + self.image_size]
        return h


class MLPDecoder(nn.Module):
    """MLP decoder ``z -> (out_dim,)``."""

    def __init__(self, latent_dim: int, out_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class TokenDecoder(nn.Module):
    """Non-autoregressive token decoder ``z -> (length, vocab)`` logits (captions of fixed length)."""

    def __init__(self, latent_dim: int, length: int, vocab_size: int, hidden: int = 256):
        super().__init__()
        self.length, self.vocab_size = length, vocab_size
        self.net = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, length * vocab_size))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).reshape(z.shape[0], self.length, self.vocab_size)
