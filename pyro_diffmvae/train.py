"""Training: a Lightning module around Pyro's ELBO, and a plain SVI loop for notebooks.

The Lightning module follows Pyro's own ``svi_lightning`` example: ``training_step`` returns
``elbo.differentiable_loss(model, guide, batch)`` (divided by the batch size, so the logged loss
is the negative ELBO per example) and Lightning does devices, precision, clipping, checkpoints
and progress bars. The parts of the ELBO (per-modality log-likelihoods, KL) are logged every
``log_parts_every`` steps from one extra forward pass without gradients.

Robust runs (all on by default through :func:`make_trainer` and :class:`ResumableDataLoader`):

* **Non-finite losses.** A NaN/inf training loss stops the run with a :class:`NonFiniteLossError`
  that names the global step and the ELBO term(s) that went non-finite (``nonfinite="stop"``), before
  any update or checkpoint of that step; or the batch's update is skipped and counted
  (``nonfinite="skip"``) until ``max_nonfinite`` steps were skipped.
* **Atomic checkpoints.** :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a temporary
  file in the same folder and renames it over the target (``os.replace``): a crash mid-write never
  leaves a truncated ``last.ckpt``.
* **Exact resume.** ``trainer.fit(..., ckpt_path=...)`` restores weights, optimizer, EMA, loop
  counters (Lightning), the RNG states of torch (and CUDA), numpy, python ``random`` (Pyro draws from
  these) and the position in the data (:class:`ResumableDataLoader`): a resumed run continues with
  the same parameters, draws and batches as an uninterrupted one.
* **SIGTERM / Ctrl-C.** :class:`SaveOnInterrupt` writes a resumable ``last.ckpt`` at the end of the
  current step (Lightning turns SIGTERM into a stop at a step boundary; the first Ctrl-C is routed
  the same way, a second one aborts at once without saving).
* **DDP.** Each process seeds its RNG with ``seed + global_rank`` (independent, reproducible subset
  and diffusion-time draws) and :class:`ResumableDataLoader` gives each rank its own share of the
  data; Lightning averages the gradients of the per-rank mean losses.
"""

from __future__ import annotations

import os
import random
import re
import signal
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import lightning as L
import numpy as np
import pyro
import torch
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from pyro.infer import SVI, TraceMeanField_ELBO
from torch.utils.data import DataLoader, Sampler

from .model import MultimodalVAE
from .objectives import elbo_terms
from .io import atomic_torch_save
from .prior import LatentScorePrior

__all__ = ["DiffMVAEModule", "make_trainer", "fit_svi", "NonFiniteLossError", "AtomicCheckpointIO",
           "SaveOnInterrupt", "ResumableDataLoader", "EpochPermutationSampler", "diffusion_eps_nets",
           "eps_nets_to_channels_last", "batch_to_channels_last", "compile_eps_nets", "uncompile_eps_nets"]

Objective = Callable[[MultimodalVAE, Mapping], torch.Tensor]


class NonFiniteLossError(FloatingPointError):
    """The training loss went NaN/inf (the message names the global step and the non-finite terms)."""


def _batch_size(vae: MultimodalVAE, batch: Mapping) -> int:
    """The leading size of the batch's first modality (the model and guide validate the batch)."""
    for name in vae.names:
        if name in batch:
            return int(batch[name].shape[0])
    return vae.parse_batch(batch)[2]  # raises the clear error


# ---------------------------------------------------------------------------------------- RNG states
def rng_states() -> dict:
    """The global RNG states Pyro and this package draw from: torch (CPU and CUDA), numpy, python."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain types and tensors only, so that checkpoints load with torch.load(weights_only=True)
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_states(state: Mapping) -> None:
    """Restore what :func:`rng_states` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised default process group, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


_NONFINITE_IN_MESSAGE = re.compile(r"\bnan\b|\binf\b", re.IGNORECASE)


# ------------------------------------------------------------------------------------ GPU path
def diffusion_eps_nets(vae: MultimodalVAE) -> dict[str, torch.nn.Module]:
    """The ε-networks (``decoder.eps_net``) of the diffusion decoders, by modality name."""
    return {name: m.decoder.eps_net for name, m in vae.modalities.items() if m.is_diffusion}


