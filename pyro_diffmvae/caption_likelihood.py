r"""The likelihood of an Optimus caption modality: :class:`OptimusCaptionLikelihood`.

:class:`~pyro_diffmvae.nets.text.OptimusCaptionDecoder` maps ``z`` to it; its ``log_prob`` is
:meth:`~pyro_diffmvae.nets.text.GPT2TextDecoder.log_prob` of the GPT-2 part of the packed captions
(:class:`~pyro_diffmvae.caption_codec.OptimusCaptionCodec`), a Pyro distribution with batch shape
``z.shape[:-1]``, as the multimodal model expects of every decoder's likelihood.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from pyro.distributions import TorchDistribution, constraints

from .caption_codec import OptimusCaptionCodec, attend_first

if TYPE_CHECKING:  # annotations only: nets.text imports this module
    from .nets.text import GPT2TextDecoder

__all__ = ["OptimusCaptionLikelihood"]


class OptimusCaptionLikelihood(TorchDistribution):
    r"""``p(x | z)`` of packed captions under a :class:`GPT2TextDecoder`; only the GPT-2 part is scored:

    .. math:: \log p(x\mid z) = \sum_{t=1}^{L-1} m_{d,t}\,\log \mathrm{softmax}(\mathrm{logits}_{t-1}(z, d_{<t}))[d_t],

    (``<bos>`` conditioned on, never scored; the BERT part is a function of the same caption, so it
    carries no further information).
    Batch shape ``z.shape[:-1]``, event shape ``(4 L,)``; ``log_prob`` broadcasts ``x`` against it.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, decoder: GPT2TextDecoder, codec: OptimusCaptionCodec, z: torch.Tensor, validate_args=None):
        self.decoder, self.codec, self.z = decoder, codec, z
        super().__init__(z.shape[:-1], torch.Size([4 * codec.length]), validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.nonnegative_integer, 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return OptimusCaptionLikelihood(self.decoder, self.codec, self.z.expand(batch_shape + self.z.shape[-1:]))

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        shape = torch.broadcast_shapes(self.batch_shape, x.shape[:-1])
        z = self.z.expand(shape + self.z.shape[-1:]).reshape(-1, self.z.shape[-1])
        _, _, d, m_d = self.codec.unpack(x.expand(shape + x.shape[-1:]).reshape(-1, x.shape[-1]))
        # position 0 is never scored (GPT2TextDecoder.log_prob uses mask[:, 1:]), so attending to it changes nothing
        return self.decoder.log_prob(z, d.long(), attend_first(m_d).long()).reshape(shape)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape) + self.batch_shape
        z = self.z.expand(shape + self.z.shape[-1:]).reshape(-1, self.z.shape[-1])
        ids = self.decoder.generate(z, max_length=self.codec.length, bos_id=self.codec.bos_id, eos_id=self.codec.eos_id,
                                    pad_id=self.codec.pad_id, do_sample=True)
        return self.codec.pack_generated(ids).reshape(shape + self.event_shape)
