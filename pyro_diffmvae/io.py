"""Files written so that a crash never leaves half of one (:func:`atomic_torch_save`), caches built
once when many processes want them at the same time (:func:`exclusive_lock`), and pretrained weights
read from a local file without running pickled code (:func:`read_state_dict`, :func:`load_state_dict_strict`,
:func:`read_checkpoint`)."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn

__all__ = ["atomic_torch_save", "exclusive_lock", "read_state_dict", "load_state_dict_strict", "read_checkpoint",
           "other_checkpoints"]


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


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """The state dict of ``what`` (e.g. ``"FID Inception weights"``) saved at ``path``.

    The file is read with ``torch.load(weights_only=True)``: tensors and plain containers only, so a
    file can never run code when it is read. It holds ``torch.save(module.state_dict(), path)``, or
    a checkpoint dict with the state dict under ``"state_dict"``. A whole pickled module is refused
    (unpickling it would run arbitrary code): save its ``state_dict()`` instead.

    :raises FileNotFoundError: naming ``path`` when there is no such file (nothing is downloaded).
    :raises ValueError: naming ``path`` and the problem when the file is unreadable (corrupt, a pickled
        module) or holds no mapping of parameter names to tensors.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no file {path!r} (nothing is downloaded; put the weights file there)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"{what}: could not read {path!r} as tensors only (torch.load(weights_only=True)): {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''} -- a corrupt file, or a whole pickled module (refused: "
            "unpickling runs arbitrary code; save torch.save(module.state_dict(), path) instead)"
        ) from e
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise ValueError(f"{what}: {path!r} holds a {type(state).__name__}, not a state dict (parameter name -> tensor)")
    bad = [k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if bad:
        raise ValueError(f"{what}: {path!r} is not a state dict: entries {bad[:5]} are not parameter name -> tensor")
    return dict(state)


def tied_weight_names(module: nn.Module) -> dict[str, str]:
    """``{alias: canonical}`` for every state-dict entry of ``module`` that is the same tensor as an earlier
    one (a network shared by several modules, e.g. ``model.unet.shared``); the first name in state-dict
    order is the canonical one. Empty when nothing is tied."""
    first: dict[int, str] = {}
    aliases = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        canonical = first.setdefault(id(tensor), name)
        if canonical != name:
            aliases[name] = canonical
    return aliases


def without_tied_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` without the aliases of :func:`tied_weight_names` (safetensors stores each tensor once and
    refuses two names for one tensor); :func:`with_tied_weights` puts them back."""
    aliases = tied_weight_names(module)
    return {k: v for k, v in state.items() if k not in aliases}


def with_tied_weights(module: nn.Module, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """``state`` with every alias of ``module``'s tied weights that it lacks filled from its canonical entry
    (the inverse of :func:`without_tied_weights`); unchanged when ``module`` ties nothing."""
    missing = {a: c for a, c in tied_weight_names(module).items() if a not in state and c in state}
    return {**state, **{a: state[c] for a, c in missing.items()}} if missing else state


def load_state_dict_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: str | os.PathLike,
                           what: str) -> nn.Module:
    """``module.load_state_dict(state, strict=True)``, a mismatch a :class:`ValueError` naming ``path``
    and every missing key, unexpected key and wrong shape (file's and expected)."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k}: file {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}"
              for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        problems = [f"{label} {items}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if items]
        raise ValueError(f"{what}: {os.fspath(path)!r} does not fit the architecture ({type(module).__name__}): "
                         + "; ".join(problems))
    module.load_state_dict(state, strict=True)
    return module


def other_checkpoints(path: str | os.PathLike) -> list[str]:
    """The checkpoints of the run that ``path`` belongs to, other than ``path``: for ``<run>/model.pt``
    or ``<run>/checkpoints/<name>.ckpt``, the files ``<run>/model.pt`` and ``<run>/checkpoints/*.ckpt``
    that exist (sorted), ``best.ckpt`` first."""
    path = os.path.abspath(os.fspath(path))
    folder = os.path.dirname(path)
    run = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder
    ckpts = os.path.join(run, "checkpoints")
    found = [os.path.join(run, "model.pt")] + sorted(
        (os.path.join(ckpts, n) for n in (os.listdir(ckpts) if os.path.isdir(ckpts) else []) if n.endswith(".ckpt")),
        key=lambda p: (os.path.basename(p) != "best.ckpt", p))
    return [p for p in found if os.path.isfile(p) and p != path]


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The dict saved at ``path`` (a ``model.pt`` or a Lightning ``.ckpt``), read with
    ``torch.load(weights_only=True)``: tensors and plain data only, so opening a file can never run
    code (a pickled payload is refused before anything of it executes).

    :raises FileNotFoundError: naming ``path`` when there is no such file.
    :raises ValueError: naming ``path`` when it cannot be read that way: random bytes, a truncated
        file (an interrupted copy) or a pickle of arbitrary objects; the message lists the run's other
        checkpoints (:func:`other_checkpoints`) to try instead.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        others = other_checkpoints(path)
        hint = (f"; the run's other checkpoints: {', '.join(others)}" if others
                else "; the run has no other checkpoint beside it")
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(
            f"{what} {path!r} is not a file of this library that can be read safely (torch.load(weights_only=True): "
            f"{type(e).__name__}: {first[:300]}): a truncated or corrupt file, or one carrying pickled objects "
            f"(refused: unpickling them could run code){hint}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what} {path!r} holds a {type(state).__name__}, not a checkpoint dict of this library")
    return state
