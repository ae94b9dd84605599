r"""PolyMNIST: five "views" of an MNIST digit label on different photographic backgrounds.

PolyMNIST (Sutter, Daunhawer & Vogt, *Generalized Multimodal ELBO*, ICLR 2021) is the standard
benchmark of scalable multimodal VAEs. An example is a tuple of ``M`` (usually 5) RGB images of
28x28 pixels, one per modality ``m0 .. m{M-1}``. All images of an example show the *same digit
label*, but each modality shows its *own* handwritten instance of it, written onto a random patch
of that modality's background photo. The label is the only information the modalities share; the
handwriting style and the background patch are modality-specific.

**Layout on disk** (the layout of the published archive, read by :class:`PolyMNISTDataset` and
written by :func:`build_polymnist`)::

    <root>/{train,test}/m<k>/<index>.<label>.png

e.g. ``<root>/train/m3/17.4.png``: example 17 of the training split, modality ``m3``, digit 4.
Every png is a 28x28 RGB image. The same ``<index>`` in every modality folder of a split is the
same example, so its ``<label>`` must agree across the folders (this is checked on loading).

**Recipe** (the PolyMNIST generator, as implemented in :func:`compose_polymnist_images`), for
modality ``k`` with background photo ``B_k`` and one MNIST digit ``d`` (uint8, 28x28):

1. take a uniformly random 28x28 crop ``c`` of ``B_k`` (RGB, at the photo's full resolution);
2. binarise the digit: a pixel is *bright* where ``d / 255 > 0.5`` (i.e. ``d >= 128``);
3. the image is ``255 - c`` (the crop's colours inverted) at the bright pixels and ``c`` elsewhere.

Example ``i`` of a split uses MNIST digit ``i`` of that split for ``m0``; each modality ``k > 0``
uses another random MNIST digit *of the same split with the same label*. The instances of a
modality are a random permutation within each label class, so with all 60,000 / 10,000 digits every
MNIST digit is used exactly once per modality, as in the original generator. All random choices
come from ``numpy.random.default_rng([seed, split_id, k])`` (train 0, test 1), so a build is
deterministic from its seed. :func:`build_polymnist` records the MNIST digit and crop position of
every image in ``mnist_indices.npz`` and its settings in ``meta.json``. :func:`ensure_polymnist`
builds a folder only if no complete build is there, and is safe to call from many processes at once
(DDP ranks): one builds, under a file lock, and the others wait and read its result.

**Backgrounds.** The original 5-modality set used, for ``m0 .. m4``, the photos numbered 00-04
(flowers, The Scream, Lena, milky way, poppies); the extended 10-modality set uses 00-09. The
Scream (01) is not available here, so :data:`DEFAULT_BACKGROUNDS` keeps the original photo of
``m0, m2, m3, m4`` and substitutes the next unused photo of the family, the tree (05), for ``m1``.
Models trained on a build with these defaults are therefore *not* exactly comparable with
published numbers for ``m1``.

**Values.** :class:`PolyMNISTDataset` keeps the images as ``uint8`` and returns each as float32
``(3, 28, 28)`` in ``[-1, 1]``: ``u / 127.5 - 1`` for the 8-bit value ``u`` (0 -> -1, 255 -> 1).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io import atomic_torch_save, exclusive_lock
from ..metrics.published_classifiers import MOPOE_CLASSIFIER_FILE, load_mopoe_digit_classifier
from .spec import BY_CLASSIFIER, DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec, PublishedClassifiers

__all__ = [
    "SPEC",
    "PUBLISHED_CLASSIFIERS",
    "build_datasets",
    "modality_specs",
    "DEFAULT_BACKGROUNDS",
    "IMAGE_SHAPE",
    "LAYOUT",
    "POLYMNIST_MODALITIES",
    "SPLITS",
    "PolyMNISTDataset",
    "build_polymnist",
    "compose_polymnist_images",
    "ensure_polymnist",
    "load_background",
    "load_mnist",
    "read_idx",
]

POLYMNIST_MODALITIES: tuple[str, ...] = ("m0", "m1", "m2", "m3", "m4")
IMAGE_SIZE = 28
IMAGE_SHAPE: tuple[int, int, int] = (3, IMAGE_SIZE, IMAGE_SIZE)
SPLITS: tuple[str, ...] = ("train", "test")
LAYOUT = "<root>/{train,test}/m<k>/<index>.<label>.png"

DEFAULT_BACKGROUNDS: tuple[str, ...] = (
    "00flowers-19830_1280.jpg",  # m0: as in the original PolyMNIST
    "05tree-736885_1280.jpg",  # m1: substitute for the unavailable 01 (The Scream)
    "02lena3.jpg",  # m2: as in the original
    "03milky-way-2695569_1280.jpg",  # m3: as in the original
    "04poppies-174276_1280.jpg",  # m4: as in the original
)
"""Background photos of ``m0 .. m4`` (file names in the PolyMNIST background folder): the original
photos 00, 02, 03, 04 for ``m0, m2, m3, m4`` and the tree (05) for ``m1`` instead of The Scream
(01), which is not available."""

DIGIT_THRESHOLD = 0.5  # a digit pixel is bright where value / 255 > DIGIT_THRESHOLD
BUILD_VERSION = 1  # bump when the recipe changes; written to meta.json
CACHE_VERSION = 1  # bump when the cache format changes: it is part of the cache key
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
INDICES_FILE = "mnist_indices.npz"
META_FILE = "meta.json"
_FILE_NAME = re.compile(r"(\d+)\.(\d+)\.png")
_MODALITY_NAME = re.compile(r"m(\d+)")
_CHUNK = 4096  # digits composed at once by build_polymnist


def _layout_hint() -> str:
    return (
        f"a PolyMNIST root must hold the layout {LAYOUT} (28x28 RGB pngs; the same <index> in every "
        f"modality folder is the same example, with the same <label>)"
    )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# ------------------------------------------------------------------------------------ MNIST
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the format of the MNIST distribution; gzipped when the name ends in
    ``.gz``): a 4-byte magic ``0, 0, dtype code, ndim``, ``ndim`` big-endian int32 sizes, the data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is not an idx file (truncated header)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(shape)) if shape else 1
    if len(raw) != header + count * dtype.itemsize:
        raise ValueError(
            f"{path}: the header announces shape {shape} ({count * dtype.itemsize} bytes of data) "
            f"but the file holds {len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_mnist_file(mnist_root: Path, name: str) -> Path:
    candidates = [mnist_root / "MNIST" / "raw" / name, mnist_root / name]
    candidates += [p.with_name(p.name + ".gz") for p in candidates]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"MNIST file {name!r} not found under {mnist_root}: looked for "
        f"{', '.join(str(p) for p in candidates)} (torchvision's layout <mnist_root>/MNIST/raw/<file>, "
        f"or the idx files directly in <mnist_root>)"
    )


def load_mnist(mnist_root: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """The MNIST digits of a split from the official idx files.

    :param mnist_root: torchvision's MNIST root (the files are in ``<mnist_root>/MNIST/raw/``), or a
        folder holding the idx files themselves (plain or ``.gz``).
    :param split: ``"train"`` (60,000 digits) or ``"test"`` (10,000).
    :returns: ``(images, labels, files)``: uint8 ``(N, 28, 28)``, int64 ``(N,)``, and the paths read.
    """
    if split not in MNIST_FILES:
        raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
    root = Path(mnist_root)
    image_path, label_path = (_find_mnist_file(root, name) for name in MNIST_FILES[split])
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{image_path}: expected uint8 images (N, 28, 28), got {images.dtype} {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{label_path}: expected {images.shape[0]} labels, got shape {labels.shape}")
    return images, labels.astype(np.int64), {"images": str(image_path), "labels": str(label_path)}


# -------------------------------------------------------------------------------- composition
def load_background(path: str | os.PathLike) -> np.ndarray:
    """A background photo as uint8 ``(H, W, 3)`` RGB; at least 28x28."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"background photo {path} not found")
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if array.shape[0] < IMAGE_SIZE or array.shape[1] < IMAGE_SIZE:
        raise ValueError(f"background photo {path} is {array.shape[1]}x{array.shape[0]}, smaller than 28x28")
    return array


