"""CelebAMask-HQ reader: attribute parsing (column selection, -1/1 → 0/1), the composite mask (union of
all parts but skin, nearest resizing), images, splits, the cache and error messages — on a tiny fake
copy of the official layout built in ``tmp_path``, and on the real data in ``../shared/data`` when
it is there (the 64x64 copy of all 30,000 faces and the 4 official label-map samples)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pyro_diffmvae.data.celebamask_hq import (
    ATTRIBUTE_FILE,
    COMPOSITE_PARTS,
    IMAGE_DIR,
    LABEL_MAP_DIR,
    MASK_PARTS,
    PAPER_ATTRIBUTES,
    PART_MASK_DIR,
    CelebAMaskHQDataset,
    composite_mask_from_label_map,
    composite_mask_from_parts,
    part_mask_path,
    read_attributes,
    resize_nearest,
)

# The 40 CelebA attribute names, in the order of the official file's header.
HEADER = [
    "5_o_Clock_Shadow", "Arched_Eyebrows", "Attractive", "Bags_Under_Eyes", "Bald", "Bangs",
    "Big_Lips", "Big_Nose", "Black_Hair", "Blond_Hair", "Blurry", "Brown_Hair", "Bushy_Eyebrows",
    "Chubby", "Double_Chin", "Eyeglasses", "Goatee", "Gray_Hair", "Heavy_Makeup", "High_Cheekbones",
    "Male", "Mouth_Slightly_Open", "Mustache", "Narrow_Eyes", "No_Beard", "Oval_Face", "Pale_Skin",
    "Pointy_Nose", "Receding_Hairline", "Rosy_Cheeks", "Sideburns", "Smiling", "Straight_Hair",
    "Wavy_Hair", "Wearing_Earrings", "Wearing_Hat", "Wearing_Lipstick", "Wearing_Necklace",
    "Wearing_Necktie", "Young",
]  # fmt: skip
assert len(HEADER) == 40

# ------------------------------------------------------------------------------ fake layout
# Image 0's row is written out literally (it is the real file's row for 0.jpg): its ones are
# Arched_Eyebrows, Attractive, Blond_Hair, Heavy_Makeup, Mouth_Slightly_Open, No_Beard, Smiling,
# Wavy_Hair, Wearing_Lipstick and Young.
ROW_0 = "-1 1 1 -1 -1 -1 -1 -1 -1 1 -1 -1 -1 -1 -1 -1 -1 -1 1 -1 -1 1 -1 -1 1 -1 -1 -1 -1 -1 -1 1 -1 1 -1 -1 1 -1 -1 1"
PAPER_0 = [0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 1, 0, 1, 0]  # read by hand from ROW_0
# The other rows: the attributes set to 1 (all others -1).
ONES = {
    1: {"Male", "Bald", "Eyeglasses"},
    2: {"Bangs", "Black_Hair", "Smiling", "Young"},
    3: set(),
    4: {"Wearing_Hat", "Male", "Mustache"},
    5: {"Gray_Hair", "Pale_Skin"},
    6: {"Brown_Hair", "Straight_Hair", "Bushy_Eyebrows"},
    7: {"Receding_Hairline", "Male"},
    2001: {"Blond_Hair", "Wavy_Hair", "Heavy_Makeup"},
    2003: {"Mouth_Slightly_Open"},
}
FILE_ORDER = [0, 1, 2, 3, 4, 5, 6, 2001, 7, 2003]  # not sorted: the dataset sorts by id
SORTED_IDS = sorted(FILE_ORDER)
COLOURS = {  # solid RGB colour of each fake image (2003 is half black, half white)
    0: (255, 0, 0), 1: (0, 255, 0), 2: (0, 0, 255), 3: (255, 255, 255), 4: (0, 0, 0),
    5: (128, 128, 128), 6: (255, 255, 0), 7: (0, 255, 255), 2001: (255, 0, 255),
}  # fmt: skip
SOURCE = 16  # side of the fake photos and part masks


def row_of(image_id: int) -> str:
    if image_id == 0:
        return ROW_0
    return " ".join("1" if name in ONES[image_id] else "-1" for name in HEADER)


def write_attribute_file(path: Path, rows: list[str], count: int | None = None) -> None:
    lines = [str(len(rows) if count is None else count), " ".join(HEADER), *rows]
    path.write_text("\n".join(lines) + "\n")


def box(rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((SOURCE, SOURCE), dtype=bool)
    mask[rows, cols] = True
    return mask


def save_part(root: Path, image_id: int, part: str, mask: np.ndarray, mode: str = "L") -> None:
    path = part_mask_path(root, image_id, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    grey.convert(mode).save(path)


def parts_of_image_0() -> dict[str, np.ndarray]:
    return {
        "skin": box(slice(4, 16), slice(0, 16)),  # large, and must not be in the mask
        "hair": box(slice(0, 4), slice(0, 16)),
        "hat": box(slice(0, 2), slice(0, 4)),  # overlaps the hair
        "nose": box(slice(8, 10), slice(6, 8)),
        "l_eye": box(slice(5, 6), slice(5, 6)),  # one pixel at an odd (row, col): kept at size 8
        "r_eye": box(slice(6, 7), slice(10, 11)),  # one pixel at an even (row, col): dropped at size 8
        "cloth": box(slice(14, 16), slice(0, 16)),
    }


def expected_mask_0(size: int) -> np.ndarray:
    """The composite mask of image 0, written out by hand."""
    mask = np.zeros((size, size), dtype=np.float32)
    if size == 16:
        mask[0:4, :] = 1  # hair (and hat)
        mask[8:10, 6:8] = 1  # nose
        mask[5, 5] = 1  # l_eye
        mask[6, 10] = 1  # r_eye
        mask[14:16, :] = 1  # cloth
    elif size == 8:  # output pixel i reads input pixel 2i + 1
        mask[0:2, :] = 1  # hair rows 1, 3
        mask[4, 3] = 1  # nose at (9, 7)
        mask[2, 2] = 1  # l_eye at (5, 5)
        mask[7, :] = 1  # cloth row 15
    else:
        raise ValueError(size)
    return mask


def make_fake_root(root: Path, parts: bool = True, label_maps: bool = False) -> Path:
    (root / IMAGE_DIR).mkdir(parents=True)
    for image_id in FILE_ORDER:
        if image_id == 2003:
            pixels = np.zeros((SOURCE, SOURCE, 3), dtype=np.uint8)
            pixels[:, SOURCE // 2 :] = 255
        else:
            pixels = np.broadcast_to(np.array(COLOURS[image_id], dtype=np.uint8), (SOURCE, SOURCE, 3)).copy()
        Image.fromarray(pixels).save(root / IMAGE_DIR / f"{image_id}.jpg", quality=100, subsampling=0)
    write_attribute_file(root / ATTRIBUTE_FILE, [f"{i}.jpg  {row_of(i)}" for i in FILE_ORDER])
    part_masks = {i: {} for i in FILE_ORDER}
    part_masks[0] = parts_of_image_0()
    part_masks[1] = {"skin": box(slice(0, 16), slice(0, 16))}  # only skin: an empty mask
    part_masks[2001] = {"hair": box(slice(0, 8), slice(0, 8))}  # folder 1 (2001 // 2000)
    if parts:
        modes = {"hat": "RGB", "cloth": "1"}  # the official pngs come in several modes
        for image_id in FILE_ORDER:
            part_mask_path(root, image_id, "skin").parent.mkdir(parents=True, exist_ok=True)
            for part, mask in part_masks[image_id].items():
                save_part(root, image_id, part, mask, modes.get(part, "L"))
    if label_maps:  # merged maps as the official g_mask.py paints them: parts in order, later on top
        (root / LABEL_MAP_DIR).mkdir()
        for image_id in FILE_ORDER:
            label_map = np.zeros((SOURCE, SOURCE), dtype=np.uint8)
            for k, part in enumerate(MASK_PARTS):
                if part in part_masks[image_id]:
                    label_map[part_masks[image_id][part]] = k + 1
            Image.fromarray(label_map, mode="L").save(root / LABEL_MAP_DIR / f"{image_id}.png")
    return root


@pytest.fixture
def fake_root(tmp_path) -> Path:
    return make_fake_root(tmp_path / "CelebAMask-HQ")


def assert_solid(image: torch.Tensor, rgb: tuple[int, int, int], tol: float = 0.04) -> None:
    expected = torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 127.5 - 1
    assert (image - expected).abs().max() <= tol, (image.mean((1, 2)), expected.flatten())


# ------------------------------------------------------------------------------ attributes
def test_constants():
    assert len(PAPER_ATTRIBUTES) == 18
    assert PAPER_ATTRIBUTES[0] == "Bald" and PAPER_ATTRIBUTES[-1] == "Wearing_Hat"
    assert set(PAPER_ATTRIBUTES) <= set(HEADER)
    assert len(MASK_PARTS) == 18 and MASK_PARTS[0] == "skin" and MASK_PARTS[-1] == "cloth"
    assert set(COMPOSITE_PARTS) == set(MASK_PARTS) - {"skin"}


def test_read_attributes_paper_columns(fake_root):
    ids, attrs = read_attributes(fake_root / ATTRIBUTE_FILE)
    assert ids == FILE_ORDER
    assert attrs.dtype == torch.float32 and attrs.shape == (10, 18)
    assert attrs[0].tolist() == PAPER_0
    # image 1: Male, Bald, Eyeglasses
    assert attrs[1].tolist() == [1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0]
    # image 4 (Wearing_Hat, Male, Mustache)
    assert attrs[4].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1]
    assert attrs[3].sum() == 0


def test_read_attributes_column_selection(fake_root):
    ids, attrs = read_attributes(fake_root / ATTRIBUTE_FILE, ["Male", "Smiling", "Bald"])
    assert ids == FILE_ORDER
    assert attrs.tolist() == [  # rows in file order: 0, 1, 2, 3, 4, 5, 6, 2001, 7, 2003
        [0, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0],
        [0, 0, 0], [0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0],
    ]  # fmt: skip


def test_read_attributes_all_columns(fake_root):
    _, attrs = read_attributes(fake_root / ATTRIBUTE_FILE, names=None)
    assert attrs.shape == (10, 40)
    assert attrs[0].tolist() == [1.0 if v == "1" else 0.0 for v in ROW_0.split()]
    assert attrs[0].sum() == 10
    assert attrs[1].nonzero().flatten().tolist() == [HEADER.index(n) for n in ("Bald", "Eyeglasses", "Male")]


def test_read_attributes_missing_file(tmp_path):
    path = tmp_path / "nowhere" / ATTRIBUTE_FILE
    with pytest.raises(FileNotFoundError) as info:
        read_attributes(path)
    assert str(path) in str(info.value) and f"{IMAGE_DIR}/<id>.jpg" in str(info.value)


def test_read_attributes_unknown_name(fake_root):
    with pytest.raises(ValueError, match="Not_An_Attribute") as info:
        read_attributes(fake_root / ATTRIBUTE_FILE, ["Male", "Not_An_Attribute"])
    assert "Wearing_Necktie" in str(info.value)  # the known names are listed


@pytest.mark.parametrize(
    "bad_row, problem",
    [
        ("3.jpg  " + " ".join(["1"] * 39), "fields"),  # one value short
        ("3.jpg  " + " ".join(["1"] * 39 + ["0"]), "-1 or 1"),  # 0 is not a CelebA value
        ("3.png  " + " ".join(["1"] * 40), "<id>.jpg"),
        ("1.jpg  " + " ".join(["1"] * 40), "listed twice"),  # a duplicate id
    ],
)
def test_read_attributes_malformed_row(tmp_path, bad_row, problem):
    path = tmp_path / ATTRIBUTE_FILE
    rows = [f"{i}.jpg  {row_of(i)}" for i in (0, 1, 2)] + [bad_row]
    write_attribute_file(path, rows)
    with pytest.raises(ValueError, match=problem) as info:
        read_attributes(path)
    assert "line 6" in str(info.value) and str(path) in str(info.value)  # count, header, rows 3-5, then 6


def test_read_attributes_count_mismatch(tmp_path):
    path = tmp_path / ATTRIBUTE_FILE
    write_attribute_file(path, [f"{i}.jpg  {row_of(i)}" for i in (0, 1)], count=3)
    with pytest.raises(ValueError, match="line 1.*3 images.*2 rows"):
        read_attributes(path)


# ------------------------------------------------------------------------------ masks
def test_resize_nearest_convention():
    grid = np.arange(36).reshape(6, 6)
    out = resize_nearest(grid, 4)  # rows/cols floor((i + 0.5) * 6 / 4) = 0, 2, 3, 5
    assert out.tolist() == [[r * 6 + c for c in (0, 2, 3, 5)] for r in (0, 2, 3, 5)]
    torch_out = torch.nn.functional.interpolate(torch.tensor(grid, dtype=torch.float32)[None, None], size=4, mode="nearest-exact")
    assert torch_out[0, 0].long().tolist() == out.tolist()
    assert resize_nearest(np.array([[0, 1], [2, 3]]), 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    binary = np.random.default_rng(0).random((50, 50)) > 0.5
    assert set(np.unique(resize_nearest(binary, 17)).tolist()) <= {False, True}


def test_composite_mask_from_parts_excludes_skin(fake_root):
    mask = composite_mask_from_parts(fake_root, 0, 16)
    assert mask.dtype == torch.float32 and mask.shape == (1, 16, 16)
    assert np.array_equal(mask[0].numpy(), expected_mask_0(16))
    assert mask.sum() == 4 * 16 + 4 + 1 + 1 + 2 * 16  # hair, nose, 2 eye pixels, cloth
    assert mask[0, 10, 0] == 0  # skin only


def test_composite_mask_from_parts_nearest_resize(fake_root):
    mask = composite_mask_from_parts(fake_root, 0, 8)
    assert mask.shape == (1, 8, 8)
    assert np.array_equal(mask[0].numpy(), expected_mask_0(8))
    assert mask.sum() == 2 * 8 + 1 + 1 + 8


def test_composite_mask_from_parts_folder_and_absent_parts(fake_root):
    assert composite_mask_from_parts(fake_root, 1, 8).sum() == 0  # only skin
    assert composite_mask_from_parts(fake_root, 3, 8).sum() == 0  # no part file at all
    mask = composite_mask_from_parts(fake_root, 2001, 8)  # read from folder 1
    expected = np.zeros((8, 8), dtype=np.float32)
    expected[0:4, 0:4] = 1
    assert np.array_equal(mask[0].numpy(), expected)
    with pytest.raises(FileNotFoundError, match="part mask folder"):
        composite_mask_from_parts(fake_root, 4001, 8)  # folder 2 does not exist


def test_composite_mask_from_label_map():
    label_map = np.array([[0, 1, 2], [13, 1, 0], [18, 17, 1]], dtype=np.uint8)
    expected = [[0, 0, 1], [1, 0, 0], [1, 1, 0]]
    assert composite_mask_from_label_map(label_map, 3)[0].tolist() == expected
    assert composite_mask_from_label_map(torch.from_numpy(label_map).long(), 3)[0].tolist() == expected
    with pytest.raises(ValueError, match="0..18"):
        composite_mask_from_label_map(np.array([[0, 19]]), 2)
    with pytest.raises(ValueError, match="integer"):
        composite_mask_from_label_map(label_map.astype(np.float32), 3)


def test_label_map_and_parts_agree(tmp_path):
    root = make_fake_root(tmp_path / "both", parts=True, label_maps=True)
    for image_id in (0, 1, 2001):
        label_map = np.asarray(Image.open(root / LABEL_MAP_DIR / f"{image_id}.png"))
        for size in (16, 8):
            assert torch.equal(composite_mask_from_label_map(label_map, size), composite_mask_from_parts(root, image_id, size))
    maps = CelebAMaskHQDataset(root, image_size=8, masks="label_maps", size=1)
    assert maps.mask_source == "label_maps"
    assert np.array_equal(maps[0]["mask"][0].numpy(), expected_mask_0(8))


# ------------------------------------------------------------------------------ dataset
def test_dataset_items(fake_root):
    ds = CelebAMaskHQDataset(fake_root, "train", image_size=8, split_boundaries=(4, 7))
    assert len(ds) == 4 and ds.ids == [0, 1, 2, 3] and ds.mask_source == "parts"
    item = ds[0]
    assert set(item) == {"image", "mask", "attributes", "meta"}
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 8, 8)
    assert item["image"].min() >= -1 and item["image"].max() <= 1
    assert_solid(item["image"], COLOURS[0])
    assert item["mask"].dtype == torch.float32 and item["mask"].shape == (1, 8, 8)
    assert np.array_equal(item["mask"][0].numpy(), expected_mask_0(8))
    assert item["attributes"].dtype == torch.float32 and item["attributes"].tolist() == PAPER_0
    assert item["meta"] == {"index": 0, "image_id": 0}
    assert_solid(ds[1]["image"], COLOURS[1])
    assert ds[1]["mask"].sum() == 0
    assert ds[-1]["meta"] == {"index": 3, "image_id": 3}
    with pytest.raises(IndexError):
        ds[4]


def test_dataset_native_size_and_downscaling(fake_root):
    ds = CelebAMaskHQDataset(fake_root, "test", image_size=16, split_boundaries=(4, 7))
    assert ds.ids == [7, 2001, 2003]
    assert np.array_equal(CelebAMaskHQDataset(fake_root, image_size=16, size=1)[0]["mask"][0].numpy(), expected_mask_0(16))
    assert_solid(ds[1]["image"], COLOURS[2001])
    assert ds[1]["mask"].sum() == 8 * 8
    half = CelebAMaskHQDataset(fake_root, "test", image_size=8, split_boundaries=(4, 7))[2]["image"]
    assert half.shape == (3, 8, 8)
    assert (half[:, :, 0] + 1).abs().max() < 0.04 and (half[:, :, 7] - 1).abs().max() < 0.04  # black | white


def test_dataset_splits_and_size(fake_root):
    sizes = {split: len(CelebAMaskHQDataset(fake_root, split, image_size=8, split_boundaries=(4, 7))) for split in ("train", "val", "test")}
    assert sizes == {"train": 4, "val": 3, "test": 3}
    val = CelebAMaskHQDataset(fake_root, "val", image_size=8, split_boundaries=(4, 7))
    assert val.ids == [4, 5, 6]
    assert val.attributes[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1]  # image 4
    train = CelebAMaskHQDataset(fake_root, "train", image_size=8)  # default (24000, 27000): all train
    assert train.ids == SORTED_IDS
    small = CelebAMaskHQDataset(fake_root, "train", image_size=8, size=3)
    assert small.ids == [0, 1, 2] and small.attributes.shape == (3, 18)
    with pytest.raises(ValueError, match="empty"):
        CelebAMaskHQDataset(fake_root, "val", image_size=8)
    with pytest.raises(ValueError, match="size=11"):
        CelebAMaskHQDataset(fake_root, "train", image_size=8, size=11)
    with pytest.raises(ValueError, match="unknown split"):
        CelebAMaskHQDataset(fake_root, "validation")


def test_dataset_attribute_selection_and_modalities(fake_root):
    ds = CelebAMaskHQDataset(fake_root, image_size=8, modalities=("image", "attributes"), attributes=["Male", "Smiling"])
    item = ds[1]
    assert set(item) == {"image", "attributes", "meta"}
    assert item["attributes"].tolist() == [1, 0]
    assert ds.attributes.shape == (10, 2)
    with pytest.raises(ValueError, match="unknown modality"):
        CelebAMaskHQDataset(fake_root, modalities=("image", "text"))
    with pytest.raises(ValueError, match="Not_An_Attribute"):
        CelebAMaskHQDataset(fake_root, attributes=["Not_An_Attribute"])


def test_dataset_collate(fake_root):
    ds = CelebAMaskHQDataset(fake_root, image_size=8)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, 8, 8) and batch["mask"].shape == (4, 1, 8, 8)
    assert batch["attributes"].shape == (4, 18)
    assert batch["meta"]["image_id"].tolist() == [0, 1, 2, 3]
    assert batch["meta"]["index"].tolist() == [0, 1, 2, 3]


def test_dataset_cache(fake_root, tmp_path):
    cache = tmp_path / "cache"
    lazy = CelebAMaskHQDataset(fake_root, image_size=8)
    first = CelebAMaskHQDataset(fake_root, image_size=8, cache_dir=cache)
    assert not first.loaded_from_cache and os.path.isfile(first.cache_path)
    assert [p.name for p in cache.iterdir()] == [os.path.basename(first.cache_path)]  # no temporary file left
    assert first.images.dtype == torch.uint8 and first.images.shape == (10, 3, 8, 8)
    assert first.masks.dtype == torch.bool and first.masks.shape == (10, 1, 8, 8)
    second = CelebAMaskHQDataset(fake_root, image_size=8, cache_dir=cache)
    assert second.loaded_from_cache
    for i in range(len(lazy)):
        for name in ("image", "mask", "attributes"):
            assert torch.equal(second[i][name], lazy[i][name]), (i, name)
    other = CelebAMaskHQDataset(fake_root, image_size=8, cache_dir=cache, modalities=("image", "attributes"))
    assert not other.loaded_from_cache and other.cache_path != first.cache_path
    Path(first.cache_path).write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="corrupt"):
        CelebAMaskHQDataset(fake_root, image_size=8, cache_dir=cache)


# ------------------------------------------------------------------------------ layout errors
def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        CelebAMaskHQDataset(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value) and f"{IMAGE_DIR}/<id>.jpg" in str(info.value)


def test_missing_attribute_file(fake_root):
    (fake_root / ATTRIBUTE_FILE).unlink()
    with pytest.raises(FileNotFoundError) as info:
        CelebAMaskHQDataset(fake_root, image_size=8)
    message = str(info.value)
    assert str(fake_root / ATTRIBUTE_FILE) in message and f"{IMAGE_DIR}/<id>.jpg" in message and PART_MASK_DIR in message


def test_missing_image_directory_and_image(fake_root):
    (fake_root / IMAGE_DIR / "3.jpg").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CelebAMaskHQDataset(fake_root, image_size=8)
    assert str(fake_root / IMAGE_DIR / "3.jpg") in str(info.value) and ATTRIBUTE_FILE in str(info.value)
    assert len(CelebAMaskHQDataset(fake_root, image_size=8, size=3)) == 3  # 3.jpg is not needed
    shutil.rmtree(fake_root / IMAGE_DIR)
    with pytest.raises(FileNotFoundError) as info:
        CelebAMaskHQDataset(fake_root, image_size=8)
    assert str(fake_root / IMAGE_DIR) in str(info.value) and ATTRIBUTE_FILE in str(info.value)


def test_mask_requested_without_masks(tmp_path):
    root = make_fake_root(tmp_path / "no-masks", parts=False)
    for masks in ("auto", "parts", "label_maps"):
        with pytest.raises(FileNotFoundError) as info:
            CelebAMaskHQDataset(root, image_size=8, masks=masks)
        message = str(info.value)
        assert "masks are missing" in message and "modalities=['image', 'attributes']" in message
        assert str(root / (LABEL_MAP_DIR if masks == "label_maps" else PART_MASK_DIR)) in message
    ds = CelebAMaskHQDataset(root, image_size=8, modalities=("image", "attributes"))  # image+attributes mode
    assert len(ds) == 10 and "mask" not in ds[0] and ds.mask_source is None
    with pytest.raises(FileNotFoundError, match="part mask directory"):
        composite_mask_from_parts(root, 0, 8)


# ------------------------------------------------------------------------------ real data
DATA_ROOT = Path(os.environ.get("PYRO_DIFFMVAE_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
CELEBA_64 = DATA_ROOT / "CelebAMask-HQ-64"
SAMPLES = DATA_ROOT / "CelebAMask-HQ-samples"
needs_celeba = pytest.mark.skipif(
    not (CELEBA_64 / ATTRIBUTE_FILE).is_file(),
    reason=f"the real CelebAMask-HQ 64x64 copy is not at {CELEBA_64} (set PYRO_DIFFMVAE_DATA to the shared data folder)",
)
needs_samples = pytest.mark.skipif(
    not (SAMPLES / "0.png").is_file(),
    reason=f"the official CelebAMask-HQ label-map samples are not at {SAMPLES} (set PYRO_DIFFMVAE_DATA)",
)


def parse_rows_by_hand(path: Path) -> tuple[int, list[str], dict[int, list[str]]]:
    """(count, header, {id: values}) parsed independently of the module."""
    lines = path.read_text().splitlines()
    rows = {}
    for line in lines[2:]:
        if line.strip():
            name, *values = line.split()
            rows[int(name.removesuffix(".jpg"))] = values
    return int(lines[0]), lines[1].split(), rows


@pytest.fixture(scope="module")
def real_rows():
    return parse_rows_by_hand(CELEBA_64 / ATTRIBUTE_FILE)


@pytest.mark.data
@needs_celeba
def test_real_attribute_file(real_rows):
    count, header, rows = real_rows
    assert count == 30000 and len(rows) == 30000 and header == HEADER
    assert all(len(values) == 40 for values in rows.values())
    ids, attrs = read_attributes(CELEBA_64 / ATTRIBUTE_FILE, names=None)
    assert len(ids) == 30000 and ids[:3] == [0, 1, 2] and ids[-1] == 29999
    assert attrs.shape == (30000, 40)
    assert set(torch.unique(attrs).tolist()) == {0.0, 1.0}
    assert attrs[123].tolist() == [1.0 if v == "1" else 0.0 for v in rows[123]]


@pytest.mark.data
@needs_celeba
def test_real_paper_attributes_of_image_0(real_rows):
    _, header, rows = real_rows
    by_hand = [1.0 if rows[0][header.index(name)] == "1" else 0.0 for name in PAPER_ATTRIBUTES]
    ids, attrs = read_attributes(CELEBA_64 / ATTRIBUTE_FILE)
    assert ids[0] == 0 and attrs.shape == (30000, 18)
    assert attrs[0].tolist() == by_hand == PAPER_0  # 0.jpg: Blond_Hair, Heavy_Makeup, Mouth_Slightly_Open, Smiling, Wavy_Hair


@pytest.mark.data
@needs_celeba
def test_real_dataset_64(real_rows):
    _, header, rows = real_rows
    ds = CelebAMaskHQDataset(CELEBA_64, "test", image_size=64, modalities=("image", "attributes"), size=4)
    assert len(ds) == 4 and ds.ids == [27000, 27001, 27002, 27003]
    item = ds[0]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].std() > 0.1
    raw = np.asarray(Image.open(CELEBA_64 / IMAGE_DIR / "27000.jpg").convert("RGB"), dtype=np.float32)
    assert torch.allclose(item["image"], torch.from_numpy(raw).permute(2, 0, 1) / 127.5 - 1)  # no resampling at 64
    assert item["attributes"].tolist() == [1.0 if rows[27000][header.index(n)] == "1" else 0.0 for n in PAPER_ATTRIBUTES]
    assert item["meta"] == {"index": 0, "image_id": 27000}
    train = CelebAMaskHQDataset(CELEBA_64, "train", image_size=32, modalities=("image", "attributes"), size=2)
    assert train.ids == [0, 1] and train[1]["image"].shape == (3, 32, 32)
    with pytest.raises(FileNotFoundError, match="masks are missing"):  # the 64x64 copy has no part masks
        CelebAMaskHQDataset(CELEBA_64, "test", image_size=64, size=4)


@pytest.mark.data
@needs_samples
@pytest.mark.parametrize("sample", [0, 1, 2, 3])
def test_real_label_map_samples(sample):
    label_map = np.asarray(Image.open(SAMPLES / f"{sample}.png"))
    assert label_map.shape == (512, 512) and label_map.max() <= 18
    foreground = (label_map != 0) & (label_map != 1)  # independently: neither background nor skin
    fraction = foreground.mean()
    assert 0 < fraction < 1
    mask = composite_mask_from_label_map(label_map, 512)
    assert mask.shape == (1, 512, 512) and set(torch.unique(mask).tolist()) == {0.0, 1.0}
    assert mask.mean().item() == pytest.approx(fraction, abs=1e-6)
    small = composite_mask_from_label_map(label_map, 64)  # nearest: pixel 8i + 4 of each 8x8 block
    assert np.array_equal(small[0].numpy(), foreground[4::8, 4::8].astype(np.float32))
    assert small.mean().item() == pytest.approx(fraction, abs=0.02)
