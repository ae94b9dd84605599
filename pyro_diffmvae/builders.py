"""Build data sets, models and priors from a hydra/omegaconf configuration.

Kept apart from :mod:`pyro_diffmvae.cli` so that notebooks and tests can build exactly what the
command-line apps build: ``build_model(cfg)`` with ``cfg = compose(...)`` gives the same network.

CUB captions have two kinds of text networks, ``model.text_nets``:

* ``tokens`` (default): :class:`~pyro_diffmvae.nets.text.TokenSequenceEncoder` / ``Decoder`` on the
  word-level ids of the vocabulary built from the training captions (trained from scratch);
* ``optimus``: the paper's Optimus-style text VAE, a BERT encoder and a GPT-2 decoder with ``z``
  injected (``model.optimus.injection``: ``memory`` | ``embedding`` | ``both``), loaded from the local
  folders ``model.optimus.bert_path`` / ``gpt2_path`` (model + tokenizer, written by
  ``save_pretrained``; nothing is downloaded). The data sets are then wrapped in
  :class:`~pyro_diffmvae.data.cub.OptimusCaptions`, which re-tokenises every caption with both
  tokenisers into the packed layout of :class:`~pyro_diffmvae.nets.text.OptimusCaptionCodec`.

The CUB vocabulary and the Optimus tokenisers are read once per process, memoised by their folder
paths as given (a process that rewrites the captions under the same root must call
``cub_vocabulary.cache_clear()``).
"""

from __future__ import annotations

import functools
import os
from typing import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .caption_codec import OptimusCaptionCodec
from .modality import DiffusionDecoder, FeedForwardDecoder, Modality
from .fusion import Fusion, make_fusion
from .model import MultimodalVAE
from .objectives import OBJECTIVES, Objective, make_objective
from .nets.decoders import ConvDecoder, MLPDecoder, TokenDecoder
from .nets.encoders import ConvEncoder, MLPEncoder, TokenEncoder
from .nets.text import (
    BertTextEncoder,
    GPT2TextDecoder,
    OptimusCaptionDecoder,
    OptimusCaptionEncoder,
    TokenSequenceDecoder,
    TokenSequenceEncoder,
)
from .nets.unet import ConditionalUNet
from .prior import LatentMLP, LatentScorePrior
from .sde import VPSDE
from .weighting import Weighting

__all__ = ["DATASETS", "TEXT_NETS", "build_datasets", "build_model", "build_latent_prior", "build_fusion",
           "build_objective", "build_weighting", "objective_name", "cub_vocabulary", "modality_specs", "optimus_codec"]

DATASETS = ("shapes", "polymnist", "celebamask_hq", "cub")
TEXT_NETS = ("tokens", "optimus")


def _check_dataset(cfg: DictConfig) -> str:
    name = cfg.dataset.name
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {list(DATASETS)}")
    return name


def build_datasets(cfg: DictConfig):
    """``(train, val, test)`` data sets of ``cfg.dataset``."""
    name = _check_dataset(cfg)
    d = cfg.dataset
    if name == "shapes":
        from .data.shapes import ShapesDataset

        common = dict(image_size=d.image_size, seed=d.seed, cache_dir=d.cache_dir, modalities=tuple(d.modalities))
        return (
            ShapesDataset("train", size=d.train_size, **common),
            ShapesDataset("val", size=d.val_size, **common),
            ShapesDataset("test", size=d.test_size, **common),
        )
    if name == "polymnist":
        return _polymnist_datasets(d)
    if name == "celebamask_hq":
        from .data.celebamask_hq import CelebAMaskHQDataset

        common = dict(image_size=d.image_size, modalities=tuple(d.modalities), attributes=tuple(d.attributes),
                      cache_dir=d.cache_dir)
        return tuple(CelebAMaskHQDataset(d.root, split, size=size, **common)
                     for split, size in (("train", d.train_size), ("val", d.val_size), ("test", d.test_size)))
    from .data.cub import CUBImageCaptionDataset, OptimusCaptions

    common = dict(image_size=d.image_size, caption_length=d.caption_length, vocab=cub_vocabulary(d.root),
                  cache_dir=d.cache_dir)
    train = CUBImageCaptionDataset(d.root, "train", **common)
    test = CUBImageCaptionDataset(d.root, "test", **common)
    if _text_nets(cfg) == "optimus":
        codec = optimus_codec(cfg)
        train, test = OptimusCaptions(train, codec), OptimusCaptions(test, codec)
    return train, test, test  # CUB has no official validation split: validation monitors the test split


