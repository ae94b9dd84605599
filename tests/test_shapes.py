"""The embedded Shapes data set: determinism, factor/caption/attribute consistency, the mask is the
drawn shape, value ranges, the on-disk cache, input checks and batching."""

import math
import os

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from pyro_diffmvae.data import shapes as sh
from pyro_diffmvae.data.shapes import (
    CAPTION_LENGTH,
    FACTOR_SIZES,
    FACTORS,
    NUM_ATTRIBUTES,
    VOCAB,
    ShapesDataset,
    attributes_to_factors,
    caption,
    detokenize,
    factor_combinations,
    factors_to_attributes,
    generate_shapes,
    parse_caption,
    render,
    tokenize,
)

S = 32


@pytest.fixture(scope="module")
def all_combos():
    """One example of each of the 324 factor combinations (n = 324 gives each exactly once)."""
    return generate_shapes(324, S, seed=3)


# ------------------------------------------------------------------------------ constants
def test_constants():
    assert list(FACTORS) == ["shape", "colour", "size", "horizontal", "vertical"]
    assert FACTOR_SIZES == (3, 6, 2, 3, 3) and NUM_ATTRIBUTES == 17 and CAPTION_LENGTH == 8
    assert VOCAB[0] == "<pad>" and len(set(VOCAB)) == len(VOCAB)
    assert all(w in VOCAB for words in FACTORS.values() for w in words)
    assert factor_combinations().shape == (324, 5)
    assert len({tuple(f.tolist()) for f in factor_combinations()}) == 324


# ------------------------------------------------------------------------------ determinism
def test_same_seed_same_data_different_seed_differs():
    a, b, c = generate_shapes(40, S, seed=5), generate_shapes(40, S, seed=5), generate_shapes(40, S, seed=6)
    assert a.keys() == {"image", "mask", "attributes", "text", "factors"}
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not torch.equal(a["image"], c["image"])
    assert not torch.equal(a["factors"], c["factors"])


def test_render_is_deterministic_and_chunk_independent():
    f = factor_combinations()[:10]
    x1, m1 = render(f, S, torch.Generator().manual_seed(1))
    x2, m2 = render(f, S, 1)
    assert torch.equal(x1, x2) and torch.equal(m1, m2)
    # the first rows do not depend on how many scenes are rendered after them in the same call
    x3, m3 = render(factor_combinations()[:4], S, 1)
    assert torch.equal(x3, x1[:4]) and torch.equal(m3, m1[:4])


