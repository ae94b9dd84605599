#!/usr/bin/env python
r"""Time one training step of the Pyro formulation of a Diff-MVAE against a hand-written PyTorch loss.

**What is timed.** One step = forward + backward + ``torch.optim.Adam.step`` of

* **Pyro**: ``TraceMeanField_ELBO(max_plate_nesting=2).differentiable_loss(vae.model, vae.guide, batch) / B``
  (what :class:`~pyro_diffmvae.train.DiffMVAEModule` minimises; its own ``negative_elbo``, which also
  calls ``parse_batch`` a third time to get ``B``, is timed as an extra row);
* **hand-written**: :class:`HandLoss`, plain torch with *the same networks* (the very modules held by
  ``vae``) and the same math:

  1. experts ``(mu_m, logvar_m) = encoder_m(x^m)`` stacked to ``(B, M, D)``;
  2. subset weights :math:`\omega_{bA}\propto\omega_A[A\subseteq\mathrm{avail}_b]`, renormalised per example;
  3. ``sample``: one subset per example :math:`A_b\sim\omega_b` (``torch.multinomial``);
     ``enumerate``: all K subsets at once, weighted by :math:`\omega`;
  4. :math:`q(z\mid x_A)` = PoE of the chosen experts and the prior expert
     (:func:`pyro_diffmvae.fusion.poe`), :math:`z = \mu + \sigma\,\xi` (reparameterised);
  5. :math:`\sum_m \lambda_m\,[m \text{ available}]\log p(x^m\mid z)`: Bernoulli log-likelihoods from the
     feed-forward decoders (``-binary_cross_entropy_with_logits``) and, for the image, the DSM estimate
     of :meth:`ScoreMatchingLikelihood.log_prob` written out in closed form: :math:`t\sim p(t)`,
     :math:`\epsilon\sim\mathcal N(0,I)`, :math:`x_t=\alpha_t x+\sigma_t\epsilon`,
     :math:`-\tfrac12\frac{\lambda(t)}{\sigma_t^2p(t)}\|\hat\epsilon_\theta(x_t,z,t)-\epsilon\|^2`
     (``"simple"``: :math:`\lambda=\sigma_t^2`, uniform :math:`t`, weight :math:`T-\epsilon`;
     ``"likelihood"``: :math:`\lambda=g^2`, importance-sampled :math:`t`, weight :math:`Z` constant,
     plus the bound's constants);
  6. minus :math:`\beta\,\mathrm{KL}(q\Vert\mathcal N(0,I))` in closed form,
     :math:`\tfrac12\sum_d(e^{\mathrm{logvar}}+\mu^2-1-\mathrm{logvar})`;
  7. loss = −(5 − 6) / B (for ``enumerate`` each (subset, example) term is multiplied by :math:`\omega`).

**Why the two losses agree on the same seed (and how it is checked).** Both programs consume the global
torch RNG in the same order: (i) ``torch.multinomial`` for the subsets (guide; ``sample`` only),
(ii) ``normal_`` of shape ``(…, D)`` for the reparameterised ``z`` (guide; Pyro's ``Normal.rsample`` is
``loc + empty().normal_() * scale``), then, when the ELBO scores the model trace
(``Trace.compute_log_prob`` visits the sites in program order ``z``, ``x_image``, ``x_mask``,
``x_attrs``; only the diffusion site draws), (iii) ``torch.rand`` for the diffusion times and
(iv) ``torch.randn_like`` for the noise, of shape ``(n, C, H, W)`` with ``n = B`` (``sample``) or
``K·B`` (``enumerate``, subsets outermost). No other Pyro code draws random numbers (full-size plates
use ``arange``, not ``randperm``). So with ``torch.manual_seed(s)`` before each loss the two estimates
use *identical* draws, and the script checks that losses and all parameter gradients agree to float32
round-off (the expressions differ only in operation order, e.g. KL via ``log(σ²)`` vs ``logvar``), for
``--check-seeds`` seeds, and also the per-term split against :func:`pyro_diffmvae.model.elbo_terms`.
An exact same-seed match is a stronger check than agreement in expectation; the mean over seeds is
printed too.

**Where the Pyro overhead goes.** The forward passes alone (no backward; the backward graphs are the same
apart from a few masking ops) are timed for the Pyro loss with its parts switched off one after the other
by benchmark-only monkeypatches (see :class:`_ablate`): ``pyro.module`` (called by both model and guide;
it sends every parameter tensor through the messenger stack as a ``param`` message and adds a trace node
for it), then ``MultimodalVAE.parse_batch`` (called by both model and guide; validates the data every
time), then Pyro/torch-distribution validation; what is left against the hand-written forward is the
tracing itself (guide trace, replayed model trace, ``compute_log_prob`` of the unused model ``z`` site,
guide score parts, KL dispatch). ``pyro.module`` and ``parse_batch`` are also timed alone. Python
garbage-collector runs are counted per variant (Pyro allocates thousands of small dicts per step; a
rare full collection walks the ~0.5 M objects that torch, Lightning and Pyro leave tracked and costs
~0.25 s). ``--profile`` adds cProfile (CPU-time timer) tables of Pyro steps.

**Timing on a shared CPU.** Each variant's steps are interleaved with the others' (order alternating
per round); medians, minima, IQRs and per-round paired ratios are reported, for wall time and for the
CPU time of this process (``time.process_time``), which leaves out the time the process waits while
other jobs run. With other jobs on a small machine, use ``--threads 1``: torch's default intra-op
threads then fight those jobs for the cores and wall times become several times slower and erratic.
Output is Markdown on stdout (and in ``--out PATH``), with the command line, a hardware header and the
load average at start and end.

Examples::

    python experiments/benchmarks/bench_train_step.py --threads 1 --profile
    python experiments/benchmarks/bench_train_step.py --weighting likelihood --base-channels 16
    python experiments/benchmarks/bench_train_step.py --strategy enumerate --batch 16 --steps 6
    python experiments/benchmarks/bench_train_step.py --device cuda --steps 50 --out bench.md
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import io
import math
import os
import pstats
import statistics
import time
from typing import Callable, Mapping

import pyro
import torch

from _hardware import command_line, fmt, hardware_lines, load_line, md_table, setup_device, sync, write_report  # noqa: E402  (script dir on sys.path)
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

from pyro_diffmvae.fusion import poe
from pyro_diffmvae.model import MultimodalVAE, elbo_terms
from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.nets.unet import ConditionalUNet
from pyro_diffmvae.sde import VPSDE

LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------- networks
class ConvEncoder(nn.Module):
    """``(B, C, S, S) -> (mu, logvar)``: three stride-2 4x4 convs (SiLU) and a linear head."""

    def __init__(self, in_channels: int, latent_dim: int, image_size: int, width: int = 32):
        super().__init__()
        side = image_size // 8
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, width, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, 2, 1), nn.SiLU(),
            nn.Conv2d(2 * width, 4 * width, 4, 2, 1), nn.SiLU(),
            nn.Flatten(), nn.Linear(4 * width * side * side, 2 * latent_dim),
        )

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


class MLPEncoder(nn.Module):
    def __init__(self, in_dim: int, latent_dim: int, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, 2 * latent_dim))

    def forward(self, x):
        return self.net(x).chunk(2, dim=-1)


def conv_decoder(latent_dim: int, out_channels: int, image_size: int, width: int = 32) -> nn.Module:
    """``(n, D) -> (n, C, S, S)`` logits: linear to ``S/8 x S/8`` then three stride-2 transposed convs."""
    side = image_size // 8
    return nn.Sequential(
        nn.Linear(latent_dim, 4 * width * side * side), nn.SiLU(), nn.Unflatten(1, (4 * width, side, side)),
        nn.ConvTranspose2d(4 * width, 2 * width, 4, 2, 1), nn.SiLU(),
        nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.SiLU(),
        nn.ConvTranspose2d(width, out_channels, 4, 2, 1),
    )


def mlp_decoder(latent_dim: int, out_dim: int, hidden: int = 256) -> nn.Module:
    return nn.Sequential(nn.Linear(latent_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, out_dim))


def build_vae(args) -> tuple[MultimodalVAE, dict]:
    S, D = args.image_size, args.latent_dim
    torch.manual_seed(args.seed)
    unet_cfg = dict(in_channels=3, base_channels=args.base_channels, channel_mults=tuple(args.channel_mults),
                    num_res_blocks=args.num_res_blocks, attention_resolutions=tuple(args.attention_resolutions),
                    image_size=S, z_dim=D)
    unet = ConditionalUNet(**unet_cfg)
    # Zero-initialised layers (last conv of each block, attention projections, output conv) would make
    # eps_hat identically 0 and cut the z-path of the gradient; redraw them so the check is meaningful.
    with torch.no_grad():
        for p in unet.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, 0.02)
    mods = [
        Modality("image", ConvEncoder(3, D, S), DiffusionDecoder(unet, (3, S, S), weighting=args.weighting)),
        Modality("mask", ConvEncoder(1, D, S), FeedForwardDecoder(conv_decoder(D, 1, S), (1, S, S), "bernoulli")),
        Modality("attrs", MLPEncoder(args.num_attrs, D), FeedForwardDecoder(mlp_decoder(D, args.num_attrs),
                                                                            (args.num_attrs,), "bernoulli")),
    ]
    vae = MultimodalVAE(mods, latent_dim=D, fusion="mopoe", subset_strategy=args.strategy, beta=args.beta)
    return vae, unet_cfg


def make_batch(args, device) -> dict:
    """Synthetic batch: image in [-1, 1], binary mask and attributes; with ``--missing p`` each modality of
    each example is missing with probability p (at least one kept), its rows zeroed (as parse_batch would)."""
    g = torch.Generator().manual_seed(args.seed + 1)
    B, S = args.batch, args.image_size
    batch = {
        "image": torch.rand(B, 3, S, S, generator=g) * 2 - 1,
        "mask": (torch.rand(B, 1, S, S, generator=g) < 0.3).float(),
        "attrs": (torch.rand(B, args.num_attrs, generator=g) < 0.5).float(),
    }
    if args.missing > 0:
        avail = torch.rand(B, 3, generator=g) >= args.missing
        none = ~avail.any(-1)
        avail[none, torch.randint(0, 3, (int(none.sum()),), generator=g)] = True
        for j, name in enumerate(["image", "mask", "attrs"]):
            x = batch[name]
            batch[name] = torch.where(avail[:, j].reshape((B,) + (1,) * (x.dim() - 1)), x, torch.zeros_like(x))
        batch["available"] = {name: avail[:, j] for j, name in enumerate(["image", "mask", "attrs"])}
    return {k: ({n: a.to(device) for n, a in v.items()} if isinstance(v, dict) else v.to(device))
            for k, v in batch.items()}


# --------------------------------------------------------------------------- hand-written loss
class HandLoss:
    """The negative subset ELBO per example, in plain torch, on the networks of ``vae`` (see module docstring).

    Holds direct references to the networks and the constants (no per-call lookups, no validation); the
    batch is read as given (missing rows are expected to hold the zero placeholders already).
    """

    def __init__(self, vae: MultimodalVAE):
        self.names = list(vae.names)
        mods = [vae.modalities[n] for n in self.names]
        self.encoders = [m.encoder for m in mods]
        self.weights = [m.weight for m in mods]
        self.decoders = [m.decoder for m in mods]
        self.subsets = vae.subsets.clone()
        self.base = vae.base_subset_weights.clone()
        self.beta = vae.beta
        self.enumerate = vae.subset_strategy == "enumerate"
        self.prior_expert = vae.prior_expert
        dd = [d for d in self.decoders if getattr(d, "is_diffusion", False)][0]
        self.sde: VPSDE = dd.sde
        kw = dd.likelihood_kwargs
        if kw["num_draws"] != 1 or kw["control_variate"]:
            raise NotImplementedError("the hand-written loss covers num_draws=1 without control variate")
        self.weighting = kw["weighting"]
        if self.weighting not in ("simple", "likelihood"):
            raise NotImplementedError(f"weighting {self.weighting!r}")
        ts = kw["time_sampling"]
        self.importance = (ts == "importance") or (ts == "auto" and self.weighting == "likelihood")
        self.constants = self.weighting == "likelihood" if kw["include_constants"] is None else kw["include_constants"]
        sde = self.sde
        self.bmin, self.dbeta, self.t_eps, self.T = sde.beta_min, sde.beta_max - sde.beta_min, sde.eps, sde.T

    def _B(self, t):
        return self.bmin * t + 0.5 * self.dbeta * t * t

    def _F(self, t: float) -> float:
        return math.log(math.expm1(self._B(t)))

    def image_loglik(self, dec, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """DSM estimate of log p(x|z) for ``x`` (n, C, H, W), ``z`` (n, D): one (t, eps) draw per row."""
        n = x.shape[0]
        u = torch.rand(n, device=x.device, dtype=x.dtype)
        if self.importance:
            # q(t) ∝ β/σ²: F(t) = log(e^B - 1), B = softplus(F(eps) + u Z), t solves B(t) = B.
            Z = self._F(self.T) - self._F(self.t_eps)
            Bq = F.softplus(self._F(self.t_eps) + u * Z)
            t = (2.0 * Bq / (self.bmin + torch.sqrt(self.bmin**2 + 2.0 * self.dbeta * Bq))).clamp(self.t_eps, self.T)
            w = Z  # λ/(σ² q) = β/σ² · σ²Z/β
        else:
            t = self.t_eps + (self.T - self.t_eps) * u
            w = self.T - self.t_eps  # simple: λ = σ², p(t) = 1/(T - eps)
        Bt = self._B(t)
        alpha = torch.exp(-0.5 * Bt)[:, None, None, None]
        sigma = torch.sqrt(-torch.expm1(-Bt))[:, None, None, None]
        noise = torch.randn_like(x)
        eps_hat = dec.eps_net(alpha * x + sigma * noise, z, t)
        loss = 0.5 * w * (eps_hat - noise).pow(2).sum((1, 2, 3))
        if self.constants:
            d = x[0].numel()
            BT = self._B(self.T)
            a2T, s2T = math.exp(-BT), -math.expm1(-BT)
            loss = loss + 0.5 * d * LOG_2PI + 0.5 * (a2T * x.pow(2).sum((1, 2, 3)) + d * s2T)
            loss = loss - 0.5 * d * (math.log(s2T) - math.log(-math.expm1(-self._B(self.t_eps))))
        return -loss

    def __call__(self, batch: Mapping, parts: bool = False):
        xs = [batch[n] for n in self.names]
        B = xs[0].shape[0]
        av = batch.get("available")
        if av:
            available = torch.stack([av[n] for n in self.names], -1)
        else:
            available = torch.ones(B, len(self.names), dtype=torch.bool, device=xs[0].device)
        # 1. experts
        enc = [e(x) for e, x in zip(self.encoders, xs)]
        mu = torch.stack([m for m, _ in enc], -2)
        logvar = torch.stack([lv for _, lv in enc], -2)
        # 2. ω per example over the valid subsets
        valid = ~(self.subsets[None] & ~available[:, None]).any(-1)  # (B, K)
        omega = valid.to(self.base.dtype) * self.base
        omega = omega / omega.sum(-1, keepdim=True)
        # 3.-4. subset(s), PoE, reparameterised z
        if self.enumerate:
            mu_z, logvar_z = poe(mu[None], logvar[None], self.subsets[:, None, :] & available[None], self.prior_expert)
            w_site = omega.T  # (K, B)
        else:
            k = torch.multinomial(omega, 1).squeeze(-1)
            mu_z, logvar_z = poe(mu, logvar, self.subsets[k] & available, self.prior_expert)
            w_site = None
        z = mu_z + torch.empty_like(mu_z).normal_() * torch.exp(0.5 * logvar_z)
        lead = z.shape[:-1]  # (B,) or (K, B)
        zf = z.reshape(-1, z.shape[-1])
        # 5. weighted log-likelihoods
        out, elbo = {}, 0.0
        for j, (name, dec, lam, x) in enumerate(zip(self.names, self.decoders, self.weights, xs)):
            xf = x.expand(lead + x.shape[1:]).reshape((-1,) + x.shape[1:])
            if getattr(dec, "is_diffusion", False):
                ll = self.image_loglik(dec, xf, zf)
            else:
                logits = dec.net(zf)
                ll = -F.binary_cross_entropy_with_logits(logits, xf, reduction="none").flatten(1).sum(-1)
            ll = ll.reshape(lead) * available[:, j]
            if lam != 1.0:
                ll = lam * ll
            if w_site is not None:
                ll = ll * w_site
            ll = ll.sum()
            out[f"loglik/{name}"] = ll / B
            elbo = elbo + ll
        # 6. analytic KL to N(0, I)
        kl = 0.5 * (logvar_z.exp() + mu_z.pow(2) - 1.0 - logvar_z).sum(-1)
        if w_site is not None:
            kl = kl * w_site
        kl = kl.sum()
        out["kl"] = kl / B
        elbo = elbo - self.beta * kl
        out["elbo"] = elbo / B
        loss = -elbo / B
        return (loss, out) if parts else loss


# --------------------------------------------------------------------------- timing helpers
def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed2(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared CPU the process CPU time leaves out the
    time the process waits while other jobs run, so it scatters far less than wall time."""
    sync(device)
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0


