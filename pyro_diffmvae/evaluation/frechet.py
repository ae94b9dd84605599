r"""Fréchet distance of generated against real test images.

In the penultimate feature space of the modality's label classifier (``FD_classifier``), or Inception
FID when ``evaluation.inception_weights`` names a local Inception-v3 state dict. With a few hundred
images an FD is biased upwards (its bias falls like 1/N): compare FDs only at equal sizes.
"""

from __future__ import annotations

import torch

from ..metrics.coherence import FactorClassifier
from ..metrics.fid import FeatureFID

__all__ = ["feature_fid", "frechet_distance"]


def feature_fid(ev, classifier: FactorClassifier) -> FeatureFID:
    """Inception FID with ``ev.inception_weights``, else the FD in ``classifier``'s features."""
    if ev.inception_weights:
        return FeatureFID.inception(ev.inception_weights)
    return FeatureFID(classifier.feature_extractor(), name="classifier")


def frechet_distance(fid: FeatureFID, real: torch.Tensor, fake: torch.Tensor) -> float:
    """The FD of ``fake`` against ``real`` (the metric is reset first)."""
    fid.reset()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())
