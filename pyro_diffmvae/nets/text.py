r"""Text encoders and decoders for captions: small token models and Optimus-style BERT/GPT-2 pieces.

**(a) Token models trained from scratch** on the word-level ids of
:class:`pyro_diffmvae.data.cub.Vocabulary` (``<pad>`` = 0), fixed length ``L``:

* :class:`TokenSequenceEncoder` ``(B, L) -> (mu, logvar)``: token + position embeddings, residual
  1-D convolutions (kernel 3), masked mean- and max-pooling over the non-pad positions, and an MLP
  head. Pad positions are zeroed before every convolution and excluded from the pooling, so the
  output depends only on the tokens where the mask is 1 (which tokens fill the pad positions does
  not matter, nor how much padding follows the caption: an encoder of a longer ``L`` with the
  same weights gives the same output).
* :class:`TokenSequenceDecoder` ``z -> logits (B, L, V)``: *non-autoregressive* — every position's
  distribution is a function of ``z`` alone, ``p(x | z) = prod_t Cat(x_t | softmax(logits_t(z)))``
  (pad positions included, so the decoder also models the caption length). ``z`` is projected to
  a hidden vector, added to learned position embeddings and to the input of every residual 1-D
  convolution block, then mapped to the vocabulary by a 1x1 convolution.

**(b) Optimus-style text VAE pieces** (Li et al., 2020) around ``transformers`` models, which are
imported lazily (``pip install transformers``) so that this module imports without them:

* :class:`BertTextEncoder`: a ``BertModel``; its pooled ``[CLS]`` output ``h`` (``pooler_output``,
  or the last hidden state at ``[CLS]`` for a model without pooler) gives
  ``(mu, logvar) = Linear(h).chunk(2)``, as in Optimus.
* :class:`GPT2TextDecoder`: a ``GPT2LMHeadModel`` conditioned on ``z`` in Optimus' two ways:

  - ``injection="embedding"``: ``e_t = wte(x_t) + W_e z`` — a projection of ``z`` is added to the
    embedding of every input token (GPT-2 then adds its position embeddings);
  - ``injection="memory"``: ``W_m z`` in R^{n_layer * n_embd} is split into one vector per layer,
    reshaped to ``(n_head, 1, head_dim)`` and prepended to that layer's keys *and* values (shared, as
    in Optimus) through ``past_key_values``: every token can attend to one extra "memory" slot at
    every layer. As in Optimus the memory slot takes position 0, so the tokens' GPT-2 positions
    start at 1 (one position of the context is used by the memory);
  - ``injection="both"``: both at once (Optimus' default configuration).

  ``forward(z, input_ids, attention_mask)`` gives teacher-forced logits ``(B, T, V)``, where
  ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; ``log_prob`` sums
  ``log p(x_{t+1} | x_{<=t}, z)`` over the target positions ``t + 1`` whose ``attention_mask`` is
  1 (``input_ids[:, 0]``, the ``<bos>``, is conditioned on, never scored); ``generate`` decodes
  greedily or by sampling.

Both have ``from_pretrained(local_dir, latent_dim)`` that reads *only* the local folder the user
gives (``local_files_only=True``; no download) and ``save_pretrained(dir)`` that writes the backbone
(``save_pretrained`` of ``transformers``) plus this module's latent projection
(``latent_head.pt``), which ``from_pretrained`` restores when present.

BERT and GPT-2 have different tokenisers: an Optimus text VAE tokenises each caption twice
(:mod:`pyro_diffmvae.caption_codec`).

**(c) The Optimus text VAE as a modality** of :class:`~pyro_diffmvae.model.MultimodalVAE`
(``model.text_nets=optimus`` in :mod:`pyro_diffmvae.builders`): a caption is one int64 vector
``(4 L,)`` packing both tokenisations and their masks
(:class:`~pyro_diffmvae.caption_codec.OptimusCaptionCodec`);
:class:`OptimusCaptionEncoder` runs :class:`BertTextEncoder` on the BERT part and
:class:`OptimusCaptionDecoder` gives :class:`~pyro_diffmvae.caption_likelihood.OptimusCaptionLikelihood`,
whose ``log_prob`` is :meth:`GPT2TextDecoder.log_prob` of the GPT-2 part.

The codec, the tokenisers and the likelihood live in those modules (and ``require_transformers`` in
:mod:`pyro_diffmvae.transformers_local`); this module re-exports them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..caption_codec import OptimusCaptionCodec, attend_first, encode_captions_for_optimus, load_optimus_tokenizers
from ..caption_likelihood import OptimusCaptionLikelihood
from ..transformers_local import local_model_dir, require_transformers

__all__ = [
    "LATENT_HEAD_FILE",
    "BertTextEncoder",
    "GPT2TextDecoder",
    "OptimusCaptionCodec",
    "OptimusCaptionDecoder",
    "OptimusCaptionEncoder",
    "OptimusCaptionLikelihood",
    "TokenSequenceDecoder",
    "TokenSequenceEncoder",
    "encode_captions_for_optimus",
    "load_optimus_tokenizers",
    "require_transformers",
]

LATENT_HEAD_FILE = "latent_head.pt"
INJECTIONS = ("memory", "embedding", "both")


def _split(h: torch.Tensor, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h (B, 2D) -> (mu, logvar)``, the log-variance soft-clamped to ``bound * tanh(. / bound)``."""
    mu, logvar = h.chunk(2, dim=-1)
    return mu, bound * torch.tanh(logvar / bound)


