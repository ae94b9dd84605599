#!/usr/bin/env python
r"""Benchmark the samplers of :mod:`pyro_diffmvae.samplers` with a z-conditioned ConditionalUNet.

Three measurements (numbers only; nothing here asserts on speed):

1. **torchsde overhead.** ms per step of :func:`~pyro_diffmvae.samplers.sample_reverse_sde`
   (Euler–Maruyama through ``torchsde``) against a hand-written Euler–Maruyama loop of the same
   reverse SDE in plain torch,

   .. math:: x_{t-h} = x_t - [f(x_t,t) - g^2(t)\,s_\theta]\,h + g(t)\sqrt h\,\xi,
             \qquad s_\theta = -\hat\epsilon_\theta/\sigma_t,\ f = -\tfrac12\beta x,\ g^2 = \beta,

   with the same net, the same time grid (recorded from torchsde's Brownian queries by a cheap probe
   run, so any round-off step is copied too) and so the same number of network evaluations (NFE); the
   samplers' final Tweedie denoise step is switched off (``denoise=False``). Reports the ratio
   torchsde / hand-written (target <= 1.10x) and the per-step overhead in ms. An optional check
   drives the hand loop with torchsde's own Brownian path and compares the two results.
2. **Wall time per batch.** DDIM-50 (:func:`sample_ddim`) vs reverse-SDE-1000
   (:func:`sample_reverse_sde`) vs probability-flow ODE-100 (:func:`sample_probability_flow`), as
   users call them (``denoise=True``), in s/batch and images/s. ``--sde-steps`` / ``--ode-steps`` /
   ``--ddim-steps`` run fewer steps and extrapolate linearly in NFE (labelled ``extrapolated``).
   By default the solver's own cost is timed with a null net at the nominal step count and only the
   network time is scaled (``BrownianInterval``'s cost per step grows with the step count).
3. **Overhead breakdown** with a null network (``zeros_like``) so that only the solver machinery
   is timed: hand loop, torchsde, ``BrownianInterval`` queries alone (with and without a ``dt``
   hint, with the number of Gaussian draws per step), ``torch.randn`` alone.

Step counts for which the sampler's ``BrownianInterval`` (built without a ``dt`` hint) would build
an astronomically large tree (a round-off step as its 101st query: out of memory) are detected by
the probe and replaced by the nearest safe count, with a note (``--allow-bm-hazard`` to run anyway).

Times are wall clock (``perf_counter``, ``torch.cuda.synchronize()`` around each run on CUDA;
warm-up first; median over repeats) and, next to them, this process's CPU time (all threads), which
is far less sensitive to other load on a shared CPU box; ``--threads 1`` makes CPU time equal the
work done (with more threads it includes OpenMP spinning). On CUDA the CPU column is host time only.

Output is Markdown on stdout (and in ``--out PATH``), with the command line and hardware header.

Examples::

    python experiments/benchmarks/bench_samplers.py                        # default net, full steps
    python experiments/benchmarks/bench_samplers.py --small --steps 20 --sde-steps 50
    python experiments/benchmarks/bench_samplers.py --device cuda --repeats 10 --out bench.md
"""

from __future__ import annotations

import argparse
import datetime
import math
import statistics
import time
from typing import Callable

import torch

from _hardware import command_line, fmt, hardware_lines, load_line, md_table, setup_device, sync, write_report  # noqa: E402  (script dir on sys.path)
import torchsde

from pyro_diffmvae.nets.unet import ConditionalUNet
from pyro_diffmvae.samplers import DPM_SPACINGS, sample_ddim, sample_dpmpp_2m, sample_probability_flow, sample_reverse_sde
from pyro_diffmvae.sde import VPSDE

DEFAULT_NET = dict(base_channels=64, channel_mults=(1, 2, 2), num_res_blocks=2, attention_resolutions=(16,))
SMALL_NET = dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=())

# torchsde.BrownianInterval(dt=None) (what the samplers build) counts 100 warm-up queries, then
# sizes a dependency tree from the length of query #101: pieces of 0.8 * cache_size * dt.
_BM_WARMUP_QUERIES = 100
_BM_PIECE_FACTOR = 0.8 * 45
_BM_MAX_PIECES = 1e6


# --------------------------------------------------------------------------- helpers
class CountingNet:
    """Wraps an eps-net and counts its evaluations (NFE)."""

    def __init__(self, net: Callable):
        self.net = net
        self.calls = 0

    def __call__(self, x, z, t):
        self.calls += 1
        return self.net(x, z, t)


