#!/usr/bin/env python
r"""Training throughput (examples / s) and peak memory of one Diff-MVAE training step, against image size,
precision (fp32 / bf16 autocast), memory layout (contiguous / channels-last) and ``torch.compile``.

**What is timed.** The model is what ``diffmvae-train`` builds: :func:`pyro_diffmvae.builders.build_model`
on the composed hydra config (default: ``model=diffmvae_star_v``, ``weighting=v_mse``, ``fusion=mopoe``, the
shapes modalities: image → diffusion decoder with the config's UNet, mask and 17 attributes →
Bernoulli decoders), with ``dataset.image_size`` set to each ``--image-sizes`` value and any
``--override``. One step is what :class:`~pyro_diffmvae.train.DiffMVAEModule` does in Lightning's loop:
``zero_grad``; forward of ``DiffMVAEModule.negative_elbo(batch)`` (Pyro's ``TraceMeanField_ELBO``) under
``torch.autocast(device, bf16)`` for the bf16 variants (what ``trainer.precision=bf16-mixed`` wraps the
training step in); backward outside autocast; gradient clipping at ``trainer.gradient_clip_val``; Adam
step. Left out: Lightning's own bookkeeping and logging, and the extra no-grad forward pass of the
ELBO's parts every ``trainer.log_parts_every`` steps. The batch is synthetic (images uniform in
[-1, 1], random mask and attribute bits, random caption tokens; :func:`make_batch`): the cost does not depend on the values. Any preset whose networks build without its data runs (``--override experiment=celebamask_hq_diffmvae_star``).

**Variants** (``--variants``; tokens joined by ``+``): ``fp32`` | ``bf16`` | ``fp16`` (autocast; fp16
with a ``GradScaler``), ``cl`` (``trainer.channels_last``: :func:`~pyro_diffmvae.train.eps_nets_to_channels_last`
and :func:`~pyro_diffmvae.train.batch_to_channels_last`), ``compile`` (``trainer.compile``:
:func:`~pyro_diffmvae.train.compile_eps_nets` with ``--compile-backend`` / ``--compile-mode``). Each
variant gets a freshly built, identically seeded model. Compiled variants run only at
``--compile-sizes`` (default: every size); where compiling fails (e.g. no C++ compiler for inductor on
CPU) the row says why and the script goes on. The first warm-up step of a compiled variant includes the
compilation; its time is reported as "first step".

**Memory.** CUDA: ``torch.cuda.max_memory_allocated()`` over the timed steps (peak reset after the
warm-up): parameters, gradients, Adam state and the step's activations. CPU: for each timed step, the
peak resident set size (RSS), sampled from ``/proc/self/statm`` every 0.5 ms by a background thread,
minus the RSS just before the step (the model, gradients and Adam state already exist then, so the
difference is the step's activations and temporaries); the largest over the steps is reported. Before
each step the freed heap is handed back to the OS (``gc.collect`` + glibc ``malloc_trim``), or the
pages the previous step freed would already count in the RSS and hide this step's growth.
``resource.getrusage`` is not used: its ``ru_maxrss`` is the peak of the whole process, which only ever
grows. (Without ``/proc`` the CPU column is the growth of ``ru_maxrss``, labelled so.)

**Timing.** Wall clock (``perf_counter``; ``torch.cuda.synchronize()`` around each step on CUDA) and
this process's CPU time (``time.process_time``); median and minimum over ``--steps`` timed steps after
``--warmup`` warm-up steps. On a shared CPU use ``--threads 1``; the CPU-time column is then the work
done and hardly moved by other jobs.

Examples::

    python experiments/benchmarks/bench_throughput.py --threads 1              # CPU, small batch, few steps
    python experiments/benchmarks/bench_throughput.py --threads 1 --variants fp32 bf16 fp32+cl fp32+compile \
        --compile-sizes 32 --out experiments/results/bench_throughput_cpu.md
    python experiments/benchmarks/bench_throughput.py --device cuda --batch 64 --steps 20 --warmup 3 \
        --image-sizes 32 64 128 --out bench_throughput_gpu.md     # all 8 variants
    python experiments/benchmarks/bench_throughput.py --device cuda --batch 128 \
        --override model.unet.base_channels=64 model.unet.channel_mults=[1,2,2,2]   # a larger UNet
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import itertools
import os
import resource
import statistics
import threading
import time

import pyro
import torch

import _hardware  # noqa: E402  (script dir on sys.path)
from _hardware import command_line, hardware_lines, load_line, md_table, setup_device, sync, write_report  # noqa: E402  (script dir on sys.path)
from hydra import compose, initialize_config_module

from pyro_diffmvae.builders import build_model

from pyro_diffmvae.train import DiffMVAEModule, batch_to_channels_last, compile_eps_nets

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_VARIANTS = ["+".join(p for p in parts if p) for parts in
                    itertools.product(["fp32", "bf16"], ["", "cl"], ["", "compile"])]


# --------------------------------------------------------------------------- helpers
def parse_variant(text: str) -> dict:
    tokens = text.split("+")
    precision = [t for t in tokens if t in PRECISIONS]
    unknown = [t for t in tokens if t not in PRECISIONS and t not in ("cl", "compile")]
    if len(precision) != 1 or unknown or len(set(tokens)) != len(tokens):
        raise argparse.ArgumentTypeError(f"variant {text!r}: one of {sorted(PRECISIONS)} plus optional 'cl' and "
                                         "'compile', joined by '+' (e.g. bf16+cl+compile)")
    return {"name": text, "precision": precision[0], "channels_last": "cl" in tokens, "compile": "compile" in tokens}


def fmt(x: float, digits: int = 3) -> str:
    """``x`` with about ``digits`` significant digits; "n/a" for nan/inf and "0" for zero (skipped variants)."""
    return "0" if x == 0 else _hardware.fmt(x, digits, non_finite="n/a")


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_HAS_STATM = os.path.exists("/proc/self/statm")


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * _PAGE


def malloc_trim() -> None:
    """Hand freed heap memory back to the OS (glibc), so that RSS differences mean new allocations."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakRSS:
    """Context manager: peak RSS (bytes) sampled every ``interval`` s by a thread while inside."""

    def __init__(self, interval: float = 5e-4):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self):
        self.start = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def compose_cfg(image_size: int, overrides: list[str]):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=[f"dataset.image_size={image_size}", *overrides])


