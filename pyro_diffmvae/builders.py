"""Build data sets, models and priors from a hydra/omegaconf configuration.

Kept apart from :mod:`pyro_diffmvae.cli` so that notebooks and tests can build exactly what the
command-line apps build: ``build_model(cfg)`` with ``cfg = compose(...)`` gives the same network.
"""

from __future__ import annotations

from typing import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .modality import DiffusionDecoder, FeedForwardDecoder, Modality
from .model import MultimodalVAE
from .nets.decoders import ConvDecoder, MLPDecoder, TokenDecoder
from .nets.encoders import ConvEncoder, MLPEncoder, TokenEncoder
from .nets.unet import ConditionalUNet
from .prior import LatentMLP, LatentScorePrior
from .sde import VPSDE

__all__ = ["DATASETS", "build_datasets", "build_model", "build_latent_prior", "modality_specs"]

DATASETS = ("shapes",)


def build_datasets(cfg: DictConfig):
    """``(train, val, test)`` data sets of ``cfg.dataset``."""
    name = cfg.dataset.name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    from .data.shapes import ShapesDataset

    d = cfg.dataset
    common = dict(image_size=d.image_size, seed=d.seed, cache_dir=d.cache_dir, modalities=tuple(d.modalities))
    return (
        ShapesDataset("train", size=d.train_size, **common),
        ShapesDataset("val", size=d.val_size, **common),
        ShapesDataset("test", size=d.test_size, **common),
    )


def modality_specs(cfg: DictConfig) -> dict[str, dict]:
    """Per modality of the data set: its event shape and feed-forward likelihood kind."""
    if cfg.dataset.name != "shapes":
        raise ValueError(f"unknown dataset {cfg.dataset.name!r}; known: {list(DATASETS)}")
    from .data import shapes

    S = cfg.dataset.image_size
    specs = {
        "image": dict(shape=(3, S, S), likelihood="normal"),
        "mask": dict(shape=(1, S, S), likelihood="bernoulli"),
        "attributes": dict(shape=(shapes.NUM_ATTRIBUTES,), likelihood="bernoulli"),
        "text": dict(shape=(shapes.CAPTION_LENGTH,), likelihood="categorical", num_classes=len(shapes.VOCAB)),
    }
    unknown = [m for m in cfg.dataset.modalities if m not in specs]
    if unknown:
        raise ValueError(f"unknown modalities {unknown} for dataset 'shapes'; known: {sorted(specs)}")
    return {m: specs[m] for m in cfg.dataset.modalities}


def _encoder(name: str, spec: dict, cfg: DictConfig):
    D, width = cfg.model.latent_dim, cfg.model.encoder_width
    shape = spec["shape"]
    if len(shape) == 3:
        return ConvEncoder(shape[0], shape[1], D, width=width)
    if spec["likelihood"] == "categorical":
        return TokenEncoder(spec["num_classes"], shape[0], D)
    return MLPEncoder(shape[0], D)


def _decoder(name: str, spec: dict, cfg: DictConfig):
    m = cfg.model
    D = m.latent_dim
    shape = spec["shape"]
    if name in cfg.dataset.diffusion_modalities:
        if len(shape) != 3:
            raise ValueError(f"modality {name!r}: diffusion decoders are for images, its shape is {shape}")
        u = m.unet
        unet = ConditionalUNet(
            in_channels=shape[0], image_size=shape[1], z_dim=D, base_channels=u.base_channels,
            channel_mults=tuple(u.channel_mults), num_res_blocks=u.num_res_blocks,
            attention_resolutions=tuple(u.attention_resolutions), z_spatial_channels=u.z_spatial_channels,
        )
        diff = m.diffusion
        return DiffusionDecoder(
            unet, shape, VPSDE(beta_min=diff.beta_min, beta_max=diff.beta_max), weighting=cfg.weighting.name,
            prediction=diff.prediction,
            num_draws=diff.num_draws, time_sampling=cfg.weighting.time_sampling,
            sampler=diff.sampler, sampler_steps=diff.sampler_steps, output_range=(-1.0, 1.0),
        )
    if len(shape) == 3:
        return FeedForwardDecoder(ConvDecoder(D, shape[0], shape[1], width=m.decoder_width), shape, spec["likelihood"],
                                  scale=0.1, learn_scale=spec["likelihood"] != "bernoulli")
    if spec["likelihood"] == "categorical":
        return FeedForwardDecoder(TokenDecoder(D, shape[0], spec["num_classes"]), shape, "categorical",
                                  num_classes=spec["num_classes"])
    return FeedForwardDecoder(MLPDecoder(D, shape[0]), shape, spec["likelihood"])


def build_model(cfg: DictConfig) -> MultimodalVAE:
    """The :class:`MultimodalVAE` of ``cfg.model``, ``cfg.fusion`` and ``cfg.weighting``."""
    specs = modality_specs(cfg)
    unknown = [n for n in cfg.dataset.diffusion_modalities if n not in specs]
    if unknown:
        raise ValueError(f"diffusion_modalities {unknown} are not modalities of the data set {sorted(specs)}")
    weights = OmegaConf.to_container(cfg.model.likelihood_weights)
    modalities = [
        Modality(name, _encoder(name, spec, cfg), _decoder(name, spec, cfg), weight=float(weights.get(name, 1.0)))
        for name, spec in specs.items()
    ]
    subsets = cfg.fusion.subsets
    if subsets is not None and not isinstance(subsets, str):
        subsets = OmegaConf.to_container(subsets)
    return MultimodalVAE(
        modalities, cfg.model.latent_dim, fusion=cfg.fusion.name, subset_strategy=cfg.model.subset_strategy,
        subsets=subsets, prior_expert=cfg.model.prior_expert, beta=cfg.model.beta,
    )


def build_latent_prior(cfg: DictConfig) -> LatentScorePrior:
    p = cfg.latent_prior
    D = cfg.model.latent_dim
    return LatentScorePrior(D, LatentMLP(D, hidden=p.hidden, num_blocks=p.num_blocks), sampler=p.sampler,
                            sampler_steps=p.sampler_steps)


def to_device_batch(batch: Mapping, device) -> dict:
    """Move a collated batch (tensors and nested dicts of tensors) to ``device``."""
    out = {}
    for k, v in batch.items():
        if isinstance(v, Mapping):
            out[k] = to_device_batch(v, device)
        elif isinstance(v, torch.Tensor):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out
