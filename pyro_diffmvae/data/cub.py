r"""CUB-200-2011 birds with the 10 human captions per image (image + caption pairs).

The paper's second real data set pairs a photo of a bird with one of the 10 captions of Reed et
al. (the ``text_c10`` tree used by StackGAN, AttnGAN and MMVAE). This module reads the *official*
layouts, unchanged, from a root folder that holds both side by side::

    <root>/CUB_200_2011/images/<class folder>/<image>.jpg   the photos (e.g. 001.Black_footed_Albatross/...)
    <root>/CUB_200_2011/images.txt              "<image id> <class folder>/<image>.jpg"
    <root>/CUB_200_2011/image_class_labels.txt  "<image id> <class id>"          (class ids 1..200)
    <root>/CUB_200_2011/train_test_split.txt    "<image id> <is_training>"       (1 train, 0 test)
    <root>/CUB_200_2011/bounding_boxes.txt      "<image id> <x> <y> <width> <height>" (pixels; crop="bbox" only)
    <root>/CUB_200_2011/classes.txt             "<class id> <class folder>"      (optional: class names)
    <root>/text/<class folder>/<image>.txt      the captions of <image>.jpg, one per line (10 in the official tree)

(``images_root`` / ``text_root`` name the two folders explicitly; ``<root>/text_c10`` is accepted for
``<root>/text``.) A partial copy is fine: the metadata may list images that are not on disk (e.g.
all 11,788 listed, 543 present); those are skipped and counted (:attr:`CUBImageCaptionDataset.num_skipped`,
:attr:`~CUBImageCaptionDataset.missing_image_ids`), and only a split without any image raises.

**Example.** ``dataset[i]`` is::

    {"image": float32 (3, S, S) in [-1, 1],
     "text":  int64 (caption_length,) token ids  <bos> w_1 ... w_n <eos> <pad> ... <pad>,
     "meta":  {"index": i, "image_id": official id, "class_id": official class id (1..200),
               "caption_index": which of the image's captions (0..9)}}

so ``torch.utils.data.default_collate`` batches it.

**Images.** ``crop="bbox"`` (default, the usual practice of StackGAN/AttnGAN for CUB): the bird's
bounding box ``(x, y, w, h)`` is enlarged to the square of side ``bbox_scale * max(w, h)``
(``bbox_scale = 1.5`` as in StackGAN's ``r = 0.75 max(w, h)`` half-side) centred on the box centre
``(x + w/2, y + h/2)``, clipped to the photo (so a box near a border gives a non-square crop, which
the resize stretches slightly, exactly as in StackGAN). ``crop="center"`` takes the largest centred
square instead. The crop is resized to ``S x S`` (PIL bicubic, antialiased when shrinking),
quantised to 8 bits ``u`` and scaled as ``u / 127.5 - 1``. Grey-scale / CMYK photos are converted
to RGB.

**Captions.** Lines are stripped and blank lines dropped (a file with no caption raises, naming
it). ``caption_mode``: ``"random"`` (default for ``split="train"``) draws one of the image's
captions uniformly at every ``__getitem__`` (from ``torch``'s global generator, which
``DataLoader`` seeds differently in each worker, or from ``generator``); ``"fixed"`` (default for
``split="test"``) always uses caption ``caption_index`` (0, the first, by default; modulo the
number of lines); ``"all"`` makes one example per (image, caption) pair.

**Vocabulary** (:class:`Vocabulary`): lower-cased, tokenised by the regex ``\w+(?:'\w+)*|[^\w\s]``
(words, with inner apostrophes, and single punctuation marks), built from the *training* captions
only; ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then the words by decreasing
count (ties alphabetical). A test split reuses the training vocabulary: pass ``vocab=`` (the
training set's :attr:`~CUBImageCaptionDataset.vocab`); when it is omitted the vocabulary is built
from the training captions of the same root, never from the test captions.

**Optimus text VAE** (BERT encoder + GPT-2 decoder, :mod:`pyro_diffmvae.nets.text`): the word-level
ids mean nothing to those models, so :class:`OptimusCaptions` wraps a split and replaces ``"text"``
by the example's caption line (:meth:`CUBImageCaptionDataset.caption_text`, case and punctuation
kept) tokenised by both tokenisers (:class:`~pyro_diffmvae.caption_codec.OptimusCaptionCodec`).
"""

