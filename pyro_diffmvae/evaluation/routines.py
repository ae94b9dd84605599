r"""The evaluation of a trained model: every number and picture a person wants, read from the data set's spec.

:func:`evaluate` runs the routine the data set's :class:`~pyro_diffmvae.data.spec.EvaluationSpec`
names (:data:`ROUTINES`). Both generate, for every given subset :math:`S` of the modalities, the
others from :math:`z\sim q(z\mid x_S)` and score them against the test example; and both sample
unconditionally with :math:`z\sim\mathcal N(0, I)` and with the latent score prior.

``"labels"`` (:func:`evaluate_with_labels`; every non-empty proper subset, optionally at most
``evaluation.max_subsets_per_size`` per size):

* **coherence** (``<m>_coherence``, :mod:`~pyro_diffmvae.evaluation.coherence`) of every modality
  that is read back (clamped to [-1, 1] before a classifier reads it); ``coherence`` is the mean over
  the generated modalities, ``coherence_by_num_given`` averages it over the subsets of each size (the
  PolyMNIST table of the MoPoE and MMVAE+ papers);
* **F1** (``<m>_f1``) of generated binary modalities (``ModalitySpec.f1``) against the truth (paper
  Table 3); their ``<m>_label_f1`` would repeat it and is left out;
* **FD** (``<m>_FD_classifier`` or ``<m>_FID``, :mod:`~pyro_diffmvae.evaluation.frechet`) of every
  classifier-read modality, conditional and unconditional;
* **CLIP score** when the data set declares one (:mod:`~pyro_diffmvae.evaluation.clip`);
* unconditional **agreement**: the fraction of samples whose read-back modalities all give the same
  labels; the **latent linear probe** (:mod:`~pyro_diffmvae.evaluation.probe`).

The classifiers train on the first ``min(len(train), evaluation.classifier_train_size)`` training
examples, the first tenth of them held out for validation.

``"factors"`` (:func:`evaluate_factors`; every non-empty proper subset and all modalities, the
"all (reconstruction)" row):

* binary modalities: ``<m>_f1`` only; every other read-back modality: ``<m>_factor_acc``,
  ``<m>_all_factors`` and ``<m>_<group>`` for the spec's ``factor_groups``;
* unconditional **agreement** of every pair of read-back modalities on the factors both carry, and
  the FD of the classifier-read modality (at most one: its FD is the row's ``FD_classifier``);
* the likelihood bound of every diffusion decoder in bits/dim (:mod:`~pyro_diffmvae.evaluation.likelihood`).

Its classifier trains on the whole training split, validated on the first (at most 1000) test examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..data.registry import get_dataset
from ..data.spec import DatasetSpec, LabelSpec, ModalitySpec
from ..figures import figure_captions, save_conditional_figure, save_unconditional_figure
from ..metrics.f1 import sample_f1
from ..model import MultimodalVAE
from .clip import caption_scorer
from .coherence import all_agree, factor_scores, label_scores, pairwise_agreement
from .frechet import feature_fid, frechet_distance
from .likelihood import diffusion_bound_bpd
from .probe import latent_probe
from .readback import clamp_classifier_inputs, load_or_train_label_classifier, read_labels
from .subsets import collate, given_subsets, restrict

__all__ = ["ROUTINES", "evaluate", "evaluate_with_labels", "evaluate_factors"]


def evaluate(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """Every metric of the data set's evaluation routine (module docstring); figures in ``out_dir/figures``."""
    dataset = get_dataset(cfg)
    if dataset.evaluation is None:
        raise ValueError(f"data set {dataset.name!r} declares no evaluation (DatasetSpec.evaluation is None); "
                         "set evaluation.enabled=false")
    routine = dataset.evaluation.routine
    if routine not in ROUTINES:
        raise ValueError(f"data set {dataset.name!r}: unknown evaluation routine {routine!r}; known: {sorted(ROUTINES)}")
    return ROUTINES[routine](vae, test_set, train_set, cfg, out_dir, figures=figures)


def _prepare(vae, cfg, train_set) -> tuple[list[str], DatasetSpec, dict[str, ModalitySpec], LabelSpec]:
    """The model in eval mode; its modality names, the data set's spec, their modality specs and the labels."""
    vae.eval()
    names = list(vae.names)
    dataset = get_dataset(cfg)
    specs = dataset.modalities(cfg)
    return names, dataset, {m: specs[m] for m in names}, dataset.evaluation.labels(cfg, train_set)