class GCMonitor:
    """Record Python garbage-collector runs (generation, CPU seconds) through ``gc.callbacks``. Pyro's traces
    allocate thousands of small dicts per step, which triggers collections the hand-written loss never sees;
    a full (generation 2) collection walks every tracked object of the process (~0.5 M after importing torch,
    Lightning and Pyro) and shows up as a single slow step, or in a profile as one slow Pyro function."""

    def __init__(self):
        self.events: list[tuple[int, float]] = []
        self._start = None

    def _cb(self, phase, info):
        if phase == "start":
            self._start = (info["generation"], time.process_time())
        elif self._start is not None:
            self.events.append((self._start[0], time.process_time() - self._start[1]))
            self._start = None

    def __enter__(self):
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._cb)
        return False

    @staticmethod
    def summary(events) -> str:
        if not events:
            return "none"
        parts = []
        for g in sorted({e[0] for e in events}):
            sel = [e[1] for e in events if e[0] == g]
            parts.append(f"gen{g}: {len(sel)} ({fmt(sum(sel) * 1e3)} ms)")
        return ", ".join(parts)


def quartiles(v: list[float]) -> tuple[float, float]:
    if len(v) < 4:
        return min(v), max(v)
    q = statistics.quantiles(v, n=4)
    return q[0], q[2]