class Probe:
    """What a sampler does at a step count, found by running it with a null net and a fake Brownian
    motion (``BrownianInterval.__call__`` patched to record its queries and return zeros), so it costs
    little and cannot trigger the tree blow-up described in :func:`Probe.hazard`."""

    def __init__(self, fn, steps: int, shape, sde: VPSDE, z, **kwargs):
        from torchsde._brownian.brownian_interval import BrownianInterval

        self.steps, self.grid, self.bm_dt, self.bm_seen = steps, [], None, False
        null = CountingNet(lambda x, z_, t: torch.zeros_like(x))
        orig = BrownianInterval.__call__

        def fake(bm, ta, tb=None, return_U=False, return_A=False):
            self.bm_seen, self.bm_dt = True, bm._dt
            if tb is not None and float(ta) != float(tb):
                self.grid.append((float(ta), float(tb)))
            return torch.zeros(bm._size, dtype=bm._dtype, device=bm._device)

        BrownianInterval.__call__ = fake
        try:
            fn(null, shape, sde, steps=steps, z=z, **kwargs)
        finally:
            BrownianInterval.__call__ = orig
        self.nfe = null.calls
        self.span = sde.T - sde.eps

    @property
    def hazard(self) -> float:
        """Tree intervals ``BrownianInterval(dt=None)`` would build. With no ``dt`` hint it counts 100
        warm-up queries, then builds a dependency tree of pieces 0.8 * cache_size * (length of query
        #101); a round-off step there (~1e-15) means ~1e13 intervals: the process runs out of memory."""
        if not self.bm_seen or self.bm_dt is not None or len(self.grid) <= _BM_WARMUP_QUERIES:
            return 0.0
        s0, s1 = self.grid[_BM_WARMUP_QUERIES]
        return self.span / (_BM_PIECE_FACTOR * (s1 - s0)) if s1 > s0 else math.inf

    def describe_hazard(self) -> str:
        s0, s1 = self.grid[_BM_WARMUP_QUERIES]
        return (
            f"at {self.steps} steps the torchsde grid has {len(self.grid)} steps and query #{_BM_WARMUP_QUERIES + 1} "
            f"is {s1 - s0:.1e} long, so the sampler's BrownianInterval (no `dt` hint) would build "
            f"~{self.hazard:.0e} tree intervals and run out of memory"
        )


def safe_probe(fn, steps: int, shape, sde, z, allow: bool, **kwargs) -> tuple[Probe, str]:
    """Probe at ``steps``, or (unless ``allow``) at the nearest step count that does not blow up."""
    pr = Probe(fn, steps, shape, sde, z, **kwargs)
    if allow or pr.hazard < _BM_MAX_PIECES:
        return pr, ""
    for delta in range(1, steps):
        for cand in (steps - delta, steps + delta):
            if cand >= 1:
                alt = Probe(fn, cand, shape, sde, z, **kwargs)
                if alt.hazard < _BM_MAX_PIECES:
                    return alt, f"{pr.describe_hazard()}; measured at {cand} steps instead"
    raise RuntimeError(f"no safe step count near {steps}")


def uniform_grid(span: float, steps: int) -> list[tuple[float, float]]:
    return [(span * i / steps, span * (i + 1) / steps) for i in range(steps)]


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of one call of ``fn``."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


# --------------------------------------------------------------------------- hand-written EM
@torch.no_grad()
def hand_em(net, sde: VPSDE, grid, x_T: torch.Tensor, z, noise: Callable | None = None) -> torch.Tensor:
    r"""Euler–Maruyama for the reverse SDE in plain torch on the reversed-time grid ``grid``.

    Each step from ``t = T - s0`` with ``h = s1 - s0``:
    ``x <- x + h (beta x / 2 - beta eps / sigma) + sqrt(beta) dW``, ``dW ~ N(0, h I)``
    (``noise(s0, s1)`` if given, e.g. torchsde's Brownian increment, else ``randn * sqrt(h)``).
    Schedule coefficients are Python floats; one net call per step.
    """
    x = x_T.clone()
    b = x.shape[0]
    bmin, dbeta = sde.beta_min, sde.beta_max - sde.beta_min
    for s0, s1 in grid:
        t = sde.T - s0
        h = s1 - s0
        beta = bmin + t * dbeta
        sigma = math.sqrt(-math.expm1(-(bmin * t + 0.5 * dbeta * t * t)))
        tt = torch.full((b,), t, device=x.device, dtype=x.dtype)
        eps = net(x, z, tt)
        x = torch.add(x.mul(1.0 + 0.5 * beta * h), eps, alpha=-beta * h / sigma)
        if noise is None:
            x.add_(torch.randn_like(x), alpha=math.sqrt(beta * h))
        else:
            x.add_(noise(s0, s1).reshape(x.shape), alpha=math.sqrt(beta))
    return x


