r"""CLIP score of images against captions (Hessel et al., 2021), with a CLIP model from a local folder.

For an image :math:`I` and a caption :math:`C`, with :math:`E_I` the CLIP image embedding
(``get_image_features``: the vision tower's pooled output through ``visual_projection``) and
:math:`E_C` the text embedding (``get_text_features``: the text tower's end-of-text state through
``text_projection``),

.. math:: \mathrm{CLIPScore}(I, C) = 100\cdot\max\big(\cos(E_I, E_C),\ 0\big),
          \qquad \mathrm{CLIPScore} = \frac1N\sum_{i=1}^N \mathrm{CLIPScore}(I_i, C_i),

i.e. Hessel et al.'s CLIP-S with weight :math:`w = 100` (they use 2.5), clipped at 0 *per pair*.
(``torchmetrics.multimodal.CLIPScore`` clips the *mean* instead; the two agree whenever no pair has
a negative cosine, the usual case with a trained CLIP.)

**Preprocessing** (done here in torch, so that generated images need no PIL round trip): images
``(N, 3, H, W)`` with values in ``value_range`` (default ``[-1, 1]``, this library's image range)
are mapped to ``[0, 1]``, resized so that the shorter side is the vision tower's ``image_size``
(bicubic, antialiased; nothing happens when it already is), centre-cropped to a square, and
normalised per channel with ``(u - mean) / std`` — ``image_mean`` / ``image_std`` of the folder's
``preprocessor_config.json`` when present, else OpenAI CLIP's constants. (The official
``CLIPImageProcessor`` does the same on 8-bit PIL images; the scores differ by quantisation and
resampling details only.) Captions are tokenised by the folder's tokenizer, truncated to the text
tower's ``max_position_embeddings`` (77 for the released CLIPs).

The folder is one written by ``CLIPModel.save_pretrained`` plus the tokenizer's ``save_pretrained``
(e.g. a downloaded ``openai/clip-vit-base-patch32``); it is read with ``local_files_only=True``,
nothing is ever downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.nn import functional as F

from ..transformers_local import require_transformers

__all__ = ["CLIPScore", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "clip_scores"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_scores(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """``100 * max(cos(E_I, E_C), 0)`` per row, shape ``(N,)``, from unnormalised embeddings ``(N, E)``."""
    if image_features.shape != text_features.shape or image_features.dim() != 2:
        raise ValueError(f"image and text features must both be (N, E), got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return 100.0 * cos.clamp_min(0.0)


def _features(out) -> torch.Tensor:
    """``get_*_features`` returns a tensor (transformers 4) or an output whose ``pooler_output`` it is (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class CLIPScore:
    """The CLIP score of the module docstring, with the CLIP model of the local folder ``model_dir``.

    :param model_dir: a folder holding ``config.json`` of a CLIP model, its weights and its
        tokenizer files (``evaluation.clip_model``).
    :param device: where the CLIP model runs.
    :param batch_size: images / captions per forward pass.
    :param value_range: the ``(low, high)`` range of the images given to :meth:`scores`.

    ``CLIPScore(path)(images, captions)`` is the mean score (a float); :meth:`scores` gives the
    per-pair scores ``(N,)``.
    """

    def __init__(self, model_dir: str | os.PathLike | None, device: str | torch.device = "cpu", batch_size: int = 64,
                 value_range: tuple[float, float] = (-1.0, 1.0)):
        transformers = require_transformers()
        self.path = _clip_folder(model_dir)
        where = os.fspath(self.path)
        try:
            config = transformers.AutoConfig.from_pretrained(where, local_files_only=True)
        except Exception as e:
            raise ValueError(f"CLIP score: cannot read the model config in {where!r} ({type(e).__name__}: {e})") from e
        if getattr(config, "model_type", None) != "clip":
            raise ValueError(f"CLIP score: {where!r} holds a {getattr(config, 'model_type', None)!r} model, not a CLIP "
                             f"model (config.json model_type 'clip')")
        try:
            self.model = transformers.CLIPModel.from_pretrained(where, local_files_only=True)
        except Exception as e:
            raise ValueError(f"CLIP score: cannot load the CLIP weights from {where!r} ({type(e).__name__}: {e})") from e
        hint = "the folder needs the tokenizer's files (tokenizer.json, or vocab.json and merges.txt)"
        if not ((self.path / "tokenizer.json").is_file()
                or ((self.path / "vocab.json").is_file() and (self.path / "merges.txt").is_file())):
            # transformers would silently build an empty default tokenizer instead
            raise FileNotFoundError(f"CLIP score: {where!r} has no tokenizer: {hint}")
        try:
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(where, local_files_only=True)
        except Exception as e:
            raise ValueError(f"CLIP score: cannot load the CLIP tokenizer from {where!r}: {hint} ({type(e).__name__}: {e})") from e
        self.model = self.model.eval().to(device)
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.image_size = int(config.vision_config.image_size)
        self.max_length = int(config.text_config.max_position_embeddings)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        processor = self.path / "preprocessor_config.json"
        if processor.is_file():
            settings = json.loads(processor.read_text())
            mean, std = settings.get("image_mean", mean), settings.get("image_std", std)
        self.mean = torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1)

    def __repr__(self) -> str:
        return f"CLIPScore({os.fspath(self.path)!r}, image_size={self.image_size})"

    # ------------------------------------------------------------------ preprocessing
    def pixel_values(self, images: torch.Tensor) -> torch.Tensor:
        """Images ``(N, 3, H, W)`` in ``value_range`` → CLIP's normalised ``(N, 3, R, R)`` (module docstring)."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"CLIP score: images must be a (N, 3, H, W) tensor, got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if not images.is_floating_point():
            raise ValueError(f"CLIP score: images must be floating point in {self.value_range}, got {images.dtype}")
        low, high = self.value_range
        u = ((images.float() - low) / (high - low)).clamp(0.0, 1.0)
        R = self.image_size
        H, W = u.shape[-2:]
        if min(H, W) != R:
            size = (max(R, round(H * R / min(H, W))), max(R, round(W * R / min(H, W))))
            u = F.interpolate(u, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0.0, 1.0)
        top, left = (u.shape[-2] - R) // 2, (u.shape[-1] - R) // 2
        u = u[..., top:top + R, left:left + R]
        return (u - self.mean.to(u.device)) / self.std.to(u.device)

    # ------------------------------------------------------------------ embeddings
    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``E_I`` ``(N, E)`` (not normalised)."""
        out = []
        for i in range(0, images.shape[0], self.batch_size):
            pixels = self.pixel_values(images[i:i + self.batch_size].to(self.device))
            out.append(_features(self.model.get_image_features(pixel_values=pixels)).float())
        return torch.cat(out).cpu()

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """``E_C`` ``(N, E)`` (not normalised)."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError("CLIP score: captions must be a sequence of strings (decode token ids first)")
        out = []
        for i in range(0, len(captions), self.batch_size):
            tokens = self.tokenizer(list(captions[i:i + self.batch_size]), padding=True, truncation=True,
                                    max_length=self.max_length, return_tensors="pt")
            out.append(_features(self.model.get_text_features(input_ids=tokens["input_ids"].to(self.device),
                                                              attention_mask=tokens["attention_mask"].to(self.device))).float())
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------ scores
    def scores(self, images: torch.Tensor, captions: Sequence[str]) -> torch.Tensor:
        """``100 * max(cos(E_I_i, E_C_i), 0)`` for each pair, ``(N,)``."""
        if len(captions) != images.shape[0]:
            raise ValueError(f"CLIP score: {images.shape[0]} images but {len(captions)} captions (one caption per image)")
        if len(captions) == 0:
            raise ValueError("CLIP score: no images given")
        return clip_scores(self.image_features(images), self.text_features(captions))

    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> float:
        """The mean CLIP score of the pairs ``(images[i], captions[i])``."""
        return float(self.scores(images, captions).mean())


def _clip_folder(model_dir: str | os.PathLike | None) -> Path:
    if model_dir is None or (isinstance(model_dir, str) and not model_dir.strip()):
        raise ValueError("CLIP score: no CLIP model folder given (evaluation.clip_model is null); give a local folder "
                         "written by CLIPModel.save_pretrained and the tokenizer's save_pretrained. Nothing is downloaded.")
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CLIP score: the CLIP model folder {os.fspath(path)!r} does not exist "
                                f"(evaluation.clip_model); nothing is downloaded")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"CLIP score: {os.fspath(path)!r} has no config.json: expected a folder written by "
                                f"CLIPModel.save_pretrained (config.json, model.safetensors) plus the tokenizer files")
    return path
