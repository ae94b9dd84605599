"""The cache helpers of ``pyro_diffmvae.io``: the exclusive file lock (mutual exclusion, timeout,
release on exit and on error) and the atomic save. The lock across processes, and its release when
the holder dies, are tested through ``ensure_polymnist`` in ``test_polymnist.py``."""

import os
import time

import pytest
import torch

from pyro_diffmvae.io import atomic_torch_save, exclusive_lock


def test_exclusive_lock_excludes_times_out_and_is_released(tmp_path):
    path = tmp_path / "sub" / "cache.lock"
    with exclusive_lock(path):
        assert path.is_file()  # created with its folder
        # a second holder (another open file: flock excludes it even in the same process) waits, then gives up
        start = time.monotonic()
        with pytest.raises(TimeoutError, match=str(path)):
            with exclusive_lock(path, timeout=0.3):
                pass
        assert time.monotonic() - start >= 0.3
    with exclusive_lock(path, timeout=0):  # released on exit
        pass
    with pytest.raises(RuntimeError, match="boom"):
        with exclusive_lock(path):
            raise RuntimeError("boom")
    with exclusive_lock(path, timeout=0):  # released when the block raised
        pass
    assert path.is_file()  # the lock file stays


def test_atomic_torch_save_replaces_whole_files_only(tmp_path, monkeypatch):
    path = tmp_path / "new" / "x.pt"
    atomic_torch_save({"a": torch.arange(3)}, path)
    assert torch.equal(torch.load(path)["a"], torch.arange(3))

    def broken_save(obj, fh):
        fh.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_torch_save({"a": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["a"], torch.arange(3))  # the old file, whole
    assert os.listdir(path.parent) == ["x.pt"]  # no temporary file left