# --------------------------------------------------------------------------- set-up
def build_net(args, device: torch.device) -> tuple[torch.nn.Module, dict]:
    cfg = dict(SMALL_NET if args.small else DEFAULT_NET)
    for key in ("base_channels", "num_res_blocks"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.channel_mults is not None:
        cfg["channel_mults"] = tuple(args.channel_mults)
    if args.attention_resolutions is not None:
        cfg["attention_resolutions"] = tuple(args.attention_resolutions)
    cfg.update(in_channels=args.channels, image_size=args.image_size, z_dim=args.z_dim)
    torch.manual_seed(args.seed)
    net = ConditionalUNet(**cfg)
    # The zero-initialised layers (last conv of each block, attention projections, output conv)
    # would make eps identically 0; redraw them so the samplers move a realistic state around.
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    return net.to(device).eval(), cfg


# --------------------------------------------------------------------------- part 1
def bench_overhead(args, net, sde, shape, z, device, out: list[str]):
    span = sde.T - sde.eps
    pr, note = safe_probe(sample_reverse_sde, args.steps, shape, sde, z, args.allow_bm_hazard, denoise=False)
    steps = pr.steps
    # The hand loop walks the very grid torchsde walks (recorded from its Brownian queries).
    grid = pr.grid or uniform_grid(span, steps)
    cnet = CountingNet(net)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    x_T = torch.randn(shape, device=device, generator=gen)

    def run_torchsde(n=steps):
        sample_reverse_sde(cnet, shape, sde, steps=n, z=z, x_T=x_T, denoise=False)

    def run_hand(g=grid):
        hand_em(cnet, sde, g, x_T, z)

    # warm-up (allocator, oneDNN/cuDNN kernel selection) on a few steps
    w = min(steps, args.warmup_steps)
    for _ in range(args.warmup):
        run_torchsde(w)
        run_hand(grid[:w])

    t_sde, t_hand, nfe_sde, nfe_hand = [], [], set(), set()
    for r in range(args.repeats):
        order = [("sde", run_torchsde), ("hand", run_hand)]
        if r % 2:  # alternate the order so slow drift does not favour one side
            order.reverse()
        for name, fn in order:
            cnet.calls = 0
            dt = timed(fn, device)
            (t_sde if name == "sde" else t_hand).append(dt)
            (nfe_sde if name == "sde" else nfe_hand).add(cnet.calls)
    nfe = max(nfe_sde)
    if nfe_sde != nfe_hand:
        out.append(f"> WARNING: NFE differ: torchsde {sorted(nfe_sde)}, hand-written {sorted(nfe_hand)}")

    (med_sde, cpu_sde), (med_hand, cpu_hand) = medians(t_sde), medians(t_hand)
    paired = statistics.median(a[0] / b[0] for a, b in zip(t_sde, t_hand))
    ratio = med_sde / med_hand
    overhead_ms = (med_sde - med_hand) / nfe * 1e3
    min_sde, min_hand = min(a[0] for a in t_sde), min(b[0] for b in t_hand)

    out.append(f"## 1. Reverse SDE, Euler–Maruyama: torchsde vs hand-written loop ({args.repeats} repeats, median)\n")
    if note:
        out.append(f"> NOTE: {note}.\n")
    if len(grid) != steps:
        out.append(
            f"> NOTE: torchsde's grid for {steps} steps has {len(grid)} steps (last one "
            f"{grid[-1][1] - grid[-1][0]:.1e} long); the hand-written loop copies that grid so both make {nfe} net calls.\n"
        )
    rows = [
        ["`sample_reverse_sde(denoise=False)` (torchsde)", f"{steps} ({nfe})", fmt(med_sde), fmt(med_sde / nfe * 1e3),
         fmt(min_sde / nfe * 1e3), fmt(cpu_sde / nfe * 1e3)],
        ["hand-written Euler–Maruyama loop", f"{len(grid)} ({max(nfe_hand)})", fmt(med_hand), fmt(med_hand / nfe * 1e3),
         fmt(min_hand / nfe * 1e3), fmt(cpu_hand / nfe * 1e3)],
    ]
    out.append(md_table(["sampler", "steps (NFE)", "s / run (median)", "ms / step (median)", "ms / step (min)",
                         "CPU ms / step (median)"], rows))
    verdict = "within" if ratio <= 1.10 else "ABOVE"
    out.append(
        f"\n- ratio torchsde / hand-written: **{ratio:.3f}x** (median of per-repeat paired ratios {paired:.3f}x; "
        f"{verdict} the 1.10x target)\n"
        f"- ratio of the fastest runs: {min_sde / min_hand:.3f}x ({(min_sde - min_hand) / nfe * 1e3:+.2f} ms/step); "
        f"ratio of process CPU time (all threads; less sensitive to other load on the machine): "
        f"{cpu_sde / cpu_hand:.3f}x ({(cpu_sde - cpu_hand) / nfe * 1e3:+.2f} CPU ms/step)\n"
        f"- torchsde overhead per step (medians): **{overhead_ms:+.2f} ms** "
        f"({100 * (ratio - 1):+.1f}% of a {fmt(med_hand / nfe * 1e3)} ms step)\n"
        f"- raw wall times torchsde [s]: {', '.join(fmt(v[0]) for v in t_sde)}; "
        f"hand-written [s]: {', '.join(fmt(v[0]) for v in t_hand)}\n"
    )

    if args.check:
        # Same Brownian path: the hand loop queries a BrownianInterval built exactly as the sampler does.
        n_chk = min(steps, args.check_steps)
        pr_chk = Probe(sample_reverse_sde, n_chk, shape, sde, z, denoise=False)
        g_chk = pr_chk.grid or uniform_grid(span, n_chk)
        gen_a = torch.Generator().manual_seed(args.seed + 2)
        gen_b = torch.Generator().manual_seed(args.seed + 2)
        a = sample_reverse_sde(net, shape, sde, steps=n_chk, z=z, x_T=x_T, denoise=False, generator=gen_a)
        entropy = int(torch.randint(0, 2**31 - 1, (), generator=gen_b).item())
        bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=(shape[0], math.prod(shape[1:])), dtype=x_T.dtype,
                                       device=device, entropy=entropy, dt=pr_chk.bm_dt)
        b = hand_em(net, sde, g_chk, x_T, z, noise=lambda s0, s1: bm(s0, s1))
        diff = (a - b).abs().max().item()
        scale = a.abs().max().item()
        out.append(
            f"- like-for-like check: driven by torchsde's own Brownian path, the hand-written loop matches "
            f"`sample_reverse_sde` after {len(g_chk)} steps to max |diff| = {diff:.2e} "
            f"(relative to max |x| = {scale:.3g}: {diff / max(scale, 1e-30):.1e}; float32 vs float64 coefficients)\n"
        )
    return dict(ratio=ratio, overhead_ms=overhead_ms, ms_step_sde=med_sde / nfe * 1e3, ms_step_hand=med_hand / nfe * 1e3,
                cpu_ms_step_hand=cpu_hand / nfe * 1e3, cpu_ratio=cpu_sde / cpu_hand)


