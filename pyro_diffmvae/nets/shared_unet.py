r"""One ε-network shared by the diffusion decoders of modalities of the same kind (issue 14, a lever).

With ``model.unet.shared=true`` the diffusion modalities of one image shape (PolyMNIST's five digit
images) are decoded by **one** :class:`~pyro_diffmvae.nets.unet.ConditionalUNet`; each modality m keeps its
own decoder and adds its own learned offset :math:`e_m \in \mathbb R^D` to the latent before the network:

.. math:: \hat\epsilon_m(x_t, z, t) = \hat\epsilon_\theta(x_t,\; z + e_m,\; t).

z enters the UNet through linear maps only — the first layer of ``z_proj`` (whose output is added to the
time embedding of every residual block) and ``z_map`` (the 4×4 map concatenated to the input) — so
:math:`W(z + e_m) = Wz + We_m`: the offset is a learned **modality embedding** at both of z's entry
points, the way class embeddings enter a class-conditional UNet, and needs no change to the network.
The null latent of conditioning dropout (:mod:`~pyro_diffmvae.guidance`) is offset too, so the
unconditional half still knows which modality it models.

Why share: M modalities give the network M times the data per step and 1/M of the parameters, and
what it learns about digits in one background transfers to the others; the cost per step is unchanged
(each modality still has its own forward pass). The ELBO is unchanged: each decoder is still a
:class:`~pyro_diffmvae.modality.DiffusionDecoder` with its own likelihood term; only its θ is tied.

The offsets start as draws of N(0, I) (the scale of z under the prior) so that the modalities are told
apart from the first step; with zeros the network would receive identical inputs for every modality
until the offsets' gradients pulled them apart.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ModalityOffset"]


class ModalityOffset(nn.Module):
    r"""``net(x_t, z + offset, t)``: a (shared) ε-network seen by one modality (module docstring).

    :param net: the ε-network ``net(x_t, z, t)``, the same object for every modality that shares it.
    :param latent_dim: D, the size of z and of the offset.
    """

    def __init__(self, net: nn.Module, latent_dim: int):
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive int, got {latent_dim!r}")
        self.net = net
        self.offset = nn.Parameter(torch.randn(latent_dim))

    def forward(self, x_t: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        if z is None or z.shape[-1] != self.offset.shape[0]:
            got = None if z is None else tuple(z.shape)
            raise ValueError(f"a modality's shared ε-network needs z of shape (B, {self.offset.shape[0]}); got {got}")
        return self.net(x_t, z + self.offset.to(z.dtype), t)
