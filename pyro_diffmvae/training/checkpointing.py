"""Checkpoints that survive crashes and interrupts, and the Lightning trainer that writes them.

* **Atomic checkpoints.** :class:`AtomicCheckpointIO` writes every Lightning checkpoint to a temporary
  file in the same folder and renames it over the target (``os.replace``): a crash mid-write never
  leaves a truncated ``last.ckpt``.
* **SIGTERM / Ctrl-C.** :class:`SaveOnInterrupt` writes a resumable ``last.ckpt`` at the end of the
  current step (Lightning turns SIGTERM into a stop at a step boundary; the first Ctrl-C is routed
  the same way, a second one aborts at once without saving).

:func:`make_trainer` turns both on by default.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.io import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..io import atomic_torch_save

__all__ = ["AtomicCheckpointIO", "SaveOnInterrupt", "make_trainer", "run_checkpoints"]


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
        """A stop requested during a step lets the step finish as Lightning runs it (its log rows and a
        validation due after it); Lightning then raises at the end of the step and :meth:`on_exception`
        saves. At the last batch of an epoch the checkpoint is saved here, before that epoch's end
        (after it, the resume is not exact): the step's log rows are written first, but a validation
        due after that step is not run, then or on resume."""
        if self._stop_requested(trainer) and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            _log_this_step(trainer)
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


def _log_this_step(trainer) -> None:
    """Hand this step's logged metrics to the loggers now, as Lightning does right after
    ``on_train_batch_end``: raising there skips it, and the resumed run does not repeat the step, so
    its row of ``metrics.csv`` was lost. (Lightning's logger connector has no public call for it.)"""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is not None and hasattr(connector, "update_train_step_metrics"):
        connector.on_batch_end()
        connector.update_train_step_metrics()


def run_checkpoints(dirpath: str | os.PathLike) -> "L.pytorch.callbacks.ModelCheckpoint":
    """The checkpoints of a ``diffmvae-train`` run: ``best.ckpt`` (lowest ``val/loss``) and ``last.ckpt``,
    always under those two names.

    Lightning's version counter is off: with it, a run resumed from a ``last.ckpt`` that this callback
    did not write itself (written by :class:`SaveOnInterrupt` before the first validation, or a copied
    run directory) saves to ``last-v1.ckpt``, and the next resume silently restarts from the stale
    ``last.ckpt``. Without it, every save replaces the file (atomically: :class:`AtomicCheckpointIO`)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=dirpath, filename="best", monitor="val/loss", mode="min", save_last=True,
                           save_top_k=1, enable_version_counter=False)


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
    plugins = _as_list(kwargs.pop("plugins", None))
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    callbacks = _as_list(kwargs.pop("callbacks", None))
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


def _as_list(value) -> list:
    """A Trainer argument that takes one item or a sequence, as a new list."""
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]
