r"""Coherence metrics through a factor classifier (the paper's coherence on data sets with known factors).

A :class:`FactorClassifier` (small CNN, one softmax head per generative factor) is trained on real
images with their factor labels. Generated images are then scored by

* **conditional coherence** — :func:`factor_accuracy` of the classifier's predictions on
  images generated from another modality against that modality's true factors;
* **unconditional coherence** — :func:`agreement`: the fraction of jointly generated examples on
  which the factor predictions for all modalities agree (optionally only on the factor columns all
  of them carry, e.g. a mask carries shape, size and position but not colour).

The classifier's penultimate layer (:meth:`FactorClassifier.feature_extractor`) doubles as a
feature space for a Fréchet distance (:class:`~pyro_diffmvae.metrics.fid.FeatureFID`).

Conventions: images are float ``(N, C, H, W)`` in the library's range [-1, 1]; factors are
``(N, F)`` integer class indices; a prediction of ``-1`` means "unknown" and is never right and
never agrees with anything.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..io import atomic_torch_save

__all__ = [
    "FactorClassifier",
    "PenultimateFeatures",
    "train_factor_classifier",
    "load_or_train_classifier",
    "predict_factors",
    "factor_accuracy",
    "agreement",
]

_CACHE_FORMAT = "pyro_diffmvae.FactorClassifier/1"


def _size2(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return image_size, image_size
    h, w = image_size
    return int(h), int(w)


class FactorClassifier(nn.Module):
    """Multi-head CNN classifier of generative factors.

    Stride-2 3×3 convolutions (BatchNorm, ReLU) halve the resolution until it is at most 4×4 (the
    channel count doubling from ``width`` up to ``4*width``); the map is flattened (so positions
    stay recoverable) into a ``feature_dim``-wide ReLU layer — the penultimate features — followed
    by one linear softmax head per factor.

    :param in_channels: image channels.
    :param image_size: ``H`` (square) or ``(H, W)``.
    :param factor_sizes: number of classes of each factor.
    :param width: channels of the first convolution.
    :param feature_dim: width of the penultimate layer (default ``4*width``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size,
        factor_sizes: Sequence[int],
        width: int = 32,
        feature_dim: Optional[int] = None,
    ):
        super().__init__()
        factor_sizes = [int(k) for k in factor_sizes]
        if not factor_sizes or any(k < 2 for k in factor_sizes):
            raise ValueError(f"factor_sizes must be a non-empty list of class counts >= 2, got {factor_sizes}")
        h, w = _size2(image_size)
        if in_channels < 1 or h < 1 or w < 1 or width < 1:
            raise ValueError(
                f"bad FactorClassifier sizes: in_channels={in_channels}, image_size={(h, w)}, width={width}"
            )
        feature_dim = int(feature_dim or 4 * width)
        self.config = dict(
            in_channels=int(in_channels),
            image_size=[h, w],
            factor_sizes=factor_sizes,
            width=int(width),
            feature_dim=feature_dim,
        )
        self.factor_sizes = factor_sizes
        self.num_features = feature_dim
        layers: list[nn.Module] = []
        c, ch = in_channels, width
        while h > 4 or w > 4:
            layers += [nn.Conv2d(c, ch, 3, stride=2, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
            c, ch = ch, min(2 * ch, 4 * width)
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if not layers:
            layers += [nn.Conv2d(c, ch, 3, padding=1), nn.BatchNorm2d(ch), nn.ReLU()]
            c = ch
        self.conv = nn.Sequential(*layers)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, feature_dim), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(feature_dim, k) for k in factor_sizes)

    @property
    def num_factors(self) -> int:
        return len(self.factor_sizes)

    def _check(self, x: torch.Tensor) -> None:
        c = self.config["in_channels"]
        hw = tuple(self.config["image_size"])
        if x.dim() != 4 or x.shape[1] != c or tuple(x.shape[-2:]) != hw:
            raise ValueError(f"FactorClassifier expects images of shape (N, {c}, {hw[0]}, {hw[1]}), got {tuple(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features, shape ``(N, feature_dim)``."""
        self._check(x)
        return self.fc(self.conv(x))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits, one ``(N, factor_sizes[f])`` tensor per factor."""
        h = self.features(x)
        return [head(h) for head in self.heads]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Most probable class per factor, ``(N, F)`` long (in the module's current mode)."""
        return torch.stack([logits.argmax(-1) for logits in self(x)], dim=1)

    def feature_extractor(self) -> nn.Module:
        """An ``nn.Module`` whose forward is :meth:`features` (for :class:`~pyro_diffmvae.metrics.fid.FeatureFID`)."""
        return PenultimateFeatures(self)


class PenultimateFeatures(nn.Module):
    """A classifier's penultimate features as a module: ``forward(x) = classifier.features(x)``, with
    ``num_features`` (a feature space for :class:`~pyro_diffmvae.metrics.fid.FeatureFID`)."""

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier
        self.num_features = classifier.num_features

    def forward(self, x):
        return self.classifier.features(x)


def _check_factors(factors, factor_sizes, name: str, n: int) -> torch.Tensor:
    if not isinstance(factors, torch.Tensor) or factors.dtype.is_floating_point or factors.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor of shape (N, F)")
    if factors.dim() != 2 or factors.shape != (n, len(factor_sizes)):
        raise ValueError(f"{name} must have shape ({n}, {len(factor_sizes)}), got {tuple(factors.shape)}")
    sizes = torch.tensor(factor_sizes)
    if n and ((factors < 0).any() or (factors >= sizes).any()):
        raise ValueError(f"{name}: factor f must lie in [0, factor_sizes[f]) with factor_sizes={list(factor_sizes)}")
    return factors.long()


def _check_images(images, name: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4:
        raise ValueError(f"{name} must be a float tensor of shape (N, C, H, W)")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contains non-finite values")
    return images


def train_factor_classifier(
    images: torch.Tensor,
    factors: torch.Tensor,
    factor_sizes: Sequence[int],
    *,
    val_images: Optional[torch.Tensor] = None,
    val_factors: Optional[torch.Tensor] = None,
    epochs: int = 5,
    steps: Optional[int] = None,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    width: int = 32,
    feature_dim: Optional[int] = None,
    seed: int = 0,
    device=None,
) -> tuple[FactorClassifier, Optional[dict]]:
    """Train a :class:`FactorClassifier` with Adam on the summed per-factor cross-entropies.

    :param images: ``(N, C, H, W)`` float images in [-1, 1].
    :param factors: ``(N, F)`` integer labels, factor ``f`` in ``[0, factor_sizes[f])``.
    :param val_images: optional held-out data for the returned accuracy.
    :param val_factors: see ``val_images`` above.
    :param epochs: passes over the data (ignored when ``steps`` is given).
    :param steps: number of minibatch updates (overrides ``epochs``).
    :param seed: seeds the initialisation and the minibatch order (the global RNG is left untouched).
    :returns: ``(classifier, val)`` with the classifier in eval mode on ``device`` and ``val`` the
        :func:`factor_accuracy` dict on the held-out data, or ``None`` without it.
    """
    images = _check_images(images, "images")
    n = images.shape[0]
    if n == 0:
        raise ValueError("train_factor_classifier: no training images")
    factors = _check_factors(factors, factor_sizes, "factors", n)
    if (val_images is None) != (val_factors is None):
        raise ValueError("give both val_images and val_factors, or neither")
    if batch_size < 1 or lr <= 0:
        raise ValueError(f"batch_size must be >= 1 and lr > 0, got {batch_size}, {lr}")
    device = torch.device(device) if device is not None else images.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = FactorClassifier(images.shape[1], tuple(images.shape[-2:]), factor_sizes, width, feature_dim)
    net.to(device).train()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    bs = min(batch_size, n)
    per_epoch = max(1, n // bs)  # drop the last partial batch (BatchNorm dislikes size-1 batches)
    total = int(steps) if steps is not None else int(epochs) * per_epoch
    if total < 1:
        raise ValueError(f"need at least one training step, got epochs={epochs}, steps={steps}")
    step = 0
    while step < total:
        perm = torch.randperm(n, generator=gen)
        for i in range(per_epoch):
            if step >= total:
                break
            idx = perm[i * bs : (i + 1) * bs]
            x, y = images[idx].to(device), factors[idx].to(device)
            loss = sum(F.cross_entropy(logits, y[:, f]) for f, logits in enumerate(net(x)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    net.eval()
    val = None
    if val_images is not None:
        val_images = _check_images(val_images, "val_images")
        val_factors = _check_factors(val_factors, factor_sizes, "val_factors", val_images.shape[0])
        val = factor_accuracy(predict_factors(net, val_images, batch_size=max(256, bs)), val_factors)
    return net, val


def load_or_train_classifier(
    cache_path, train_fn: Callable[[], object], map_location="cpu"
) -> tuple[FactorClassifier, Optional[dict]]:
    """Load a cached :class:`FactorClassifier`, or train one with ``train_fn()`` and cache it.

    :param cache_path: file holding ``{"format", "config", "state_dict", "info"}``.
    :param train_fn: returns a :class:`FactorClassifier` or ``(classifier, info)`` (e.g.
        :func:`train_factor_classifier`'s output); ``info`` (a dict of numbers/lists/strings or
        ``None``) is cached alongside.
    :returns: ``(classifier in eval mode, info)``.

    The file is written atomically (a temporary file in the same folder, then ``os.replace``), so a
    crash never leaves a half-written cache. An unreadable cache raises a :class:`RuntimeError`
    naming the file (delete it to retrain).
    """
    path = os.fspath(cache_path)
    if os.path.exists(path):
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
            if not isinstance(ckpt, dict) or ckpt.get("format") != _CACHE_FORMAT:
                raise ValueError("not a FactorClassifier cache file")
            cfg = dict(ckpt["config"])
            cfg["image_size"] = tuple(cfg["image_size"])
            with torch.random.fork_rng(devices=[]):  # building it must not move the caller's RNG
                net = FactorClassifier(**cfg)
            net.load_state_dict(ckpt["state_dict"])
        except Exception as e:
            raise RuntimeError(
                f"classifier cache {path!r} is corrupt or incompatible ({type(e).__name__}: {e}); delete it to retrain"
            ) from e
        return net.eval(), ckpt.get("info")

    out = train_fn()
    net, info = out if isinstance(out, tuple) else (out, None)
    if not isinstance(net, FactorClassifier):
        raise TypeError(f"train_fn must return a FactorClassifier (or (classifier, info)), got {type(net).__name__}")
    ckpt = {
        "format": _CACHE_FORMAT,
        "config": net.config,
        "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "info": info,
    }
    atomic_torch_save(ckpt, path)
    return net.eval(), info


@torch.no_grad()
def predict_factors(classifier: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Predicted factors ``(N, F)`` long (argmax of each head), in eval mode, in batches.

    ``classifier(x)`` must return a list of per-factor logits (as :class:`FactorClassifier`).
    The classifier's train/eval mode is restored afterwards.
    """
    images = _check_images(images, "images")
    was_training = classifier.training
    classifier.eval()
    p = next(classifier.parameters(), None)
    dev = p.device if p is not None else images.device
    try:
        out = []
        for i in range(0, images.shape[0], batch_size):
            logits = classifier(images[i : i + batch_size].to(dev))
            out.append(torch.stack([lg.argmax(-1) for lg in logits], dim=1).cpu())
    finally:
        classifier.train(was_training)
    if not out:
        return torch.zeros(0, getattr(classifier, "num_factors", 0), dtype=torch.long)
    return torch.cat(out).long()


def _as_long_2d(x, name: str) -> torch.Tensor:
    t = torch.as_tensor(x)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class indices, got {t.dtype}")
    if t.dim() == 1:
        t = t[:, None]
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape (N, F), got {tuple(t.shape)}")
    return t.long()


def factor_accuracy(pred, true, factor_names: Optional[Sequence[str]] = None) -> dict:
    """Accuracy of factor predictions ``(N, F)`` against the true factors ``(N, F)``.

    :returns: ``{"per_factor": [acc_f ...], "mean": mean over factors, "all": fraction of examples
        with every factor right}`` plus ``"by_name": {name: acc}`` when ``factor_names`` is given.
        A prediction of ``-1`` (unknown) counts as wrong.
    """
    p, t = _as_long_2d(pred, "pred"), _as_long_2d(true, "true")
    if p.shape != t.shape:
        raise ValueError(f"factor_accuracy: pred has shape {tuple(p.shape)} but true has shape {tuple(t.shape)}")
    if p.shape[0] == 0:
        raise ValueError("factor_accuracy: need at least one example")
    if (t < 0).any():
        raise ValueError("factor_accuracy: true factors must be >= 0")
    correct = (p == t) & (p >= 0)
    per = correct.double().mean(0)
    out = {
        "per_factor": per.tolist(),
        "mean": float(per.mean()),
        "all": float(correct.all(1).double().mean()),
    }
    if factor_names is not None:
        if len(factor_names) != p.shape[1]:
            raise ValueError(f"factor_names has {len(factor_names)} names for {p.shape[1]} factors")
        out["by_name"] = dict(zip(factor_names, out["per_factor"]))
    return out


def agreement(predictions: Sequence, factors: Optional[Sequence[int]] = None) -> float:
    """Fraction of examples on which all factor predictions agree on every (selected) factor.

    :param predictions: two or more ``(N, F)`` integer tensors, e.g. the classifier's predictions
        on each modality of a jointly generated sample (unconditional coherence).
    :param factors: column indices to compare (default: all), for modalities that only carry some
        factors. Entries of ``-1`` (unknown) in a compared column never agree.
    """
    if isinstance(predictions, torch.Tensor) or len(predictions) < 2:
        raise ValueError("agreement needs a list of at least two (N, F) prediction tensors")
    preds = [_as_long_2d(p, f"predictions[{i}]") for i, p in enumerate(predictions)]
    shape = preds[0].shape
    for i, p in enumerate(preds):
        if p.shape != shape:
            raise ValueError(f"agreement: predictions[{i}] has shape {tuple(p.shape)}, predictions[0] {tuple(shape)}")
    if shape[0] == 0:
        raise ValueError("agreement: need at least one example")
    if factors is not None:
        idx = [int(f) for f in factors]
        if not idx or any(f < -shape[1] or f >= shape[1] for f in idx):
            raise ValueError(f"agreement: factors {list(factors)} must be a non-empty list of columns of {shape[1]}")
        preds = [p[:, idx] for p in preds]
    ok = preds[0] >= 0
    for p in preds[1:]:
        ok &= p == preds[0]
    return float(ok.all(1).double().mean())