def eps_nets_to_channels_last(vae: MultimodalVAE) -> MultimodalVAE:
    """Put the diffusion decoders' ε-networks (their 4-D conv weights) in ``torch.channels_last``, in place.

    The parameters stay the same objects (only their strides change), so state-dict keys, optimizers
    and checkpoints are unaffected; a channels-last checkpoint loads into a contiguous model and back.
    On GPUs, channels-last convolutions (NHWC) are the fast path of cuDNN under bf16/fp16.
    """
    for net in diffusion_eps_nets(vae).values():
        net.to(memory_format=torch.channels_last)
    return vae


def batch_to_channels_last(batch: Any) -> Any:
    """The batch with every 4-D floating-point tensor (the images) in ``torch.channels_last``
    (nested mappings, e.g. ``batch["available"]``, are walked; other values are returned as they are)."""
    if isinstance(batch, torch.Tensor):
        if batch.dim() == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, Mapping):
        return {k: batch_to_channels_last(v) for k, v in batch.items()}
    return batch


def compile_eps_nets(vae: MultimodalVAE, backend: str = "inductor", mode: str | None = None,
                     **kwargs: Any) -> MultimodalVAE:
    """``torch.compile`` the forward of every diffusion decoder's ε-network, in place.

    Uses :meth:`torch.nn.Module.compile`, which compiles the module's call and leaves the module
    itself (and so its parameter names: no ``_orig_mod.`` prefix) as it is: checkpoints written while
    compiled load into an uncompiled model. :func:`uncompile_eps_nets` undoes it.
    """
    for net in diffusion_eps_nets(vae).values():
        net.compile(backend=backend, mode=mode, **kwargs)
    return vae


def uncompile_eps_nets(vae: MultimodalVAE) -> MultimodalVAE:
    """Undo :func:`compile_eps_nets` (the ε-networks run eagerly again)."""
    for net in diffusion_eps_nets(vae).values():
        net._compiled_call_impl = None
    return vae


