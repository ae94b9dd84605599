"""Where a trained diffusion decoder denoises badly: ε̂ and x̂₀ errors by diffusion time, for one or more runs.

    python experiments/denoising_error.py RUN/model.pt [RUN2/model.pt ...] --modality image --given attributes \
        --examples 128 --seed 0

For each run: the first ``--examples`` test examples, z = the mean of the run's own conditional q(z | x_given)
(``--given`` defaults to every modality other than ``--modality``), one noise draw per example and time, and
:func:`pyro_diffmvae.metrics.denoising_error_by_time` (its docstring has the formulas and what they mean). Prints
one markdown table per run. A decoder trained with guidance dropout is read unguided (w = 1: the network itself).
"""

from __future__ import annotations

import argparse

import torch

from pyro_diffmvae.builders import build_datasets
from pyro_diffmvae.cli import load_run
from pyro_diffmvae.metrics import denoising_error_by_time
from pyro_diffmvae.metrics.denoising_error import DEFAULT_TIMES


def table(path: str, modality: str, given: list[str] | None, examples: int, seed: int, times) -> str:
    vae, cfg = load_run(path)
    vae.eval()
    if modality not in vae.modalities or not vae.modalities[modality].is_diffusion:
        raise SystemExit(f"{path}: {modality!r} is not a diffusion-decoded modality of this run "
                         f"(its modalities: {sorted(vae.modalities)})")
    given = [m for m in vae.modalities if m != modality] if given is None else given
    _, _, test = build_datasets(cfg)
    n = min(examples, len(test))
    batch = {m: torch.stack([test[i][m] for i in range(n)]) for m in vae.modalities}
    decoder = vae.modalities[modality].decoder
    with torch.no_grad():
        z = vae.posterior(batch, given=given).mean
    rows = denoising_error_by_time(decoder.eps_net, decoder.sde, batch[modality], z, times,
                                   generator=torch.Generator().manual_seed(seed))
    lines = [f"{path} — {modality} decoder ({getattr(decoder, 'prediction', '?')}-prediction), z = mean of "
             f"q(z | {', '.join(given)}), {n} test examples, seed {seed}", "",
             "| t | α_t | ε̂ RMSE | x̂₀ RMSE | x̂₀ per-channel-mean RMSE |", "|---|---|---|---|---|"]
    for r in rows:
        colour = "–" if r["mean_channel_rmse"] is None else f"{r['mean_channel_rmse']:.3f}"
        lines.append(f"| {r['t']:.2f} | {r['alpha']:.4f} | {r['eps_rmse']:.4f} | {r['x0_rmse']:.3f} | {colour} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="model.pt of a diffmvae-train run (or its pretrained/ folder)")
    parser.add_argument("--modality", default="image")
    parser.add_argument("--given", nargs="*", default=None, help="the conditioning modalities (default: the others)")
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--times", type=float, nargs="+", default=list(DEFAULT_TIMES))
    args = parser.parse_args(argv)
    for path in args.runs:
        print(table(path, args.modality, args.given, args.examples, args.seed, args.times), end="\n\n")


if __name__ == "__main__":
    main()
