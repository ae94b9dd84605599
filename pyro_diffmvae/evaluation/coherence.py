r"""Coherence: do the labels read back from generated modalities equal the truth, and each other?

* :func:`label_scores` — ``<m>_coherence``: the fraction of generated ``m`` whose read-back labels
  all equal the test example's (several binary labels: the mean per-label accuracy, and the
  sample-average F1 of the read-back labels, ``<m>_label_f1``);
* :func:`factor_scores` — ``<m>_factor_acc`` (mean per-factor accuracy), ``<m>_all_factors`` (every
  factor right) and ``<m>_<group>`` (every factor of a group right);
* :func:`pairwise_agreement` — unconditional samples: the fraction on which every pair of modalities
  agrees on every factor both carry (a column a modality does not carry is -1 throughout);
* :func:`all_agree` — unconditional samples: the fraction on which every read-back modality gives
  the same labels.
"""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch

from ..data.spec import LabelSpec
from ..metrics.coherence import factor_accuracy
from ..metrics.f1 import sample_f1

__all__ = ["label_scores", "factor_scores", "pairwise_agreement", "all_agree", "agree_per_example"]


def label_scores(modality: str, read: torch.Tensor, labels: torch.Tensor, spec: LabelSpec) -> dict[str, float]:
    """``<m>_coherence`` (and ``<m>_label_f1`` for several binary labels) of read-back labels."""
    if spec.multi_binary:
        return {f"{modality}_coherence": (read == labels).float().mean().item(),
                f"{modality}_label_f1": sample_f1(read.bool(), labels.bool())}
    return {f"{modality}_coherence": (read == labels).all(1).float().mean().item()}


def factor_scores(modality: str, read: torch.Tensor, factors: torch.Tensor,
                  groups: Mapping[str, Sequence[int]]) -> dict[str, float]:
    """``<m>_factor_acc``, ``<m>_all_factors`` and ``<m>_<group>`` of read-back factors against the truth."""
    acc = factor_accuracy(read, factors)
    out = {f"{modality}_factor_acc": acc["mean"], f"{modality}_all_factors": acc["all"]}
    for group, columns in groups.items():
        columns = list(columns)
        out[f"{modality}_{group}"] = (read[:, columns] == factors[:, columns]).all(1).float().mean().item()
    return out


def pairwise_agreement(preds: Mapping[str, torch.Tensor]) -> float:
    """Fraction of examples on which every pair of modalities agrees on every factor both carry."""
    names = list(preds)
    ok = torch.ones(next(iter(preds.values())).shape[0], dtype=torch.bool)
    for a, b in itertools.combinations(names, 2):
        pa, pb = preds[a], preds[b]
        shared = [j for j in range(pa.shape[1]) if (pa[:, j] >= 0).any() and (pb[:, j] >= 0).any()]
        ok &= (pa[:, shared] == pb[:, shared]).all(1) & (pa[:, shared] >= 0).all(1)
    return ok.float().mean().item()


def agree_per_example(reads: Sequence[torch.Tensor]) -> torch.Tensor:
    """``(N,)`` bool: whether every read-back modality gives example i the same labels."""
    agree = torch.ones(reads[0].shape[0], dtype=torch.bool)
    for r in reads[1:]:
        agree &= (r == reads[0]).all(1)
    return agree


def all_agree(reads: Sequence[torch.Tensor]) -> float:
    """Fraction of examples on which every read-back modality gives the same labels."""
    return agree_per_example(reads).float().mean().item()