# --------------------------------------------------------------------------- part 2
def _null_time(fn, steps, shape, sde, z, device, repeats) -> tuple[tuple[float, float], int]:
    """Median (wall, CPU) time and NFE of sampler ``fn`` at ``steps`` with a network that returns zeros."""
    null = CountingNet(lambda x, z_, t: torch.zeros_like(x))
    fn(null, shape, sde, steps=min(steps, 2), z=z)
    times = []
    for _ in range(repeats):
        null.calls = 0
        times.append(timed(lambda: fn(null, shape, sde, steps=steps, z=z), device))
    return medians(times), null.calls


def bench_wall(args, net, sde, shape, z, device, out: list[str]):
    cnet = CountingNet(net)
    batch = shape[0]
    specs = [
        ("DDIM (`sample_ddim`)", sample_ddim, args.ddim_target, args.ddim_steps, False),
        ("reverse SDE, Euler–Maruyama (`sample_reverse_sde`)", sample_reverse_sde, args.sde_target, args.sde_steps, True),
        ("probability-flow ODE, Euler (`sample_probability_flow`)", sample_probability_flow, args.ode_target, args.ode_steps, True),
        *[(f"DPM-Solver++(2M), {n} steps (`sample_dpmpp_2m`)", sample_dpmpp_2m, n, None, False) for n in args.dpm_targets],
    ]
    # warm-up
    for _, fn, _, _, _ in specs:
        for _ in range(args.warmup):
            fn(cnet, shape, sde, steps=2, z=z)

    rows, notes, results, cpu_results = [], [], {}, {}
    for label, fn, target, measured, uses_torchsde in specs:
        measured = target if measured is None else measured
        target_probe = Probe(fn, target, shape, sde, z)  # exact NFE of the nominal run (incl. denoise)
        nfe_target = target_probe.nfe
        pr, note = safe_probe(fn, measured, shape, sde, z, args.allow_bm_hazard)
        measured = pr.steps
        if target_probe.hazard >= _BM_MAX_PIECES and not args.allow_bm_hazard:
            notes.append(f"{label} cannot run as-is: {target_probe.describe_hazard()}; the time shown is what it would cost")
            if measured != target:
                notes.append(f"{label}: measured at {measured} steps")
        elif note:
            notes.append(f"{label}: {note}")
        times, nfes = [], set()
        for _ in range(args.wall_repeats):
            cnet.calls = 0
            times.append(timed(lambda: fn(cnet, shape, sde, steps=measured, z=z), device))
            nfes.add(cnet.calls)
        nfe_meas = max(nfes)
        t_meas = medians(times)  # (wall, cpu)
        if measured == target:
            sec, how = t_meas, "measured"
        elif not args.null_correction:
            sec = tuple(v * nfe_target / nfe_meas for v in t_meas)
            how = f"**extrapolated** from {measured} steps ({nfe_meas} NFE, {fmt(t_meas[0])} s) x {nfe_target}/{nfe_meas}"
        else:
            # Net time scales with NFE; the solver's own cost need not (BrownianInterval's grows with the
            # step count), so time it with a null net at both step counts and add it back exactly.
            null_target_steps = safe_probe(fn, target, shape, sde, z, args.allow_bm_hazard)[0].steps
            (nt, nt_nfe), (nm, _) = (_null_time(fn, n, shape, sde, z, device, args.wall_repeats)
                                     for n in (null_target_steps, measured))
            sec = tuple((t_meas[i] - nm[i]) * nfe_target / nfe_meas + nt[i] * nfe_target / nt_nfe for i in (0, 1))
            how = (
                f"**extrapolated** from {measured} steps ({nfe_meas} NFE, {fmt(t_meas[0])} s): (time - null-net time) x "
                f"{nfe_target}/{nfe_meas} + null-net time at {null_target_steps} steps ({fmt(nt[0])} s)"
            )
        key = label.split(" (")[0] if label.startswith("DPM") else label.split(" (")[0].split(",")[0]
        results[key], cpu_results[key] = sec[0], sec[1]
        rows.append([label, str(target), str(nfe_target), fmt(sec[0]), fmt(batch / sec[0]), fmt(sec[0] / nfe_target * 1e3),
                     fmt(sec[1]), how])

    out.append(f"## 2. Wall time per batch of {batch} (denoise=True, median of {args.wall_repeats})\n")
    out.append(md_table(["sampler", "steps", "NFE", "s / batch", "images / s", "ms / NFE", "CPU s / batch", "how"], rows))
    out.append("")
    for n in notes:
        out.append(f"> NOTE: {n}.\n")
    ddim, sde_t, ode = (results.get(k) for k in ("DDIM", "reverse SDE", "probability-flow ODE"))
    ddim_c, sde_c, ode_c = (cpu_results.get(k) for k in ("DDIM", "reverse SDE", "probability-flow ODE"))
    out.append(
        f"- DDIM-{args.ddim_target} is **{sde_t / ddim:.1f}x** faster than reverse-SDE-{args.sde_target} "
        f"and {ode / ddim:.1f}x faster than PF-ODE-{args.ode_target} in wall time "
        f"({sde_c / ddim_c:.1f}x and {ode_c / ddim_c:.1f}x in CPU time). NFE counted by wrapping the net; it "
        f"includes the final Tweedie denoise call.\n"
    )
    for n in args.dpm_targets:
        dpm = results[f"DPM-Solver++(2M), {n} steps"]
        out.append(f"- DPM-Solver++(2M) with {n} steps ({n + 1} NFE) is **{ddim / dpm:.1f}x** faster than "
                   f"DDIM-{args.ddim_target} in wall time (its accuracy per NFE: part 4).\n")