from __future__ import annotations

import bisect
import collections
import functools
import hashlib
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io import atomic_torch_save
from .spec import BY_CLASSIFIER, ClipSpec, DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec

__all__ = [
    "SPEC",
    "build_datasets",
    "cub_vocabulary",
    "modality_specs",
    "BOS",
    "CUB_LAYOUT",
    "EOS",
    "PAD",
    "SPECIAL_TOKENS",
    "UNK",
    "CUBImageCaptionDataset",
    "OptimusCaptions",
    "Vocabulary",
    "crop_box",
    "load_image",
    "normalize_caption",
    "read_captions",
    "tokenize_caption",
]

CUB_LAYOUT = """expected layout (the official CUB-200-2011 folder and the text_c10 caption tree side by side):
  <root>/CUB_200_2011/images/<class folder>/<image>.jpg
  <root>/CUB_200_2011/images.txt              (<image id> <class folder>/<image>.jpg)
  <root>/CUB_200_2011/image_class_labels.txt  (<image id> <class id>)
  <root>/CUB_200_2011/train_test_split.txt    (<image id> <1 train | 0 test>)
  <root>/CUB_200_2011/bounding_boxes.txt      (<image id> <x> <y> <width> <height>; for crop="bbox")
  <root>/text/<class folder>/<image>.txt      (the image's captions, one per line)"""

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
SPLITS: dict[str, int] = {"train": 1, "test": 0}  # the is_training flag of train_test_split.txt
CROPS = ("bbox", "center")
CAPTION_MODES = ("random", "fixed", "all")
DATA_VERSION = 1  # bump when the image preprocessing changes: it is part of the cache key

_TOKEN_RE = re.compile(r"\w+(?:'\w+)*|[^\w\s]")


# ------------------------------------------------------------------------------ vocabulary
def tokenize_caption(caption: str) -> list[str]:
    """Lower-case ``caption`` and split it into words and punctuation marks.

    ``"The bird's beak is orange/blue."`` → ``["the", "bird's", "beak", "is", "orange", "/", "blue", "."]``.
    """
    if not isinstance(caption, str):
        raise TypeError(f"a caption must be a string, got {type(caption).__name__}")
    return _TOKEN_RE.findall(caption.lower())


def normalize_caption(caption: str) -> str:
    """The caption as :meth:`Vocabulary.decode` writes it back: its tokens joined by single spaces."""
    return " ".join(tokenize_caption(caption))