def test_splits_are_disjoint():
    splits = {s: ShapesDataset(s, size=300, image_size=S, seed=0) for s in ("train", "val", "test")}
    hashes = {s: {hash(x.numpy().tobytes()) for x in d.images} for s, d in splits.items()}
    assert all(len(h) == 300 for h in hashes.values())  # no duplicate inside a split either
    assert not hashes["train"] & hashes["val"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["val"] & hashes["test"]
    # and the dataset's split seed is the derived seed
    assert torch.equal(splits["val"].images, sh._generate_compact(300, S, 1)["image"])


def test_factors_are_balanced():
    f = generate_shapes(2 * 324 + 5, 16, seed=0)["factors"]
    counts = torch.zeros(324, dtype=torch.long)
    codes = ((((f[:, 0] * 6 + f[:, 1]) * 2 + f[:, 2]) * 3 + f[:, 3]) * 3 + f[:, 4])
    counts.index_add_(0, codes, torch.ones_like(codes))
    assert counts.min() >= 2 and counts.max() <= 3


# ------------------------------------------------------------------- factors, captions, attributes
def test_caption_roundtrip_all_combinations():
    f = factor_combinations()
    caps = caption(f)
    assert len(set(caps)) == 324
    tokens = torch.stack([tokenize(c) for c in caps])
    assert tokens.shape == (324, CAPTION_LENGTH) and tokens.dtype == torch.int64
    assert torch.equal(parse_caption(tokens), f)
    for c, t, fi in zip(caps, tokens, f):
        assert torch.equal(parse_caption(t), fi)
        assert detokenize(t) == c
        assert len(c.split()) == 8
    assert caption(torch.tensor([0, 0, 0, 0, 0])) == "a small red circle at the top left"
    assert caption(torch.tensor([2, 5, 1, 2, 2])) == "a large cyan triangle at the bottom right"


def test_attributes_roundtrip_all_combinations():
    f = factor_combinations()
    a = factors_to_attributes(f)
    assert a.shape == (324, 17) and a.dtype == torch.float32
    assert set(a.unique().tolist()) == {0.0, 1.0}
    for group in torch.split(a, FACTOR_SIZES, dim=-1):
        assert torch.equal(group.sum(-1), torch.ones(324))
    assert torch.equal(attributes_to_factors(a), f)
    # probabilities and logits are read by the argmax of each group
    noisy = a * 0.6 + 0.2 + 0.1 * torch.rand(a.shape)
    assert torch.equal(attributes_to_factors(noisy), f)
    assert torch.equal(attributes_to_factors(torch.logit(a.clamp(0.01, 0.99))), f)


def test_generated_modalities_agree(all_combos):
    d = all_combos
    assert torch.equal(attributes_to_factors(d["attributes"]), d["factors"])
    assert torch.equal(parse_caption(d["text"]), d["factors"])
    assert detokenize(d["text"]) == caption(d["factors"])
    assert len({tuple(f.tolist()) for f in d["factors"]}) == 324


def test_parse_caption_tolerates_malformed_captions():
    ids = {w: i for i, w in enumerate(VOCAB)}
    t = lambda s: torch.tensor([ids[w] for w in s.split()])  # noqa: E731
    # shuffled words are still read
    assert parse_caption(t("a red small circle the at left top")).tolist() == [0, 0, 0, 0, 0]
    # a missing factor and a contradictory factor give -1
    assert parse_caption(t("a small red red at the top left")).tolist() == [-1, 0, 0, 0, 0]
    assert parse_caption(t("a small red blue circle at top left")).tolist() == [0, -1, 0, 0, 0]
    # padding, out-of-vocabulary ids and a batch
    bad = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0], [99, -3, ids["square"], 0, 0, 0, 0, ids["large"]]])
    assert parse_caption(bad).tolist() == [[-1] * 5, [1, -1, 1, -1, -1]]


def test_tokenize_errors():
    with pytest.raises(ValueError, match="purple") as e:
        tokenize("a small purple circle at the top left")
    assert "vocabulary" in str(e.value) and "red" in str(e.value)
    with pytest.raises(ValueError, match="exactly 8 words"):
        tokenize("a small red circle")
    with pytest.raises(ValueError, match="shape"):
        caption(torch.tensor([3, 0, 0, 0, 0]))
    with pytest.raises(ValueError):
        factors_to_attributes(torch.tensor([[0, 6, 0, 0, 0]]))


# ------------------------------------------------------------------------------- the rendering
_CHANNELS = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.bool)


def test_mask_is_the_drawn_shape(all_combos):
    x01 = (all_combos["image"] + 1) / 2  # back to [0, 1]
    m = all_combos["mask"][:, 0].bool()
    for i, f in enumerate(all_combos["factors"]):
        on = _CHANNELS[f[1]]
        inside = x01[i][:, m[i]]  # (3, n_in)
        outside = x01[i][:, ~m[i]]
        assert inside.shape[1] > 0
        assert (inside[on] >= 0.84).all() and (inside[~on] == 0).all(), caption(f)
        # inside: one colour; outside: the muted, low-saturation background
        assert (inside.amax(1) - inside.amin(1)).max() <= 0.16
        assert outside.min() >= 0.19 and outside.max() <= 0.61
        assert (outside.amax(0) - outside.amin(0)).max() <= 0.09
        # no background pixel has the shape's channel pattern
        assert not ((outside[on] >= 0.7).all(0) & (outside[~on] <= 0.1).all(0)).any()


