r"""Label classifiers released with a paper, loaded from local weight files, in the library's conventions.

Coherence read by a classifier this library trains (:class:`~pyro_diffmvae.metrics.coherence.FactorClassifier`)
is not comparable with published tables, which read generated samples with the authors' classifiers.
This module holds their architectures, written to match the released state dicts parameter for
parameter, and :class:`PublishedClassifier`, which puts a released network behind the interface the
evaluation reads (:func:`~pyro_diffmvae.metrics.coherence.predict_factors`, ``feature_extractor()``).

**PolyMNIST** (Sutter, Daunhawer & Vogt, *Generalized Multimodal ELBO*, ICLR 2021): the MoPoE authors
released one digit classifier per modality, files ``pretrained_img_to_digit_clf_m0`` …
``pretrained_img_to_digit_clf_m4`` (state dicts of their ``ClfImg``; the ``clf`` folder of their
PolyMNIST archive, also read by MultiVae's ``ClassifierPolyMNIST``). :class:`MoPoEDigitClassifier`
is that architecture; :func:`load_mopoe_digit_classifier` reads one file.

Input conventions: the library's images are float in [-1, 1]; MoPoE's classifiers read
``torchvision.transforms.ToTensor()`` of the PNGs, float in [0, 1]; :class:`PublishedClassifier`
maps one to the other, :math:`x_{[0,1]} = (x + 1)/2` (:func:`unit_interval`).
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
from torch import nn

from ..io import load_state_dict_strict, read_state_dict
from .coherence import PenultimateFeatures

__all__ = ["MoPoEDigitClassifier", "PublishedClassifier", "unit_interval", "load_mopoe_digit_classifier",
           "MOPOE_CLASSIFIER_FILE"]

#: the file of modality ``m``'s classifier in the released folder (``.format(modality=m)``)
MOPOE_CLASSIFIER_FILE = "pretrained_img_to_digit_clf_{modality}"


def unit_interval(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] → [0, 1] (the ``ToTensor`` convention): :math:`(x + 1)/2`."""
    return (x + 1.0) / 2.0


class MoPoEDigitClassifier(nn.Module):
    r"""MoPoE's PolyMNIST digit classifier (``ClfImg``): its layers, parameter names and shapes, so
    that the released state dicts load with ``load_state_dict(strict=True)``.

    Input ``(N, 3, 28, 28)`` float in **[0, 1]**; ``encoder`` is one ``nn.Sequential`` (the index is
    the state-dict key prefix ``encoder.<i>``):

    ====  =========================================  ============
     i    layer                                       output
    ====  =========================================  ============
     0    Conv2d(3 → 10, 4×4, stride 2, padding 1)    10 × 14 × 14
     1-2  Dropout2d(0.5), ReLU
     3    Conv2d(10 → 20, 4×4, stride 2, padding 1)   20 × 7 × 7
     4-6  Dropout2d(0.5), ReLU, flatten               980
     7    Linear(980 → 128)                           128
     8-9  Dropout(0.5), ReLU                          128 (the penultimate features)
     10   Linear(128 → 10)                            10 digit logits
    ====  =========================================  ============

    The dropouts are active only in training mode; the evaluation runs it in eval mode.
    """

    num_classes = 10
    num_features = 128

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(3, 10, kernel_size=4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.Conv2d(10, 20, kernel_size=4, stride=2, padding=1), nn.Dropout2d(0.5), nn.ReLU(),
            nn.Flatten(), nn.Linear(20 * 7 * 7, self.num_features), nn.Dropout(0.5), nn.ReLU(),
            nn.Linear(self.num_features, self.num_classes),
        )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 128)`` penultimate features of ``(N, 3, 28, 28)`` images in [0, 1]."""
        return self.encoder[:-1](x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 10)`` digit logits of ``(N, 3, 28, 28)`` images in [0, 1]."""
        return self.encoder(x)


class PublishedClassifier(nn.Module):
    """A released classifier behind the evaluation's classifier interface.

    :param net: the released network: ``net(x)`` gives ``(N, sum(num_classes))`` logits (the label
        columns side by side), ``net.features(x)`` ``(N, net.num_features)`` penultimate features,
        both of images in the network's own convention.
    :param num_classes: classes of each label column.
    :param to_input: the library's images (float in [-1, 1]) → the network's input convention.
    :param input_shape: the ``(C, H, W)`` the network reads (checked, with a clear error).

    ``forward(x)`` returns one ``(N, K_f)`` logits tensor per label column (as
    :class:`~pyro_diffmvae.metrics.coherence.FactorClassifier`); the module stays in eval mode.
    """

    def __init__(self, net: nn.Module, num_classes: Sequence[int], to_input: Callable[[torch.Tensor], torch.Tensor],
                 input_shape: Sequence[int]):
        super().__init__()
        self.net = net
        self.factor_sizes = [int(k) for k in num_classes]
        self.num_features = int(net.num_features)
        self.to_input = to_input
        self.input_shape = tuple(int(s) for s in input_shape)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{type(self.net).__name__} reads images of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return self.to_input(x)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features of images in [-1, 1]."""
        return self.net.features(self._input(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of each label column, of images in [-1, 1]."""
        return list(torch.split(self.net(self._input(x)), self.factor_sizes, dim=1))

    def feature_extractor(self) -> nn.Module:
        """The penultimate features as a module (for :class:`~pyro_diffmvae.metrics.fid.FeatureFID`)."""
        return PenultimateFeatures(self)


def load_mopoe_digit_classifier(path: str | os.PathLike) -> PublishedClassifier:
    """MoPoE's PolyMNIST digit classifier from the state dict at ``path`` (e.g.
    ``<clf folder>/pretrained_img_to_digit_clf_m0``), reading the library's [-1, 1] images.

    Read with ``torch.load(weights_only=True)`` (:func:`~pyro_diffmvae.io.read_state_dict`) and loaded
    strictly: a missing or unreadable file, a pickled module, or wrong keys or shapes is an error
    naming the file and the problem. Building the network leaves the global RNG as it was.
    """
    what = "MoPoE PolyMNIST digit classifier (ClfImg)"
    state = read_state_dict(path, what)
    with torch.random.fork_rng(devices=[]):
        net = MoPoEDigitClassifier()
    load_state_dict_strict(net, state, path, what)
    return PublishedClassifier(net, [MoPoEDigitClassifier.num_classes], unit_interval, (3, 28, 28))
