"""Files written so that a crash never leaves half of one: :func:`atomic_torch_save`."""

from __future__ import annotations

import os
import tempfile

import torch

__all__ = ["atomic_torch_save"]


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)`` through a temporary file in the target's folder (same file system),
    flushed, fsynced and renamed over ``path`` with ``os.replace`` (atomic on POSIX and Windows):
    readers see the old file (or none) or the complete new one. The folder is created if needed; on
    any error the temporary file is removed and the old file stays as it was."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