def test_mask_geometry(all_combos):
    m = all_combos["mask"][:, 0]
    f = all_combos["factors"]
    area = m.sum((1, 2))
    coords = (torch.arange(S, dtype=torch.float32) + 0.5) / S
    cy = (m.sum(2) * coords).sum(1) / area
    cx = (m.sum(1) * coords).sum(1) / area
    third = lambda c: (c * 3).floor().long().clamp(0, 2)  # noqa: E731
    assert torch.equal(third(cx), f[:, 3])  # horizontal: left / centre / right
    assert torch.equal(third(cy), f[:, 4])  # vertical: top / middle / bottom
    # bounding-box fill ratio identifies the shape
    rows, cols = m.any(2), m.any(1)
    h, w = rows.sum(1), cols.sum(1)
    fill = area / (h * w)
    for shape, lo, hi in ((0, 0.65, 0.90), (1, 1.0, 1.0), (2, 0.45, 0.68)):
        sel = f[:, 0] == shape
        assert fill[sel].min() >= lo and fill[sel].max() <= hi, (shape, fill[sel].min(), fill[sel].max())
    # a square's mask is square; the shape stays inside the image (it never touches a border row/col)
    sq = f[:, 0] == 1
    assert ((h[sq] - w[sq]).abs() <= 1).all()  # (up to the sub-pixel position)
    assert not (m[:, 0].any() or m[:, -1].any() or m[:, :, 0].any() or m[:, :, -1].any())
    # large > small for every shape (compare the smallest large with the largest small)
    for shape in range(3):
        small, large = area[(f[:, 0] == shape) & (f[:, 2] == 0)], area[(f[:, 0] == shape) & (f[:, 2] == 1)]
        assert large.min() > 1.4 * small.max()
    # and the areas are close to the ideal continuous areas
    r = torch.tensor(sh.SIZE_HALF_EXTENTS)[f[:, 2]] * S
    ideal = torch.stack([math.pi * r**2, 4 * r**2, 1.5 * r**2], -1).gather(1, f[:, :1]).squeeze(1)
    assert ((area - ideal).abs() / ideal).max() < 0.35


@pytest.mark.parametrize("size", [16, 64])
def test_other_image_sizes(size):
    d = generate_shapes(24, size, seed=1)
    assert d["image"].shape == (24, 3, size, size) and d["mask"].shape == (24, 1, size, size)
    assert (d["mask"].sum((1, 2, 3)) > 0).all()
    m = d["mask"][:, 0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    cx = (m.sum(1) * coords).sum(1) / m.sum((1, 2))
    assert torch.equal((cx * 3).floor().long(), d["factors"][:, 3])
    # the same seed renders the same scenes at every resolution: the factors agree
    assert torch.equal(d["factors"], generate_shapes(24, 32, seed=1)["factors"])


def test_dtypes_and_ranges():
    d = generate_shapes(50, S, seed=2)
    assert d["image"].dtype == torch.float32 and d["image"].shape == (50, 3, S, S)
    assert d["image"].min() >= -1 and d["image"].max() <= 1
    assert torch.allclose((d["image"] + 1) * 127.5, ((d["image"] + 1) * 127.5).round(), atol=1e-4)  # 8-bit levels
    assert d["mask"].dtype == torch.float32 and set(d["mask"].unique().tolist()) <= {0.0, 1.0}
    assert d["attributes"].dtype == torch.float32 and d["attributes"].shape == (50, 17)
    assert d["text"].dtype == torch.int64 and d["text"].shape == (50, 8)
    assert d["text"].min() >= 1 and d["text"].max() < len(VOCAB)
    assert d["factors"].dtype == torch.int64 and d["factors"].shape == (50, 5)
    with pytest.raises(ValueError, match="image_size"):
        generate_shapes(4, 8)


# ------------------------------------------------------------------------------------- dataset
def test_dataset_items_and_defaults():
    ds = ShapesDataset("val", size=20, image_size=S, seed=0)
    assert len(ds) == 20 and ds.factors.shape == (20, 5) and ds.factors.dtype == torch.int64
    item = ds[3]
    assert set(item) == {"image", "mask", "attributes", "text", "meta"}
    ref = generate_shapes(20, S, seed=1)  # val of seed 0 is the derived seed 0 * 1000 + 1
    for k in ("image", "mask", "attributes", "text"):
        assert torch.equal(item[k], ref[k][3]), k
    assert torch.equal(item["meta"]["factors"], ref["factors"][3]) and item["meta"]["index"] == 3
    assert ds[-1]["meta"]["index"] == 19
    with pytest.raises(IndexError):
        ds[20]
    sub = ShapesDataset("test", size=5, image_size=S, modalities=("image", "text"))
    assert set(sub[0]) == {"image", "text", "meta"}


def test_dataloader_batches():
    ds = ShapesDataset("train", size=10, image_size=S, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4, shuffle=False)))
    assert batch["image"].shape == (4, 3, S, S) and batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (4, 1, S, S)
    assert batch["attributes"].shape == (4, 17)
    assert batch["text"].shape == (4, 8) and batch["text"].dtype == torch.int64
    assert batch["meta"]["factors"].shape == (4, 5)
    assert batch["meta"]["index"].tolist() == [0, 1, 2, 3]
    assert torch.equal(default_collate([ds[i] for i in range(4)])["image"], batch["image"])


