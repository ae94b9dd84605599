r"""CLIP score of generated images against the test captions (paper Table 2), when the data set
declares one (:class:`~pyro_diffmvae.data.spec.ClipSpec`) and ``evaluation.clip_model`` names a local
CLIP folder.

``100 * max(cos(E_image, E_caption), 0)`` averaged over the test examples
(:class:`~pyro_diffmvae.metrics.clip_score.CLIPScore`), where the caption is the data set's raw
caption of each test example (``ClipSpec.captions``; not the lossy decoding of its token ids). The
real test images against their own captions are the reference (``reference["real_images_clip_score"]``);
``clip_model`` records the folder (``None``: no CLIP score was computed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..data.spec import ClipSpec

__all__ = ["CaptionScorer", "caption_scorer"]


@dataclass
class CaptionScorer:
    """A CLIP scorer with the test captions it scores the ``spec.image`` modality against."""

    spec: ClipSpec
    score: object  # a CLIPScore: (images, captions) -> float
    captions: list[str]

    def applies(self, target: str, given: Sequence[str]) -> bool:
        """Generated ``target`` is scored when it is the image and the caption is given."""
        return target == self.spec.image and self.spec.caption in given

    def __call__(self, images: torch.Tensor) -> float:
        return self.score(images, self.captions)


def caption_scorer(spec: ClipSpec | None, vae, test_set, truth: Mapping, names: Sequence[str], ev,
                   metrics: dict) -> CaptionScorer | None:
    """The scorer of ``spec`` (``None`` without a spec, a CLIP folder or the image modality); records
    ``clip_model`` and the real images' reference score in ``metrics`` when the data set declares a CLIP score."""
    if spec is None:
        return None
    clip_model = ev.get("clip_model", None)
    scorer = None
    if clip_model is not None and spec.image in names:
        from ..metrics.clip_score import CLIPScore

        score = CLIPScore(clip_model, device=next(vae.parameters()).device, batch_size=int(ev.batch_size))
        scorer = CaptionScorer(spec, score, spec.captions(test_set, truth))
        metrics["reference"] = {"real_images_clip_score": scorer(truth[spec.image])}
    metrics["clip_model"] = None if scorer is None else str(clip_model)
    return scorer
