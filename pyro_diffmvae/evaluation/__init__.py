r"""Evaluation of a trained model, generic over data sets: everything data-set specific is read from
the data set's :class:`~pyro_diffmvae.data.spec.DatasetSpec` (its modalities' read-back, its labels,
its evaluation routine, its CLIP score).

One concept a module:

* :mod:`~pyro_diffmvae.evaluation.protocol` — the evaluation protocol (``standard`` / ``quick``) and
  the coherence conventions;
* :mod:`~pyro_diffmvae.evaluation.uncertainty` — standard errors (binomial, bootstrap);
* :mod:`~pyro_diffmvae.evaluation.ledger` — the bound ledger (what was trained, what is a bound);
* :mod:`~pyro_diffmvae.evaluation.subsets` — the given subsets and the test batch;
* :mod:`~pyro_diffmvae.evaluation.readback` — generated modalities read back into labels (label
  classifiers trained on the training split, cached; the spec's reader functions);
* :mod:`~pyro_diffmvae.evaluation.coherence` — coherence, factor accuracy, agreement;
* :mod:`~pyro_diffmvae.evaluation.frechet` — Fréchet distances;
* :mod:`~pyro_diffmvae.evaluation.likelihood` — diffusion decoders' reconstruction bound in bits/dim;
* :mod:`~pyro_diffmvae.evaluation.probe` — latent linear classification;
* :mod:`~pyro_diffmvae.evaluation.clip` — CLIP score of generated images against captions;
* :mod:`~pyro_diffmvae.evaluation.report` — ``report.md`` and ``metrics.json``;
* :mod:`~pyro_diffmvae.evaluation.routines` — :func:`evaluate` and the routines it dispatches to.
"""

from ..data.shapes import mask_to_factors  # the shapes mask reader, where it was imported from before
from .coherence import all_agree, factor_scores, label_scores, pairwise_agreement
from .ledger import bound_ledger, conditional_name
from .probe import latent_probe, linear_probe_accuracy
from .protocol import PROTOCOLS, resolve_protocol
from .readback import read_labels
from .report import save_metrics, write_report
from .routines import ROUTINES, evaluate, evaluate_factors, evaluate_with_labels
from .subsets import collate, given_subsets, restrict, slice_batch

_agreement = pairwise_agreement  # the name tests used before the package

__all__ = ["ROUTINES", "evaluate", "evaluate_with_labels", "evaluate_factors", "given_subsets", "slice_batch",
           "restrict", "collate", "read_labels", "label_scores", "factor_scores", "pairwise_agreement", "all_agree",
           "linear_probe_accuracy", "latent_probe", "write_report", "save_metrics", "mask_to_factors", "PROTOCOLS",
           "resolve_protocol", "bound_ledger", "conditional_name"]
