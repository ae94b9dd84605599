r"""The evaluation of a trained model: every number and picture a person wants, read from the data set's spec.

Which test examples and given subsets are scored is ``evaluation.protocol``
(:mod:`~pyro_diffmvae.evaluation.protocol`: ``standard`` — the whole test split and every given
subset — or ``quick``), recorded in ``metrics["protocol"]``; every rate has its standard error
``<key>_se`` and F1 / FD a seeded bootstrap SE (:mod:`~pyro_diffmvae.evaluation.uncertainty`);
:func:`evaluate` adds the bound ledger (:mod:`~pyro_diffmvae.evaluation.ledger`). The test
examples are generated and scored ``evaluation.batch_size`` at a time: only per-example scores and
features are kept.

:func:`evaluate` runs the routine the data set's :class:`~pyro_diffmvae.data.spec.EvaluationSpec`
names (:data:`ROUTINES`). Both generate, for every given subset :math:`S` of the modalities, the
others from :math:`z\sim q(z\mid x_S)` and score them against the test example; and both sample
unconditionally with :math:`z\sim\mathcal N(0, I)` and with the latent score prior.

``"labels"`` (:func:`evaluate_with_labels`; the protocol's given subsets):

* **coherence** (``<m>_coherence``, :mod:`~pyro_diffmvae.evaluation.coherence`) of every modality
  that is read back (clamped to [-1, 1] before a classifier reads it); ``coherence`` is the mean over
  the modalities not given (*missing targets only*, MMVAE+ / MultiVae), ``coherence_all_targets``
  the mean over every modality with the given ones regenerated from the same z
  (``<m>_coherence_regenerated``; MoPoE's convention; ``evaluation.coherence_all_targets``);
  ``coherence_by_num_given`` (and ``coherence_all_targets_by_num_given``) average them over the
  subsets of each size (the PolyMNIST table of the MoPoE and MMVAE+ papers);
* **balanced accuracy** (``<m>_balanced_accuracy``, ``evaluation.balanced_accuracy``): the mean of
  per-class recalls of the read-back labels;
* **F1** (``<m>_f1``) of generated binary modalities (``ModalitySpec.f1``) against the truth (paper
  Table 3); their ``<m>_label_f1`` would repeat it and is left out;
* **FD** (``<m>_FD_classifier`` or ``<m>_FID``, :mod:`~pyro_diffmvae.evaluation.frechet`) of every
  classifier-read modality, conditional and unconditional;
* **CLIP score** when the data set declares one (:mod:`~pyro_diffmvae.evaluation.clip`);
* unconditional **agreement**: the fraction of samples whose read-back modalities all give the same
  labels; the **latent linear probe** (:mod:`~pyro_diffmvae.evaluation.probe`).

The classifiers (:mod:`~pyro_diffmvae.evaluation.readback`) are the data set's published ones when
``evaluation.classifiers_dir`` is set, else trained on the first
``min(len(train), evaluation.classifier_train_size)`` training examples, the first tenth of them held
out for validation; ``metrics["classifier"][m]["source"]`` says which.

``"factors"`` (:func:`evaluate_factors`; every non-empty proper subset and all modalities, the
"all (reconstruction)" row):

* binary modalities: ``<m>_f1`` only; every other read-back modality: ``<m>_factor_acc``,
  ``<m>_all_factors`` and ``<m>_<group>`` for the spec's ``factor_groups`` (their ``_se`` the binomial
  SE on the protocol's examples; for ``factor_acc``, a mean over factors, an approximation);
* unconditional **agreement** of every pair of read-back modalities on the factors both carry, and
  the FD of the classifier-read modality (at most one: its FD is the row's ``FD_classifier``);
* the reconstruction bound of every diffusion decoder in bits/dim (:mod:`~pyro_diffmvae.evaluation.likelihood`);
* the unconditional FD of this routine has no standard error.

Its classifier (unless published) trains on the whole training split, validated on the first (at most
1000) test examples.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch

from ..data.registry import get_dataset
from ..data.spec import DatasetSpec, LabelSpec, ModalitySpec
from ..figures import figure_captions, save_conditional_figure, save_unconditional_figure
from ..metrics.f1 import per_example_f1
from ..model import MultimodalVAE
from .clip import caption_scorer
from .coherence import agree_per_example, factor_scores, pairwise_agreement
from .frechet import feature_fids, frechet_distance
from ..guidance import guidance_weight
from ..nets.hint import hint_start
from ..sampling_precision import sample_precision
from .ledger import bound_ledger
from .likelihood import diffusion_reconstruction_bound_bpd, joint_log_likelihood
from .probe import latent_probe
from .protocol import resolve_protocol
from .readback import clamp_classifier_inputs, label_classifier, read_labels
from .subsets import collate, given_subsets, restrict, slice_batch
from .uncertainty import (balanced_accuracy, binomial_se, bootstrap_fd_se, bootstrap_mean_se, fd_of_features,
                          mean_and_se)

__all__ = ["ROUTINES", "evaluate", "evaluate_with_labels", "evaluate_factors"]


def evaluate(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True,
             objective=None) -> dict:
    """Every metric of the data set's evaluation routine (module docstring), the joint log-likelihood
    (``metrics["joint_log_likelihood"]``, :func:`~pyro_diffmvae.evaluation.likelihood.joint_log_likelihood`)
    and the bound ledger
    (``metrics["ledger"]``, :mod:`~pyro_diffmvae.evaluation.ledger`: ``objective`` is the training
    objective, default the one bound to ``vae.conditional``); figures in ``out_dir/figures``."""
    dataset = get_dataset(cfg)
    if dataset.evaluation is None:
        raise ValueError(f"data set {dataset.name!r} declares no evaluation (DatasetSpec.evaluation is None); "
                         "set evaluation.enabled=false")
    routine = dataset.evaluation.routine
    if routine not in ROUTINES:
        raise ValueError(f"data set {dataset.name!r}: unknown evaluation routine {routine!r}; known: {sorted(ROUTINES)}")
    with (channels_last(cfg.evaluation, vae), guidance_weight(vae, cfg.evaluation.get("guidance")) as weights,
          sample_precision(vae, cfg.evaluation.get("sample_precision")) as precisions,
          hint_start(vae, cfg.evaluation.get("hint_start")) as starts):
        metrics = ROUTINES[routine](vae, test_set, train_set, cfg, out_dir, figures=figures)
        joint = joint_log_likelihood(vae, test_set, dataset.modalities(cfg), cfg.evaluation,
                                     _batch_size(cfg.evaluation), _device(vae))
    if joint is not None:
        metrics["joint_log_likelihood"] = joint
    if weights:
        metrics["guidance"] = weights
    if precisions:
        metrics["sample_precision"] = precisions
    if any(t0 is not None for t0 in starts.values()):
        metrics["hint_start"] = starts
    metrics["ledger"] = bound_ledger(vae, cfg, metrics, objective)
    return metrics


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


def _device(vae):
    """The device of the model's parameters (``None`` for a model without any)."""
    p = next(iter(vae.parameters()), None) if hasattr(vae, "parameters") else None
    return None if p is None else p.device