def _polymnist_datasets(d: DictConfig):
    """PolyMNIST from ``d.root``; built there first from MNIST + backgrounds when ``d.build`` says so.

    The published data set has train and test only; validation holds out the last ``val_size``
    training examples.
    """
    from pathlib import Path

    from torch.utils.data import Subset

    from .data.polymnist import LAYOUT, PolyMNISTDataset, ensure_polymnist

    root = Path(d.root)
    published = (root / "train").is_dir() and not (root / "meta.json").is_file()  # read as is, never rebuilt
    building = d.build is not None and d.build.enabled
    if not published and building:
        # under a file lock: one DDP rank (or parallel job) builds, the others wait and reuse the build
        b = d.build
        _, built = ensure_polymnist(b.mnist_root, b.backgrounds_dir, root, seed=b.seed, num_train=b.num_train,
                                    num_test=b.num_test)
        if built:
            print(f"built PolyMNIST in {root} from {b.mnist_root} and {b.backgrounds_dir} (seed {b.seed})")
    elif not (root / "train").is_dir():
        raise FileNotFoundError(f"PolyMNIST root {root} has no train/ folder (expected layout {LAYOUT}); "
                                "set dataset.build.enabled=true to build it from MNIST and background photos")
    full = PolyMNISTDataset(root, "train", modalities=tuple(d.modalities), cache_dir=d.cache_dir)
    n_val = int(d.val_size)
    if not 0 < n_val < len(full):
        raise ValueError(f"dataset.val_size must lie in (0, {len(full)}) for {len(full)} training examples, got {n_val}")
    n_train = len(full) - n_val if d.train_size is None else int(d.train_size)
    if n_train + n_val > len(full):
        raise ValueError(f"dataset.train_size + val_size = {n_train + n_val} exceeds the {len(full)} training examples")
    train = Subset(full, range(n_train))
    val = Subset(full, range(len(full) - n_val, len(full)))
    test = PolyMNISTDataset(root, "test", modalities=tuple(d.modalities), size=d.test_size, cache_dir=d.cache_dir)
    return train, val, test


def modality_specs(cfg: DictConfig) -> dict[str, dict]:
    """Per modality of the data set: its event shape and feed-forward likelihood kind."""
    name = _check_dataset(cfg)
    text_nets = _text_nets(cfg)
    d = cfg.dataset
    if name == "shapes":
        from .data import shapes

        S = d.image_size
        specs = {
            "image": dict(shape=(3, S, S), likelihood="normal"),
            "mask": dict(shape=(1, S, S), likelihood="bernoulli"),
            "attributes": dict(shape=(shapes.NUM_ATTRIBUTES,), likelihood="bernoulli"),
            "text": dict(shape=(shapes.CAPTION_LENGTH,), likelihood="categorical", num_classes=len(shapes.VOCAB)),
        }
    elif name == "polymnist":
        from .data.polymnist import POLYMNIST_MODALITIES

        # Laplace likelihoods for the feed-forward image decoders, as in MoPoE's PolyMNIST experiments
        specs = {m: dict(shape=(3, 28, 28), likelihood="laplace") for m in POLYMNIST_MODALITIES}
        specs.update({m: dict(shape=(3, 28, 28), likelihood="laplace") for m in d.modalities if m not in specs})
    elif name == "celebamask_hq":
        S = d.image_size
        specs = {
            "image": dict(shape=(3, S, S), likelihood="normal"),
            "mask": dict(shape=(1, S, S), likelihood="bernoulli"),
            "attributes": dict(shape=(len(d.attributes),), likelihood="bernoulli"),
        }
    else:  # cub
        specs = {"image": dict(shape=(3, d.image_size, d.image_size), likelihood="normal")}
        if text_nets == "optimus":  # packed BERT + GPT-2 ids (OptimusCaptionCodec)
            specs["text"] = dict(shape=(4 * d.caption_length,), likelihood="optimus")
        else:
            specs["text"] = dict(shape=(d.caption_length,), likelihood="categorical", num_classes=len(cub_vocabulary(d.root)))
    unknown = [m for m in d.modalities if m not in specs]
    if unknown:
        raise ValueError(f"unknown modalities {unknown} for dataset {name!r}; known: {sorted(specs)}")
    return {m: specs[m] for m in d.modalities}


