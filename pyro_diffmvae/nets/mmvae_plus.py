r"""The networks of MMVAE+ (Palumbo et al. 2023): an encoder of the shared and the private latent,
and a decoder over :math:`[z, w_m]` that holds the learned scale of the auxiliary prior :math:`r_m(w_m)`
(the objective is :class:`pyro_diffmvae.objectives.MMVAEPlus`)."""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["SharedPrivateEncoder", "PrivateLatentDecoder"]


class SharedPrivateEncoder(nn.Module):
    r"""MMVAE+ encoder of one modality: the shared expert :math:`q(z\mid x_m)` (``forward``, so the
    modality still works everywhere a :class:`~pyro_diffmvae.modality.Modality` encoder is expected)
    and the private posterior :math:`q(w_m\mid x_m)` (:meth:`private`).

    :param shared: ``x -> (mu_z, logvar_z)``, each ``(B, D)``.
    :param private: ``x -> (mu_w, logvar_w)``, each ``(B, D_w)`` (MMVAE+'s code also uses two
        separate trunks, one per latent).
    """

    def __init__(self, shared: nn.Module, private: nn.Module):
        super().__init__()
        self.shared, self.private_encoder = shared, private

    def forward(self, x):
        return self.shared(x)

    def private(self, x):
        """``(mu_w, logvar_w)`` in at least float32 (upcast from bf16/fp16 under autocast, like the
        shared experts in ``MultimodalVAE.experts``)."""
        out = self.private_encoder(x)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("the private encoder must return (mu_w, logvar_w)")
        return tuple(v.to(torch.promote_types(v.dtype, torch.float32)) for v in out)


class PrivateLatentDecoder(nn.Module):
    r"""MMVAE+ decoder of one modality: wraps a decoder over :math:`u = [z, w_m]` (size D + D_w) and
    holds the learnable scale of the auxiliary prior :math:`r_m(w_m) = \mathcal N(0, \mathrm{diag}\,s_m^2)`
    used for cross-modal reconstruction during training.

    Called with ``D + D_w`` latents it is the wrapped decoder. Called with ``D`` latents (as
    ``MultimodalVAE.model``, ``decode``, ``generate`` and ``sample`` do) it draws
    :math:`w_m\sim p(w)=\mathcal N(0, I)` and decodes :math:`[z, w_m]` — MMVAE+'s conditional and
    unconditional generation (the authors' ``self_and_cross_modal_generation_forward`` and
    ``generate_unconditional`` draw w from the prior p(w)).

    :param decoder: a :class:`~pyro_diffmvae.modality.FeedForwardDecoder` or ``DiffusionDecoder``
        whose network takes ``latent_dim + private_dim`` inputs (``build_model`` sizes it so).
    :param latent_dim: D (shared); ``private_dim``: D_w.
    :param aux_scale: initial scale of r(w) (learned).

    Other attributes (``event_shape``, ``check_data``, ``is_diffusion``, ``eps_net`` …) are the
    wrapped decoder's.
    """

    def __init__(self, decoder: nn.Module, latent_dim: int, private_dim: int, aux_scale: float = 1.0):
        super().__init__()
        if not (private_dim > 0 and latent_dim > 0):
            raise ValueError(f"latent_dim and private_dim must be positive, got {latent_dim}, {private_dim}")
        if not aux_scale > 0:
            raise ValueError(f"aux_scale must be positive, got {aux_scale}")
        self.decoder = decoder
        self.latent_dim, self.private_dim = int(latent_dim), int(private_dim)
        self.aux_log_scale = nn.Parameter(torch.full((self.private_dim,), math.log(aux_scale)))

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("decoder"), name)

    def aux_scale(self) -> torch.Tensor:
        """The scale :math:`s_m` of the auxiliary prior r(w_m), shape ``(D_w,)``."""
        return self.aux_log_scale.exp()

    def _with_private(self, u: torch.Tensor) -> torch.Tensor:
        if u.shape[-1] == self.latent_dim + self.private_dim:
            return u
        if u.shape[-1] != self.latent_dim:
            raise ValueError(
                f"PrivateLatentDecoder expects latents of size {self.latent_dim} (z) or "
                f"{self.latent_dim + self.private_dim} ([z, w]), got {tuple(u.shape)}"
            )
        w = torch.randn(u.shape[:-1] + (self.private_dim,), dtype=u.dtype, device=u.device)  # w ~ p(w) = N(0, I)
        return torch.cat([u, w], -1)

    def forward(self, u: torch.Tensor):
        return self.decoder(self._with_private(u))

    @torch.no_grad()
    def generate(self, z: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.decoder.generate(self._with_private(z), **kwargs)
