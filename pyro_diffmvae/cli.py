"""Hydra command-line apps: ``diffmvae-train``, ``diffmvae-evaluate``, ``diffmvae-sample``.

Every output goes to the hydra run directory (``outputs/<date>/<time>`` by default, or
``hydra.run.dir=...``); a run directory that already holds results is never overwritten.

* ``diffmvae-train [overrides]``: trains the VAE (Lightning: progress bar, ``checkpoints/last.ckpt``
  and ``checkpoints/best.ckpt``), fits the latent score prior, saves ``model.pt`` (config + weights),
  then evaluates: ``metrics.json``, ``report.md``, ``figures/*.png``.
* ``diffmvae-evaluate checkpoint=<run>/model.pt [evaluation.*=...]``: the same evaluation of a saved model.
* ``diffmvae-sample checkpoint=<run>/model.pt [sample.*=...]``: unconditional samples as PNGs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

__all__ = ["train_main", "evaluate_main", "sample_main", "run_train", "run_evaluate", "run_sample", "load_run"]

RESULT_NAMES = ("model.pt", "metrics.json", "report.md", "checkpoints", "figures", "samples")


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    clash = [n for n in RESULT_NAMES if (out / n).exists()]
    if clash:
        raise FileExistsError(f"output directory {out} already holds results {clash}; choose another hydra.run.dir "
                              "(nothing is overwritten)")
    return out


def _atomic_save(obj, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _seed(seed: int) -> None:
    import lightning as L
    import pyro

    L.seed_everything(seed, workers=True, verbose=False)
    pyro.set_rng_seed(seed)


def run_train(cfg: DictConfig, out: Path) -> dict:
    """Train, fit the latent prior, save, evaluate. Returns the metrics."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from .builders import build_datasets, build_latent_prior, build_model
    from .evaluation import evaluate, save_metrics, write_report
    from .figures import save_loss_curves
    from .prior import collect_latents
    from .train import DiffMVAEModule, make_trainer

    _seed(cfg.seed)
    train_set, val_set, test_set = build_datasets(cfg)
    vae = build_model(cfg)
    t = cfg.trainer
    train_loader = DataLoader(train_set, batch_size=t.batch_size, shuffle=True, num_workers=t.num_workers, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=t.batch_size, shuffle=False, num_workers=t.num_workers)
    module = DiffMVAEModule(vae, lr=t.lr, weight_decay=t.weight_decay, log_parts_every=t.log_parts_every,
                            ema_decay=t.ema_decay)
    config = OmegaConf.to_container(cfg, resolve=True)

    class StoreConfig(L.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["diffmvae_config"] = config

    ckpt = ModelCheckpoint(dirpath=out / "checkpoints", filename="best", monitor="val/loss", mode="min",
                           save_last=True, save_top_k=1)
    trainer = make_trainer(
        max_steps=t.max_steps, accelerator=t.accelerator, devices=t.devices, gradient_clip_val=t.gradient_clip_val,
        precision=t.precision, default_root_dir=str(out), log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, callbacks=[ckpt, StoreConfig()], logger=CSVLogger(str(out), name="logs", version=""),
        val_check_interval=min(t.val_every_n_steps, len(train_loader)), check_val_every_n_epoch=None, limit_val_batches=t.val_batches,
    )
    start = time.time()
    trainer.fit(module, train_loader, val_loader)
    train_seconds = time.time() - start
    vae = module.vae.cpu()

    prior_seconds = 0.0
    if cfg.latent_prior.fit:
        start = time.time()
        print(f"fitting the latent score prior on z ~ q(z | all modalities) ({cfg.latent_prior.steps} steps)")
        lat_loader = DataLoader(train_set, batch_size=256, shuffle=False)
        latents = collect_latents(vae, lat_loader, cfg.latent_prior.samples_per_example)
        prior = build_latent_prior(cfg)
        prior.fit(latents, steps=cfg.latent_prior.steps, batch_size=cfg.latent_prior.batch_size, lr=cfg.latent_prior.lr)
        vae.latent_prior = prior
        prior_seconds = time.time() - start
    # the latent prior is a submodule of the VAE once attached, so one state dict holds both
    _atomic_save({"config": config, "vae": vae.state_dict()}, out / "model.pt")
    save_loss_curves(out / "logs" / "metrics.csv", out / "loss_curves.png")

    metrics = {"training": {"steps": int(trainer.global_step), "train_seconds": round(train_seconds, 1),
                            "latent_prior_seconds": round(prior_seconds, 1)}}
    if cfg.evaluation.enabled:
        start = time.time()
        metrics.update(evaluate(vae, test_set, train_set, cfg, out))
        metrics["training"]["evaluation_seconds"] = round(time.time() - start, 1)
    save_metrics(metrics, out / "metrics.json")
    write_report(metrics, out / "report.md", title=f"{cfg.model.name} on {cfg.dataset.name} (weighting {cfg.weighting.name}, fusion {cfg.fusion.name})")
    print(f"outputs in {out}")
    return metrics


def load_run(checkpoint: str | os.PathLike):
    """Rebuild ``(vae, config)`` from a ``model.pt`` written by ``diffmvae-train`` or a Lightning checkpoint."""
    from .builders import build_latent_prior, build_model

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "config" in state:  # model.pt
        cfg, weights = OmegaConf.create(state["config"]), state["vae"]
    elif "diffmvae_config" in state:  # Lightning checkpoint (no latent prior: it is fitted after training)
        cfg = OmegaConf.create(state["diffmvae_config"])
        weights = {k[len("vae."):]: v for k, v in state["state_dict"].items() if k.startswith("vae.")}
    else:
        raise ValueError(f"{path} is neither a model.pt of diffmvae-train nor a Lightning checkpoint of it")
    vae = build_model(cfg)
    if any(k.startswith("latent_prior.") for k in weights):
        vae.latent_prior = build_latent_prior(cfg)
    vae.load_state_dict(weights)
    vae.eval()
    return vae, cfg


def run_evaluate(cfg: DictConfig, out: Path) -> dict:
    from .builders import build_datasets
    from .evaluation import evaluate, save_metrics, write_report

    if cfg.checkpoint is None:
        raise ValueError("diffmvae-evaluate needs checkpoint=<run dir>/model.pt")
    _seed(cfg.seed)
    vae, run_cfg = load_run(cfg.checkpoint)
    run_cfg.evaluation = cfg.evaluation  # evaluation settings come from this call
    train_set, _, test_set = build_datasets(run_cfg)
    metrics = evaluate(vae, test_set, train_set, run_cfg, out)
    save_metrics(metrics, out / "metrics.json")
    write_report(metrics, out / "report.md", title=f"evaluation of {cfg.checkpoint}")
    print(f"outputs in {out}")
    return metrics


def run_sample(cfg: DictConfig, out: Path) -> Path:
    from .figures import save_unconditional_figure

    if cfg.checkpoint is None:
        raise ValueError("diffmvae-sample needs checkpoint=<run dir>/model.pt")
    _seed(cfg.seed)
    vae, run_cfg = load_run(cfg.checkpoint)
    s = cfg.sample
    gen = vae.sample(s.num, prior=s.prior, sampler=s.sampler, steps=s.steps)
    (out / "samples").mkdir(parents=True)
    torch.save({k: v.cpu() for k, v in gen.items()}, out / "samples" / "samples.pt")
    save_unconditional_figure({s.prior: gen}, vae.names, out / "samples" / "samples.png", n=min(s.num, 16))
    print(f"outputs in {out}")
    return out / "samples"


def _main(fn, cfg: DictConfig):
    try:
        fn(cfg, _output_dir())
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def train_main(cfg: DictConfig) -> None:
    """diffmvae-train: train, fit the latent prior, evaluate."""
    _main(run_train, cfg)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def evaluate_main(cfg: DictConfig) -> None:
    """diffmvae-evaluate checkpoint=...: evaluate a saved model."""
    _main(run_evaluate, cfg)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def sample_main(cfg: DictConfig) -> None:
    """diffmvae-sample checkpoint=...: unconditional samples."""
    _main(run_sample, cfg)
