"""The run's ``report.md`` (Markdown tables of the metrics, each number with its standard error
where one was computed: ``value ± se``; the protocol named in every table's caption; the bound
ledger) and ``metrics.json``."""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["write_report", "save_metrics"]


def _cell(row: dict, c: str) -> str:
    """``value`` or ``value ± se`` (``row[c + "_se"]``); empty when the row has no ``c``."""
    if c not in row:
        return ""
    se = row.get(f"{c}_se")
    return f"{row[c]:.3f}" if se is None else f"{row[c]:.3f} ± {se:.3f}"


def _protocol_label(metrics: dict) -> str:
    protocol = metrics.get("protocol") or {}
    return protocol.get("label", "unnamed (metrics before evaluation protocols)")


def _bound_bpd(metrics: dict) -> dict[str, dict]:
    """``{modality: {"mean", "se", "examples"}}`` of the reconstruction bound (also under its old key)."""
    out = {}
    for key, val in metrics.items():
        for suffix in ("_reconstruction_bound_bpd", "_bound_bpd"):
            if key.endswith(suffix) and isinstance(val, dict):
                out.setdefault(key[: -len(suffix)], val)
                break
    return out


def _sampling_note(metrics: dict) -> str:
    """``", guidance w = 2.0"`` when a diffusion decoder generated with guidance (w != 1), and
    ``", networks in bf16 (sample_precision)"`` when one sampled in bf16, and the start time when one started from
    its noised hint (``hint_start``); else empty."""
    weights = {w for w in (metrics.get("guidance") or {}).values() if w != 1.0}
    note = f", guidance w = {', '.join(str(w) for w in sorted(weights))}" if weights else ""
    if "bf16" in (metrics.get("sample_precision") or {}).values():
        note += ", networks in bf16 (sample_precision)"
    starts = {t0 for t0 in (metrics.get("hint_start") or {}).values() if t0 is not None}
    if starts:
        note += f", started from the noised hint at t0 = {', '.join(str(t) for t in sorted(starts))} (not a model sample)"
    return note


def _ledger_lines(ledger: dict) -> list[str]:
    bound = {True: "yes", False: "no", None: "unknown (no objective recorded)"}[ledger.get("is_bound")]
    lines = ["## Bound ledger", "",
             f"* model: {ledger.get('model', 'not recorded')}",
             f"* objective trained: {ledger.get('objective')} ({ledger.get('objective_repr')}); "
             f"−loss bounds log p(x): **{bound}**",
             f"* β = {ledger.get('beta')}; likelihood weights λ_m: "
             + ", ".join(f"{m} = {w}" for m, w in ledger.get("likelihood_weights", {}).items())]
    for m, d in ledger.get("diffusion_decoders", {}).items():
        lines.append(f"* diffusion decoder {m}: λ(t) weighting {d['weighting']}, predicts {d['prediction']}, "
                     f"log_prob a bound on log p(x|z): {'yes' if d['log_prob_is_bound'] else 'no'}")
    lines += [f"* evaluation protocol: {ledger.get('protocol')}",
              f"* conditional q(z | x_given) generated from: {ledger.get('conditional')}"]
    for key, text in ledger.get("estimators", {}).items():
        lines.append(f"* {key}: {text}")
    return lines + _networks_lines(ledger.get("evaluation_networks", {})) + [""]