class DiffMVAEModule(L.LightningModule):
    """Lightning module that trains a :class:`MultimodalVAE` with ``TraceMeanField_ELBO``.

    :param vae: the model.
    :param lr, weight_decay, betas: Adam settings.
    :param num_particles: ELBO particles (vectorised draws are not used: diffusion decoders
        already draw (t, ε) per example).
    :param latent_prior: an optional :class:`LatentScorePrior` trained *alongside* the VAE on
        detached z ~ q(z | all observed modalities) (its loss is added; gradients stay apart).
    :param log_parts_every: log the ELBO's parts every this many steps (0: never).
    :param ema_decay: keep an exponential moving average (``torch.optim.swa_utils``) of the
        diffusion decoders' ε-networks with this decay, and copy it into the decoders when
        training ends, so that sampling uses the averaged weights (``None``: no EMA). The averages
        are a submodule (``self.ema``), so they are in the state dict and in checkpoints.
    :param objective: ``objective(vae, batch) -> Tensor``, the quantity to minimise for the whole
        batch (like ``elbo.differentiable_loss(vae.model, vae.guide, batch)``; the module divides it
        by the batch size). ``None``: the ``TraceMeanField_ELBO`` negative ELBO. Baseline objectives
        plug in here; :meth:`negative_elbo` stays the ELBO.
    :param seed: seed every process with ``seed + global_rank`` when fitting starts (torch, numpy,
        python, Pyro), so that under DDP the ranks draw subsets and diffusion times independently but
        reproducibly. ``None``: leave the RNGs alone (with more than one process: seed from
        ``torch.initial_seed() + rank``).
    :param nonfinite: what a NaN/inf training loss does: ``"stop"`` raises
        :class:`NonFiniteLossError` (naming the global step and the non-finite ELBO terms) before any
        update or checkpoint of that step; ``"skip"`` skips the batch's update (no optimizer step),
        counts it in :attr:`skipped_nonfinite` (logged as ``train/skipped_nonfinite``; Lightning's
        ``global_step`` and ``max_steps`` still count the batch) and stops anyway once
        ``max_nonfinite`` steps were skipped. Under DDP the ranks decide together (one all-reduce).
    :param channels_last: put the diffusion decoders' ε-networks (at construction) and every 4-D
        floating-point tensor of a batch (after its transfer to the device) in ``torch.channels_last``
        (:func:`eps_nets_to_channels_last`, :func:`batch_to_channels_last`): faster convolutions on GPUs
        under bf16/fp16. The loss is the same up to float round-off.
    :param compile: ``torch.compile`` the diffusion decoders' ε-networks while fitting
        (:func:`compile_eps_nets` in :meth:`setup`, undone in :meth:`teardown`), with ``compile_backend``
        and ``compile_mode``. Parameter names, and so checkpoints, are those of the uncompiled model.

    Mixed precision is Lightning's (``make_trainer(precision="bf16-mixed")``, autocast): the diffusion
    likelihood's squared error and the feed-forward likelihoods are computed in float32 from the
    networks' bf16/fp16 outputs, so the ELBO's reductions stay in float32; the experts are upcast
    before the fusion, so z and the KL are float32 as well (``MultimodalVAE.experts``).
    """

    def __init__(
        self,
        vae: MultimodalVAE,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        num_particles: int = 1,
        latent_prior: LatentScorePrior | None = None,
        log_parts_every: int = 50,
        ema_decay: float | None = None,
        objective: Objective | None = None,
        seed: int | None = None,
        nonfinite: str = "stop",
        max_nonfinite: int = 10,
        channels_last: bool = False,
        compile: bool = False,
        compile_backend: str = "inductor",
        compile_mode: str | None = None,
    ):
        super().__init__()
        if nonfinite not in ("stop", "skip"):
            raise ValueError(f"nonfinite must be 'stop' or 'skip', got {nonfinite!r}")
        if int(max_nonfinite) < 1:
            raise ValueError(f"max_nonfinite must be at least 1, got {max_nonfinite}")
        self.vae = vae
        self.latent_prior = latent_prior
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.log_parts_every = log_parts_every
        self.elbo = TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=2)
        self.objective = objective
        self.seed = seed
        self.nonfinite, self.max_nonfinite = nonfinite, int(max_nonfinite)
        self.skipped_nonfinite = 0
        self._skipped_step = False
        self.channels_last = bool(channels_last)
        self.compile_eps = bool(compile)
        self.compile_backend, self.compile_mode = compile_backend, compile_mode
        if self.channels_last:  # before the EMA copies the networks: the averages share the layout
            eps_nets_to_channels_last(vae)
        self._val_rng: dict | None = None
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = torch.nn.ModuleDict({
                name: AveragedModel(m.decoder.eps_net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
                for name, m in vae.modalities.items() if m.is_diffusion
            })
            self.ema.requires_grad_(False)  # averages, not trained (DDP would see unused parameters)

    # ------------------------------------------------------------------ seeding and checkpoint state
    def setup(self, stage: str) -> None:
        seed = self.seed
        if seed is None and self.trainer.world_size > 1:
            seed = torch.initial_seed() % 2**31
        if seed is not None:
            seed = int(seed) + self.global_rank
            L.seed_everything(seed, verbose=False)
            pyro.set_rng_seed(seed)
        if self.compile_eps:
            compile_eps_nets(self.vae, backend=self.compile_backend, mode=self.compile_mode)

    def teardown(self, stage: str) -> None:
        if self.compile_eps:  # sampling and evaluation after fitting run the eager networks
            uncompile_eps_nets(self.vae)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return batch_to_channels_last(batch) if self.channels_last else batch

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Add every rank's RNG states (gathered under DDP) and the non-finite counter."""
        state = self._val_rng if self._val_rng is not None else rng_states()  # mid-validation: the training stream
        rank, world = _world()
        if world > 1:
            states: list = [None] * world
            torch.distributed.all_gather_object(states, state)
        else:
            states = [state]
        checkpoint["diffmvae_rng"] = states
        checkpoint["diffmvae_state"] = {"skipped_nonfinite": self.skipped_nonfinite}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Restore this rank's RNG states (called after :meth:`setup` seeded, so they win)."""
        self.skipped_nonfinite = int(checkpoint.get("diffmvae_state", {}).get("skipped_nonfinite", 0))
        states = checkpoint.get("diffmvae_rng")
        rank, world = _world()
        if states is not None and len(states) == world:
            set_rng_states(states[rank])
        elif states is not None:
            rank_zero_info(f"checkpoint holds RNG states of {len(states)} process(es), this run has {world}: "
                           "the RNGs keep their seed + rank seeding")

    # -------------------------------------------------------------------------------- EMA
    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None):
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # right after the update (before any callback may checkpoint), and not for a skipped batch
        if self.ema is not None and not self._skipped_step:
            for name, averaged in self.ema.items():
                averaged.update_parameters(self.vae.modalities[name].decoder.eps_net)

    def on_train_end(self):
        """Copy the EMA weights into the diffusion decoders (sampling then uses them)."""
        if self.ema is not None:
            with torch.no_grad():
                for name, averaged in self.ema.items():
                    net = self.vae.modalities[name].decoder.eps_net
                    for p, q in zip(net.parameters(), averaged.module.parameters()):
                        p.copy_(q)

    # -------------------------------------------------------------------------------- losses
    def negative_elbo(self, batch: Mapping) -> torch.Tensor:
        """−ELBO per example (``TraceMeanField_ELBO``, whatever :attr:`objective` is)."""
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, batch) / _batch_size(self.vae, batch)

    def loss(self, batch: Mapping) -> torch.Tensor:
        """The training objective per example: ``objective(vae, batch) / B`` (default: :meth:`negative_elbo`)."""
        if self.objective is None:
            return self.negative_elbo(batch)
        return self.objective(self.vae, batch) / _batch_size(self.vae, batch)

    def training_step(self, batch, batch_idx):
        B = _batch_size(self.vae, batch)
        rng = torch.get_rng_state()  # to replay this step's draws if the loss goes non-finite
        cuda_rng = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        self._skipped_step = False
        error = None
        try:
            loss = self.loss(batch)
        except ValueError as err:  # a distribution's argument check on NaN/inf parameters
            if not _NONFINITE_IN_MESSAGE.search(str(err)):
                raise
            loss, error = torch.tensor(float("nan"), device=self.device), err
        prior_loss = None
        if self.latent_prior is not None and error is None:
            with torch.no_grad():
                z0 = self.vae.posterior(batch).sample()
            prior_loss = self.latent_prior.loss(z0)
        total = loss if prior_loss is None else loss + prior_loss
        bad = not bool(torch.isfinite(total.detach()).all())
        if self.trainer.world_size > 1:  # every rank stops or skips together
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            return self._nonfinite(batch, batch_idx, B, loss, prior_loss, error, rng, cuda_rng)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        if prior_loss is not None:
            self.log("train/prior_loss", prior_loss, prog_bar=True, batch_size=B)
        if self.nonfinite == "skip":
            self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=B)
        if self.log_parts_every and self.global_step % self.log_parts_every == 0:
            with torch.no_grad():
                for key, value in elbo_terms(self.vae, batch).items():
                    self.log(f"train/{key}", value, batch_size=B)
        return total

    def _nonfinite(self, batch, batch_idx, B, loss, prior_loss, error, rng, cuda_rng):
        """Diagnose a non-finite loss (replaying the step's draws), then stop or skip."""
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        try:
            with torch.no_grad():
                terms = {k: float(v) for k, v in elbo_terms(self.vae, batch).items() if k != "elbo"}
            bad_terms = [f"{k}={v}" for k, v in terms.items() if not np.isfinite(v)]
            if prior_loss is not None and not bool(torch.isfinite(prior_loss).all()):
                bad_terms.append(f"latent prior loss={float(prior_loss)}")
            if bad_terms:
                what = "non-finite ELBO term(s): " + ", ".join(bad_terms)
            else:
                what = ("all ELBO terms are finite in a replay of the batch (" + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                        + "): the objective itself went non-finite")
        except ValueError as err:
            what = f"the ELBO terms cannot be evaluated: {err}"
        if error is not None:
            what = f"the objective raised {type(error).__name__}: {error}; {what}"
        where = f"at global step {self.global_step} (epoch {self.current_epoch}, batch {batch_idx})"
        value = float(loss.detach() if prior_loss is None else (loss + prior_loss).detach())
        if self.nonfinite == "stop":
            raise NonFiniteLossError(f"non-finite training loss ({value}) {where}: {what}. No update or checkpoint was made "
                                     "for this step (trainer.nonfinite=skip skips such batches instead)")
        self.skipped_nonfinite += 1
        self._skipped_step = True
        self.log("train/skipped_nonfinite", float(self.skipped_nonfinite), batch_size=B)
        if self.skipped_nonfinite >= self.max_nonfinite:
            raise NonFiniteLossError(f"{self.skipped_nonfinite} non-finite training losses skipped (max_nonfinite="
                                     f"{self.max_nonfinite}); the last ({value}) {where}: {what}")
        rank_zero_info(f"skipping the update of a non-finite training loss ({value}) {where}: {what} "
                       f"[{self.skipped_nonfinite}/{self.max_nonfinite}]")
        # Lightning refuses a None loss under DDP: return an exact zero that reaches every parameter
        # (DDP all-reduces zero gradients); the optimizer then skips its step (_SkippableAdam)
        return sum((p * 0.0).sum() for p in self.parameters() if p.requires_grad)

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self):
        # validation draws from a fork of the RNGs: the training stream (and so a resumed run)
        # does not depend on when or how often one validates
        self._val_rng = rng_states()

    def on_validation_epoch_end(self):
        if self._val_rng is not None:
            set_rng_states(self._val_rng)
            self._val_rng = None

    def validation_step(self, batch, batch_idx):
        B = _batch_size(self.vae, batch)
        with torch.no_grad():
            terms = elbo_terms(self.vae, batch)
        # sync_dist: under DDP the ranks' estimates (independent draws) are averaged
        for key, value in terms.items():
            self.log(f"val/{key}", value, batch_size=B, prog_bar=(key == "elbo"), sync_dist=True)
        self.log("val/loss", -terms["elbo"], batch_size=B, sync_dist=True)
        return -terms["elbo"]

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return _SkippableAdam(params, skip=self._is_skipped, lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)

    def _is_skipped(self) -> bool:
        return self._skipped_step


