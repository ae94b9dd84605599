r"""CelebAMask-HQ: face photos, a composite part mask and binary attributes, read from the official layout.

CelebAMask-HQ (Lee et al., CVPR 2020) is CelebA-HQ — 30,000 aligned face photos, 1024x1024 — with
hand-drawn masks of 18 face parts (512x512) and CelebA's 40 binary attributes for every image. The
paper uses it as a three-modality data set: ``image``, ``mask`` and ``attributes``.

**Layout** (the official archive; ``<root>`` is the ``CelebAMask-HQ`` folder)::

    <root>/CelebA-HQ-img/<id>.jpg                                   id = 0 .. 29999
    <root>/CelebAMask-HQ-attribute-anno.txt                         count line, header, one row per image
    <root>/CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png  one binary png per present part

``<part>`` is one of :data:`MASK_PARTS` (``skin, nose, eye_g, l_eye, r_eye, l_brow, r_brow, l_ear,
r_ear, mouth, u_lip, l_lip, hair, hat, ear_r, neck_l, neck, cloth``); a missing part file means the
part is absent from that face. Instead of the part pngs, the *merged label maps* written by the
official ``g_mask.py`` script are also accepted: ``<root>/CelebAMask-HQ-mask/<id>.png``, one
``uint8`` map with class ids 0-18 (0 background, then :data:`MASK_PARTS` in order, see
:data:`LABEL_NAMES`). The attribute file is::

    30000
    5_o_Clock_Shadow Arched_Eyebrows ... Young          (40 names)
    0.jpg  -1 1 1 -1 ...                                (40 values in {-1, 1})

:func:`read_attributes` reads it and maps -1/1 to 0/1; :data:`PAPER_ATTRIBUTES` are the 18 the
paper uses. Copies without masks (e.g. the shared 64x64 copy, which has only ``CelebA-HQ-img/`` and
the attribute file) work in the image+attributes mode: ``modalities=("image", "attributes")``.

**The mask modality** is a single 0/1 mask: the union of every part *except skin*, i.e. hair, hat,
eyeglasses, eyes, brows, ears, earrings, nose, mouth, lips, neck, necklace and cloth
(:data:`COMPOSITE_PARTS`). From part pngs a pixel is in a part when it is nonzero (as in
``g_mask.py``); from a merged label map the mask is ``label not in {0 background, 1 skin}``. The two
agree exactly: ``g_mask.py`` paints the parts in :data:`MASK_PARTS` order, skin first, so a pixel
keeps the skin label only when no other part covers it. Masks are resized with **nearest
neighbour** (:func:`resize_nearest`: output pixel ``i`` reads input pixel
``floor((i + 0.5) * in / out)``, like PIL's ``NEAREST`` and torch's ``"nearest-exact"``): it keeps
the mask exactly binary, with no threshold to choose, at the price of some aliasing of thin
structures (which the 512 → 64/128 downscaling would blur away otherwise).

**Images** are decoded to RGB and resized to ``image_size`` with PIL's antialiased ``LANCZOS``
filter (JPEGs larger than needed are first decoded at a reduced DCT scale with ``Image.draft``, as
``Image.thumbnail`` does, which makes 1024 → 128 about 20x faster); ``dataset[i]["image"]`` is
float32 ``u / 127.5 - 1`` in ``[-1, 1]`` for 8-bit levels ``u``. The photos are square; a
non-square one would be stretched.

**Splits.** CelebAMask-HQ has no official split. :class:`CelebAMaskHQDataset` uses the common
practice of contiguous id ranges, ``split_boundaries=(24000, 27000)``: train = ids 0-23999 (24,000),
val = 24000-26999 (3,000), test = 27000-29999 (3,000). The split depends on the id alone, so it is
the same for any copy that holds the image, and ``size`` takes the first ``size`` ids of a split.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..io import atomic_torch_save
from .spec import BY_CLASSIFIER, DatasetSpec, EvaluationSpec, LabelSpec, ModalitySpec
from .validation import check_modalities

__all__ = [
    "SPEC",
    "build_datasets",
    "modality_specs",
    "ATTRIBUTE_FILE",
    "COMPOSITE_PARTS",
    "DEFAULT_SPLIT_BOUNDARIES",
    "IMAGE_DIR",
    "LABEL_MAP_DIR",
    "LABEL_NAMES",
    "LAYOUT",
    "MASK_PARTS",
    "MODALITIES",
    "PAPER_ATTRIBUTES",
    "PART_MASK_DIR",
    "SPLITS",
    "CelebAMaskHQDataset",
    "composite_mask_from_label_map",
    "composite_mask_from_parts",
    "part_mask_path",
    "read_attributes",
    "read_image",
    "resize_nearest",
]

# --------------------------------------------------------------------------------- constants
PAPER_ATTRIBUTES: tuple[str, ...] = (
    "Bald", "Bangs", "Black_Hair", "Blond_Hair", "Brown_Hair", "Bushy_Eyebrows", "Eyeglasses",
    "Gray_Hair", "Heavy_Makeup", "Male", "Mouth_Slightly_Open", "Mustache", "Pale_Skin",
    "Receding_Hairline", "Smiling", "Straight_Hair", "Wavy_Hair", "Wearing_Hat",
)  # fmt: skip
assert len(PAPER_ATTRIBUTES) == 18

# Class ids of the merged label maps: 0 is background, part k of MASK_PARTS has id k + 1.
LABEL_NAMES: tuple[str, ...] = (
    "background", "skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
    "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth",
)  # fmt: skip
MASK_PARTS: tuple[str, ...] = LABEL_NAMES[1:]
COMPOSITE_PARTS: tuple[str, ...] = tuple(p for p in MASK_PARTS if p != "skin")
_NOT_IN_MASK_IDS = (0, 1)  # background, skin
NUM_LABELS = len(LABEL_NAMES)  # 19

MODALITIES: tuple[str, ...] = ("image", "mask", "attributes")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLIT_BOUNDARIES: tuple[int, int] = (24000, 27000)
MASK_SOURCES: tuple[str, ...] = ("auto", "parts", "label_maps")
DATA_VERSION = 1  # bump when the preprocessing changes: it is part of the cache key

IMAGE_DIR = "CelebA-HQ-img"
ATTRIBUTE_FILE = "CelebAMask-HQ-attribute-anno.txt"
PART_MASK_DIR = "CelebAMask-HQ-mask-anno"
LABEL_MAP_DIR = "CelebAMask-HQ-mask"
IDS_PER_MASK_FOLDER = 2000

LAYOUT = (
    "expected the official CelebAMask-HQ layout:\n"
    f"  <root>/{IMAGE_DIR}/<id>.jpg\n"
    f"  <root>/{ATTRIBUTE_FILE}  (count line, header of 40 names, rows '<id>.jpg v1 .. v40' in {{-1, 1}})\n"
    f"  <root>/{PART_MASK_DIR}/<id // 2000>/<id:05d>_<part>.png  (only for the mask modality;\n"
    f"      or merged label maps <root>/{LABEL_MAP_DIR}/<id>.png)"
)

_ROW_NAME = re.compile(r"^(\d+)\.jpg$")


def _missing(what: str, path: Path | str) -> FileNotFoundError:
    return FileNotFoundError(f"CelebAMask-HQ: {what} {str(path)!r} does not exist; {LAYOUT}")


# -------------------------------------------------------------------------------- attributes
def read_attributes(
    path: str | os.PathLike, names: Sequence[str] | None = PAPER_ATTRIBUTES
) -> tuple[list[int], torch.Tensor]:
    """Read ``CelebAMask-HQ-attribute-anno.txt``.

    :param path: the attribute file.
    :param names: the attribute columns to return, in this order (default: the paper's 18,
        :data:`PAPER_ATTRIBUTES`); None returns all columns of the file, in file order.
    :returns: ``(ids, attributes)``: the image ids in file order (``"12.jpg"`` → 12) and a float32
        tensor ``(N, len(names))`` with -1 mapped to 0 and 1 to 1.
    :raises FileNotFoundError: the file is missing (the message names it and the layout).
    :raises ValueError: an unknown attribute name (the message lists the known ones), or a
        malformed line (the message names the file and the line number).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing("the attribute file", path)
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines()

    def fail(line_number: int, problem: str) -> ValueError:
        return ValueError(f"{path}, line {line_number}: {problem}")

    if len(lines) < 2:
        raise fail(len(lines) + 1, "expected a count line and a header line of attribute names")
    try:
        count = int(lines[0].strip())
    except ValueError:
        raise fail(1, f"expected the number of images, got {lines[0]!r}") from None
    header = lines[1].split()
    if not header:
        raise fail(2, "expected a header line of attribute names, got an empty line")
    if len(set(header)) != len(header):
        raise fail(2, "the header repeats an attribute name")
    if names is None:
        names = header
    elif isinstance(names, str):
        names = [names]
    unknown = [n for n in names if n not in header]
    if unknown:
        raise ValueError(f"unknown attribute name(s) {unknown} for {path}; the known attributes are {header}")
    columns = [header.index(n) for n in names]

    ids: list[int] = []
    rows: list[list[str]] = []
    seen: dict[int, int] = {}
    allowed = {"-1", "1"}
    for line_number, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        if not tokens:
            continue  # blank lines (e.g. a trailing one)
        if len(tokens) != len(header) + 1:
            raise fail(line_number, f"expected '<id>.jpg' and {len(header)} values, got {len(tokens)} fields: {line!r}")
        match = _ROW_NAME.match(tokens[0])
        if match is None:
            raise fail(line_number, f"expected an image name '<id>.jpg', got {tokens[0]!r}")
        image_id = int(match.group(1))
        if image_id in seen:
            raise fail(line_number, f"image {tokens[0]!r} is listed twice (first on line {seen[image_id]})")
        values = tokens[1:]
        if not allowed.issuperset(values):
            bad = next(v for v in values if v not in allowed)
            raise fail(line_number, f"attribute values must be -1 or 1, got {bad!r}")
        seen[image_id] = line_number
        ids.append(image_id)
        rows.append(values)
    if len(ids) != count:
        raise fail(1, f"the count line says {count} images but the file has {len(ids)} rows")
    table = np.array(rows, dtype="<U2").reshape(len(rows), len(header))
    attributes = torch.from_numpy(table[:, columns] == "1").to(torch.float32)
    return ids, attributes


