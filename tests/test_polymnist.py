"""PolyMNIST: reading the published layout (values, labels, batching, cache, errors) and building it
from MNIST idx files and background photos (the crop/invert recipe, same label across modalities,
determinism, meta.json, refusal to overwrite), on tiny synthetic files and on the real data."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from pyro_diffmvae.data.polymnist import (
    DEFAULT_BACKGROUNDS,
    IMAGE_SHAPE,
    LAYOUT,
    POLYMNIST_MODALITIES,
    PolyMNISTDataset,
    build_polymnist,
    compose_polymnist_images,
    ensure_polymnist,
    load_mnist,
    read_idx,
)

SHARED_DATA = Path(os.environ.get("PYRO_DIFFMVAE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


# --------------------------------------------------------------------------- helpers / fixtures
def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def pixel_value(split_id: int, index: int, modality: int) -> np.ndarray:
    """The known content of a fake png: a constant image whose 3 channels encode where it comes from,
    plus one pixel at 0 and one at 255."""
    image = np.empty((28, 28, 3), dtype=np.uint8)
    image[:, :] = (10 + 40 * split_id, (20 + 10 * index) % 256, 100 + 30 * modality)
    image[0, 0] = 0
    image[27, 27] = 255
    return image


FAKE_COUNTS = {"train": 6, "test": 4}
FAKE_MODALITIES = ("m0", "m1", "m2")
FAKE_LABELS = {"train": [3, 1, 4, 1, 5, 9], "test": [2, 6, 5, 3]}


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    """A tiny PolyMNIST layout: 6 train / 4 test examples, 3 modalities, known pixels and labels."""
    root = tmp_path / "polymnist"
    for split_id, split in enumerate(("train", "test")):
        for k, modality in enumerate(FAKE_MODALITIES):
            for index, label in enumerate(FAKE_LABELS[split]):
                write_png(root / split / modality / f"{index}.{label}.png", pixel_value(split_id, index, k))
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) in the idx format of the MNIST distribution."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def make_fake_mnist(root: Path, num_train: int = 40, num_test: int = 12) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Fake MNIST idx files in torchvision's layout ``<root>/MNIST/raw``: random digits with 4 labels;
    digit 0 of each split has pixel (5, 5) = 128 (bright, just above the threshold), (5, 6) = 127
    (dark, just below), (5, 7) = 255 and (5, 8) = 0."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(123)
    data = {}
    for split, count, (image_file, label_file) in (
        ("train", num_train, ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")),
        ("test", num_test, ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")),
    ):
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        images[0, 5, 5:9] = (128, 127, 255, 0)
        labels = np.arange(count, dtype=np.uint8) % 4
        write_idx(raw / image_file, images)
        write_idx(raw / label_file, labels)
        data[split] = (images, labels.astype(np.int64))
    return data


BACKGROUND_FILES = ("constant.png", "gradient.png", "noise.jpg")


def make_backgrounds(folder: Path) -> dict[str, np.ndarray]:
    """Three small backgrounds: a constant colour, a gradient (every pixel distinct) and a jpg."""
    folder.mkdir(parents=True)
    constant = np.empty((30, 31, 3), dtype=np.uint8)
    constant[:] = (10, 100, 200)
    rows, cols = np.meshgrid(np.arange(40), np.arange(50), indexing="ij")
    gradient = np.stack([rows * 5, cols * 5, (rows + cols) % 256], -1).astype(np.uint8)
    noise = np.random.default_rng(7).integers(0, 256, size=(36, 45, 3), dtype=np.uint8)
    for name, array in zip(BACKGROUND_FILES, (constant, gradient, noise)):
        Image.fromarray(array).save(folder / name, quality=95)
    # the jpg as decoded (lossy): what the builder crops from
    with Image.open(folder / "noise.jpg") as image:
        decoded_noise = np.asarray(image.convert("RGB"))
    return {"constant.png": constant, "gradient.png": gradient, "noise.jpg": decoded_noise}


@pytest.fixture
def synthetic_sources(tmp_path: Path):
    mnist = make_fake_mnist(tmp_path / "mnist")
    backgrounds = make_backgrounds(tmp_path / "backgrounds")
    return tmp_path / "mnist", tmp_path / "backgrounds", mnist, backgrounds


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB" and image.size == (28, 28)
        return np.asarray(image)


# ------------------------------------------------------------------------------ constants
def test_constants():
    assert POLYMNIST_MODALITIES == ("m0", "m1", "m2", "m3", "m4")
    assert IMAGE_SHAPE == (3, 28, 28)
    assert LAYOUT == "<root>/{train,test}/m<k>/<index>.<label>.png"
    assert len(DEFAULT_BACKGROUNDS) == 5 and len(set(DEFAULT_BACKGROUNDS)) == 5
    assert DEFAULT_BACKGROUNDS[0].startswith("00flowers") and DEFAULT_BACKGROUNDS[2].startswith("02lena")
    assert not any(name.startswith("01") for name in DEFAULT_BACKGROUNDS)  # The Scream is unavailable


# ------------------------------------------------------------------------------ reading
@pytest.mark.parametrize("split_id, split", [(0, "train"), (1, "test")])
def test_dataset_counts_shapes_values_and_labels(fake_root, split_id, split):
    ds = PolyMNISTDataset(fake_root, split, modalities=FAKE_MODALITIES)
    assert len(ds) == FAKE_COUNTS[split]
    assert ds.labels.tolist() == FAKE_LABELS[split]
    assert ds.file_indices.tolist() == list(range(FAKE_COUNTS[split]))
    for i in range(len(ds)):
        item = ds[i]
        assert set(item) == {*FAKE_MODALITIES, "meta"}
        assert item["meta"]["index"] == i
        assert item["meta"]["label"].dtype == torch.int64 and item["meta"]["label"].dim() == 0
        assert int(item["meta"]["label"]) == FAKE_LABELS[split][i]
        for k, name in enumerate(FAKE_MODALITIES):
            x = item[name]
            assert x.shape == (3, 28, 28) and x.dtype == torch.float32
            assert x.min() >= -1.0 and x.max() <= 1.0
            assert x[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]  # 0 -> -1
            assert x[:, 27, 27].tolist() == [1.0, 1.0, 1.0]  # 255 -> 1
            expected = torch.tensor(pixel_value(split_id, i, k)[14, 14], dtype=torch.float32) / 127.5 - 1
            assert torch.equal(x[:, 14, 14], expected)  # channel order and exact scaling u / 127.5 - 1
            assert torch.equal(ds.images[name][i].permute(1, 2, 0), torch.from_numpy(pixel_value(split_id, i, k)))
    assert torch.equal(ds[-1]["m0"], ds[len(ds) - 1]["m0"])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_modalities_as_count_and_subset_and_size(fake_root):
    ds = PolyMNISTDataset(fake_root, "train", modalities=2, size=4)
    assert ds.modalities == ("m0", "m1") and len(ds) == 4
    assert set(ds[0]) == {"m0", "m1", "meta"}
    ds = PolyMNISTDataset(fake_root, "train", modalities=("m2",), size=1)
    assert set(ds[0]) == {"m2", "meta"} and ds.labels.tolist() == [3]
    # the default is the 5 PolyMNIST modalities: m3 is absent from the fake layout
    with pytest.raises(FileNotFoundError, match="m3"):
        PolyMNISTDataset(fake_root, "train")


def test_collate_shapes(fake_root):
    ds = PolyMNISTDataset(fake_root, "train", modalities=FAKE_MODALITIES)
    batch = default_collate([ds[i] for i in range(4)])
    for name in FAKE_MODALITIES:
        assert batch[name].shape == (4, 3, 28, 28) and batch[name].dtype == torch.float32
    assert batch["meta"]["label"].tolist() == FAKE_LABELS["train"][:4]
    assert batch["meta"]["label"].dtype == torch.int64
    assert batch["meta"]["index"].tolist() == [0, 1, 2, 3]
    loader_batch = next(iter(DataLoader(ds, batch_size=6, shuffle=False)))
    assert loader_batch["m1"].shape == (6, 3, 28, 28) and loader_batch["meta"]["label"].shape == (6,)


def test_examples_are_sorted_by_file_index(tmp_path):
    root = tmp_path / "root"
    for index, label in ((10, 7), (2, 1), (33, 0)):
        for k in range(2):
            write_png(root / "train" / f"m{k}" / f"{index}.{label}.png", pixel_value(0, index, k))
    ds = PolyMNISTDataset(root, "train", modalities=2)
    assert ds.file_indices.tolist() == [2, 10, 33] and ds.labels.tolist() == [1, 7, 0]


def test_cache_roundtrip(fake_root, tmp_path):
    cache = tmp_path / "cache"
    first = PolyMNISTDataset(fake_root, "test", modalities=FAKE_MODALITIES, cache_dir=cache)
    assert not first.loaded_from_cache and os.path.exists(first.cache_path)
    assert sorted(os.listdir(cache)) == [os.path.basename(first.cache_path)]  # no temp file left
    second = PolyMNISTDataset(fake_root, "test", modalities=FAKE_MODALITIES, cache_dir=cache)
    assert second.loaded_from_cache and second.cache_path == first.cache_path
    for name in FAKE_MODALITIES:
        assert torch.equal(first.images[name], second.images[name])
    # another size or split is another key, hence another file
    third = PolyMNISTDataset(fake_root, "test", modalities=FAKE_MODALITIES, size=2, cache_dir=cache)
    assert not third.loaded_from_cache and third.cache_path != first.cache_path
    # a corrupt cache file is reported, not silently used
    Path(first.cache_path).write_bytes(b"not a torch file")
    with pytest.raises(RuntimeError, match="corrupt"):
        PolyMNISTDataset(fake_root, "test", modalities=FAKE_MODALITIES, cache_dir=cache)


# ------------------------------------------------------------------------------ reading: errors
def test_missing_root_split_or_modality(fake_root, tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        PolyMNISTDataset(missing, "train")
    assert str(missing) in str(info.value) and LAYOUT in str(info.value)

    empty_root = tmp_path / "empty"
    empty_root.mkdir()
    with pytest.raises(FileNotFoundError) as info:
        PolyMNISTDataset(empty_root, "test")
    assert str(empty_root / "test") in str(info.value) and LAYOUT in str(info.value)

    with pytest.raises(FileNotFoundError) as info:
        PolyMNISTDataset(fake_root, "train", modalities=("m0", "m7"))
    assert str(fake_root / "train" / "m7") in str(info.value) and LAYOUT in str(info.value)

    (fake_root / "train" / "m5").mkdir()
    with pytest.raises(FileNotFoundError) as info:
        PolyMNISTDataset(fake_root, "train", modalities=("m5",))
    assert str(fake_root / "train" / "m5") in str(info.value) and LAYOUT in str(info.value)


def test_mismatched_labels_across_modalities(fake_root):
    folder = fake_root / "train" / "m1"
    (folder / "4.5.png").rename(folder / "4.6.png")
    with pytest.raises(ValueError, match="labels disagree") as info:
        PolyMNISTDataset(fake_root, "train", modalities=FAKE_MODALITIES)
    assert "4.6.png" in str(info.value) and "4.5.png" in str(info.value)
    PolyMNISTDataset(fake_root, "train", modalities=("m0", "m2"))  # the other folders still agree


def test_mismatched_indices_across_modalities(fake_root):
    (fake_root / "test" / "m2" / "3.3.png").unlink()
    with pytest.raises(ValueError) as info:
        PolyMNISTDataset(fake_root, "test", modalities=FAKE_MODALITIES)
    assert str(fake_root / "test" / "m2") in str(info.value) and "[3]" in str(info.value)


def test_badly_named_or_sized_png(fake_root):
    write_png(fake_root / "train" / "m0" / "seven.png", pixel_value(0, 0, 0))
    with pytest.raises(ValueError, match="seven.png"):
        PolyMNISTDataset(fake_root, "train", modalities=FAKE_MODALITIES)
    (fake_root / "train" / "m0" / "seven.png").unlink()
    write_png(fake_root / "train" / "m1" / "2.4.png", np.zeros((32, 32, 3)))
    with pytest.raises(ValueError, match="2.4.png"):
        PolyMNISTDataset(fake_root, "train", modalities=FAKE_MODALITIES)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"split": "val"}, "unknown split"),
        ({"modalities": ("m0", "image")}, "bad modality names"),
        ({"modalities": ("m0", "m0")}, "distinct"),
        ({"modalities": ()}, "non-empty"),
        ({"modalities": 0}, ">= 1"),
        ({"size": 0}, "positive"),
        ({"size": -3}, "positive"),
        ({"size": 2.5}, "positive"),
        ({"size": 7}, "only 6"),
    ],
)
def test_bad_arguments(fake_root, kwargs, message):
    kwargs = {"modalities": FAKE_MODALITIES, **kwargs}
    with pytest.raises(ValueError, match=message):
        PolyMNISTDataset(fake_root, **kwargs)


# ------------------------------------------------------------------------------ building
def test_read_idx_and_load_mnist(synthetic_sources):
    mnist_root, _, mnist, _ = synthetic_sources
    images, labels, files = load_mnist(mnist_root, "train")
    assert images.dtype == np.uint8 and images.shape == (40, 28, 28)
    assert np.array_equal(images, mnist["train"][0]) and np.array_equal(labels, mnist["train"][1])
    assert files["images"].endswith("train-images-idx3-ubyte")
    assert read_idx(mnist_root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").tolist() == [0, 1, 2, 3] * 3
    bad = mnist_root / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    truncated = mnist_root / "truncated"
    truncated.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 5) + b"\x01\x02")
    with pytest.raises(ValueError, match="5 bytes"):
        read_idx(truncated)


def test_compose_inversion_rule_by_hand():
    background = np.arange(40 * 50 * 3, dtype=np.int64).reshape(40, 50, 3).astype(np.uint8)
    digits = np.zeros((2, 28, 28), dtype=np.uint8)
    digits[0, 3, 4] = 200
    digits[1, 10, 11] = 128  # 128 / 255 > 0.5: bright
    digits[1, 10, 12] = 127  # 127 / 255 < 0.5: dark
    out = compose_polymnist_images(digits, background, np.array([2, 12]), np.array([5, 22]))
    assert out.shape == (2, 28, 28, 3) and out.dtype == np.uint8
    assert out[0, 3, 4].tolist() == (255 - background[2 + 3, 5 + 4]).tolist()
    assert out[0, 0, 0].tolist() == background[2, 5].tolist()
    assert out[1, 10, 11].tolist() == (255 - background[22, 33]).tolist()
    assert out[1, 10, 12].tolist() == background[22, 34].tolist()
    # everywhere else the crop itself
    expected = background[12:40, 22:50].copy()
    expected[10, 11] = 255 - expected[10, 11]
    assert np.array_equal(out[1], expected)
    with pytest.raises(ValueError, match="out of range"):
        compose_polymnist_images(digits, background, np.array([0, 13]), np.array([0, 0]))


def build(sources, out_root: Path, **kwargs) -> dict:
    mnist_root, backgrounds_dir, _, _ = sources
    kwargs = {"backgrounds": BACKGROUND_FILES, "num_train": 20, "num_test": 8, **kwargs}
    return build_polymnist(mnist_root, backgrounds_dir, out_root, **kwargs)


def test_build_writes_the_layout_and_follows_the_recipe(synthetic_sources, tmp_path):
    _, _, mnist, backgrounds = synthetic_sources
    out = tmp_path / "built"
    meta = build(synthetic_sources, out, seed=5)
    counts = {"train": 20, "test": 8}
    records = np.load(out / "mnist_indices.npz")
    for split in ("train", "test"):
        images, labels = mnist[split]
        mnist_index = records[f"{split}_mnist_index"]
        crops = records[f"{split}_crop_top_left"]
        assert mnist_index.shape == (3, counts[split]) and crops.shape == (3, counts[split], 2)
        assert mnist_index[0].tolist() == list(range(counts[split]))  # m0 of example i is MNIST digit i
        for k, name in enumerate(BACKGROUND_FILES):
            files = sorted(os.listdir(out / split / f"m{k}"))
            assert files == sorted(f"{i}.{labels[i]}.png" for i in range(counts[split]))
            # each modality shows a digit with the example's label
            assert labels[mnist_index[k]].tolist() == labels[: counts[split]].tolist()
            background = backgrounds[name]
            for i in range(counts[split]):
                png = read_png(out / split / f"m{k}" / f"{i}.{labels[i]}.png")
                top, left = crops[k, i]
                crop = background[top : top + 28, left : left + 28]
                bright = images[mnist_index[k, i]] > 127
                assert np.array_equal(png, np.where(bright[..., None], 255 - crop, crop))
        # k > 0 draws other instances of the label (with 10 digits per label, not all the same)
        assert (mnist_index[1] != mnist_index[0]).any() and (mnist_index[2] != mnist_index[0]).any()
    # the constant background makes the rule visible without the recorded crops: digit 0 of each split
    # has pixel (5, 5) = 128 (bright), (5, 6) = 127 (dark), (5, 7) = 255 (bright), (5, 8) = 0 (dark)
    png = read_png(out / "train" / "m0" / f"0.{mnist['train'][1][0]}.png")
    assert png[5, 5].tolist() == [245, 155, 55]
    assert png[5, 6].tolist() == [10, 100, 200]
    assert png[5, 7].tolist() == [245, 155, 55]
    assert png[5, 8].tolist() == [10, 100, 200]
    # and it loads back with the labels of the MNIST digits of m0
    ds = PolyMNISTDataset(out, "train", modalities=3)
    assert ds.labels.tolist() == mnist["train"][1][:20].tolist()
    assert ds[0]["m0"][:, 5, 5].tolist() == pytest.approx([245 / 127.5 - 1, 155 / 127.5 - 1, 55 / 127.5 - 1])
    assert meta == json.loads((out / "meta.json").read_text())


def test_build_meta_json(synthetic_sources, tmp_path):
    mnist_root = synthetic_sources[0]
    out = tmp_path / "built"
    build(synthetic_sources, out, seed=11, num_train=None, num_test=5)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backgrounds"] == {"m0": "constant.png", "m1": "gradient.png", "m2": "noise.jpg"}
    assert meta["modalities"] == ["m0", "m1", "m2"]
    assert meta["seed"] == 11
    assert meta["counts"] == {"train": 40, "test": 5}  # None: all of the split
    assert meta["layout"] == LAYOUT
    assert meta["mnist_source"]["root"] == str(mnist_root.resolve())
    assert meta["mnist_source"]["available"] == {"train": 40, "test": 12}
    assert meta["mnist_source"]["files"]["test"]["labels"].endswith("t10k-labels-idx1-ubyte")
    assert meta["background_sizes"]["m0"] == [31, 30]  # width, height
    assert len(os.listdir(out / "train" / "m2")) == 40 and len(os.listdir(out / "test" / "m0")) == 5


def test_build_is_deterministic_from_the_seed(synthetic_sources, tmp_path):
    build(synthetic_sources, tmp_path / "a", seed=3)
    build(synthetic_sources, tmp_path / "b", seed=3)
    build(synthetic_sources, tmp_path / "c", seed=4)
    a, b, c = (np.load(tmp_path / name / "mnist_indices.npz") for name in "abc")
    for key in a.files:
        assert np.array_equal(a[key], b[key])
    assert not np.array_equal(a["train_crop_top_left"], c["train_crop_top_left"])
    for split in ("train", "test"):
        da = PolyMNISTDataset(tmp_path / "a", split, modalities=3)
        db = PolyMNISTDataset(tmp_path / "b", split, modalities=3)
        dc = PolyMNISTDataset(tmp_path / "c", split, modalities=3)
        assert torch.equal(da.labels, dc.labels)  # the labels come from m0's MNIST digits, not the seed
        for k in range(3):
            assert torch.equal(da.images[f"m{k}"], db.images[f"m{k}"])
        assert not torch.equal(da.images["m1"], dc.images["m1"])


def test_build_refuses_to_overwrite(synthetic_sources, tmp_path):
    out = tmp_path / "built"
    build(synthetic_sources, out)
    before = sorted(os.listdir(out / "train" / "m0"))
    with pytest.raises(FileExistsError, match=str(out)):
        build(synthetic_sources, out, seed=1)
    assert sorted(os.listdir(out / "train" / "m0")) == before
    # an existing folder without a layout is fine; nothing is left beside it
    other = tmp_path / "existing"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    build(synthetic_sources, other)
    assert sorted(os.listdir(other)) == ["meta.json", "mnist_indices.npz", "notes.txt", "test", "train"]
    assert not [name for name in os.listdir(tmp_path) if ".building-" in name]
    # a folder holding only part of a layout is refused too
    partial = tmp_path / "partial"
    (partial / "test").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="partial"):
        build(synthetic_sources, partial)


def test_build_bad_arguments(synthetic_sources, tmp_path):
    with pytest.raises(ValueError, match="num_train"):
        build(synthetic_sources, tmp_path / "o1", num_train=0)
    with pytest.raises(ValueError, match="num_test"):
        build(synthetic_sources, tmp_path / "o2", num_test=13)
    with pytest.raises(ValueError, match="seed"):
        build(synthetic_sources, tmp_path / "o3", seed=-1)
    with pytest.raises(TypeError, match="one per modality"):
        build(synthetic_sources, tmp_path / "o3", backgrounds="constant.png")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        build(synthetic_sources, tmp_path / "o4", backgrounds=("constant.png", "missing.jpg"))
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        build_polymnist(tmp_path / "no_mnist", synthetic_sources[1], tmp_path / "o5", backgrounds=BACKGROUND_FILES)
    small = synthetic_sources[1] / "small.png"
    Image.fromarray(np.zeros((20, 40, 3), dtype=np.uint8)).save(small)
    with pytest.raises(ValueError, match="smaller than 28x28"):
        build(synthetic_sources, tmp_path / "o6", backgrounds=("small.png",))
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 7))


# ------------------------------------------------------------------------------ building once, concurrently
ENSURE_ARGS = {"backgrounds": BACKGROUND_FILES, "num_train": 20, "num_test": 8, "seed": 2}


def ensure_in_child(mnist_root, backgrounds_dir, out_root, log, barrier=None, crash_after=None):
    """Run in a spawned process: ``ensure_polymnist(**ENSURE_ARGS)``, with ``build_polymnist`` wrapped to
    append ``start <pid>`` / ``end <pid>`` to ``log`` and to wait 0.5 s before building (so that two
    processes checking and building without a lock would both build). With ``crash_after``, the process
    dies (``os._exit(3)``, no clean-up) when composing its ``crash_after + 1``-th chunk of images.
    Returns ``ensure_polymnist``'s result through the exit code 0 and ``<log>.<pid>.json``."""
    import pyro_diffmvae.data.polymnist as P

    real_build, real_compose = P.build_polymnist, P.compose_polymnist_images
    composed = []

    def logged_build(*args, **kwargs):
        with open(log, "a") as fh:
            fh.write(f"start {os.getpid()}\n")
        time.sleep(0.5)
        meta = real_build(*args, **kwargs)
        with open(log, "a") as fh:
            fh.write(f"end {os.getpid()}\n")
        return meta

    def crashing_compose(*args, **kwargs):
        composed.append(1)
        if len(composed) > crash_after:
            os._exit(3)
        return real_compose(*args, **kwargs)

    P.build_polymnist = logged_build
    if crash_after is not None:
        P.compose_polymnist_images = crashing_compose
    if barrier is not None:
        barrier.wait(timeout=120)
    meta, built = P.ensure_polymnist(mnist_root, backgrounds_dir, out_root, **ENSURE_ARGS)
    Path(f"{log}.{os.getpid()}.json").write_text(json.dumps({"built": built, "meta": meta}))