def _networks_lines(nets: dict) -> list[str]:
    """Which networks read the samples: each label classifier's source, the FD's feature space, CLIP."""
    lines = []
    for m, source in (nets.get("label_classifiers") or {}).items():
        lines.append(f"* label classifier of {m}: {source}")
    if nets.get("fd_feature_space"):
        lines.append(f"* Fréchet distance {nets['fd_feature_space']}")
    if nets.get("clip_model"):
        lines.append(f"* CLIP model: {nets['clip_model']}")
    if nets.get("as_published") is False:
        trained = [m for m, source in (nets.get("label_classifiers") or {}).items() if not str(source).startswith("published")]
        why, fix = [], []
        if trained:
            why.append(f"read by label classifiers trained by this library ({', '.join(trained)})")
            if nets.get("published_classifiers"):
                fix.append(f"evaluation.classifiers_dir (the released {nets['published_classifiers']} classifiers)")
        if nets.get("fd_name") not in (None, "FID"):
            why.append(f"scored by {nets['fd_name']}, not FID")
            fix.append("evaluation.fid_inception_weights (the FID Inception)")
        lines.append("* **not comparable with published tables**: the samples are " + " and ".join(why)
                     + (f"; set {' and '.join(fix)} to read them as the literature does" if fix else ""))
    return lines


def _joint_lines(joint: dict | None) -> list[str]:
    """The joint NLL line: nats and bits/dim, what it estimates and whether it is a bound."""
    if not joint:
        return []
    if not joint.get("supported"):
        return [f"Joint log-likelihood: not supported ({joint.get('reason')}).", ""]
    kind = ("an upper bound on −log p(x) in expectation" if joint["is_lower_bound"]
            else "an estimate of −log p(x), not a bound")
    mc = joint.get("mean_monte_carlo_se_nats")
    mc_text = "" if mc is None else f"; mean Monte Carlo SE per example {mc:.2f} nats"
    return [f"Joint NLL −log p(x) of all modalities: **{joint['nll_nats']:.2f} ± {joint['nll_nats_se']:.2f} nats** per "
            f"example, **{joint['bits_per_dim']:.4f} ± {joint['bits_per_dim_se']:.4f} bits/dim** ({joint['num_dims']} "
            f"dims; {joint['examples']} test examples, images dequantised; {joint['estimator']}; {kind}, "
            f"{'converging' if joint['converges'] else 'not converging'} as K grows{mc_text}).", ""]