class _SkippableAdam(torch.optim.Adam):
    """Adam whose update is not made while ``skip()`` is true (a batch with a non-finite loss).

    The closure (training step and backward) still runs, so that under DDP every rank takes part in
    the gradient all-reduce."""

    def __init__(self, params, skip: Callable[[], bool], **kwargs):
        super().__init__(params, **kwargs)
        self._skip = skip

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self._skip():
            return loss
        super().step()
        return loss


# ------------------------------------------------------------------------------------------ data
class EpochPermutationSampler(Sampler[int]):
    """Indices ``0..n-1`` in an order that depends only on ``(seed, epoch)``, sharded across DDP ranks.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also when resuming). Under DDP
    (an initialised process group) rank ``r`` of ``W`` takes ``perm[r::W]`` of the first
    ``W·⌊n/W⌋`` indices (the ranks get disjoint shares of equal size). ``start`` skips that many of
    this rank's indices (set by :class:`ResumableDataLoader` to resume mid-epoch).
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle = int(n), int(seed), shuffle
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> list[int]:
        """This rank's indices of the current epoch (without the skip)."""
        rank, world = _world()
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        return order[: (self.n // world) * world][rank::world].tolist()

    def __len__(self) -> int:
        return self.n // _world()[1]

    def __iter__(self):
        return iter(self.indices()[self.start:])


class ResumableDataLoader(DataLoader):
    """A training :class:`DataLoader` whose order is reproducible and whose position is checkpointed.

    The order comes from :class:`EpochPermutationSampler` (``seed`` and the epoch; its own generator,
    so the global RNG is not touched). ``state_dict()`` / ``load_state_dict()`` make it "stateful"
    for Lightning, which saves the position (epoch, batches delivered) in every checkpoint and
    restores it on ``fit(ckpt_path=...)``: the resumed epoch continues with the next batch (the
    skipped examples are not loaded). It shards the data across DDP ranks itself: give the trainer
    ``use_distributed_sampler=False``.
    """

    def __init__(self, dataset, batch_size: int = 1, seed: int = 0, shuffle: bool = True, drop_last: bool = True,
                 **kwargs: Any):
        sampler = EpochPermutationSampler(len(dataset), seed=seed, shuffle=shuffle)
        generator = torch.Generator().manual_seed(int(seed))  # worker base seeds, without the global RNG
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last, generator=generator,
                         **kwargs)
        self._start = 0        # batches skipped at the start of the current pass
        self._delivered = 0    # batches yielded in the current pass
        self._pending: dict | None = None

    def __iter__(self):
        return self._batches()

    def _batches(self):
        # runs at the first next(), i.e. after Lightning's set_epoch for this epoch
        start = 0
        if self._pending is not None and self._pending["epoch"] == self.sampler.epoch:
            start = int(self._pending["batches"])
        self._pending = None
        self.sampler.start = start * self.batch_size
        self._start, self._delivered = start, 0
        try:
            for batch in super().__iter__():
                self._delivered += 1  # counted before the batch is used: a checkpoint during its step includes it
                yield batch
        finally:
            self.sampler.start = 0

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self._start + self._delivered}

    def load_state_dict(self, state: dict) -> None:
        self._pending = dict(state)


