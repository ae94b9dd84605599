"""Evaluation of a trained model on the shapes data set: the numbers and pictures a person wants.

For every non-empty proper subset of the modalities ("given"), the other modalities are generated
from z ~ q(z | x_given) and scored against the test scene:

* ``attributes``: sample-average F1 of the thresholded attribute probabilities (paper Table 3);
* ``mask``: sample-average F1 of the thresholded mask pixels (paper Table 3);
* ``image``: coherence — the scene factors read back from the generated image by a factor
  classifier trained on the training split (per-factor accuracy, mean, all five right), and
  "position and size right" (the factors a mask carries);
* ``text``: the factors parsed back from the generated caption.

Unconditional generation with the latent score prior and with N(0, I): agreement between the
factors read from the generated modalities (image via the classifier, attributes by argmax per
group, mask by its geometry, text by parsing). FD: the Fréchet distance between classifier
features of generated and real test images (``FD_classifier``; Inception FID only when a local
Inception weights file is given). The image decoder's likelihood bound in bits per dimension.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Mapping, Sequence

import torch

from .data import shapes
from .metrics.coherence import FactorClassifier, factor_accuracy, load_or_train_classifier, predict_factors, train_factor_classifier
from .metrics.f1 import sample_f1
from .metrics.fid import FeatureFID
from .metrics.likelihood import diffusion_bpd
from .model import MultimodalVAE

__all__ = ["mask_to_factors", "read_factors", "evaluate", "given_subsets", "write_report"]

POSITION_SIZE = [2, 3, 4]  # factor columns a mask determines besides the shape: size, horizontal, vertical
MASK_FACTORS = [0, 2, 3, 4]  # shape, size, horizontal, vertical (a mask carries no colour)


def mask_to_factors(masks: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Read shape, size and position from (N, 1, S, S) masks by geometry; colour is -1.

    Position: the centroid's third of the image. Size: the bounding box's longer side against the
    midpoint of the small and large extents (area would confuse a large triangle with a small
    square). Shape: the fill ratio of the bounding box (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
    An empty mask gives -1 everywhere.
    """
    m = (masks[:, 0] > threshold).float()
    N, S, _ = m.shape
    area = m.sum((1, 2))
    coords = torch.arange(S, dtype=torch.float32) + 0.5
    cy = (m.sum(2) * coords).sum(1) / area.clamp(min=1)
    cx = (m.sum(1) * coords).sum(1) / area.clamp(min=1)
    height = m.any(2).float().sum(1)
    width = m.any(1).float().sum(1)
    fill = area / (height * width).clamp(min=1)
    shape = torch.where(fill > 0.9, 1, torch.where(fill > 0.64, 0, 2))
    r_small, r_large = shapes.SIZE_HALF_EXTENTS
    size = (torch.maximum(height, width) > (r_small + r_large) * S).long()
    horizontal = (cx / S * 3).long().clamp(0, 2)
    vertical = (cy / S * 3).long().clamp(0, 2)
    out = torch.stack([shape.long(), torch.full_like(size, -1), size, horizontal, vertical], 1)
    out[area == 0] = -1
    return out


def given_subsets(names: Sequence[str], max_per_size: int | None = None) -> list[tuple[str, ...]]:
    """Every non-empty proper subset of the modalities (the given sets of Table 3), in order of
    size; at most ``max_per_size`` of each size when given."""
    out = []
    for r in range(1, len(names)):
        combos = list(itertools.combinations(names, r))
        out += combos if max_per_size is None else combos[:max_per_size]
    return out


@torch.no_grad()
def read_factors(name: str, x: torch.Tensor, classifier: FactorClassifier | None) -> torch.Tensor:
    """The scene factors (N, 5) that a modality carries (-1 where it carries none)."""
    if name == "image":
        return predict_factors(classifier, x)
    if name == "attributes":
        return shapes.attributes_to_factors(x)
    if name == "mask":
        return mask_to_factors(x)
    if name == "text":
        return shapes.parse_caption(x)
    raise ValueError(f"no factor reader for modality {name!r}")


def _agreement(preds: Mapping[str, torch.Tensor]) -> float:
    """Fraction of examples on which every pair of modalities agrees on every factor both carry."""
    names = list(preds)
    ok = torch.ones(next(iter(preds.values())).shape[0], dtype=torch.bool)
    for a, b in itertools.combinations(names, 2):
        pa, pb = preds[a], preds[b]
        shared = [j for j in range(pa.shape[1]) if (pa[:, j] >= 0).any() and (pb[:, j] >= 0).any()]
        ok &= (pa[:, shared] == pb[:, shared]).all(1) & (pa[:, shared] >= 0).all(1)
    return ok.float().mean().item()