def run_children(count, sources, out_root, log, **kwargs):
    """Start ``count`` spawned :func:`ensure_in_child` processes (released together by a barrier when
    more than one); return ``{pid: (exit code, result or None)}``."""
    mnist_root, backgrounds_dir, _, _ = sources
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(count) if count > 1 else None
    procs = [ctx.Process(target=ensure_in_child, args=(str(mnist_root), str(backgrounds_dir), str(out_root), str(log), barrier),
                         kwargs=kwargs) for _ in range(count)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    out = {}
    for p in procs:
        if p.is_alive():
            p.kill()
        result = Path(f"{log}.{p.pid}.json")
        out[p.pid] = (p.exitcode, json.loads(result.read_text()) if result.exists() else None)
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def staging_folders(out_root: Path) -> list[Path]:
    return sorted(out_root.parent.glob(f".{out_root.name}.building-*"))


def test_concurrent_ensure_builds_once_and_equals_a_single_build(synthetic_sources, tmp_path):
    out, log = tmp_path / "cache" / "polymnist_seed2_n20", tmp_path / "builds.log"
    children = run_children(2, synthetic_sources, out, log)
    assert [code for code, _ in children.values()] == [0, 0], children
    built = [pid for pid, (_, result) in children.items() if result["built"]]
    assert len(built) == 1, children  # the other one waited for the lock and found meta.json
    assert log.read_text().splitlines() == [f"start {built[0]}", f"end {built[0]}"]  # build_polymnist ran once
    metas = [result["meta"] for _, result in children.values()]
    assert metas[0] == metas[1] == json.loads((out / "meta.json").read_text())
    # the same files, byte for byte, as a build by a single process
    single = tmp_path / "single"
    build(synthetic_sources, single, seed=2)
    assert tree_bytes(out) == tree_bytes(single)
    assert not staging_folders(out) and (tmp_path / "cache" / "polymnist_seed2_n20.lock").is_file()
    assert sorted(os.listdir(tmp_path / "cache")) == ["polymnist_seed2_n20", "polymnist_seed2_n20.lock"]


def test_a_crashed_build_is_not_taken_as_complete(synthetic_sources, tmp_path):
    mnist_root, backgrounds_dir, _, _ = synthetic_sources
    out, log = tmp_path / "cache" / "polymnist", tmp_path / "builds.log"
    # the build dies (holding the lock) after composing 2 of its 6 chunks (3 modalities x 2 splits)
    ((pid, (code, result)),) = run_children(1, synthetic_sources, out, log, crash_after=2).items()
    assert code == 3 and result is None
    assert log.read_text().splitlines() == [f"start {pid}"]
    (staging,) = staging_folders(out)  # its half-written staging folder is left behind ...
    assert len(os.listdir(staging / "train" / "m1")) == 20 and not os.listdir(staging / "train" / "m2")
    assert not out.exists()  # ... and nothing at out_root
    # the lock died with the process; the next call builds afresh and removes the leftover
    meta, built = ensure_polymnist(mnist_root, backgrounds_dir, out, timeout=30, **ENSURE_ARGS)
    assert built and not staging_folders(out)
    single = tmp_path / "single"
    build(synthetic_sources, single, seed=2)
    assert tree_bytes(out) == tree_bytes(single)
    assert ensure_polymnist(mnist_root, backgrounds_dir, out, timeout=30, **ENSURE_ARGS) == (meta, False)


def test_ensure_refuses_partial_layouts_and_builds_with_other_settings(synthetic_sources, tmp_path):
    mnist_root, backgrounds_dir, _, _ = synthetic_sources
    partial = tmp_path / "partial"  # e.g. a move of the parts into an existing folder that was interrupted
    (partial / "train" / "m0").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="no meta.json") as info:
        ensure_polymnist(mnist_root, backgrounds_dir, partial, **ENSURE_ARGS)
    assert str(partial / "train") in str(info.value)
    assert sorted(os.listdir(partial)) == ["train"]
    out = tmp_path / "built"
    meta, built = ensure_polymnist(mnist_root, backgrounds_dir, out, **ENSURE_ARGS)
    assert built and meta["counts"] == {"train": 20, "test": 8}
    with pytest.raises(ValueError, match=r"seed: 2 there, 3 asked"):
        ensure_polymnist(mnist_root, backgrounds_dir, out, **{**ENSURE_ARGS, "seed": 3})
    with pytest.raises(ValueError, match=r"counts: .*'train': 20.* there, .*'train': 40.* asked"):
        ensure_polymnist(mnist_root, backgrounds_dir, out, **{**ENSURE_ARGS, "num_train": None})  # None: all 40
    with pytest.raises(ValueError, match="backgrounds"):
        ensure_polymnist(mnist_root, backgrounds_dir, out, **{**ENSURE_ARGS, "backgrounds": BACKGROUND_FILES[:2]})
    full = tmp_path / "full"
    ensure_polymnist(mnist_root, backgrounds_dir, full, **{**ENSURE_ARGS, "num_train": None})
    assert ensure_polymnist(mnist_root, backgrounds_dir, full, **{**ENSURE_ARGS, "num_train": 40})[1] is False


