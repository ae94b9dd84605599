r"""What a data set is, declared once: its splits, its modalities, its labels and how it is evaluated.

A :class:`DatasetSpec` is everything the builders and the evaluation need to know about a data set;
neither of them holds a data-set name. Each loader module (``data/shapes.py``, ``data/polymnist.py``,
``data/celebamask_hq.py``, ``data/cub.py``) declares its ``SPEC`` next to its loader, and
:mod:`pyro_diffmvae.data.registry` maps ``cfg.dataset.name`` (or a user's ``cfg.dataset.spec``) to it.

* :class:`ModalitySpec` — one modality: its event shape, its feed-forward likelihood, the network
  kind that encodes and decodes it (a name of :data:`pyro_diffmvae.networks.NETWORKS`), how it is
  shown in figures and how a generated sample of it is **read back** into labels.
* :class:`LabelSpec` — the per-example labels every modality should agree on: ``F`` label columns,
  column ``f`` taking ``num_classes[f]`` values, and the function reading them from a real batch.
* :class:`EvaluationSpec` — which evaluation routine scores the data set (a name of
  :data:`pyro_diffmvae.evaluation.routines.ROUTINES`), its labels, the factor groups it reports and
  whether it has a CLIP score (:class:`ClipSpec`) and released label classifiers
  (:class:`PublishedClassifiers`, read instead of trained ones when ``evaluation.classifiers_dir`` is set).

Read-back (``ModalitySpec.read``): a generated ``x`` of a modality becomes ``(N, F)`` long labels by

* :data:`BY_CLASSIFIER` — a label classifier trained on that modality of the training split
  (images: :class:`~pyro_diffmvae.metrics.coherence.FactorClassifier`); the classifier's penultimate
  features also give the modality's Fréchet distance (``FD_classifier``);
* a function ``x -> (N, F)`` (a threshold, an argmax per group, a mask's geometry, a caption parser),
  ``-1`` in the columns the modality does not carry;
* ``None`` — not read back (e.g. a caption without a parser).

``ModalitySpec.f1``: the modality is binary (attributes, masks) and also scored by the sample-average
F1 of ``x > 0.5`` against the truth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

__all__ = ["BY_CLASSIFIER", "ModalitySpec", "LabelSpec", "ClipSpec", "PublishedClassifiers", "EvaluationSpec",
           "DatasetSpec"]

#: ``ModalitySpec.read``: read back by a label classifier trained on the training split
BY_CLASSIFIER = "classifier"

Reader = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ModalitySpec:
    """One modality of a data set.

    :param shape: the event shape of one example (``(C, H, W)`` images, ``(D,)`` vectors, ``(L,)`` tokens).
    :param likelihood: the feed-forward likelihood (``normal``, ``laplace``, ``bernoulli``,
        ``categorical``, or ``optimus`` for packed BERT + GPT-2 caption ids).
    :param num_classes: the vocabulary size of a categorical modality.
    :param network: the network kind of :data:`~pyro_diffmvae.networks.NETWORKS` that encodes and
        decodes it; ``None``: chosen by shape and likelihood (:func:`~pyro_diffmvae.networks.default_network`).
    :param read: how a generated sample is read back into labels: :data:`BY_CLASSIFIER`, a function
        ``x -> (N, F)`` long labels (``-1`` where the modality carries none), or ``None``.
    :param f1: binary: scored by the sample-average F1 of ``x > 0.5`` against the truth.
    :param decode: ``tokens (L,) -> str`` for a token modality, shown as a caption in figures.
    """

    shape: tuple[int, ...]
    likelihood: str
    num_classes: int | None = None
    network: str | None = None
    read: str | Reader | None = None
    f1: bool = False
    decode: Callable[[torch.Tensor], str] | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if self.read is not None and not (self.read == BY_CLASSIFIER or callable(self.read)):
            raise ValueError(f"ModalitySpec.read must be {BY_CLASSIFIER!r}, a function x -> labels or None, "
                             f"got {self.read!r}")

    @property
    def by_classifier(self) -> bool:
        return isinstance(self.read, str) and self.read == BY_CLASSIFIER

    def as_dict(self) -> dict:
        """The builders' view: ``{shape, likelihood, [num_classes], [network]}``."""
        out: dict = {"shape": self.shape, "likelihood": self.likelihood}
        if self.num_classes is not None:
            out["num_classes"] = int(self.num_classes)
        if self.network is not None:
            out["network"] = self.network
        return out


