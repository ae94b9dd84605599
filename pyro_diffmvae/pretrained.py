"""Portable trained models: a folder of ``model.safetensors`` and ``config.json``, no pickle.

:func:`save_pretrained` writes, into one folder,

* ``model.safetensors`` — every weight of the VAE (:meth:`torch.nn.Module.state_dict`; a tensor tied to
  several names, the UNet of ``model.unet.shared``, once, under its first name): encoders,
  decoders (the EMA-averaged diffusion decoders when the run kept an EMA: training copies the average
  into them at its end) and the latent score prior (or a two-stage model's stage 2) once attached;
* ``config.json`` — ``{"format": "pyro-diffmvae", "format_version": 1, "library_version": ...,
  "latent_prior": bool, "config": <the resolved run config>}``: plain data, from which
  :func:`~pyro_diffmvae.builders.build_model` rebuilds the networks.

:func:`from_pretrained` rebuilds the model from ``config.json`` and loads the weights through
``safetensors`` (no code runs when a file is opened) and
:func:`~pyro_diffmvae.io.load_state_dict_strict` (a key missing, unexpected or of another shape is an
error naming the file). A folder of another format version is refused with both versions named.

The layout is that of ``huggingface_hub``'s ``ModelHubMixin`` (``config.json`` beside
``model.safetensors``), so a user can publish a folder with ``huggingface_hub.upload_folder`` and
fetch it with ``snapshot_download``; nothing here touches the network. ``diffmvae-evaluate`` and
``diffmvae-sample`` accept such a folder as ``checkpoint=``, and ``diffmvae-train`` writes one
(``<run>/pretrained/``) beside ``model.pt``.

Why a small module and not ``huggingface_hub.ModelHubMixin`` itself: the mixin serialises a class's
``__init__`` arguments, while a :class:`~pyro_diffmvae.model.MultimodalVAE` is built from the run
config by the builders (user networks by ``_target_``); the config is the portable description.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

__all__ = ["save_pretrained", "from_pretrained", "is_pretrained_folder", "FORMAT", "FORMAT_VERSION",
           "WEIGHTS_NAME", "CONFIG_NAME"]

FORMAT = "pyro-diffmvae"
#: bumped whenever a folder written by this version could not be read by an older one, or vice versa
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def _library_version() -> str:
    try:
        return version("pyro-diffmvae")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "unknown"


def is_pretrained_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` and ``model.safetensors``."""
    path = Path(path)
    return path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file()


def save_pretrained(vae, folder: str | os.PathLike, config: DictConfig | dict) -> Path:
    """Write ``vae`` (weights) and ``config`` (the run config it was built from) to ``folder``.

    Refuses a folder that already holds a model (nothing is overwritten). Returns the folder."""
    from safetensors.torch import save_file

    from .io import without_tied_weights

    folder = Path(folder)
    clash = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if (folder / n).exists()]
    if clash:
        raise FileExistsError(f"{folder} already holds {clash}; choose another folder (nothing is overwritten)")
    if isinstance(config, DictConfig):
        config = OmegaConf.to_container(config, resolve=True)
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "library_version": _library_version(),
            "latent_prior": getattr(vae, "latent_prior", None) is not None, "config": config}
    folder.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in without_tied_weights(vae, vae.state_dict()).items()}
    tmp = folder / (WEIGHTS_NAME + ".tmp")
    save_file(weights, str(tmp), metadata={"format": FORMAT, "format_version": str(FORMAT_VERSION)})
    os.replace(tmp, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps(meta, indent=1, sort_keys=True))
    return folder


def read_config(folder: str | os.PathLike) -> DictConfig:
    """The run config stored in a pretrained folder (format and version checked)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a pretrained pyro-diffmvae folder: {path} does not exist")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder is damaged") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict):
        raise ValueError(f"{path} is not a pyro-diffmvae model config (expected the keys 'format': {FORMAT!r}, "
                         "'format_version' and 'config')")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{folder} was written in pyro-diffmvae folder format {meta.get('format_version')!r} "
                         f"(library {meta.get('library_version')}); this library reads format {FORMAT_VERSION} "
                         f"(library {_library_version()}): use the library version that wrote it")
    return OmegaConf.create(meta["config"])


def from_pretrained(folder: str | os.PathLike):
    """Rebuild ``(vae, config)`` from a folder written by :func:`save_pretrained` (in eval mode)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .builders import model_from_weights

    folder = Path(folder)
    cfg = read_config(folder)
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has a config but no weights: {path} does not exist")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the folder is damaged") from None
    return model_from_weights(cfg, weights, path, "the weights of the model its config.json builds"), cfg