# ------------------------------------------------------------------------------------ images
def read_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode an image to RGB and resize it to ``image_size`` x ``image_size`` (antialiased LANCZOS).

    :returns: uint8 tensor ``(3, S, S)``.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing("the image", path)
    with Image.open(path) as img:
        img.draft("RGB", (image_size, image_size))  # JPEG: decode at the smallest DCT scale >= S
        img = img.convert("RGB")
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.LANCZOS)
        pixels = np.array(img, dtype=np.uint8)  # (S, S, 3), a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1).contiguous()


def _to_float_image(images_u8: torch.Tensor) -> torch.Tensor:
    return images_u8.to(torch.float32) / 127.5 - 1.0


# ------------------------------------------------------------------------------------- masks
def resize_nearest(mask: np.ndarray, size: int) -> np.ndarray:
    """Resize a 2-D array to ``size`` x ``size`` by nearest neighbour.

    Output pixel ``i`` reads input pixel ``floor((i + 0.5) * in / size)`` (computed in integers),
    the input pixel under the output pixel's centre — the convention of PIL's ``NEAREST`` and
    torch's ``"nearest-exact"``. Values are copied, never mixed, so a binary mask stays binary.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"resize_nearest expects a 2-D array, got shape {mask.shape}")
    size = _check_positive_int(size, "size")
    height, width = mask.shape
    rows = (2 * np.arange(size) + 1) * height // (2 * size)
    cols = (2 * np.arange(size) + 1) * width // (2 * size)
    return mask[np.ix_(rows, cols)]


def part_mask_path(root: str | os.PathLike, image_id: int, part: str) -> Path:
    """``<root>/CelebAMask-HQ-mask-anno/<id // 2000>/<id:05d>_<part>.png``."""
    if part not in MASK_PARTS:
        raise ValueError(f"unknown part {part!r}; the parts are {list(MASK_PARTS)}")
    image_id = int(image_id)
    return Path(root) / PART_MASK_DIR / str(image_id // IDS_PER_MASK_FOLDER) / f"{image_id:05d}_{part}.png"


def _read_part(path: Path) -> np.ndarray:
    """A part png as a bool array: nonzero pixels are in the part (as in the official ``g_mask.py``)."""
    with Image.open(path) as img:
        return np.asarray(img.convert("L")) != 0


def _composite_from_parts(root: Path, image_id: int, size: int) -> np.ndarray:
    folder = part_mask_path(root, image_id, "skin").parent
    if not folder.parent.is_dir():
        raise _missing("the part mask directory", folder.parent)
    if not folder.is_dir():
        raise _missing(f"the part mask folder of image {image_id}", folder)
    union = np.zeros((size, size), dtype=bool)
    for part in COMPOSITE_PARTS:
        path = part_mask_path(root, image_id, part)
        if path.is_file():  # a missing file means the part is absent
            union |= resize_nearest(_read_part(path), size)
    return union


def composite_mask_from_parts(root: str | os.PathLike, image_id: int, size: int) -> torch.Tensor:
    """The composite mask of one image from its per-part pngs: the union of every part except skin.

    Each present part of :data:`COMPOSITE_PARTS` is read (nonzero = in the part), resized to ``size``
    by nearest neighbour (:func:`resize_nearest`) and or-ed in; resizing before the union gives the
    same result as after it, since nearest neighbour only selects pixels.

    :returns: float32 ``(1, size, size)`` in ``{0, 1}``.
    """
    size = _check_positive_int(size, "size")
    union = _composite_from_parts(Path(root), int(image_id), size)
    return torch.from_numpy(union).to(torch.float32).unsqueeze(0)


def _composite_from_label_map(label_map: np.ndarray | torch.Tensor, size: int) -> np.ndarray:
    if isinstance(label_map, torch.Tensor):
        label_map = label_map.detach().cpu().numpy()
    label_map = np.asarray(label_map)
    if label_map.ndim == 3 and label_map.shape[0] == 1:
        label_map = label_map[0]
    if label_map.ndim != 2:
        raise ValueError(f"a label map must have shape (H, W) (or (1, H, W)), got {label_map.shape}")
    if not np.issubdtype(label_map.dtype, np.integer):
        raise ValueError(f"a label map must hold integer class ids, got dtype {label_map.dtype}")
    if label_map.size and (label_map.min() < 0 or label_map.max() >= NUM_LABELS):
        raise ValueError(
            f"label map class ids must lie in 0..{NUM_LABELS - 1} {list(LABEL_NAMES)}, "
            f"got range [{label_map.min()}, {label_map.max()}]"
        )
    foreground = ~np.isin(label_map, _NOT_IN_MASK_IDS)
    return resize_nearest(foreground, size)


def composite_mask_from_label_map(label_map: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """The composite mask from a merged label map: the pixels whose class id is not 0 (background)
    or 1 (skin), resized to ``size`` by nearest neighbour (:func:`resize_nearest`).

    :param label_map: integer array or tensor ``(H, W)`` (or ``(1, H, W)``) of class ids 0-18
        (:data:`LABEL_NAMES`).
    :returns: float32 ``(1, size, size)`` in ``{0, 1}``.
    """
    size = _check_positive_int(size, "size")
    return torch.from_numpy(_composite_from_label_map(label_map, size)).to(torch.float32).unsqueeze(0)


def _read_label_map(path: Path) -> np.ndarray:
    if not path.is_file():
        raise _missing("the label map", path)
    with Image.open(path) as img:
        if img.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"the label map {str(path)!r} must be a single-channel png of class ids, got mode {img.mode!r}")
        return np.asarray(img).astype(np.int64)


# ----------------------------------------------------------------------------------- helpers
def _check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------- dataset
class CelebAMaskHQDataset(Dataset):
    """One split of CelebAMask-HQ as a map-style ``torch`` data set.

    ``dataset[i]`` is ``{"image": float32 (3, S, S) in [-1, 1], "mask": float32 (1, S, S) in {0, 1},
    "attributes": float32 (A,) in {0, 1}, "meta": {"index": i, "image_id": id}}`` with only the
    requested modalities, so ``torch.utils.data.default_collate`` batches it.

    :param root: the ``CelebAMask-HQ`` folder (see the module docstring for the layout).
    :param split: ``"train"``, ``"val"`` or ``"test"``.
    :param image_size: ``S``, the side of the returned images and masks (128 by default; use 64 for
        the shared 64x64 copy, since larger sizes only upsample it).
    :param modalities: ``("image", "mask", "attributes")`` (default) or the image+attributes mode
        ``("image", "attributes")`` for copies without masks; any non-empty subset works.
    :param attributes: the attribute columns, in order (default :data:`PAPER_ATTRIBUTES`).
    :param size: the number of examples: the first ``size`` ids of the split (default: all).
    :param cache_dir: when given, the split's images (and masks) are decoded once into ``uint8`` /
        ``bool`` tensors and saved there in one file per key (written atomically: a temporary file,
        then ``os.replace``), and loaded from it on the next construction with the same key.
    :param masks: where masks come from: ``"parts"`` (``CelebAMask-HQ-mask-anno/`` part pngs),
        ``"label_maps"`` (``CelebAMask-HQ-mask/<id>.png`` merged maps) or ``"auto"`` (parts when that
        folder exists, else label maps when that one exists). Only used with the mask modality.
    :param split_boundaries: ``(a, b)``: train = ids < a, val = a <= id < b, test = ids >= b
        (default ``(24000, 27000)``: 24,000 / 3,000 / 3,000).
    :param preload: decode everything at construction (implied by ``cache_dir``); otherwise each
        item is decoded lazily in ``__getitem__`` (cheap for small images; use DataLoader workers).

    Attributes: ``ids`` (list of image ids), ``attributes`` (float32 ``(N, A)``),
    ``attribute_names``, ``mask_source`` (``"parts"``, ``"label_maps"`` or None), ``images`` /
    ``masks`` (uint8 ``(N, 3, S, S)`` / bool ``(N, 1, S, S)`` when preloaded, else None),
    ``cache_path`` and ``loaded_from_cache``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 128,
        modalities: Sequence[str] = MODALITIES,
        attributes: Sequence[str] = PAPER_ATTRIBUTES,
        size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        masks: str = "auto",
        split_boundaries: tuple[int, int] = DEFAULT_SPLIT_BOUNDARIES,
        preload: bool = False,
    ):
        # ---- arguments
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; known splits: {list(SPLITS)}")
        modalities = check_modalities(modalities, MODALITIES)
        if masks not in MASK_SOURCES:
            raise ValueError(f"masks must be one of {list(MASK_SOURCES)}, got {masks!r}")
        low, high = (int(b) for b in split_boundaries)
        if not 0 <= low <= high:
            raise ValueError(f"split_boundaries must be (a, b) with 0 <= a <= b, got {tuple(split_boundaries)}")
        if isinstance(attributes, str):
            attributes = (attributes,)
        if size is not None:
            size = _check_positive_int(size, "size")
        self.root = Path(root)
        self.split = split
        self.image_size = _check_positive_int(image_size, "image_size")
        self.modalities = modalities
        self.attribute_names = tuple(attributes)
        self.split_boundaries = (low, high)

        # ---- layout
        if not self.root.is_dir():
            raise _missing("the data root", self.root)
        image_dir = self.root / IMAGE_DIR
        if not image_dir.is_dir():
            raise _missing("the image directory", image_dir)
        self.mask_source = self._find_mask_source(masks) if "mask" in modalities else None

        # ---- ids of the split
        all_ids, all_attributes = read_attributes(self.root / ATTRIBUTE_FILE, self.attribute_names)
        order = sorted(range(len(all_ids)), key=all_ids.__getitem__)
        lower, upper = {"train": (0, low), "val": (low, high), "test": (high, None)}[split]
        chosen = [k for k in order if all_ids[k] >= lower and (upper is None or all_ids[k] < upper)]
        if not chosen:
            raise ValueError(
                f"the {split!r} split is empty: no id of {self.root / ATTRIBUTE_FILE} lies in "
                f"[{lower}, {'inf' if upper is None else upper}) (split_boundaries={self.split_boundaries})"
            )
        if size is not None:
            if size > len(chosen):
                raise ValueError(f"size={size} exceeds the {len(chosen)} examples of the {split!r} split")
            chosen = chosen[:size]
        self.ids: list[int] = [all_ids[k] for k in chosen]
        self.attributes: torch.Tensor = all_attributes[chosen]
        self._check_images_exist(image_dir)

        # ---- preloading / cache
        self.images: torch.Tensor | None = None
        self.masks: torch.Tensor | None = None
        self.cache_path: str | None = None
        self.loaded_from_cache = False
        stored = [m for m in ("image", "mask") if m in modalities]
        self.key = {
            "version": DATA_VERSION, "root": str(self.root.resolve()), "split": split,
            "split_boundaries": list(self.split_boundaries), "size": len(self.ids),
            "image_size": self.image_size, "stored": stored, "mask_source": self.mask_source,
            "ids_sha1": hashlib.sha1(np.asarray(self.ids, dtype=np.int64).tobytes()).hexdigest(),
        }  # fmt: skip
        if cache_dir is not None and stored:
            digest = hashlib.sha1(json.dumps(self.key, sort_keys=True).encode()).hexdigest()[:12]
            self.cache_path = os.path.join(
                os.fspath(cache_dir),
                f"celebamask_hq_{split}_n{len(self.ids)}_s{self.image_size}_{'+'.join(stored)}_{digest}_v{DATA_VERSION}.pt",
            )
            if os.path.exists(self.cache_path):
                data = self._load_cache(self.cache_path, stored)
                self.loaded_from_cache = True
            else:
                data = self._decode_all(stored)
                self._save_cache(self.cache_path, data)
            self.images, self.masks = data.get("image"), data.get("mask")
        elif preload and stored:
            data = self._decode_all(stored)
            self.images, self.masks = data.get("image"), data.get("mask")

    # ------------------------------------------------------------------ layout checks
    def _find_mask_source(self, masks: str) -> str:
        parts_dir, maps_dir = self.root / PART_MASK_DIR, self.root / LABEL_MAP_DIR
        if masks == "parts" or (masks == "auto" and parts_dir.is_dir()):
            if not parts_dir.is_dir():
                raise self._masks_missing(f"the part mask directory {str(parts_dir)!r} does not exist")
            return "parts"
        if masks == "label_maps" or (masks == "auto" and maps_dir.is_dir()):
            if not maps_dir.is_dir():
                raise self._masks_missing(f"the label map directory {str(maps_dir)!r} does not exist")
            return "label_maps"
        raise self._masks_missing(
            f"neither the part mask directory {str(parts_dir)!r} nor the label map directory "
            f"{str(maps_dir)!r} exists"
        )

    @staticmethod
    def _masks_missing(reason: str) -> FileNotFoundError:
        return FileNotFoundError(
            f"CelebAMask-HQ masks are missing: {reason}. Without masks use the image+attributes mode, "
            f"modalities=['image', 'attributes'] (e.g. for the 64x64 copy, which has no part masks); {LAYOUT}"
        )

    def _image_path(self, image_id: int) -> Path:
        return self.root / IMAGE_DIR / f"{image_id}.jpg"

    def _check_images_exist(self, image_dir: Path) -> None:
        if "image" not in self.modalities:
            return
        present = set(os.listdir(image_dir))
        missing = [i for i in self.ids if f"{i}.jpg" not in present]
        if missing:
            shown = ", ".join(repr(str(self._image_path(i))) for i in missing[:3])
            raise FileNotFoundError(
                f"CelebAMask-HQ: {len(missing)} image(s) of the {self.split!r} split listed in the attribute "
                f"file do not exist, e.g. {shown}; {LAYOUT}"
            )

    # ------------------------------------------------------------------ decoding
    def _decode_image(self, image_id: int) -> torch.Tensor:
        return read_image(self._image_path(image_id), self.image_size)

    def _decode_mask(self, image_id: int) -> torch.Tensor:
        if self.mask_source == "parts":
            union = _composite_from_parts(self.root, image_id, self.image_size)
        else:
            label_map = _read_label_map(self.root / LABEL_MAP_DIR / f"{image_id}.png")
            union = _composite_from_label_map(label_map, self.image_size)
        return torch.from_numpy(union).unsqueeze(0)  # bool (1, S, S)

    def _decode_all(self, stored: Sequence[str]) -> dict[str, torch.Tensor]:
        n, s = len(self.ids), self.image_size
        data: dict[str, torch.Tensor] = {"ids": torch.tensor(self.ids, dtype=torch.long)}
        if "image" in stored:
            data["image"] = torch.empty(n, 3, s, s, dtype=torch.uint8)
        if "mask" in stored:
            data["mask"] = torch.empty(n, 1, s, s, dtype=torch.bool)
        for k, image_id in enumerate(self.ids):
            if "image" in stored:
                data["image"][k] = self._decode_image(image_id)
            if "mask" in stored:
                data["mask"][k] = self._decode_mask(image_id)
        return data

    # ------------------------------------------------------------------ cache
    def _load_cache(self, path: str, stored: Sequence[str]) -> dict[str, torch.Tensor]:
        hint = "delete it to rebuild the cache"
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, ...
            raise RuntimeError(f"the CelebAMask-HQ cache file {path!r} is corrupt or unreadable ({type(e).__name__}: {e}); {hint}") from e
        if not isinstance(blob, Mapping) or not all(k in blob for k in ("key", "ids", *stored)):
            raise RuntimeError(f"the CelebAMask-HQ cache file {path!r} is corrupt (missing entries); {hint}")
        if dict(blob["key"]) != self.key:
            raise RuntimeError(
                f"the CelebAMask-HQ cache file {path!r} holds the key {dict(blob['key'])}, not {self.key}; "
                f"it is left untouched — delete it or use another cache_dir"
            )
        n, s = len(self.ids), self.image_size
        expected = {"ids": (torch.long, (n,)), "image": (torch.uint8, (n, 3, s, s)), "mask": (torch.bool, (n, 1, s, s))}
        for name in ("ids", *stored):
            dtype, shape = expected[name]
            t = blob[name]
            if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
                got = (t.dtype, tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__
                raise RuntimeError(f"the CelebAMask-HQ cache file {path!r} is corrupt: {name!r} is {got}, expected {dtype} {shape}; {hint}")
        if blob["ids"].tolist() != self.ids:
            raise RuntimeError(f"the CelebAMask-HQ cache file {path!r} is corrupt: its image ids differ; {hint}")
        return {k: blob[k] for k in ("ids", *stored)}

    def _save_cache(self, path: str, data: Mapping[str, torch.Tensor]) -> None:
        atomic_torch_save({"key": dict(self.key), **data}, path)

    # ------------------------------------------------------------------ access
    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        n = len(self.ids)
        i = int(index)
        if not -n <= i < n:
            raise IndexError(f"index {index} out of range for a CelebAMaskHQDataset of {n} examples")
        i %= n
        image_id = self.ids[i]
        out: dict = {}
        for name in self.modalities:
            if name == "image":
                image = self.images[i] if self.images is not None else self._decode_image(image_id)
                out[name] = _to_float_image(image)
            elif name == "mask":
                mask = self.masks[i] if self.masks is not None else self._decode_mask(image_id)
                out[name] = mask.to(torch.float32)
            else:
                out[name] = self.attributes[i]
        out["meta"] = {"index": i, "image_id": image_id}
        return out

    def __repr__(self) -> str:
        return (
            f"CelebAMaskHQDataset(root={str(self.root)!r}, split={self.split!r}, size={len(self.ids)}, "
            f"image_size={self.image_size}, modalities={list(self.modalities)}, "
            f"mask_source={self.mask_source!r}, cache={self.cache_path!r})"
        )


# ------------------------------------------------------------------------------------- the spec
def build_datasets(cfg) -> tuple[CelebAMaskHQDataset, CelebAMaskHQDataset, CelebAMaskHQDataset]:
    """``(train, val, test)`` of ``cfg.dataset`` (``root``, ``image_size``, ``attributes``, ``*_size``, ...)."""
    d = cfg.dataset
    common = dict(image_size=d.image_size, modalities=tuple(d.modalities), attributes=tuple(d.attributes),
                  cache_dir=d.cache_dir)
    return tuple(CelebAMaskHQDataset(d.root, split, size=size, **common)
                 for split, size in (("train", d.train_size), ("val", d.val_size), ("test", d.test_size)))


def _threshold(x: torch.Tensor) -> torch.Tensor:
    """Attribute probabilities → 0/1 labels (``x > 0.5``)."""
    return (x > 0.5).long()


def modality_specs(cfg) -> dict[str, ModalitySpec]:
    """Image (read back by an attribute classifier), composite mask (scored by F1) and the
    ``cfg.dataset.attributes`` (read back by a threshold at 0.5, scored by F1)."""
    S = cfg.dataset.image_size
    return {
        "image": ModalitySpec((3, S, S), "normal", read=BY_CLASSIFIER),
        "mask": ModalitySpec((1, S, S), "bernoulli", f1=True),
        "attributes": ModalitySpec((len(cfg.dataset.attributes),), "bernoulli", read=_threshold, f1=True),
    }


def _attributes_of(batch: Mapping) -> torch.Tensor:
    return (batch["attributes"] > 0.5).long()


def _labels(cfg, train_set) -> LabelSpec:
    return LabelSpec((2,) * len(cfg.dataset.attributes), _attributes_of)


#: the data set as the builders and the evaluation see it (:mod:`pyro_diffmvae.data.spec`): the labels
#: are the binary attributes
SPEC = DatasetSpec(name="celebamask_hq", title="CelebAMask-HQ", build=build_datasets, modalities=modality_specs,
                   evaluation=EvaluationSpec("labels", labels=_labels))
