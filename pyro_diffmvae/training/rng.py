"""The global RNG states a checkpoint holds, so that a resumed run draws what an uninterrupted one draws.

Pyro and this package draw from the RNGs of torch (and CUDA), numpy and python ``random``:
:func:`rng_states` returns all of them as plain types and tensors (a checkpoint with them loads with
``torch.load(weights_only=True)``) and :func:`set_rng_states` restores them.
:func:`rank_and_world_size` is the (rank, world size) of the DDP process group, under which every
rank keeps its own states.
"""

from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch

__all__ = ["rng_states", "set_rng_states", "rank_and_world_size"]


def rng_states() -> dict:
    """The global RNG states Pyro and this package draw from: torch (CPU and CUDA), numpy, python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so that checkpoints load with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: Mapping) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
