r"""Shapes: the embedded, procedurally generated multimodal data set.

The default data set of the package needs no files and no downloads: every example is generated
deterministically from a seed. It has the structure of the paper's multimodal data sets —
**CelebAMask-HQ** (image + segmentation mask + binary attributes) and **CUB** (image + caption) —
in miniature: each example is a *scene* with one saturated, coloured shape on a smooth, muted,
textured background (like PolyMNIST's backgrounds), seen as four modalities:

==============  =======================  ==============================================================
name            tensor                   content
==============  =======================  ==============================================================
``image``       float32 ``(3, S, S)``    RGB in ``[-1, 1]`` (scaled for a diffusion decoder), 8-bit
                                         levels ``u / 127.5 - 1`` with ``u`` in ``0..255``
``mask``        float32 ``(1, S, S)``    ``{0, 1}``: the silhouette, exactly the pixels where the
                                         shape was drawn onto the image (no antialiasing)
``attributes``  float32 ``(17,)``        multi-hot of the 5 factors, one bit per factor group
``text``        int64 ``(8,)``           token ids of the caption
                                         ``"a {size} {colour} {shape} at the {vertical} {horizontal}"``
==============  =======================  ==============================================================

``S`` = ``image_size`` is 32 by default (64 works; any ``S >= 16``, though at 16 the small shapes
are only a few pixels wide).

**Factors.** A scene has 5 discrete factors, in this fixed order (:data:`FACTORS`)::

    shape      (circle, square, triangle)                      3 values   attribute bits  0..2
    colour     (red, green, blue, yellow, magenta, cyan)       6 values   attribute bits  3..8
    size       (small, large)                                  2 values   attribute bits  9..10
    horizontal (left, centre, right)                           3 values   attribute bits 11..13
    vertical   (top, middle, bottom)                           3 values   attribute bits 14..16

so there are 3·6·2·3·3 = 324 factor combinations. A factor vector is an int64 ``(5,)`` of value
indices; :func:`factors_to_attributes` / :func:`attributes_to_factors` convert to and from the
17-bit multi-hot attribute vector (the analogue of CelebA's 40 binary attributes, here with
exactly one bit set per group), :func:`caption` / :func:`tokenize` / :func:`detokenize` /
:func:`parse_caption` to and from the 8-word caption (the analogue of a CUB caption). Token id 0
is ``"<pad>"`` (never needed: every caption has exactly :data:`CAPTION_LENGTH` = 8 words).

**Rendering** (:func:`render`), in units of ``S``:

* position: centre at 0.25 / 0.5 / 0.75 of the image (left/centre/right, top/middle/bottom) plus a
  uniform jitter of at most 0.04, so the mask centroid always lies in the matching third;
* size: half-extent ``r`` = 0.13 (small) or 0.19 (large); a circle has radius ``r``, a square has
  half-side ``r`` (axis-aligned), an upward triangle has base ``2r`` and height ``1.5r`` with its
  centroid at the centre (apex at ``cy - r``, base at ``cy + r/2``). Every shape at every position
  lies inside the image with a margin of at least 0.02 (for ``S >= 32`` no shape touches a border
  pixel); the bounding-box fill ratio is ≈ 1 (square), π/4 (circle), 1/2 (triangle). Pixels are
  drawn when their centre lies in the shape (no antialiasing), so the mask is exactly the drawn
  pixels. At ``S = 16`` the small shapes are only a few pixels and their outlines are coarse;
* colour: the saturated RGB primary/secondary (red = (1, 0, 0), yellow = (1, 1, 0), …) times a
  random brightness in [0.85, 1] — the "on" channels are ≥ 0.85 and the "off" channels exactly 0
  (in ``[-1, 1]`` units: ≥ 0.7 and −1);
* background: a grey level in [0.36, 0.44] plus a sum of 4 random low-frequency sinusoids
  (0.5–3 cycles per image, total amplitude ≤ 0.12) plus a per-channel tint of at most ±0.04,
  clipped to [0.2, 0.6]: muted and low-saturation (channel spread ≤ 0.08), never confusable with
  the shape colours.

Images are quantised to 8 bits like a real photo data set; :class:`ShapesDataset` stores them as
``uint8`` (and caches them on disk that way) and converts one example at a time.

**Splits.** :class:`ShapesDataset` derives the seed of a split as ``seed * 1000 + split_id``
(train 0, val 1, test 2), so the splits never share examples. Within a split the factor
combinations are balanced (each of the 324 appears ⌊n/324⌋ or ⌈n/324⌉ times, in random order), and
the jitter, brightness and background are random per example.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..io import atomic_torch_save
from .spec import BY_CLASSIFIER, DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec
from .validation import check_modalities

__all__ = [
    "FACTORS",
    "FACTOR_NAMES",
    "FACTOR_SIZES",
    "NUM_ATTRIBUTES",
    "NUM_COMBINATIONS",
    "VOCAB",
    "CAPTION_LENGTH",
    "MODALITIES",
    "SPLITS",
    "DATA_VERSION",
    "factor_combinations",
    "factors_to_attributes",
    "attributes_to_factors",
    "caption",
    "tokenize",
    "detokenize",
    "parse_caption",
    "render",
    "generate_shapes",
    "ShapesDataset",
    "mask_to_factors",
    "POSITION_SIZE",
    "build_datasets",
    "modality_specs",
    "SPEC",
]

# --------------------------------------------------------------------------------- constants
FACTORS: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle"),
    "colour": ("red", "green", "blue", "yellow", "magenta", "cyan"),
    "size": ("small", "large"),
    "horizontal": ("left", "centre", "right"),
    "vertical": ("top", "middle", "bottom"),
}
FACTOR_NAMES: tuple[str, ...] = tuple(FACTORS)
FACTOR_SIZES: tuple[int, ...] = (3, 6, 2, 3, 3)
assert FACTOR_SIZES == tuple(len(v) for v in FACTORS.values())
NUM_ATTRIBUTES = 17
assert NUM_ATTRIBUTES == sum(FACTOR_SIZES)
NUM_COMBINATIONS = math.prod(FACTOR_SIZES)  # 324
_OFFSETS: tuple[int, ...] = tuple(int(o) for o in np.cumsum((0,) + FACTOR_SIZES[:-1]))

VOCAB: tuple[str, ...] = ("<pad>", "a", "at", "the") + tuple(w for words in FACTORS.values() for w in words)
assert len(set(VOCAB)) == len(VOCAB)
_WORD_TO_ID: dict[str, int] = {w: i for i, w in enumerate(VOCAB)}
CAPTION_LENGTH = 8
PAD_ID = 0

MODALITIES: tuple[str, ...] = ("image", "mask", "attributes", "text")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
DEFAULT_SPLIT_SIZES: dict[str, int] = {"train": 20000, "val": 2000, "test": 2000}
DATA_VERSION = 1  # bump when the rendering changes: it is part of the cache key
MIN_IMAGE_SIZE = 16

# Rendering constants, in units of the image size S.
_POSITIONS = (0.25, 0.5, 0.75)
_JITTER = 0.04
SIZE_HALF_EXTENTS = (0.13, 0.19)  # small, large half-extent, as fractions of the image side
_COLOURS = torch.tensor(
    [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32
)
_BRIGHTNESS = (0.85, 1.0)
_BG_GREY = (0.36, 0.44)
_BG_AMPLITUDE = (0.06, 0.12)
_BG_FREQ = (0.5, 3.0)  # cycles per image
_BG_TINT = 0.04
_BG_RANGE = (0.2, 0.6)
_NUM_WAVES = 4
_CHUNK = 256


# ------------------------------------------------------------------------ factors / attributes
def _check_factors(factors: torch.Tensor, what: str = "factors") -> torch.Tensor:
    factors = torch.as_tensor(factors)
    if factors.is_floating_point() or factors.dtype == torch.bool:
        raise ValueError(f"{what} must be integer factor indices, got {factors.dtype}")
    if factors.dim() == 0 or factors.shape[-1] != len(FACTOR_SIZES):
        raise ValueError(f"{what} must have shape (..., {len(FACTOR_SIZES)}) {FACTOR_NAMES}, got {tuple(factors.shape)}")
    factors = factors.long()
    sizes = torch.tensor(FACTOR_SIZES)
    bad = (factors < 0) | (factors >= sizes)
    if bad.any():
        j = int(torch.nonzero(bad)[0, -1])
        raise ValueError(
            f"{what}: factor {FACTOR_NAMES[j]!r} must lie in [0, {FACTOR_SIZES[j]}) "
            f"{FACTORS[FACTOR_NAMES[j]]}, got {int(factors[..., j][bad[..., j]][0])}"
        )
    return factors


def factor_combinations() -> torch.Tensor:
    """All 324 factor combinations as a LongTensor ``(324, 5)`` (lexicographic, last factor fastest)."""
    return torch.tensor(list(itertools.product(*(range(k) for k in FACTOR_SIZES))), dtype=torch.long)


def factors_to_attributes(factors: torch.Tensor) -> torch.Tensor:
    """Factor indices ``(..., 5)`` → float32 multi-hot attributes ``(..., 17)`` (one bit per group)."""
    factors = _check_factors(factors)
    idx = factors + torch.tensor(_OFFSETS)
    out = torch.zeros(factors.shape[:-1] + (NUM_ATTRIBUTES,), dtype=torch.float32)
    return out.scatter_(-1, idx, 1.0)


def attributes_to_factors(attrs: torch.Tensor) -> torch.Tensor:
    """Attributes ``(..., 17)`` (multi-hot, probabilities or logits) → factors ``(..., 5)``: the argmax
    of each factor group."""
    attrs = torch.as_tensor(attrs)
    if attrs.dim() == 0 or attrs.shape[-1] != NUM_ATTRIBUTES:
        raise ValueError(f"attributes must have shape (..., {NUM_ATTRIBUTES}), got {tuple(attrs.shape)}")
    groups = torch.split(attrs.float(), FACTOR_SIZES, dim=-1)
    return torch.stack([g.argmax(-1) for g in groups], dim=-1)


# ------------------------------------------------------------------------------------ captions
def caption(factors: torch.Tensor) -> str | list[str]:
    """The caption of a factor vector ``(5,)``, e.g. ``"a small red circle at the top left"``.

    A batch ``(N, 5)`` gives a list of N captions.
    """
    factors = _check_factors(factors)
    if factors.dim() > 1:
        return [caption(f) for f in factors.reshape(-1, len(FACTOR_SIZES))]
    shape, colour, size, horizontal, vertical = (FACTORS[n][int(i)] for n, i in zip(FACTOR_NAMES, factors))
    return f"a {size} {colour} {shape} at the {vertical} {horizontal}"


def tokenize(text: str) -> torch.Tensor:
    """A caption → int64 token ids ``(8,)``; ValueError on an unknown word or a wrong length."""
    if not isinstance(text, str):
        raise TypeError(f"tokenize expects a string, got {type(text).__name__}")
    words = text.lower().split()
    unknown = [w for w in words if w not in _WORD_TO_ID]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in caption {text!r}; the vocabulary is {list(VOCAB)}")
    if len(words) != CAPTION_LENGTH:
        raise ValueError(f"a caption must have exactly {CAPTION_LENGTH} words, got {len(words)}: {text!r}")
    return torch.tensor([_WORD_TO_ID[w] for w in words], dtype=torch.long)


def detokenize(tokens: torch.Tensor) -> str | list[str]:
    """Token ids ``(L,)`` → the caption string (``"<pad>"`` dropped); ``(N, L)`` → list of strings."""
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point():
        raise ValueError(f"tokens must be integer ids, got {tokens.dtype}")
    if tokens.dim() == 0:
        raise ValueError("tokens must have shape (L,) or (N, L), got a scalar")
    if tokens.dim() > 1:
        return [detokenize(t) for t in tokens.reshape(-1, tokens.shape[-1])]
    if tokens.numel() and (tokens.min() < 0 or tokens.max() >= len(VOCAB)):
        raise ValueError(f"token ids must lie in [0, {len(VOCAB)}), got range [{int(tokens.min())}, {int(tokens.max())}]")
    return " ".join(VOCAB[int(i)] for i in tokens if int(i) != PAD_ID)


_WORD_FACTOR = torch.full((len(VOCAB),), -1, dtype=torch.long)  # token id -> factor group (-1: none)
_WORD_VALUE = torch.full((len(VOCAB),), -1, dtype=torch.long)  # token id -> value index in its group
for _j, _name in enumerate(FACTOR_NAMES):
    for _v, _w in enumerate(FACTORS[_name]):
        _WORD_FACTOR[_WORD_TO_ID[_w]] = _j
        _WORD_VALUE[_WORD_TO_ID[_w]] = _v


def parse_caption(tokens: torch.Tensor) -> torch.Tensor:
    """Read the factors back from token ids ``(L,)`` or ``(N, L)`` → LongTensor ``(5,)`` / ``(N, 5)``.

    The reading is by words, not positions, so it tolerates malformed generated captions: a
    factor is read when the caption names exactly one distinct value of it (any number of times,
    anywhere), and is −1 when it names none or several. Ids outside the vocabulary are ignored.
    For a well-formed caption, ``parse_caption(tokenize(caption(f))) == f``.
    """
    tokens = torch.as_tensor(tokens)
    if tokens.is_floating_point() or tokens.dim() == 0:
        raise ValueError(f"tokens must be integer ids of shape (L,) or (N, L), got {tokens.dtype} {tuple(tokens.shape)}")
    single = tokens.dim() == 1
    t = tokens.reshape(-1, tokens.shape[-1]).long()
    valid = (t >= 0) & (t < len(VOCAB))
    t = torch.where(valid, t, torch.zeros_like(t))  # out-of-vocabulary -> <pad>, which names no factor
    onehot = torch.zeros(t.shape[0], len(VOCAB), dtype=torch.bool)
    onehot.scatter_(1, t, True)  # which words occur
    out = []
    for j, name in enumerate(FACTOR_NAMES):
        ids = torch.tensor([_WORD_TO_ID[w] for w in FACTORS[name]])
        present = onehot[:, ids]  # (N, k)
        value = present.float().argmax(-1)
        out.append(torch.where(present.sum(-1) == 1, value, torch.full_like(value, -1)))
    out = torch.stack(out, -1)
    return out[0] if single else out.reshape(tokens.shape[:-1] + (len(FACTOR_SIZES),))


# ----------------------------------------------------------------------------------- rendering
def _as_generator(rng) -> torch.Generator:
    if rng is None:
        return torch.Generator().manual_seed(0)
    if isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, np.random.Generator):
        return torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
    if isinstance(rng, (int, np.integer)):
        return torch.Generator().manual_seed(int(rng))
    raise TypeError(f"rng must be a torch.Generator, numpy Generator, int seed or None, got {type(rng).__name__}")


def _check_image_size(image_size) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be an integer >= {MIN_IMAGE_SIZE}, got {image_size!r}")
    return int(image_size)


def _render_uint8(factors: torch.Tensor, image_size: int, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes as ``uint8`` images ``(N, 3, S, S)`` in 0..255 and ``bool`` masks ``(N, 1, S, S)``.

    All per-example random numbers are drawn up front (one ``(N, 24)`` uniform draw), so the
    result does not depend on the chunking, and the same generator state renders the same scenes
    at every resolution.
    """
    factors = _check_factors(factors)
    if factors.dim() != 2:
        raise ValueError(f"factors must have shape (N, 5), got {tuple(factors.shape)}")
    S = _check_image_size(image_size)
    g = _as_generator(rng)
    N, K = factors.shape[0], _NUM_WAVES
    # columns: 0-1 jitter, 2 grey, 3 texture amplitude, 4-6 tint, 7 brightness, 8.. the K waves
    u = torch.rand(N, 8 + 4 * K, generator=g)
    images = torch.empty(N, 3, S, S, dtype=torch.uint8)
    masks = torch.empty(N, 1, S, S, dtype=torch.bool)
    grid = (torch.arange(S, dtype=torch.float32) + 0.5) / S  # pixel centres in (0, 1)
    positions, radii = torch.tensor(_POSITIONS), torch.tensor(SIZE_HALF_EXTENTS)
    for lo in range(0, N, _CHUNK):
        f, v = factors[lo : lo + _CHUNK], u[lo : lo + _CHUNK]
        B = f.shape[0]
        shape, colour, size, horiz, vert = f.unbind(-1)
        # --- the shape's silhouette
        cx = positions[horiz] + (2 * v[:, 0] - 1) * _JITTER
        cy = positions[vert] + (2 * v[:, 1] - 1) * _JITTER
        r = radii[size].view(B, 1, 1)
        dx = grid.view(1, 1, S) - cx.view(B, 1, 1)  # (B, 1, S)
        dy = grid.view(1, S, 1) - cy.view(B, 1, 1)  # (B, S, 1)
        circle = dx * dx + dy * dy <= r * r
        square = (dx.abs() <= r) & (dy.abs() <= r)
        triangle = (dy <= 0.5 * r) & (1.5 * dx.abs() <= dy + r)  # apex (cx, cy - r), base y = cy + r/2
        s = shape.view(B, 1, 1)
        mask = torch.where(s == 0, circle, torch.where(s == 1, square, triangle))  # (B, S, S)
        # --- the background: grey + low-frequency sinusoids + a mild tint
        grey = _BG_GREY[0] + (_BG_GREY[1] - _BG_GREY[0]) * v[:, 2]
        amplitude = _BG_AMPLITUDE[0] + (_BG_AMPLITUDE[1] - _BG_AMPLITUDE[0]) * v[:, 3]
        tint = (2 * v[:, 4:7] - 1) * _BG_TINT  # (B, 3)
        w = v[:, 8:].reshape(B, 4, K)
        freq = _BG_FREQ[0] + (_BG_FREQ[1] - _BG_FREQ[0]) * w[:, 0]
        angle, phase = 2 * math.pi * w[:, 1], 2 * math.pi * w[:, 2]
        amp = 0.2 + 0.8 * w[:, 3]
        amp = amp / amp.sum(-1, keepdim=True) * amplitude.view(B, 1)
        # sin(kx x + ky y + phase) = sin(kx x + phase) cos(ky y) + cos(kx x + phase) sin(ky y):
        # separable, so the texture is one batched (S, 2K) @ (2K, S) product per example
        ax = (2 * math.pi * freq * torch.cos(angle)).unsqueeze(-1) * grid + phase.unsqueeze(-1)  # (B, K, S)
        ay = (2 * math.pi * freq * torch.sin(angle)).unsqueeze(-1) * grid  # (B, K, S)
        amp = amp.unsqueeze(-1)
        left = torch.cat([torch.cos(ay), torch.sin(ay)], 1).transpose(1, 2)  # (B, S_y, 2K)
        right = torch.cat([amp * torch.sin(ax), amp * torch.cos(ax)], 1)  # (B, 2K, S_x)
        texture = torch.bmm(left, right) + grey.view(B, 1, 1)  # (B, S, S)
        background = texture.unsqueeze(1) + tint.view(B, 3, 1, 1)
        background = background.clamp_(*_BG_RANGE).mul_(255).round_().to(torch.uint8)
        # --- composite: the saturated shape colour times a brightness
        brightness = _BRIGHTNESS[0] + (_BRIGHTNESS[1] - _BRIGHTNESS[0]) * v[:, 7]
        fg = (_COLOURS[colour] * brightness.view(B, 1) * 255).round_().to(torch.uint8).view(B, 3, 1, 1)
        images[lo : lo + B] = torch.where(mask.unsqueeze(1), fg, background)
        masks[lo : lo + B] = mask.unsqueeze(1)
    return images, masks


