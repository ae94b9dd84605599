"""Expert encoders ``x -> (mu, logvar)`` for images, vectors and token sequences.

Every encoder returns the parameters of a diagonal Gaussian expert q(z | x^m) = N(mu, diag exp(logvar)),
each of shape ``(batch, latent_dim)``. The log-variance is soft-clamped to [-logvar_bound, logvar_bound]
(``bound * tanh(h / bound)``) so that a single bad step cannot produce an infinite precision in the PoE;
``logvar_bound=None`` leaves it unclamped (as the MoPoE authors' PolyMNIST encoders are).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvEncoder", "MLPEncoder", "TokenEncoder"]


def _split(h: torch.Tensor, bound: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    mu, logvar = h.chunk(2, dim=-1)
    return mu, logvar if bound is None else bound * torch.tanh(logvar / bound)


class ConvEncoder(nn.Module):
    """Strided-conv encoder for ``(C, S, S)`` images: ``num_downsamples`` stride-2 convs, then a linear head."""

    def __init__(self, in_channels: int, image_size: int, latent_dim: int, width: int = 32,
                 num_downsamples: int = 3, logvar_bound: float | None = 10.0):
        super().__init__()
        layers, ch, size = [], in_channels, image_size
        for i in range(num_downsamples):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(ch, out, 4, stride=2, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU()]
            ch, size = out, size // 2  # k=4, s=2, p=1: floor(n / 2)
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.head = nn.Sequential(nn.Linear(ch * size * size, 256), nn.SiLU(), nn.Linear(256, 2 * latent_dim))
        self.in_shape = (in_channels, image_size, image_size)
        self.logvar_bound = logvar_bound

    def forward(self, x: torch.Tensor):
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"ConvEncoder expects (batch, {', '.join(map(str, self.in_shape))}), got {tuple(x.shape)}")
        return _split(self.head(self.features(x)), self.logvar_bound)


class MLPEncoder(nn.Module):
    """MLP encoder for flat vectors (e.g. attribute vectors)."""

    def __init__(self, in_dim: int, latent_dim: int, hidden: int = 256, logvar_bound: float | None = 10.0):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent_dim))
        self.logvar_bound = logvar_bound

    def forward(self, x: torch.Tensor):
        return _split(self.net(x.float()), self.logvar_bound)


class TokenEncoder(nn.Module):
    """Encoder for fixed-length token sequences: embeddings, a 1-D conv, mean-pool and a linear head."""

    def __init__(self, vocab_size: int, length: int, latent_dim: int, embed_dim: int = 64, hidden: int = 256,
                 logvar_bound: float | None = 10.0):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.position = nn.Parameter(torch.zeros(length, embed_dim))
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(length * embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        self.logvar_bound = logvar_bound

    def forward(self, tokens: torch.Tensor):
        return _split(self.net(self.embed(tokens.long()) + self.position), self.logvar_bound)
