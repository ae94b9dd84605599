r"""Conditioning dropout and guidance on the latent z of a diffusion decoder (issue 14, lever 1).

**Training** (``cond_dropout = p > 0``): each example's z is replaced, with probability p, by a learned
null latent :math:`\varnothing` before the ε-network sees it,

.. math:: \tilde z_i = \begin{cases} \varnothing & u_i < p \\ z_i & \text{otherwise} \end{cases},
          \qquad u_i \sim U(0, 1),

so one network learns both :math:`\hat\epsilon(x_t, z, t)` and the unconditional
:math:`\hat\epsilon(x_t, \varnothing, t)` (Ho & Salimans 2022, with z in place of a class label). The
decoder term of a dropped example no longer depends on z, so with p > 0 the objective is **not** the
ELBO (nor the bound of λ = g²): p = 0, the default, keeps it.

**Sampling** with guidance weight w uses

.. math:: \hat\epsilon_w(x_t, z, t) = \hat\epsilon(x_t, \varnothing, t)
          + w\,\bigl(\hat\epsilon(x_t, z, t) - \hat\epsilon(x_t, \varnothing, t)\bigr),

the ε of :math:`p_t(x_t\mid\varnothing)^{1-w}\,p_t(x_t\mid z)^{w}` (its score is the same combination of
scores): w = 1 is the plain conditional decoder (one network call per step), w = 0 ignores z, w > 1
pushes samples towards what z encodes — a dial between coherence and sample diversity. Both halves run
in one batched network call (2n rows).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .decoder_settings import diffusion_decoder_setting

__all__ = ["drop_conditioning", "GuidedEps", "check_cond_dropout", "check_guidance", "guidance_weight"]


def check_cond_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= p < 1.0):
        raise ValueError(f"cond_dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


def check_guidance(w) -> float:
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise ValueError(f"guidance must be a finite number >= 0 (1: no guidance), got {w!r}")
    return float(w)


def drop_conditioning(z: torch.Tensor, null_z: torch.Tensor, p: float) -> torch.Tensor:
    r"""``z`` with each example (all leading dims) replaced by ``null_z`` with probability ``p`` (module docstring)."""
    if p == 0.0:
        return z
    drop = torch.rand(z.shape[:-1], device=z.device) < p
    return torch.where(drop.unsqueeze(-1), null_z.to(z.dtype).expand_as(z), z)


class GuidedEps(nn.Module):
    r""":math:`\hat\epsilon_w = \hat\epsilon(x, \varnothing, t) + w(\hat\epsilon(x, z, t) - \hat\epsilon(x, \varnothing, t))`
    for an ε-network ``eps_net(x, z, t)`` and a null latent ``null_z`` of shape ``(D,)``."""

    def __init__(self, eps_net, null_z: torch.Tensor, guidance: float):
        super().__init__()
        self.eps_net, self.null_z, self.guidance = eps_net, null_z, check_guidance(guidance)

    def forward(self, x: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if z is None:
            raise ValueError("guidance needs the conditioning z; got None")
        null = self.null_z.to(z.dtype).expand_as(z)
        both = self.eps_net(torch.cat([x, x]), torch.cat([z, null]), torch.cat([t, t]))
        conditional, unconditional = both.chunk(2)
        return unconditional + self.guidance * (conditional - unconditional)


def guidance_weight(vae, w):
    """Generate with guidance weight ``w`` in every diffusion decoder of ``vae`` for the block (``None``: each
    decoder's own); yields ``{modality: w in use}`` for the diffusion decoders (empty without any) and restores
    every decoder's weight on exit. A decoder trained without conditioning dropout refuses a weight other than 1
    (it has no null latent), with the reason."""
    return diffusion_decoder_setting(vae, "guidance", w)
