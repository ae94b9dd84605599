"""Captions for an Optimus text VAE: the two tokenisations, and the packed layout of its caption modality.

BERT and GPT-2 have different tokenisers: an Optimus text VAE tokenises each caption twice, BERT
word pieces for the encoder and GPT-2 byte-pair tokens for the decoder
(:func:`encode_captions_for_optimus`, :func:`load_optimus_tokenizers`; local folders only, nothing
is downloaded).

As a modality of :class:`~pyro_diffmvae.model.MultimodalVAE` (``model.text_nets=optimus`` in
:mod:`pyro_diffmvae.builders`) a caption is one int64 vector ``(4 L,)`` packing both tokenisations
and their masks (:class:`OptimusCaptionCodec`; the data sets are wrapped in
:class:`~pyro_diffmvae.data.cub.OptimusCaptions`, which produces it). The networks that read and
score it are :class:`~pyro_diffmvae.nets.text.OptimusCaptionEncoder` and
:class:`~pyro_diffmvae.nets.text.OptimusCaptionDecoder`; both pass the masks through
:func:`attend_first`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from .transformers_local import local_model_dir, require_transformers

__all__ = ["OptimusCaptionCodec", "attend_first", "encode_captions_for_optimus", "load_optimus_tokenizers"]


def load_optimus_tokenizers(bert_dir: str | os.PathLike, gpt2_dir: str | os.PathLike):
    """The BERT and GPT-2 tokenisers ``(bert_tokenizer, gpt2_tokenizer)`` from local folders only."""
    transformers = require_transformers()
    bert = transformers.AutoTokenizer.from_pretrained(os.fspath(local_model_dir(bert_dir, "BERT tokenizer")), local_files_only=True)
    gpt2 = transformers.AutoTokenizer.from_pretrained(os.fspath(local_model_dir(gpt2_dir, "GPT-2 tokenizer")), local_files_only=True)
    return bert, gpt2


def encode_captions_for_optimus(captions: Sequence[str], bert_tokenizer, gpt2_tokenizer, max_length: int = 32,
                                bos_id: int | None = None, eos_id: int | None = None,
                                pad_id: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenise captions twice, as an Optimus text VAE needs: BERT pieces for the encoder, GPT-2 for the decoder.

    :returns: ``{"encoder_input_ids", "encoder_attention_mask"}`` — BERT's ``[CLS] ... [SEP]``
        padded/truncated to ``max_length`` — and ``{"decoder_input_ids", "decoder_attention_mask"}``
        — ``bos, GPT-2 tokens (truncated to max_length - 2), eos`` padded with ``pad_id`` to
        ``max_length``; all int64 ``(N, max_length)``, masks 1 on real tokens (``bos``/``eos``
        included). ``bos_id`` / ``eos_id`` / ``pad_id`` default to the GPT-2 tokenizer's
        (``<|endoftext|>`` for all three in the original GPT-2; pad falls back to eos).
    """
    if isinstance(captions, str):
        captions = [captions]
    captions = list(captions)
    enc = bert_tokenizer(captions, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    bos_id = gpt2_tokenizer.bos_token_id if bos_id is None else bos_id
    eos_id = gpt2_tokenizer.eos_token_id if eos_id is None else eos_id
    if pad_id is None:
        pad_id = gpt2_tokenizer.pad_token_id if gpt2_tokenizer.pad_token_id is not None else eos_id
    if bos_id is None or eos_id is None or pad_id is None:
        raise ValueError("the GPT-2 tokenizer has no bos/eos token: pass bos_id, eos_id (and pad_id)")
    pieces = gpt2_tokenizer(captions, add_special_tokens=False)["input_ids"]
    ids = torch.full((len(captions), max_length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(captions), max_length), dtype=torch.long)
    for row, tokens in enumerate(pieces):
        seq = [bos_id] + list(tokens)[: max_length - 2] + [eos_id]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {
        "encoder_input_ids": enc["input_ids"].long(),
        "encoder_attention_mask": enc["attention_mask"].long(),
        "decoder_input_ids": ids,
        "decoder_attention_mask": mask,
    }


class OptimusCaptionCodec:
    r"""Captions ↔ the packed int64 layout of an Optimus text modality (one vector per caption).

    A caption is stored as ``(4 L,)`` = ``[e | m_e | d | m_d]``, each of length ``L = length``:
    ``e`` BERT's ``[CLS] ... [SEP]`` ids and ``m_e`` its attention mask; ``d`` =
    ``<bos> GPT-2 tokens <eos>`` and ``m_d`` its mask, padded with ``pad_id``
    (:func:`encode_captions_for_optimus`). One vector per caption keeps a batch a plain tensor
    ``(B, 4 L)``, as the multimodal model expects of every modality.

    :param bert_tokenizer: ``transformers`` tokenisers (:func:`load_optimus_tokenizers`).
    :param gpt2_tokenizer: see ``bert_tokenizer`` above.
    :param length: ``L``.
    """

    def __init__(self, bert_tokenizer, gpt2_tokenizer, length: int = 32):
        if isinstance(length, bool) or not isinstance(length, int) or length < 3:
            raise ValueError(f"length must be an integer >= 3 (bos, one token, eos), got {length!r}")
        self.bert_tokenizer, self.gpt2_tokenizer, self.length = bert_tokenizer, gpt2_tokenizer, length
        # the defaults of encode_captions_for_optimus: GPT-2's <|endoftext|> for all three in the original
        self.bos_id, self.eos_id = gpt2_tokenizer.bos_token_id, gpt2_tokenizer.eos_token_id
        self.pad_id = gpt2_tokenizer.pad_token_id if gpt2_tokenizer.pad_token_id is not None else self.eos_id
        if self.bos_id is None or self.eos_id is None:
            raise ValueError("the GPT-2 tokenizer has no bos/eos token (GPT-2's is <|endoftext|>): set its bos_token "
                             "and eos_token and save it again")
        self.bert_vocab_size, self.gpt2_vocab_size = len(bert_tokenizer), len(gpt2_tokenizer)

    @classmethod
    def from_folders(cls, bert_dir: str | os.PathLike, gpt2_dir: str | os.PathLike, length: int = 32) -> OptimusCaptionCodec:
        """The tokenisers saved in the BERT and GPT-2 folders (local only, nothing is downloaded)."""
        return cls(*load_optimus_tokenizers(bert_dir, gpt2_dir), length=length)

    def encode(self, captions: Sequence[str]) -> torch.Tensor:
        """Strings → packed int64 ``(N, 4 L)``."""
        out = encode_captions_for_optimus(captions, self.bert_tokenizer, self.gpt2_tokenizer, max_length=self.length,
                                          bos_id=self.bos_id, eos_id=self.eos_id, pad_id=self.pad_id)
        return torch.cat([out["encoder_input_ids"], out["encoder_attention_mask"], out["decoder_input_ids"],
                          out["decoder_attention_mask"]], dim=-1)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(..., 4 L)`` → ``(e, m_e, d, m_d)``, each ``(..., L)``."""
        if x.shape[-1] != 4 * self.length:
            raise ValueError(f"packed Optimus captions have 4 * {self.length} = {4 * self.length} ids per caption, "
                             f"got shape {tuple(x.shape)}")
        return tuple(x.unflatten(-1, (4, self.length)).unbind(-2))

    def decode(self, x: torch.Tensor) -> list[str]:
        """Packed ``(N, 4 L)`` → the strings of their GPT-2 tokens (between ``<bos>`` and the first ``<eos>``)."""
        _, _, ids, mask = self.unpack(torch.as_tensor(x).reshape(-1, 4 * self.length))
        return self._gpt2_text(ids, mask)

    def _gpt2_text(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        out = []
        for row, m in zip(ids.tolist(), mask.tolist()):
            tokens = [t for t, keep in zip(row[1:], m[1:]) if keep]
            if self.eos_id in tokens:
                tokens = tokens[: tokens.index(self.eos_id)]
            out.append(self.gpt2_tokenizer.decode(tokens, skip_special_tokens=True).strip())
        return out

    def pack_generated(self, ids: torch.Tensor) -> torch.Tensor:
        """GPT-2 ids ``(N, n)`` from :meth:`GPT2TextDecoder.generate` (``<bos>`` first, ``n <= L``) → packed
        ``(N, 4 L)``: the decoder part keeps the generated ids, padded, with mask 1 up to and including
        the first ``<eos>`` after ``<bos>``; the encoder part is the BERT tokenisation of their text."""
        N, n = ids.shape
        if n > self.length:
            raise ValueError(f"generated captions have {n} tokens, more than the length {self.length}")
        d = torch.full((N, self.length), self.pad_id, dtype=torch.long, device=ids.device)
        d[:, :n] = ids
        is_eos = torch.zeros_like(d, dtype=torch.bool)
        is_eos[:, 1:n] = ids[:, 1:] == self.eos_id
        after_eos = (is_eos.long().cumsum(-1) - is_eos.long()) > 0  # strictly after the first eos
        m_d = ((torch.arange(self.length, device=ids.device) < n) & ~after_eos).long()
        e_part = self.encode(self._gpt2_text(d, m_d))[:, : 2 * self.length].to(ids.device)
        return torch.cat([e_part, d, m_d], dim=-1)

    def check(self, name: str, x: torch.Tensor) -> None:
        """Raise a ValueError naming modality ``name`` unless ``x`` is packed captions of this codec."""
        if x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(f"modality {name!r}: Optimus captions must be integer ids, got {x.dtype}")
        e, m_e, d, m_d = self.unpack(x)
        for what, ids, size in (("BERT", e, self.bert_vocab_size), ("GPT-2", d, self.gpt2_vocab_size)):
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
                raise ValueError(f"modality {name!r}: {what} token ids must lie in [0, {size}), got "
                                 f"[{int(ids.min())}, {int(ids.max())}]")
        if bool(((m_e != 0) & (m_e != 1)).any() or ((m_d != 0) & (m_d != 1)).any()):
            raise ValueError(f"modality {name!r}: the attention masks of packed Optimus captions must be 0/1")


def attend_first(mask: torch.Tensor) -> torch.Tensor:
    """The mask with position 0 (``[CLS]`` / ``<bos>``, always real in data) set to 1: the model's zero
    placeholder rows for missing captions then attend to one token instead of none (no NaN)."""
    mask = mask.clone()
    mask[..., 0] = 1
    return mask
