r"""Fréchet distance of generated against real test images.

* ``evaluation.fid_inception_weights`` names a local file of the FID Inception weights (torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth``): the distance is ``FID``, the number of published
  tables, on images quantised to ``uint8`` (:class:`~pyro_diffmvae.metrics.fid.FIDInceptionFeatures`);
* else (``null``) it is ``FD_classifier``, a Fréchet distance in the penultimate feature space of the
  modality's label classifier (trained or published, :mod:`~pyro_diffmvae.evaluation.readback`) —
  not comparable with any published FID.

With a few hundred images an FD is biased upwards (its bias falls like 1/N): compare FDs only at
equal sizes. (``evaluation.inception_weights``, torchvision's ImageNet Inception reported as "FID", is
retired: its numbers were not the FID of published tables.)
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..metrics.fid import FeatureFID, FIDInceptionFeatures

__all__ = ["feature_fids", "fd_feature_space", "frechet_distance"]


def _fid_weights(ev) -> str | None:
    if ev.get("inception_weights", None):
        raise ValueError("evaluation.inception_weights (torchvision's ImageNet Inception-v3) is retired: its 'FID' is "
                         "not the FID of published tables. Set evaluation.fid_inception_weights to a local copy of the "
                         "FID Inception weights (torch-fidelity's weights-inception-2015-12-05-6726825d.pth), or leave "
                         "both null for FD_classifier")
    return ev.get("fid_inception_weights", None) or None


def feature_fids(ev, classifiers: Mapping[str, nn.Module], device=None) -> dict[str, FeatureFID]:
    """One :class:`FeatureFID` per classifier-read modality: FID with ``ev.fid_inception_weights`` (one
    Inception network, on ``device``, shared by every modality), else the FD in each classifier's features."""
    weights = _fid_weights(ev)
    if weights:
        inception = FIDInceptionFeatures(weights)
        if device is not None:
            inception.to(device)
        return {m: FeatureFID(inception) for m in classifiers}
    return {m: FeatureFID(c.feature_extractor(), name="classifier") for m, c in classifiers.items()}


def fd_feature_space(ev, fd_name: str | None) -> str | None:
    """The FD's feature space in words, for the ledger and the report."""
    if fd_name is None:
        return None
    weights = _fid_weights(ev)
    if weights:
        return (f"{fd_name}: FID Inception (torch-fidelity FeatureExtractorInceptionV3, weights {weights}), images "
                "quantised to uint8 — comparable with published FIDs at equal sample sizes")
    return (f"{fd_name}: penultimate features of each modality's label classifier — not Inception FID, not "
            "comparable with published FIDs")


def frechet_distance(fid: FeatureFID, real: torch.Tensor, fake: torch.Tensor) -> float:
    """The FD of ``fake`` against ``real`` (the metric is reset first)."""
    fid.reset()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())
