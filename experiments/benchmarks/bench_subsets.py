#!/usr/bin/env python
r"""Training-step time against the number of modalities M, for ``subset_strategy=sample`` vs ``enumerate``.

**Model.** PolyMNIST-like: M image modalities ``m0 … m{M-1}`` of shape 3 x 28 x 28, built by
:func:`pyro_diffmvae.builders.build_model` from the hydra config ``experiment=polymnist_mopoe_cpu``
(``--decoders feedforward``, default: conv encoders, Laplace conv decoders) or
``experiment=polymnist_diffmvae_star_cpu`` (``--decoders diffusion``: a UNet diffusion decoder per
modality), with ``dataset.modalities`` cut to the first M and ``fusion.subset_strategy`` set; MoPoE
over all :math:`K = 2^M - 1` non-empty subsets. No data is read (the batch is synthetic: every
modality observed, images uniform in [-1, 1]).

**What the strategies cost.** ``sample`` draws one subset per example: one PoE and *one* decoder pass
per modality, whatever M is; its cost grows like M (encoders + decoders). ``enumerate`` scores every
subset (a ``pyro.plate("subsets", K)``): every decoder runs on K x B latents, so its cost grows like
:math:`M (2^M - 1)`. The table prints both, their ratio and enumerate's time per subset.

**Step and timing.** As ``bench_throughput.py``: ``zero_grad``, forward of
``DiffMVAEModule.negative_elbo`` (Pyro ``TraceMeanField_ELBO``), backward, gradient clipping, Adam.
The two strategies' steps are interleaved (order alternating per round) after ``--warmup`` warm-up
steps each; median wall time (``perf_counter``, CUDA-synchronised on GPU) and this process's CPU time.

Examples::

    python experiments/benchmarks/bench_subsets.py --threads 1                      # CPU: M = 2..5, batch 16
    python experiments/benchmarks/bench_subsets.py --device cuda --batch 256 --steps 20
    python experiments/benchmarks/bench_subsets.py --device cuda --decoders diffusion --batch 64 --steps 10
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import pyro
import torch

from _hardware import command_line, hardware_lines, load_line, md_table, setup_device, sync, write_report  # noqa: E402  (script dir on sys.path)
from bench_throughput import fmt  # noqa: E402  (script dir on sys.path)
from hydra import compose, initialize_config_module

from pyro_diffmvae.builders import build_model
from pyro_diffmvae.train import DiffMVAEModule

PRESETS = {"feedforward": "polymnist_mopoe_cpu", "diffusion": "polymnist_diffmvae_star_cpu"}
STRATEGIES = ("sample", "enumerate")


def compose_cfg(args, M: int, strategy: str):
    names = [f"m{i}" for i in range(M)]
    mods = "[" + ",".join(names) + "]"
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=[f"experiment={PRESETS[args.decoders]}", f"dataset.modalities={mods}",
                                            f"dataset.diffusion_modalities={mods}", f"fusion.subset_strategy={strategy}",
                                            *args.override])


class Stepper:
    """One model of the comparison: its module, optimizer and training step."""

    def __init__(self, cfg, args, device):
        torch.manual_seed(args.seed)
        self.vae = build_model(cfg).to(device)
        self.module = DiffMVAEModule(self.vae, lr=cfg.trainer.lr, log_parts_every=0)
        self.params = [p for p in self.vae.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.trainer.lr)
        self.clip = cfg.trainer.gradient_clip_val
        g = torch.Generator().manual_seed(args.seed + 1)
        self.batch = {m: (torch.rand(args.batch, 3, 28, 28, generator=g) * 2 - 1).to(device) for m in cfg.dataset.modalities}
        self.K = int(self.vae.subsets.shape[0])
        self.wall, self.cpu, self.losses = [], [], []

    def step(self):
        self.opt.zero_grad(set_to_none=True)
        loss = self.module.negative_elbo(self.batch)
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.losses.append(float(loss.detach()))

    def timed_step(self, device):
        sync(device)
        c0, t0 = time.process_time(), time.perf_counter()
        self.step()
        sync(device)
        self.wall.append(time.perf_counter() - t0)
        self.cpu.append(time.process_time() - c0)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for the model and what is timed.")
    p.add_argument("--modalities", type=int, nargs="+", default=[2, 3, 4, 5], help="numbers of modalities M (1..5)")
    p.add_argument("--decoders", choices=sorted(PRESETS), default="feedforward",
                   help="feedforward: Laplace conv decoders (polymnist_mopoe_cpu); diffusion: a UNet per modality "
                        "(polymnist_diffmvae_star_cpu; enumerate then runs K x B UNet rows per modality)")
    p.add_argument("--batch", type=int, default=16, help="examples per step")
    p.add_argument("--steps", type=int, default=3, help="timed steps per strategy")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per strategy")
    p.add_argument("--override", nargs="*", default=[], help="more hydra overrides, e.g. model.encoder_width=64")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (use 1 on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    args = p.parse_args(argv)
    if any(not 1 <= m <= 5 for m in args.modalities):
        p.error("--modalities: PolyMNIST has 5 modalities (1..5)")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.threads, args.device)
    cmd = command_line(__file__, argv)
    cfg0 = compose_cfg(args, max(args.modalities), "sample")
    u = cfg0.model.unet
    dec = (f"a diffusion decoder per modality (UNet base {u.base_channels}, mults {list(u.channel_mults)}, weighting "
           f"`{cfg0.weighting.name}`)" if args.decoders == "diffusion" else "Laplace conv decoders")
    out = [
        "# Training-step time against the number of modalities: subset_strategy sample vs enumerate\n",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *hardware_lines(device, f"pyro-ppl {pyro.__version__}"),
        f"- Model: `build_model` of `experiment={PRESETS[args.decoders]}` with modalities m0..m(M-1) (3x28x28 each), "
        f"conv encoders, {dec}; fusion `{cfg0.fusion.name}` over all 2^M - 1 subsets; latent {cfg0.model.latent_dim}; "
        f"overrides: {' '.join(args.override) if args.override else 'none'}",
        f"- Step: forward (`DiffMVAEModule.negative_elbo`) + backward + clip {cfg0.trainer.gradient_clip_val} + Adam, "
        f"float32, batch {args.batch}, every modality observed; {args.steps} timed steps per strategy after "
        f"{args.warmup} warm-up, the strategies interleaved; median wall time (`perf_counter`"
        f"{', torch.cuda.synchronize()' if device.type == 'cuda' else ''}) and process CPU time",
        f"- At start: {load_line()} (other processes on the machine inflate and scatter CPU timings)\n",
    ]
    print("\n".join(out), flush=True)

    rows = []
    for M in args.modalities:
        pyro.clear_param_store()
        steppers = {s: Stepper(compose_cfg(args, M, s), args, device) for s in STRATEGIES}
        for s in STRATEGIES:
            for _ in range(args.warmup):
                steppers[s].step()
        for r in range(args.steps):
            for s in (STRATEGIES if r % 2 == 0 else STRATEGIES[::-1]):
                steppers[s].timed_step(device)
        sm, en = steppers["sample"], steppers["enumerate"]
        w_s, w_e = statistics.median(sm.wall), statistics.median(en.wall)
        c_s, c_e = statistics.median(sm.cpu), statistics.median(en.cpu)
        paired = statistics.median(e / s for e, s in zip(en.wall, sm.wall))
        rows.append([str(M), str(en.K), fmt(w_s * 1e3), fmt(c_s * 1e3), fmt(args.batch / w_s), fmt(w_e * 1e3),
                     fmt(c_e * 1e3), fmt(args.batch / w_e), f"{w_e / w_s:.2f}x (paired {paired:.2f}x)",
                     fmt(w_e / en.K * 1e3)])
        print(f"  M={M} (K={en.K}): sample {rows[-1][2]} ms/step, enumerate {rows[-1][5]} ms/step, "
              f"ratio {rows[-1][8]}", flush=True)
        del steppers
    header = ["M", "subsets K", "sample ms / step", "sample CPU ms", "sample examples / s", "enumerate ms / step",
              "enumerate CPU ms", "enumerate examples / s", "enumerate / sample", "enumerate ms per subset"]
    out.append("## Step time by number of modalities\n")
    out.append(md_table(header, rows) + "\n")
    out.append(f"_At end: {load_line()}._")
    print("\n".join(out[-3:]), flush=True)
    return write_report(out, args.out)


if __name__ == "__main__":
    main()
