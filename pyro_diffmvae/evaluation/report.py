"""The run's ``report.md`` (Markdown tables of the metrics) and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_report", "save_metrics"]


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
    """The metrics as JSON, keys sorted."""
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
