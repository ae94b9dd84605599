r"""Generated modalities read back into labels, as each modality's spec says (:mod:`pyro_diffmvae.data.spec`).

A modality read :data:`~pyro_diffmvae.data.spec.BY_CLASSIFIER` is read by a label classifier
(:class:`~pyro_diffmvae.metrics.coherence.FactorClassifier`, one per modality) trained on real
examples of the training split, cached under ``evaluation.classifier_cache`` by a key of the data
(``DatasetSpec.data_identity``), the modality, the number of training examples, the training steps
and the label sizes; any other reader is the spec's function ``x -> (N, F)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..data.spec import DatasetSpec, LabelSpec, ModalitySpec
from ..metrics.coherence import FactorClassifier, load_or_train_classifier, predict_factors, train_factor_classifier

__all__ = ["classifier_cache_path", "load_or_train_label_classifier", "read_labels", "clamp_classifier_inputs"]

#: ``() -> (images, labels, val_images, val_labels)``: the real examples a classifier is trained on
ClassifierData = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def classifier_cache_path(cfg, dataset: DatasetSpec, modality: str, n: int, labels: LabelSpec) -> Path:
    """``<evaluation.classifier_cache>/<data set>_<modality>_<hash>.pt``, the hash of everything the
    classifier depends on."""
    ev = cfg.evaluation
    ident = (f"{dataset.name}|{dataset.data_identity(cfg)}|{modality}|n{n}|steps{ev.classifier_steps}"
             f"|{list(labels.num_classes)}")
    key = hashlib.sha1(ident.encode()).hexdigest()[:16]
    return Path(ev.classifier_cache) / f"{dataset.name}_{modality}_{key}.pt"


def load_or_train_label_classifier(cfg, dataset: DatasetSpec, modality: str, n: int, labels: LabelSpec,
                                   data: ClassifierData) -> tuple[FactorClassifier, dict | None]:
    """The label classifier of ``modality`` (trained on ``n`` examples given by ``data()``), cached."""
    path = classifier_cache_path(cfg, dataset, modality, n, labels)
    path.parent.mkdir(parents=True, exist_ok=True)

    def train():
        images, targets, val_images, val_targets = data()
        with torch.enable_grad():  # the evaluation runs under no_grad
            return train_factor_classifier(images, targets, labels.num_classes, val_images=val_images,
                                           val_factors=val_targets, steps=cfg.evaluation.classifier_steps, seed=0)

    return load_or_train_classifier(path, train)


def read_labels(modality: str, x: torch.Tensor, spec: ModalitySpec, classifiers: Mapping) -> torch.Tensor | None:
    """``(N, F)`` labels read back from ``x`` by the modality's classifier or reader; ``None``: not read back."""
    if spec.by_classifier:
        return predict_factors(classifiers[modality], x)
    if spec.read is not None:
        return spec.read(x)
    return None


def clamp_classifier_inputs(modality: str, x: torch.Tensor, classifiers: Mapping) -> torch.Tensor:
    """Generated images clamped to the data range [-1, 1] before a classifier reads them (a
    feed-forward decoder's mean may overshoot it); other modalities as they are."""
    return x.clamp(-1.0, 1.0) if modality in classifiers else x