def _to_float_image(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.to(torch.float32) / 127.5 - 1.0


def render(factors: torch.Tensor, image_size: int = 32, rng=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Render scenes with the given factors.

    :param factors: LongTensor ``(N, 5)`` of factor indices (see :data:`FACTORS`).
    :param image_size: ``S`` (>= 16).
    :param rng: a ``torch.Generator`` (advanced by the call), an int seed, a numpy ``Generator``
        (one seed is drawn from it) or None (seed 0); it draws the jitter, brightness and background.
    :returns: ``(images, masks)``: float32 ``(N, 3, S, S)`` in ``[-1, 1]`` (8-bit levels) and
        float32 ``(N, 1, S, S)`` in ``{0, 1}``, the pixels where the shape was drawn.
    """
    images, masks = _render_uint8(factors, image_size, rng)
    return _to_float_image(images), masks.to(torch.float32)


# ---------------------------------------------------------------------------------- generation
def _balanced_factors(n: int, g: torch.Generator) -> torch.Tensor:
    """``n`` balanced factor vectors in random order: ⌈n/324⌉ independent permutations of the 324
    combinations, concatenated, cut to ``n`` and shuffled, so every combination appears ⌊n/324⌋ or
    ⌈n/324⌉ times (for n <= 324 all are distinct)."""
    combos = factor_combinations()
    reps = max(1, -(-n // NUM_COMBINATIONS))
    blocks = torch.cat([combos[torch.randperm(NUM_COMBINATIONS, generator=g)] for _ in range(reps)])[:n]
    return blocks[torch.randperm(n, generator=g)]


def _generate_compact(n: int, image_size: int, seed: int) -> dict[str, torch.Tensor]:
    """The stored form of ``n`` examples: ``uint8`` images, ``bool`` masks and int64 factors."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"the number of examples must be a non-negative integer, got {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    image_size = _check_image_size(image_size)
    g = torch.Generator().manual_seed(int(seed))
    factors = _balanced_factors(int(n), g)
    images, masks = _render_uint8(factors, image_size, g)
    return {"image": images, "mask": masks, "factors": factors}


def _text_of(factors: torch.Tensor) -> torch.Tensor:
    """Token ids ``(N, 8)`` of the captions of ``factors`` ``(N, 5)``, built without strings."""
    w = lambda name: torch.tensor([_WORD_TO_ID[x] for x in FACTORS[name]])  # noqa: E731
    f = dict(zip(FACTOR_NAMES, factors.unbind(-1)))
    const = lambda word: torch.full_like(f["shape"], _WORD_TO_ID[word])  # noqa: E731
    cols = [const("a"), w("size")[f["size"]], w("colour")[f["colour"]], w("shape")[f["shape"]],
            const("at"), const("the"), w("vertical")[f["vertical"]], w("horizontal")[f["horizontal"]]]
    return torch.stack(cols, -1)


def generate_shapes(n: int, image_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Generate ``n`` examples deterministically from ``seed``.

    :returns: ``{"image": float32 (n, 3, S, S) in [-1, 1], "mask": float32 (n, 1, S, S) in {0, 1},
        "attributes": float32 (n, 17), "text": int64 (n, 8), "factors": int64 (n, 5)}``.
    """
    data = _generate_compact(n, image_size, seed)
    return {
        "image": _to_float_image(data["image"]),
        "mask": data["mask"].to(torch.float32),
        "attributes": factors_to_attributes(data["factors"]),
        "text": _text_of(data["factors"]),
        "factors": data["factors"],
    }


# ------------------------------------------------------------------------------------- dataset
class ShapesDataset(Dataset):
    """A split of the Shapes data set as a map-style ``torch`` data set.

    ``dataset[i]`` is ``{name: tensor for name in modalities, "meta": {"factors": (5,), "index": i}}``,
    so ``torch.utils.data.default_collate`` batches it into the model's batch format
    (``{"image": (B, 3, S, S), ..., "meta": {"factors": (B, 5), "index": (B,)}}``).

    :param split: ``"train"``, ``"val"`` or ``"test"``; its seed is ``seed * 1000 + split_id``
        (train 0, val 1, test 2), so splits never share examples.
    :param size: number of examples (default: train 20000, val 2000, test 2000).
    :param image_size: ``S`` (>= 16; 32 by default, 64 works).
    :param seed: the data set seed.
    :param cache_dir: when given, the generated tensors are saved there, one file per
        ``(split, size, image_size, seed, version)`` key (written atomically), and loaded on the next
        construction with the same key.
    :param modalities: the modalities returned by ``__getitem__`` (a subset of
        ``("image", "mask", "attributes", "text")``).

    Attributes: ``factors`` (LongTensor ``(N, 5)``), ``images`` (uint8 ``(N, 3, S, S)``),
    ``masks`` (bool ``(N, 1, S, S)``), ``attributes`` (float32 ``(N, 17)``), ``text`` (int64 ``(N, 8)``),
    ``cache_path`` (the cache file, or None) and ``loaded_from_cache``.
    """

    def __init__(
        self,
        split: str = "train",
        size: int | None = None,
        image_size: int = 32,
        seed: int = 0,
        cache_dir: str | os.PathLike | None = None,
        modalities: Sequence[str] = MODALITIES,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        modalities = check_modalities(modalities, MODALITIES)
        size = DEFAULT_SPLIT_SIZES[split] if size is None else size
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.split, self.size, self.seed = split, int(size), int(seed)
        self.image_size = _check_image_size(image_size)
        self.modalities = modalities
        self.split_seed = self.seed * 1000 + SPLITS[split]
        self.key = {"split": split, "size": self.size, "image_size": self.image_size,
                    "seed": self.seed, "version": DATA_VERSION}
        self.cache_path = None
        self.loaded_from_cache = False
        data = None
        if cache_dir is not None:
            self.cache_path = os.path.join(
                os.fspath(cache_dir),
                f"shapes_{split}_n{self.size}_s{self.image_size}_seed{self.seed}_v{DATA_VERSION}.pt",
            )
            if os.path.exists(self.cache_path):
                data = self._load_cache(self.cache_path)
                self.loaded_from_cache = True
        if data is None:
            data = _generate_compact(self.size, self.image_size, self.split_seed)
            if self.cache_path is not None:
                self._save_cache(self.cache_path, data)
        self.images: torch.Tensor = data["image"]
        self.masks: torch.Tensor = data["mask"]
        self.factors: torch.Tensor = data["factors"]
        self.attributes = factors_to_attributes(self.factors)
        self.text = _text_of(self.factors)

    # ------------------------------------------------------------------ cache
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        n, S = self.size, self.image_size
        return {"image": (n, 3, S, S), "mask": (n, 1, S, S), "factors": (n, len(FACTOR_SIZES))}

    def _load_cache(self, path: str) -> dict[str, torch.Tensor]:
        hint = "delete it to regenerate the data"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, ...
            raise RuntimeError(f"the Shapes cache file {path!r} is corrupt or unreadable ({type(e).__name__}: {e}); {hint}") from e
        if not isinstance(blob, Mapping) or not all(k in blob for k in ("key", "image", "mask", "factors")):
            raise RuntimeError(f"the Shapes cache file {path!r} is corrupt (missing entries); {hint}")
        if dict(blob["key"]) != self.key:
            raise RuntimeError(
                f"the Shapes cache file {path!r} holds the key {dict(blob['key'])}, not {self.key}; "
                f"it is left untouched — delete it or use another cache_dir"
            )
        dtypes = {"image": torch.uint8, "mask": torch.bool, "factors": torch.long}
        for name, shape in self._expected_shapes().items():
            t = blob[name]
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or t.dtype != dtypes[name]:
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RuntimeError(f"the Shapes cache file {path!r} is corrupt: {name!r} is {got}, expected {dtypes[name]} {shape}; {hint}")
        try:
            _check_factors(blob["factors"])
        except ValueError as e:
            raise RuntimeError(f"the Shapes cache file {path!r} is corrupt: {e}; {hint}") from e
        return {k: blob[k] for k in ("image", "mask", "factors")}

    def _save_cache(self, path: str, data: Mapping[str, torch.Tensor]) -> None:
        atomic_torch_save({"key": dict(self.key), **{k: data[k] for k in ("image", "mask", "factors")}}, path)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not -self.size <= i < self.size:
            raise IndexError(f"index {index} out of range for a ShapesDataset of {self.size} examples")
        i %= self.size
        out = {}
        for name in self.modalities:
            if name == "image":
                out[name] = _to_float_image(self.images[i])
            elif name == "mask":
                out[name] = self.masks[i].to(torch.float32)
            elif name == "attributes":
                out[name] = self.attributes[i]
            else:
                out[name] = self.text[i]
        out["meta"] = {"factors": self.factors[i], "index": i}
        return out

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
            f"seed={self.seed}, modalities={list(self.modalities)}, cache={self.cache_path!r})"
        )


# --------------------------------------------------------------------- read-back and the spec
def mask_to_factors(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Read shape, size and position from (N, 1, S, S) masks by geometry; colour is -1.

    Position: the centroid's third of the image. Size: the bounding box's longer side against the
    midpoint of the small and large extents (area would confuse a large triangle with a small
    square). Shape: the fill ratio of the bounding box (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
    An empty mask gives -1 everywhere.
    """
    m = (masks[:, 0] > threshold).float()
    N, S, _ = m.shape
    area = m.sum((1, 2))
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    cy = (m.sum(2) * coords).sum(1) / area.clamp(min=1)
    cx = (m.sum(1) * coords).sum(1) / area.clamp(min=1)
    height = m.any(2).float().sum(1)
    width = m.any(1).float().sum(1)
    fill = area / (height * width).clamp(min=1)
    shape = torch.where(fill > 0.9, 1, torch.where(fill > 0.64, 0, 2))
    r_small, r_large = SIZE_HALF_EXTENTS
    size = (torch.maximum(height, width) > (r_small + r_large) * S).long()
    horizontal = (cx / S * 3).long().clamp(0, 2)
    vertical = (cy / S * 3).long().clamp(0, 2)
    out = torch.stack([shape.long(), torch.full_like(size, -1), size, horizontal, vertical], 1)
    out[area == 0] = -1
    return out


#: factor columns a mask determines besides the shape: size, horizontal, vertical
POSITION_SIZE = (2, 3, 4)


def build_datasets(cfg) -> tuple[ShapesDataset, ShapesDataset, ShapesDataset]:
    """``(train, val, test)`` of ``cfg.dataset`` (``image_size``, ``seed``, ``*_size``, ``cache_dir``, ``modalities``)."""
    d = cfg.dataset
    common = dict(image_size=d.image_size, seed=d.seed, cache_dir=d.cache_dir, modalities=tuple(d.modalities))
    return tuple(ShapesDataset(split, size=size, **common)
                 for split, size in (("train", d.train_size), ("val", d.val_size), ("test", d.test_size)))


def modality_specs(cfg) -> dict:
    """The four modalities at ``cfg.dataset.image_size``, each read back into the five factors: the image
    by a factor classifier, the mask by its geometry, the attributes by the argmax of each group, the
    caption by parsing its words."""
    S = cfg.dataset.image_size
    return {
        "image": ModalitySpec((3, S, S), "normal", read=BY_CLASSIFIER),
        "mask": ModalitySpec((1, S, S), "bernoulli", read=mask_to_factors, f1=True),
        "attributes": ModalitySpec((NUM_ATTRIBUTES,), "bernoulli", read=attributes_to_factors, f1=True),
        "text": ModalitySpec((CAPTION_LENGTH,), "categorical", num_classes=len(VOCAB), read=parse_caption,
                             decode=detokenize),
    }


def _factors_of(batch: Mapping) -> torch.Tensor:
    return batch["meta"]["factors"]


def _data_identity(cfg) -> str:
    d = cfg.dataset
    return f"s{d.image_size}_seed{d.seed}_n{d.train_size}_v{DATA_VERSION}"


_LABELS = LabelSpec(FACTOR_SIZES, _factors_of)

#: the data set as the builders and the evaluation see it (:mod:`pyro_diffmvae.data.spec`): scored by the
#: per-factor accuracy of the factors read back from every generated modality
SPEC = DatasetSpec(
    name="shapes", title="shapes", build=build_datasets, modalities=modality_specs,
    evaluation=EvaluationSpec("factors", labels=lambda cfg, train_set: _LABELS, factor_groups={"position_size": POSITION_SIZE}),
    data_identity=_data_identity)