def _scores(name: str, generated: torch.Tensor, truth: Mapping, classifier) -> dict[str, float]:
    if name == "attributes":
        return {"attributes_f1": sample_f1(generated > 0.5, truth["attributes"] > 0.5)}
    if name == "mask":
        return {"mask_f1": sample_f1(generated > 0.5, truth["mask"] > 0.5)}
    factors = read_factors(name, generated, classifier)
    acc = factor_accuracy(factors, truth["meta"]["factors"])
    out = {f"{name}_factor_acc": acc["mean"], f"{name}_all_factors": acc["all"]}
    pos_size = (factors[:, POSITION_SIZE] == truth["meta"]["factors"][:, POSITION_SIZE]).all(1).float().mean().item()
    out[f"{name}_position_size"] = pos_size
    return out


def slice_batch(batch: Mapping, index) -> dict:
    """Every tensor of a (nested) batch indexed by ``index`` along the batch dim (e.g. ``slice(0, k)``)."""
    return {k: (slice_batch(v, index) if isinstance(v, Mapping) else v[index]) for k, v in batch.items()}


@torch.no_grad()
def evaluate(vae: MultimodalVAE, test_set, train_set, cfg, out_dir: Path, figures: bool = True) -> dict:
    """Compute every metric (see module docstring), save figures, and return the metrics dict."""
    from .figures import save_conditional_figure, save_unconditional_figure

    if cfg.dataset.name != "shapes":  # the paper's data sets: coherence through labels
        from .evaluation_labels import evaluate_with_labels

        return evaluate_with_labels(vae, test_set, train_set, cfg, out_dir, figures=figures)
    ev = cfg.evaluation
    vae.eval()
    names = list(vae.names)
    n = min(ev.num_examples, len(test_set))
    loader = torch.utils.data.DataLoader(test_set, batch_size=n, shuffle=False)
    truth = next(iter(loader))
    classifier, classifier_info = _classifier(train_set, test_set, cfg)
    metrics: dict = {"num_examples": n, "sampler": ev.sampler, "sampler_steps": ev.sampler_steps, "conditional": {},
                     "classifier": classifier_info}
    conditional_images = {}
    for given in given_subsets(names) + [tuple(names)]:
        targets = [m for m in names if m not in given] or names
        gen = vae.generate(_without(truth, given), given=list(given), targets=targets,
                           sampler=ev.sampler, steps=ev.sampler_steps)
        key = "+".join(given) if len(given) < len(names) else "all (reconstruction)"
        row = {}
        for t in targets:
            row.update(_scores(t, gen[t].cpu(), truth, classifier))
        metrics["conditional"][key] = row
        conditional_images[key] = gen
    # unconditional generation: N(0, I) vs the latent score prior
    metrics["unconditional"] = {}
    fd_name = None
    if ev.inception_weights:
        fid = FeatureFID.inception(ev.inception_weights)
    else:
        fid = FeatureFID(classifier.feature_extractor(), name="classifier")
    real = truth["image"] if "image" in truth else None
    samples = {}
    for prior in ["normal", "score"]:
        if prior == "score" and vae.latent_prior is None:
            continue
        gen = vae.sample(ev.num_unconditional, prior=prior, sampler=ev.sampler, steps=ev.sampler_steps,
                         prior_sampler=cfg.latent_prior.sampler, prior_steps=cfg.latent_prior.sampler_steps)
        samples[prior] = gen
        preds = {m: read_factors(m, gen[m].cpu(), classifier) for m in names}
        row = {"agreement": _agreement(preds)}
        if real is not None and "image" in gen:
            fid.reset()
            fid.update(real, real=True)
            fid.update(gen["image"].cpu().clamp(-1.0, 1.0), real=False)  # a feed-forward mean may overshoot the range
            row[fid.metric_name] = fid.compute()
            fd_name = fid.metric_name
        metrics["unconditional"][prior] = row
    # the image decoder's likelihood bound in bits/dim (likelihood weighting, whatever it trained with)
    for m in names:
        if vae.modalities[m].is_diffusion:
            k = min(ev.bpd_examples, n)
            z = vae.posterior(slice_batch(truth, slice(0, k))).mean
            mean, se = diffusion_bpd(vae.modalities[m].decoder, truth[m][:k], z, num_draws=ev.bpd_draws)
            mean, se = float(mean), float(se)
            metrics[f"{m}_bound_bpd"] = {"mean": mean, "se": se, "examples": k}
    metrics["fd_name"] = fd_name
    if figures:
        fig_dir = out_dir / "figures"
        fig_dir.mkdir(parents=True, exist_ok=True)
        save_conditional_figure(truth, conditional_images, names, fig_dir / "conditional.png")
        save_unconditional_figure(samples, names, fig_dir / "unconditional.png")
    return metrics


