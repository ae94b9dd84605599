"""CLIP score (metrics/clip_score.py) against hand computations with a tiny random CLIP saved to a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pyro_diffmvae.metrics.clip_score import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPScore, clip_scores

transformers = pytest.importorskip("transformers")

CAPTIONS = ["A red bird.", "this bird is yellow", "a small bird, number 3!", "the bird has red wings"]


def make_tiny_clip(directory: Path, image_mean=None, image_std=None, aligned: bool = False) -> Path:
    """A randomly initialised CLIP (hidden 32, 2 layers, 32 px images in 8 px patches) and a tiny
    byte-level BPE tokenizer (letters, punctuation, digits and the merges of "bird"), saved with
    ``save_pretrained``; with ``image_mean`` / ``image_std`` also a ``preprocessor_config.json``.

    ``aligned``: both towers' final layer norms get the same bias 3·1 and both projections the same
    matrix, so every image–caption cosine is positive (as with a trained CLIP) and no score is clipped."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    merges = [("b", "i"), ("bi", "r"), ("bir", "d</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tokenizer = transformers.CLIPTokenizer(vocab=vocab, merges=merges)
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=40, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = transformers.CLIPModel(config)
    if aligned:
        with torch.no_grad():
            model.vision_model.post_layernorm.bias.fill_(3.0)
            model.text_model.final_layer_norm.bias.fill_(3.0)
            model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if image_mean is not None:
        (directory / "preprocessor_config.json").write_text(json.dumps({"image_mean": image_mean, "image_std": image_std}))
    return directory


def _by_hand(directory: Path, pixels: torch.Tensor, captions) -> torch.Tensor:
    """``100 max(cos, 0)`` per pair from the model's own get_image_features / get_text_features."""
    model = transformers.CLIPModel.from_pretrained(directory, local_files_only=True).eval()
    tokens = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)(captions, padding=True,
                                                                                          return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    cos = (img @ txt.T).diagonal() / (img.norm(dim=-1) * txt.norm(dim=-1))
    return 100 * torch.where(cos > 0, cos, torch.zeros_like(cos))


def test_clip_score_equals_hand_computation(tmp_path):
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    folder = make_tiny_clip(tmp_path / "clip", mean, std)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=g) * 2 - 1  # [-1, 1], already at CLIP's 32 px
    pixels = ((images + 1) / 2 - torch.tensor(mean).reshape(1, 3, 1, 1)) / torch.tensor(std).reshape(1, 3, 1, 1)
    expected = _by_hand(folder, pixels, CAPTIONS)
    metric = CLIPScore(folder, batch_size=3)  # 2 batches
    torch.testing.assert_close(metric.scores(images, CAPTIONS), expected, atol=1e-4, rtol=1e-4)
    assert metric(images, CAPTIONS) == pytest.approx(float(expected.mean()), abs=1e-4)
    # images in another value range: [0, 1]
    torch.testing.assert_close(CLIPScore(folder, value_range=(0.0, 1.0)).scores((images + 1) / 2, CAPTIONS), expected,
                               atol=1e-4, rtol=1e-4)


def test_without_preprocessor_config_the_openai_constants_are_used(tmp_path):
    folder = make_tiny_clip(tmp_path / "clip")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean, std = torch.tensor(OPENAI_CLIP_MEAN).reshape(1, 3, 1, 1), torch.tensor(OPENAI_CLIP_STD).reshape(1, 3, 1, 1)
    expected = _by_hand(folder, ((images + 1) / 2 - mean) / std, CAPTIONS[:2])
    torch.testing.assert_close(CLIPScore(folder).scores(images, CAPTIONS[:2]), expected, atol=1e-4, rtol=1e-4)


def test_non_square_images_are_centre_cropped_and_small_ones_resized(tmp_path):
    metric = CLIPScore(make_tiny_clip(tmp_path / "clip"))
    g = torch.Generator().manual_seed(3)
    square = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    wide = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
    wide[..., 8:40] = square  # the centre 32 x 32 of a 32 x 48 image
    torch.testing.assert_close(metric.pixel_values(wide), metric.pixel_values(square))
    # a 16 px image is upsampled (bicubic, antialiased) to 32 px before the normalisation
    small = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    up = F.interpolate((small + 1) / 2, size=(32, 32), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    torch.testing.assert_close(metric.pixel_values(small), metric.pixel_values(up * 2 - 1))


def test_scores_are_clipped_at_zero_per_pair(tmp_path):
    # hand-made embeddings: cos = 1, -1, 0.6 -> 100, 0, 60; the mean of the clipped scores is 53.33
    # (torchmetrics' CLIPScore clips the mean instead: max(mean(100, -100, 60), 0) = 20)
    img = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
    txt = torch.tensor([[5.0, 0.0], [-1.0, 0.0], [0.8, 0.6]])
    torch.testing.assert_close(clip_scores(img, txt), torch.tensor([100.0, 0.0, 60.0]))
    # through the model: negating the text projection negates every cosine; of each pair's two
    # scores one is 0 and the other is 100 |cos|
    folder = make_tiny_clip(tmp_path / "clip")
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    metric = CLIPScore(folder)
    plus = metric.scores(images, CAPTIONS)
    with torch.no_grad():
        metric.model.text_projection.weight.neg_()
    minus = metric.scores(images, CAPTIONS)
    assert bool(((plus == 0) | (minus == 0)).all()) and bool(((plus > 0) | (minus > 0)).all())
    cos = F.cosine_similarity(metric.image_features(images), -metric.text_features(CAPTIONS), dim=-1)
    torch.testing.assert_close(plus + minus, 100 * cos.abs(), atol=1e-4, rtol=1e-4)


def test_missing_or_invalid_folders_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="evaluation.clip_model is null"):
        CLIPScore(None)
    with pytest.raises(FileNotFoundError, match="no_such_clip.*does not exist"):
        CLIPScore(tmp_path / "no_such_clip")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_folder.*no config.json"):
        CLIPScore(empty)
    bert = tmp_path / "a_bert"
    transformers.BertModel(transformers.BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=8)).save_pretrained(bert)
    with pytest.raises(ValueError, match="a_bert.*'bert' model, not a CLIP model"):
        CLIPScore(bert)
    no_tokenizer = make_tiny_clip(tmp_path / "clip_without_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        (no_tokenizer / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError, match="clip_without_tokenizer.*has no tokenizer"):
        CLIPScore(no_tokenizer)


def test_bad_images_and_captions_are_named(tmp_path):
    metric = CLIPScore(make_tiny_clip(tmp_path / "clip"))
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        metric.scores(images, ["a bird"])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        metric.scores(torch.zeros(2, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="floating point"):
        metric.scores(images.to(torch.uint8), ["a", "b"])
    with pytest.raises(TypeError, match="decode token ids first"):
        metric.text_features(torch.tensor([[1, 2, 3]]))