def compose_polymnist_images(
    digits: np.ndarray, background: np.ndarray, tops: np.ndarray, lefts: np.ndarray
) -> np.ndarray:
    """The PolyMNIST images of ``digits`` on crops of ``background`` (vectorised).

    :param digits: uint8 MNIST digits ``(N, 28, 28)``.
    :param background: uint8 RGB photo ``(H, W, 3)``.
    :param tops: int ``(N,)``, the crops' top rows, in ``[0, H - 28]``.
    :param lefts: int ``(N,)``, the crops' left columns, in ``[0, W - 28]``.
    :returns: uint8 ``(N, 28, 28, 3)``: ``255 - crop`` where ``digit / 255 > 0.5``, ``crop`` elsewhere.
    """
    digits = np.asarray(digits)
    tops, lefts = np.asarray(tops, dtype=np.int64), np.asarray(lefts, dtype=np.int64)
    n = digits.shape[0]
    if digits.dtype != np.uint8 or digits.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"digits must be uint8 (N, 28, 28), got {digits.dtype} {digits.shape}")
    if background.dtype != np.uint8 or background.ndim != 3 or background.shape[2] != 3:
        raise ValueError(f"background must be uint8 (H, W, 3), got {background.dtype} {background.shape}")
    if tops.shape != (n,) or lefts.shape != (n,):
        raise ValueError(f"tops and lefts must have shape ({n},), got {tops.shape} and {lefts.shape}")
    height, width = background.shape[:2]
    if n and (tops.min() < 0 or tops.max() > height - IMAGE_SIZE or lefts.min() < 0 or lefts.max() > width - IMAGE_SIZE):
        raise ValueError(f"crop positions out of range for a {width}x{height} background")
    offsets = np.arange(IMAGE_SIZE)
    rows = (tops[:, None] + offsets)[:, :, None]  # (N, 28, 1)
    cols = (lefts[:, None] + offsets)[:, None, :]  # (N, 1, 28)
    crops = background[rows, cols]  # (N, 28, 28, 3)
    bright = digits.astype(np.float32) / 255.0 > DIGIT_THRESHOLD
    return np.where(bright[..., None], 255 - crops, crops).astype(np.uint8)


