"""Evaluate a run trained with ``model.unet.hint=true`` with its hint decoders in place of its diffusion decoders.

The hint (``pyro_diffmvae/nets/hint.py``) is a feed-forward decoder of z whose mean the diffusion decoder's UNet sees
beside x_t. Decoding with the hint means alone gives the coherence and FD of the feed-forward model inside the
hinted one: how much of what z carries reaches a feed-forward image, against what the diffusion decoder draws.
The evaluation is the run's own (``evaluation.*`` of its config, any override given here applied on top); the
joint log-likelihood is skipped (the hints are not the model's likelihood).

    python experiments/hint_coherence.py <run dir> <out dir> [evaluation overrides ...]
    python experiments/hint_coherence.py experiments/runs/polymnist_30min/polymnist_diffmvae_star_v_shared_hint_cpu/seed0 \\
        /tmp/hint_eval dataset.test_size=1000 evaluation.num_unconditional=64
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf


def main(run: Path, out: Path, overrides: list[str]) -> dict:
    from pyro_diffmvae.builders import build_datasets
    from pyro_diffmvae.cli import load_run
    from pyro_diffmvae.evaluation import evaluate, save_metrics, write_report

    cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides + ["evaluation.loglik_examples=0"]))
    vae, _ = load_run(str(run / "model.pt"))
    hinted = [m for m, mod in vae.modalities.items() if getattr(mod.decoder, "hint", None) is not None]
    if not hinted:
        raise SystemExit(f"{run}: no decoder of this model has a hint (trained without model.unet.hint=true)")
    for m in hinted:
        vae.modalities[m].decoder = vae.modalities[m].decoder.hint
    train_set, _, test_set = build_datasets(cfg)
    torch.manual_seed(int(cfg.seed))
    out.mkdir(parents=True, exist_ok=False)
    metrics = evaluate(vae, test_set, train_set, cfg, out, figures=True)
    metrics["decoded_by"] = f"the hint decoders' means of {hinted} (experiments/hint_coherence.py), not the diffusion decoders"
    save_metrics(metrics, out / "metrics.json")
    write_report(metrics, out / "report.md", title=f"{run}, decoded by its hints")
    print(metrics["coherence_by_num_given"], metrics.get("latent_linear_accuracy"))
    return metrics


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
