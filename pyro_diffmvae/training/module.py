"""The Lightning module that trains a :class:`~pyro_diffmvae.model.MultimodalVAE` with an objective.

It follows Pyro's own ``svi_lightning`` example: ``training_step`` returns the objective's loss
(:class:`~pyro_diffmvae.objectives.Objective`; by default the subset ELBO,
``elbo.differentiable_loss(model, guide, batch)``) divided by the batch size, so the logged loss
is the negative objective per example, and Lightning does devices, precision, clipping,
checkpoints and progress bars. The objective's named terms (for the ELBO: per-modality
log-likelihoods, KL) are logged every ``log_parts_every`` steps from one extra forward pass
without gradients; validation logs the same terms, and ``val/loss`` (what checkpoint selection
monitors) is the objective's loss per example — each model is validated on its own objective.

* **Non-finite losses.** A NaN/inf training loss stops the run with a :class:`NonFiniteLossError`
  that names the global step and the objective's term(s) that went non-finite (``nonfinite="stop"``), before
  any update or checkpoint of that step; or the batch's update is skipped and counted
  (``nonfinite="skip"``) until ``max_nonfinite`` steps were skipped.
* **Exact resume.** Every checkpoint holds the RNG states of every rank
  (:func:`~pyro_diffmvae.training.rng.rng_states`) and the count of skipped steps; ``trainer.fit(...,
  ckpt_path=...)`` restores them along with what Lightning restores (weights, optimizer, EMA, loop
  counters). Validation draws from a fork of the RNGs, so the training stream does not depend on
  when or how often one validates.
* **DDP.** Each process seeds its RNG with ``seed + global_rank`` (independent, reproducible subset
  and diffusion-time draws); Lightning averages the gradients of the per-rank mean losses.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import lightning as L
import numpy as np
import pyro
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..model import MultimodalVAE
from ..objectives import Objective, bind_objective
from ..prior import LatentScorePrior
from .accelerator import batch_to_channels_last, compile_eps_nets, eps_nets_to_channels_last, uncompile_eps_nets
from .data import batch_size_of
from .rng import rank_and_world_size, rng_states, set_rng_states

__all__ = ["DiffMVAEModule", "NonFiniteLossError"]

class NonFiniteLossError(FloatingPointError):
    """The training loss went NaN/inf (the message names the global step and the non-finite terms)."""


_NONFINITE_IN_MESSAGE = re.compile(r"\bnan\b|\binf\b", re.IGNORECASE)


class DiffMVAEModule(L.LightningModule):
    """Lightning module that trains a :class:`MultimodalVAE` with an :class:`~pyro_diffmvae.objectives.Objective`.

    :param vae: the model.
    :param lr: Adam settings.
    :param weight_decay: see ``lr`` above.
    :param betas: see ``lr`` above.
    :param num_particles: particles of the default objective, ``ELBO(num_particles)`` (ignored when
        ``objective`` is given).
    :param latent_prior: an optional :class:`LatentScorePrior` trained *alongside* the VAE on
        detached z ~ q(z | all observed modalities) (its loss is added; gradients stay apart).
    :param log_parts_every: log the ELBO's parts every this many steps (0: never).
    :param ema_decay: keep an exponential moving average (``torch.optim.swa_utils``) of the
        diffusion decoders' ε-networks with this decay, and copy it into the decoders when
        training ends, so that sampling uses the averaged weights (``None``: no EMA). The averages
        are a submodule (``self.ema``), so they are in the state dict and in checkpoints.
    :param objective: the :class:`~pyro_diffmvae.objectives.Objective` to minimise (its ``loss`` for
        the whole batch; the module divides it by the batch size), or a plain callable
        ``(vae, batch) -> loss`` (wrapped in a :class:`~pyro_diffmvae.objectives.CallableObjective`).
        ``None``: the subset ELBO, :class:`~pyro_diffmvae.objectives.ELBO`. The model's
        ``conditional`` is set to the objective's, so that generation after training conditions as
        the objective does (an MMVAE on the mixture of the given experts).
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
        self.objective = bind_objective(vae, objective, num_particles)
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
        rank, world = rank_and_world_size()
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
        rank, world = rank_and_world_size()
        if states is not None and len(states) == world:
            set_rng_states(states[rank])
        elif states is not None:
            rank_zero_info(f"checkpoint holds RNG states of {len(states)} process(es), this run has {world}: "
                           "the RNGs keep their seed + rank seeding")

    def on_train_start(self) -> None:
        """Set the configured ``lr`` and ``weight_decay`` on the optimizer's param groups.

        A no-op for a fresh run; on resume Lightning has restored the optimizer with the checkpoint's
        values, and a ``trainer.lr`` given to the resume would otherwise be recorded but not used."""
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = self.lr
                group["weight_decay"] = self.weight_decay

    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Keep the loggers' step equal to the optimizer steps taken (a no-op in an uninterrupted run).

        Lightning's restart heuristic counts a checkpoint saved in ``on_train_batch_end``
        (:class:`~pyro_diffmvae.training.checkpointing.SaveOnInterrupt`) once too often: every row of
        ``metrics.csv`` after such a resume was labelled one step late."""
        self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step

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
    def loss(self, batch: Mapping) -> torch.Tensor:
        """The training objective per example: ``objective.loss(vae, batch) / B`` (for the subset ELBO, −ELBO)."""
        return self.objective.loss(self.vae, batch) / batch_size_of(self.vae, batch)

    negative_elbo = loss  # the name from when the ELBO was the only objective (benchmarks use it)

    def training_step(self, batch, batch_idx):
        B = batch_size_of(self.vae, batch)
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
            with torch.no_grad():  # train/loss is the training step's own value
                parts = {f"train/{k}": float(v) for k, v in self.objective.terms(self.vae, batch).items() if k != "loss"}
            parts["epoch"] = self.current_epoch  # as Lightning's own rows have it
            # Straight to the loggers, at this step only: logged with self.log on some steps, Lightning would write
            # the last values again on every later logging step of the epoch (its result collection keeps an
            # on_step value until the epoch ends), and metrics.csv would show stale parts as if measured.
            for logger in self.loggers:
                logger.log_metrics(parts, step=self.global_step)
        return total

    def _nonfinite(self, batch, batch_idx, B, loss, prior_loss, error, rng, cuda_rng):
        """Diagnose a non-finite loss (replaying the step's draws), then stop or skip."""
        torch.set_rng_state(rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, self.device)
        try:
            with torch.no_grad():
                terms = {k: float(v) for k, v in self.objective.terms(self.vae, batch).items() if k not in ("elbo", "loss")}
            bad_terms = [f"{k}={v}" for k, v in terms.items() if not np.isfinite(v)]
            if prior_loss is not None and not bool(torch.isfinite(prior_loss).all()):
                bad_terms.append(f"latent prior loss={float(prior_loss)}")
            name = self.objective.name
            if bad_terms:
                what = f"non-finite {name} term(s): " + ", ".join(bad_terms)
            else:
                what = (f"all {name} terms are finite in a replay of the batch (" + ", ".join(f"{k}={v:.4g}" for k, v in terms.items())
                        + "): the objective itself went non-finite")
        except ValueError as err:
            what = f"the {self.objective.name} terms cannot be evaluated: {err}"
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
        B = batch_size_of(self.vae, batch)
        with torch.no_grad():
            terms = self.objective.terms(self.vae, batch)  # the training objective's own terms and loss
        # sync_dist: under DDP the ranks' estimates (independent draws) are averaged
        for key, value in terms.items():
            self.log(f"val/{key}", value, batch_size=B, prog_bar=(key == "loss"), sync_dist=True)
        return terms["loss"]

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
