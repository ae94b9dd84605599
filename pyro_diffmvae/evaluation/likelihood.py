r"""The likelihood bound of each diffusion decoder in bits per dimension.

``<m>_bound_bpd``: the score-matching bound of :math:`-\log p(x^m\mid z)` with the likelihood
weighting (whatever weighting the decoder trained with), dequantised, per dimension in bits, at the
posterior mean :math:`z = \mathbb E\,q(z\mid x)` of the first ``evaluation.bpd_examples`` test
examples, averaged over ``evaluation.bpd_draws`` diffusion times (mean ± standard error).
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..metrics.likelihood import diffusion_bpd
from .subsets import slice_batch

__all__ = ["diffusion_bound_bpd"]


def diffusion_bound_bpd(vae, truth: Mapping, names: Sequence[str], ev, n: int) -> dict[str, dict]:
    """``{"<m>_bound_bpd": {"mean", "se", "examples"}}`` for every diffusion-decoded modality ``m``."""
    out = {}
    for m in names:
        if vae.modalities[m].is_diffusion:
            k = min(ev.bpd_examples, n)
            z = vae.posterior(slice_batch(truth, slice(0, k))).mean
            mean, se = diffusion_bpd(vae.modalities[m].decoder, truth[m][:k], z, num_draws=ev.bpd_draws)
            out[f"{m}_bound_bpd"] = {"mean": float(mean), "se": float(se), "examples": k}
    return out
