#!/usr/bin/env python
r"""Benchmark bf16 against float32 for a diffusion decoder's network (:mod:`pyro_diffmvae.sampling_precision`).

Two measurements, float32 and bf16 autocast alternated in one process (median over ``--repeats``; wall clock and
this process's CPU time), and one accuracy check (numbers only; nothing here asserts):

1. **Sampling.** DPM-Solver++(2M) with ``--steps`` steps (``--steps`` + 1 network calls) on ``--batch`` images,
   the decoder's network as is and under :class:`~pyro_diffmvae.sampling_precision.AutocastEps`; s per 1,000
   images and the ratio.
2. **A training step's network work.** Forward and backward of ``--batch`` noised images (the ε-MSE of one draw
   of t), float32 against ``torch.autocast(dtype=torch.bfloat16)``: what ``trainer.precision=bf16-mixed`` would
   save on the UNet (the rest of a step is not timed).
3. **Accuracy.** The two samplers from the same x_T and z: the largest and the RMS difference of the samples, in
   the data's units ([-1, 1] images), and their per-channel mean difference (a colour shift).

The network comes from ``--checkpoint`` (a trained run's ``model.pt``: the accuracy check is meaningful then) or,
without one, from ``--experiment`` with random weights (timing only). z is drawn from N(0, I).

Example::

    OMP_NUM_THREADS=2 python experiments/benchmarks/bench_sample_precision.py --threads 2 \
        --checkpoint experiments/runs/table3_cpu/celebamask_hq_diffmvae_star_v_guided_cpu/seed0/model.pt
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _hardware import command_line, fmt, hardware_lines, load_line, md_table, setup_device, write_report  # noqa: E402

from pyro_diffmvae.samplers import sample_dpmpp_2m  # noqa: E402
from pyro_diffmvae.sampling_precision import AutocastEps  # noqa: E402


def load_decoder(args):
    if args.checkpoint:
        from pyro_diffmvae.cli import load_run
        vae, _ = load_run(args.checkpoint)
        source = f"trained: `{args.checkpoint}`"
    else:
        from hydra import compose, initialize_config_module

        from pyro_diffmvae.builders import build_model
        with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
            cfg = compose("config", overrides=[f"experiment={args.experiment}"])
        torch.manual_seed(0)
        vae = build_model(cfg)
        source = f"random weights of `experiment={args.experiment}`"
    vae.eval()
    if args.modality not in vae.modalities or not vae.modalities[args.modality].is_diffusion:
        raise SystemExit(f"{args.modality!r} is not a diffusion-decoded modality (modalities: {sorted(vae.modalities)})")
    return vae.modalities[args.modality].decoder, vae.latent_dim, source


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds of ``repeats`` calls (one warm-up call first)."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="a trained run's model.pt (else random weights of --experiment)")
    p.add_argument("--experiment", default="celebamask_hq_diffmvae_star_v_cpu")
    p.add_argument("--modality", default="image")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=9, help="DPM-Solver++(2M) steps (network calls: steps + 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda"])
    p.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = p.parse_args(argv)
    device = setup_device(args.threads, args.device)
    decoder, latent_dim, source = load_decoder(args)
    decoder.to(device)
    shape = (args.batch, *decoder.event_shape)
    g = torch.Generator(device="cpu").manual_seed(0)
    x_T = torch.randn(shape, generator=g).to(device)
    z = torch.randn(args.batch, latent_dim, generator=g).to(device)
    nets = {"fp32": decoder.eps_net, "bf16": AutocastEps(decoder.eps_net, torch.bfloat16)}
    kwargs = {"x0_range": decoder.output_range} if decoder.output_range is not None else {}

    @torch.no_grad()
    def sample(name):
        return sample_dpmpp_2m(nets[name], shape, decoder.sde, steps=args.steps, z=z, x_T=x_T.clone(), device=device,
                               **kwargs)

    def train_work(name):
        t = torch.rand(args.batch, generator=g).to(device).clamp(1e-3, 1.0)
        eps = torch.randn(shape, generator=g).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=name == "bf16"):
            out = decoder.eps_net(decoder.sde.perturb(x_T.clamp(-1, 1), t, eps), z, t)
        (out.float() - eps).pow(2).mean().backward()
        decoder.zero_grad(set_to_none=True)

    rows, times = [], {}
    for label, fn in (("sampling", sample), ("training fwd+bwd", train_work)):
        for name in ("fp32", "bf16", "fp32", "bf16"):  # alternated: drift in machine load hits both
            wall, cpu = timed(lambda: fn(name), args.repeats)
            times.setdefault((label, name), []).append((wall, cpu))
        for name in ("fp32", "bf16"):
            wall = statistics.median(w for w, _ in times[(label, name)])
            cpu = statistics.median(c for _, c in times[(label, name)])
            per = 1000 / args.batch
            rows.append([label, name, fmt(wall), fmt(cpu), fmt(wall * per)])
        ratio = (statistics.median(w for w, _ in times[(label, "fp32")])
                 / statistics.median(w for w, _ in times[(label, "bf16")]))
        rows.append([label, "**fp32 / bf16 wall**", f"**{ratio:.2f}×**", "", ""])
    x32, x16 = sample("fp32"), sample("bf16")
    diff = x16 - x32
    colour = (x16.mean((2, 3)) - x32.mean((2, 3))) if diff.ndim == 4 else None
    lines = [f"# bf16 against float32 for a diffusion decoder's network", "", f"`{command_line(__file__, argv)}`", "",
             *hardware_lines(device), f"- {load_line()}", f"- network: {source}, modality `{args.modality}` "
             f"({decoder.prediction}-prediction), batch {args.batch}, DPM-Solver++(2M) {args.steps} steps "
             f"({args.steps + 1} network calls), median of {args.repeats} repeats × 2 alternated blocks", "",
             md_table(["work", "precision", "wall s / batch", "CPU s / batch", "wall s per 1,000 images"], rows), "",
             f"Samples from the same x_T and z: max |Δx| {diff.abs().max().item():.4f}, RMS Δx "
             f"{diff.pow(2).mean().sqrt().item():.4f}"
             + ("" if colour is None else f", RMS per-channel-mean Δ {colour.pow(2).mean().sqrt().item():.4f}")
             + " (data units)."]
    report = write_report(lines, args.out)
    print(report)
    return report


if __name__ == "__main__":
    main()