def test_bad_split_and_modality():
    with pytest.raises(ValueError, match="train.*val.*test"):
        ShapesDataset("training", size=4)
    with pytest.raises(ValueError, match="image.*mask.*attributes.*text") as e:
        ShapesDataset("train", size=4, modalities=("image", "caption"))
    assert "caption" in str(e.value)
    with pytest.raises(ValueError, match="size"):
        ShapesDataset("train", size=0)


# --------------------------------------------------------------------------------------- cache
def test_cache_roundtrip(tmp_path, monkeypatch):
    first = ShapesDataset("train", size=30, image_size=S, seed=4, cache_dir=tmp_path)
    assert not first.loaded_from_cache and os.path.exists(first.cache_path)
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(first.cache_path)]  # no temp file left

    def boom(*args, **kwargs):
        raise AssertionError("the cached data set must not be regenerated")

    monkeypatch.setattr(sh, "_generate_compact", boom)
    second = ShapesDataset("train", size=30, image_size=S, seed=4, cache_dir=tmp_path)
    assert second.loaded_from_cache
    for a, b in ((first.images, second.images), (first.masks, second.masks), (first.factors, second.factors)):
        assert torch.equal(a, b)
    for k in ("image", "mask", "attributes", "text"):
        assert torch.equal(first[7][k], second[7][k])
    monkeypatch.undo()

    # another key writes another file and leaves the first untouched
    before = open(first.cache_path, "rb").read()
    other = ShapesDataset("train", size=31, image_size=S, seed=4, cache_dir=tmp_path)
    assert other.cache_path != first.cache_path and len(list(tmp_path.iterdir())) == 2
    assert open(first.cache_path, "rb").read() == before


def test_corrupt_cache_gives_clear_error(tmp_path):
    ds = ShapesDataset("val", size=8, image_size=S, seed=0, cache_dir=tmp_path)
    with open(ds.cache_path, "wb") as fh:
        fh.write(b"not a torch file")
    with pytest.raises(RuntimeError, match="corrupt") as e:
        ShapesDataset("val", size=8, image_size=S, seed=0, cache_dir=tmp_path)
    assert ds.cache_path in str(e.value)
    # a file holding another key is not overwritten
    other = ShapesDataset("test", size=8, image_size=S, seed=0, cache_dir=tmp_path)
    os.replace(other.cache_path, ds.cache_path)
    content = open(ds.cache_path, "rb").read()
    with pytest.raises(RuntimeError, match="key") as e:
        ShapesDataset("val", size=8, image_size=S, seed=0, cache_dir=tmp_path)
    assert ds.cache_path in str(e.value)
    assert open(ds.cache_path, "rb").read() == content
