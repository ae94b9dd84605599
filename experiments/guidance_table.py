#!/usr/bin/env python
"""The table of ``experiments/guidance_and_sampler_celebamask_hq.sh``: one row per evaluation of each trained run.

Usage: ``python experiments/guidance_table.py <OUT>`` (the script's output folder) prints Markdown: for every
``<OUT>/p<p>_s<seed>/eval_<label>/metrics.json``, the sampler and its network evaluations (NFE: steps + the
final Tweedie step; a guided step evaluates the network on 2n rows in one call), the guidance weight w, the
conditional numbers with their standard errors (images given the attributes: FD in the attribute classifier's
features, attribute F1 and coherence read back; attributes given the image: F1), the unconditional ones (FD and
agreement with the latent score prior and with N(0, I)), the joint NLL where computed, and the evaluation time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _pm(row: dict, key: str, digits: int = 3) -> str:
    if key not in row:
        return "–"
    se = row.get(f"{key}_se")
    return f"{row[key]:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


def rows(out: Path) -> list[list[str]]:
    table = []
    for path in sorted(out.glob("p*_s*/eval_*/metrics.json")):
        run = path.parent.parent.name  # p0.1_s0
        p, seed = run[1:].split("_s")
        m = json.loads(path.read_text())
        fd = m.get("fd_name", "FD_classifier")
        cond, uncond = m.get("conditional", {}), m.get("unconditional", {})
        given_attr, given_img = cond.get("attributes", {}), cond.get("image", {})
        w = sorted(set((m.get("guidance") or {"image": 1.0}).values()))
        joint = m.get("joint_log_likelihood") or {}
        nll = f"{joint['nll_nats']:.1f} ± {joint['nll_nats_se']:.1f}" if joint.get("supported") else "–"
        table.append([p, seed, f"{m['sampler']}-{m['sampler_steps']}", str(m["sampler_steps"] + 1), ", ".join(map(str, w)),
                      _pm(given_attr, f"image_{fd}", 1), _pm(given_attr, "image_label_f1"), _pm(given_attr, "image_coherence"),
                      _pm(given_img, "attributes_f1"),
                      _pm(uncond.get("score", {}), f"image_{fd}", 1), _pm(uncond.get("normal", {}), f"image_{fd}", 1),
                      _pm(uncond.get("score", {}), "agreement"), _pm(uncond.get("normal", {}), "agreement"),
                      nll, str(m.get("evaluation_seconds", "–"))])
    return table


HEADER = ["cond. dropout p", "seed", "sampler", "NFE", "guidance w", "image FD given attributes",
          "attribute F1 of the image given attributes", "attribute coherence of the image given attributes",
          "attributes F1 given image", "uncond. FD (score prior)", "uncond. FD (N(0,I))", "uncond. agreement (score prior)",
          "uncond. agreement (N(0,I))", "joint NLL nats", "eval s"]


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or not Path(args[0]).is_dir():
        raise SystemExit("usage: guidance_table.py <OUT folder of guidance_and_sampler_celebamask_hq.sh>")
    table = rows(Path(args[0]))
    if not table:
        raise SystemExit(f"no <OUT>/p*_s*/eval_*/metrics.json under {args[0]}")
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for r in table:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