# ==================================================================== (a) token models from scratch
class _ConvBlock(nn.Module):
    """Residual block ``h + conv(SiLU(conv(SiLU(h))))`` on ``(B, C, L)``, kernel 3, same length."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv1d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m = 1.0 if mask is None else mask
        r = self.conv1(F.silu(h) * m) * m
        return h + self.conv2(F.silu(r)) * m


class TokenSequenceEncoder(nn.Module):
    """Encoder ``tokens (B, L) -> (mu, logvar)``, each ``(B, latent_dim)``, that ignores padding.

    ``h_t = E[x_t] + P_t`` (``P``: learned positions), masked to 0 where ``mask_t = 0``;
    ``num_layers`` residual conv blocks, re-masked after every convolution; then
    ``[mean_t h_t, max_t h_t]`` over the unmasked positions → MLP → ``(mu, logvar)``. The mask
    defaults to ``tokens != pad_id``; a caption of only padding pools to zeros.
    """

    def __init__(self, vocab_size: int, length: int, latent_dim: int, embed_dim: int = 128, hidden: int = 256,
                 num_layers: int = 2, pad_id: int = 0, logvar_bound: float = 10.0):
        super().__init__()
        self.vocab_size, self.length, self.latent_dim, self.pad_id = vocab_size, length, latent_dim, pad_id
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.position = nn.Parameter(0.02 * torch.randn(length, embed_dim))
        self.input = nn.Conv1d(embed_dim, hidden, 1)
        self.blocks = nn.ModuleList(_ConvBlock(hidden) for _ in range(num_layers))
        self.head = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2 * latent_dim))
        self.logvar_bound = logvar_bound

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if tokens.dim() != 2 or tokens.shape[1] > self.length:
            raise ValueError(f"TokenSequenceEncoder expects token ids (batch, <= {self.length}), got {tuple(tokens.shape)}")
        tokens = tokens.long()
        mask = (tokens != self.pad_id) if mask is None else mask.bool()
        m = mask.unsqueeze(1).to(self.position.dtype)  # (B, 1, L)
        L = tokens.shape[1]
        h = (self.embed(tokens) + self.position[:L]).transpose(1, 2) * m  # (B, E, L)
        h = self.input(h) * m
        for block in self.blocks:
            h = block(h, m)
        count = m.sum(-1).clamp_min(1.0)  # (B, 1)
        mean = h.sum(-1) / count
        maximum = h.masked_fill(m == 0, float("-inf")).amax(-1)
        maximum = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
        return _split(self.head(torch.cat([mean, maximum], -1)), self.logvar_bound)


class TokenSequenceDecoder(nn.Module):
    """Non-autoregressive decoder ``z (B, latent_dim) -> logits (B, length, vocab_size)``.

    ``c = SiLU(W z)``, ``h_t = c + P_t``; each of ``num_layers`` residual conv blocks takes
    ``h + U_k z`` (``z`` re-injected per block); a 1x1 convolution gives the logits. Positions are
    conditionally independent given ``z``.
    """

    def __init__(self, latent_dim: int, length: int, vocab_size: int, hidden: int = 256, num_layers: int = 3):
        super().__init__()
        self.latent_dim, self.length, self.vocab_size = latent_dim, length, vocab_size
        self.latent = nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU())
        self.position = nn.Parameter(0.02 * torch.randn(hidden, length))
        self.inject = nn.ModuleList(nn.Linear(latent_dim, hidden) for _ in range(num_layers))
        self.blocks = nn.ModuleList(_ConvBlock(hidden) for _ in range(num_layers))
        self.out = nn.Sequential(nn.SiLU(), nn.Conv1d(hidden, vocab_size, 1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"TokenSequenceDecoder expects z of shape (batch, {self.latent_dim}), got {tuple(z.shape)}")
        h = self.latent(z).unsqueeze(-1) + self.position  # (B, H, L)
        for inject, block in zip(self.inject, self.blocks):
            h = block(h + inject(z).unsqueeze(-1))
        return self.out(h).transpose(1, 2)  # (B, L, V)

    def log_prob(self, z: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_t mask_t log softmax(logits_t)[x_t]`` → ``(B,)`` (all positions when ``mask`` is None)."""
        logp = self(z).log_softmax(-1).gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
        return logp.sum(-1) if mask is None else (logp * mask.to(logp.dtype)).sum(-1)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, do_sample: bool = False, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Token ids ``(B, length)``: the argmax at every position, or one sample per position."""
        logits = self(z)
        if not do_sample:
            return logits.argmax(-1)
        probs = (logits / temperature).softmax(-1)
        return torch.multinomial(probs.reshape(-1, self.vocab_size), 1, generator=generator).reshape(logits.shape[:2])


# ================================================================ (b) Optimus-style BERT / GPT-2
class BertTextEncoder(nn.Module):
    """Optimus' encoder: ``(mu, logvar) = Linear(BERT pooled [CLS]).chunk(2)``, each ``(B, latent_dim)``.

    :param bert: a ``transformers.BertModel`` (pretrained or randomly initialised).
    """

    def __init__(self, bert: nn.Module, latent_dim: int, logvar_bound: float = 10.0):
        super().__init__()
        require_transformers()
        self.bert = bert
        self.latent_dim = latent_dim
        self.latent_head = nn.Linear(bert.config.hidden_size, 2 * latent_dim)
        self.logvar_bound = logvar_bound

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:  # a BertModel built with add_pooling_layer=False
            pooled = out.last_hidden_state[:, 0]
        return _split(self.latent_head(pooled), self.logvar_bound)

    @classmethod
    def from_pretrained(cls, local_dir: str | os.PathLike, latent_dim: int, **kwargs: Any) -> BertTextEncoder:
        """A ``BertModel`` read from ``local_dir`` only (no download); the latent head is restored from
        ``local_dir/latent_head.pt`` when present (written by :meth:`save_pretrained`), else new."""
        transformers = require_transformers()
        path = local_model_dir(local_dir, "BertTextEncoder.from_pretrained")
        bert = transformers.BertModel.from_pretrained(os.fspath(path), local_files_only=True)
        model = cls(bert, latent_dim, **kwargs)
        _load_head(model, path)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the BERT model (``save_pretrained``) and the latent head to ``directory``."""
        _save_head(self, self.bert, directory)