def _batch_size(ev) -> int:
    bs = ev.get("batch_size", 96)
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"evaluation.batch_size must be a positive integer, got {bs!r}")
    return int(bs)


def test_chunks(test_set, n: int, batch_size: int, progress: bool = False):
    """``(start, batch)`` for the first ``n`` test examples in chunks of ``batch_size``: the
    evaluation never holds the whole split, only per-example scores and features. ``progress``: a
    progress bar over the chunks on stderr (``trainer.progress_bar``)."""
    from tqdm.auto import tqdm

    starts = range(0, n, batch_size)
    for start in tqdm(starts, desc=f"evaluating {n} test examples", unit="chunk", disable=not progress):
        yield start, collate(test_set, range(start, min(n, start + batch_size)))


def _hits(read: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(n, F)`` bool: whether each read-back label equals the truth."""
    return read == labels


def _per_example_coherence(hits: torch.Tensor, spec: LabelSpec) -> torch.Tensor:
    """Per-example coherence value: several binary labels: the fraction right; else all right."""
    return hits.float().mean(1) if spec.multi_binary else hits.all(1).float()


def _balanced(hits: torch.Tensor, labels: torch.Tensor, spec: LabelSpec) -> tuple[float, float]:
    """Balanced accuracy (mean per-class recall) of read-back labels and its SE: per binary label
    then averaged (SEs combined as independent) for several binary labels, else over the classes of
    the joint label."""
    if spec.multi_binary:
        parts = [balanced_accuracy(hits[:, j], labels[:, j]) for j in range(labels.shape[1])]
        return (sum(p[0] for p in parts) / len(parts), math.sqrt(sum(p[1] ** 2 for p in parts)) / len(parts))
    classes = torch.unique(labels, dim=0, return_inverse=True)[1]
    return balanced_accuracy(hits.all(1), classes)


def _features(fid, x: torch.Tensor) -> torch.Tensor:
    """``(n, d)`` features of images in [-1, 1] in ``fid``'s feature space."""
    extractor = fid.extractor
    p = next(extractor.parameters(), None)
    f = extractor(x.clamp(-1.0, 1.0).to(p.device if p is not None else x.device))
    return f.reshape(f.shape[0], -1).double().cpu()


def _fd_with_se(real: torch.Tensor, fake: torch.Tensor, protocol, paired: bool) -> tuple[float, float | None]:
    fd = fd_of_features(real, fake)
    if not (protocol.fd_bootstrap and protocol.bootstrap):
        return fd, None
    return fd, bootstrap_fd_se(real, fake, protocol.bootstrap, protocol.bootstrap_seed, paired=paired)


@contextmanager
def channels_last(ev, *modules):
    """Within the block, the weights of the transposed convolutions in ``modules`` in the channels-last
    memory format when ``evaluation.channels_last`` (default true), restored to contiguous after it:
    the feed-forward image decoders, whose cost they are, run about 1.5x faster on the CPU so
    (``experiments/benchmarks/bench_evaluation.py`` measures the whole evaluation both ways; the UNets,
    measured too, gain nothing and are left as they are). The values, and so the results up to float
    round-off, are unchanged."""
    convs = ([c for m in modules for c in m.modules() if isinstance(c, torch.nn.ConvTranspose2d)]
             if ev.get("channels_last", True) else [])
    for conv in convs:
        conv.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        for conv in convs:
            conv.to(memory_format=torch.contiguous_format)


@contextmanager
def encode_once(vae):
    """Within the block, each modality's encoder runs once per input tensor: the given subsets of a
    chunk pass the same tensors (``restrict`` keeps them), so their experts are computed once instead
    of once per subset (15 times as often for PolyMNIST's 30 subsets). The encoders are deterministic
    in eval mode, so nothing changes but the cost."""
    patched = []
    for modality in getattr(vae, "modalities", {}).values():
        if "encode" in vars(modality):  # already patched (nested use)
            continue
        original, memo = modality.encode, {}

        def encode(x, *args, _original=original, _memo=memo, **kwargs):
            key = (id(x), args, tuple(sorted(kwargs.items())))
            hit = _memo.get(key)
            if hit is not None and hit[0] is x:
                return hit[1]
            out = _original(x, *args, **kwargs)
            _memo[key] = (x, out)
            return out

        modality.encode = encode
        patched.append(modality)
    try:
        yield
    finally:
        for modality in patched:
            del modality.encode


class _Scores:
    """Per-example scores accumulated over the test chunks, ``{(setting, key): [tensor, ...]}``."""

    def __init__(self):
        self.parts: dict = {}

    def add(self, setting, key: str, value: torch.Tensor) -> None:
        self.parts.setdefault((setting, key), []).append(value.detach().cpu())

    def get(self, setting, key: str) -> torch.Tensor | None:
        values = self.parts.get((setting, key))
        return None if values is None else torch.cat(values)


@torch.no_grad()
def evaluate_with_labels(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """The ``"labels"`` routine (module docstring), under ``evaluation.protocol``
    (:mod:`~pyro_diffmvae.evaluation.protocol`), in chunks of ``evaluation.batch_size`` test examples."""
    ev = cfg.evaluation
    names, dataset, specs, spec = _prepare(vae, cfg, train_set)
    protocol = resolve_protocol(ev, len(test_set), names)
    n, batch_size = protocol.num_examples, _batch_size(ev)
    classifiers, classifier_info = {}, {}
    n_train = min(len(train_set), int(ev.get("classifier_train_size", 10000)))
    for m in [m for m in names if specs[m].by_classifier]:
        def data(m=m):
            batch = collate(train_set, range(n_train))
            images, targets = batch[m], spec.labels_of(batch)
            n_val = max(1, n_train // 10)
            return images[n_val:], targets[n_val:], images[:n_val], targets[:n_val]

        classifiers[m], classifier_info[m] = label_classifier(cfg, dataset, m, n_train, spec, data)
    fids = feature_fids(ev, classifiers, _device(vae))
    fd_name = next(iter(fids.values())).metric_name if fids else None
    metrics: dict = {"num_examples": n, "protocol": protocol.record(), "sampler": ev.sampler,
                     "sampler_steps": ev.sampler_steps, "conditional": {}, "classifier": classifier_info,
                     "fd_name": fd_name}
    clip_truth = collate(test_set, range(n)) if dataset.evaluation.clip is not None and ev.get("clip_model") else {}
    clip = caption_scorer(dataset.evaluation.clip, vae, test_set, clip_truth, names, ev, metrics)

    scores, clip_sums = _Scores(), {}
    label_parts, probe_given = [], [[m] for m in names] + [list(names)]
    probe_latents: dict[str, list] = {}
    first_truth, conditional_images = None, {}
    progress = bool(cfg.get("trainer", {}).get("progress_bar", False))
    for start, truth in test_chunks(test_set, n, batch_size, progress=progress):
        labels = spec.labels_of(truth)
        label_parts.append(labels)
        if first_truth is None:
            first_truth = truth
        for m in fids:
            scores.add("real", m, _features(fids[m], truth[m]))
        for given in probe_given:
            key = "+".join(given) if len(given) < len(names) else "all"
            probe_latents.setdefault(key, []).append(vae.posterior(truth, given=given).mean.cpu())
        with encode_once(vae):  # the chunk's experts once for all its given subsets
            for given in protocol.given_subsets:
                setting = "+".join(given)
                missing = [m for m in names if m not in given]
                targets = names if protocol.all_targets else missing
                gen = vae.generate(restrict(truth, given), given=list(given), targets=targets,
                                   sampler=ev.sampler, steps=ev.sampler_steps)
                for t in targets:
                    x = clamp_classifier_inputs(t, gen[t].cpu(), classifiers)
                    read = read_labels(t, x, specs[t], classifiers)
                    if t in given:  # the all-targets convention: a given modality regenerated
                        if read is not None:
                            scores.add(setting, f"{t}_regenerated_hits", _hits(read, labels))
                        continue
                    if read is not None:
                        scores.add(setting, f"{t}_hits", _hits(read, labels))
                        if spec.multi_binary and not specs[t].f1:  # read directly: its label F1 is <m>_f1
                            scores.add(setting, f"{t}_label_f1", per_example_f1(read.bool(), labels.bool()))
                    if specs[t].f1:
                        scores.add(setting, f"{t}_f1", per_example_f1(x > 0.5, truth[t] > 0.5))
                    if t in fids:
                        scores.add(setting, f"{t}_features", _features(fids[t], x))
                    if clip is not None and clip.applies(t, given):
                        k = x.shape[0]
                        s, c = clip_sums.get(setting, (0.0, 0))
                        clip_sums[setting] = (s + k * clip.score(x, clip.captions[start:start + k]), c + k)
                if start == 0 and len(conditional_images) < len(names):  # the single-modality rows of the figure
                    conditional_images[setting] = {t: gen[t] for t in missing}
    labels = torch.cat(label_parts)

    by_size: dict[int, dict[str, list]] = {}
    for given in protocol.given_subsets:
        setting = "+".join(given)
        row: dict[str, float] = {}
        missing = [m for m in names if m not in given]
        per_example, per_example_all, balanced = [], [], []
        for t in names:
            hits = scores.get(setting, f"{t}_hits")
            if hits is not None:
                value = _per_example_coherence(hits, spec)
                per_example.append(value)
                per_example_all.append(value)
                row[f"{t}_coherence"], row[f"{t}_coherence_se"] = mean_and_se(value)
                if protocol.balanced_accuracy:
                    row[f"{t}_balanced_accuracy"], row[f"{t}_balanced_accuracy_se"] = _balanced(hits, labels, spec)
                    balanced.append((row[f"{t}_balanced_accuracy"], row[f"{t}_balanced_accuracy_se"]))
            regenerated = scores.get(setting, f"{t}_regenerated_hits")
            if regenerated is not None:
                value = _per_example_coherence(regenerated, spec)
                per_example_all.append(value)
                row[f"{t}_coherence_regenerated"], row[f"{t}_coherence_regenerated_se"] = mean_and_se(value)
            for key in (f"{t}_label_f1", f"{t}_f1"):
                f1 = scores.get(setting, key)
                if f1 is not None:
                    row[key] = float(f1.mean())
                    if protocol.bootstrap:
                        row[f"{key}_se"] = bootstrap_mean_se(f1, protocol.bootstrap, protocol.bootstrap_seed)
            fake = scores.get(setting, f"{t}_features")
            if fake is not None:
                fd, se = _fd_with_se(scores.get("real", t), fake, protocol, paired=True)
                row[f"{t}_{fd_name}"] = fd
                if se is not None:
                    row[f"{t}_{fd_name}_se"] = se
            if setting in clip_sums and t in missing and clip.applies(t, given):
                s, c = clip_sums[setting]
                row[f"{t}_clip_score"] = s / c
        if per_example:
            row_value = torch.stack(per_example).mean(0)
            row["coherence"], row["coherence_se"] = mean_and_se(row_value)
            by_size.setdefault(len(given), {"missing": [], "all": []})["missing"].append(row_value)
        if per_example_all and protocol.all_targets:
            row_all = torch.stack(per_example_all).mean(0)
            row["coherence_all_targets"], row["coherence_all_targets_se"] = mean_and_se(row_all)
            by_size.setdefault(len(given), {"missing": [], "all": []})["all"].append(row_all)
        if balanced:
            row["balanced_accuracy"] = sum(b[0] for b in balanced) / len(balanced)
            row["balanced_accuracy_se"] = math.sqrt(sum(b[1] ** 2 for b in balanced)) / len(balanced)
        metrics["conditional"][setting] = row
    for key, which in [("coherence_by_num_given", "missing"), ("coherence_all_targets_by_num_given", "all")]:
        values = {str(k): mean_and_se(torch.stack(v[which]).mean(0)) for k, v in sorted(by_size.items()) if v[which]}
        if values:
            metrics[key] = {k: v[0] for k, v in values.items()}
            metrics[f"{key}_se"] = {k: v[1] for k, v in values.items()}

    metrics["unconditional"] = {}
    samples = {}
    for prior, chunks in _unconditional_chunks(vae, cfg, n, batch_size):
        agree, fake = [], {m: [] for m in fids}
        for gen in chunks:
            samples.setdefault(prior, gen)
            gen = {m: clamp_classifier_inputs(m, x.cpu(), classifiers) for m, x in gen.items()}
            reads = [r for r in (read_labels(m, gen[m], specs[m], classifiers) for m in names) if r is not None]
            if len(reads) >= 2:
                agree.append(agree_per_example(reads))
            for m in fids:
                fake[m].append(_features(fids[m], gen[m]))
        row = {}
        if agree:
            row["agreement"], row["agreement_se"] = mean_and_se(torch.cat(agree).float())
        for m in fids:
            fd, se = _fd_with_se(scores.get("real", m), torch.cat(fake[m]), protocol, paired=False)
            row[f"{m}_{fd_name}"] = fd
            if se is not None:
                row[f"{m}_{fd_name}_se"] = se
        metrics["unconditional"][prior] = row

    test_latents = {k: torch.cat(v) for k, v in probe_latents.items()}
    metrics["latent_linear_accuracy"] = latent_probe(vae, train_set, None, labels, spec, names, ev,
                                                     test_latents=test_latents)
    metrics["latent_linear_accuracy_se"] = {k: binomial_se(v, n) for k, v in metrics["latent_linear_accuracy"].items()}
    if figures:
        _save_figures(out_dir, first_truth, conditional_images, samples, names, cfg)
    return metrics


def _unconditional_chunks(vae, cfg, num: int, batch_size: int):
    """``(prior, chunks)`` as :func:`_unconditional_samples`, ``num`` samples drawn ``batch_size`` at a time."""
    ev = cfg.evaluation
    for prior in ["normal", "score"]:
        if prior == "score" and vae.latent_prior is None:
            continue
        sizes = [min(batch_size, num - i) for i in range(0, num, batch_size)]
        yield prior, (vae.sample(k, prior=prior, sampler=ev.sampler, steps=ev.sampler_steps,
                                 prior_sampler=cfg.latent_prior.sampler, prior_steps=cfg.latent_prior.sampler_steps)
                      for k in sizes)


@torch.no_grad()
def evaluate_factors(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """The ``"factors"`` routine (module docstring)."""
    ev = cfg.evaluation
    names, dataset, specs, spec = _prepare(vae, cfg, train_set)
    groups = dataset.evaluation.factor_groups
    protocol = resolve_protocol(ev, len(test_set), names)
    n, batch_size = protocol.num_examples, _batch_size(ev)
    # a DataLoader's iterator draws its base seed from the global RNG: the draws after it (and so the
    # numbers) are those of every run evaluated with this routine so far
    truth = next(iter(torch.utils.data.DataLoader(test_set, batch_size=n, shuffle=False)))
    factors = spec.labels_of(truth)
    read_by_classifier = [m for m in names if specs[m].by_classifier]
    if len(read_by_classifier) > 1:
        raise ValueError(f"data set {dataset.name!r}: the factors routine reads at most one modality by a classifier, "
                         f"{read_by_classifier} are; use the labels routine")
    classifiers, classifier_info = {}, {}
    for m in read_by_classifier:
        def data(m=m):
            train = collate(train_set, range(len(train_set)))
            val = collate(test_set, range(min(len(test_set), 1000)))
            return train[m], spec.labels_of(train), val[m], spec.labels_of(val)

        classifiers[m], classifier_info[m] = label_classifier(cfg, dataset, m, len(train_set), spec, data)
    metrics: dict = {"num_examples": n, "protocol": protocol.record(), "sampler": ev.sampler,
                     "sampler_steps": ev.sampler_steps, "conditional": {}, "classifier": classifier_info}
    conditional_images = {}
    for given in given_subsets(names) + [tuple(names)]:  # this routine scores every given subset
        targets = [m for m in names if m not in given] or names
        chunks = [vae.generate(restrict(slice_batch(truth, slice(i, i + batch_size)), given), given=list(given),
                               targets=targets, sampler=ev.sampler, steps=ev.sampler_steps)
                  for i in range(0, n, batch_size)]
        gen = {t: torch.cat([c[t].cpu() for c in chunks]) for t in targets}
        key = "+".join(given) if len(given) < len(names) else "all (reconstruction)"
        row = {}
        for t in targets:
            x = gen[t]
            if specs[t].f1:
                f1 = per_example_f1(x > 0.5, truth[t] > 0.5)
                row[f"{t}_f1"] = float(f1.mean())
                if protocol.bootstrap:
                    row[f"{t}_f1_se"] = bootstrap_mean_se(f1, protocol.bootstrap, protocol.bootstrap_seed)
                continue
            read = read_labels(t, x, specs[t], classifiers)
            if read is not None:
                for name, value in factor_scores(t, read, factors, groups).items():
                    row[name], row[f"{name}_se"] = value, binomial_se(value, n)
        metrics["conditional"][key] = row
        conditional_images[key] = gen

    metrics["unconditional"] = {}
    fd_name = None
    fids = feature_fids(ev, classifiers, _device(vae))
    samples = {}
    for prior, gen in _unconditional_samples(vae, cfg, ev.num_unconditional):
        samples[prior] = gen
        reads = {m: read_labels(m, gen[m].cpu(), specs[m], classifiers) for m in names}
        row = {"agreement": pairwise_agreement({m: r for m, r in reads.items() if r is not None})}
        row["agreement_se"] = binomial_se(row["agreement"], ev.num_unconditional)
        for m, fid in fids.items():  # a feed-forward mean may overshoot the data range
            row[fid.metric_name] = frechet_distance(fid, truth[m], gen[m].cpu().clamp(-1.0, 1.0))
            fd_name = fid.metric_name
        metrics["unconditional"][prior] = row
    metrics.update(diffusion_reconstruction_bound_bpd(vae, truth, names, ev, n))
    metrics["fd_name"] = fd_name
    if figures:
        _save_figures(out_dir, truth, conditional_images, samples, names, cfg)
    return metrics


#: routine name (``EvaluationSpec.routine``) → ``(vae, test_set, train_set, cfg, out_dir, figures) -> metrics``
ROUTINES = {"labels": evaluate_with_labels, "factors": evaluate_factors}
