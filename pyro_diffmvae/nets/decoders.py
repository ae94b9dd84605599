"""Feed-forward decoder networks ``z -> likelihood parameters`` (used inside FeedForwardDecoder)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvDecoder", "CompactConvDecoder", "IMAGE_DECODERS", "MLPDecoder", "TokenDecoder"]


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


class CompactConvDecoder(nn.Module):
    r"""A light transposed-conv decoder ``z -> (C, S, S)``, about a tenth of :class:`ConvDecoder`'s cost.

    A linear layer to a ``(w·2^min(n−1, 2), s_0, s_0)`` map (``n`` upsamplings: ``4w`` from three on), then
    3×3 stride-2 transposed convolutions that halve the channels down to ``w``, the last one straight to ``C``
    channels, SiLU between. The sizes run
    backwards from ``S`` by halving, rounded up, until at most 4 (28 → 14 → 7 → 4); a 3×3 stride-2
    transposed convolution (padding 1) maps ``s`` to ``2s − 1 + p`` with the output padding
    ``p = s_{next} − (2s − 1) ∈ {0, 1}``. At 28 px and ``w = 32`` (128 → 64 → 32 → 3) it costs
    ``16·9·128·64 + 49·9·64·32 + 196·9·32·3 + 32·2048 = 2,317,696`` multiply-adds per image, against
    22.4 M for :class:`ConvDecoder` (4×4 kernels from a 4×4 map to 32×32, then a 3×3 convolution):
    the size of the PolyMNIST image decoder of the MoPoE authors (which has ReLU where this has SiLU),
    for evaluations that decode hundreds of images per example (``model.image_decoder=compact``).
    """

    def __init__(self, latent_dim: int, out_channels: int, image_size: int, width: int = 32):
        super().__init__()
        if image_size <= 4:
            raise ValueError(f"CompactConvDecoder needs an image size above 4, got {image_size}")
        sizes = [image_size]
        while sizes[-1] > 4:
            sizes.append(-(-sizes[-1] // 2))
        sizes.reverse()  # s_0 (<= 4) ... image_size
        ups = len(sizes) - 1
        channels = [width * 2 ** min(ups - 1 - i, 2) for i in range(ups)] + [out_channels]
        self.start_shape = (channels[0], sizes[0], sizes[0])
        self.fc = nn.Linear(latent_dim, channels[0] * sizes[0] ** 2)
        layers = []
        for i in range(ups):
            layers += [nn.SiLU(), nn.ConvTranspose2d(channels[i], channels[i + 1], 3, stride=2, padding=1,
                                                     output_padding=sizes[i + 1] - (2 * sizes[i] - 1))]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(self.fc(z).reshape(z.shape[0], *self.start_shape))


#: the values of ``model.image_decoder``: the feed-forward image decoder of the ``conv`` network kind
IMAGE_DECODERS = {"conv": ConvDecoder, "compact": CompactConvDecoder}


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