@dataclass(frozen=True)
class LabelSpec:
    """The labels of a data set: ``F`` columns, column ``f`` with ``num_classes[f]`` classes.

    :param num_classes: classes of each label column (e.g. ``(10,)`` for a digit, ``(2,) * 18`` for
        18 binary attributes, ``(3, 6, 2, 3, 3)`` for the five shapes factors).
    :param labels_of: ``batch -> (N, F)`` long labels of a collated batch of real examples.
    """

    num_classes: tuple[int, ...]
    labels_of: Callable[[Mapping], torch.Tensor]

    def __post_init__(self):
        object.__setattr__(self, "num_classes", tuple(int(k) for k in self.num_classes))

    @property
    def multi_binary(self) -> bool:
        """Several binary labels (attributes): coherence is then the mean per-label accuracy."""
        return len(self.num_classes) > 1 and all(k == 2 for k in self.num_classes)


@dataclass(frozen=True)
class ClipSpec:
    """A CLIP score of generated ``image`` against the test captions, when ``caption`` is given
    (paper Table 2): ``100 * max(cos(E_image, E_caption), 0)`` averaged over the test examples.

    :param captions: ``(test_set, truth batch) -> list[str]``, the raw caption of each test example.
    """

    image: str
    caption: str
    captions: Callable[[object, Mapping], list[str]]


@dataclass(frozen=True)
class PublishedClassifiers:
    """Label classifiers released with a paper, one file per classifier-read modality in the folder
    ``evaluation.classifiers_dir``: the evaluation reads them instead of training its own, so that
    its coherence is comparable with the published tables.

    :param name: what they are, for reports (``"MoPoE ClfImg"``).
    :param file_name: a modality's file in the folder, ``file_name.format(modality=m)``
        (``"pretrained_img_to_digit_clf_{modality}"``).
    :param load: ``path -> classifier`` in the library's conventions (forward: images in [-1, 1] →
        one ``(N, K_f)`` logits tensor per label column; ``feature_extractor()``; ``factor_sizes``),
        e.g. a :class:`~pyro_diffmvae.metrics.published_classifiers.PublishedClassifier`; a missing or
        bad file raises an error naming it.
    """

    name: str
    file_name: str
    load: Callable[[object], object]


@dataclass(frozen=True)
class EvaluationSpec:
    """How a data set is evaluated.

    :param routine: a name of :data:`~pyro_diffmvae.evaluation.routines.ROUTINES`: ``"labels"``
        (coherence of read-back labels, F1, FD, latent linear probe, CLIP) or ``"factors"`` (per-factor
        accuracy of read-back scene factors, F1, FD, pairwise agreement, likelihood bound in bits/dim).
    :param labels: ``(cfg, train_set) -> LabelSpec`` (a data set may take its classes from the training split).
    :param factor_groups: ``"factors"`` routine: ``{group: label columns}``; ``<m>_<group>`` is the
        fraction of generated ``m`` whose read-back labels are right in every column of the group.
    :param clip: the CLIP score, or ``None``.
    :param published_classifiers: released label classifiers, read when ``evaluation.classifiers_dir``
        is set (``None``: the data set has none, and setting it is an error).
    """

    routine: str
    labels: Callable[[object, object], LabelSpec]
    factor_groups: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    clip: ClipSpec | None = None
    published_classifiers: PublishedClassifiers | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """A data set as the builders and the evaluation see it.

    :param name: its ``cfg.dataset.name``.
    :param title: a human name for messages and reports (``"CUB"``, ``"CelebAMask-HQ"``).
    :param build: ``cfg -> (train, val, test)`` data sets of ``cfg.dataset``; each example is
        ``{modality: tensor, ..., "meta": {...}}``.
    :param modalities: ``cfg -> {modality: ModalitySpec}``, every modality the data set can have
        under ``cfg`` (``cfg.dataset.modalities`` chooses among them).
    :param evaluation: how it is evaluated (``None``: not at all).
    :param text_nets: the values of ``model.text_nets`` its token modalities accept.
    :param data_identity: ``cfg -> str`` naming the data the classifiers are trained on (part of
        their cache key: a change of the data must retrain them).
    """

    name: str
    title: str
    build: Callable[[object], tuple]
    modalities: Callable[[object], Mapping[str, ModalitySpec]]
    evaluation: EvaluationSpec | None = None
    text_nets: tuple[str, ...] = ("tokens",)
    data_identity: Callable[[object], str] = lambda cfg: str(cfg.dataset.get("root", ""))

    def __post_init__(self):
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"DatasetSpec.name must be a non-empty string, got {self.name!r}")