def make_batch(vae, batch_size: int, device: torch.device, seed: int) -> dict:
    """A synthetic batch for every modality of ``vae``, of its decoder's event shape: diffusion-decoded
    and Normal/Laplace data uniform in [-1, 1], Bernoulli data random bits (a mask: 30 % ones),
    categorical data (captions) random tokens; the cost of a step does not depend on the values."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    for name, modality in vae.modalities.items():
        shape = (batch_size, *modality.event_shape)
        decoder = modality.decoder
        likelihood = getattr(decoder, "likelihood", None)
        if modality.is_diffusion or likelihood in ("normal", "laplace"):
            batch[name] = torch.rand(shape, generator=g) * 2 - 1
        elif likelihood == "bernoulli":
            batch[name] = (torch.rand(shape, generator=g) < (0.3 if name == "mask" else 0.5)).float()
        elif likelihood == "categorical":
            batch[name] = torch.randint(0, decoder.num_classes, shape, generator=g)
        else:
            raise SystemExit(f"modality {name!r}: no synthetic data for its decoder ({type(decoder).__name__})")
    return {k: v.to(device) for k, v in batch.items()}


# --------------------------------------------------------------------------- one variant
def run_variant(args, cfg, variant: dict, device: torch.device) -> dict:
    """Build, warm up and time one variant; returns the row's numbers (or ``skipped``: a reason)."""
    pyro.clear_param_store()
    torch._dynamo.reset()
    malloc_trim()
    torch.manual_seed(args.seed)
    vae = build_model(cfg).to(device)
    module = DiffMVAEModule(vae, lr=cfg.trainer.lr, seed=args.seed, log_parts_every=0,
                            channels_last=variant["channels_last"])  # converts the UNet when channels-last
    batch = make_batch(vae, args.batch, device, args.seed + 1)
    if variant["channels_last"]:
        batch = batch_to_channels_last(batch)
    if variant["compile"]:
        compile_eps_nets(vae, backend=args.compile_backend, mode=args.compile_mode)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.trainer.lr)
    dtype = PRECISIONS[variant["precision"]]
    scaler = torch.amp.GradScaler(device.type) if dtype is torch.float16 and device.type == "cuda" else None
    clip = cfg.trainer.gradient_clip_val

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        with ctx:
            loss = module.negative_elbo(batch)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        return loss.detach()

    warmup = max(args.warmup, 2 if variant["compile"] else 1)
    first = None
    losses = []
    try:
        for i in range(warmup):
            sync(device)
            t0 = time.perf_counter()
            losses.append(step())
            sync(device)
            if i == 0:
                first = time.perf_counter() - t0
    except Exception as err:  # compile failures (no C++ compiler, unsupported backend), OOM, ...
        if not variant["compile"] and not isinstance(err, torch.OutOfMemoryError):
            raise
        return {"skipped": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"}

    wall, cpu, rss = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ru0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(args.steps):
        # CPU: hand the previous step's freed memory back first, or its pages would already be in the RSS
        cpu_rss = device.type == "cpu" and _HAS_STATM
        if cpu_rss:
            malloc_trim()
        with PeakRSS() if cpu_rss else contextlib.nullcontext() as peak:
            sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            losses.append(step())
            sync(device)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        if cpu_rss:
            rss.append(peak.peak - peak.start)
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated(device)
    elif rss:
        mem = max(rss)
    else:
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - ru0
    final = torch.stack(losses).float()
    unet = vae.modalities[cfg.dataset.diffusion_modalities[0]].decoder.eps_net
    return {
        "wall": statistics.median(wall), "wall_min": min(wall), "cpu": statistics.median(cpu), "first": first,
        "mem": mem, "finite": bool(torch.isfinite(final).all()), "loss": float(final[-1]),
        "params": sum(p.numel() for p in vae.parameters()), "unet_params": sum(p.numel() for p in unet.parameters()),
    }


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="See the module docstring for what is timed and how memory is measured.")
    p.add_argument("--image-sizes", type=int, nargs="+", default=[32, 64, 128], help="dataset.image_size values")
    p.add_argument("--variants", type=parse_variant, nargs="+", default=[parse_variant(v) for v in DEFAULT_VARIANTS],
                   help="precision[+cl][+compile] (default: all 8 of fp32/bf16 x contiguous/cl x eager/compile)")
    p.add_argument("--batch", type=int, default=8, help="examples per step (CPU-friendly default; e.g. 64-256 on a GPU)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps per variant (at least 2 when compiled)")
    p.add_argument("--compile-sizes", type=int, nargs="*", default=None,
                   help="image sizes at which compiled variants run (default: all; compiling takes minutes on a CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (trainer.compile_backend)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune (trainer.compile_mode)")
    p.add_argument("--override", nargs="*", default=[], help="hydra overrides for the model, e.g. model.unet.base_channels=64")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:1")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (use 1 on a shared CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.threads, args.device)
    cmd = command_line(__file__, argv)
    cfg0 = compose_cfg(args.image_sizes[0], args.override)
    u = cfg0.model.unet
    mem_how = ("`torch.cuda.max_memory_allocated` over the timed steps (parameters, gradients, Adam state, activations)"
               if device.type == "cuda" else
               "largest over the timed steps of (peak RSS during the step minus RSS just before it, after `malloc_trim`; "
               "sampled from /proc/self/statm every 0.5 ms): the step's activations and temporaries (the model and "
               "Adam state exist before)" if _HAS_STATM else
               "growth of `ru_maxrss` (process peak RSS) over the timed steps (a lower bound)")
    out = [
        "# Training throughput: one Diff-MVAE step (Pyro ELBO) by image size, precision, layout and torch.compile\n",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *hardware_lines(device, f"pyro-ppl {pyro.__version__}"),
        f"- Model: `build_model` of the hydra config (model `{cfg0.model.name}`, weighting `{cfg0.weighting.name}`, fusion "
        f"`{cfg0.fusion.name}`, subset_strategy `{cfg0.fusion.subset_strategy}`, modalities {list(cfg0.dataset.modalities)}, "
        f"diffusion decoders for {list(cfg0.dataset.diffusion_modalities)}; overrides: "
        f"{' '.join(args.override) if args.override else 'none'}); UNet base {u.base_channels}, mults "
        f"{list(u.channel_mults)}, {u.num_res_blocks} res block(s), attention at {list(u.attention_resolutions)} + middle, "
        f"latent {cfg0.model.latent_dim}",
        f"- Step: forward (`DiffMVAEModule.negative_elbo`, autocast for bf16/fp16) + backward + clip "
        f"{cfg0.trainer.gradient_clip_val} + Adam; batch {args.batch}; {args.steps} timed steps after {args.warmup} "
        f"warm-up (2 when compiled); median wall time (`perf_counter`"
        f"{', torch.cuda.synchronize()' if device.type == 'cuda' else ''}) and process CPU time",
        f"- Memory: {mem_how}",
        f"- compile: `torch.compile` backend `{args.compile_backend}`, mode `{args.compile_mode}`, of each diffusion "
        f"decoder's eps_net (`Module.compile`); compiled variants at sizes "
        f"{args.compile_sizes if args.compile_sizes is not None else args.image_sizes}",
        f"- At start: {load_line()} (other processes on the machine inflate and scatter CPU timings)\n",
    ]
    print("\n".join(out), flush=True)
    printed = len(out)

    header = ["image", "variant", "ms / step (median)", "min", "examples / s", "CPU ms / step", "first step (s)",
              "peak memory (MiB)", "speed-up vs fp32", "loss finite"]
    for S in args.image_sizes:
        cfg = compose_cfg(S, args.override)
        rows, base, sizes = [], None, None
        for v in args.variants:
            if v["compile"] and args.compile_sizes is not None and S not in args.compile_sizes:
                continue
            r = run_variant(args, cfg, v, device)
            if "skipped" in r:
                print(f"  {S}px {v['name']}: skipped ({r['skipped']})", flush=True)
                rows.append([f"{S}", f"`{v['name']}`", "skipped", "", "", "", "", "", "", r["skipped"]])
                continue
            sizes = (r["unet_params"], r["params"])
            if v["name"] == "fp32":
                base = r["wall"]
            speed = f"{base / r['wall']:.2f}x" if base else ""
            row = [f"{S}", f"`{v['name']}`", fmt(r["wall"] * 1e3), fmt(r["wall_min"] * 1e3), fmt(args.batch / r["wall"]),
                   fmt(r["cpu"] * 1e3), fmt(r["first"]), fmt(r["mem"] / 2**20), speed, "yes" if r["finite"] else "NO"]
            rows.append(row)
            print(f"  {S}px {v['name']}: {row[2]} ms/step, {row[4]} ex/s, peak {row[7]} MiB, first step {row[6]} s",
                  flush=True)
        out.append(f"## {S} x {S} px" + (f" (UNet {sizes[0] / 1e6:.2f} M params, whole model {sizes[1] / 1e6:.2f} M)"
                                          if sizes else "") + "\n")
        out.append(md_table(header, rows) + "\n")
        print("\n" + "\n".join(out[printed:]), flush=True)
        printed = len(out)
    out.append(f"_At end: {load_line()}; process peak RSS (ru_maxrss) "
               f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB._")
    print("\n".join(out[printed:]), flush=True)
    return write_report(out, args.out)


if __name__ == "__main__":
    main()