class Vocabulary:
    """A word-level vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2, ``<unk>`` = 3, then ``words``.

    :param words: the ordinary words, in id order (ids 4, 5, ...); duplicates and special tokens
        are not allowed.

    Use :meth:`build` to make one from captions, :meth:`encode` / :meth:`decode` to convert, and
    :meth:`save` / :meth:`load` for a JSON file.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str]):
        words = list(words)
        bad = [w for w in words if not isinstance(w, str) or not w or w in SPECIAL_TOKENS]
        if bad:
            raise ValueError(f"vocabulary words must be non-empty strings other than {SPECIAL_TOKENS}, got {bad[:5]}")
        if len(set(words)) != len(words):
            dupes = [w for w, c in collections.Counter(words).items() if c > 1]
            raise ValueError(f"vocabulary words must be distinct; repeated: {dupes[:5]}")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + words
        self.token_to_id: dict[str, int] = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, captions: Iterable[str], min_count: int = 1, max_size: int | None = None) -> Vocabulary:
        """The vocabulary of ``captions``: every token seen at least ``min_count`` times, most frequent
        first (ties alphabetical), at most ``max_size`` entries including the 4 special tokens."""
        if isinstance(min_count, bool) or not isinstance(min_count, int) or min_count < 1:
            raise ValueError(f"min_count must be a positive integer, got {min_count!r}")
        if max_size is not None and (isinstance(max_size, bool) or not isinstance(max_size, int)
                                     or max_size < len(SPECIAL_TOKENS)):
            raise ValueError(f"max_size must be None or an integer >= {len(SPECIAL_TOKENS)}, got {max_size!r}")
        counts = collections.Counter(t for c in captions for t in tokenize_caption(c))
        for special in SPECIAL_TOKENS:  # "<unk>" in a caption tokenises to "<", "unk", ">": never special
            counts.pop(special, None)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            words = words[: max_size - len(SPECIAL_TOKENS)]
        return cls(words)

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, token: str) -> bool:
        return token in self.token_to_id

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Vocabulary) and self.tokens == other.tokens

    def __repr__(self) -> str:
        return f"Vocabulary({len(self)} tokens: {self.tokens[4:10]}...)"

    def id_of(self, token: str) -> int:
        """The id of ``token`` (``<unk>``'s id when it is not in the vocabulary)."""
        return self.token_to_id.get(token, self.unk_id)

    def encode(self, caption: str, length: int | None = 32) -> torch.Tensor:
        """``caption`` → int64 ids ``<bos> w_1 ... w_n <eos>`` padded with ``<pad>`` to ``length``.

        Words outside the vocabulary become ``<unk>``. A caption longer than ``length - 2`` tokens
        is truncated to its first ``length - 2`` tokens, so ``<bos>`` and ``<eos>`` are always
        present. ``length=None`` gives the unpadded ``(n + 2,)`` ids.
        """
        words = tokenize_caption(caption)
        if length is not None:
            if isinstance(length, bool) or not isinstance(length, int) or length < 2:
                raise ValueError(f"length must be None or an integer >= 2 (room for <bos> and <eos>), got {length!r}")
            words = words[: length - 2]
        ids = [self.bos_id] + [self.id_of(w) for w in words] + [self.eos_id]
        if length is not None:
            ids += [self.pad_id] * (length - len(ids))
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids, skip_special: bool = True) -> str | list[str]:
        """Ids ``(L,)`` → the caption string; ``(N, L)`` → a list of N strings.

        With ``skip_special`` the text stops at the first ``<eos>`` and ``<pad>`` / ``<bos>`` are
        dropped (``<unk>`` is kept, written ``"<unk>"``); otherwise every token is written.
        """
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.dim() == 0:
            raise ValueError(f"ids must be integer token ids of shape (L,) or (N, L), got {ids.dtype} {tuple(ids.shape)}")
        if ids.dim() > 1:
            return [self.decode(row, skip_special) for row in ids.reshape(-1, ids.shape[-1])]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(self)):
            raise ValueError(f"token ids must lie in [0, {len(self)}), got [{int(ids.min())}, {int(ids.max())}]")
        out = []
        for i in ids.tolist():
            if skip_special:
                if i == self.eos_id:
                    break
                if i in (self.pad_id, self.bos_id):
                    continue
            out.append(self.tokens[i])
        return " ".join(out)

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary to a JSON file ``{"format": ..., "tokens": [all tokens in id order]}``."""
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"format": "pyro_diffmvae.Vocabulary", "version": 1, "tokens": self.tokens}, fh, ensure_ascii=False)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        with open(path, encoding="utf-8") as fh:
            blob = json.load(fh)
        tokens = blob.get("tokens") if isinstance(blob, Mapping) else None
        if not isinstance(tokens, list) or tuple(tokens[: len(SPECIAL_TOKENS)]) != SPECIAL_TOKENS:
            raise ValueError(f"{os.fspath(path)!r} is not a vocabulary file (expected 'tokens' starting with {SPECIAL_TOKENS})")
        return cls(tokens[len(SPECIAL_TOKENS):])


# ------------------------------------------------------------------------------------ files
def _missing(path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(f"CUB data: {what} not found: {os.fspath(path)!r}\n{CUB_LAYOUT}")


def _read_rows(path: Path, what: str, columns: int) -> dict[int, list[str]]:
    """``{id: [the other columns]}`` of a whitespace-separated metadata file (``columns`` after the id)."""
    if not path.is_file():
        raise _missing(path, what)
    rows: dict[int, list[str]] = {}
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=columns)
            if len(parts) != columns + 1:
                raise ValueError(f"{os.fspath(path)!r} line {number}: expected an id and {columns} value(s), got {line.strip()!r}")
            try:
                rows[int(parts[0])] = parts[1:]
            except ValueError as e:
                raise ValueError(f"{os.fspath(path)!r} line {number}: the id must be an integer, got {parts[0]!r}") from e
    return rows


def read_captions(path: str | os.PathLike) -> list[str]:
    """The captions of one image: the stripped non-blank lines of its text file (10 in the official tree).

    Any positive number of lines is accepted; a missing file raises FileNotFoundError and a file
    without any caption raises ValueError, both naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "caption file")
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [line.strip() for line in fh]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError(f"CUB data: the caption file {os.fspath(path)!r} holds no caption (it is empty)")
    return lines


