r"""The reconstruction bound of each diffusion decoder in bits per dimension.

``<m>_reconstruction_bound_bpd`` — a *reconstruction* bound, not a bound on :math:`-\log p(x)`: the
score-matching bound of :math:`-\log p(x^m\mid z)` with the likelihood
weighting (whatever weighting the decoder trained with), dequantised, per dimension in bits, at the
posterior mean :math:`z = \mathbb E\,q(z\mid x)` of the first ``evaluation.bpd_examples`` test
examples, averaged over ``evaluation.bpd_draws`` diffusion times (mean ± standard error). It bounds
:math:`-\log p(x^m\mid z)` at one :math:`z` computed from all modalities (including :math:`x^m`), so
it measures how well the decoder reconstructs, not the model's marginal likelihood. (Metrics
written before this name held it as ``<m>_bound_bpd``.)
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..metrics.likelihood import diffusion_bpd
from .subsets import slice_batch

__all__ = ["diffusion_reconstruction_bound_bpd", "diffusion_bound_bpd"]


def diffusion_reconstruction_bound_bpd(vae, truth: Mapping, names: Sequence[str], ev, n: int) -> dict[str, dict]:
    """``{"<m>_reconstruction_bound_bpd": {"mean", "se", "examples"}}`` for every diffusion-decoded modality ``m``."""
    out = {}
    for m in names:
        if vae.modalities[m].is_diffusion:
            k = min(ev.bpd_examples, n)
            z = vae.posterior(slice_batch(truth, slice(0, k))).mean
            mean, se = diffusion_bpd(vae.modalities[m].decoder, truth[m][:k], z, num_draws=ev.bpd_draws)
            out[f"{m}_reconstruction_bound_bpd"] = {"mean": float(mean), "se": float(se), "examples": k}
    return out


diffusion_bound_bpd = diffusion_reconstruction_bound_bpd  # the name before it said what it bounds