def _without(batch: Mapping, given: Sequence[str]) -> dict:
    """The batch restricted to the given modalities."""
    return {k: v for k, v in batch.items() if k in given}


def _classifier(train_set, test_set, cfg) -> tuple[FactorClassifier, dict | None]:
    """The factor classifier of the data set, trained on its training split once and cached."""
    ev, d = cfg.evaluation, cfg.dataset
    key = f"shapes_s{d.image_size}_seed{d.seed}_n{d.train_size}_v{shapes.DATA_VERSION}_steps{ev.classifier_steps}.pt"
    path = Path(ev.classifier_cache) / key
    path.parent.mkdir(parents=True, exist_ok=True)

    def train():
        n = min(len(test_set), 1000)
        val = torch.stack([test_set[i]["image"] for i in range(n)]) if "image" in test_set.modalities else None
        images = torch.stack([train_set[i]["image"] for i in range(len(train_set))])
        with torch.enable_grad():  # evaluate() runs under no_grad
            return train_factor_classifier(images, train_set.factors, shapes.FACTOR_SIZES, val_images=val,
                                           val_factors=test_set.factors[:n], steps=ev.classifier_steps, seed=0)

    return load_or_train_classifier(path, train)


def write_report(metrics: dict, path: Path, title: str = "pyro-diffmvae run") -> None:
    """A Markdown report with the conditional and unconditional tables."""
    lines = [f"# {title}", ""]
    cond = metrics.get("conditional", {})
    cols = sorted({c for row in cond.values() for c in row})
    if cond:
        lines += [f"Conditional generation ({metrics['num_examples']} test examples, {metrics['sampler']}-{metrics['sampler_steps']}); "
                  "*_f1 = sample-average F1 against the truth (paper Table 3); *_factor_acc = mean per-factor accuracy read back by "
                  "the classifier; *_all_factors = all factors right; *_position_size = size and position right; "
                  "*_coherence = labels read back by the classifier equal the truth; *_FD_* = Fréchet distance to real test images.", ""]
        lines.append("| given | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for given, row in cond.items():
            lines.append(f"| {given} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in cols) + " |")
        lines.append("")
    by_k = metrics.get("coherence_by_num_given")
    if by_k:
        lines += ["Conditional coherence by number of given modalities (mean over the given subsets of each size):", ""]
        lines.append("| " + " | ".join(f"{k} given" for k in by_k) + " |")
        lines.append("|" + "---|" * len(by_k))
        lines.append("| " + " | ".join(f"{v:.3f}" for v in by_k.values()) + " |")
        lines.append("")
    probe = metrics.get("latent_linear_accuracy")
    if probe:
        lines += ["Latent linear classification (linear probe on the posterior mean, test accuracy):", ""]
        lines.append("| " + " | ".join(probe) + " |")
        lines.append("|" + "---|" * len(probe))
        lines.append("| " + " | ".join(f"{v:.3f}" for v in probe.values()) + " |")
        lines.append("")
    unc = metrics.get("unconditional", {})
    if unc:
        ucols = sorted({c for row in unc.values() for c in row})
        lines += ["Unconditional generation: agreement = fraction of samples whose modalities agree on every factor they share.", ""]
        lines.append("| prior | " + " | ".join(ucols) + " |")
        lines.append("|---|" + "---|" * len(ucols))
        for prior, row in unc.items():
            name = "latent score prior" if prior == "score" else "N(0, I)"
            lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" if c in row else "" for c in ucols) + " |")
        lines.append("")
        if metrics.get("fd_name") and metrics["fd_name"] != "FID":
            lines += [f"{metrics['fd_name']} is a Fréchet distance in the label classifier's feature space, not Inception FID "
                      f"(biased upwards at {metrics['num_examples']} images: compare only at equal sizes).", ""]
    ref = metrics.get("reference", {})
    if "real_images_clip_score" in ref:
        lines += [f"CLIP score (100·max(cos, 0), CLIP from {metrics.get('clip_model')}): real test images against their "
                  f"captions {ref['real_images_clip_score']:.2f} (the reference for image_clip_score above).", ""]
    for key, val in metrics.items():
        if key.endswith("_bound_bpd"):
            lines += [f"{key[:-10]} decoder: likelihood bound {val['mean']:.3f} ± {val['se']:.3f} bits/dim "
                      f"({val['examples']} test images, likelihood weighting, dequantised).", ""]
    if "training" in metrics:
        lines += ["Training: " + ", ".join(f"{k} = {v}" for k, v in metrics["training"].items()), ""]
    path.write_text("\n".join(lines))


def save_metrics(metrics: dict, path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
