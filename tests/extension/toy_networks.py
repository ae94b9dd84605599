"""A user's networks outside the package, named in the config by ``model.networks.<modality>.<part>._target_``.

The builder instantiates them with ``shape`` (the modality's event shape), ``latent_dim`` and the
config's own keys.
"""

from __future__ import annotations

import torch
from torch import nn


class ToyEncoder(nn.Module):
    """``x (N, D) -> (mu, logvar)``, each ``(N, latent_dim)``, by one hidden layer of ``hidden`` units."""

    def __init__(self, shape, latent_dim: int, hidden: int = 16):
        super().__init__()
        self.hidden = hidden
        self.net = nn.Sequential(nn.Linear(shape[0], hidden), nn.ReLU(), nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x: torch.Tensor):
        mu, logvar = self.net(x.float()).chunk(2, dim=-1)
        return mu, logvar


class ConstantLogits(nn.Module):
    """A decoder net that ignores ``z``: the logits ``+10`` for class ``winner`` and ``-10`` elsewhere,
    so the decoded probabilities are (almost exactly) ``onehot(winner)`` whatever the latent."""

    def __init__(self, shape, latent_dim: int, winner: int = 0):
        super().__init__()
        logits = torch.full(tuple(shape), -10.0)
        logits[winner] = 10.0
        self.register_buffer("logits", logits)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(z.shape[0], *self.logits.shape)
