r"""The encoder and feed-forward decoder networks of a modality: by network kind, or a user's by ``_target_``.

**Network kinds** (:data:`NETWORKS`, extended with :func:`register_network`). A modality's kind is
the ``network`` of its :class:`~pyro_diffmvae.data.spec.ModalitySpec`, or else
:func:`default_network` of its shape and likelihood:

================= ======================================================== =====================================
kind              encoder / decoder                                        for
================= ======================================================== =====================================
``conv``          :class:`~pyro_diffmvae.nets.encoders.ConvEncoder` /      images ``(C, H, W)``
                  :class:`~pyro_diffmvae.nets.decoders.ConvDecoder`, or
                  ``CompactConvDecoder`` (``model.image_decoder=compact``:
                  about a tenth of the multiply-adds)
``mlp``           ``MLPEncoder`` / ``MLPDecoder``                          vectors ``(D,)``
``tokens``        ``TokenEncoder`` / ``TokenDecoder``                      short fixed-length token strings
``token_sequence`` :class:`~pyro_diffmvae.nets.text.TokenSequenceEncoder` / captions with padding (CUB, ``tokens``)
                  ``TokenSequenceDecoder``
``optimus``       BERT encoder / GPT-2 decoder with ``z`` injected         captions (``model.text_nets=optimus``)
================= ======================================================== =====================================

A kind is a pair of factories ``encoder(spec, cfg)`` and ``decoder(spec, cfg)``, where ``spec`` is
the builders' modality dict (``shape``, ``likelihood``, ``num_classes``) and ``cfg`` the run's
config; the decoder factory returns the whole feed-forward decoder (a
:class:`~pyro_diffmvae.modality.FeedForwardDecoder` or a caption decoder).

**A user's network** for one modality, in the config (no edit of the package)::

    model:
      networks:
        <modality>:
          encoder: {_target_: my_module.MyEncoder, hidden: 64}   # any extra keys: the class's own arguments
          decoder: {_target_: my_module.MyDecoderNet}

(on the command line: ``+model.networks.<modality>.encoder._target_=my_module.MyEncoder``). Each is
instantiated by hydra with its own keys plus, from the builder, ``shape`` (the event shape, a tuple),
``latent_dim`` (``model.latent_dim``; for MMVAE+'s private encoders and ``[z, w]`` decoders the size
of that latent) and, for a categorical modality, ``num_classes``:

* the encoder maps ``x`` ``(N, *shape)`` to the Gaussian expert's ``(mu, logvar)``, each ``(N, latent_dim)``;
* the decoder maps ``z`` ``(N, latent_dim)`` to the likelihood's parameters, ``(N, *shape)`` (logits,
  locations) or ``(N, *shape, num_classes)`` logits; the builder wraps it in a
  :class:`~pyro_diffmvae.modality.FeedForwardDecoder` with the modality's likelihood (a decoder that
  already is a ``FeedForwardDecoder`` is used as it is). A diffusion-decoded modality
  (``dataset.diffusion_modalities``) takes no user decoder.

**Optimus settings** (``model.optimus``): :func:`optimus_settings` and :func:`optimus_codec` (the BERT
+ GPT-2 tokenisers as a caption codec, read once per process).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from .caption_codec import OptimusCaptionCodec
from .modality import FeedForwardDecoder
from .nets.decoders import IMAGE_DECODERS, MLPDecoder, TokenDecoder
from .nets.encoders import ConvEncoder, MLPEncoder, TokenEncoder
from .nets.text import (
    BertTextEncoder,
    GPT2TextDecoder,
    OptimusCaptionDecoder,
    OptimusCaptionEncoder,
    TokenSequenceDecoder,
    TokenSequenceEncoder,
)

__all__ = ["NETWORKS", "NetworkKind", "TEXT_NETS", "register_network", "default_network", "image_decoder_class", "build_encoder",
           "build_decoder", "user_network", "text_nets", "optimus_settings", "optimus_codec"]

#: the values of ``model.text_nets``: word-level token networks, or the Optimus BERT + GPT-2 text VAE
TEXT_NETS = ("tokens", "optimus")

Factory = Callable[[Mapping, DictConfig], nn.Module]


@dataclass(frozen=True)
class NetworkKind:
    """The encoder and decoder factories of one network kind: ``(modality spec dict, cfg) -> module``."""

    encoder: Factory
    decoder: Factory


def image_decoder_class(cfg: DictConfig) -> type[nn.Module]:
    """The ``conv`` kind's image decoder named by ``model.image_decoder`` (:data:`IMAGE_DECODERS`; ``conv`` when
    the model config has no such key)."""
    name = cfg.model.get("image_decoder", None) or "conv"
    if name not in IMAGE_DECODERS:
        raise ValueError(f"unknown model.image_decoder {name!r}; known: {sorted(IMAGE_DECODERS)}")
    return IMAGE_DECODERS[name]


def _conv_decoder(spec, cfg):
    shape, likelihood = spec["shape"], spec["likelihood"]
    net = image_decoder_class(cfg)(cfg.model.latent_dim, shape[0], shape[1], width=cfg.model.decoder_width)
    return FeedForwardDecoder(net, shape, likelihood, scale=0.1, learn_scale=likelihood != "bernoulli")


def _categorical(net, spec):
    return FeedForwardDecoder(net, spec["shape"], "categorical", num_classes=spec["num_classes"])


def _optimus_encoder(spec, cfg):
    bert, _, _ = optimus_settings(cfg)  # from_pretrained returns eval mode; train like every other net
    return OptimusCaptionEncoder(BertTextEncoder.from_pretrained(bert, cfg.model.latent_dim).train(), optimus_codec(cfg))


def _optimus_decoder(spec, cfg):
    _, gpt2, injection = optimus_settings(cfg)
    net = GPT2TextDecoder.from_pretrained(gpt2, cfg.model.latent_dim, injection=injection).train()
    return OptimusCaptionDecoder(net, optimus_codec(cfg))


NETWORKS: dict[str, NetworkKind] = {
    "conv": NetworkKind(
        encoder=lambda spec, cfg: ConvEncoder(spec["shape"][0], spec["shape"][1], cfg.model.latent_dim,
                                              width=cfg.model.encoder_width),
        decoder=_conv_decoder),
    "mlp": NetworkKind(
        encoder=lambda spec, cfg: MLPEncoder(spec["shape"][0], cfg.model.latent_dim),
        decoder=lambda spec, cfg: FeedForwardDecoder(MLPDecoder(cfg.model.latent_dim, spec["shape"][0]), spec["shape"],
                                                     spec["likelihood"])),
    "tokens": NetworkKind(
        encoder=lambda spec, cfg: TokenEncoder(spec["num_classes"], spec["shape"][0], cfg.model.latent_dim),
        decoder=lambda spec, cfg: _categorical(TokenDecoder(cfg.model.latent_dim, spec["shape"][0], spec["num_classes"]),
                                               spec)),
    "token_sequence": NetworkKind(  # padding-aware convolutional sequence networks for captions
        encoder=lambda spec, cfg: TokenSequenceEncoder(spec["num_classes"], spec["shape"][0], cfg.model.latent_dim,
                                                       embed_dim=cfg.model.encoder_width * 2,
                                                       hidden=cfg.model.encoder_width * 4),
        decoder=lambda spec, cfg: _categorical(TokenSequenceDecoder(cfg.model.latent_dim, spec["shape"][0],
                                                                    spec["num_classes"],
                                                                    hidden=cfg.model.decoder_width * 4), spec)),
    "optimus": NetworkKind(encoder=_optimus_encoder, decoder=_optimus_decoder),
}


def register_network(name: str, encoder: Factory, decoder: Factory, replace: bool = False) -> NetworkKind:
    """Add the network kind ``name`` (factories ``(spec, cfg) -> module``) to :data:`NETWORKS`."""
    if name in NETWORKS and not replace:
        raise ValueError(f"network kind {name!r} is already registered (replace=True to replace it)")
    NETWORKS[name] = NetworkKind(encoder=encoder, decoder=decoder)
    return NETWORKS[name]


def default_network(spec: Mapping) -> str:
    """The network kind of a modality whose spec names none: ``conv`` for images ``(C, H, W)``,
    ``optimus`` for the Optimus likelihood, ``tokens`` for categorical tokens, else ``mlp``."""
    if len(spec["shape"]) == 3:
        return "conv"
    if spec["likelihood"] == "optimus":
        return "optimus"
    if spec["likelihood"] == "categorical":
        return "tokens"
    return "mlp"


def _kind(name: str, spec: Mapping) -> NetworkKind:
    kind = spec.get("network") or default_network(spec)
    if kind not in NETWORKS:
        raise ValueError(f"modality {name!r}: unknown network kind {kind!r}; known: {sorted(NETWORKS)}")
    return NETWORKS[kind]


def user_network(name: str, part: str, spec: Mapping, cfg: DictConfig) -> nn.Module | None:
    """The user's ``model.networks.<name>.<part>`` (``part``: ``encoder`` | ``decoder``) instantiated with
    ``shape``, ``latent_dim`` and (categorical) ``num_classes``; ``None`` when the config names none."""
    node = OmegaConf.select(cfg, f"model.networks.{name}.{part}", default=None)
    if node is None:
        return None
    where = f"model.networks.{name}.{part}"
    if not (OmegaConf.is_dict(node) and "_target_" in node):
        raise ValueError(f"{where} must be a mapping with a _target_ naming a network class, got "
                         f"{OmegaConf.to_container(node) if OmegaConf.is_config(node) else node!r}")
    from hydra.utils import instantiate

    given = {"shape": tuple(spec["shape"]), "latent_dim": int(cfg.model.latent_dim)}
    if spec.get("num_classes") is not None:
        given["num_classes"] = int(spec["num_classes"])
    clash = sorted(set(given) & set(node))
    if clash:
        raise ValueError(f"{where} sets {clash}, which the builder passes itself (from the data set and model.latent_dim)")
    net = instantiate(node, **given)
    if not isinstance(net, nn.Module):
        raise TypeError(f"{where}._target_={node._target_} gave a {type(net).__name__}, not a torch.nn.Module")
    return net


def build_encoder(name: str, spec: Mapping, cfg: DictConfig) -> nn.Module:
    """The encoder of modality ``name``: the user's (``model.networks.<name>.encoder``) or its kind's."""
    net = user_network(name, "encoder", spec, cfg)
    return net if net is not None else _kind(name, spec).encoder(spec, cfg)


def build_decoder(name: str, spec: Mapping, cfg: DictConfig) -> nn.Module:
    """The feed-forward decoder of modality ``name``: the user's network (``model.networks.<name>.decoder``)
    wrapped in a :class:`FeedForwardDecoder` with the modality's likelihood, or its kind's."""
    net = user_network(name, "decoder", spec, cfg)
    if net is None:
        return _kind(name, spec).decoder(spec, cfg)
    if isinstance(net, FeedForwardDecoder):
        return net
    return FeedForwardDecoder(net, spec["shape"], spec["likelihood"], num_classes=spec.get("num_classes"))


def text_nets(cfg: DictConfig) -> str:
    """``model.text_nets`` (``tokens`` when the model config has no such key), checked against :data:`TEXT_NETS`."""
    nets = cfg.model.get("text_nets", None) or "tokens"
    if nets not in TEXT_NETS:
        raise ValueError(f"unknown model.text_nets {nets!r}; known: {list(TEXT_NETS)}")
    return nets


def optimus_settings(cfg: DictConfig) -> tuple[str, str, str]:
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
    bert, gpt2, _ = optimus_settings(cfg)
    return _codec_from_folders(bert, gpt2, int(cfg.dataset.caption_length))


@functools.lru_cache(maxsize=None)
def _codec_from_folders(bert: str, gpt2: str, length: int) -> OptimusCaptionCodec:
    return OptimusCaptionCodec.from_folders(bert, gpt2, length=length)
