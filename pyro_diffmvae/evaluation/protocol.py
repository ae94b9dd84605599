r"""The evaluation protocol: which test examples and which given subsets are scored, and how.

``evaluation.protocol`` names one of :data:`PROTOCOLS`:

* ``standard`` (the default) — the whole test split and every non-empty proper given subset
  (:math:`2^M - 2` of them): the protocol of the MoPoE, MMVAE+ and MultiVae PolyMNIST tables;
* ``quick`` — the first 64 test examples and the first 2 given subsets of each size: a cheap
  check for CPU presets, never comparable to ``standard`` numbers.

``evaluation.num_examples`` and ``evaluation.max_subsets_per_size`` are ``null`` by default: the
protocol's values. An integer overrides them; a run whose effective settings differ from its
protocol's is labelled ``"<protocol> (modified: ...)"`` (:attr:`ResolvedProtocol.label`), so that a
table never mixes it with runs of the protocol itself.

Coherence is reported under both conventions (:data:`COHERENCE_CONVENTIONS`): **missing targets
only** (MMVAE+ / MultiVae's ``CoherenceEvaluator``: the coherence of a given subset is the mean
over the modalities not given; ``coherence``, the default of the tables) and **all targets**
(MoPoE's ``test_generation``: the given modalities are regenerated from the same latent and scored
too; ``coherence_all_targets``).

A key and not a hydra config group: ``evaluation.protocol=quick`` reads like every other
evaluation key, a preset sets it in one line next to its other evaluation keys, and
``diffmvae-evaluate`` takes it from the command line like them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .subsets import given_subsets

__all__ = ["PROTOCOLS", "COHERENCE_CONVENTIONS", "EvaluationProtocol", "ResolvedProtocol", "resolve_protocol"]


@dataclass(frozen=True)
class EvaluationProtocol:
    """A named protocol: ``num_examples`` (``None``: the whole test split) and
    ``max_subsets_per_size`` (``None``: every given subset)."""

    name: str
    num_examples: int | None
    max_subsets_per_size: int | None
    description: str


#: protocol name → its definition
PROTOCOLS: dict[str, EvaluationProtocol] = {
    "standard": EvaluationProtocol("standard", None, None, "whole test split, every non-empty proper given subset"),
    "quick": EvaluationProtocol("quick", 64, 2, "first 64 test examples, first 2 given subsets of each size"),
}

#: metric name → the convention it follows
COHERENCE_CONVENTIONS = {
    "coherence": "missing targets only (mean over the modalities not given; MMVAE+ / MultiVae)",
    "coherence_all_targets": "all targets (the given modalities regenerated and scored too; MoPoE)",
}


@dataclass(frozen=True)
class ResolvedProtocol:
    """A protocol applied to one test split and one model's modalities."""

    name: str
    label: str  # the name, or "<name> (modified: ...)" when the settings differ from the protocol's
    num_examples: int
    test_split_size: int
    given_subsets: list
    all_subsets: int
    balanced_accuracy: bool
    bootstrap: int
    bootstrap_seed: int
    fd_bootstrap: bool
    all_targets: bool

    def record(self) -> dict:
        """The protocol as ``metrics["protocol"]``."""
        return {"name": self.name, "label": self.label, "num_examples": self.num_examples,
                "test_split_size": self.test_split_size, "num_given_subsets": len(self.given_subsets),
                "all_given_subsets": self.all_subsets, "coherence_conventions": dict(COHERENCE_CONVENTIONS),
                "coherence_all_targets": self.all_targets, "balanced_accuracy": self.balanced_accuracy,
                "bootstrap": self.bootstrap, "bootstrap_seed": self.bootstrap_seed,
                "fd_bootstrap": self.fd_bootstrap and self.bootstrap > 0,
                "standard_errors": ("rates: sqrt(v/n) with v the variance over the n examples of the per-example "
                                    "value (binomial sqrt(p(1-p)/n) for one target; a mean over targets or subsets "
                                    "is the mean of per-example means); balanced accuracy: per-class binomial SEs "
                                    "combined as independent; F1 and FD: bootstrap over the test examples")}


def _positive_int_or_none(ev, key: str) -> int | None:
    value = ev.get(key, None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"evaluation.{key} must be a positive integer or null (the protocol's), got {value!r}")
    return int(value)


def resolve_protocol(ev, test_split_size: int, names: Sequence[str]) -> ResolvedProtocol:
    """The protocol of ``ev`` (``cfg.evaluation``) for a test split of ``test_split_size`` examples and
    the modalities ``names``; a clear error for an unknown protocol or a bad value."""
    name = ev.get("protocol", "standard")
    if name not in PROTOCOLS:
        raise ValueError(f"unknown evaluation.protocol {name!r}; known: {sorted(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    asked_n = _positive_int_or_none(ev, "num_examples")
    asked_k = _positive_int_or_none(ev, "max_subsets_per_size")
    bootstrap = ev.get("bootstrap", 200)
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0 or bootstrap == 1:
        raise ValueError(f"evaluation.bootstrap must be 0 (no bootstrap) or an integer >= 2, got {bootstrap!r}")
    if test_split_size < 1:
        raise ValueError("the test split is empty: nothing to evaluate")
    n_protocol = min(test_split_size, protocol.num_examples or test_split_size)
    n = min(test_split_size, asked_n) if asked_n is not None else n_protocol
    subsets_protocol = given_subsets(names, protocol.max_subsets_per_size)
    subsets = given_subsets(names, asked_k) if asked_k is not None else subsets_protocol
    changes = []
    if n != n_protocol:
        changes.append(f"num_examples={n}")
    if subsets != subsets_protocol:
        changes.append(f"max_subsets_per_size={asked_k}")
    label = name if not changes else f"{name} (modified: {', '.join(changes)})"
    return ResolvedProtocol(name=name, label=label, num_examples=n, test_split_size=test_split_size,
                            given_subsets=subsets, all_subsets=len(given_subsets(names)),
                            balanced_accuracy=bool(ev.get("balanced_accuracy", False)), bootstrap=int(bootstrap),
                            bootstrap_seed=int(ev.get("bootstrap_seed", 0)),
                            fd_bootstrap=bool(ev.get("fd_bootstrap", True)),
                            all_targets=bool(ev.get("coherence_all_targets", True)))
