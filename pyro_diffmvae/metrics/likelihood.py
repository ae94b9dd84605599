r"""Bits per dimension, and the diffusion decoder's likelihood bound in bits per dimension.

**Derivation** (images stored as 8-bit integers :math:`k\in\{0,\dots,255\}^d`, modelled on the
library's scale :math:`x = k/s - 1 \in [-1, 1]` with :math:`s = 127.5`).

1. *Dequantisation.* The discrete model :math:`P(k) = \int_{[0,1)^d} p_{256}(k+u)\,du` of a density
   :math:`p_{256}` on the :math:`[0, 256)` scale satisfies, by Jensen,
   :math:`-\log P(k) \le \mathbb E_{u\sim U[0,1)^d}[-\log p_{256}(k+u)]`. On the model's scale
   :math:`k+u` is :math:`x + u/s`, so we add :math:`u/s`, :math:`u\sim U[0,1)^d`, to :math:`x`.
2. *Change of scale.* :math:`y = s(x+1)` maps the model's scale to :math:`[0, 256)` with Jacobian
   :math:`s^d`, so :math:`p_{256}(y) = p(x)/s^d`, i.e.
   :math:`-\log p_{256}(y) = -\log p(x) + d\log s`.
3. *Bound.* With the likelihood weighting :math:`\lambda = g^2` and its constants, minus the
   diffusion decoder's ``log_prob`` is an upper bound on :math:`-\log p_\theta(x\mid z)` in nats
   (:class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood`, ``is_bound``), estimated by Monte
   Carlo over :math:`(t, \epsilon)` (and :math:`u`).
4. *Units.* Divide by :math:`d\ln 2`:

.. math::

    \mathrm{bpd} = \frac{\mathbb E_{u,t,\epsilon}\big[\mathcal L(x + u/s\mid z)\big] + d\log s}{d\ln 2}
    \;\ge\; \frac{-\log_2 P(k\mid z)}{d},

where :math:`\mathcal L` is minus the bound's per-example ``log_prob``. Without dequantisation
(``dequantize=False``) the same formula gives the bound on the *density* of :math:`x` in bits/dim on
the :math:`[0, 256)` scale (the convention of continuous-data tables), not a bound on a discrete NLL.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch

from ..likelihoods import ScoreMatchingLikelihood
from ..modality import DiffusionDecoder
from ..sde import VPSDE

__all__ = ["bits_per_dim", "diffusion_nll", "diffusion_bpd", "BitsPerDim"]

_LN2 = math.log(2.0)


class BitsPerDim(NamedTuple):
    mean: float
    stderr: float


def bits_per_dim(nll_nats, num_dims: int, data_scale: float = 127.5):
    r"""Convert a negative log-density in nats on the model's scale to bits/dim on the data scale.

    :math:`\mathrm{bpd} = (\mathrm{nll} + d\log s)/(d\ln 2)` with :math:`s` = ``data_scale``, the
    factor by which the data scale is finer than the model's (127.5 for [-1, 1] images from 8-bit
    data; 1 for no change of scale). Works on floats and tensors (elementwise).
    """
    if not (isinstance(num_dims, int) and num_dims >= 1):
        raise ValueError(f"num_dims must be a positive int, got {num_dims!r}")
    if not data_scale > 0:
        raise ValueError(f"data_scale must be positive, got {data_scale!r}")
    return (nll_nats + num_dims * math.log(data_scale)) / (num_dims * _LN2)


def _resolve(model, sde, event_shape, x):
    """(eps_net, sde, event_shape, fixed likelihood or None)."""
    if isinstance(model, DiffusionDecoder):
        return model.eps_net, model.sde, tuple(model.event_shape), None
    if isinstance(model, ScoreMatchingLikelihood):
        if not model.is_bound:
            raise ValueError(
                f"the likelihood is not a bound on log p(x|z): {model.objective}. Bits/dim need "
                "weighting='likelihood' with the bound's constants (pass the DiffusionDecoder or its "
                "eps_net instead to have the bound built for you)"
            )
        return model.eps_net, model.sde, tuple(model.event_shape), model
    if getattr(model, "is_bound", True) is False or getattr(model, "is_diffusion", None) is False:
        raise ValueError(
            f"{type(model).__name__} is not a diffusion likelihood bound (is_bound is False); "
            "diffusion_bpd needs a DiffusionDecoder, a bound ScoreMatchingLikelihood or an eps_net"
        )
    if isinstance(model, torch.distributions.Distribution) or not callable(model):
        raise TypeError(
            f"diffusion_bpd expects a DiffusionDecoder, a ScoreMatchingLikelihood or an eps_net "
            f"callable eps_net(x_t, z, t), got {type(model).__name__}"
        )
    return model, (sde if sde is not None else VPSDE()), tuple(event_shape or x.shape[1:]), None


@torch.no_grad()
def diffusion_nll(
    model,
    x: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    *,
    num_draws: int = 32,
    dequantize: bool = True,
    data_scale: float = 127.5,
    sde: Optional[VPSDE] = None,
    event_shape=None,
    batch_size: int = 1024,
    reduce: bool = True,
) -> torch.Tensor:
    r"""Per-example Monte Carlo upper bound on :math:`-\log p(x\mid z)` in nats, on the model's scale.

    :param model: a :class:`~pyro_diffmvae.modality.DiffusionDecoder` (the bound is built with
        ``weighting="likelihood"``, constants and the control variate, whatever the decoder trains
        with), a :class:`~pyro_diffmvae.likelihoods.ScoreMatchingLikelihood` (must be a bound; its
        ``z``, time sampling and control-variate setting are used, ``z`` must be ``None``, and it is
        evaluated ``num_draws`` times, each with its own ``num_draws``) or an ε-network ``eps_net(x_t, z, t)`` (then
        ``sde`` defaults to ``VPSDE()`` and ``event_shape`` to ``x.shape[1:]``).
    :param x: ``(N, *event_shape)`` data in [-1, 1].
    :param z: ``(N, D)`` latents (``None`` for an unconditional model).
    :param num_draws: Monte Carlo draws of :math:`(t, \epsilon)` (and of the dequantisation noise)
        per example.
    :param dequantize: add :math:`u/`\ ``data_scale``, :math:`u\sim U[0,1)`, to ``x`` (fresh per draw).
    :param batch_size: at most this many network evaluations per call.
    :param reduce: return the mean over the draws; ``False``: every draw, ``(num_draws, N)`` (for a
        standard error, or to combine draws shared by several latents).
    :returns: ``(N,)`` tensor (float64); each entry is the mean of ``num_draws`` draws.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1 or x.shape[0] == 0:
        raise ValueError("x must be a non-empty float tensor of shape (N, *event_shape)")
    if not torch.isfinite(x).all():
        raise ValueError("x contains non-finite values")
    if not (isinstance(num_draws, int) and num_draws >= 1):
        raise ValueError(f"num_draws must be a positive int, got {num_draws!r}")
    eps_net, sde, event_shape, fixed = _resolve(model, sde, event_shape, x)
    n = x.shape[0]
    if tuple(x.shape[1:]) != event_shape:
        raise ValueError(f"x has shape {tuple(x.shape)}, expected (N, {', '.join(map(str, event_shape))})")
    if fixed is not None:
        if z is not None:
            raise ValueError("a ScoreMatchingLikelihood carries its own z; pass z=None")
        if fixed.batch_shape != (n,):
            raise ValueError(f"the likelihood's batch shape {tuple(fixed.batch_shape)} must be (N,) = ({n},)")
        z = fixed.z
    if z is not None and (z.dim() != 2 or z.shape[0] != n):
        raise ValueError(f"z must have shape (N, D) with N = {n}, got {tuple(z.shape)}")
    if dequantize:
        grid = (x + 1.0) * data_scale
        if (grid - grid.round()).abs().max() > 1e-3 or grid.min() < -1e-3 or grid.max() > 255 + 1e-3:
            warnings.warn(
                f"dequantize=True but x is not on the 8-bit grid k/{data_scale} - 1, k in 0..255; the "
                "result is then not a bound on a discrete likelihood (use dequantize=False for a density)",
                stacklevel=2,
            )

    draws = torch.zeros(num_draws, n, dtype=torch.float64, device=x.device)
    draws_per_call = min(num_draws, batch_size)
    examples_per_call = max(1, batch_size // draws_per_call)
    for lo in range(0, n, examples_per_call):
        xb = x[lo : lo + examples_per_call]
        zb = None if z is None else z[lo : lo + examples_per_call]
        m = xb.shape[0]
        done = 0
        while done < num_draws:
            k = min(draws_per_call, num_draws - done)
            xr = xb.unsqueeze(0).expand((k,) + xb.shape)
            if dequantize:
                xr = xr + torch.rand(xr.shape, dtype=x.dtype, device=x.device) / data_scale
            zr = None if zb is None else zb.unsqueeze(0).expand((k,) + zb.shape)
            lik = ScoreMatchingLikelihood(
                eps_net,
                zr,
                sde,
                weighting="likelihood",
                event_shape=event_shape,
                num_draws=1 if fixed is None else fixed.num_draws,
                time_sampling="auto" if fixed is None else fixed.time_sampling,
                control_variate=True if fixed is None else fixed.control_variate,
                batch_shape=(k, m) if zr is None else None,
            )
            draws[done : done + k, lo : lo + m] = -lik.log_prob(xr).double()
            done += k
    return draws.mean(0) if reduce else draws


def diffusion_bpd(
    model,
    x: torch.Tensor,
    z: Optional[torch.Tensor] = None,
    *,
    num_draws: int = 32,
    dequantize: bool = True,
    data_scale: float = 127.5,
    **kwargs,
) -> BitsPerDim:
    r"""The diffusion decoder's bound on :math:`-\log p(x\mid z)` in bits/dim on the 8-bit scale.

    See the module docstring for the derivation: per example
    :math:`\mathrm{bpd} = (\mathcal L + d\log s)/(d\ln2)` with :math:`\mathcal L` from
    :func:`diffusion_nll` (dequantised when ``dequantize=True``) and :math:`s` = ``data_scale``.

    :returns: ``BitsPerDim(mean, stderr)``: the mean over examples and its standard error
        (sample standard deviation / √N; it covers both the spread over examples and the Monte
        Carlo noise of each example's estimate, which are independent across examples; NaN for N = 1).
    """
    nll = diffusion_nll(model, x, z, num_draws=num_draws, dequantize=dequantize, data_scale=data_scale, **kwargs)
    d = math.prod(x.shape[1:])
    bpd = bits_per_dim(nll, d, data_scale)
    n = bpd.numel()
    se = float(bpd.std() / math.sqrt(n)) if n > 1 else float("nan")
    return BitsPerDim(float(bpd.mean()), se)
