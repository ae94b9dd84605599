"""Tests of the CUB image-caption data set (:mod:`pyro_diffmvae.data.cub`) and the text networks
(:mod:`pyro_diffmvae.nets.text`): a hand-made fake CUB layout, the real partial copy in
``../shared/data/birds`` (skipped when absent), and tiny random BERT / GPT-2 models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from pyro_diffmvae.data.cub import (
    CUBImageCaptionDataset,
    Vocabulary,
    crop_box,
    normalize_caption,
    tokenize_caption,
)
from pyro_diffmvae.nets.text import TokenSequenceDecoder, TokenSequenceEncoder

# ----------------------------------------------------------------------------- fake layout
# id: (class folder, file stem, is_training, (width, height), colour, red box (x, y, w, h) or None)
RED, BLUE, GREEN, YELLOW, WHITE = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 0), (255, 255, 255)
FAKE_IMAGES = {
    1: ("001.Red_Bird", "Red_Bird_0001", 1, (100, 80), BLUE, (30, 20, 40, 40)),
    2: ("001.Red_Bird", "Red_Bird_0002", 0, (60, 90), GREEN, None),
    3: ("002.Yellow_Bird", "Yellow_Bird_0003", 1, (120, 100), YELLOW, None),
    4: ("002.Yellow_Bird", "Yellow_Bird_0004", 0, (70, 70), WHITE, None),
    5: ("002.Yellow_Bird", "Yellow_Bird_0005", 1, (50, 50), WHITE, None),  # listed, absent on disk
}
FAKE_CAPTIONS = {
    1: [f"A red bird, number {k}." for k in range(10)],
    2: [f"This green bird has a zebra pattern {k}" for k in range(10)],  # "zebra": only in test captions
    3: [f"the yellow bird is small {k}!" for k in range(7)],  # 7 lines: accepted
    4: [f"a white bird with a zebra stripe {k}" for k in range(10)],
    5: [f"never read {k}" for k in range(10)],
}


@pytest.fixture
def fake_root(tmp_path: Path) -> Path:
    root = tmp_path / "birds"
    meta, text = root / "CUB_200_2011", root / "text"
    lines = {name: [] for name in ("images", "labels", "split", "boxes")}
    for i, (folder, stem, train, (w, h), colour, box) in FAKE_IMAGES.items():
        lines["images"].append(f"{i} {folder}/{stem}.jpg")
        lines["labels"].append(f"{i} {int(folder[:3])}")
        lines["split"].append(f"{i} {train}")
        bx = box if box is not None else (5, 5, w - 10, h - 10)
        lines["boxes"].append(f"{i} {float(bx[0])} {float(bx[1])} {float(bx[2])} {float(bx[3])}")
        (text / folder).mkdir(parents=True, exist_ok=True)
        (text / folder / f"{stem}.txt").write_text("\n".join(FAKE_CAPTIONS[i]) + "\n")
        if i == 5:
            continue
        (meta / "images" / folder).mkdir(parents=True, exist_ok=True)
        array = np.zeros((h, w, 3), np.uint8)
        array[:] = colour
        if box is not None:
            x, y, bw, bh = box
            array[y:y + bh, x:x + bw] = RED
        Image.fromarray(array).save(meta / "images" / folder / f"{stem}.jpg", quality=95)
    lines["split"] += ["6 1", "7 0"]  # like the real metadata: the split file lists more images
    (meta / "images.txt").write_text("\n".join(lines["images"]) + "\n")
    (meta / "image_class_labels.txt").write_text("\n".join(lines["labels"]) + "\n")
    (meta / "train_test_split.txt").write_text("\n".join(lines["split"]) + "\n")
    (meta / "bounding_boxes.txt").write_text("\n".join(lines["boxes"]) + "\n")
    (meta / "classes.txt").write_text("1 001.Red_Bird\n2 002.Yellow_Bird\n")
    return root


def _normalized(image_id: int) -> list[str]:
    return [normalize_caption(c) for c in FAKE_CAPTIONS[image_id]]


def _red_fraction(image: torch.Tensor) -> float:
    """The red share of a red-on-blue image: red (1, -1, -1) has r - b = 2, blue (-1, -1, 1) has -2 (linear,
    so resampling blur does not bias it)."""
    r, _, b = image
    return float(((r - b).mean() + 2) / 4)


def _seen_through(vocab: Vocabulary, caption: str) -> str:
    """The caption as the data set returns it (unknown words as <unk>)."""
    return vocab.decode(vocab.encode(caption, length=None))


# ------------------------------------------------------------------------------ fake: basics
def test_split_counts_and_skipped_images(fake_root):
    train = CUBImageCaptionDataset(fake_root, "train", image_size=16)
    test = CUBImageCaptionDataset(fake_root, "test", image_size=16, vocab=train.vocab)
    assert train.image_ids == [1, 3] and test.image_ids == [2, 4]
    assert len(train) == 2 and len(test) == 2
    assert train.num_listed == 3 and train.num_skipped == 1 and test.num_skipped == 0
    assert train.missing_image_ids == [5]
    assert train.class_ids == [1, 2] and train.class_names == {1: "001.Red_Bird", 2: "002.Yellow_Bird"}
    assert len(train.captions[1]) == 7  # a file with 7 lines is accepted
    assert len(CUBImageCaptionDataset(fake_root, "train", image_size=16, size=1)) == 1


def test_example_shapes_range_and_collate(fake_root):
    data = CUBImageCaptionDataset(fake_root, "train", image_size=16, caption_length=12)
    x = data[0]
    assert x["image"].shape == (3, 16, 16) and x["image"].dtype == torch.float32
    assert x["image"].min() >= -1 and x["image"].max() <= 1
    assert x["text"].shape == (12,) and x["text"].dtype == torch.int64
    assert x["meta"]["index"] == 0 and x["meta"]["image_id"] == 1 and x["meta"]["class_id"] == 1
    assert data[-1]["meta"]["image_id"] == 3
    batch = default_collate([data[0], data[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["text"].shape == (2, 12)
    assert batch["meta"]["image_id"].tolist() == [1, 3]
    with pytest.raises(IndexError):
        data[2]
    # solid colours come through: image 3 is yellow = (1, 1, -1) in [-1, 1] units
    yellow = data[1]["image"]
    assert torch.allclose(yellow.mean((1, 2)), torch.tensor([1.0, 1.0, -1.0]), atol=0.03)


def test_bbox_and_center_crops(fake_root):
    # image 1: 100x80 blue with a 40x40 red square at (30, 20)
    exact = CUBImageCaptionDataset(fake_root, "train", image_size=16, bbox_scale=1.0)[0]["image"]
    assert _red_fraction(exact) > 0.9
    default = CUBImageCaptionDataset(fake_root, "train", image_size=32)[0]["image"]  # 60x60 square around it
    assert abs(_red_fraction(default) - (40 / 60) ** 2) < 0.05
    center = CUBImageCaptionDataset(fake_root, "train", image_size=32, crop="center")[0]["image"]  # 80x80 centre
    assert abs(_red_fraction(center) - (40 / 80) ** 2) < 0.05
    assert crop_box(100, 80, (30, 20, 40, 40), 1.5) == (20, 10, 80, 70)
    assert crop_box(100, 80, (0, 0, 40, 40), 1.5) == (0, 0, 50, 50)  # clipped at the border
    assert crop_box(100, 80, None) == (10, 0, 90, 80)


def test_cache_round_trip(fake_root, tmp_path):
    first = CUBImageCaptionDataset(fake_root, "train", image_size=16, cache_dir=tmp_path / "cache")
    second = CUBImageCaptionDataset(fake_root, "train", image_size=16, cache_dir=tmp_path / "cache")
    assert not first.loaded_from_cache and second.loaded_from_cache
    assert torch.equal(first.images, second.images) and first.images.dtype == torch.uint8
    lazy = CUBImageCaptionDataset(fake_root, "train", image_size=16)
    assert lazy.images is None and torch.equal(lazy[1]["image"], second[1]["image"])


# ---------------------------------------------------------------------------- fake: captions
def test_caption_pairing_and_random_draws(fake_root):
    data = CUBImageCaptionDataset(fake_root, "train", image_size=16, caption_mode="random")
    torch.manual_seed(0)
    seen = {1: set(), 3: set()}
    for _ in range(40):
        for k in range(len(data)):
            x = data[k]
            image_id, j = x["meta"]["image_id"], x["meta"]["caption_index"]
            text = data.decode(x["text"])
            assert text == _normalized(image_id)[j]
            seen[image_id].add(text)
    assert len(seen[1]) > 3 and len(seen[3]) > 3  # the draws cover several lines
    assert seen[1] <= set(_normalized(1)) and seen[3] <= set(_normalized(3))


def test_fixed_first_and_all_caption_modes(fake_root):
    test = CUBImageCaptionDataset(fake_root, "test", image_size=16)  # evaluation default: fixed, first
    assert test.caption_mode == "fixed"
    texts = {test.decode(test[0]["text"]) for _ in range(10)}
    assert texts == {_seen_through(test.vocab, FAKE_CAPTIONS[2][0])}
    third = CUBImageCaptionDataset(fake_root, "test", image_size=16, caption_mode="fixed", caption_index=3)
    assert third.decode(third[1]["text"]) == _seen_through(test.vocab, FAKE_CAPTIONS[4][3]) and third[1]["meta"]["caption_index"] == 3
    first = CUBImageCaptionDataset(fake_root, "train", image_size=16, caption_mode="first")
    assert first.decode(first[1]["text"]) == _normalized(3)[0]
    every = CUBImageCaptionDataset(fake_root, "train", image_size=16, caption_mode="all")
    assert len(every) == 10 + 7
    pairs = [(every[k]["meta"]["image_id"], every.decode(every[k]["text"])) for k in range(len(every))]
    assert pairs == [(1, c) for c in _normalized(1)] + [(3, c) for c in _normalized(3)]


def test_vocabulary_from_training_captions_only(fake_root):
    train = CUBImageCaptionDataset(fake_root, "train", image_size=16)
    assert "zebra" not in train.vocab and "green" not in train.vocab and "red" in train.vocab
    assert "never" not in train.vocab  # image 5 is absent: its captions are not read
    test = CUBImageCaptionDataset(fake_root, "test", image_size=16, vocab=train.vocab)
    ids = test[0]["text"]
    assert int((ids == Vocabulary.unk_id).sum()) >= 3  # "this", "green", "zebra", "pattern" ...
    assert test.decode(ids) == "<unk> <unk> bird <unk> a <unk> <unk> 0"
    rebuilt = CUBImageCaptionDataset(fake_root, "test", image_size=16)  # no vocab: built from train, not test
    assert rebuilt.vocab == train.vocab


def test_vocabulary_encode_decode_pad_truncate_save(tmp_path):
    vocab = Vocabulary.build(["The bird's beak, orange/blue.", "the bird"])
    assert vocab.tokens[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # most frequent first ("the": 2), ties in alphabetical order
    assert vocab.tokens[4:] == ["the", ",", ".", "/", "beak", "bird", "bird's", "blue", "orange"]
    assert tokenize_caption("The bird's beak, orange/blue.") == ["the", "bird's", "beak", ",", "orange", "/", "blue", "."]
    ids = vocab.encode("The bird's beak, orange/blue.", length=12)
    assert ids.tolist()[0] == 1 and ids.tolist()[9] == 2 and ids.tolist()[10:] == [0, 0]
    assert vocab.decode(ids) == "the bird's beak , orange / blue ."
    short = vocab.encode("the bird's beak is long", length=4)
    assert short.tolist() == [1, vocab.id_of("the"), vocab.id_of("bird's"), 2]
    assert vocab.encode("the swan", length=5).tolist() == [1, vocab.id_of("the"), 3, 2, 0]
    assert vocab.decode(vocab.encode("the swan", length=None)) == "the <unk>"
    assert vocab.decode(torch.stack([ids, ids])) == ["the bird's beak , orange / blue ."] * 2
    assert len(vocab) == 4 + 9
    vocab.save(tmp_path / "vocab.json")
    loaded = Vocabulary.load(tmp_path / "vocab.json")
    assert loaded == vocab and len(loaded) == len(vocab)
    assert len(Vocabulary.build(["a a b"], min_count=2)) == 5  # only "a"
    with pytest.raises(ValueError):
        vocab.encode("x", length=1)


# ------------------------------------------------------------------------------ fake: errors
def test_missing_files_name_path_and_layout(fake_root):
    (fake_root / "CUB_200_2011" / "images.txt").unlink()
    with pytest.raises(FileNotFoundError) as info:
        CUBImageCaptionDataset(fake_root, "train")
    assert "images.txt" in str(info.value) and "expected layout" in str(info.value)
    with pytest.raises(FileNotFoundError) as info:
        CUBImageCaptionDataset(fake_root / "nowhere", "train")
    assert "nowhere" in str(info.value) and "expected layout" in str(info.value)


def test_missing_caption_folder_and_file(fake_root):
    caption = fake_root / "text" / "002.Yellow_Bird" / "Yellow_Bird_0003.txt"
    caption.unlink()
    with pytest.raises(FileNotFoundError) as info:
        CUBImageCaptionDataset(fake_root, "train")
    assert "Yellow_Bird_0003.txt" in str(info.value) and "expected layout" in str(info.value)
    (fake_root / "text").rename(fake_root / "captions")
    with pytest.raises(FileNotFoundError) as info:
        CUBImageCaptionDataset(fake_root, "train")
    assert str(fake_root / "text") in str(info.value)
    # explicit roots work
    caption_root = fake_root / "captions"
    (caption_root / "002.Yellow_Bird" / "Yellow_Bird_0003.txt").write_text("one line only\n")
    data = CUBImageCaptionDataset(images_root=fake_root / "CUB_200_2011", text_root=caption_root, split="train")
    assert data.captions[1] == ["one line only"]


def test_empty_caption_file_and_no_images(fake_root):
    empty = fake_root / "text" / "001.Red_Bird" / "Red_Bird_0001.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="Red_Bird_0001.txt"):
        CUBImageCaptionDataset(fake_root, "train")
    for path in (fake_root / "CUB_200_2011" / "images").rglob("*.jpg"):
        path.unlink()
    with pytest.raises(ValueError, match="none of the"):
        CUBImageCaptionDataset(fake_root, "test")


# ------------------------------------------------------------------------------- real data
def _real_birds() -> Path:
    env = os.environ.get("PYRO_DIFFMVAE_DATA")
    data = Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
    birds = data / "birds"
    if not (birds / "CUB_200_2011" / "images.txt").is_file() or not (birds / "text").is_dir():
        pytest.skip(f"real CUB data not found at {birds} (set PYRO_DIFFMVAE_DATA to the data folder holding birds/)")
    return birds


@pytest.mark.data
def test_real_cub_counts_and_split_sizes():
    birds = _real_birds()
    meta = birds / "CUB_200_2011"
    paths = dict(line.split() for line in (meta / "images.txt").read_text().splitlines() if line.strip())
    present = {i for i, p in paths.items() if (meta / "images" / p).is_file()}
    flags = dict(line.split() for line in (meta / "train_test_split.txt").read_text().splitlines() if line.strip())
    expected_train = sum(flags[i] == "1" for i in present)
    expected_test = sum(flags[i] == "0" for i in present)
    train = CUBImageCaptionDataset(birds, "train")
    test = CUBImageCaptionDataset(birds, "test", vocab=train.vocab)
    assert len(present) == 543
    assert len(train) + len(test) == 543
    assert (len(train), len(test)) == (expected_train, expected_test)
    assert set(train.image_ids) | set(test.image_ids) == {int(i) for i in present}
    x = train[0]
    assert x["image"].shape == (3, 64, 64) and x["text"].shape == (32,)
    assert -1 <= float(x["image"].min()) and float(x["image"].max()) <= 1
    assert float(x["image"].std()) > 0.05  # a photo, not a constant


@pytest.mark.data
def test_real_cub_image_1_captions():
    birds = _real_birds()
    test = CUBImageCaptionDataset(birds, "test")  # image 1 is a test image (train_test_split: "1 0")
    k = test.image_ids.index(1)
    path = birds / "text" / "001.Black_footed_Albatross" / "Black_Footed_Albatross_0046_18.txt"
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    assert len(lines) == 10 and test.captions[k] == lines
    x = test[k]
    assert x["meta"]["image_id"] == 1 and x["image"].shape == (3, 64, 64)
    assert test.decode(x["text"]) == " ".join(tokenize_caption(lines[0])[:30])  # <bos>, <eos> + 30 tokens


# ------------------------------------------------------------------------ nets: token models
def test_token_encoder_shapes_and_pad_invariance():
    torch.manual_seed(0)
    enc = TokenSequenceEncoder(vocab_size=50, length=10, latent_dim=6, embed_dim=16, hidden=32).eval()
    tokens = torch.randint(4, 50, (3, 10))
    tokens[:, 0], tokens[0, 6:], tokens[1, 4:] = 1, 0, 0
    mu, logvar = enc(tokens)
    assert mu.shape == (3, 6) and logvar.shape == (3, 6)
    # the tokens in the pad positions do not matter when the mask says so
    noisy = torch.where(tokens == 0, torch.randint(4, 50, tokens.shape), tokens)
    mu2, logvar2 = enc(noisy, mask=tokens != 0)
    assert torch.allclose(mu, mu2, atol=1e-6) and torch.allclose(logvar, logvar2, atol=1e-6)
    # more padding (a longer encoder with the same weights) does not change the output
    longer = TokenSequenceEncoder(vocab_size=50, length=14, latent_dim=6, embed_dim=16, hidden=32).eval()
    state = enc.state_dict()
    state["position"] = torch.cat([state["position"], torch.randn(4, 16)])
    longer.load_state_dict(state)
    mu3, _ = longer(torch.cat([tokens[:2], torch.zeros(2, 4, dtype=torch.long)], 1))
    assert torch.allclose(mu[:2], mu3, atol=1e-5)
    # a real token does matter
    changed = tokens.clone()
    changed[0, 2] = (changed[0, 2] + 1 - 4) % 46 + 4
    assert not torch.allclose(enc(changed)[0][0], mu[0])


def test_token_decoder_shapes_and_log_prob():
    torch.manual_seed(0)
    dec = TokenSequenceDecoder(latent_dim=6, length=10, vocab_size=50, hidden=32)
    z = torch.randn(3, 6)
    logits = dec(z)
    assert logits.shape == (3, 10, 50)
    tokens = torch.randint(0, 50, (3, 10))
    manual = logits.log_softmax(-1)[torch.arange(3)[:, None], torch.arange(10), tokens].sum(-1)
    assert torch.allclose(dec.log_prob(z, tokens), manual, atol=1e-5)
    assert not torch.allclose(dec(z + 1.0), logits)
    assert dec.generate(z).shape == (3, 10) and torch.equal(dec.generate(z), logits.argmax(-1))


# ----------------------------------------------------------------- nets: BERT / GPT-2 pieces
def _tiny_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_bert_encoder_shapes_and_mask():
    from pyro_diffmvae.nets.text import BertTextEncoder

    enc = BertTextEncoder(_tiny_bert(), latent_dim=8).eval()
    ids = torch.randint(5, 100, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 7:] = 0
    mu, logvar = enc(ids, mask)
    assert mu.shape == (3, 8) and logvar.shape == (3, 8)
    other = ids.clone()
    other[0, 7:] = 3  # masked positions do not matter
    assert torch.allclose(enc(other, mask)[0], mu, atol=1e-5)
    other[0, 3] = 4  # an attended one does
    assert not torch.allclose(enc(other, mask)[0][0], mu[0])


@pytest.mark.parametrize("injection", ["embedding", "memory", "both"])
def test_gpt2_decoder_log_prob_and_z_injection(injection):
    from pyro_diffmvae.nets.text import GPT2TextDecoder

    dec = GPT2TextDecoder(_tiny_gpt2(), latent_dim=8, injection=injection).eval()
    torch.manual_seed(1)
    z = torch.randn(2, 8)
    ids = torch.randint(3, 100, (2, 9))
    ids[:, 0] = 1
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    logits = dec(z, ids, mask)
    assert logits.shape == (2, 9, 100)
    logp = logits.log_softmax(-1)
    manual = torch.stack([sum(logp[b, t, ids[b, t + 1]] for t in range(8) if mask[b, t + 1]) for b in range(2)])
    assert torch.allclose(dec.log_prob(z, ids, mask), manual, atol=1e-5)
    # z is injected: another z changes every position's logits, the first one included
    delta = (dec(z + 1.0, ids, mask) - logits).abs().amax(-1)
    assert bool((delta[0] > 1e-4).all())
    # causal: changing the last token leaves the earlier logits unchanged
    changed = ids.clone()
    changed[:, -1] = 5
    assert torch.allclose(dec(z, changed, mask)[:, :-1], logits[:, :-1], atol=1e-5)
    # gradients reach z
    zg = z.clone().requires_grad_(True)
    dec.log_prob(zg, ids, mask).sum().backward()
    assert float(zg.grad.abs().sum()) > 0


@pytest.mark.parametrize("injection", ["embedding", "memory"])
def test_gpt2_generate_matches_teacher_forcing(injection):
    from pyro_diffmvae.nets.text import GPT2TextDecoder

    dec = GPT2TextDecoder(_tiny_gpt2(), latent_dim=8, injection=injection).eval()
    z = torch.randn(3, 8, generator=torch.Generator().manual_seed(2))
    out = dec.generate(z, max_length=7, bos_id=1, eos_id=2)
    assert out.shape[0] == 3 and 1 < out.shape[1] <= 7 and bool((out[:, 0] == 1).all())
    greedy = dec(z, out).argmax(-1)
    for b in range(3):
        for t in range(out.shape[1] - 1):
            if 2 in out[b, : t + 1].tolist():
                break  # after <eos>: padding
            assert int(out[b, t + 1]) == int(greedy[b, t])
    sampled = dec.generate(z, max_length=7, bos_id=1, eos_id=2, do_sample=True, top_k=5,
                           generator=torch.Generator().manual_seed(0))
    assert sampled.shape[0] == 3 and int(sampled.max()) < 100


def test_from_pretrained_missing_dir(tmp_path):
    pytest.importorskip("transformers")
    from pyro_diffmvae.nets.text import BertTextEncoder, GPT2TextDecoder

    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        BertTextEncoder.from_pretrained(missing, latent_dim=4)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        GPT2TextDecoder.from_pretrained(missing, latent_dim=4)


def test_from_pretrained_loads_the_saved_weights(tmp_path):
    from pyro_diffmvae.nets.text import BertTextEncoder, GPT2TextDecoder

    bert, gpt2 = _tiny_bert(), _tiny_gpt2()
    ids = torch.randint(3, 100, (2, 8))
    # a plain transformers folder: the backbone is identical
    bert.save_pretrained(tmp_path / "bert")
    gpt2.save_pretrained(tmp_path / "gpt2")
    enc = BertTextEncoder.from_pretrained(tmp_path / "bert", latent_dim=4).eval()
    assert torch.allclose(enc.bert(ids).last_hidden_state, bert(ids).last_hidden_state, atol=1e-6)
    dec = GPT2TextDecoder.from_pretrained(tmp_path / "gpt2", latent_dim=4).eval()
    assert torch.allclose(dec.gpt2(ids).logits, gpt2(ids).logits, atol=1e-6)
    # our save_pretrained also stores the latent head: the whole module is identical
    z = torch.randn(2, 4)
    enc.save_pretrained(tmp_path / "enc")
    dec.save_pretrained(tmp_path / "dec")
    enc2 = BertTextEncoder.from_pretrained(tmp_path / "enc", latent_dim=4).eval()
    dec2 = GPT2TextDecoder.from_pretrained(tmp_path / "dec", latent_dim=4).eval()
    assert all(torch.equal(a, b) for a, b in zip(enc(ids), enc2(ids)))
    assert torch.allclose(dec(z, ids), dec2(z, ids), atol=1e-6)
    with pytest.raises(ValueError, match="latent_dim"):
        GPT2TextDecoder.from_pretrained(tmp_path / "dec", latent_dim=5)


def test_encode_captions_for_optimus_with_tiny_tokenizers():
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from pyro_diffmvae.nets.text import encode_captions_for_optimus

    bert_words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "this", "bird", "is", "red", "."]
    bt = Tokenizer(models.WordLevel({w: i for i, w in enumerate(bert_words)}, unk_token="[UNK]"))
    bt.normalizer = normalizers.Lowercase()
    bt.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    bt.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    bert_tok = PreTrainedTokenizerFast(tokenizer_object=bt, pad_token="[PAD]", unk_token="[UNK]")
    gpt_words = ["<|endoftext|>", "<unk>", "this", "bird", "is", "red", "."]
    gt = Tokenizer(models.WordLevel({w: i for i, w in enumerate(gpt_words)}, unk_token="<unk>"))
    gt.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    gpt_tok = PreTrainedTokenizerFast(tokenizer_object=gt, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                      unk_token="<unk>")
    out = encode_captions_for_optimus(["This bird is red.", "this blue bird is red red red red"], bert_tok, gpt_tok,
                                      max_length=8)
    assert out["encoder_input_ids"].tolist() == [[2, 4, 5, 6, 7, 8, 3, 0], [2, 4, 1, 5, 6, 7, 7, 3]]
    assert out["encoder_attention_mask"][0].tolist() == [1] * 7 + [0]
    # GPT-2 side: <|endoftext|> (0) as bos and eos, padded with eos, case kept (no lowercasing)
    assert out["decoder_input_ids"].tolist() == [[0, 1, 3, 4, 5, 6, 0, 0], [0, 2, 1, 3, 4, 5, 5, 0]]
    assert out["decoder_attention_mask"].tolist() == [[1] * 7 + [0], [1] * 8]


def test_missing_transformers_raises_import_error_with_install_hint(monkeypatch):
    from pyro_diffmvae.nets import text

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if it were not installed
    with pytest.raises(ImportError, match="pip install transformers"):
        text.require_transformers()
    with pytest.raises(ImportError, match="pip install transformers"):
        text.GPT2TextDecoder.from_pretrained("/nowhere", latent_dim=4)


# ------------------------------------------------ Optimus text VAE wired through the configs
BERT_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "this", "the", "bird", "is", "has", "with", "red",
              "green", "yellow", "white", "small", "zebra", "pattern", "stripe", "number", "never", "read", ".", ",",
              "!"] + [str(k) for k in range(10)]


def _tiny_optimus_folders(root: Path) -> tuple[Path, Path]:
    """A tiny random BERT with a word-piece tokenizer of the fake captions' words, and a tiny random
    GPT-2 with a byte-level BPE tokenizer (ASCII characters, " bird" merged), saved to two folders."""
    transformers = pytest.importorskip("transformers")
    bert_tok = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(BERT_WORDS)})
    gpt_vocab = {"<|endoftext|>": 0, "Ġ": 1}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!'":
        gpt_vocab[c] = len(gpt_vocab)
    merges = [("Ġ", "b"), ("Ġb", "i"), ("Ġbi", "r"), ("Ġbir", "d")]
    for a, b in merges:
        gpt_vocab[a + b] = len(gpt_vocab)
    gpt_tok = transformers.GPT2Tokenizer(vocab=gpt_vocab, merges=merges)
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=len(BERT_WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64))
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=len(gpt_vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
    bert_dir, gpt2_dir = root / "tiny_bert", root / "tiny_gpt2"
    bert.save_pretrained(bert_dir)
    bert_tok.save_pretrained(bert_dir)
    gpt2.save_pretrained(gpt2_dir)
    gpt_tok.save_pretrained(gpt2_dir)
    return bert_dir, gpt2_dir


def _compose(*overrides: str):
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=list(overrides))


def _cub_cfg(fake_root: Path, tmp_path: Path, *overrides: str, length: int = 16):
    return _compose("experiment=tiny", "dataset=cub", f"dataset.root={fake_root}", "dataset.image_size=16",
                    f"dataset.caption_length={length}", f"dataset.cache_dir={tmp_path}/cache", *overrides)


def _optimus_cfg(fake_root: Path, tmp_path: Path, *overrides: str):
    """CUB with the tiny Optimus nets; captions of 40 GPT-2 tokens (the tiny tokenizer's are mostly characters)."""
    bert_dir, gpt2_dir = _tiny_optimus_folders(tmp_path)
    return _cub_cfg(fake_root, tmp_path, "model.text_nets=optimus", f"model.optimus.bert_path={bert_dir}",
                    f"model.optimus.gpt2_path={gpt2_dir}", *overrides, length=40)


def test_optimus_codec_layout_round_trip_and_generated_ids(tmp_path):
    from pyro_diffmvae.nets.text import OptimusCaptionCodec, load_optimus_tokenizers

    bert_dir, gpt2_dir = _tiny_optimus_folders(tmp_path)
    bert_tok, gpt_tok = load_optimus_tokenizers(bert_dir, gpt2_dir)
    codec = OptimusCaptionCodec(bert_tok, gpt_tok, length=8)
    assert (codec.bos_id, codec.eos_id, codec.pad_id) == (0, 0, 0)  # GPT-2: <|endoftext|> for all three
    x = codec.encode(["A red bird.", "never"])
    assert x.shape == (2, 32) and x.dtype == torch.int64
    e, m_e, d, m_d = codec.unpack(x)
    w = {t: i for i, t in enumerate(BERT_WORDS)}
    assert e.tolist() == [[2, w["a"], w["red"], w["bird"], w["."], 3, 0, 0], [2, w["never"], 3, 0, 0, 0, 0, 0]]
    assert m_e.tolist() == [[1] * 6 + [0] * 2, [1] * 3 + [0] * 5]
    # GPT-2 part: <bos> A Ġ r e d Ġbird . <eos> would be 9 > 8 tokens: truncated to 6 + bos + eos
    g = gpt_tok.get_vocab()
    assert d[0].tolist() == [0, g["A"], g["Ġ"], g["r"], g["e"], g["d"], g["Ġbird"], 0]
    assert m_d.tolist() == [[1] * 8, [1] * 7 + [0]]
    assert codec.decode(x) == ["A red bird", "never"]  # lossless apart from the truncation
    # generated ids: the mask runs up to and including the first <eos> after <bos>; padding after it
    generated = torch.tensor([[0, g["r"], g["e"], g["d"], 0, g["e"]], [0, g["r"], g["e"], g["d"], g["e"], g["d"]]])
    packed = codec.pack_generated(generated)
    e, m_e, d, m_d = codec.unpack(packed)
    assert d.tolist() == [[0, g["r"], g["e"], g["d"], 0, g["e"], 0, 0], [0, g["r"], g["e"], g["d"], g["e"], g["d"], 0, 0]]
    assert m_d.tolist() == [[1] * 5 + [0] * 3, [1] * 6 + [0] * 2]
    assert codec.decode(packed) == ["red", "reded"]
    assert e[0].tolist() == [2, w["red"], 3, 0, 0, 0, 0, 0] and m_e[0].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="4 \\* 8 = 32 ids"):
        codec.unpack(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="'text'.*GPT-2 token ids must lie in"):
        bad = x.clone()
        bad[0, 16] = 10_000
        codec.check("text", bad)


