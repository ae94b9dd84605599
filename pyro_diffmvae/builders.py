"""Build data sets, models and priors from a hydra/omegaconf configuration.

Kept apart from :mod:`pyro_diffmvae.cli` so that notebooks and tests can build exactly what the
command-line apps build: ``build_model(cfg)`` with ``cfg = compose(...)`` gives the same network.

What a data set is (its splits, modalities, labels, evaluation) is its
:class:`~pyro_diffmvae.data.spec.DatasetSpec`, looked up by :func:`~pyro_diffmvae.data.registry.get_dataset`
(``cfg.dataset.name``, or a user's ``cfg.dataset.spec._target_``); the encoder and decoder networks of a
modality come from :mod:`pyro_diffmvae.networks` (its network kind, or a user's
``model.networks.<modality>.encoder`` / ``decoder`` ``_target_``).

CUB captions have two kinds of text networks, ``model.text_nets``:

* ``tokens`` (default): :class:`~pyro_diffmvae.nets.text.TokenSequenceEncoder` / ``Decoder`` on the
  word-level ids of the vocabulary built from the training captions (trained from scratch);
* ``optimus``: the paper's Optimus-style text VAE, a BERT encoder and a GPT-2 decoder with ``z``
  injected (``model.optimus.injection``: ``memory`` | ``embedding`` | ``both``), loaded from the local
  folders ``model.optimus.bert_path`` / ``gpt2_path`` (model + tokenizer, written by
  ``save_pretrained``; nothing is downloaded). The data sets are then wrapped in
  :class:`~pyro_diffmvae.data.cub.OptimusCaptions`, which re-tokenises every caption with both
  tokenisers into the packed layout of :class:`~pyro_diffmvae.nets.text.OptimusCaptionCodec`.

The CUB vocabulary (:func:`~pyro_diffmvae.data.cub.cub_vocabulary`) and the Optimus tokenisers
(:func:`~pyro_diffmvae.networks.optimus_codec`) are read once per process, memoised by their folder
paths as given (a process that rewrites the captions under the same root must call
``cub_vocabulary.cache_clear()``).
"""

from __future__ import annotations

from typing import Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from .data.cub import cub_vocabulary
from .data.registry import DATASETS, get_dataset
from .modality import DiffusionDecoder, Modality
from .fusion import Fusion, make_fusion
from .model import MultimodalVAE
from .networks import TEXT_NETS, build_decoder, build_encoder, optimus_codec, text_nets
from .objectives import OBJECTIVES, Objective, make_objective
from .nets.shared_unet import ModalityOffset
from .nets.unet import ConditionalUNet
from .prior import LatentMLP, LatentScorePrior
from .sde import VPSDE
from .weighting import Weighting

__all__ = ["DATASETS", "TEXT_NETS", "build_datasets", "build_model", "build_latent_prior", "build_fusion",
           "build_objective", "build_weighting", "objective_name", "cub_vocabulary", "modality_specs", "optimus_codec"]


def build_datasets(cfg: DictConfig):
    """``(train, val, test)`` data sets of ``cfg.dataset``: its spec's ``build``
    (:func:`~pyro_diffmvae.data.registry.get_dataset`)."""
    return get_dataset(cfg).build(cfg)


def modality_specs(cfg: DictConfig) -> dict[str, dict]:
    """Per modality of ``cfg.dataset.modalities``: its event shape, feed-forward likelihood kind,
    ``num_classes`` (categorical) and ``network`` kind when the data set names one."""
    spec = get_dataset(cfg)
    nets = text_nets(cfg)
    if nets not in spec.text_nets:
        users = [f"the {s.title} captions (dataset={s.name})" for s in DATASETS.values() if nets in s.text_nets]
        raise ValueError(f"model.text_nets={nets} is for {' or '.join(users) or 'no registered data set'}, "
                         f"not dataset={spec.name}")
    specs = spec.modalities(cfg)
    unknown = [m for m in cfg.dataset.modalities if m not in specs]
    if unknown:
        raise ValueError(f"unknown modalities {unknown} for dataset {spec.name!r}; known: {sorted(specs)}")
    return {m: specs[m].as_dict() for m in cfg.dataset.modalities}


