r"""Sample-average F1 of binary vectors (attributes, mask pixels; the paper's Table 3 metric).

For example :math:`i` with predicted set :math:`P_i` and true set :math:`T_i` (the indices of the
ones in its flattened binary vector)

.. math::

    F1_i = \frac{2|P_i\cap T_i|}{|P_i| + |T_i|}, \qquad F1 = \frac1N\sum_i F1_i .

This is exactly scikit-learn's ``f1_score(target, pred, average="samples")`` (scikit-learn 1.3+,
checked against 1.9): an example with a prediction but no true ones (or the reverse) has F1 = 0;
an example with **both sets empty** is ill-defined and gets the ``zero_division`` value. With
scikit-learn's default ``zero_division="warn"`` that value is **0** and an
:class:`UndefinedMetricWarning` is issued; ``zero_division=1.0`` counts such examples as perfect,
and ``zero_division=float("nan")`` leaves them out of the average (NaN if every example is empty).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

__all__ = ["sample_f1", "per_example_f1", "binarize", "UndefinedMetricWarning"]


class UndefinedMetricWarning(UserWarning):
    """Issued when some examples have neither true nor predicted ones (``zero_division="warn"``)."""


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, np.ndarray):
        return torch.from_numpy(x)
    try:
        return torch.as_tensor(x)
    except Exception as e:  # pragma: no cover - exotic input
        raise TypeError(f"{name} must be a tensor or array, got {type(x).__name__}") from e


def _as_binary(x, name: str) -> torch.Tensor:
    t = _as_tensor(x, name)
    if t.dim() < 1:
        raise ValueError(f"{name} must have shape (N, ...), got a scalar")
    if t.dtype == torch.bool:
        return t.reshape(t.shape[0], -1)
    if t.is_complex():
        raise ValueError(f"{name} must be bool or {{0, 1}}, got dtype {t.dtype}")
    bad = (t != 0) & (t != 1)
    if bad.any():
        vals = torch.unique(t[bad])[:5].tolist()
        hint = " (probabilities? threshold them with binarize())" if t.is_floating_point() else ""
        raise ValueError(f"{name} must be binary (bool or values in {{0, 1}}), found values {vals}{hint}")
    return (t != 0).reshape(t.shape[0], -1)


def binarize(probs, threshold: float = 0.5) -> torch.Tensor:
    """``probs > threshold`` as a bool tensor (e.g. Bernoulli means of a decoder → predicted labels).

    Strictly greater, so that probability exactly ``threshold`` counts as 0 (as ``probs.round()``
    does for 0.5). NaN probabilities are an error.
    """
    p = _as_tensor(probs, "probs")
    if not p.is_floating_point():
        p = p.to(torch.get_default_dtype())
    if torch.isnan(p).any():
        raise ValueError("binarize: probs contains NaN")
    return p > threshold


def per_example_f1(pred, target, zero_division: float = 0.0) -> torch.Tensor:
    r"""``(N,)`` float64: :math:`F1_i = 2|P_i\cap T_i|/(|P_i|+|T_i|)` of each example, ``zero_division``
    where both sets are empty (0: what :func:`sample_f1` averages by default, without its warning);
    their mean is :func:`sample_f1`. The bootstrap SE of the sample F1 resamples these values."""
    p, t = _as_binary(pred, "pred"), _as_binary(target, "target")
    if p.shape != t.shape:
        raise ValueError(f"per_example_f1: pred has shape {tuple(p.shape)} but target has shape {tuple(t.shape)}")
    tp = (p & t).sum(1).double()
    denom = p.sum(1).double() + t.sum(1).double()
    return torch.where(denom == 0, torch.full_like(tp, float(zero_division)), 2 * tp / denom.clamp_min(1))


def sample_f1(pred, target, zero_division="warn") -> float:
    r"""Sample-average F1 between binary predictions and targets of shape ``(N, ...)``.

    :param pred: predicted labels, bool or ``{0, 1}``; dims after the first are flattened.
    :param target: true labels, same shape.
    :param zero_division: value for examples with no true and no predicted ones, with
        scikit-learn's meaning: ``"warn"`` (default, as in scikit-learn) → 0 with an
        :class:`UndefinedMetricWarning`; ``0.0`` or ``1.0`` → that value silently;
        ``float("nan")`` → such examples are excluded from the average.
    :returns: the mean over examples of :math:`2|P\cap T|/(|P|+|T|)` (a Python float).
    """
    p = _as_binary(pred, "pred")
    t = _as_binary(target, "target")
    pred_shape = tuple(_as_tensor(pred, "pred").shape)
    target_shape = tuple(_as_tensor(target, "target").shape)
    if pred_shape != target_shape:
        raise ValueError(f"sample_f1: pred has shape {pred_shape} but target has shape {target_shape}")
    if p.shape[0] == 0:
        raise ValueError("sample_f1: need at least one example, got N = 0")
    if isinstance(zero_division, str):
        if zero_division != "warn":
            raise ValueError(f"zero_division must be 'warn', 0.0, 1.0 or nan, got {zero_division!r}")
        fill, warn = 0.0, True
    else:
        fill, warn = float(zero_division), False
        if not (fill in (0.0, 1.0) or math.isnan(fill)):
            raise ValueError(f"zero_division must be 'warn', 0.0, 1.0 or nan, got {zero_division!r}")

    tp = (p & t).sum(1).double()
    denom = p.sum(1).double() + t.sum(1).double()
    empty = denom == 0
    f1 = torch.where(empty, torch.full_like(tp, fill), 2 * tp / denom.clamp_min(1))
    if warn and empty.any():
        warnings.warn(
            f"F-score is ill-defined and being set to 0.0 in {int(empty.sum())} of {len(empty)} samples "
            "with no true nor predicted labels. Use `zero_division` parameter to control this behavior.",
            UndefinedMetricWarning,
            stacklevel=2,
        )
    if math.isnan(fill):
        f1 = f1[~empty]
        if f1.numel() == 0:
            return float("nan")
    return float(f1.mean())