def test_optimus_data_adapter_retokenises_the_exact_caption(fake_root, tmp_path):
    from pyro_diffmvae.builders import build_datasets, optimus_codec
    from pyro_diffmvae.data.cub import OptimusCaptions

    cfg = _optimus_cfg(fake_root, tmp_path)
    train, val, test = build_datasets(cfg)
    assert isinstance(train, OptimusCaptions) and val is test
    codec = optimus_codec(cfg)
    assert codec is optimus_codec(cfg)  # memoised: the tokenisers are read once
    for data in (train, test):
        for i in range(len(data)):
            item = data[i]
            meta = item["meta"]
            raw = FAKE_CAPTIONS[meta["image_id"]][meta["caption_index"]]
            assert item["text"].shape == (4 * 40,) and torch.equal(item["text"], codec.encode([raw])[0])
            assert data.decode(item["text"][None]) == [raw]  # case, punctuation and "zebra" kept
            assert torch.equal(item["image"], data.base[i]["image"])
    assert test[0]["meta"]["caption_index"] == 0  # the test split's fixed first caption
    assert train.image_ids == [1, 3] and train.class_ids == [1, 2]  # read from the base data set
    assert train.caption_text(3, 6) == "the yellow bird is small 6!"
    with pytest.raises(KeyError, match="image 2 is not in this train split"):
        train.caption_text(2, 0)
    with pytest.raises(IndexError, match="image 3 has 7 captions, not a caption 7"):
        train.caption_text(3, 7)
    assert default_collate([train[0], train[1]])["text"].shape == (2, 160)