def _decoder(name: str, spec: dict, cfg: DictConfig, shared_unets: dict | None = None):
    """The decoder of modality ``name``: a diffusion decoder for ``dataset.diffusion_modalities`` (its UNet
    taken from ``shared_unets`` by image shape, and made there if missing, when ``model.unet.shared``: see
    :mod:`~pyro_diffmvae.nets.shared_unet`), else :func:`build_decoder`'s feed-forward one. With
    ``model.unet.hint`` the diffusion decoder's UNet also sees the mean of :func:`build_decoder`'s feed-forward
    decoder of the modality, and with ``model.unet.hint_residual`` denoises x minus that mean
    (:mod:`~pyro_diffmvae.nets.hint`)."""
    m = cfg.model
    D = m.latent_dim
    shape = spec["shape"]
    if m.diffusion_decoders and name in cfg.dataset.diffusion_modalities:
        if OmegaConf.select(cfg, f"model.networks.{name}.decoder", default=None) is not None:
            raise ValueError(f"model.networks.{name}.decoder names a feed-forward decoder network, but {name!r} is "
                             "decoded by a diffusion decoder (dataset.diffusion_modalities)")
        if len(shape) != 3:
            raise ValueError(f"modality {name!r}: diffusion decoders are for images, its shape is {shape}")
        u = m.unet
        hinted = u.get("hint", False)
        if not isinstance(hinted, bool):
            raise ValueError(f"model.unet.hint must be true or false, got {hinted!r}")
        residual = u.get("hint_residual", False)
        if not isinstance(residual, bool):
            raise ValueError(f"model.unet.hint_residual must be true or false, got {residual!r}")
        if residual and not hinted:
            raise ValueError("model.unet.hint_residual=true denoises x minus the hint and needs model.unet.hint=true")

        def make_unet():
            return ConditionalUNet(
                in_channels=shape[0] * (2 if hinted else 1), out_channels=shape[0], image_size=shape[1], z_dim=D,
                base_channels=u.base_channels,
                channel_mults=tuple(u.channel_mults), num_res_blocks=u.num_res_blocks,
                attention_resolutions=tuple(u.attention_resolutions), z_spatial_channels=u.z_spatial_channels,
            )
        if u.get("shared", False):
            if shared_unets is None:
                raise ValueError("model.unet.shared=true needs the UNets shared across the model's decoders "
                                 "(build the model with build_model)")
            key = (tuple(shape), hinted)
            if key not in shared_unets:
                shared_unets[key] = make_unet()
            unet = ModalityOffset(shared_unets[key], D)
        else:
            unet = make_unet()
        diff = m.diffusion
        return DiffusionDecoder(
            unet, shape, VPSDE(beta_min=diff.beta_min, beta_max=diff.beta_max), weighting=build_weighting(cfg),
            prediction=diff.prediction,
            num_draws=diff.num_draws, time_sampling=cfg.weighting.time_sampling,
            sampler=diff.sampler, sampler_steps=diff.sampler_steps, output_range=(-1.0, 1.0),
            cond_dropout=diff.get("cond_dropout", 0.0), guidance=diff.get("guidance", 1.0), latent_dim=D,
            hint=build_decoder(name, spec, cfg) if hinted else None, hint_residual=residual,
        )
    return build_decoder(name, spec, cfg)


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
    shared_unets: dict = {}  # image shape -> the UNet of model.unet.shared
    if cfg.model.get("objective", "elbo") == "mmvae_plus":
        modalities = _mmvae_plus_modalities(specs, cfg, weights, shared_unets)
    else:
        modalities = [
            Modality(name, build_encoder(name, spec, cfg), _decoder(name, spec, cfg, shared_unets),
                     weight=float(weights.get(name, 1.0)))
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


def _mmvae_plus_modalities(specs: dict, cfg: DictConfig, weights: Mapping, shared_unets: dict) -> list[Modality]:
    """MMVAE+ modalities: shared + private encoders and decoders over ``[z, w]`` of size
    ``latent_dim + private_latent_dim`` (see :class:`~pyro_diffmvae.objectives.MMVAEPlus`)."""
    from .nets.mmvae_plus import PrivateLatentDecoder, SharedPrivateEncoder

    D = int(cfg.model.latent_dim)
    Dw = cfg.model.get("private_latent_dim", None)
    if not (isinstance(Dw, int) and Dw > 0):
        raise ValueError(f"model.objective=mmvae_plus needs a positive int model.private_latent_dim, got {Dw!r}")
    cfg_w, cfg_u = _with_latent_dim(cfg, Dw), _with_latent_dim(cfg, D + Dw)
    return [
        Modality(name, SharedPrivateEncoder(build_encoder(name, spec, cfg), build_encoder(name, spec, cfg_w)),
                 PrivateLatentDecoder(_decoder(name, spec, cfg_u, shared_unets), D, Dw), weight=float(weights.get(name, 1.0)))
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
                                    sampler=two.sampler, sampler_steps=two.sampler_steps, fitted=False)
    return LatentScorePrior(D, LatentMLP(D, hidden=p.hidden, num_blocks=p.num_blocks), sampler=p.sampler,
                            sampler_steps=p.sampler_steps, fitted=False)


def model_from_weights(cfg: DictConfig, weights: Mapping, source, what: str):
    """The model ``cfg`` builds, with a latent prior when ``weights`` hold one, loaded strictly from
    ``weights`` (a mismatch names ``source`` and the keys) and in eval mode: how every saved model is
    read back (``model.pt``, a Lightning checkpoint, a pretrained folder)."""
    from .io import load_state_dict_strict, with_tied_weights

    vae = build_model(cfg)
    if any(k.startswith("latent_prior.") for k in weights):
        vae.latent_prior = build_latent_prior(cfg)
    load_state_dict_strict(vae, with_tied_weights(vae, weights), source, what)
    return vae.eval()


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
