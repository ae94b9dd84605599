r"""A diffusion decoder that sees z as an image: the ε-network conditioned on a feed-forward decoding of z
(issue 14, a lever; the DiffuseVAE construction of Pandey et al. 2022, *DiffuseVAE: efficient, controllable
and high-fidelity generation from low-dimensional latents*).

With ``model.unet.hint=true`` a diffusion modality gets a **hint**: a feed-forward decoder
:math:`p_\phi(x\mid z)` of the modality (the one a feed-forward model would use: Laplace with the conv
decoder on PolyMNIST), whose mean :math:`\hat x_\phi(z)` is concatenated to :math:`x_t` as extra input
channels of the ε-network (built with twice the image's channels in, the image's channels out):

.. math:: \hat\epsilon_\theta(x_t, z, t) = \mathrm{UNet}_\theta\big([\,x_t,\ \hat x_\phi(z)\,],\ z,\ t\big).

z then reaches the network at every pixel and at full resolution, spatially aligned with :math:`x_t` —
where the time embedding (``z_proj``) and the 4×4 map (``z_spatial_channels``) give it only a vector
and a coarse map. At high noise, where :math:`x_t` says almost nothing, the network can read what to
draw where from :math:`\hat x_\phi(z)`.

The decoder is still an ε-network :math:`\hat\epsilon(x_t, z, t)`: :math:`\hat x_\phi` is a deterministic
function of z, so the likelihood, its bound (with λ = g²) and the samplers are unchanged, and φ is trained
by the diffusion loss through the concatenation. :class:`~pyro_diffmvae.objectives.HintELBO`
(``model.objective=elbo_hint``) adds γ times the hint's own log-likelihood :math:`\log p_\phi(x\mid z)`, so
that :math:`\hat x_\phi(z)` is a reconstruction (DiffuseVAE's first stage, trained jointly here); with
γ > 0 that objective is not a bound.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["HintedEps", "find_hint"]


class HintedEps(nn.Module):
    r"""``net([x_t, hint_mean(z)], z, t)``: an ε-network that also sees the feed-forward decoding of z
    (module docstring).

    :param net: the ε-network, taking ``x_t``'s channels plus the hint's (a
        :class:`~pyro_diffmvae.nets.unet.ConditionalUNet` with ``in_channels = 2C``, ``out_channels = C``).
    :param hint: a :class:`~pyro_diffmvae.modality.FeedForwardDecoder` of the modality (Normal or Laplace: its
        mean is an image of ``x_t``'s shape).
    """

    def __init__(self, net: nn.Module, hint: nn.Module):
        super().__init__()
        likelihood = getattr(hint, "likelihood", None)
        if likelihood not in ("normal", "laplace"):
            raise ValueError(f"a hint must be a feed-forward decoder with a normal or laplace likelihood (its mean is an "
                             f"image), got {type(hint).__name__} with likelihood {likelihood!r}")
        self.net = net
        self.hint = hint

    def forward(self, x_t: torch.Tensor, z: torch.Tensor, t) -> torch.Tensor:
        if z is None:
            raise ValueError("a hinted ε-network decodes z into its hint; got z=None")
        hint = self.hint.mean(z)
        if hint.shape != x_t.shape:
            raise ValueError(f"the hint decoder gives images of shape {tuple(hint.shape)}, x_t has shape {tuple(x_t.shape)}")
        return self.net(torch.cat([x_t, hint.to(x_t.dtype)], 1), z, t)


def find_hint(eps_net: nn.Module) -> nn.Module | None:
    """The hint decoder inside ``eps_net`` (through wrappers that hold their network as ``.net``), or None."""
    net = eps_net
    while isinstance(net, nn.Module):
        if isinstance(net, HintedEps):
            return net.hint
        net = getattr(net, "net", None)
    return None
