"""The label-based evaluation under its former module name: a re-export of
:mod:`pyro_diffmvae.evaluation` (the ``"labels"`` routine is
:func:`~pyro_diffmvae.evaluation.routines.evaluate_with_labels`; a data set's labels are its
:class:`~pyro_diffmvae.data.spec.LabelSpec`)."""

from __future__ import annotations

from typing import Sequence

from .data.registry import get_dataset
from .data.spec import LabelSpec
from .evaluation import evaluate_with_labels, given_subsets, linear_probe_accuracy

__all__ = ["LabelSpec", "label_spec", "evaluate_with_labels", "linear_probe_accuracy", "given_subsets"]


def label_spec(cfg, names: Sequence[str], train_set) -> LabelSpec:
    """The :class:`LabelSpec` of ``cfg.dataset`` (``names`` is kept for the former signature)."""
    dataset = get_dataset(cfg)
    if dataset.evaluation is None:
        raise ValueError(f"data set {dataset.name!r} declares no evaluation, hence no labels")
    return dataset.evaluation.labels(cfg, train_set)
