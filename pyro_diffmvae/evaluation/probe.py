r"""Latent linear classification: how linearly the posterior mean carries the labels.

For the posterior of each single modality (and of all), one multinomial logistic regression per
label column from the standardised posterior mean to the labels, trained on (at most
``evaluation.probe_train_size``) training examples and scored on the test examples.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..data.spec import LabelSpec
from .subsets import collate, slice_batch

__all__ = ["linear_probe_accuracy", "latent_probe"]


def linear_probe_accuracy(z_train: torch.Tensor, y_train: torch.Tensor, z_test: torch.Tensor, y_test: torch.Tensor,
                          num_classes: Sequence[int], steps: int = 300, lr: float = 0.05) -> float:
    """Mean test accuracy of one multinomial logistic regression per label column (Adam, standardised z)."""
    mean, std = z_train.mean(0), z_train.std(0).clamp(min=1e-6)
    ztr, zte = (z_train - mean) / std, (z_test - mean) / std
    accs = []
    g = torch.Generator().manual_seed(0)
    for f, k in enumerate(num_classes):
        layer = torch.nn.Linear(ztr.shape[1], k)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.01)
            layer.bias.zero_()
        opt = torch.optim.Adam(layer.parameters(), lr=lr)
        with torch.enable_grad():
            for _ in range(steps):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(layer(ztr), y_train[:, f]).backward()
                opt.step()
        with torch.no_grad():
            accs.append((layer(zte).argmax(-1) == y_test[:, f]).float().mean().item())
    return float(sum(accs) / len(accs))


def latent_probe(vae, train_set, truth, labels: torch.Tensor, spec: LabelSpec, names: Sequence[str], ev,
                 test_latents: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Linear-probe accuracy from the posterior mean of each single modality and of all of them;
    ``test_latents`` (``{"<m>" | "all": (n, D)}``): the test posterior means computed already (in
    chunks), else from the test batch ``truth``."""
    n_train = min(len(train_set), int(ev.get("probe_train_size", 2000)))
    train = collate(train_set, range(n_train))
    y_train = spec.labels_of(train)
    out = {}
    for given in [[m] for m in names] + [list(names)]:
        z_tr = torch.cat([vae.posterior(slice_batch(train, slice(i, i + 512)), given=given).mean
                          for i in range(0, n_train, 512)])
        key = "+".join(given) if len(given) < len(names) else "all"
        z_te = test_latents[key] if test_latents is not None else vae.posterior(truth, given=given).mean
        out[key] = linear_probe_accuracy(z_tr, y_train, z_te, labels, spec.num_classes)
    return out
