"""The ``logger`` config group: the CSV log always, TensorBoard / W&B (offline) / MLflow (local file
store) beside it, with the training scalars and, once the run is evaluated, its report and figures
(issue 16, item 2). The W&B and MLflow tests skip where their packages are not installed."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest


def train(tmp_path: Path, *overrides: str) -> Path:
    code = "import sys; from pyro_diffmvae.cli import train_main as main; sys.argv[0] = 'diffmvae-train'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1", WANDB_SILENT="true", WANDB_MODE="offline")
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", code, "experiment=tiny", "evaluation.num_examples=4", *overrides,
                          f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls",
                          f"hydra.run.dir={run}"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / "logs" / "metrics.csv").is_file()  # the CSV log is always there (curves, report, resume)
    return run


def test_tensorboard_gets_the_scalars_the_report_and_the_figures(tmp_path):
    """Catches: the logger group not instantiated (no event file), the scalars logged only to the
    CSV, or the report and figures not handed over after the evaluation."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(tmp_path, "logger=tensorboard")
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss"} <= set(tags["scalars"])
    assert len(events.Scalars("train/loss")) == 6  # tiny: 6 steps, logged every step
    # the ELBO's parts at the steps they were computed (tiny: every 2nd step), each once, to every logger;
    # Lightning used to write the last parts again at every later step of the epoch (stale values)
    assert [e.step for e in events.Scalars("train/kl")] == [0, 2, 4]
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    assert [int(r["step"]) for r in rows if r.get("train/kl")] == [0, 2, 4]
    assert {"loss_curves", "conditional", "unconditional"} <= set(tags["images"])
    assert any(t.startswith("report") for t in tags["tensors"])  # add_text is stored as a tensor summary


def test_mlflow_file_store_gets_the_metrics_and_the_artifacts(tmp_path):
    pytest.importorskip("mlflow")
    run = train(tmp_path, "logger=mlflow")
    metric_files = list((run / "mlruns").rglob("metrics/train/loss"))
    assert len(metric_files) == 1 and len(metric_files[0].read_text().splitlines()) == 6
    artifacts = {p.name for p in (run / "mlruns").rglob("artifacts/*")}
    assert {"report.md", "loss_curves.png", "conditional.png"} <= artifacts


def test_wandb_offline_run_keeps_the_files_and_sends_nothing(tmp_path):
    pytest.importorskip("wandb")
    run = train(tmp_path, "logger=wandb")
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    saved = {p.name for p in (offline[0] / "files").rglob("*")}
    assert {"report.md", "loss_curves.png"} <= saved


def test_a_logger_whose_package_is_missing_is_named_before_training(tmp_path, monkeypatch):
    """Catches: an ImportError from deep inside Lightning after the data was built."""
    import importlib.util

    from hydra import compose, initialize_config_module

    from pyro_diffmvae.training.loggers import build_loggers

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["logger=mlflow"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a))
    with pytest.raises(ValueError, match=r"logger=mlflow needs the 'mlflow' package: pip install 'pyro-diffmvae\[mlflow\]'"):
        build_loggers(cfg, tmp_path)
    assert [type(lg).__name__ for lg in build_loggers(compose_csv(), tmp_path)] == ["RunCSVLogger"]


def compose_csv():
    from hydra import compose, initialize_config_module

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config")