# --------------------------------------------------------------------------- parts
def check_agreement(args, vae, hand, elbo, batch, B, out: list[str]):
    params = [p for p in vae.parameters() if p.requires_grad]

    def loss_and_grads(fn, seed):
        torch.manual_seed(seed)
        loss = fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return loss.detach(), [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    rows, lp, lh, worst = [], [], [], 0.0
    for s in range(args.check_seeds):
        seed = args.seed + 100 + s
        L_p, g_p = loss_and_grads(lambda: elbo.differentiable_loss(vae.model, vae.guide, batch) / B, seed)
        L_h, g_h = loss_and_grads(lambda: hand(batch), seed)
        gmax = max(float(g.abs().max()) for g in g_p)
        gdiff = max(float((a - b).abs().max()) for a, b in zip(g_p, g_h))
        rel_l = abs(float(L_p - L_h)) / max(abs(float(L_p)), 1e-30)
        worst = max(worst, rel_l, gdiff / gmax)
        lp.append(float(L_p))
        lh.append(float(L_h))
        rows.append([str(seed), f"{float(L_p):.6f}", f"{float(L_h):.6f}", f"{rel_l:.1e}", f"{gdiff / gmax:.1e}"])
    rows.append(["mean", f"{statistics.mean(lp):.6f}", f"{statistics.mean(lh):.6f}",
                 f"{abs(statistics.mean(lp) - statistics.mean(lh)) / abs(statistics.mean(lp)):.1e}", ""])
    out.append(f"## 1. Agreement (same seed → same draws; {len(params)} parameter tensors)\n")
    out.append(md_table(["seed", "Pyro loss / B", "hand-written loss", "rel. diff of loss",
                         "max |Δgrad| / max |grad|"], rows))
    # per-term split at one seed against elbo_terms
    seed = args.seed + 100
    with torch.no_grad():
        torch.manual_seed(seed)
        terms = elbo_terms(vae, batch)
        torch.manual_seed(seed)
        _, parts = hand(batch, parts=True)
    trows = [[k, f"{float(terms[k]):.5f}", f"{float(parts[k]):.5f}",
              f"{abs(float(terms[k] - parts[k])) / max(abs(float(terms[k])), 1e-30):.1e}"] for k in terms]
    out.append(f"\nPer-term split at seed {seed} (`elbo_terms` vs the hand-written parts; per example, KL without β):\n")
    out.append(md_table(["term", "elbo_terms (Pyro)", "hand-written", "rel. diff"], trows))
    ok = worst < 1e-3
    out.append(f"\n- {'AGREE' if ok else 'DISAGREE'}: worst relative difference {worst:.1e} "
               f"(float32 round-off ≈ 1e-6…1e-4 through a UNet)\n")
    return ok


def bench_steps(args, variants, opt, device, out: list[str]) -> dict[str, list[float]]:
    def step(loss_fn):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    for _ in range(args.warmup):
        for _, fn in variants:
            step(fn)
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    gcs: dict[str, list] = {name: [] for name, _ in variants}
    loads = []
    with GCMonitor() as mon:
        for r in range(args.steps):
            order = list(variants) if r % 2 == 0 else list(reversed(variants))
            for name, fn in order:
                n0 = len(mon.events)
                w, c = timed2(lambda: step(fn), device)
                times[name].append(w)
                cpu[name].append(c)
                gcs[name] += mon.events[n0:]
            loads.append(os.getloadavg()[0])
    ref, cref = times[variants[0][0]], cpu[variants[0][0]]
    rows = []
    for name, _ in variants:
        v, c = times[name], cpu[name]
        q1, q3 = quartiles(v)
        paired = statistics.median(a / b for a, b in zip(v, ref))
        rows.append([name, fmt(statistics.median(v) * 1e3), fmt(min(v) * 1e3), f"{fmt(q1 * 1e3)}–{fmt(q3 * 1e3)}",
                     f"{statistics.median(v) / statistics.median(ref):.3f}x", f"{paired:.3f}x",
                     fmt(statistics.median(c) * 1e3), f"{statistics.median(c) / statistics.median(cref):.3f}x"])
    out.append(f"## 2. Training step (forward + backward + Adam), {args.steps} timed steps per variant after "
               f"{args.warmup} warm-up, interleaved\n")
    out.append(md_table(["variant", "wall ms / step (median)", "min", "IQR", "ratio of medians vs hand",
                         "median paired ratio", "CPU ms / step (median)", "CPU ratio vs hand"], rows))
    out.append(f"\n- 1-min load average during the timed steps: {min(loads):.2f}…{max(loads):.2f}; CPU ms = "
               f"`time.process_time` of this process (all its threads; {torch.get_num_threads()} intra-op)")
    out.append("- Python GC runs during the timed steps (count, total CPU): "
               + "; ".join(f"{name}: {GCMonitor.summary(gcs[name])}" for name, _ in variants) + "\n")
    times["_cpu"] = cpu  # type: ignore[assignment]
    return times


def bench_forward(args, variants, device):
    """Forward-only (graph built, no backward) medians of wall and CPU time: isolates the Python-side overhead."""
    def fwd(fn):
        loss = fn()
        del loss

    for _ in range(max(1, args.warmup)):
        for _, fn in variants:
            fwd(fn)
    wall: dict[str, list[float]] = {name: [] for name, _ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, _ in variants}
    for r in range(args.fwd_repeats):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name, fn in order:
            w, c = timed2(lambda: fwd(fn), device)
            wall[name].append(w)
            cpu[name].append(c)
    return wall, cpu


def micro(fn: Callable[[], object], n: int, device) -> float:
    """Median CPU seconds (wall on cuda) of ``fn`` alone."""
    fn()
    k = 0 if device.type == "cuda" else 1
    return statistics.median(timed2(fn, device)[k] for _ in range(n))


class _ablate:
    """Temporarily switch parts of the Pyro path off (benchmark-only monkeypatches, restored on exit):
    ``module``: ``pyro.module`` becomes a no-op (the parameters stay the torch optimiser's; only Pyro's
    param-store registration is skipped); ``parse``: ``vae.parse_batch`` returns a result computed once;
    ``validation``: ``pyro.validation_enabled(False)`` (Pyro checks and torch.distributions arg checks)."""

    def __init__(self, vae, batch, module=False, parse=False, validation=False):
        self.vae, self.batch, self.module, self.parse, self.validation = vae, batch, module, parse, validation

    def __enter__(self):
        if self.module:
            self._module = pyro.module
            pyro.module = lambda name, nn_module, update_module_params=False: nn_module
        if self.parse:
            cached = self.vae.parse_batch(self.batch)
            self.vae.__dict__["parse_batch"] = lambda batch: cached
        if self.validation:
            self._val = pyro.validation_enabled(False)
            self._val.__enter__()
        return self

    def __exit__(self, *exc):
        if self.validation:
            self._val.__exit__(*exc)
        if self.parse:
            del self.vae.__dict__["parse_batch"]
        if self.module:
            pyro.module = self._module
        return False


def bench_overhead(args, vae, hand, elbo, batch, B, device, out: list[str]):
    def pyro_with(**kw):
        def fn():
            with _ablate(vae, batch, **kw):
                return elbo.differentiable_loss(vae.model, vae.guide, batch) / B
        return fn

    fwd_variants = [
        ("Pyro `differentiable_loss / B`", pyro_with()),
        ("… with `pyro.module` a no-op", pyro_with(module=True)),
        ("… and `parse_batch` cached", pyro_with(module=True, parse=True)),
        ("… and validation off", pyro_with(module=True, parse=True, validation=True)),
        ("hand-written", lambda: hand(batch)),
    ]
    wall, cpu = bench_forward(args, fwd_variants, device)
    # CPU time is the robust measure on a shared CPU; on cuda the host-side work overlaps the kernels,
    # and wall time (with synchronize) is what matters.
    use = cpu if device.type == "cpu" else wall
    kind = "CPU" if device.type == "cpu" else "wall"
    med = {k: statistics.median(v) for k, v in use.items()}
    names = [n for n, _ in fwd_variants]
    hand_t = med["hand-written"]
    rows = []
    for i, n in enumerate(names):
        delta = "" if i == len(names) - 1 else f"{(med[n] - med[names[i + 1]]) * 1e3:+.2f}"
        rows.append([n, fmt(statistics.median(wall[n]) * 1e3), fmt(statistics.median(cpu[n]) * 1e3),
                     fmt(min(cpu[n]) * 1e3), f"{(med[n] - hand_t) * 1e3:+.2f}", delta])
    out.append(f"## 3. Where the Pyro overhead goes: forward passes only (no backward), {args.fwd_repeats} interleaved "
               f"repeats, median; switched off one after the other\n")
    out.append(md_table(["forward pass", "wall ms", "CPU ms", "CPU min", f"{kind} ms over hand-written",
                         f"{kind} ms saved by the next switch"], rows))

    # the same parts timed alone
    t_parse = micro(lambda: vae.parse_batch(batch), args.micro_repeats, device)

    def module_traced():
        poutine.trace(lambda: pyro.module(vae.pyro_name, vae)).get_trace()

    t_module = micro(module_traced, args.micro_repeats, device)
    n_params = sum(1 for p in vae.parameters() if p.requires_grad)
    tr = poutine.trace(vae.guide).get_trace(batch)
    n_param_nodes = sum(1 for s_ in tr.nodes.values() if s_["type"] == "param")
    out.append(
        f"\n- Timed alone ({kind}, median of {args.micro_repeats}): `pyro.module(\"{vae.pyro_name}\", vae)` under "
        f"`poutine.trace` **{fmt(t_module * 1e3)} ms/call**, 2 calls per step (model and guide): {n_params} parameter "
        f"tensors → {n_param_nodes} `param` messages through the handler stack and {n_param_nodes} trace nodes per "
        f"program; `parse_batch` **{fmt(t_parse * 1e3)} ms/call**, 2 calls per step in `differentiable_loss`, "
        f"4 in `DiffMVAEModule.training_step` (`negative_elbo` and `training_step` each add a `_batch_size` call).\n"
        f"- Total forward overhead: {(med[names[0]] - hand_t) * 1e3:+.2f} ms {kind} "
        f"({100 * (med[names[0]] - hand_t) / hand_t:+.1f}% of the hand-written forward); what is left with all three "
        f"switched off ({(med[names[3]] - hand_t) * 1e3:+.2f} ms) is the tracing itself: guide trace + replayed model "
        f"trace through the plate/scale/mask messengers, `compute_log_prob` of the model's `z` prior and "
        f"`compute_score_parts` of the guide's `z` (both unused by the mean-field loss), the `Independent`/`Normal` "
        f"KL dispatch, `scale_and_mask` of each site.\n"
    )
    return dict(med=med, parse=t_parse, module=t_module)


def run_profile(args, vae, hand, elbo, batch, B, opt, out: list[str]):
    def step(fn):
        opt.zero_grad(set_to_none=True)
        fn().backward()
        opt.step()

    pyro_fn = lambda: elbo.differentiable_loss(vae.model, vae.guide, batch) / B  # noqa: E731
    res, gc_seen = {}, {}
    for name, fn in [("hand-written", lambda: hand(batch)), ("Pyro", pyro_fn)]:
        step(fn)
        # CPU-time timer: with a wall-clock timer, time the process spends descheduled by other jobs
        # lands on whatever function happens to be running.
        prof = cProfile.Profile(time.process_time)
        with GCMonitor() as mon:
            prof.enable()
            for _ in range(args.profile_steps):
                step(fn)
            prof.disable()
        res[name] = prof
        gc_seen[name] = mon.events
    st = pstats.Stats(res["Pyro"])
    n = args.profile_steps
    out.append(f"## 4. cProfile of {n} Pyro training steps (CPU-time timer; per step; cProfile adds its own per-call "
               f"cost, which inflates Python-heavy code)\n")
    # Curated cumulative times of the functions that make up the overhead.
    wanted = [
        ("model.py", "parse_batch"), ("modality.py", "check_data"), ("primitives.py", "module"),
        ("primitives.py", "param"), ("param_store.py", "get_param"), ("trace_struct.py", "compute_log_prob"),
        ("trace_struct.py", "compute_score_parts"), ("util.py", "check_model_guide_match"),
        ("util.py", "check_site_shape"), ("trace_mean_field_elbo.py", "_check_mean_field_requirement"),
        ("trace_mean_field_elbo.py", "_differentiable_loss_particle"), ("enum.py", "get_importance_trace"),
        ("likelihoods.py", "log_prob"), ("likelihoods.py", "_check_value"), ("likelihoods.py", "__init__"),
        ("kl.py", "_kl_independent_independent"), ("runtime.py", "apply_stack"),
        ("distribution.py", "_validate_sample"), ("model.py", "model"), ("model.py", "guide"),
    ]
    rows = []
    stats = st.stats  # type: ignore[attr-defined]
    for fname, func in wanted:
        for (path, line, fn_name), (cc, nc, tt, ct, _) in stats.items():
            if fn_name == func and path.endswith(fname) and ("pyro" in path):
                rows.append([f"`{os.path.basename(path)}:{line}({fn_name})`", f"{nc / n:.0f}", fmt(tt / n * 1e3),
                             fmt(ct / n * 1e3)])
    rows.sort(key=lambda r: -float(r[3]))
    out.append(md_table(["function", "calls / step", "own ms / step", "cumulative ms / step"], rows))
    lib = [(k, v) for k, v in st.stats.items()  # type: ignore[attr-defined]
           if ("site-packages" in k[0] and f"{os.sep}pyro{os.sep}" in k[0]) or "pyro_diffmvae" in k[0]]
    lib.sort(key=lambda kv: -kv[1][2])
    out.append(f"\nTop {args.profile_top} functions of `pyro` and `pyro_diffmvae` by own time (Pyro steps):\n")
    out.append(md_table(["function", "calls / step", "own ms / step", "cumulative ms / step"], [
        [f"`{k[0].split('site-packages' + os.sep)[-1].split('main' + os.sep)[-1]}:{k[1]}({k[2]})`", f"{v[1] / n:.0f}",
         fmt(v[2] / n * 1e3), fmt(v[3] / n * 1e3)] for k, v in lib[: args.profile_top]]))
    buf = io.StringIO()
    pstats.Stats(res["Pyro"], stream=buf).sort_stats("tottime").print_stats(args.profile_top)
    text = buf.getvalue()
    body = text[text.find("ncalls"):] if "ncalls" in text else text
    out.append(f"\nTop {args.profile_top} of all functions (incl. torch ops) by own time, summed over the {n} steps:\n")
    out.append("```\n" + body.rstrip() + "\n```")
    allst = {k: pstats.Stats(v).stats for k, v in res.items()}  # type: ignore[attr-defined]

    def group(path: str) -> str:
        if path.startswith("~") or path.startswith("<"):
            return "C functions (torch ops, builtins)"
        if f"{os.sep}pyro{os.sep}" in path and "pyro_diffmvae" not in path:
            return "pyro (site-packages/pyro)"
        if "pyro_diffmvae" in path:
            return "pyro_diffmvae"
        if f"{os.sep}torch{os.sep}" in path:
            return "torch (Python side)"
        return "other Python (this script, stdlib)"

    groups: dict[str, dict[str, float]] = {}
    for k, st_ in allst.items():
        for (path, _, _), (_, _, tt, _, _) in st_.items():
            groups.setdefault(group(path), {}).setdefault(k, 0.0)
            groups[group(path)][k] += tt / n
    grows = [[g, fmt(v.get("Pyro", 0.0) * 1e3), fmt(v.get("hand-written", 0.0) * 1e3),
              f"{(v.get('Pyro', 0.0) - v.get('hand-written', 0.0)) * 1e3:+.2f}"] for g, v in sorted(groups.items())]
    out.append("\nOwn time per step by where the code lives (under cProfile, which inflates Python-heavy code):\n")
    out.append(md_table(["source", "Pyro ms / step", "hand-written ms / step", "difference"], grows))
    tot = {k: sum(v[2] for v in s.values()) / n for k, s in allst.items()}
    calls = {k: sum(v[1] for v in s.values()) / n for k, s in allst.items()}
    full = [e for e in gc_seen["Pyro"] if e[0] == 2]
    out.append(f"\n- GC during the profiled steps: Pyro {GCMonitor.summary(gc_seen['Pyro'])}; hand-written "
               f"{GCMonitor.summary(gc_seen['hand-written'])}"
               + (f". A full collection ({fmt(sum(e[1] for e in full) * 1e3)} ms) is charged by cProfile to whichever "
                  "function was allocating at the time, e.g. `trace_struct.add_node` or `param_store.__getitem__`"
                  if full else ""))
    out.append(f"- Python function calls per step: Pyro {calls['Pyro']:.0f}, hand-written {calls['hand-written']:.0f}; "
               f"profiled time per step: Pyro {fmt(tot['Pyro'] * 1e3)} ms, hand-written {fmt(tot['hand-written'] * 1e3)} ms\n")


# --------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Time a Diff-MVAE training step: Pyro TraceMeanField_ELBO vs a hand-written torch loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("set-up")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--batch", type=int, default=64)
    g.add_argument("--image-size", type=int, default=32, help="side of the 3xSxS image and the 1xSxS mask (multiple of 8)")
    g.add_argument("--num-attrs", type=int, default=17)
    g.add_argument("--latent-dim", type=int, default=32)
    g.add_argument("--strategy", default="sample", choices=["sample", "enumerate"], help="subset_strategy")
    g.add_argument("--weighting", default="simple", choices=["simple", "likelihood"], help="DSM weighting of the image")
    g.add_argument("--beta", type=float, default=1.0)
    g.add_argument("--missing", type=float, default=0.0, help="probability that a modality of an example is missing")
    g.add_argument("--lr", type=float, default=1e-4)
    g.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("UNet")
    g.add_argument("--base-channels", type=int, default=32)
    g.add_argument("--channel-mults", type=int, nargs="+", default=[1, 2, 2])
    g.add_argument("--num-res-blocks", type=int, default=1)
    g.add_argument("--attention-resolutions", type=int, nargs="*", default=[8])
    g = p.add_argument_group("measurement")
    g.add_argument("--steps", type=int, default=20, help="timed training steps per variant")
    g.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant")
    g.add_argument("--check-seeds", type=int, default=3, help="seeds for the agreement check (0: skip)")
    g.add_argument("--fwd-repeats", type=int, default=15, help="forward-only repeats for the overhead split")
    g.add_argument("--micro-repeats", type=int, default=50, help="repeats of parse_batch / pyro.module alone")
    g.add_argument("--no-overhead", dest="overhead", action="store_false", help="skip the overhead split")
    g.add_argument("--no-module-row", dest="module_row", action="store_false",
                   help="do not time DiffMVAEModule.negative_elbo as an extra variant")
    g.add_argument("--profile", action="store_true", help="cProfile some Pyro steps and print the top entries")
    g.add_argument("--profile-steps", type=int, default=3)
    g.add_argument("--profile-top", type=int, default=15)
    g.add_argument("--out", default=None, help="also write the Markdown report to this file")
    args = p.parse_args(argv)
    if args.image_size % 8:
        p.error("--image-size must be a multiple of 8 (the conv encoders/decoders halve it three times)")
    return args


def main(argv=None) -> str:
    args = parse_args(argv)
    device = setup_device(args.threads, args.device)
    pyro.clear_param_store()
    vae, unet_cfg = build_vae(args)
    vae = vae.to(device)
    hand = HandLoss(vae)
    batch = make_batch(args, device)
    B = args.batch
    elbo = TraceMeanField_ELBO(max_plate_nesting=2)
    opt = torch.optim.Adam(vae.parameters(), lr=args.lr)
    n_unet = sum(p.numel() for p in vae.modalities["image"].decoder.eps_net.parameters())
    n_all = sum(p.numel() for p in vae.parameters())
    K = vae.subsets.shape[0]

    cmd = command_line(__file__, argv)
    out = [
        "# Training-step benchmark: Pyro `TraceMeanField_ELBO` vs hand-written torch loss\n",
        f"- Command: `{cmd}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        *hardware_lines(device, f"pyro-ppl {pyro.__version__}"),
        f"- Model: MoPoE over image 3x{args.image_size}x{args.image_size} (DiffusionDecoder, weighting "
        f"`{args.weighting}`), mask 1x{args.image_size}x{args.image_size} (Bernoulli), {args.num_attrs} attributes "
        f"(Bernoulli); latent {args.latent_dim}, {K} subsets, subset_strategy `{args.strategy}`, beta {args.beta}, "
        f"missing rate {args.missing}",
        f"- UNet: `ConditionalUNet({', '.join(f'{k}={v}' for k, v in unet_cfg.items())})`, {n_unet / 1e6:.2f} M params "
        f"(whole VAE {n_all / 1e6:.2f} M); batch {B}"
        + (f" (× {K} subsets = {K * B} UNet rows)" if args.strategy == "enumerate" else "")
        + f"; Adam lr {args.lr}; float32",
        f"- Times: wall clock (`perf_counter`{', with torch.cuda.synchronize()' if device.type == 'cuda' else ''}).",
        f"- At start: {load_line()} (other processes on the machine inflate and scatter CPU timings)\n",
    ]
    print("\n".join(out), flush=True)
    printed = len(out)

    def flush():
        nonlocal printed
        print("\n".join(out[printed:]), flush=True)
        printed = len(out)

    if args.check_seeds:
        check_agreement(args, vae, hand, elbo, batch, B, out)
        flush()

    variants = [
        ("hand-written", lambda: hand(batch)),
        ("Pyro `differentiable_loss / B`", lambda: elbo.differentiable_loss(vae.model, vae.guide, batch) / B),
    ]
    if args.module_row:
        from pyro_diffmvae.train import DiffMVAEModule

        module = DiffMVAEModule(vae, lr=args.lr)
        variants.append(("`DiffMVAEModule.negative_elbo` (train.py)", lambda: module.negative_elbo(batch)))
    times = bench_steps(args, variants, opt, device, out)
    cpu = times.pop("_cpu")
    pname = variants[1][0]
    med_h, med_p = statistics.median(times["hand-written"]), statistics.median(times[pname])
    ratio = med_p / med_h
    paired = statistics.median(a / b for a, b in zip(times[pname], times["hand-written"]))
    c_h, c_p = statistics.median(cpu["hand-written"]), statistics.median(cpu[pname])
    out.append(f"- **Pyro / hand-written = {ratio:.3f}x wall** (median paired ratio {paired:.3f}x), "
               f"**{c_p / c_h:.3f}x CPU time**; target ≤ 1.05x: {'met' if max(ratio, c_p / c_h) <= 1.05 else 'NOT met'}; "
               f"overhead {1e3 * (med_p - med_h):+.1f} ms wall / {1e3 * (c_p - c_h):+.1f} ms CPU per "
               f"{fmt(med_h * 1e3)} ms (wall) hand-written step\n")
    flush()

    if args.overhead:
        bench_overhead(args, vae, hand, elbo, batch, B, device, out)
        flush()
    if args.profile:
        run_profile(args, vae, hand, elbo, batch, B, opt, out)
        flush()
    out.append(f"_At end: {load_line()}._")
    flush()
    return write_report(out, args.out)


if __name__ == "__main__":
    main()
