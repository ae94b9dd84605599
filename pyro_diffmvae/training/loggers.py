"""The run's loggers: the CSV log always, and one of TensorBoard, Weights & Biases (offline) or MLflow
(local file store) beside it, chosen with the ``logger`` config group (``diffmvae-train logger=mlflow``).

``cfg.logger`` holds ``kind``, ``subdir`` and ``args``: ``args`` is instantiated by hydra
(``_target_`` a Lightning logger class) with ``save_dir=<run dir>[/subdir]``; ``args: null`` (the
``csv`` option) adds nothing. The CSV log (:class:`~pyro_diffmvae.training.run_log.RunCSVLogger`,
``logs/metrics.csv``) stays first, because the loss curves, the report and a resume read it.

Once the run is evaluated, :func:`log_run_files` hands ``report.md`` and the figures to the extra
logger in the form it supports: TensorBoard as text and images, W&B as files saved with the run,
MLflow as artifacts. A logger whose package is not installed is an error naming the extra to install,
raised before training starts.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Sequence

from omegaconf import DictConfig

from .run_log import RunCSVLogger

__all__ = ["build_loggers", "log_run_files", "LOGGER_PACKAGES"]

#: logger kind -> (the module it needs, the pyproject extra that installs it)
LOGGER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb"),
                   "mlflow": ("mlflow", "mlflow")}


def build_loggers(cfg: DictConfig, out: Path, resume_step: int | None = None) -> list:
    """``[RunCSVLogger(out), <cfg.logger's logger>]`` (the second only when ``cfg.logger.args`` is set)."""
    loggers = [RunCSVLogger(out, resume_step=resume_step)]
    spec = cfg.get("logger", None)
    if spec is None or spec.get("args", None) is None:
        return loggers
    module, extra = LOGGER_PACKAGES.get(spec.kind, (None, None))
    if module is not None and importlib.util.find_spec(module) is None:
        raise ValueError(f"logger={spec.kind} needs the {module!r} package: pip install 'pyro-diffmvae[{extra}]'")
    from hydra.utils import instantiate

    save_dir = out / spec.subdir if spec.get("subdir", None) else out
    save_dir.mkdir(parents=True, exist_ok=True)
    if spec.kind == "mlflow" and spec.args.get("tracking_uri", None) is None:
        # the local file store (<run>/mlruns): MLflow 3 keeps it in maintenance mode and refuses it unless
        # allowed; give args.tracking_uri (e.g. sqlite:///mlflow.db, a server) to use another store
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    loggers.append(instantiate(spec.args, save_dir=str(save_dir)))
    return loggers


def log_run_files(loggers: Sequence, report: Path, figures: Sequence[Path]) -> list[str]:
    """Give ``report`` (Markdown) and ``figures`` (PNGs) to every logger that can keep files; returns
    what was logged where (``"<logger>: <file>"``), for the run's output."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    files = [p for p in (report, *figures) if p.is_file()]
    done = []
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            import numpy as np
            from PIL import Image

            writer = logger.experiment
            for path in files:
                if path.suffix == ".md":
                    writer.add_text(path.stem, path.read_text())
                else:
                    writer.add_image(path.stem, np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")
                done.append(f"tensorboard: {path.name}")
            writer.flush()
        elif isinstance(logger, MLFlowLogger):
            for path in files:
                logger.experiment.log_artifact(logger.run_id, str(path))
                done.append(f"mlflow: {path.name}")
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            for path in files:
                run.save(str(path), base_path=str(path.parent), policy="now")
                done.append(f"wandb: {path.name}")
    return done