# --------------------------------------------------------------------------- part 4
class _GaussianEps(torch.nn.Module):
    r"""Exact ε of :math:`\mathcal N(\mu, \Sigma)`: :math:`\epsilon^* = \sigma_t(\alpha_t^2\Sigma + \sigma_t^2 I)^{-1}(x_t - \alpha_t\mu)`."""

    def __init__(self, sde: VPSDE, mean: torch.Tensor, cov: torch.Tensor):
        super().__init__()
        self.sde, self.mean, self.cov = sde, mean, cov

    def forward(self, x, z, t):
        a, s2 = self.sde.alpha(t), self.sde.sigma2(t)
        cov_t = a[:, None, None] ** 2 * self.cov + s2[:, None, None] * torch.eye(len(self.mean), dtype=x.dtype)
        return s2.sqrt()[:, None] * torch.linalg.solve(cov_t, (x - a[:, None] * self.mean).unsqueeze(-1)).squeeze(-1)


def bench_accuracy(args, sde, out: list[str]):
    """Covariance error per network evaluation, exactly (no Monte Carlo): with the exact ε of a Gaussian every
    deterministic sampler is an affine map x_0 = A x_T + b, so Cov = A Aᵀ (float64)."""
    mean = torch.tensor([1.0, -0.5], dtype=torch.float64)
    cov = torch.tensor([[1.0, 0.8], [0.8, 1.5]], dtype=torch.float64)
    net = CountingNet(_GaussianEps(sde, mean, cov))
    x_T = torch.cat([torch.zeros(1, 2), torch.eye(2)]).double()

    def error(fn, steps, **kw):
        net.calls = 0
        x = fn(net, (3, 2), sde, steps=steps, x_T=x_T, dtype=torch.float64, **kw)
        A = (x[1:] - x[0]).T
        c = A @ A.T
        return net.calls, float(((c - cov).abs() / cov).max()), float((c.diagonal() / cov.diagonal()).mean() - 1)

    rows = []
    for steps in args.accuracy_ddim_steps:
        rows.append(["DDIM (uniform t)", str(steps), *_acc_cells(error(sample_ddim, steps))])
    for spacing in DPM_SPACINGS:
        for steps in args.accuracy_dpm_steps:
            rows.append([f"DPM-Solver++(2M), `spacing={spacing}`", str(steps), *_acc_cells(error(sample_dpmpp_2m, steps, spacing=spacing))])
    out.append("## 4. Accuracy per network evaluation: covariance of N(μ, Σ) with its exact ε (2-D, ρ = 0.65)\n")
    out.append("Exact, not sampled: the deterministic samplers are affine maps of x_T here, so Cov = A Aᵀ. "
               "NFE includes the final Tweedie step. Target (issue 14): DPM-Solver++ at 10 NFE closer than DDIM-50.\n")
    out.append(md_table(["sampler", "steps", "NFE", "max relative error of Cov entries", "mean variance ratio - 1"], rows))
    out.append("")