@functools.lru_cache(maxsize=None)
def cub_vocabulary(root: str | None):
    """The :class:`~pyro_diffmvae.data.cub.Vocabulary` of the CUB training captions under ``root``
    (deterministic from the data), read once per process: memoised by ``root`` as given."""
    from .data.cub import CUBImageCaptionDataset

    return CUBImageCaptionDataset(root, "train", image_size=8, size=1).vocab


def _text_nets(cfg: DictConfig) -> str:
    """``model.text_nets`` (``tokens`` when the model config has no such key), checked."""
    nets = cfg.model.get("text_nets", None) or "tokens"
    if nets not in TEXT_NETS:
        raise ValueError(f"unknown model.text_nets {nets!r}; known: {list(TEXT_NETS)}")
    if nets == "optimus" and cfg.dataset.name != "cub":
        raise ValueError(f"model.text_nets=optimus is for the CUB captions (dataset=cub), not dataset={cfg.dataset.name}")
    return nets


def _optimus_settings(cfg: DictConfig) -> tuple[str, str, str]:
    """``(bert_path, gpt2_path, injection)`` of ``model.optimus``; a missing folder is named."""
    o = cfg.model.get("optimus", None) or {}
    paths = []
    for key, what in (("bert_path", "a BERT model (the caption encoder)"), ("gpt2_path", "a GPT-2 model (the caption decoder)")):
        path = o.get(key, None)
        if path is None:
            raise ValueError(f"model.text_nets=optimus needs model.optimus.{key}: a local directory holding {what} and "
                             f"its tokenizer, written by save_pretrained; nothing is downloaded")
        if not os.path.isdir(os.path.expanduser(os.fspath(path))):
            raise FileNotFoundError(f"model.optimus.{key}: the local directory {os.fspath(path)!r} does not exist "
                                    f"(expected {what} and its tokenizer, written by save_pretrained)")
        paths.append(os.path.expanduser(os.fspath(path)))
    return paths[0], paths[1], o.get("injection", None) or "both"


def optimus_codec(cfg: DictConfig) -> OptimusCaptionCodec:
    """The BERT + GPT-2 tokenisers of ``model.optimus`` as a codec of captions of ``dataset.caption_length``
    tokens, read once per process (memoised by the folders)."""
    bert, gpt2, _ = _optimus_settings(cfg)
    return _optimus_codec(bert, gpt2, int(cfg.dataset.caption_length))


@functools.lru_cache(maxsize=None)
def _optimus_codec(bert: str, gpt2: str, length: int) -> OptimusCaptionCodec:
    return OptimusCaptionCodec.from_folders(bert, gpt2, length=length)


