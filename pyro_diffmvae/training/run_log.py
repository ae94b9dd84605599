"""One run's training log, ``logs/metrics.csv``, that a resume continues instead of replacing.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts (its writer's
``_check_log_dir_exists``): after a resume the file held only the rows logged since, and the loss
curves showed the second part alone. Here

* :class:`RunCSVLogger`, resuming from a checkpoint at global step ``G``, keeps the file's header and
  the rows logged at steps ``< G`` — the training and validation rows of every step the checkpoint
  includes (Lightning logs the ``k``-th optimizer step's rows under ``step = k - 1``) — and appends
  after them. The rows of later steps are dropped: the resumed run repeats those steps and logs them
  again, so each step appears once and the file equals an uninterrupted run's.
* :class:`FlushLogOnCheckpoint` flushes the logger's buffer whenever a checkpoint is saved (Lightning
  flushes every 100 steps), so a hard kill (``kill -9``, a lost node) loses at most the rows logged
  after the last checkpoint, which the resume repeats anyway.

Lightning's logger is subclassed rather than replaced: its buffering, header rewriting and rank-zero
handling stay Lightning's; only the start of the file differs.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import lightning as L
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

__all__ = ["RunCSVLogger", "FlushLogOnCheckpoint"]


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer that keeps the rows of an existing file logged before ``resume_step``
    and appends after them, under the same header."""

    def __init__(self, log_dir: str, resume_step: int):
        self._resume_step = resume_step
        super().__init__(log_dir=log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's deletes metrics.csv here
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if row.get("step") not in (None, "")
                    and int(float(row["step"])) < self._resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = header  # appended rows use the existing columns (new ones rewrite the header)


class RunCSVLogger(CSVLogger):
    """``CSVLogger(save_dir, name="logs", version="")`` writing ``<save_dir>/logs/metrics.csv``.

    :param resume_step: the global step of the checkpoint a resume starts from: the file keeps its
        rows of earlier steps and continues. ``None`` (a fresh run): the file starts empty, as
        Lightning's does.
    """

    def __init__(self, save_dir: str | os.PathLike, *, resume_step: int | None = None):
        super().__init__(str(save_dir), name="logs", version="")
        self._resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = (ExperimentWriter(log_dir=self.log_dir) if self._resume_step is None
                                else _ContinuingWriter(self.log_dir, self._resume_step))
        return self._experiment


class FlushLogOnCheckpoint(L.Callback):
    """Write the logger's buffered rows to ``metrics.csv`` whenever a checkpoint is saved."""

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.save()
