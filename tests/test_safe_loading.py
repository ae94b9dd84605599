"""Opening a trained model never runs code, and a file that is not one says what it is.

``load_run`` reads ``model.pt`` and Lightning checkpoints with ``torch.load(weights_only=True)``
(:func:`pyro_diffmvae.io.read_checkpoint`); weights that do not fit the stored config, random bytes,
a truncated copy and a pickled payload are each a :class:`ValueError` naming the file.
"""

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pyro_diffmvae.builders import build_model
from pyro_diffmvae.cli import load_run, save_model
from pyro_diffmvae.io import other_checkpoints, read_checkpoint


def tiny_run(tmp_path: Path, *overrides: str) -> tuple[Path, dict]:
    """``<tmp>/run/model.pt`` of a randomly initialised tiny model, as ``diffmvae-train`` writes it."""
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", f"dataset.cache_dir={tmp_path}/cache", *overrides])
    torch.manual_seed(0)
    vae = build_model(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    save_model(vae, config, tmp_path / "run" / "model.pt")
    return tmp_path / "run" / "model.pt", vae.state_dict()


class TouchOnUnpickle:
    """An object whose unpickling creates ``marker``: what a malicious ``model.pt`` could carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_model_pt_round_trips_with_weights_only(tmp_path):
    """Catches: a model.pt that needs weights_only=False (a non-plain object in the config or the
    state dict), or load_run rebuilding another architecture than the one saved."""
    path, weights = tiny_run(tmp_path)
    torch.load(path, weights_only=True)  # plain data and tensors only
    vae, cfg = load_run(path)
    assert cfg.model.latent_dim == 8
    assert vae.state_dict().keys() == weights.keys()
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in weights.items())


def test_a_pickled_payload_is_refused_before_it_runs(tmp_path):
    """Catches: torch.load(weights_only=False) anywhere on the load path (the payload would create
    the marker file before any error)."""
    path, weights = tiny_run(tmp_path)
    marker = tmp_path / "payload_ran"
    evil = tmp_path / "evil" / "model.pt"
    evil.parent.mkdir()
    torch.save({"config": {"payload": TouchOnUnpickle(marker)}, "vae": weights}, evil)
    with pytest.raises(ValueError, match=r"evil/model\.pt.*weights_only=True.*pickled objects"):
        load_run(evil)
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unsafe load would have run it
    assert marker.exists()


def test_random_bytes_and_a_truncated_copy_name_the_file_and_the_other_checkpoints(tmp_path):
    """Catches: a raw unpickling error without the file's name, or no pointer to the run's other
    checkpoints (best.ckpt first) when model.pt is truncated."""
    path, _ = tiny_run(tmp_path)
    ckpts = path.parent / "checkpoints"
    ckpts.mkdir()
    for name in ("last.ckpt", "best.ckpt"):
        (ckpts / name).write_bytes(b"stand-in")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as err:
        load_run(path)
    msg = str(err.value)
    assert str(path) in msg and "truncated or corrupt" in msg
    assert msg.index("best.ckpt") < msg.index("last.ckpt")
    assert other_checkpoints(ckpts / "last.ckpt") == [str(path), str(ckpts / "best.ckpt")]
    noise = tmp_path / "noise.pt"
    noise.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match=r"noise\.pt.*no other checkpoint"):
        load_run(noise)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt.*does not exist"):
        load_run(tmp_path / "missing.pt")


def test_weights_that_do_not_fit_the_stored_config_name_the_keys(tmp_path):
    """Catches: a model.pt whose config was edited (or mixed up with another run's weights) loaded
    with a raw size-mismatch from torch, or silently with strict=False."""
    path, weights = tiny_run(tmp_path)
    state = read_checkpoint(path)
    state["config"]["model"]["latent_dim"] = 4
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"model\.pt.*does not fit.*wrong shapes"):
        load_run(path)
    torch.save({"weights": weights}, path)
    with pytest.raises(ValueError, match=r"neither a model\.pt of diffmvae-train nor a Lightning checkpoint.*'weights'"):
        load_run(path)
    torch.save([1, 2], path)
    with pytest.raises(ValueError, match=r"holds a list"):
        load_run(path)