class GPT2TextDecoder(nn.Module):
    """Optimus' decoder: a ``transformers.GPT2LMHeadModel`` conditioned on ``z`` (see the module docstring).

    :param gpt2_lm: the language model (pretrained or randomly initialised).
    :param latent_dim: the dimension of ``z``.
    :param injection: ``"memory"`` (an extra key/value slot per layer), ``"embedding"`` (added to
        every token embedding) or ``"both"``.
    """

    def __init__(self, gpt2_lm: nn.Module, latent_dim: int, injection: str = "memory"):
        super().__init__()
        require_transformers()
        if injection not in INJECTIONS:
            raise ValueError(f"unknown injection {injection!r}; known: {list(INJECTIONS)}")
        self.gpt2 = gpt2_lm
        self.latent_dim, self.injection = latent_dim, injection
        config = gpt2_lm.config
        self.n_layer, self.n_head, self.n_embd = config.n_layer, config.n_head, config.n_embd
        self.use_memory = injection in ("memory", "both")
        self.use_embedding = injection in ("embedding", "both")
        # Optimus: linear (memory, n_layer * n_embd) and linear_emb (embedding, n_embd), without activation
        self.memory_projection = nn.Linear(latent_dim, self.n_layer * self.n_embd, bias=False) if self.use_memory else None
        self.embedding_projection = nn.Linear(latent_dim, self.n_embd, bias=False) if self.use_embedding else None

    # ------------------------------------------------------------------ conditioning
    def _memory_cache(self, z: torch.Tensor):
        """The per-layer memory ``W_m z`` as a ``past_key_values`` cache of length 1 (keys = values)."""
        B = z.shape[0]
        memory = self.memory_projection(z).view(B, self.n_layer, self.n_head, 1, self.n_embd // self.n_head)
        pairs = [(memory[:, layer], memory[:, layer]) for layer in range(self.n_layer)]
        transformers = require_transformers()
        try:
            return transformers.DynamicCache(ddp_cache_data=pairs, config=self.gpt2.config)
        except TypeError:  # older transformers
            return transformers.DynamicCache.from_legacy_cache(tuple(pairs))

    def _embed(self, z: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.gpt2.get_input_embeddings()(input_ids)
        if self.use_embedding:
            embeds = embeds + self.embedding_projection(z).unsqueeze(1).to(embeds.dtype)
        return embeds

    def _check(self, z: torch.Tensor, input_ids: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.latent_dim:
            raise ValueError(f"GPT2TextDecoder expects z of shape (batch, {self.latent_dim}), got {tuple(z.shape)}")
        if input_ids.dim() != 2 or input_ids.shape[0] != z.shape[0]:
            raise ValueError(f"input_ids must be (batch={z.shape[0]}, T), got {tuple(input_ids.shape)}")

    # ------------------------------------------------------------------ teacher forcing
    def forward(self, z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher-forced logits ``(B, T, V)``; ``logits[:, t]`` is the distribution of token ``t + 1``."""
        self._check(z, input_ids)
        B, T = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        cache = None
        if self.use_memory:
            cache = self._memory_cache(z)
            attention_mask = torch.cat([attention_mask.new_ones(B, 1), attention_mask], dim=1)
        out = self.gpt2(inputs_embeds=self._embed(z, input_ids), attention_mask=attention_mask,
                        past_key_values=cache, use_cache=cache is not None)
        return out.logits

    def log_prob(self, z: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``log p(x_1..x_{T-1} | x_0, z) = sum_t m_{t+1} log softmax(logits_t)[x_{t+1}]`` → ``(B,)``."""
        logits = self(z, input_ids, attention_mask)[:, :-1]
        targets = input_ids[:, 1:].long()
        logp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if attention_mask is not None:
            logp = logp * attention_mask[:, 1:].to(logp.dtype)
        return logp.sum(-1)

    # ------------------------------------------------------------------ decoding
    @torch.no_grad()
    def generate(self, z: torch.Tensor, max_length: int, bos_id: int, eos_id: int, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, pad_id: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Decode ``z`` into token ids ``(B, n)``, ``n <= max_length``, starting with ``bos_id``.

        Greedy (``do_sample=False``) or sampled from ``softmax(logits / temperature)`` restricted to
        the ``top_k`` most likely tokens. A row stops at its first ``eos_id`` (kept) and is filled
        with ``pad_id`` (default ``eos_id``) afterwards; decoding stops when every row has stopped.
        The key/value cache is reused, so each step costs one token.
        """
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        pad_id = eos_id if pad_id is None else pad_id
        B = z.shape[0]
        ids = torch.full((B, 1), bos_id, dtype=torch.long, device=z.device)
        cache = self._memory_cache(z) if self.use_memory else None
        memory = 1 if self.use_memory else 0
        done = torch.zeros(B, dtype=torch.bool, device=z.device)
        step_ids = ids
        while ids.shape[1] < max_length and not bool(done.all()):
            mask = torch.ones(B, memory + ids.shape[1], dtype=torch.long, device=z.device)
            out = self.gpt2(inputs_embeds=self._embed(z, step_ids), attention_mask=mask, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1].float()
            if do_sample:
                logits = logits / temperature
                if top_k is not None:
                    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done = done | (nxt == eos_id)
            step_ids = nxt.unsqueeze(1)
            ids = torch.cat([ids, step_ids], dim=1)
        return ids

    # ------------------------------------------------------------------ files
    @classmethod
    def from_pretrained(cls, local_dir: str | os.PathLike, latent_dim: int, injection: str = "memory") -> GPT2TextDecoder:
        """A ``GPT2LMHeadModel`` read from ``local_dir`` only (no download); the latent projections are
        restored from ``local_dir/latent_head.pt`` when present (written by :meth:`save_pretrained`)."""
        transformers = require_transformers()
        path = local_model_dir(local_dir, "GPT2TextDecoder.from_pretrained")
        gpt2 = transformers.GPT2LMHeadModel.from_pretrained(os.fspath(path), local_files_only=True)
        model = cls(gpt2, latent_dim, injection=injection)
        _load_head(model, path)
        return model

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the GPT-2 model (``save_pretrained``) and the latent projections to ``directory``."""
        _save_head(self, self.gpt2, directory)


def _head_state(model: nn.Module, backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters of ``model`` that are not in its ``transformers`` backbone."""
    inner = {id(p) for p in backbone.parameters()}
    return {k: v.detach().cpu() for k, v in model.named_parameters() if id(v) not in inner}


def _save_head(model: nn.Module, backbone: nn.Module, directory: str | os.PathLike) -> None:
    os.makedirs(directory, exist_ok=True)
    backbone.save_pretrained(os.fspath(directory))
    head = {"latent_dim": model.latent_dim, "injection": getattr(model, "injection", None),
            "state": _head_state(model, backbone)}
    torch.save(head, os.path.join(os.fspath(directory), LATENT_HEAD_FILE))


def _load_head(model: nn.Module, directory: Path) -> None:
    path = directory / LATENT_HEAD_FILE
    if not path.is_file():
        return
    head = torch.load(path, map_location="cpu", weights_only=True)
    if head.get("latent_dim") != model.latent_dim or head.get("injection") != getattr(model, "injection", None):
        raise ValueError(
            f"{os.fspath(path)!r} holds a latent head for latent_dim={head.get('latent_dim')}, "
            f"injection={head.get('injection')!r}, not latent_dim={model.latent_dim}, "
            f"injection={getattr(model, 'injection', None)!r}"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in head["state"].items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"{os.fspath(path)!r}: unexpected parameter {name!r} {tuple(value.shape)}")
            params[name].copy_(value)


# ============================================================ Optimus text VAE as a modality
class OptimusCaptionEncoder(nn.Module):
    """The expert of an Optimus text modality: packed captions ``(B, 4 L)`` → :class:`BertTextEncoder` on ``(e, m_e)``."""

    def __init__(self, encoder: BertTextEncoder, codec: OptimusCaptionCodec):
        super().__init__()
        config = encoder.bert.config
        if codec.bert_vocab_size > config.vocab_size:
            raise ValueError(f"the BERT tokenizer has {codec.bert_vocab_size} tokens, more than the BERT model's "
                             f"vocab_size {config.vocab_size}: the tokenizer and the model are from different folders?")
        if codec.length > config.max_position_embeddings:
            raise ValueError(f"captions of {codec.length} tokens exceed BERT's max_position_embeddings "
                             f"{config.max_position_embeddings}")
        self.net, self.codec = encoder, codec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e, m_e, _, _ = self.codec.unpack(x)
        return self.net(e.long(), attend_first(m_e).long())


class OptimusCaptionDecoder(nn.Module):
    """The decoder of an Optimus text modality: ``z -> OptimusCaptionLikelihood`` over packed captions.

    Duck-types :class:`~pyro_diffmvae.modality.FeedForwardDecoder` (``event_shape``, ``check_data``,
    ``generate``, ``is_diffusion = False``); ``generate`` decodes greedily (``mean=True``) or samples,
    and returns packed captions (:meth:`OptimusCaptionCodec.pack_generated`).
    """

    is_diffusion = False

    def __init__(self, decoder: GPT2TextDecoder, codec: OptimusCaptionCodec):
        super().__init__()
        config = decoder.gpt2.config
        if codec.gpt2_vocab_size > config.vocab_size:
            raise ValueError(f"the GPT-2 tokenizer has {codec.gpt2_vocab_size} tokens, more than the GPT-2 model's "
                             f"vocab_size {config.vocab_size}: the tokenizer and the model are from different folders?")
        positions = codec.length + (1 if decoder.use_memory else 0)  # the memory slot takes position 0
        if positions > config.n_positions:
            raise ValueError(f"captions of {codec.length} tokens (+1 memory slot) exceed GPT-2's n_positions {config.n_positions}")
        self.net, self.codec = decoder, codec
        self.event_shape = torch.Size([4 * codec.length])

    def forward(self, z: torch.Tensor) -> OptimusCaptionLikelihood:
        return OptimusCaptionLikelihood(self.net, self.codec, z)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, mean: bool = True, **_) -> torch.Tensor:
        """Packed captions ``(B, 4 L)`` decoded from ``z`` (greedy when ``mean``, else sampled)."""
        ids = self.net.generate(z, max_length=self.codec.length, bos_id=self.codec.bos_id, eos_id=self.codec.eos_id,
                                pad_id=self.codec.pad_id, do_sample=not mean)
        return self.codec.pack_generated(ids)

    def check_data(self, name: str, x: torch.Tensor) -> None:
        self.codec.check(name, x)
