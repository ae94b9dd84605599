r"""Evaluation on the paper's data sets through labels: PolyMNIST, CelebAMask-HQ, CUB.

Each data set carries per-example *labels* that every modality should agree on:

============== ====================================== =================================================
data set       labels (``factor_sizes``)              how a modality is read back into labels
============== ====================================== =================================================
PolyMNIST      the digit (10)                         image modalities: a digit classifier per modality
CelebAMask-HQ  the 18 paper attributes (2 each)       image: an attribute classifier; attributes: >0.5
CUB            the bird class (as many as present)    image: a class classifier; text: not read
============== ====================================== =================================================

The image classifiers (:class:`~pyro_diffmvae.metrics.coherence.FactorClassifier`) are trained on
the training split once and cached. For every given subset :math:`S` (every non-empty proper
subset, optionally at most ``evaluation.max_subsets_per_size`` per size), the other modalities are
generated from :math:`z\sim q(z\mid x_S)` and scored:

* **coherence** (``<m>_coherence``): the fraction of generated ``m`` whose labels, read back,
  equal the test example's (for several binary labels: the mean per-label accuracy, and the
  sample-average F1 of the read-back labels, ``<m>_label_f1``); ``coherence`` is the mean over the
  generated modalities, and ``coherence_by_num_given`` averages it over the subsets of each size
  (the PolyMNIST table of the MoPoE and MMVAE+ papers);
* **F1** of generated binary modalities (attributes, masks) against the truth (paper Table 3);
* **FD** of generated images against real test images in the classifier's penultimate feature
  space (``FD_classifier``), or Inception FID when ``evaluation.inception_weights`` is given.

Unconditional generation (N(0, I) and the latent score prior): agreement — the fraction of samples
whose read-back modalities all agree on every label — and FD per image modality. Latent linear
classification: a linear probe from the posterior mean of each single modality (and of all) to
the labels, trained on training examples and scored on the test examples.

**CLIP score** (CUB, when ``evaluation.clip_model`` names a local CLIP folder; paper Table 2):
``100 * max(cos(E_image, E_caption), 0)`` averaged over the test examples
(:class:`~pyro_diffmvae.metrics.clip_score.CLIPScore`), where the caption is the exact line of the
caption file each test example was tokenised from (``caption_text``; not the lossy decoding of its
word-level ids, which lower-cases and turns unseen words into ``<unk>``). It is reported for the
images generated from every given subset holding ``text`` (``conditional[<given>]["image_clip_score"]``,
given ``text`` alone in Table 2) and, as a reference, for the real test images against their own
captions (``reference["real_images_clip_score"]``); ``clip_model`` records the folder (``None``: no
CLIP score was computed).

With a few hundred evaluation images an FD is biased upwards (its bias falls like 1/N); compare
FDs only at the same ``num_examples``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch

from .metrics.coherence import FactorClassifier, load_or_train_classifier, predict_factors, train_factor_classifier
from .metrics.f1 import sample_f1
from .metrics.fid import FeatureFID
from .evaluation import given_subsets, slice_batch
from .model import MultimodalVAE

__all__ = ["LabelSpec", "label_spec", "evaluate_with_labels", "linear_probe_accuracy", "given_subsets"]


class LabelSpec:
    """What the labels of a data set are and how each modality is read back into them.

    :param factor_sizes: number of classes of each label column.
    :param labels_of: ``batch -> (N, F)`` long labels of real examples.
    :param image_modalities: modalities read by an image classifier trained on the training split.
    :param direct_readers: ``{modality: x -> (N, F) labels}`` for modalities that carry the labels
        themselves (e.g. attribute vectors).
    :param binary_modalities: modalities scored by F1 against the truth (attributes, masks).
    """

    def __init__(self, factor_sizes: Sequence[int], labels_of: Callable[[Mapping], torch.Tensor],
                 image_modalities: Sequence[str], direct_readers: Mapping[str, Callable] | None = None,
                 binary_modalities: Sequence[str] = ()):
        self.factor_sizes = [int(k) for k in factor_sizes]
        self.labels_of = labels_of
        self.image_modalities = list(image_modalities)
        self.direct_readers = dict(direct_readers or {})
        self.binary_modalities = list(binary_modalities)

    @property
    def multi_binary(self) -> bool:
        return len(self.factor_sizes) > 1 and all(k == 2 for k in self.factor_sizes)


def label_spec(cfg, names: Sequence[str], train_set) -> LabelSpec:
    """The :class:`LabelSpec` of ``cfg.dataset.name`` for the modalities ``names``."""
    name = cfg.dataset.name
    if name == "polymnist":
        return LabelSpec([10], lambda b: b["meta"]["label"].reshape(-1, 1).long(), image_modalities=list(names))
    if name == "celebamask_hq":
        k = len(cfg.dataset.attributes)
        readers = {"attributes": lambda x: (x > 0.5).long()} if "attributes" in names else {}
        return LabelSpec([2] * k, lambda b: (b["attributes"] > 0.5).long(),
                         image_modalities=[m for m in names if m == "image"], direct_readers=readers,
                         binary_modalities=[m for m in names if m in ("attributes", "mask")])
    if name == "cub":
        class_ids = getattr(train_set, "class_ids", None)  # the CUB data set knows them without decoding images
        if class_ids is None:
            class_ids = [train_set[i]["meta"]["class_id"] for i in range(len(train_set))]
        classes = sorted({int(c) for c in class_ids})
        index = {c: j for j, c in enumerate(classes)}

        def labels_of(b):
            return torch.tensor([index.get(int(c), -1) for c in b["meta"]["class_id"]]).reshape(-1, 1)

        return LabelSpec([len(classes)], labels_of, image_modalities=[m for m in names if m == "image"])
    raise ValueError(f"no label-based evaluation for dataset {name!r}; known: polymnist, celebamask_hq, cub")


def _collate(dataset, indices: Sequence[int]) -> dict:
    return torch.utils.data.default_collate([dataset[i] for i in indices])


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


def _classifier_for(modality: str, train_set, spec: LabelSpec, cfg) -> tuple[FactorClassifier, dict | None]:
    """A label classifier of one image modality, trained on (at most ``classifier_train_size``) training examples, cached."""
    ev = cfg.evaluation
    n = min(len(train_set), int(ev.get("classifier_train_size", 10000)))
    ident = f"{cfg.dataset.name}|{cfg.dataset.get('root', '')}|{modality}|n{n}|steps{ev.classifier_steps}|{spec.factor_sizes}"
    key = hashlib.sha1(ident.encode()).hexdigest()[:16]
    path = Path(ev.classifier_cache) / f"{cfg.dataset.name}_{modality}_{key}.pt"

    def train():
        batch = _collate(train_set, range(n))
        images, labels = batch[modality], spec.labels_of(batch)
        n_val = max(1, n // 10)
        with torch.enable_grad():
            return train_factor_classifier(images[n_val:], labels[n_val:], spec.factor_sizes, val_images=images[:n_val],
                                           val_factors=labels[:n_val], steps=ev.classifier_steps, seed=0)

    return load_or_train_classifier(path, train)


def _as_data(modality: str, x: torch.Tensor, classifiers: Mapping) -> torch.Tensor:
    """Generated images clamped to the data range [-1, 1] (a feed-forward decoder's mean may overshoot it)."""
    return x.clamp(-1.0, 1.0) if modality in classifiers else x


def _read(modality: str, x: torch.Tensor, spec: LabelSpec, classifiers: Mapping) -> torch.Tensor | None:
    if modality in classifiers:
        return predict_factors(classifiers[modality], x)
    if modality in spec.direct_readers:
        return spec.direct_readers[modality](x)
    return None


def _label_scores(modality: str, read: torch.Tensor, labels: torch.Tensor, spec: LabelSpec) -> dict[str, float]:
    if spec.multi_binary:
        return {f"{modality}_coherence": (read == labels).float().mean().item(),
                f"{modality}_label_f1": sample_f1(read.bool(), labels.bool())}
    return {f"{modality}_coherence": (read == labels).all(1).float().mean().item()}


def _fd(fid: FeatureFID, real: torch.Tensor, fake: torch.Tensor) -> float:
    fid.reset()
    fid.update(real, real=True)
    fid.update(fake, real=False)
    return float(fid.compute())


@torch.no_grad()
def evaluate_with_labels(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """Every metric of the module docstring; figures of conditional and unconditional samples."""
    from .figures import save_conditional_figure, save_unconditional_figure

    ev = cfg.evaluation
    vae.eval()
    names = list(vae.names)
    spec = label_spec(cfg, names, train_set)
    n = min(ev.num_examples, len(test_set))
    truth = _collate(test_set, range(n))
    labels = spec.labels_of(truth)
    classifiers, classifier_info = {}, {}
    for m in spec.image_modalities:
        classifiers[m], classifier_info[m] = _classifier_for(m, train_set, spec, cfg)
    fids = {m: (FeatureFID.inception(ev.inception_weights) if ev.inception_weights
                else FeatureFID(classifiers[m].feature_extractor(), name="classifier")) for m in classifiers}
    fd_name = next(iter(fids.values())).metric_name if fids else None
    metrics: dict = {"num_examples": n, "sampler": ev.sampler, "sampler_steps": ev.sampler_steps, "conditional": {},
                     "classifier": classifier_info, "fd_name": fd_name}
    clip, captions = None, None
    if cfg.dataset.name == "cub":  # CLIP score of images against captions (module docstring)
        clip_model = ev.get("clip_model", None)
        if clip_model is not None and "image" in names:
            from .metrics.clip_score import CLIPScore

            clip = CLIPScore(clip_model, device=next(vae.parameters()).device, batch_size=int(ev.batch_size))
            captions = [test_set.caption_text(int(i), int(j))
                        for i, j in zip(truth["meta"]["image_id"], truth["meta"]["caption_index"])]
            metrics["reference"] = {"real_images_clip_score": clip(truth["image"], captions)}
        metrics["clip_model"] = None if clip is None else str(clip_model)

    conditional_images = {}
    max_per_size = ev.get("max_subsets_per_size", None)
    for given in given_subsets(names, max_per_size):
        targets = [m for m in names if m not in given]
        gen = vae.generate({k: v for k, v in truth.items() if k in given}, given=list(given), targets=targets,
                           sampler=ev.sampler, steps=ev.sampler_steps)
        row: dict[str, float] = {}
        coherences = []
        for t in targets:
            x = _as_data(t, gen[t].cpu(), classifiers)
            read = _read(t, x, spec, classifiers)
            if read is not None:
                scores = _label_scores(t, read, labels, spec)
                if t in spec.binary_modalities:  # read directly: its label F1 is the *_f1 below
                    scores.pop(f"{t}_label_f1", None)
                row.update(scores)
                coherences.append(scores[f"{t}_coherence"])
            if t in spec.binary_modalities:
                row[f"{t}_f1"] = sample_f1(x > 0.5, truth[t] > 0.5)
            if t in fids:
                row[f"{t}_{fd_name}"] = _fd(fids[t], truth[t], x)
            if clip is not None and t == "image" and "text" in given:
                row["image_clip_score"] = clip(x, captions)
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
    for prior in ["normal", "score"]:
        if prior == "score" and vae.latent_prior is None:
            continue
        gen = vae.sample(n, prior=prior, sampler=ev.sampler, steps=ev.sampler_steps,
                         prior_sampler=cfg.latent_prior.sampler, prior_steps=cfg.latent_prior.sampler_steps)
        samples[prior] = gen
        gen = {m: _as_data(m, x.cpu(), classifiers) for m, x in gen.items()}
        reads = [r for r in (_read(m, gen[m], spec, classifiers) for m in names) if r is not None]
        row = {}
        if len(reads) >= 2:
            agree = torch.ones(n, dtype=torch.bool)
            for r in reads[1:]:
                agree &= (r == reads[0]).all(1)
            row["agreement"] = agree.float().mean().item()
        for m in fids:
            row[f"{m}_{fd_name}"] = _fd(fids[m], truth[m], gen[m])
        metrics["unconditional"][prior] = row

    metrics["latent_linear_accuracy"] = _latent_probe(vae, train_set, truth, labels, spec, names, ev)
    if figures:
        fig_dir = out_dir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        shown = dict(list(conditional_images.items())[: len(names)])  # the single-modality rows
        save_conditional_figure(truth, shown, names, fig_dir / "conditional.png")
        save_unconditional_figure(samples, names, fig_dir / "unconditional.png")
    return metrics


def _latent_probe(vae, train_set, truth, labels, spec, names, ev) -> dict[str, float]:
    """Linear-probe accuracy from the posterior mean of each single modality and of all of them."""
    n_train = min(len(train_set), int(ev.get("probe_train_size", 2000)))
    train = _collate(train_set, range(n_train))
    y_train = spec.labels_of(train)
    out = {}
    for given in [[m] for m in names] + [names]:
        z_tr = torch.cat([vae.posterior(slice_batch(train, slice(i, i + 512)), given=given).mean
                          for i in range(0, n_train, 512)])
        z_te = vae.posterior(truth, given=given).mean
        key = "+".join(given) if len(given) < len(names) else "all"
        out[key] = linear_probe_accuracy(z_tr, y_train, z_te, labels, spec.factor_sizes)
    return out