def _encoder(name: str, spec: dict, cfg: DictConfig):
    D, width = cfg.model.latent_dim, cfg.model.encoder_width
    shape = spec["shape"]
    if len(shape) == 3:
        return ConvEncoder(shape[0], shape[1], D, width=width)
    if spec["likelihood"] == "optimus":
        bert, _, _ = _optimus_settings(cfg)  # from_pretrained returns eval mode; train like every other net
        return OptimusCaptionEncoder(BertTextEncoder.from_pretrained(bert, D).train(), optimus_codec(cfg))
    if spec["likelihood"] == "categorical":
        if cfg.dataset.name == "cub":  # captions: padding-aware convolutional sequence encoder
            return TokenSequenceEncoder(spec["num_classes"], shape[0], D, embed_dim=width * 2, hidden=width * 4)
        return TokenEncoder(spec["num_classes"], shape[0], D)
    return MLPEncoder(shape[0], D)


def _decoder(name: str, spec: dict, cfg: DictConfig):
    m = cfg.model
    D = m.latent_dim
    shape = spec["shape"]
    if m.diffusion_decoders and name in cfg.dataset.diffusion_modalities:
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
            unet, shape, VPSDE(beta_min=diff.beta_min, beta_max=diff.beta_max), weighting=build_weighting(cfg),
            prediction=diff.prediction,
            num_draws=diff.num_draws, time_sampling=cfg.weighting.time_sampling,
            sampler=diff.sampler, sampler_steps=diff.sampler_steps, output_range=(-1.0, 1.0),
        )
    if len(shape) == 3:
        return FeedForwardDecoder(ConvDecoder(D, shape[0], shape[1], width=m.decoder_width), shape, spec["likelihood"],
                                  scale=0.1, learn_scale=spec["likelihood"] != "bernoulli")
    if spec["likelihood"] == "optimus":
        _, gpt2, injection = _optimus_settings(cfg)
        return OptimusCaptionDecoder(GPT2TextDecoder.from_pretrained(gpt2, D, injection=injection).train(), optimus_codec(cfg))
    if spec["likelihood"] == "categorical":
        if cfg.dataset.name == "cub":
            net = TokenSequenceDecoder(D, shape[0], spec["num_classes"], hidden=m.decoder_width * 4)
        else:
            net = TokenDecoder(D, shape[0], spec["num_classes"])
        return FeedForwardDecoder(net, shape, "categorical", num_classes=spec["num_classes"])
    return FeedForwardDecoder(MLPDecoder(D, shape[0]), shape, spec["likelihood"])


def build_model(cfg: DictConfig) -> MultimodalVAE:
    """The :class:`MultimodalVAE` of ``cfg.model``, ``cfg.fusion`` and ``cfg.weighting``.

    The fusion is :func:`build_fusion`'s. The training objective itself is :func:`build_objective`
    (``cfg.model.objective``); the model's ``conditional`` is set to the objective's, and only
    ``mmvae_plus`` changes the networks: private encoders and decoders over ``[z, w]``."""
    specs = modality_specs(cfg)
    unknown = [n for n in cfg.dataset.diffusion_modalities if n not in specs]
    if unknown:
        raise ValueError(f"diffusion_modalities {unknown} are not modalities of the data set {sorted(specs)}")
    weights = OmegaConf.to_container(cfg.model.likelihood_weights)
    if cfg.model.get("objective", "elbo") == "mmvae_plus":
        modalities = _mmvae_plus_modalities(specs, cfg, weights)
    else:
        modalities = [
            Modality(name, _encoder(name, spec, cfg), _decoder(name, spec, cfg), weight=float(weights.get(name, 1.0)))
            for name, spec in specs.items()
        ]
    if cfg.model.get("two_stage", None):  # SBM-VAE-C / MLD: one latent of size latent_dim per modality
        from .two_stage import TwoStageVAE

        vae = TwoStageVAE(modalities, cfg.model.latent_dim, stage1=cfg.model.two_stage.stage1, beta=cfg.model.beta)
    else:
        vae = MultimodalVAE(modalities, cfg.model.latent_dim, fusion=build_fusion(cfg), beta=cfg.model.beta)
    # the model generates from the conditional of the objective that trains it (PoE, mixture, ...)
    vae.conditional = build_objective(cfg).conditional
    return vae