def crop_box(width: int, height: int, bbox: Sequence[float] | None, bbox_scale: float = 1.5) -> tuple[int, int, int, int]:
    """The crop ``(left, top, right, bottom)`` (pixels, right/bottom exclusive) of a ``width x height`` photo.

    With a bounding box ``(x, y, w, h)``: the square of side ``bbox_scale * max(w, h)`` centred on
    ``(x + w/2, y + h/2)``, clipped to the photo. Without one (``None``): the largest centred square.
    """
    if bbox is None:
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return left, top, left + side, top + side
    x, y, w, h = (float(v) for v in bbox)
    half = bbox_scale * max(w, h) / 2
    cx, cy = x + w / 2, y + h / 2
    def nearest(v: float) -> int:  # round half up (Python's round() rounds half to even)
        return math.floor(v + 0.5)

    left, top = max(0, nearest(cx - half)), max(0, nearest(cy - half))
    right, bottom = min(width, nearest(cx + half)), min(height, nearest(cy + half))
    if right <= left or bottom <= top:
        raise ValueError(f"bounding box {tuple(bbox)} lies outside the {width}x{height} photo")
    return left, top, right, bottom


def load_image(path: str | os.PathLike, image_size: int, bbox: Sequence[float] | None = None,
               bbox_scale: float = 1.5) -> torch.Tensor:
    """Read a photo, crop it (:func:`crop_box`), resize it to ``image_size`` and return uint8 ``(3, S, S)``."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        img = img.crop(crop_box(img.width, img.height, bbox, bbox_scale))
        img = img.resize((image_size, image_size), Image.BICUBIC)
        array = np.asarray(img, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def _to_float_image(u8: torch.Tensor) -> torch.Tensor:
    return u8.to(torch.float32) / 127.5 - 1.0


def _positive_int(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------ dataset
class CUBImageCaptionDataset(Dataset):
    """A split of CUB-200-2011 as (image, caption) pairs; see the module docstring for the conventions.

    :param root: the folder holding ``CUB_200_2011/`` and ``text/`` (default: ``$PYRO_DIFFMVAE_DATA/birds``).
    :param split: ``"train"`` or ``"test"`` (the official ``train_test_split.txt``).
    :param image_size: ``S``, the side of the returned images.
    :param caption_length: ``L``, the length of the token id vectors (``<bos>``/``<eos>`` included).
    :param vocab: the vocabulary to encode with (pass the training set's for the test split); by
        default it is built from the training captions of the images present under ``root``.
    :param min_count: when building the vocabulary, a word must occur this often in the training
        captions (rarer words become ``<unk>``).
    :param crop: ``"bbox"`` (bounding box enlarged to a square of side ``bbox_scale * max(w, h)``)
        or ``"center"`` (largest centred square).
    :param bbox_scale: see ``crop``.
    :param cache_dir: when given, all images of the split are preprocessed once and stored there as
        uint8 (one file per split / size / crop / image set), then loaded on later constructions.
    :param preload: keep all preprocessed images in memory (implied by ``cache_dir``); otherwise
        every access decodes its JPEG.
    :param size: use only the first ``size`` images of the split (in image id order).
    :param caption_mode: ``"random"``, ``"fixed"`` (``"first"`` is ``"fixed"`` with
        ``caption_index=0``) or ``"all"``; default ``"random"`` for train and ``"fixed"`` for test.
    :param caption_index: the caption used by ``"fixed"`` (modulo the image's number of captions).
    :param images_root: the ``CUB_200_2011`` folder (default ``root / "CUB_200_2011"``).
    :param text_root: the caption tree (default ``root / "text"``, or ``root / "text_c10"``).
    :param generator: optional ``torch.Generator`` for the ``"random"`` caption draws.

    Attributes: ``image_ids``, ``class_ids`` (official ids, lists of int), ``image_paths``,
    ``text_paths`` (lists of Path), ``captions`` (list of the raw caption lists), ``tokens`` (list
    of int64 ``(n_i, L)``), ``bboxes`` (list of ``(x, y, w, h)`` or None), ``class_names``
    (``{class id: folder name}``), ``vocab``, ``num_listed`` (images of the split in the metadata),
    ``num_skipped`` (of those, absent on disk), ``missing_image_ids`` (every listed id absent on
    disk, all splits), ``images`` (uint8 ``(N, 3, S, S)`` when preloaded, else None),
    ``cache_path``, ``loaded_from_cache``.
    """

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        split: str = "train",
        image_size: int = 64,
        caption_length: int = 32,
        vocab: Vocabulary | None = None,
        min_count: int = 1,
        crop: str = "bbox",
        bbox_scale: float = 1.5,
        cache_dir: str | os.PathLike | None = None,
        preload: bool = False,
        size: int | None = None,
        caption_mode: str | None = None,
        caption_index: int = 0,
        images_root: str | os.PathLike | None = None,
        text_root: str | os.PathLike | None = None,
        generator: torch.Generator | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        if crop not in CROPS:
            raise ValueError(f"unknown crop {crop!r}; known crops: {list(CROPS)}")
        if caption_mode == "first":
            caption_mode, caption_index = "fixed", 0
        caption_mode = caption_mode or ("random" if split == "train" else "fixed")
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"unknown caption_mode {caption_mode!r}; known modes: {list(CAPTION_MODES) + ['first']}")
        if not float(bbox_scale) > 0:
            raise ValueError(f"bbox_scale must be positive, got {bbox_scale!r}")
        if vocab is not None and not isinstance(vocab, Vocabulary):
            raise TypeError(f"vocab must be a Vocabulary, got {type(vocab).__name__}")
        self.split, self.crop, self.bbox_scale = split, crop, float(bbox_scale)
        self.image_size = _positive_int(image_size, "image_size", 8)
        self.caption_length = _positive_int(caption_length, "caption_length", 2)
        self.caption_mode, self.caption_index = caption_mode, _positive_int(caption_index, "caption_index", 0)
        self.generator = generator
        self.images_root, self.text_root = self._resolve_roots(root, images_root, text_root)

        # ---------------------------------------------------------------- metadata
        meta = self.images_root
        paths = {i: row[0].strip() for i, row in _read_rows(meta / "images.txt", "image list", 1).items()}
        labels = _read_rows(meta / "image_class_labels.txt", "class label file", 1)
        is_training = _read_rows(meta / "train_test_split.txt", "train/test split file", 1)
        bboxes = _read_rows(meta / "bounding_boxes.txt", "bounding box file", 4) if crop == "bbox" else {}
        classes_file = meta / "classes.txt"
        self.class_names = ({i: row[0].strip() for i, row in _read_rows(classes_file, "class list", 1).items()}
                            if classes_file.is_file() else {})
        image_dir = meta / "images"
        if not image_dir.is_dir():
            raise _missing(image_dir, "image folder")
        present = {os.path.relpath(os.path.join(d, f), image_dir).replace(os.sep, "/")
                   for d, _, files in os.walk(image_dir) for f in files}
        self.missing_image_ids = sorted(i for i, p in paths.items() if p not in present)

        def split_ids(name: str) -> tuple[list[int], int]:
            listed = []
            for i in sorted(paths):
                if i not in is_training:
                    raise ValueError(f"CUB data: image {i} ({paths[i]}) has no entry in {os.fspath(meta / 'train_test_split.txt')!r}")
                if int(is_training[i][0]) == SPLITS[name]:
                    listed.append(i)
            kept = [i for i in listed if paths[i] in present]
            return kept, len(listed) - len(kept)

        ids, self.num_skipped = split_ids(split)
        self.num_listed = len(ids) + self.num_skipped
        if not ids:
            raise ValueError(
                f"CUB data: none of the {self.num_listed} {split} images listed in {os.fspath(meta / 'images.txt')!r} "
                f"is present under {os.fspath(image_dir)!r}\n{CUB_LAYOUT}"
            )
        if size is not None:
            size = _positive_int(size, "size")
            if size > len(ids):
                raise ValueError(f"size={size} exceeds the {len(ids)} {split} images present")
            ids = ids[:size]
        missing_labels = [i for i in ids if i not in labels]
        if missing_labels:
            raise ValueError(f"CUB data: images {missing_labels[:5]} have no class in {os.fspath(meta / 'image_class_labels.txt')!r}")
        if crop == "bbox":
            missing_boxes = [i for i in ids if i not in bboxes]
            if missing_boxes:
                raise ValueError(f"CUB data: images {missing_boxes[:5]} have no box in {os.fspath(meta / 'bounding_boxes.txt')!r}; "
                                 f"use crop='center'")
        self.image_ids: list[int] = ids
        self._position = {i: k for k, i in enumerate(ids)}
        self.class_ids: list[int] = [int(labels[i][0]) for i in ids]
        self.image_paths: list[Path] = [image_dir / paths[i] for i in ids]
        self.text_paths: list[Path] = [self._text_path(paths[i]) for i in ids]
        self.bboxes: list[tuple[float, ...] | None] = [tuple(float(v) for v in bboxes[i]) if crop == "bbox" else None for i in ids]
        self.captions: list[list[str]] = [read_captions(p) for p in self.text_paths]

        # ---------------------------------------------------------------- vocabulary and tokens
        if vocab is None:
            if split == "train" and size is None:
                train_captions = self.captions
            else:
                train_ids, _ = split_ids("train")
                if not train_ids:
                    raise ValueError("CUB data: no training image is present to build the vocabulary from; pass vocab=")
                train_captions = [read_captions(self._text_path(paths[i])) for i in train_ids]
            vocab = Vocabulary.build((c for lines in train_captions for c in lines), min_count=min_count)
        self.vocab = vocab
        self.tokens: list[torch.Tensor] = [
            torch.stack([vocab.encode(c, self.caption_length) for c in lines]) for lines in self.captions
        ]
        self._offsets = np.cumsum([0] + [len(lines) for lines in self.captions]).tolist()

        # ---------------------------------------------------------------- images
        self.key = {"split": split, "image_size": self.image_size, "crop": crop, "bbox_scale": self.bbox_scale,
                    "ids_sha1": hashlib.sha1(",".join(map(str, ids)).encode()).hexdigest()[:16], "version": DATA_VERSION}
        self.cache_path, self.loaded_from_cache, self.images = None, False, None
        if cache_dir is not None:
            scale = f"{self.bbox_scale:g}" if crop == "bbox" else ""
            self.cache_path = os.path.join(
                os.fspath(cache_dir),
                f"cub_{split}_n{len(ids)}_s{self.image_size}_{crop}{scale}_{self.key['ids_sha1']}_v{DATA_VERSION}.pt",
            )
            if os.path.exists(self.cache_path):
                self.images = self._load_cache(self.cache_path)
                self.loaded_from_cache = True
        if self.images is None and (preload or cache_dir is not None):
            self.images = torch.stack([self._load(k) for k in range(len(ids))])
            if self.cache_path is not None:
                self._save_cache(self.cache_path, self.images)

    # ------------------------------------------------------------------ paths
    @staticmethod
    def _resolve_roots(root, images_root, text_root) -> tuple[Path, Path]:
        if root is None and (images_root is None or text_root is None):
            env = os.environ.get("PYRO_DIFFMVAE_DATA")
            if env is None:
                raise ValueError("give root (the folder holding CUB_200_2011/ and text/), or images_root and text_root, "
                                 "or set PYRO_DIFFMVAE_DATA to the data folder holding birds/\n" + CUB_LAYOUT)
            root = Path(env) / "birds"
        if root is not None:
            root = Path(root)
            if images_root is None and text_root is None and not root.is_dir():
                raise _missing(root, "data root")
        images_root = Path(images_root) if images_root is not None else root / "CUB_200_2011"
        if text_root is None:
            text_root = root / "text"
            if not text_root.is_dir() and (root / "text_c10").is_dir():
                text_root = root / "text_c10"
        text_root = Path(text_root)
        if not images_root.is_dir():
            raise _missing(images_root, "CUB_200_2011 folder")
        if not text_root.is_dir():
            raise _missing(text_root, "caption folder (text_c10 tree)")
        return images_root, text_root

    def _text_path(self, image_path: str) -> Path:
        return self.text_root / (os.path.splitext(image_path)[0] + ".txt")

    # ------------------------------------------------------------------ images and cache
    def _load(self, k: int) -> torch.Tensor:
        return load_image(self.image_paths[k], self.image_size, self.bboxes[k], self.bbox_scale)

    def _load_cache(self, path: str) -> torch.Tensor:
        hint = "delete it to rebuild the cache"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RuntimeError(f"the CUB cache file {path!r} is corrupt or unreadable ({type(e).__name__}: {e}); {hint}") from e
        expected = (len(self.image_ids), 3, self.image_size, self.image_size)
        if (not isinstance(blob, Mapping) or dict(blob.get("key", {})) != self.key
                or not isinstance(blob.get("image"), torch.Tensor) or tuple(blob["image"].shape) != expected
                or blob["image"].dtype != torch.uint8 or blob.get("image_ids") != self.image_ids):
            raise RuntimeError(f"the CUB cache file {path!r} does not hold this split's images {expected}; {hint}")
        return blob["image"]

    def _save_cache(self, path: str, images: torch.Tensor) -> None:
        atomic_torch_save({"key": dict(self.key), "image_ids": list(self.image_ids), "image": images}, path)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self._offsets[-1] if self.caption_mode == "all" else len(self.image_ids)

    def _locate(self, index: int) -> tuple[int, int]:
        """Example index → (image position k, caption index j)."""
        if self.caption_mode == "all":
            k = bisect.bisect_right(self._offsets, index) - 1
            return k, index - self._offsets[k]
        n = len(self.captions[index])
        if self.caption_mode == "fixed":
            return index, self.caption_index % n
        return index, int(torch.randint(n, (), generator=self.generator))

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for a CUB data set of {n} examples")
        i %= n
        k, j = self._locate(i)
        image = self.images[k] if self.images is not None else self._load(k)
        return {
            "image": _to_float_image(image),
            "text": self.tokens[k][j].clone(),
            "meta": {"index": i, "image_id": self.image_ids[k], "class_id": self.class_ids[k], "caption_index": j},
        }

    def decode(self, tokens) -> str | list[str]:
        """Token ids ``(L,)`` / ``(N, L)`` → caption string(s), with this data set's vocabulary."""
        return self.vocab.decode(tokens)

    def caption_text(self, image_id: int, caption_index: int) -> str:
        """The caption file's line ``caption_index`` of image ``image_id`` as read (stripped, case kept):
        the exact text that an example's ``meta`` (``image_id``, ``caption_index``) was tokenised from."""
        k = self._position.get(int(image_id))
        if k is None:
            raise KeyError(f"image {image_id} is not in this {self.split} split")
        lines = self.captions[k]
        if not 0 <= int(caption_index) < len(lines):
            raise IndexError(f"image {image_id} has {len(lines)} captions, not a caption {caption_index}")
        return lines[int(caption_index)]

    def __repr__(self) -> str:
        return (
            f"CUBImageCaptionDataset(split={self.split!r}, images={len(self.image_ids)}, skipped={self.num_skipped}, "
            f"image_size={self.image_size}, caption_length={self.caption_length}, crop={self.crop!r}, "
            f"caption_mode={self.caption_mode!r}, vocab={len(self.vocab)})"
        )


# ------------------------------------------------------------------------ Optimus adapter
class OptimusCaptions(Dataset):
    """A CUB split whose ``"text"`` is the caption re-tokenised for an Optimus text VAE (BERT + GPT-2).

    The word-level ids of :class:`Vocabulary` mean nothing to BERT or GPT-2, so each example's
    caption — the exact line its ``meta`` names (:meth:`CUBImageCaptionDataset.caption_text`), case
    and punctuation kept — is tokenised again by ``codec.encode`` (a
    :class:`~pyro_diffmvae.caption_codec.OptimusCaptionCodec`: BERT word pieces for the encoder,
    ``<bos> GPT-2 tokens <eos>`` for the decoder, packed into one int64 vector ``(4 L,)``).
    ``"image"`` and ``"meta"`` are the base data set's; every other attribute (``image_ids``,
    ``class_ids``, ``captions``, ``vocab``, ``caption_text`` ...) is read from ``base``.

    :param base: the CUB split.
    :param codec: has ``encode(list of str) -> (N, 4 L)`` and ``decode((N, 4 L)) -> list of str``.
    """

    def __init__(self, base: CUBImageCaptionDataset, codec):
        self.base, self.codec = base, codec

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        item = self.base[index]
        meta = item["meta"]
        item["text"] = self.codec.encode([self.base.caption_text(meta["image_id"], meta["caption_index"])])[0]
        return item

    def decode(self, tokens) -> list[str]:
        """Packed ``(N, 4 L)`` captions → strings (from their GPT-2 tokens)."""
        return self.codec.decode(tokens)

    def __getattr__(self, name: str):
        if name in ("base", "codec") or name.startswith("__"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"OptimusCaptions({self.base!r}, caption length {self.codec.length})"


# ------------------------------------------------------------------------------------- the spec
@functools.lru_cache(maxsize=None)
def cub_vocabulary(root: str | None) -> Vocabulary:
    """The :class:`Vocabulary` of the CUB training captions under ``root`` (deterministic from the data),
    read once per process: memoised by ``root`` as given (a process that rewrites the captions under
    the same root must call ``cub_vocabulary.cache_clear()``)."""
    return CUBImageCaptionDataset(root, "train", image_size=8, size=1).vocab


def build_datasets(cfg):
    """``(train, test, test)`` of ``cfg.dataset``: CUB has no official validation split, so validation
    monitors the test split. With ``model.text_nets=optimus`` both are wrapped in :class:`OptimusCaptions`."""
    from ..networks import optimus_codec, text_nets

    d = cfg.dataset
    common = dict(image_size=d.image_size, caption_length=d.caption_length, vocab=cub_vocabulary(d.root),
                  cache_dir=d.cache_dir)
    train = CUBImageCaptionDataset(d.root, "train", **common)
    test = CUBImageCaptionDataset(d.root, "test", **common)
    if text_nets(cfg) == "optimus":
        codec = optimus_codec(cfg)
        train, test = OptimusCaptions(train, codec), OptimusCaptions(test, codec)
    return train, test, test


def modality_specs(cfg) -> dict[str, ModalitySpec]:
    """The image (read back by a bird-class classifier) and the caption: word-level ids of the training
    vocabulary for padding-aware sequence networks, or (``model.text_nets=optimus``) the packed BERT +
    GPT-2 ids of :class:`~pyro_diffmvae.caption_codec.OptimusCaptionCodec`."""
    from ..networks import text_nets

    d = cfg.dataset
    specs = {"image": ModalitySpec((3, d.image_size, d.image_size), "normal", read=BY_CLASSIFIER)}
    if text_nets(cfg) == "optimus":
        specs["text"] = ModalitySpec((4 * d.caption_length,), "optimus")
    else:
        specs["text"] = ModalitySpec((d.caption_length,), "categorical", num_classes=len(cub_vocabulary(d.root)),
                                     network="token_sequence")
    return specs


def _labels(cfg, train_set) -> LabelSpec:
    """The bird class, as its index among the classes of the training split (-1: a class not in it)."""
    class_ids = getattr(train_set, "class_ids", None)  # the CUB data set knows them without decoding images
    if class_ids is None:
        class_ids = [train_set[i]["meta"]["class_id"] for i in range(len(train_set))]
    classes = sorted({int(c) for c in class_ids})
    index = {c: j for j, c in enumerate(classes)}

    def labels_of(batch: Mapping) -> torch.Tensor:
        return torch.tensor([index.get(int(c), -1) for c in batch["meta"]["class_id"]]).reshape(-1, 1)

    return LabelSpec((len(classes),), labels_of)


def _raw_captions(test_set, truth: Mapping) -> list[str]:
    """The exact caption line each test example was tokenised from (not the lossy decoding of its ids)."""
    meta = truth["meta"]
    return [test_set.caption_text(int(i), int(j)) for i, j in zip(meta["image_id"], meta["caption_index"])]


#: the data set as the builders and the evaluation see it (:mod:`pyro_diffmvae.data.spec`): labelled by
#: the bird class; CLIP score of images generated from the caption
SPEC = DatasetSpec(name="cub", title="CUB", build=build_datasets, modalities=modality_specs,
                   evaluation=EvaluationSpec("labels", labels=_labels,
                                             clip=ClipSpec(image="image", caption="text", captions=_raw_captions)),
                   text_nets=("tokens", "optimus"))
