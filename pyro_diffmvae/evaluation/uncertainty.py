r"""Standard errors of the reported numbers.

* :func:`mean_and_se` — a rate over the test examples from per-example values :math:`v_i`
  (an indicator 1[read-back label right], or a mean of indicators over several targets, subsets or
  labels of example :math:`i`): :math:`\bar v \pm \sqrt{\tfrac1n\sum_i (v_i-\bar v)^2 / n}`. For
  indicators this is the binomial :math:`\sqrt{p(1-p)/n}` (:func:`binomial_se`); for a mean over
  several targets it is the SE of the mean of per-example means, which accounts for the targets of
  one example being correlated.
* :func:`balanced_accuracy` — the mean of per-class recalls :math:`\frac1C\sum_c r_c`, with the
  per-class binomial SEs combined as independent estimates: :math:`\sqrt{\sum_c r_c(1-r_c)/n_c}\,/\,C`.
* :func:`bootstrap_indices` — ``B`` seeded resamples of the ``n`` examples with replacement,
  ``torch.randint(0, n, (B, n), generator=torch.Generator().manual_seed(seed))``;
  :func:`bootstrap_mean_se` (sample F1: a mean of per-example F1) and :func:`bootstrap_fd_se` (a
  Fréchet distance) are the standard deviations (divisor B − 1) of the statistic over them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..metrics.fid import feature_statistics, frechet_distance

__all__ = ["binomial_se", "mean_and_se", "balanced_accuracy", "bootstrap_indices", "bootstrap_mean_se",
           "bootstrap_fd_se", "fd_of_features"]


def binomial_se(p: float, n: int) -> float:
    r"""The binomial standard error :math:`\sqrt{p(1-p)/n}` of a rate ``p`` over ``n`` examples."""
    if n < 1:
        raise ValueError(f"binomial_se needs n >= 1, got {n}")
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def mean_and_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean and standard error of per-example values ``(n,)`` (module docstring)."""
    v = values.double().reshape(-1)
    if v.numel() == 0:
        raise ValueError("mean_and_se needs at least one example")
    return float(v.mean()), float(v.var(unbiased=False).div(v.numel()).sqrt())


def balanced_accuracy(correct: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Mean per-class recall of one label column and its SE (module docstring); ``correct`` and
    ``labels`` are ``(n,)``: whether example i was read right, and its true class."""
    recalls, variances = [], []
    for c in torch.unique(labels):
        hit = correct[labels == c].double()
        r = float(hit.mean())
        recalls.append(r)
        variances.append(r * (1.0 - r) / hit.numel())
    C = len(recalls)
    return sum(recalls) / C, math.sqrt(sum(variances)) / C


def bootstrap_indices(n: int, resamples: int, seed: int) -> torch.Tensor:
    """``(resamples, n)`` indices of the seeded bootstrap (module docstring)."""
    return torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(int(seed)))


def bootstrap_mean_se(values: torch.Tensor, resamples: int, seed: int) -> float:
    """Bootstrap SE of the mean of per-example values ``(n,)``."""
    v = values.double().reshape(-1)
    means = v[bootstrap_indices(v.numel(), resamples, seed)].mean(1)
    return float(means.std(unbiased=True))


def fd_of_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance of ``(n, d)`` feature sets (:func:`pyro_diffmvae.metrics.fid.frechet_distance`)."""
    m1, s1 = feature_statistics(real)
    m2, s2 = feature_statistics(fake)
    return float(frechet_distance(m1, s1, m2, s2))


def bootstrap_fd_se(real: torch.Tensor, fake: torch.Tensor, resamples: int, seed: int, paired: bool = True) -> float:
    """Bootstrap SE of the FD of ``real`` against ``fake`` features: the same resampled examples for
    both when ``paired`` (conditional generation: generated i belongs to test example i), else each
    resampled on its own (unconditional samples; the fake indices from ``seed + 1``)."""
    idx_real = bootstrap_indices(real.shape[0], resamples, seed)
    idx_fake = idx_real if paired else bootstrap_indices(fake.shape[0], resamples, seed + 1)
    r, f = real.double().numpy(), fake.double().numpy()
    fds = [fd_of_features(r[i], f[j]) for i, j in zip(idx_real.numpy(), idx_fake.numpy())]
    return float(np.std(fds, ddof=1))