# ------------------------------------------------------------------------------ real data
needs_real_data = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw").is_dir() or not (SHARED_DATA / "polymnist_backgrounds").is_dir(),
    reason=f"real data not found at {SHARED_DATA} (set PYRO_DIFFMVAE_DATA to the shared data folder)",
)


@pytest.mark.data
@needs_real_data
def test_build_from_real_mnist_and_backgrounds(tmp_path):
    backgrounds_dir = SHARED_DATA / "polymnist_backgrounds"
    assert all((backgrounds_dir / name).is_file() for name in DEFAULT_BACKGROUNDS)
    out = tmp_path / "polymnist"
    meta = build_polymnist(SHARED_DATA, backgrounds_dir, out, num_train=50, num_test=20)
    assert meta["backgrounds"] == dict(zip(POLYMNIST_MODALITIES, DEFAULT_BACKGROUNDS))
    records = np.load(out / "mnist_indices.npz")
    for split, count in (("train", 50), ("test", 20)):
        mnist_images, mnist_labels, _ = load_mnist(SHARED_DATA, split)
        ds = PolyMNISTDataset(out, split, cache_dir=tmp_path / "cache")
        assert len(ds) == count and ds.modalities == POLYMNIST_MODALITIES
        assert ds.labels.tolist() == mnist_labels[:count].tolist()  # the digits of m0 are MNIST 0..count-1
        for k in range(5):
            assert mnist_labels[records[f"{split}_mnist_index"][k]].tolist() == mnist_labels[:count].tolist()
        batch = default_collate([ds[i] for i in range(8)])
        assert batch["m4"].shape == (8, 3, 28, 28) and batch["meta"]["label"].shape == (8,)
        assert batch["m2"].min() >= -1 and batch["m2"].max() <= 1
        # the digit is visible: bright digit pixels are the inverted crop, so m0 differs from its crop there
        digit = mnist_images[0] > 127
        image = ds.images["m0"][0].permute(1, 2, 0).numpy()
        top, left = records[f"{split}_crop_top_left"][0, 0]
        with Image.open(backgrounds_dir / DEFAULT_BACKGROUNDS[0]) as photo:
            crop = np.asarray(photo.convert("RGB"))[top : top + 28, left : left + 28]
        assert np.array_equal(image, np.where(digit[..., None], 255 - crop, crop))
    assert PolyMNISTDataset(out, "test", cache_dir=tmp_path / "cache").loaded_from_cache
