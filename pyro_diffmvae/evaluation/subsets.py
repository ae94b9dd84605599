"""Which modalities are given, and the test batch they are taken from."""

from __future__ import annotations

import itertools
from typing import Mapping, Sequence

import torch

__all__ = ["given_subsets", "slice_batch", "restrict", "collate"]


def given_subsets(names: Sequence[str], max_per_size: int | None = None) -> list[tuple[str, ...]]:
    """Every non-empty proper subset of the modalities (the given sets of Table 3), in order of
    size; at most ``max_per_size`` of each size when given."""
    out = []
    for r in range(1, len(names)):
        combos = list(itertools.combinations(names, r))
        out += combos if max_per_size is None else combos[:max_per_size]
    return out


def slice_batch(batch: Mapping, index) -> dict:
    """Every tensor of a (nested) batch indexed by ``index`` along the batch dim (e.g. ``slice(0, k)``)."""
    return {k: (slice_batch(v, index) if isinstance(v, Mapping) else v[index]) for k, v in batch.items()}


def restrict(batch: Mapping, given: Sequence[str]) -> dict:
    """The batch restricted to the given modalities."""
    return {k: v for k, v in batch.items() if k in given}


def collate(dataset, indices: Sequence[int]) -> dict:
    """Examples ``indices`` of ``dataset`` as one batch (``default_collate``, as a ``DataLoader`` batches them)."""
    return torch.utils.data.default_collate([dataset[i] for i in indices])
