"""Files written so that a crash never leaves half of one (:func:`atomic_torch_save`), and caches built
once when many processes want them at the same time (:func:`exclusive_lock`)."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["atomic_torch_save", "exclusive_lock"]


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


@contextmanager
def exclusive_lock(path: str | os.PathLike, timeout: float | None = None, poll: float = 0.05) -> Iterator[None]:
    """Hold an exclusive lock on the file ``path`` (created, with its folder, if needed) for the block.

    The way to build a cache that several processes (DDP ranks, parallel jobs) may ask for at once::

        with exclusive_lock(f"{cache}.lock"):
            if <cache is complete>:     # e.g. its last-written file exists
                <read it>
            else:
                <build into a temporary folder beside it, then os.replace it into place>

    One process builds; the others wait and then find the cache complete. ``fcntl.flock`` (POSIX:
    Linux, macOS; on NFS, Linux emulates it with byte-range locks): an advisory lock, so it excludes
    only processes that take the same lock. The OS releases it when the holder's file is closed,
    including when the holder dies, so a crashed build never leaves it held; its temporary folder may
    be left behind, which is why completeness must be judged on the final path only. The lock file
    stays (deleting it would race with a process that has just opened it). The lock is not re-entrant:
    taking it again in the same process while held waits forever (or times out).

    :param timeout: seconds to wait for the lock; ``None`` (default) waits as long as it takes.
    :param poll: seconds between attempts when ``timeout`` is given.
    :raises TimeoutError: naming ``path`` when the lock is still held by another after ``timeout``.
    :raises OSError: on a platform without ``fcntl`` (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        raise OSError(f"exclusive_lock({os.fspath(path)!r}) needs fcntl.flock, which this platform (Windows?) lacks") from None
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if timeout is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        else:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise TimeoutError(
                            f"could not lock {path} within {timeout} s: another process holds it (building the same cache?)"
                        ) from None
                    time.sleep(poll)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