def test_build_model_with_tiny_optimus_text_vae(fake_root, tmp_path):
    from pyro_diffmvae.builders import build_datasets, build_model
    from pyro_diffmvae.model import elbo_terms
    from pyro_diffmvae.nets.text import OptimusCaptionDecoder, OptimusCaptionEncoder

    cfg = _optimus_cfg(fake_root, tmp_path)
    train, _, _ = build_datasets(cfg)
    vae = build_model(cfg)
    assert all(m.training for m in vae.modules())  # from_pretrained's eval mode is undone: dropout while training
    vae.eval()
    text = vae.modalities["text"]
    assert isinstance(text.encoder, OptimusCaptionEncoder) and isinstance(text.decoder, OptimusCaptionDecoder)
    assert text.decoder.net.injection == "both" and tuple(text.event_shape) == (160,)
    batch = default_collate([train[0], train[1]])

    terms = elbo_terms(vae, batch)
    assert all(bool(torch.isfinite(v.detach())) for v in terms.values()) and float(terms["loglik/text"].detach()) < 0
    vae.zero_grad()
    (-terms["elbo"]).backward()
    grads = [p.grad for p in text.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)

    # the text decoder's log-prob against a hand computation: the chain rule, one prefix at a time
    # (no padding, no mask), log p(d | z) = sum_{t=1}^{n-1} log softmax(logits of d_{<t})[d_t]
    D = cfg.model.latent_dim
    z = torch.randn(2, D, generator=torch.Generator().manual_seed(0))
    x = batch["text"]
    _, _, d, m_d = text.decoder.codec.unpack(x)
    gpt2 = text.decoder.net
    with torch.no_grad():
        log_prob = text.decoder(z).log_prob(x)
        by_hand = []
        for b in range(2):
            n = int(m_d[b].sum())
            total = 0.0
            for t in range(1, n):
                logits = gpt2(z[b:b + 1], d[b:b + 1, :t])[0, -1]
                total += float(logits.log_softmax(-1)[d[b, t]])
            by_hand.append(total)
    torch.testing.assert_close(log_prob, torch.tensor(by_hand), atol=1e-4, rtol=1e-5)
    assert log_prob.shape == (2,)
    # several latents per example (the enumerated-subset strategy): batch shape (3, 2), broadcast x
    z3 = torch.randn(3, 2, D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp3 = text.decoder(z3).log_prob(x)
        assert lp3.shape == (3, 2)
        torch.testing.assert_close(lp3[1], text.decoder(z3[1]).log_prob(x))
        # a zero placeholder (a missing caption) scores 0 and encodes to finite values
        assert float(text.decoder(z).log_prob(torch.zeros_like(x)).abs().max()) == 0.0
        assert all(bool(torch.isfinite(v).all()) for v in text.encode(torch.zeros_like(x)))

    # image -> caption: packed captions the model accepts back, and their text
    gen = vae.generate(batch, given=["image"], targets=["text"])["text"]
    assert gen.shape == (2, 160)
    text.check_data(gen)
    assert all(isinstance(s, str) for s in train.decode(gen))


def test_optimus_config_errors_name_the_setting(fake_root, tmp_path):
    from pyro_diffmvae.builders import build_model, modality_specs

    with pytest.raises(ValueError, match="model.optimus.bert_path: a local directory holding a BERT model"):
        build_model(_cub_cfg(fake_root, tmp_path, "model.text_nets=optimus"))
    missing = tmp_path / "no_such_gpt2"
    cfg = _optimus_cfg(fake_root, tmp_path, f"model.optimus.gpt2_path={missing}")
    with pytest.raises(FileNotFoundError, match="model.optimus.gpt2_path.*no_such_gpt2.*does not exist"):
        build_model(cfg)
    with pytest.raises(ValueError, match="unknown model.text_nets 'bert'"):
        modality_specs(_cub_cfg(fake_root, tmp_path, "model.text_nets=bert"))
    with pytest.raises(ValueError, match="text_nets=optimus is for the CUB captions"):
        modality_specs(_compose("dataset.modalities=[image,text]", "model.text_nets=optimus"))


def test_cub_vocabulary_is_read_once_per_process(fake_root, tmp_path, monkeypatch):
    from pyro_diffmvae import builders
    from pyro_diffmvae.builders import build_datasets, build_model, modality_specs
    from pyro_diffmvae.data import cub

    calls = []
    build = cub.Vocabulary.build.__func__
    monkeypatch.setattr(cub.Vocabulary, "build", classmethod(lambda cls, *a, **k: calls.append(1) or build(cls, *a, **k)))
    builders.cub_vocabulary.cache_clear()
    cfg = _cub_cfg(fake_root, tmp_path)
    specs = modality_specs(cfg)
    vae = build_model(cfg)
    train, _, test = build_datasets(cfg)
    assert len(calls) == 1
    assert specs["text"]["num_classes"] == len(train.vocab) == vae.modalities["text"].decoder.num_classes
    assert train.vocab is test.vocab is builders.cub_vocabulary(cfg.dataset.root)
    # the same vocabulary as a data set that builds its own from the training captions
    assert train.vocab == CUBImageCaptionDataset(fake_root, "train", image_size=16).vocab


def test_evaluation_reports_clip_scores_with_the_raw_captions(fake_root, tmp_path):
    from test_clip_score import make_tiny_clip

    from pyro_diffmvae.builders import build_datasets, build_model
    from pyro_diffmvae.evaluation_labels import evaluate_with_labels
    from pyro_diffmvae.metrics.clip_score import CLIPScore

    clip_dir = make_tiny_clip(tmp_path / "clip", aligned=True)  # every cosine > 0: no score is clipped to 0
    common = ("evaluation.num_examples=2", f"evaluation.classifier_cache={tmp_path}/classifiers",
              "evaluation.probe_train_size=2")
    cfg = _cub_cfg(fake_root, tmp_path, *common, f"evaluation.clip_model={clip_dir}")
    train, _, test = build_datasets(cfg)
    torch.manual_seed(0)
    vae = build_model(cfg)
    metrics = evaluate_with_labels(vae, test, train, cfg, tmp_path, figures=False)
    assert metrics["clip_model"] == str(clip_dir)
    # the reference row: the real test images against the lines of their caption files (image 2 and 4,
    # caption 0), not the decoded word ids ("zebra" is not in the training vocabulary: "<unk>")
    images = torch.stack([test[0]["image"], test[1]["image"]])
    raw = [FAKE_CAPTIONS[2][0], FAKE_CAPTIONS[4][0]]
    clip = CLIPScore(clip_dir)
    assert metrics["reference"]["real_images_clip_score"] == pytest.approx(clip(images, raw), abs=1e-4)
    decoded = test.decode(torch.stack([test[0]["text"], test[1]["text"]]))
    assert "<unk>" in decoded[0] and clip(images, decoded) != pytest.approx(clip(images, raw), abs=1e-4)
    assert 0.0 < metrics["conditional"]["text"]["image_clip_score"] < 100.0
    assert "image_clip_score" not in metrics["conditional"]["image"]  # the caption is generated there, not given

    plain = evaluate_with_labels(vae, test, train, _cub_cfg(fake_root, tmp_path, *common), tmp_path, figures=False)
    assert plain["clip_model"] is None and "reference" not in plain
    assert "image_clip_score" not in plain["conditional"]["text"]
    bad = _cub_cfg(fake_root, tmp_path, *common, f"evaluation.clip_model={tmp_path}/no_clip_here")
    with pytest.raises(FileNotFoundError, match="no_clip_here"):
        evaluate_with_labels(vae, test, train, bad, tmp_path, figures=False)


def test_evaluation_with_optimus_text_nets(fake_root, tmp_path):
    from test_clip_score import make_tiny_clip

    from pyro_diffmvae.builders import build_datasets, build_model
    from pyro_diffmvae.evaluation_labels import evaluate_with_labels
    from pyro_diffmvae.metrics.clip_score import CLIPScore

    clip_dir = make_tiny_clip(tmp_path / "clip", aligned=True)
    cfg = _optimus_cfg(fake_root, tmp_path, "evaluation.num_examples=2", f"evaluation.classifier_cache={tmp_path}/cls",
                       "evaluation.probe_train_size=2", f"evaluation.clip_model={clip_dir}")
    train, _, test = build_datasets(cfg)
    metrics = evaluate_with_labels(build_model(cfg), test, train, cfg, tmp_path, figures=True)
    images = torch.stack([test[0]["image"], test[1]["image"]])
    expected = CLIPScore(clip_dir)(images, [FAKE_CAPTIONS[2][0], FAKE_CAPTIONS[4][0]])
    assert metrics["reference"]["real_images_clip_score"] == pytest.approx(expected, abs=1e-4)
    assert 0.0 < metrics["conditional"]["text"]["image_clip_score"] < 100.0
    assert set(metrics["latent_linear_accuracy"]) == {"image", "text", "all"}
    assert (tmp_path / "figures" / "conditional.png").is_file()
