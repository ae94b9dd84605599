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


def bootstrap_fd_se(real: torch.Tensor, fake: torch.Tensor, resamples: int, seed: int, paired: bool = True,
                    batch_values: int = 20_000_000) -> float:
    r"""Bootstrap SE of the FD of ``real`` against ``fake`` features: the same resampled examples for
    both when ``paired`` (conditional generation: generated i belongs to test example i), else each
    resampled on its own (unconditional samples; the fake indices from ``seed + 1``).

    The resamples are computed in batches (float64): means, covariances (divisor n − 1) and
    :math:`\operatorname{tr}(\Sigma_r\Sigma_f)^{1/2} = \sum_i\sqrt{\lambda_i(\Sigma_r^{1/2}\Sigma_f\Sigma_r^{1/2})}` by batched
    symmetric eigendecompositions: the same numbers as :func:`fd_of_features` on each resample (to
    round-off), 2–9x faster than one FD at a time. ``batch_values`` bounds the float64 values of one
    batch of resampled features (default 2e7: 160 MB)."""
    idx_real = bootstrap_indices(real.shape[0], resamples, seed)
    idx_fake = idx_real if paired else bootstrap_indices(fake.shape[0], resamples, seed + 1)
    r, f = real.detach().cpu().double(), fake.detach().cpu().double()
    if not (torch.isfinite(r).all() and torch.isfinite(f).all()):
        raise ValueError("bootstrap_fd_se: the features contain non-finite values")
    chunk = max(1, int(batch_values // (max(r.shape[0], f.shape[0]) * r.shape[1])))  # resamples per batch
    fds = []
    for start in range(0, resamples, chunk):
        rr, ff = r[idx_real[start:start + chunk]], f[idx_fake[start:start + chunk]]
        mean_r, cov_r = _batched_statistics(rr)
        mean_f, cov_f = _batched_statistics(ff)
        w, v = torch.linalg.eigh(cov_r)
        root_r = (v * w.clamp(min=0.0).sqrt().unsqueeze(-2)) @ v.transpose(-1, -2)
        m = root_r @ cov_f @ root_r
        lam = torch.linalg.eigvalsh((m + m.transpose(-1, -2)) / 2).clamp(min=0.0)
        trace = cov_r.diagonal(0, -2, -1).sum(-1) + cov_f.diagonal(0, -2, -1).sum(-1)
        fds.append((mean_r - mean_f).pow(2).sum(-1) + trace - 2.0 * lam.sqrt().sum(-1))
    return float(torch.cat(fds).std(unbiased=True))


def _batched_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means ``(B, d)`` and covariances ``(B, d, d)`` (divisor n − 1) of ``(B, n, d)`` feature sets."""
    mean = x.mean(1)
    centred = x - mean.unsqueeze(1)
    return mean, centred.transpose(1, 2) @ centred / (x.shape[1] - 1)