def _acc_cells(result):
    nfe, err, bias = result
    return [str(nfe), f"{err:.4f}", f"{bias:+.4f}"]


# --------------------------------------------------------------------------- part 3
class _count_bm_draws:
    """Count the Gaussian draws BrownianInterval makes (patches its module-level ``_randn``)."""

    def __enter__(self):
        from torchsde._brownian import brownian_interval as bi

        self._mod, self._orig, self.counter = bi, bi._randn, [0]

        def counting(*a, **k):
            self.counter[0] += 1
            return self._orig(*a, **k)

        bi._randn = counting
        return self.counter

    def __exit__(self, *exc):
        self._mod._randn = self._orig
        return False


def bench_breakdown(args, sde, shape, device, out: list[str]):
    span = sde.T - sde.eps
    pr, note = safe_probe(sample_reverse_sde, args.breakdown_steps, shape, sde, None, args.allow_bm_hazard, denoise=False)
    steps, hint = pr.steps, pr.bm_dt
    grid = pr.grid or uniform_grid(span, steps)
    d = math.prod(shape[1:])
    null = CountingNet(lambda x, z, t: torch.zeros_like(x))
    x_T = torch.randn(shape, device=device)

    def run_sde():
        sample_reverse_sde(null, shape, sde, steps=steps, z=None, x_T=x_T, denoise=False)

    def run_hand():
        hand_em(null, sde, grid, x_T, None)

    def run_hand_bm():
        bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=(shape[0], d), dtype=x_T.dtype, device=device, entropy=1,
                                       dt=hint)
        hand_em(null, sde, grid, x_T, None, noise=lambda s0, s1: bm(s0, s1))

    def run_bm():
        bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=(shape[0], d), dtype=x_T.dtype, device=device, entropy=1,
                                       dt=hint)
        for s0, s1 in grid:
            bm(s0, s1)

    def run_bm_hint():
        bm = torchsde.BrownianInterval(t0=0.0, t1=span, size=(shape[0], d), dtype=x_T.dtype, device=device, entropy=1,
                                       dt=span / steps)
        for s0, s1 in grid:
            bm(s0, s1)

    def run_randn():
        for _ in grid:
            torch.randn(shape, device=device)

    cases = [
        ("hand-written EM loop (randn noise)", run_hand),
        ("hand-written EM loop, noise from `BrownianInterval`", run_hand_bm),
        ("`sample_reverse_sde(denoise=False)`", run_sde),
        (f"`BrownianInterval` queries alone (as the sampler builds it: dt hint {hint})", run_bm),
        ("`BrownianInterval(dt=span/steps)` queries alone (with the `dt` hint; for comparison)", run_bm_hint),
        ("`torch.randn` of the state alone", run_randn),
    ]
    med, cpu, draws = {}, {}, {}
    for name, fn in cases:
        with _count_bm_draws() as counter:  # first run: count draws (and warm up)
            fn()
        draws[name] = counter[0]
        med[name], cpu[name] = medians([timed(fn, device) for _ in range(args.breakdown_repeats or args.repeats)])
    n = len(grid)
    out.append(f"## 3. Per-step overhead with a null network (`zeros_like`), {steps} steps ({n} on torchsde's grid), state {shape[0]}x{d}\n")
    if note:
        out.append(f"> NOTE: {note}.\n")
    rows = [[k, fmt(v / n * 1e3), fmt(cpu[k] / n * 1e3), f"{draws[k] / n:.2f}" if draws[k] else "-"] for k, v in med.items()]
    out.append(md_table(["what", "ms / step (median)", "CPU ms / step (median)", "BrownianInterval `randn` draws / step"], rows))
    sde_ms, hand_ms, hand_bm_ms = (med[cases[i][0]] / n * 1e3 for i in (2, 0, 1))
    sde_c, hand_c, hand_bm_c = (cpu[cases[i][0]] / n * 1e3 for i in (2, 0, 1))
    out.append(
        f"\n- torchsde minus hand-written: {sde_ms - hand_ms:+.3f} ms/step wall ({sde_c - hand_c:+.3f} CPU ms/step), "
        f"of which Brownian noise (`BrownianInterval` instead of `randn`): {hand_bm_ms - hand_ms:+.3f} ms/step "
        f"({hand_bm_c - hand_c:+.3f} CPU); the rest (sdeint loop with 0-d float64 tensor time, drift/diffusion "
        f"wrappers, `g * dW` and `y + f*dt + g*dW` as separate ops, cache bookkeeping): "
        f"{sde_ms - hand_bm_ms:+.3f} ms/step ({sde_c - hand_bm_c:+.3f} CPU)\n"
    )
    return sde_ms - hand_ms, (cpu[cases[2][0]] - cpu[cases[0][0]]) / n * 1e3


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Benchmark torchsde reverse-SDE overhead vs a hand-written Euler–Maruyama loop, and "
        "DDIM / reverse SDE / probability-flow ODE wall time, with a z-conditioned ConditionalUNet.",
    )
    g = p.add_argument_group("set-up")
    g.add_argument("--device", default="auto", help="'auto' (default: cuda if available else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    g.add_argument("--batch", type=int, default=64, help="default 64")
    g.add_argument("--image-size", type=int, default=32, help="default 32")
    g.add_argument("--channels", type=int, default=3, help="default 3")
    g.add_argument("--z-dim", type=int, default=32, help="default 32")
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0, help="default 0")
    g = p.add_argument_group("network (default: base 64, mults 1 2 2, 2 res blocks, attention at 16)")
    g.add_argument("--small", action="store_true", help="small net: base 32, mults 1 2, 1 res block, no attention "
                   "except the middle block's")
    g.add_argument("--base-channels", type=int, default=None)
    g.add_argument("--channel-mults", type=int, nargs="+", default=None)
    g.add_argument("--num-res-blocks", type=int, default=None)
    g.add_argument("--attention-resolutions", type=int, nargs="*", default=None)
    g = p.add_argument_group("1. torchsde vs hand-written Euler–Maruyama")
    g.add_argument("--steps", type=int, default=50, help="steps per timed run; default 50")
    g.add_argument("--repeats", type=int, default=5, help="timed runs per sampler (median reported); also for part 3; default 5")
    g.add_argument("--warmup", type=int, default=1, help="warm-up runs per sampler; default 1")
    g.add_argument("--warmup-steps", type=int, default=5, help="steps per warm-up run; default 5")
    g.add_argument("--no-check", dest="check", action="store_false", help="skip the same-Brownian-path agreement check")
    g.add_argument("--check-steps", type=int, default=5, help="default 5")
    g = p.add_argument_group("2. wall time (measured steps < nominal steps: extrapolated linearly in NFE)")
    g.add_argument("--ddim-target", type=int, default=50, help="nominal DDIM steps; default 50")
    g.add_argument("--sde-target", type=int, default=1000, help="nominal reverse-SDE steps; default 1000")
    g.add_argument("--ode-target", type=int, default=100, help="nominal probability-flow ODE steps; default 100")
    g.add_argument("--ddim-steps", type=int, default=None, help="DDIM steps actually run (default: nominal)")
    g.add_argument("--sde-steps", type=int, default=None, help="reverse-SDE steps actually run (default: nominal)")
    g.add_argument("--ode-steps", type=int, default=None, help="PF-ODE steps actually run (default: nominal)")
    g.add_argument("--wall-repeats", type=int, default=3, help="default 3")
    g.add_argument("--no-null-correction", dest="null_correction", action="store_false",
                   help="extrapolate the whole measured time linearly in NFE instead of timing the solver "
                   "overhead separately with a null net at the nominal step count")
    g.add_argument("--dpm-targets", type=int, nargs="*", default=[9, 19],
                   help="DPM-Solver++(2M) step counts timed (NFE = steps + 1); default 9 19")
    g = p.add_argument_group("3. null-network overhead breakdown")
    g.add_argument("--breakdown-steps", type=int, default=1000, help="default 1000")
    g.add_argument("--breakdown-repeats", type=int, default=None, help="timed runs per case (default: --repeats)")
    g = p.add_argument_group("4. accuracy per NFE on a Gaussian with its exact score (no timing)")
    g.add_argument("--accuracy-ddim-steps", type=int, nargs="+", default=[10, 20, 50, 100])
    g.add_argument("--accuracy-dpm-steps", type=int, nargs="+", default=[4, 9, 14, 19])
    g = p.add_argument_group("parts and output")
    g.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip part 1")
    g.add_argument("--no-wall", dest="wall", action="store_false", help="skip part 2")
    g.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip part 3")
    g.add_argument("--no-accuracy", dest="accuracy", action="store_false", help="skip part 4")
    g.add_argument("--allow-bm-hazard", action="store_true",
                   help="run step counts whose torchsde grid makes BrownianInterval(dt=None) build a huge "
                   "tree (e.g. 100 steps: runs out of memory) instead of moving to the nearest safe count")
    g.add_argument("--out", default=None, help="also write the Markdown report to this file")
    return p.parse_args(argv)


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.threads, args.device)
    sde = VPSDE()
    net, cfg = build_net(args, device)
    n_params = sum(p.numel() for p in net.parameters())
    shape = (args.batch, args.channels, args.image_size, args.image_size)
    z = torch.randn(args.batch, args.z_dim, device=device, generator=torch.Generator(device=device).manual_seed(args.seed))

    cmd = command_line(__file__, argv)
    out = [
        "# Sampler benchmark: torchsde reverse SDE vs hand-written Euler–Maruyama; DDIM vs SDE vs PF-ODE\n",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *hardware_lines(device, f"torchsde {torchsde.__version__}"),
        f"- Net: `ConditionalUNet({', '.join(f'{k}={v}' for k, v in cfg.items())})`, {n_params / 1e6:.2f} M params, "
        "eval mode, random weights (zero-initialised layers redrawn from N(0, 0.02^2))",
        f"- Batch {shape[0]} x {tuple(shape[1:])}, float32, `torch.no_grad()`, VPSDE(beta {sde.beta_min}..{sde.beta_max}, "
        f"eps {sde.eps}, T {sde.T}); times are wall clock (`perf_counter`"
        f"{', with torch.cuda.synchronize()' if device.type == 'cuda' else ''}) after {args.warmup} warm-up run(s)",
        f"- At start: {load_line()} (other processes on the machine inflate and scatter CPU timings)\n",
    ]
    print("\n".join(out), flush=True)
    printed = len(out)

    def flush():
        nonlocal printed
        print("\n".join(out[printed:]), flush=True)
        printed = len(out)

    part1 = None
    if args.overhead:
        part1 = bench_overhead(args, net, sde, shape, z, device, out)
        flush()
    if args.wall:
        bench_wall(args, net, sde, shape, z, device, out)
        flush()
    if args.breakdown:
        delta, delta_cpu = bench_breakdown(args, sde, shape, device, out)
        if part1 is not None:
            hand, hand_cpu = part1["ms_step_hand"], part1["cpu_ms_step_hand"]
            out.append(
                f"- combining parts 1 and 3: with this net ({fmt(hand)} ms, {fmt(hand_cpu)} CPU ms per hand-written step), "
                f"the null-net overhead at {args.breakdown_steps} steps predicts torchsde / hand-written = "
                f"**{(hand + delta) / hand:.3f}x** wall, {(hand_cpu + delta_cpu) / hand_cpu:.3f}x CPU, for a "
                f"{args.breakdown_steps}-step solve (part 1 measured {part1['ratio']:.3f}x wall, "
                f"{part1['cpu_ratio']:.3f}x CPU at {args.steps} steps)\n"
            )
        flush()
    if args.accuracy:
        bench_accuracy(args, sde, out)
        flush()
    out.append(f"_At end: {load_line()}._")
    flush()
    return write_report(out, args.out)


if __name__ == "__main__":
    main()