def _save_figures(out_dir: Path, truth, conditional, samples, names, cfg) -> None:
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    captions = figure_captions(cfg, names)
    save_conditional_figure(truth, conditional, names, fig_dir / "conditional.png", captions=captions)
    save_unconditional_figure(samples, names, fig_dir / "unconditional.png", captions=captions)


def _unconditional_samples(vae, cfg, num: int):
    """``(prior, samples)`` for N(0, I) and, when the model has one, the latent score prior."""
    ev = cfg.evaluation
    for prior in ["normal", "score"]:
        if prior == "score" and vae.latent_prior is None:
            continue
        yield prior, vae.sample(num, prior=prior, sampler=ev.sampler, steps=ev.sampler_steps,
                                prior_sampler=cfg.latent_prior.sampler, prior_steps=cfg.latent_prior.sampler_steps)


@torch.no_grad()
def evaluate_with_labels(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """The ``"labels"`` routine (module docstring)."""
    ev = cfg.evaluation
    names, dataset, specs, spec = _prepare(vae, cfg, train_set)
    n = min(ev.num_examples, len(test_set))
    truth = collate(test_set, range(n))
    labels = spec.labels_of(truth)
    classifiers, classifier_info = {}, {}
    n_train = min(len(train_set), int(ev.get("classifier_train_size", 10000)))
    for m in [m for m in names if specs[m].by_classifier]:
        def data(m=m):
            batch = collate(train_set, range(n_train))
            images, targets = batch[m], spec.labels_of(batch)
            n_val = max(1, n_train // 10)
            return images[n_val:], targets[n_val:], images[:n_val], targets[:n_val]

        classifiers[m], classifier_info[m] = load_or_train_label_classifier(cfg, dataset, m, n_train, spec, data)
    fids = {m: feature_fid(ev, classifiers[m]) for m in classifiers}
    fd_name = next(iter(fids.values())).metric_name if fids else None
    metrics: dict = {"num_examples": n, "sampler": ev.sampler, "sampler_steps": ev.sampler_steps, "conditional": {},
                     "classifier": classifier_info, "fd_name": fd_name}
    clip = caption_scorer(dataset.evaluation.clip, vae, test_set, truth, names, ev, metrics)

    conditional_images = {}
    for given in given_subsets(names, ev.get("max_subsets_per_size", None)):
        targets = [m for m in names if m not in given]
        gen = vae.generate(restrict(truth, given), given=list(given), targets=targets,
                           sampler=ev.sampler, steps=ev.sampler_steps)
        row: dict[str, float] = {}
        coherences = []
        for t in targets:
            x = clamp_classifier_inputs(t, gen[t].cpu(), classifiers)
            read = read_labels(t, x, specs[t], classifiers)
            if read is not None:
                scores = label_scores(t, read, labels, spec)
                if specs[t].f1:  # read directly: its label F1 is the <m>_f1 below
                    scores.pop(f"{t}_label_f1", None)
                row.update(scores)
                coherences.append(scores[f"{t}_coherence"])
            if specs[t].f1:
                row[f"{t}_f1"] = sample_f1(x > 0.5, truth[t] > 0.5)
            if t in fids:
                row[f"{t}_{fd_name}"] = frechet_distance(fids[t], truth[t], x)
            if clip is not None and clip.applies(t, given):
                row[f"{t}_clip_score"] = clip(x)
        if coherences:
            row["coherence"] = sum(coherences) / len(coherences)
        metrics["conditional"]["+".join(given)] = row
        conditional_images["+".join(given)] = gen
    by_size: dict[int, list[float]] = {}
    for given, row in metrics["conditional"].items():
        if "coherence" in row:
            by_size.setdefault(len(given.split("+")), []).append(row["coherence"])
    metrics["coherence_by_num_given"] = {str(k): sum(v) / len(v) for k, v in sorted(by_size.items())}

    metrics["unconditional"] = {}
    samples = {}
    for prior, gen in _unconditional_samples(vae, cfg, n):
        samples[prior] = gen
        gen = {m: clamp_classifier_inputs(m, x.cpu(), classifiers) for m, x in gen.items()}
        reads = [r for r in (read_labels(m, gen[m], specs[m], classifiers) for m in names) if r is not None]
        row = {}
        if len(reads) >= 2:
            row["agreement"] = all_agree(reads)
        for m in fids:
            row[f"{m}_{fd_name}"] = frechet_distance(fids[m], truth[m], gen[m])
        metrics["unconditional"][prior] = row

    metrics["latent_linear_accuracy"] = latent_probe(vae, train_set, truth, labels, spec, names, ev)
    if figures:
        shown = dict(list(conditional_images.items())[: len(names)])  # the single-modality rows
        _save_figures(out_dir, truth, shown, samples, names, cfg)
    return metrics


@torch.no_grad()
def evaluate_factors(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """The ``"factors"`` routine (module docstring)."""
    ev = cfg.evaluation
    names, dataset, specs, spec = _prepare(vae, cfg, train_set)
    groups = dataset.evaluation.factor_groups
    n = min(ev.num_examples, len(test_set))
    # a DataLoader's iterator draws its base seed from the global RNG: the draws after it (and so the
    # numbers) are those of every run evaluated with this routine so far
    truth = next(iter(torch.utils.data.DataLoader(test_set, batch_size=n, shuffle=False)))
    factors = spec.labels_of(truth)
    read_by_classifier = [m for m in names if specs[m].by_classifier]
    if len(read_by_classifier) > 1:
        raise ValueError(f"data set {dataset.name!r}: the factors routine reads at most one modality by a classifier, "
                         f"{read_by_classifier} are; use the labels routine")
    classifiers, classifier_info = {}, None
    for m in read_by_classifier:
        def data(m=m):
            train = collate(train_set, range(len(train_set)))
            val = collate(test_set, range(min(len(test_set), 1000)))
            return train[m], spec.labels_of(train), val[m], spec.labels_of(val)

        classifiers[m], classifier_info = load_or_train_label_classifier(cfg, dataset, m, len(train_set), spec, data)
    metrics: dict = {"num_examples": n, "sampler": ev.sampler, "sampler_steps": ev.sampler_steps, "conditional": {},
                     "classifier": classifier_info}
    conditional_images = {}
    for given in given_subsets(names) + [tuple(names)]:
        targets = [m for m in names if m not in given] or names
        gen = vae.generate(restrict(truth, given), given=list(given), targets=targets,
                           sampler=ev.sampler, steps=ev.sampler_steps)
        key = "+".join(given) if len(given) < len(names) else "all (reconstruction)"
        row = {}
        for t in targets:
            x = gen[t].cpu()
            if specs[t].f1:
                row[f"{t}_f1"] = sample_f1(x > 0.5, truth[t] > 0.5)
                continue
            read = read_labels(t, x, specs[t], classifiers)
            if read is not None:
                row.update(factor_scores(t, read, factors, groups))
        metrics["conditional"][key] = row
        conditional_images[key] = gen

    metrics["unconditional"] = {}
    fd_name = None
    fids = {m: feature_fid(ev, classifiers[m]) for m in classifiers}
    samples = {}
    for prior, gen in _unconditional_samples(vae, cfg, ev.num_unconditional):
        samples[prior] = gen
        reads = {m: read_labels(m, gen[m].cpu(), specs[m], classifiers) for m in names}
        row = {"agreement": pairwise_agreement({m: r for m, r in reads.items() if r is not None})}
        for m, fid in fids.items():  # a feed-forward mean may overshoot the data range
            row[fid.metric_name] = frechet_distance(fid, truth[m], gen[m].cpu().clamp(-1.0, 1.0))
            fd_name = fid.metric_name
        metrics["unconditional"][prior] = row
    metrics.update(diffusion_bound_bpd(vae, truth, names, ev, n))
    metrics["fd_name"] = fd_name
    if figures:
        _save_figures(out_dir, truth, conditional_images, samples, names, cfg)
    return metrics


#: routine name (``EvaluationSpec.routine``) → ``(vae, test_set, train_set, cfg, out_dir, figures) -> metrics``
ROUTINES = {"labels": evaluate_with_labels, "factors": evaluate_factors}