def _with_latent_dim(cfg: DictConfig, latent_dim: int) -> DictConfig:
    """A copy of ``cfg`` whose ``model.latent_dim`` is ``latent_dim`` (to size private encoders and
    the decoders over ``[z, w]`` with the builders above)."""
    import copy

    out = copy.deepcopy(cfg)
    out.model.latent_dim = int(latent_dim)
    return out


def _mmvae_plus_modalities(specs: dict, cfg: DictConfig, weights: Mapping) -> list[Modality]:
    """MMVAE+ modalities: shared + private encoders and decoders over ``[z, w]`` of size
    ``latent_dim + private_latent_dim`` (see :class:`~pyro_diffmvae.objectives.MMVAEPlus`)."""
    from .nets.mmvae_plus import PrivateLatentDecoder, SharedPrivateEncoder

    D = int(cfg.model.latent_dim)
    Dw = cfg.model.get("private_latent_dim", None)
    if not (isinstance(Dw, int) and Dw > 0):
        raise ValueError(f"model.objective=mmvae_plus needs a positive int model.private_latent_dim, got {Dw!r}")
    cfg_w, cfg_u = _with_latent_dim(cfg, Dw), _with_latent_dim(cfg, D + Dw)
    return [
        Modality(name, SharedPrivateEncoder(_encoder(name, spec, cfg), _encoder(name, spec, cfg_w)),
                 PrivateLatentDecoder(_decoder(name, spec, cfg_u), D, Dw), weight=float(weights.get(name, 1.0)))
        for name, spec in specs.items()
    ]


def build_latent_prior(cfg: DictConfig) -> LatentScorePrior:
    """The auxiliary latent score prior of ``cfg.latent_prior``; for the two-stage baselines
    (``cfg.model.two_stage``) their stage-2 :class:`~pyro_diffmvae.two_stage.JointLatentDiffusion`
    on the concatenated latents, with ``cfg.model.two_stage``'s mode, ``p_joint``, conditional sampler
    and width (``prior_hidden``; null: ``cfg.latent_prior.hidden``)."""
    p = cfg.latent_prior
    D = cfg.model.latent_dim
    two = cfg.model.get("two_stage", None)
    if two:
        from .two_stage import JointLatentDiffusion, MultiTimeLatentMLP

        M = len(cfg.dataset.modalities)
        return JointLatentDiffusion(M, D, mode=two.mode, p_joint=two.get("p_joint", 0.5),
                                    eps_net=MultiTimeLatentMLP(M, D, hidden=two.get("prior_hidden", None) or p.hidden,
                                                               num_blocks=p.num_blocks),
                                    sampler=two.sampler, sampler_steps=two.sampler_steps)
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


