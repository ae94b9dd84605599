r"""Generated modalities read back into labels, as each modality's spec says (:mod:`pyro_diffmvae.data.spec`).

A modality read :data:`~pyro_diffmvae.data.spec.BY_CLASSIFIER` is read by a label classifier, one
per modality (:func:`label_classifier`):

* with ``evaluation.classifiers_dir`` set, the classifiers released with a paper that the data set
  declares (``EvaluationSpec.published_classifiers``, e.g. MoPoE's PolyMNIST ``ClfImg``), read from
  ``<classifiers_dir>/<file name of the modality>`` — the numbers are then comparable with the
  published tables; a data set that declares none is an error;
* else a :class:`~pyro_diffmvae.metrics.coherence.FactorClassifier` trained on real examples of the
  training split, cached under ``evaluation.classifier_cache`` by a key of the data
  (``DatasetSpec.data_identity``), the modality, the number of training examples, the training steps
  and the label sizes — numbers read with it are not comparable with published ones.

Each comes with its info, ``{"source": ..., ...}``: ``"published (<name> from <path>)"`` or
``"trained by this run (cache <path>)"`` / ``"trained by an earlier run (cache <path>)"``, recorded in
``metrics["classifier"]`` and the ledger. Any other reader is the spec's function ``x -> (N, F)``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import nn

from ..data.registry import DATASETS
from ..data.spec import DatasetSpec, LabelSpec, ModalitySpec
from ..metrics.coherence import FactorClassifier, load_or_train_classifier, predict_factors, train_factor_classifier

__all__ = ["classifier_cache_path", "label_classifier", "load_or_train_label_classifier", "published_label_classifier",
           "read_labels", "clamp_classifier_inputs"]

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


def label_classifier(cfg, dataset: DatasetSpec, modality: str, n: int, labels: LabelSpec,
                     data: ClassifierData) -> tuple[nn.Module, dict]:
    """``(classifier, info)`` of ``modality``: the data set's published one with
    ``evaluation.classifiers_dir``, else trained on ``n`` examples given by ``data()`` (module docstring)."""
    folder = cfg.evaluation.get("classifiers_dir", None)
    if folder:
        return published_label_classifier(folder, dataset, modality, labels)
    return load_or_train_label_classifier(cfg, dataset, modality, n, labels, data)


def published_label_classifier(folder, dataset: DatasetSpec, modality: str, labels: LabelSpec) -> tuple[nn.Module, dict]:
    """``(classifier, {"source", "path"})``: the released classifier of ``modality`` in ``folder``, as
    the data set's ``EvaluationSpec.published_classifiers`` declares it."""
    published = dataset.evaluation.published_classifiers
    if published is None:
        having = sorted(n for n, s in DATASETS.items() if s.evaluation is not None
                        and s.evaluation.published_classifiers is not None)
        raise ValueError(f"evaluation.classifiers_dir={folder} is set, but data set {dataset.title!r} declares no "
                         f"published classifiers (EvaluationSpec.published_classifiers); data sets that do: {having}. "
                         "Set evaluation.classifiers_dir=null to train the label classifiers")
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"evaluation.classifiers_dir={folder} is not a folder (it should hold the "
                                f"{published.name} files {published.file_name.format(modality='<modality>')})")
    path = Path(folder) / published.file_name.format(modality=modality)
    net = published.load(path)
    sizes = tuple(int(k) for k in net.factor_sizes)
    if sizes != labels.num_classes:
        raise ValueError(f"{published.name} in {path} has label columns of {list(sizes)} classes, but data set "
                         f"{dataset.title!r} has {list(labels.num_classes)}")
    return net, {"source": f"published ({published.name} from {path})", "path": str(path)}


def load_or_train_label_classifier(cfg, dataset: DatasetSpec, modality: str, n: int, labels: LabelSpec,
                                   data: ClassifierData) -> tuple[FactorClassifier, dict]:
    """The label classifier of ``modality`` (trained on ``n`` examples given by ``data()``), cached;
    its info: ``"source"`` and the held-out accuracy of the training (``"mean"``, ``"per_factor"``, ``"all"``)."""
    path = classifier_cache_path(cfg, dataset, modality, n, labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    source = f"trained by {'an earlier run' if path.exists() else 'this run'} (cache {path})"

    def train():
        images, targets, val_images, val_targets = data()
        with torch.enable_grad():  # the evaluation runs under no_grad
            return train_factor_classifier(images, targets, labels.num_classes, val_images=val_images,
                                           val_factors=val_targets, steps=cfg.evaluation.classifier_steps, seed=0)

    net, info = load_or_train_classifier(path, train)
    return net, {"source": source, **(info or {})}


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