# ------------------------------------------------------------------------------------ checkpoints
class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that never leaves a partly written checkpoint.

    ``torch.save`` writes to a temporary file in the target's folder (same file system), which is
    flushed, fsynced and renamed over the target with ``os.replace`` (atomic on POSIX and Windows):
    readers see the old file or the new one. On any error the temporary file is removed and the old
    checkpoint stays as it was.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        atomic_torch_save(checkpoint, path)


class SaveOnInterrupt(L.Callback):
    """Write a resumable checkpoint when training is stopped by SIGTERM or Ctrl-C.

    Lightning's signal handler records a SIGTERM; at the end of the current training step (or
    epoch) this callback saves ``<dirpath>/last.ckpt`` (default ``dirpath``: the
    :class:`ModelCheckpoint`'s folder, else ``<default_root_dir>/checkpoints``) through the trainer's
    (atomic) checkpoint IO and stops training with Lightning's ``SIGTERMException``. These are the
    points at which Lightning's own checkpoints resume exactly; under DDP the ranks agree on the
    stop (one all-reduce of a flag per step) and every rank takes part in the save. A stop that
    Lightning raises elsewhere (during validation) is saved from :meth:`on_exception`. The first
    Ctrl-C (SIGINT) during training is routed the same way; a second one aborts at once, without
    saving. ``trainer.fit`` then raises ``SIGTERMException`` (a ``SystemExit`` whose code is 0!):
    callers should catch it and exit non-zero (``diffmvae-train`` does, saying how to resume).
    :attr:`saved_path` is the checkpoint written and :attr:`signal_name` the signal.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, filename: str = "last.ckpt"):
        self.dirpath, self.filename = dirpath, filename
        self.saved_path: Path | None = None
        self.signal_name: str | None = None
        self._previous_sigint = None
        self._installed = False

    def path(self, trainer: L.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath) / self.filename
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "dirpath", None):
            return Path(ckpt.dirpath) / self.filename
        return Path(trainer.default_root_dir) / "checkpoints" / self.filename

    # Ctrl-C -> Lightning's SIGTERM handling
    def on_train_start(self, trainer, pl_module):
        self.saved_path, self.signal_name = None, None
        if threading.current_thread() is threading.main_thread():
            self._previous_sigint = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._on_sigint)
            self._installed = True

    def _on_sigint(self, signum, frame):
        sigterm = signal.getsignal(signal.SIGTERM)
        if self.signal_name is not None or not callable(sigterm):
            raise KeyboardInterrupt  # second Ctrl-C (or no SIGTERM handler): abort now
        self.signal_name = "SIGINT"
        print("\nCtrl-C: stopping at the end of this step and saving a resumable checkpoint "
              "(press Ctrl-C again to abort without saving)", flush=True)
        sigterm(signal.SIGTERM, frame)  # Lightning's handler records the request

    def _uninstall(self):
        if self._installed and signal.getsignal(signal.SIGINT) == self._on_sigint:
            signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        self._installed = False

    # stop and save at a step / epoch boundary
    def _stop_requested(self, trainer) -> bool:
        stop = bool(trainer.received_sigterm)
        if trainer.world_size > 1:  # the ranks stop together (a signal may reach only some of them)
            stop = bool(trainer.strategy.reduce_boolean_decision(stop, all=False))
        return stop

    def _save(self, trainer):
        self.signal_name = self.signal_name or "SIGTERM"
        path = self.path(trainer)
        trainer.save_checkpoint(path)  # every rank takes part (RNG states are gathered); rank 0 writes
        self.saved_path = path
        rank_zero_info(f"{self.signal_name}: saved a resumable checkpoint at global step {trainer.global_step} to {path}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._stop_requested(trainer):
            self._save(trainer)
            raise SIGTERMException()

    def on_train_epoch_end(self, trainer, pl_module):
        if self._stop_requested(trainer):
            self._save(trainer)
            raise SIGTERMException()

    def on_train_end(self, trainer, pl_module):
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception):
        self._uninstall()
        if isinstance(exception, SIGTERMException):
            if self.saved_path is None:  # stopped by Lightning itself (e.g. during validation)
                self._save(trainer)
        elif isinstance(exception, KeyboardInterrupt):
            rank_zero_info("aborted without saving a checkpoint (the last one written stays as it was)")


def make_trainer(
    max_steps: int = 1000,
    accelerator: str = "auto",
    devices="auto",
    gradient_clip_val: float | None = 1.0,
    precision="32-true",
    default_root_dir: str | None = None,
    log_every_n_steps: int = 10,
    enable_progress_bar: bool = True,
    strategy="auto",
    num_nodes: int = 1,
    save_on_interrupt: bool = True,
    accumulate_grad_batches: int = 1,
    **kwargs,
) -> L.Trainer:
    """A Lightning trainer with this project's defaults (CPU-friendly; GPU when there is one).

    Checkpoints are written by :class:`AtomicCheckpointIO` (unless ``plugins`` hold another
    ``CheckpointIO``), and, with ``save_on_interrupt`` and checkpointing enabled, a
    :class:`SaveOnInterrupt` callback saves a resumable ``last.ckpt`` on SIGTERM / Ctrl-C.
    ``strategy`` / ``num_nodes`` / ``devices``: Lightning's (e.g. ``strategy="ddp", devices=2``).
    ``precision``: Lightning's (``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"``: autocast, see
    :class:`DiffMVAEModule`). ``accumulate_grad_batches``: Lightning's; one optimizer step per this many
    batches (``max_steps`` counts optimizer steps; each batch's loss is divided by this number, so the
    accumulated gradient is that of the mean loss over the batches).
    """
    plugins = kwargs.pop("plugins", None)
    plugins = [] if plugins is None else list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    callbacks = kwargs.pop("callbacks", None)
    callbacks = [] if callbacks is None else list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    if (save_on_interrupt and kwargs.get("enable_checkpointing", True) is not False
            and not any(isinstance(c, SaveOnInterrupt) for c in callbacks)):
        callbacks.append(SaveOnInterrupt())
    return L.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        devices=devices,
        gradient_clip_val=gradient_clip_val,
        precision=precision,
        default_root_dir=default_root_dir,
        log_every_n_steps=log_every_n_steps,
        enable_progress_bar=enable_progress_bar,
        strategy=strategy,
        num_nodes=num_nodes,
        accumulate_grad_batches=int(accumulate_grad_batches),
        plugins=plugins,
        callbacks=callbacks,
        **kwargs,
    )


def fit_svi(
    vae: MultimodalVAE,
    batches: Iterable[Mapping],
    steps: int,
    lr: float = 1e-3,
    clip_norm: float | None = 10.0,
    num_particles: int = 1,
    callback=None,
) -> list[float]:
    """Train with a plain ``pyro.infer.SVI`` loop (``ClippedAdam``); returns −ELBO per example per step.

    ``batches`` is cycled until ``steps`` steps are done.
    """
    optim_args = {"lr": lr}
    if clip_norm is not None:
        optim_args["clip_norm"] = clip_norm
    svi = SVI(vae.model, vae.guide, pyro.optim.ClippedAdam(optim_args), TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=2))
    losses: list[float] = []
    while len(losses) < steps:
        progressed = False
        for batch in batches:
            progressed = True
            losses.append(svi.step(batch) / _batch_size(vae, batch))
            if callback is not None:
                callback(len(losses), losses[-1])
            if len(losses) >= steps:
                break
        if not progressed:
            raise ValueError("fit_svi: no batches")
    return losses