def _plain(node):
    """A hydra/omegaconf node as plain Python containers (other values as they are)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _looked_up(node, where: str):
    """The callable a ``{_target_: module.name, **params}`` mapping names: the callable itself when
    there are no params, else ``functools.partial(callable, **params)`` (hydra ``_partial_``); never
    called here."""
    plain = _plain(node)
    if not (isinstance(plain, Mapping) and "_target_" in plain):
        raise ValueError(f"{where} must be a mapping with a _target_ naming a callable, got {plain!r}")
    from hydra.utils import get_method, instantiate

    if len(plain) == 1:
        return get_method(plain["_target_"])
    return instantiate(node, _partial_=True)


def build_weighting(cfg: DictConfig) -> Weighting:
    """The weighting λ(t) of the ``weighting`` config group: ``cfg.weighting.fn`` when given (a
    mapping ``{_target_: module.function, **params}`` naming a user's ``λ(t, sde, **params)``, looked
    up, not called),
    else the named weighting ``cfg.weighting.name`` of :data:`~pyro_diffmvae.weighting.WEIGHTINGS`."""
    w = cfg.weighting
    fn = w.get("fn", None)
    return w.name if fn is None else _looked_up(fn, "weighting.fn")


def build_fusion(cfg: DictConfig) -> Fusion:
    """The :class:`~pyro_diffmvae.fusion.Fusion` of the ``fusion`` config group.

    ``cfg.fusion`` holds the fusion's ``name`` (one of :data:`~pyro_diffmvae.fusion.FUSIONS`, whose
    settings are the defaults) and any of ``combine`` (the product rule: a name of
    :data:`~pyro_diffmvae.fusion.COMBINE_RULES` or a mapping with a hydra ``_target_`` naming a callable,
    which is looked up, not called), ``subsets``, ``subset_weights``, ``subset_strategy``,
    ``prior_expert`` (``none`` | ``full`` | ``every``) and ``conditional`` (``product`` | ``mixture``);
    ``null`` keeps the named fusion's setting. A ``cfg.fusion`` with a ``_target_`` is instantiated
    instead (it must give a :class:`~pyro_diffmvae.fusion.Fusion`).

    Configs stored by runs before the fusion group held these settings (``model.subset_strategy``,
    ``model.prior_expert``) are read as they were trained: the prior expert in every product of
    ``mopoe``/``poe`` unless ``model.prior_expert`` said otherwise."""
    f = cfg.fusion
    if "_target_" in f:
        from hydra.utils import instantiate

        fusion = instantiate(f)
        if not isinstance(fusion, Fusion):
            raise TypeError(f"fusion._target_={f._target_} gave a {type(fusion).__name__}, not a pyro_diffmvae.fusion.Fusion")
        return fusion
    settings = {k: _plain(v) for k, v in f.items()}
    combine = settings.get("combine")
    if isinstance(combine, Mapping):
        settings["combine"] = _looked_up(combine, "fusion.combine")
    model = cfg.model
    if "prior_expert" not in f and "prior_expert" in model:  # a run stored before the fusion group held it
        legacy = model.prior_expert
        settings["prior_expert"] = ("none" if f.name == "moe" else "every") if legacy is None else bool(legacy)
    if "subset_strategy" not in f and model.get("subset_strategy", None) is not None:
        settings["subset_strategy"] = model.subset_strategy
    return make_fusion(settings)


def build_objective(cfg: DictConfig) -> Objective:
    """The training objective of a hydra configuration: ``cfg.model.objective`` — a name of
    :data:`~pyro_diffmvae.objectives.OBJECTIVES` (default ``"elbo"``) with the hyperparameters
    ``cfg.model.objective_params`` (a mapping, default empty), or a mapping with a hydra ``_target_``
    (a user's :class:`~pyro_diffmvae.objectives.Objective`), instantiated with its other keys. β is the
    model's (``cfg.model.beta`` → ``vae.beta``) unless the objective sets its own ``beta``."""
    model = cfg.model
    spec = model.get("objective", "elbo") or "elbo"
    params = _plain(model.get("objective_params", None)) or {}
    if OmegaConf.is_config(spec):
        if "_target_" not in spec:
            raise ValueError(f"model.objective must be a name of {sorted(OBJECTIVES)} or a mapping with a _target_, "
                             f"got {_plain(spec)}")
        from hydra.utils import instantiate

        objective = instantiate(spec, **params)
        if not isinstance(objective, Objective):
            raise TypeError(f"model.objective._target_={spec._target_} gave a {type(objective).__name__}, "
                            "not a pyro_diffmvae.objectives.Objective")
        return objective
    if spec in ("mvae", "mvtcae") and "prior_expert" not in params and model.get("prior_expert", None) is not None:
        params["prior_expert"] = bool(model.prior_expert)  # a run stored before objective_params held it
    return make_objective(spec, **params)


def objective_name(cfg: DictConfig) -> str:
    """The objective's name for reports: ``model.objective``, or its ``_target_``."""
    spec = cfg.model.get("objective", "elbo") or "elbo"
    return str(spec._target_) if OmegaConf.is_config(spec) else str(spec)
