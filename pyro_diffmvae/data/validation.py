"""Argument checks shared by the data sets."""

from __future__ import annotations

from typing import Sequence

__all__ = ["check_modalities"]


def check_modalities(modalities: str | Sequence[str], known: Sequence[str]) -> tuple[str, ...]:
    """``modalities`` as a tuple of distinct names from ``known`` (a single name is accepted);
    a ``ValueError`` names the unknown, missing or repeated ones."""
    if isinstance(modalities, str):
        modalities = (modalities,)
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in known]
    if unknown:
        raise ValueError(f"unknown modality names {unknown}; known modalities: {list(known)}")
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be a non-empty list of distinct names from {list(known)}, got {list(modalities)}")
    return modalities