def write_report(metrics: dict, path: Path, title: str = "pyro-diffmvae run") -> None:
    """A Markdown report with the conditional and unconditional tables and the bound ledger."""
    label = _protocol_label(metrics)
    lines = [f"# {title}", "", f"Evaluation protocol: **{label}**.", ""]
    protocol = metrics.get("protocol")
    if protocol:
        lines += [f"{protocol['num_examples']} of {protocol['test_split_size']} test examples, "
                  f"{protocol['num_given_subsets']} of {protocol['all_given_subsets']} given subsets. "
                  f"Standard errors (± after each number): {protocol['standard_errors']} "
                  f"({protocol['bootstrap']} seeded resamples, seed {protocol['bootstrap_seed']}; FD bootstrap "
                  f"{'on' if protocol['fd_bootstrap'] else 'off: FDs have no SE'}). Coherence conventions: "
                  + "; ".join(f"*{k}* = {v}" for k, v in protocol["coherence_conventions"].items()) + ".", ""]
    cond = metrics.get("conditional", {})
    cols = sorted({c for row in cond.values() for c in row if not (c.endswith("_se") and c[:-3] in row)})
    if cond:
        lines += [f"Conditional generation (protocol {label}; {metrics['num_examples']} test examples, {metrics['sampler']}-{metrics['sampler_steps']}{_sampling_note(metrics)}); "
                  "*_f1 = sample-average F1 against the truth (paper Table 3); *_factor_acc = mean per-factor accuracy read back by "
                  "the classifier; *_all_factors = all factors right; *_position_size = size and position right; "
                  "*_coherence = labels read back by the classifier equal the truth; *_FD_* = Fréchet distance to real test images.", ""]
        lines.append("| given | " + " | ".join(cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for given, row in cond.items():
            lines.append(f"| {given} | " + " | ".join(_cell(row, c) for c in cols) + " |")
        lines.append("")
    by_k = metrics.get("coherence_by_num_given")
    if by_k:
        lines += [f"Conditional coherence by number of given modalities (protocol {label}; mean over the given "
                  "subsets of each size):", ""]
        lines.append("| convention | " + " | ".join(f"{k} given" for k in by_k) + " |")
        lines.append("|---|" + "---|" * len(by_k))
        for key, name in [("coherence_by_num_given", "missing targets only"),
                          ("coherence_all_targets_by_num_given", "all targets")]:
            if key in metrics:
                lines.append(f"| {name} | " + " | ".join(_cell({**metrics[key], **{f'{k}_se': v for k, v in metrics.get(f'{key}_se', {}).items()}}, k)
                                                      for k in by_k) + " |")
        lines.append("")
    probe = metrics.get("latent_linear_accuracy")
    if probe:
        lines += ["Latent linear classification (linear probe on the posterior mean, test accuracy):", ""]
        lines.append("| " + " | ".join(probe) + " |")
        lines.append("|" + "---|" * len(probe))
        se = metrics.get("latent_linear_accuracy_se", {})
        lines.append("| " + " | ".join(_cell({**probe, **{f"{k}_se": v for k, v in se.items()}}, k) for k in probe) + " |")
        lines.append("")
    unc = metrics.get("unconditional", {})
    if unc:
        ucols = sorted({c for row in unc.values() for c in row if not (c.endswith("_se") and c[:-3] in row)})
        lines += [f"Unconditional generation (protocol {label}): agreement = fraction of samples whose modalities agree on every factor they share.", ""]
        lines.append("| prior | " + " | ".join(ucols) + " |")
        lines.append("|---|" + "---|" * len(ucols))
        for prior, row in unc.items():
            name = "latent score prior" if prior == "score" else "N(0, I)"
            lines.append(f"| {name} | " + " | ".join(_cell(row, c) for c in ucols) + " |")
        lines.append("")
        if metrics.get("fd_name") and metrics["fd_name"] != "FID":
            lines += [f"{metrics['fd_name']} is a Fréchet distance in the label classifier's feature space, not Inception FID "
                      f"(biased upwards at {metrics['num_examples']} images: compare only at equal sizes).", ""]
    ref = metrics.get("reference", {})
    if "real_images_clip_score" in ref:
        lines += [f"CLIP score (100·max(cos, 0), CLIP from {metrics.get('clip_model')}): real test images against their "
                  f"captions {ref['real_images_clip_score']:.2f} (the reference for image_clip_score above).", ""]
    lines += _joint_lines(metrics.get("joint_log_likelihood"))
    for m, val in _bound_bpd(metrics).items():
        lines += [f"{m} decoder: reconstruction bound {val['mean']:.3f} ± {val['se']:.3f} bits/dim ({val['examples']} "
                  "test images, likelihood weighting, dequantised) — a bound on −log p(x^m | z) at the posterior mean "
                  "given all modalities (x^m included), not on −log p(x).", ""]
    if "ledger" in metrics:
        lines += _ledger_lines(metrics["ledger"])
    if "training" in metrics:
        lines += ["Training: " + ", ".join(f"{k} = {v}" for k, v in metrics["training"].items()), ""]
    lines += _figure_lines(path.parent)
    path.write_text("\n".join(lines))


#: the run's figures the report shows, when they exist beside it (relative links: the run directory moves as one)
REPORT_FIGURES = (("Conditional generation", "figures/conditional.png"),
                  ("Unconditional generation", "figures/unconditional.png"),
                  ("Loss curves (training and validation)", "loss_curves.png"))


def _figure_lines(run_dir: Path) -> list[str]:
    found = [(title, rel) for title, rel in REPORT_FIGURES if (run_dir / rel).is_file()]
    if not found:
        return []
    lines = ["## Figures", ""]
    for title, rel in found:
        lines += [f"**{title}** (`{rel}`)", "", f"![{title}]({rel})", ""]
    return lines


def save_metrics(metrics: dict, path: Path) -> None:
    """The metrics as JSON, keys sorted."""
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