def _same_label_instances(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """For the first ``count`` examples, a random other digit of the split with the same label: within
    each label class (in sorted order) a random permutation of the class's digits."""
    chosen = np.empty(count, dtype=np.int64)
    wanted = labels[:count]
    for label in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == label))
        slots = np.flatnonzero(wanted == label)
        chosen[slots] = pool[: slots.size]
    return chosen


def _check_count(value, name: str, available: int) -> int:
    if value is None:
        return available
    if not _is_int(value) or not 1 <= value <= available:
        raise ValueError(f"{name} must be an integer in [1, {available}] (the MNIST digits available), got {value!r}")
    return int(value)


def _check_backgrounds(backgrounds) -> tuple[str, ...]:
    if isinstance(backgrounds, (str, os.PathLike)):
        raise TypeError(f"backgrounds must be a sequence of file names, one per modality, got the single name {backgrounds!r}")
    backgrounds = tuple(str(name) for name in backgrounds)
    if not backgrounds:
        raise ValueError("backgrounds must name at least one background photo (one per modality)")
    return backgrounds


def _existing_layout(out_root: Path) -> list[Path]:
    return [p for p in (out_root / "train", out_root / "test", out_root / META_FILE, out_root / INDICES_FILE) if p.exists()]


def build_polymnist(
    mnist_root: str | os.PathLike,
    backgrounds_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    backgrounds: Sequence[str] = DEFAULT_BACKGROUNDS,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
) -> dict:
    """Build a PolyMNIST data set from MNIST and background photos (see the module docstring).

    Writes ``<out_root>/{train,test}/m<k>/<index>.<label>.png`` for ``k < len(backgrounds)``,
    ``<out_root>/mnist_indices.npz`` (per split: ``<split>_mnist_index`` int64 ``(M, N)``, the MNIST
    digit of every image, and ``<split>_crop_top_left`` int64 ``(M, N, 2)``, its crop position) and
    ``<out_root>/meta.json``. Everything is written into a temporary folder beside ``out_root`` and
    moved into place at the end (``meta.json`` last), so an interrupted build leaves no partial layout.

    :param mnist_root: torchvision's MNIST root (idx files in ``<mnist_root>/MNIST/raw/``) or a folder
        holding the idx files.
    :param backgrounds_dir: the folder of the background photos.
    :param out_root: where to write; it may exist, but must not already hold a PolyMNIST layout
        (``train/``, ``test/``, ``meta.json`` or ``mnist_indices.npz``): FileExistsError.
    :param backgrounds: one photo per modality, file names in ``backgrounds_dir``
        (default :data:`DEFAULT_BACKGROUNDS`, 5 modalities).
    :param seed: non-negative integer; the build is deterministic from it.
    :param num_train: examples of the training split: the first ``num_train`` MNIST training digits
        for ``m0`` (default all 60,000; writing all 300,000 pngs takes minutes).
    :param num_test: examples of the test split (default all 10,000).
    :returns: the content of ``meta.json``.
    """
    if not _is_int(seed) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    backgrounds = _check_backgrounds(backgrounds)
    out_root = Path(out_root)
    if out_root.exists() and not out_root.is_dir():
        raise FileExistsError(f"out_root {out_root} exists and is not a folder")
    existing = _existing_layout(out_root)
    if existing:
        raise FileExistsError(
            f"out_root {out_root} already holds a PolyMNIST layout ({', '.join(str(p) for p in existing)}); "
            f"refusing to overwrite it — delete it or choose another out_root"
        )
    backgrounds_dir = Path(backgrounds_dir)
    if not backgrounds_dir.is_dir():
        raise FileNotFoundError(f"background folder {backgrounds_dir} not found")
    photos = [load_background(backgrounds_dir / name) for name in backgrounds]
    modalities = [f"m{k}" for k in range(len(backgrounds))]
    mnist = {split: load_mnist(mnist_root, split) for split in SPLITS}
    counts = {
        "train": _check_count(num_train, "num_train", len(mnist["train"][1])),
        "test": _check_count(num_test, "num_test", len(mnist["test"][1])),
    }

    out_root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_root.name}.building-", dir=out_root.parent))
    try:
        records: dict[str, np.ndarray] = {}
        for split_id, split in enumerate(SPLITS):
            images, labels, _ = mnist[split]
            count = counts[split]
            mnist_index = np.empty((len(modalities), count), dtype=np.int64)
            crop_top_left = np.empty((len(modalities), count, 2), dtype=np.int64)
            for k, (name, photo) in enumerate(zip(modalities, photos)):
                rng = np.random.default_rng([int(seed), split_id, k])
                mnist_index[k] = np.arange(count) if k == 0 else _same_label_instances(labels, count, rng)
                crop_top_left[k, :, 0] = rng.integers(0, photo.shape[0] - IMAGE_SIZE + 1, size=count)
                crop_top_left[k, :, 1] = rng.integers(0, photo.shape[1] - IMAGE_SIZE + 1, size=count)
                folder = staging / split / name
                folder.mkdir(parents=True)
                for lo in range(0, count, _CHUNK):
                    hi = min(lo + _CHUNK, count)
                    composed = compose_polymnist_images(
                        images[mnist_index[k, lo:hi]], photo, crop_top_left[k, lo:hi, 0], crop_top_left[k, lo:hi, 1]
                    )
                    for i, image in zip(range(lo, hi), composed):
                        Image.fromarray(image).save(folder / f"{i}.{int(labels[i])}.png")
            records[f"{split}_mnist_index"] = mnist_index
            records[f"{split}_crop_top_left"] = crop_top_left
        np.savez(staging / INDICES_FILE, **records)
        meta = {
            "dataset": "PolyMNIST",
            "layout": LAYOUT,
            "recipe": (
                "per modality k and example: a uniformly random 28x28 crop of background k; its colours "
                "inverted (255 - value) where the MNIST digit is bright (value / 255 > 0.5); m0 of example i "
                "is MNIST digit i of the split, m<k> (k > 0) a random digit of the split with the same label"
            ),
            "generator": f"{__name__}.build_polymnist",
            "version": BUILD_VERSION,
            "modalities": modalities,
            "backgrounds": dict(zip(modalities, backgrounds)),
            "background_sizes": {m: [int(p.shape[1]), int(p.shape[0])] for m, p in zip(modalities, photos)},
            "backgrounds_dir": str(backgrounds_dir.resolve()),
            "seed": int(seed),
            "mnist_source": {
                "root": str(Path(mnist_root).resolve()),
                "files": {split: mnist[split][2] for split in SPLITS},
                "available": {split: len(mnist[split][1]) for split in SPLITS},
            },
            "counts": counts,
            "digit_threshold": DIGIT_THRESHOLD,
            "mnist_indices_file": INDICES_FILE,
        }
        with open(staging / META_FILE, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.write("\n")
        if not out_root.exists():
            os.replace(staging, out_root)
        else:  # an existing folder without a layout: move the parts in, meta.json last
            for part in ("train", "test", INDICES_FILE, META_FILE):
                os.replace(staging / part, out_root / part)
            staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return meta


def ensure_polymnist(
    mnist_root: str | os.PathLike,
    backgrounds_dir: str | os.PathLike,
    out_root: str | os.PathLike,
    backgrounds: Sequence[str] = DEFAULT_BACKGROUNDS,
    seed: int = 0,
    num_train: int | None = None,
    num_test: int | None = None,
    timeout: float | None = None,
) -> tuple[dict, bool]:
    """:func:`build_polymnist` into ``out_root`` unless a complete build with these settings is there
    already; safe to call from several processes at once (every DDP rank, parallel jobs).

    Under an exclusive lock on ``<out_root>.lock`` (:func:`~pyro_diffmvae.io.exclusive_lock`): when
    ``<out_root>/meta.json`` exists the build is complete — :func:`build_polymnist` stages everything
    in a temporary folder and puts ``meta.json`` in place last — and its settings (seed, backgrounds,
    counts, recipe version) are checked against the arguments; otherwise the staging folders of
    crashed builds (``.<name>.building-*`` beside ``out_root``; no build is running, since this one
    holds the lock) are removed and :func:`build_polymnist` builds. One process builds; the others
    wait for the lock and then read its ``meta.json``. A build that crashed leaves no ``meta.json``
    (and the OS frees its lock), so the next call builds again.

    The arguments are those of :func:`build_polymnist`; ``timeout``: seconds to wait for the lock
    (``None``: as long as the build takes).

    :returns: ``(meta, built)``: the content of ``meta.json`` and whether this call built it.
    :raises FileExistsError: ``out_root`` holds part of a layout (``train/``, ``test/``, ...) without
        ``meta.json``: a move into an existing folder that was interrupted, or a layout not written by
        :func:`build_polymnist` (the published archive is read directly, not built).
    :raises ValueError: the complete build there has other settings than the arguments.
    :raises TimeoutError: the lock stayed held for ``timeout`` seconds.
    """
    out_root = Path(out_root)
    with exclusive_lock(f"{out_root}.lock", timeout=timeout):
        meta_path = out_root / META_FILE
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            _check_build_settings(meta, meta_path, _check_backgrounds(backgrounds), seed, num_train, num_test)
            return meta, False
        partial = _existing_layout(out_root)
        if partial:
            raise FileExistsError(
                f"{out_root} holds part of a PolyMNIST layout ({', '.join(str(p) for p in partial)}) but no {META_FILE}, "
                f"which build_polymnist writes last: an interrupted build, or a layout not written by build_polymnist; "
                f"delete it to rebuild, or choose another out_root"
            )
        for stale in out_root.parent.glob(f".{out_root.name}.building-*"):
            shutil.rmtree(stale, ignore_errors=True)
        meta = build_polymnist(mnist_root, backgrounds_dir, out_root, backgrounds=backgrounds, seed=seed,
                               num_train=num_train, num_test=num_test)
        return meta, True


def _check_build_settings(meta: Mapping, meta_path: Path, backgrounds: tuple[str, ...], seed, num_train, num_test) -> None:
    """ValueError listing each setting where the build recorded in ``meta_path`` differs from the arguments
    (a count of ``None`` means every MNIST digit of the split)."""
    available = meta.get("mnist_source", {}).get("available", {})
    wanted = {
        "version": BUILD_VERSION,
        "seed": seed,
        "backgrounds": {f"m{k}": name for k, name in enumerate(backgrounds)},
        "counts": {
            "train": available.get("train") if num_train is None else num_train,
            "test": available.get("test") if num_test is None else num_test,
        },
    }
    differ = [f"{key}: {meta.get(key)!r} there, {value!r} asked" for key, value in wanted.items() if meta.get(key) != value]
    if differ:
        raise ValueError(
            f"the PolyMNIST build at {meta_path.parent} has other settings than asked ({'; '.join(differ)}); "
            f"delete it to rebuild, or choose another out_root"
        )


# ------------------------------------------------------------------------------------- dataset
def _check_modalities(modalities) -> tuple[str, ...]:
    if _is_int(modalities):
        if modalities < 1:
            raise ValueError(f"the number of modalities must be >= 1, got {modalities}")
        return tuple(f"m{k}" for k in range(int(modalities)))
    if isinstance(modalities, str):
        modalities = (modalities,)
    try:
        modalities = tuple(modalities)
    except TypeError:
        raise ValueError(f"modalities must be a count or a sequence of names like 'm0', got {modalities!r}") from None
    bad = [m for m in modalities if not isinstance(m, str) or not _MODALITY_NAME.fullmatch(m)]
    if bad:
        raise ValueError(f"bad modality names {bad}: PolyMNIST modalities are named 'm<k>' (e.g. {list(POLYMNIST_MODALITIES)})")
    if not modalities or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be a non-empty list of distinct names, got {list(modalities)}")
    return modalities


def _list_modality_folder(folder: Path) -> dict[int, tuple[int, str]]:
    """``{index: (label, file name)}`` of the ``<index>.<label>.png`` files of one modality folder
    (other files than pngs are ignored)."""
    entries: dict[int, tuple[int, str]] = {}
    for name in os.listdir(folder):
        if not name.endswith(".png"):
            continue
        match = _FILE_NAME.fullmatch(name)
        if match is None:
            raise ValueError(f"{folder / name}: a png not named <index>.<label>.png; {_layout_hint()}")
        index, label = int(match.group(1)), int(match.group(2))
        if index in entries:
            raise ValueError(f"{folder}: index {index} appears twice ({entries[index][1]} and {name})")
        entries[index] = (label, name)
    if not entries:
        raise FileNotFoundError(f"no <index>.<label>.png files in {folder}; {_layout_hint()}")
    return entries


class PolyMNISTDataset(Dataset):
    """A split of a PolyMNIST folder (:data:`LAYOUT`) as a map-style ``torch`` data set.

    ``dataset[i]`` is ``{"m0": float32 (3, 28, 28) in [-1, 1], ..., "meta": {"label": int64 scalar,
    "index": i}}``, so ``torch.utils.data.default_collate`` batches it into
    ``{"m0": (B, 3, 28, 28), ..., "meta": {"label": (B,), "index": (B,)}}``. Example ``i`` is the
    ``i``-th smallest file ``<index>`` of the split.

    All images are read once, at construction, into uint8 tensors. The folders are checked: every
    modality folder must hold the same set of indices, with the same label for each index in every
    folder (ValueError otherwise); missing folders or files raise FileNotFoundError.

    :param root: the PolyMNIST root (holding ``train/`` and ``test/``).
    :param split: ``"train"`` or ``"test"``.
    :param modalities: the modality names (``"m<k>"``) or their count ``M`` (``m0 .. m{M-1}``);
        default :data:`POLYMNIST_MODALITIES`.
    :param size: use only the first ``size`` examples (default: all).
    :param cache_dir: when given, the loaded uint8 images are saved there (atomically), one file per
        ``(root, split, modalities, size, file names)`` key, and loaded on the next construction with
        the same key. The key covers the file names (hence indices and labels) but not the pixels:
        delete the cache after rewriting pngs in place.

    Attributes: ``images`` (``{name: uint8 (N, 3, 28, 28)}``), ``labels`` (int64 ``(N,)``),
    ``file_indices`` (int64 ``(N,)``, the ``<index>`` of each example), ``cache_path`` and
    ``loaded_from_cache``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        modalities: Sequence[str] | int = POLYMNIST_MODALITIES,
        size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
    ):
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        self.modalities = _check_modalities(modalities)
        if size is not None and (not _is_int(size) or size <= 0):
            raise ValueError(f"size must be a positive integer or None (all examples), got {size!r}")
        self.root, self.split = Path(root), split
        split_dir = self.root / split
        for path, what in ((self.root, "PolyMNIST root"), (split_dir, f"{split!r} split folder")):
            if not path.is_dir():
                raise FileNotFoundError(f"{what} {path} not found; {_layout_hint()}")
        listings = {}
        for name in self.modalities:
            folder = split_dir / name
            if not folder.is_dir():
                raise FileNotFoundError(f"modality folder {folder} not found; {_layout_hint()}")
            listings[name] = _list_modality_folder(folder)
        indices = self._check_agreement(split_dir, listings)
        if size is not None and size > len(indices):
            raise ValueError(f"size={size} but {split_dir} holds only {len(indices)} examples")
        indices = indices[: size if size is not None else len(indices)]
        self.size = len(indices)
        first = listings[self.modalities[0]]
        self.file_indices = torch.tensor(indices, dtype=torch.long)
        self.labels = torch.tensor([first[i][0] for i in indices], dtype=torch.long)
        file_names = {name: [listings[name][i][1] for i in indices] for name in self.modalities}

        listing_digest = hashlib.sha1(json.dumps(file_names, sort_keys=True).encode()).hexdigest()
        self.key = {
            "root": str(self.root.resolve()),
            "split": split,
            "modalities": list(self.modalities),
            "size": self.size,
            "files": listing_digest,
            "version": CACHE_VERSION,
        }
        self.cache_path: str | None = None
        self.loaded_from_cache = False
        images = None
        if cache_dir is not None:
            key_digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:16]
            self.cache_path = os.path.join(
                os.fspath(cache_dir), f"polymnist_{split}_n{self.size}_{'-'.join(self.modalities)}_{key_digest}.pt"
            )
            if os.path.exists(self.cache_path):
                images = self._load_cache(self.cache_path)
                self.loaded_from_cache = True
        if images is None:
            images = {name: self._read_pngs(split_dir / name, file_names[name]) for name in self.modalities}
            if self.cache_path is not None:
                self._save_cache(self.cache_path, images)
        self.images: dict[str, torch.Tensor] = images

    # ------------------------------------------------------------------ reading
    def _check_agreement(self, split_dir: Path, listings: Mapping[str, dict[int, tuple[int, str]]]) -> list[int]:
        """The sorted indices shared by all modality folders; ValueError when the index sets or labels differ."""
        reference_name = self.modalities[0]
        reference = listings[reference_name]
        for name in self.modalities[1:]:
            listing = listings[name]
            if listing.keys() != reference.keys():
                missing = sorted(reference.keys() - listing.keys())[:5]
                extra = sorted(listing.keys() - reference.keys())[:5]
                raise ValueError(
                    f"modality folder {split_dir / name} does not hold the same examples as {split_dir / reference_name}: "
                    f"indices missing there (first 5): {missing}, indices only there (first 5): {extra}; {_layout_hint()}"
                )
            for index, (label, file_name) in listing.items():
                if label != reference[index][0]:
                    raise ValueError(
                        f"labels disagree for example {index}: {split_dir / reference_name / reference[index][1]} "
                        f"vs {split_dir / name / file_name}"
                    )
        return sorted(reference)

    @staticmethod
    def _read_pngs(folder: Path, file_names: Sequence[str]) -> torch.Tensor:
        array = np.empty((len(file_names), IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
        for i, file_name in enumerate(file_names):
            path = folder / file_name
            with Image.open(path) as image:
                if image.size != (IMAGE_SIZE, IMAGE_SIZE):
                    raise ValueError(f"{path} is {image.size[0]}x{image.size[1]}, expected 28x28; {_layout_hint()}")
                array[i] = np.asarray(image.convert("RGB"))
        return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()

    # ------------------------------------------------------------------ cache
    def _load_cache(self, path: str) -> dict[str, torch.Tensor]:
        hint = "delete it to reload the pngs"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, ...
            raise RuntimeError(f"the PolyMNIST cache file {path!r} is corrupt or unreadable ({type(e).__name__}: {e}); {hint}") from e
        if not isinstance(blob, Mapping) or "key" not in blob or "images" not in blob:
            raise RuntimeError(f"the PolyMNIST cache file {path!r} is corrupt (missing entries); {hint}")
        if dict(blob["key"]) != self.key:
            raise RuntimeError(
                f"the PolyMNIST cache file {path!r} holds the key {dict(blob['key'])}, not {self.key}; "
                f"it is left untouched — delete it or use another cache_dir"
            )
        images = blob["images"]
        expected = (self.size, *IMAGE_SHAPE)
        for name in self.modalities:
            t = images.get(name) if isinstance(images, Mapping) else None
            if not isinstance(t, torch.Tensor) or t.dtype != torch.uint8 or tuple(t.shape) != expected:
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RuntimeError(f"the PolyMNIST cache file {path!r} is corrupt: {name!r} is {got}, expected uint8 {expected}; {hint}")
        return {name: images[name] for name in self.modalities}

    def _save_cache(self, path: str, images: Mapping[str, torch.Tensor]) -> None:
        atomic_torch_save({"key": dict(self.key), "images": dict(images)}, path)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        i = int(index)
        if not -self.size <= i < self.size:
            raise IndexError(f"index {index} out of range for a PolyMNISTDataset of {self.size} examples")
        i %= self.size
        out: dict = {name: self.images[name][i].to(torch.float32) / 127.5 - 1.0 for name in self.modalities}
        out["meta"] = {"label": self.labels[i], "index": i}
        return out

    def __repr__(self) -> str:
        return (
            f"PolyMNISTDataset(root={str(self.root)!r}, split={self.split!r}, size={self.size}, "
            f"modalities={list(self.modalities)}, cache={self.cache_path!r})"
        )


# ------------------------------------------------------------------------------------- the spec
def build_datasets(cfg):
    """``(train, val, test)`` PolyMNIST from ``cfg.dataset.root``; built there first from MNIST + backgrounds
    when ``cfg.dataset.build`` says so.

    The published data set has train and test only; validation holds out the last ``val_size``
    training examples.
    """
    from torch.utils.data import Subset

    d = cfg.dataset
    root = Path(d.root)
    published = (root / "train").is_dir() and not (root / META_FILE).is_file()  # read as is, never rebuilt
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


def modality_specs(cfg) -> dict[str, ModalitySpec]:
    """Every modality ``m<k>`` (of :data:`POLYMNIST_MODALITIES` and ``cfg.dataset.modalities``): a 3x28x28
    image with a Laplace likelihood (as in MoPoE's PolyMNIST experiments), read back by a digit classifier."""
    names = list(POLYMNIST_MODALITIES) + [m for m in cfg.dataset.modalities if m not in POLYMNIST_MODALITIES]
    return {m: ModalitySpec(IMAGE_SHAPE, "laplace", read=BY_CLASSIFIER) for m in names}


def _digit_of(batch: Mapping) -> torch.Tensor:
    return batch["meta"]["label"].reshape(-1, 1).long()


_LABELS = LabelSpec((10,), _digit_of)

#: MoPoE's released digit classifiers (``<evaluation.classifiers_dir>/pretrained_img_to_digit_clf_m<k>``,
#: :mod:`pyro_diffmvae.metrics.published_classifiers`)
PUBLISHED_CLASSIFIERS = PublishedClassifiers("MoPoE ClfImg", MOPOE_CLASSIFIER_FILE, load_mopoe_digit_classifier)

#: the data set as the builders and the evaluation see it (:mod:`pyro_diffmvae.data.spec`): every
#: modality shows the same digit, read back by a classifier per modality (trained, or MoPoE's released
#: ones with ``evaluation.classifiers_dir``)
SPEC = DatasetSpec(name="polymnist", title="PolyMNIST", build=build_datasets, modalities=modality_specs,
                   evaluation=EvaluationSpec("labels", labels=lambda cfg, train_set: _LABELS,
                                             published_classifiers=PUBLISHED_CLASSIFIERS))
