"""Hydra command-line apps: ``diffmvae-train``, ``diffmvae-evaluate``, ``diffmvae-sample``.

Every output goes to the hydra run directory (``outputs/<date>/<time>`` by default, or
``hydra.run.dir=...``); a run directory that already holds results is never overwritten (the one
exception: resuming a run, below).

* ``diffmvae-train [overrides]``: trains the VAE (Lightning: progress bar, ``checkpoints/last.ckpt``
  and ``checkpoints/best.ckpt``), fits the latent score prior, saves ``model.pt`` (config + weights)
  and the same model as a portable folder ``pretrained/`` (safetensors + JSON,
  :mod:`pyro_diffmvae.pretrained`), then evaluates: ``metrics.json``, ``report.md``, ``figures/*.png``.
  ``checkpoint=`` of the other two apps takes any of ``model.pt``, a Lightning ``.ckpt`` or ``pretrained/``.
* ``diffmvae-evaluate checkpoint=<run>/model.pt [evaluation.*=...]``: the evaluation of a saved model
  with the run's own evaluation settings and this call's ``evaluation.*`` overrides (and ``seed``,
  ``dataset.root``, ``dataset.cache_dir``); any other override (``model.*``, ``experiment=...``) is
  refused, since the model is rebuilt from the config stored with it.
* ``diffmvae-sample checkpoint=<run>/model.pt [sample.*=...]``: unconditional samples as PNGs (only
  ``sample.*`` and ``seed`` may be given).

Robust runs
-----------
* **Reproducible.** ``seed`` seeds everything (data order, initialisation, the subset and diffusion-time
  draws, the latent prior and the evaluation, each phase re-seeded from ``seed``): two runs with the
  same config on the same machine write the same ``metrics.json`` (up to its ``*_seconds`` timings).
* **Non-finite losses.** ``trainer.nonfinite=stop`` (default): a NaN/inf training loss ends the run
  (exit status 2) with an error naming the global step and the ELBO term(s) that went non-finite; no
  checkpoint is written for that step, so ``last.ckpt`` / ``best.ckpt`` keep the last good state.
  ``trainer.nonfinite=skip``: such a batch's update is skipped and counted (``train/skipped_nonfinite``
  in ``logs/metrics.csv``) until ``trainer.max_nonfinite`` (default 10) were skipped, then the run stops.
* **Checkpoints** are written atomically (a temporary file in ``checkpoints/``, then renamed).
* **SIGTERM / Ctrl-C** during training (e.g. a SLURM time limit or preemption, ``kill <pid>``): the run
  stops at the end of the current step, writes a resumable ``checkpoints/last.ckpt``, says how to
  resume and exits with status 143 (SIGTERM) or 130 (Ctrl-C; press it twice to abort without saving).
* **Resume**: ``diffmvae-train trainer.resume_from=<run dir>`` (or ``=<run dir>/checkpoints/last.ckpt``)
  continues that run from its ``checkpoints/last.ckpt`` *in that directory* (weights, optimizer and
  EMA, global step, RNG states, position in the data: the result is the same as an uninterrupted run),
  then fits the prior and evaluates there as usual. The run's own config (stored in the checkpoint) is
  used; on the command line only ``trainer.*`` (not ``trainer.batch_size``), ``evaluation.*``,
  ``latent_prior.*``, ``dataset.cache_dir`` and ``dataset.root`` may be changed (e.g.
  ``trainer.max_steps=5000`` to train longer, ``trainer.devices=4``). It refuses a directory without
  ``checkpoints/last.ckpt`` and a finished run (``model.pt`` exists). ``trainer.lr`` and
  ``trainer.weight_decay`` apply to the restored optimizer; ``trainer.batch_size`` and
  ``trainer.ema_decay`` cannot change; ``trainer.max_steps`` below the checkpoint's step is an error.
  The resume is recorded in ``<run>/.hydra/resume_<k>/`` (the run's own ``.hydra/`` record stays as
  it was); ``logs/metrics.csv`` continues from the checkpoint (the rows logged after it, which the
  resume repeats, are dropped: the file equals an uninterrupted run's) and ``loss_curves.png`` shows
  the whole history.
* **Nothing is written before the checks pass.** Every setting is checked first
  (:mod:`pyro_diffmvae.settings`: unknown keys, also those added with ``+``, and ranges); hydra's
  record of the call (``.hydra/``) is written by the apps after the checks (``hydra.output_subdir:
  null``), so a refused call leaves an existing directory as it was.

Devices and DDP
---------------
``trainer=gpu``: one GPU with bf16 autocast. ``trainer=ddp``: data-parallel, one process per device
(``trainer.devices=2`` by default, ``trainer.accelerator=cpu`` with the gloo backend; set
``trainer.accelerator=gpu`` for NCCL). ``trainer.batch_size`` is per process: the effective batch is
``batch_size × devices × num_nodes``. Each process seeds its RNGs with ``seed + rank``, so the ranks'
subset and diffusion-time draws are independent and reproducible, and each rank reads its own share of
every epoch. Only rank 0 writes checkpoints, fits the latent prior and evaluates.

GPU speed settings (``trainer.*``; the CPU defaults leave each off):

* ``precision``: Lightning's, ``32-true`` (default), ``bf16-mixed`` (``trainer=gpu``) or ``16-mixed``:
  autocast; the likelihoods turn the networks' low-precision outputs into float32 before their
  squared errors and sums, so the ELBO is reduced in float32; the guide's latents (the experts'
  means and log-variances, their fusion, the sampled z and the KL) are float32 too.
* ``channels_last: true`` (``trainer=gpu``): the diffusion decoders' UNets and the image batches in
  ``torch.channels_last`` (NHWC convolutions, the fast cuDNN path under bf16/fp16).
* ``compile: true``: ``torch.compile`` each diffusion decoder's ε-network during training
  (``compile_backend``, default ``inductor``; ``compile_mode``, e.g. ``max-autotune``). Checkpoints keep
  the uncompiled parameter names; evaluation runs the eager networks.
* ``accumulate_grad_batches``: one optimizer step per this many batches (Lightning's; ``max_steps``
  counts optimizer steps, ``val_every_n_steps`` batches).

* One machine: ``diffmvae-train trainer=ddp trainer.devices=4 [trainer.accelerator=gpu]`` — Lightning
  starts the other processes itself (it passes them the same ``hydra.run.dir``).
* ``torchrun``: every process runs the app, so give them one explicit output directory::

      torchrun --nproc-per-node=4 $(which diffmvae-train) trainer=ddp trainer.devices=4 \
          trainer.accelerator=gpu hydra.run.dir=outputs/ddp_run

  (multi-node: ``torchrun --nnodes=2 --node-rank=<i> --master-addr=<host> --master-port=29500 ...``
  with ``trainer.num_nodes=2``).
* SLURM: one task per device, ``srun`` starts them and Lightning reads the SLURM environment
  (``#SBATCH --nodes=2 --ntasks-per-node=4 --gpus-per-node=4``, then
  ``srun diffmvae-train trainer=ddp trainer.accelerator=gpu trainer.devices=4 trainer.num_nodes=2
  hydra.run.dir=outputs/$SLURM_JOB_ID``). With ``#SBATCH --signal=SIGTERM@120`` the job gets SIGTERM
  two minutes before its time limit and checkpoints; continue it with
  ``srun diffmvae-train trainer.resume_from=outputs/<job id>`` (the stored config keeps the DDP
  settings; the same number of processes restores every rank's RNG states).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from .io import atomic_torch_save, read_checkpoint

__all__ = ["train_main", "evaluate_main", "sample_main", "run_train", "run_evaluate", "run_sample", "load_run",
           "resume_paths", "resume_config", "TrainingInterrupted"]

RESULT_NAMES = ("model.pt", "pretrained", "metrics.json", "report.md", "checkpoints", "figures", "samples")


class TrainingInterrupted(RuntimeError):
    """Training stopped by a signal; ``exit_code`` is 128 + the signal number."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _env_rank() -> int:
    """This process's rank when a launcher (torchrun, SLURM, Lightning's DDP launcher) started it, else 0."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _output_dir() -> Path:
    """This call's hydra run directory, refused when it already holds results (nothing is overwritten)."""
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir)
    # DDP: rank 0 checks; the other ranks share its directory (rank 0 may already be writing there)
    clash = [n for n in RESULT_NAMES if (out / n).exists()] if _env_rank() == 0 else []
    if clash:
        raise FileExistsError(f"output directory {out} already holds results {clash}; choose another hydra.run.dir "
                              "(nothing is overwritten)")
    return out


def _record_invocation(folder: Path, cfg: DictConfig) -> None:
    """Write hydra's record of this call (``config.yaml``, ``overrides.yaml``, ``hydra.yaml``) to ``folder``.

    Hydra itself would write it to ``<run dir>/.hydra`` before the app runs, also when the app then
    refuses the directory (a rerun into a finished run, a resume pointed at the run): the config sets
    ``hydra.output_subdir: null`` and the apps write the record once their checks have passed."""
    from hydra.core.hydra_config import HydraConfig

    if _env_rank() != 0:
        return
    folder.mkdir(parents=True, exist_ok=True)
    hydra_cfg = HydraConfig.get()
    (folder / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (folder / "overrides.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(list(hydra_cfg.overrides.task))))
    (folder / "hydra.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))


def _command_line_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def resume_paths(resume_from: str | os.PathLike) -> tuple[Path, Path]:
    """``(run dir, its checkpoints/last.ckpt)`` for ``trainer.resume_from`` (a run dir or that file).

    Raises ``FileNotFoundError`` naming the missing path, ``FileExistsError`` for a finished run."""
    path = Path(resume_from).expanduser().absolute()
    if path.suffix == ".ckpt":
        if path.name != "last.ckpt" or path.parent.name != "checkpoints":
            raise ValueError(f"trainer.resume_from={resume_from}: resuming continues a run from its "
                             "checkpoints/last.ckpt; give the run directory")
        path = path.parent.parent
    ckpt = path / "checkpoints" / "last.ckpt"
    if not path.is_dir():
        raise FileNotFoundError(f"cannot resume: run directory {path} does not exist")
    if not ckpt.is_file():
        raise FileNotFoundError(f"cannot resume {path}: {ckpt} does not exist (a run writes it at each validation, "
                                "on SIGTERM / Ctrl-C)")
    if (path / "model.pt").exists():
        raise FileExistsError(f"cannot resume {path}: the run already finished (model.pt exists); start a new run "
                              "(nothing is overwritten)")
    return path, ckpt


RESUME_OVERRIDABLE = ("trainer.", "evaluation.", "latent_prior.", "dataset.cache_dir", "dataset.root")
#: trainer keys a resumed run cannot change: the data order is checkpointed per batch, and the EMA
#: state (present or not) is restored as it was saved
RESUME_FIXED = ("trainer.batch_size", "trainer.ema_decay")
#: what diffmvae-evaluate and diffmvae-sample may change of a saved run (the model is rebuilt from its stored config)
APP_OVERRIDABLE = {"evaluate": ("evaluation.", "checkpoint", "seed", "dataset.cache_dir", "dataset.root"),
                   "sample": ("sample.", "checkpoint", "seed")}


def _allowed_names(allowed) -> str:
    return ", ".join(k + ("*" if k.endswith(".") else "") for k in allowed)


def _apply_overrides(base: DictConfig, cfg: DictConfig, overrides: list[str], allowed, fixed, refusal: str,
                     skip=()) -> DictConfig:
    """``base`` with each command-line override's value taken from ``cfg``; an override of a key
    outside ``allowed`` (prefixes ending in ``.`` or exact keys), in ``fixed``, a deletion (``~``) or
    a config group choice (``experiment=...``) raises ``ValueError`` beginning with ``refusal``."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in skip:
            continue
        ok = any(key.startswith(a) if a.endswith(".") else key == a for a in allowed)
        if override.startswith("~") or not ok or key in fixed:
            raise ValueError(f"cannot change {key!r} {refusal}; only {_allowed_names(allowed)} may be overridden"
                             + (f" (not {', '.join(fixed)})" if fixed else ""))
        OmegaConf.update(base, key, OmegaConf.select(cfg, key), force_add=True)
    return base


def resume_config(cfg: DictConfig, stored: dict, overrides: list[str], run: Path) -> DictConfig:
    """The config of a resumed run: the run's stored ``config`` plus the allowed command-line ``overrides``.

    Trainer keys added since the run started take ``cfg``'s values; ``trainer.resume_from`` is ``run``.
    ``trainer.lr`` and ``trainer.weight_decay`` apply to the restored optimizer (the module sets them
    on its param groups when training starts)."""
    resumed = OmegaConf.create(stored)
    for key, value in cfg.trainer.items():
        if key not in resumed.trainer:
            resumed.trainer[key] = value
    _apply_overrides(resumed, cfg, overrides, RESUME_OVERRIDABLE, RESUME_FIXED,
                     "when resuming: a resumed run keeps the config stored in its checkpoint",
                     skip=("trainer.resume_from",))
    resumed.trainer.resume_from = str(run)
    return resumed


def saved_run_config(cfg: DictConfig, stored: DictConfig, overrides: list[str], app: str) -> DictConfig:
    """The config ``diffmvae-evaluate`` / ``diffmvae-sample`` use for a saved run: its stored config
    (its own ``evaluation`` and ``sample`` settings, with the keys added since it was saved taken from
    ``cfg``), this call's ``seed``, and the call's allowed overrides (:data:`APP_OVERRIDABLE`); any other override is
    refused (the model is rebuilt from the stored config, so ``model.*`` or ``experiment=...`` could
    only be ignored)."""
    run_cfg = OmegaConf.create(OmegaConf.to_container(stored, resolve=False))
    for section in ("evaluation", "sample"):
        for key, value in cfg[section].items():
            if key not in run_cfg.get(section, {}):
                OmegaConf.update(run_cfg, f"{section}.{key}", value, force_add=True)
    run_cfg.seed = cfg.seed
    run_cfg.checkpoint = cfg.checkpoint
    return _apply_overrides(run_cfg, cfg, overrides, APP_OVERRIDABLE[app],
                            (), f"in diffmvae-{app}: the model is rebuilt from the config stored with {cfg.checkpoint}")


def _train_setup(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """(config, output dir) of ``diffmvae-train``: a fresh hydra run dir, or the run being resumed.

    Every setting is checked first; hydra's record of the call is written only then (a fresh run:
    ``<run>/.hydra``; a resume: ``<run>/.hydra/resume_<k>``, the run's own record kept)."""
    from .settings import check_settings

    if not cfg.trainer.get("resume_from"):
        check_settings(cfg, "train")
        out = _output_dir()
        _record_invocation(out / ".hydra", cfg)
        return cfg, out
    run, ckpt = resume_paths(cfg.trainer.resume_from)
    state = read_checkpoint(ckpt)
    stored = state.get("diffmvae_config")
    if stored is None:
        raise ValueError(f"cannot resume from {ckpt}: it holds no diffmvae-train config")
    resumed = resume_config(cfg, stored, _command_line_overrides(), run)
    check_settings(resumed, "train")
    step = int(state.get("global_step", 0))
    if resumed.trainer.max_steps < step:
        raise ValueError(f"trainer.max_steps={resumed.trainer.max_steps} is below the step of {ckpt} ({step}): "
                         "resuming would train nothing; give a larger trainer.max_steps")
    k = 1
    while (run / ".hydra" / f"resume_{k}").exists():
        k += 1
    _record_invocation(run / ".hydra" / f"resume_{k}", resumed)
    return resumed, run


def _saved_run_setup(app: str):
    def setup(cfg: DictConfig) -> tuple[DictConfig, Path]:
        from .settings import check_settings

        if cfg.checkpoint is None:
            raise ValueError(f"diffmvae-{app} needs checkpoint=<run dir>/model.pt")
        stored = _stored_config(cfg.checkpoint)
        run_cfg = saved_run_config(cfg, stored, _command_line_overrides(), app)
        check_settings(run_cfg, app)
        out = _output_dir()
        _record_invocation(out / ".hydra", run_cfg)
        return run_cfg, out
    return setup


def _stored_config(checkpoint) -> DictConfig:
    """The config stored in a ``model.pt``, a Lightning checkpoint of diffmvae-train or a pretrained folder."""
    from .pretrained import read_config

    path = Path(checkpoint)
    return read_config(path) if path.is_dir() else _saved_config_and_weights(path)[0]


def _saved_config_and_weights(path: Path) -> tuple[DictConfig, dict]:
    """``(config, VAE weights)`` of a ``model.pt`` written by ``diffmvae-train`` or a Lightning checkpoint of it."""
    state = read_checkpoint(path)  # weights_only: opening a file never runs code
    if isinstance(state.get("config"), dict) and isinstance(state.get("vae"), dict):  # model.pt
        return OmegaConf.create(state["config"]), state["vae"]
    if isinstance(state.get("diffmvae_config"), dict) and isinstance(state.get("state_dict"), dict):
        # Lightning checkpoint (no latent prior: it is fitted after training)
        weights = {k[len("vae."):]: v for k, v in state["state_dict"].items() if k.startswith("vae.")}
        return OmegaConf.create(state["diffmvae_config"]), weights
    raise ValueError(f"{path} is neither a model.pt of diffmvae-train nor a Lightning checkpoint of it "
                     f"(its keys: {sorted(map(str, state))[:8]})")


def _seed(seed: int) -> None:
    import lightning as L
    import pyro

    L.seed_everything(seed, workers=True, verbose=False)
    pyro.set_rng_seed(seed)


def run_train(cfg: DictConfig, out: Path) -> dict:
    """Train, fit the latent prior, save, evaluate. Returns the metrics (``{}`` on DDP ranks other than 0).

    With ``cfg.trainer.resume_from`` set, training continues from ``out/checkpoints/last.ckpt``."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from torch.utils.data import DataLoader

    from .builders import build_datasets, build_latent_prior, build_model, build_objective, objective_name
    from .evaluation import evaluate, save_metrics, write_report
    from .figures import save_loss_curves
    from .pretrained import save_pretrained
    from .prior import collect_latents
    from .train import DiffMVAEModule, ResumableDataLoader, SaveOnInterrupt, make_trainer, run_checkpoints
    from .training.loggers import build_loggers, log_run_files
    from .training.diffusion_warmup import DiffusionWarmup
    from .training.kl_warmup import KLWarmup
    from .training.run_log import FlushLogOnCheckpoint

    t = cfg.trainer
    resume_ckpt, resume_step = None, None
    if t.resume_from:
        resume_ckpt = out / "checkpoints" / "last.ckpt"
        if not resume_ckpt.is_file():
            raise FileNotFoundError(f"cannot resume {out}: {resume_ckpt} does not exist")
        resume_step = int(read_checkpoint(resume_ckpt)["global_step"])  # logs/metrics.csv continues from here
        print(f"resuming {out} from {resume_ckpt}")
    _seed(cfg.seed)
    train_set, val_set, test_set = build_datasets(cfg)
    vae = build_model(cfg)
    two_stage = cfg.model.get("two_stage", None)
    if two_stage and cfg.evaluation.enabled and not cfg.latent_prior.fit:
        raise ValueError(f"model={cfg.model.name} is two-stage: its stage 2 (the joint latent diffusion) is fitted "
                         "in the latent-prior phase, so evaluation needs latent_prior.fit=true")
    # a seeded, checkpointed data order (exact resume); it shards itself across DDP ranks
    train_loader = ResumableDataLoader(train_set, batch_size=t.batch_size, seed=cfg.seed, shuffle=True,
                                       num_workers=t.num_workers, drop_last=True)
    if len(train_loader) == 0:  # drop_last: no full batch, Lightning would only warn and "finish"
        raise ValueError(f"trainer.batch_size={t.batch_size} is larger than the training set ({len(train_set)} "
                         "examples per process): there is no training batch; lower trainer.batch_size")
    val_loader = DataLoader(val_set, batch_size=t.batch_size, shuffle=False, num_workers=t.num_workers)
    loggers = build_loggers(cfg, out, resume_step)  # the CSV log, and cfg.logger's beside it
    objective = build_objective(cfg)  # the one objective: training, validation, checkpoint selection, logging
    module = DiffMVAEModule(vae, lr=t.lr, weight_decay=t.weight_decay, log_parts_every=t.log_parts_every,
                            ema_decay=t.ema_decay, seed=cfg.seed, nonfinite=t.nonfinite, max_nonfinite=t.max_nonfinite,
                            objective=objective, channels_last=t.get("channels_last", False),
                            compile=t.get("compile", False), compile_backend=t.get("compile_backend", "inductor"),
                            compile_mode=t.get("compile_mode", None))
    config = OmegaConf.to_container(cfg, resolve=True)

    class StoreConfig(L.Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            checkpoint["diffmvae_config"] = config

    ckpt = run_checkpoints(out / "checkpoints")
    interrupt = SaveOnInterrupt(out / "checkpoints")
    trainer = make_trainer(
        max_steps=t.max_steps, max_time=t.get("max_time", None), accelerator=t.accelerator, devices=t.devices, gradient_clip_val=t.gradient_clip_val,
        precision=t.precision, default_root_dir=str(out), log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar, strategy=t.strategy, num_nodes=t.num_nodes,
        accumulate_grad_batches=t.get("accumulate_grad_batches", 1),
        callbacks=[ckpt, StoreConfig(), interrupt, FlushLogOnCheckpoint(),
                   *([KLWarmup(t.kl_warmup_steps)] if t.get("kl_warmup_steps", 0) else []),
                   *([DiffusionWarmup(t.diffusion_warmup_steps)] if t.get("diffusion_warmup_steps", 0) else [])],
        logger=loggers,
        val_check_interval=min(t.val_every_n_steps, len(train_loader)), check_val_every_n_epoch=None,
        limit_val_batches=t.val_batches, use_distributed_sampler=False,
    )
    start = time.time()
    try:
        trainer.fit(module, train_loader, val_loader, ckpt_path=resume_ckpt)
    except SIGTERMException:  # a SystemExit with code 0: turn it into a non-zero exit saying how to resume
        name = interrupt.signal_name or "SIGTERM"
        saved = (f"a resumable checkpoint is in {interrupt.saved_path}" if interrupt.saved_path is not None
                 else "no checkpoint could be written")
        raise TrainingInterrupted(f"training stopped by {name} at global step {trainer.global_step}; {saved}. "
                                  f"Resume with: diffmvae-train trainer.resume_from={out}",
                                  128 + int(getattr(signal, name))) from None
    train_seconds = time.time() - start
    if trainer.received_sigterm:  # arrived during the last step: stop before the prior and the evaluation
        name = interrupt.signal_name or "SIGTERM"
        raise TrainingInterrupted(f"{name} during the last training step; resume with: diffmvae-train "
                                  f"trainer.resume_from={out} (it repeats the steps since the last checkpoint)",
                                  128 + int(getattr(signal, name)))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # DDP: rank 0 alone fits the prior, saves and evaluates; without the process group, no metric
        # (e.g. torchmetrics' FID) tries to sync with ranks that have left
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return {}
    vae = module.vae.cpu()

    prior_seconds = 0.0
    if cfg.latent_prior.fit:
        start = time.time()
        what = (f"stage 2 of {cfg.model.name} (joint latent diffusion, mode {two_stage.mode}) on the concatenated "
                "unimodal latents" if two_stage else "the latent score prior on z ~ q(z | all modalities)")
        prior_steps = (two_stage.get("prior_steps", None) if two_stage else None) or cfg.latent_prior.steps
        print(f"fitting {what} ({prior_steps} steps)")
        _seed(cfg.seed)  # each phase from the seed: results do not depend on how training drew
        lat_loader = DataLoader(train_set, batch_size=256, shuffle=False)
        latents = collect_latents(vae, lat_loader, cfg.latent_prior.samples_per_example)
        prior = build_latent_prior(cfg)
        prior.fit(latents, steps=prior_steps, batch_size=cfg.latent_prior.batch_size, lr=cfg.latent_prior.lr,
                  ema_decay=cfg.latent_prior.get("ema_decay", None), progress=bool(t.progress_bar))
        vae.latent_prior = prior
        prior_seconds = time.time() - start
    # the latent prior is a submodule of the VAE once attached, so one state dict holds both
    save_model(vae, config, out / "model.pt")
    save_pretrained(vae, out / "pretrained", config)  # the same model as a portable folder (safetensors + JSON)
    save_loss_curves(out / "logs" / "metrics.csv", out / "loss_curves.png")

    steps = int(trainer.global_step)
    metrics = {"training": {"objective": objective_name(cfg), "steps": steps, "max_steps": int(t.max_steps),
                            "max_time": t.get("max_time", None),
                            "stopped_by": "max_steps" if steps >= t.max_steps else "max_time",
                            "train_seconds": round(train_seconds, 1), "latent_prior_seconds": round(prior_seconds, 1)}}
    if module.skipped_nonfinite:
        metrics["training"]["skipped_nonfinite"] = int(module.skipped_nonfinite)
    if cfg.evaluation.enabled:
        start = time.time()
        _seed(cfg.seed)
        metrics.update(evaluate(vae, test_set, train_set, cfg, out, objective=objective))
        metrics["training"]["evaluation_seconds"] = round(time.time() - start, 1)
    save_metrics(metrics, out / "metrics.json")
    write_report(metrics, out / "report.md", title=f"{cfg.model.name} on {cfg.dataset.name} (weighting {cfg.weighting.name}, fusion {cfg.fusion.name})")
    if len(loggers) > 1:  # the report and the figures to the extra logger, as it keeps files
        logged = log_run_files(loggers[1:], out / "report.md", [out / "loss_curves.png", *sorted((out / "figures").glob("*.png"))])
        print(f"logged {len(logged)} files to logger={cfg.logger.kind}")
        for logger in loggers[1:]:
            logger.finalize("success")
    print(f"outputs in {out}")
    return metrics


def save_model(vae, config: dict, path: str | os.PathLike) -> None:
    """Write ``model.pt``: ``{"config": <the resolved run config, plain data>, "vae": vae.state_dict()}``
    (the latent prior, once attached, is part of the state dict), atomically. Only tensors and plain
    containers, so that :func:`load_run` reads it with ``weights_only=True``."""
    atomic_torch_save({"config": config, "vae": vae.state_dict()}, path)


def load_run(checkpoint: str | os.PathLike):
    """Rebuild ``(vae, config)`` from a ``model.pt`` written by ``diffmvae-train``, a Lightning checkpoint
    of it, or a folder written by :func:`~pyro_diffmvae.pretrained.save_pretrained` (``<run>/pretrained``)."""
    from .builders import model_from_weights
    from .pretrained import from_pretrained, is_pretrained_folder

    path = Path(checkpoint)
    if path.is_dir():
        if not is_pretrained_folder(path):
            raise ValueError(f"{path} is a folder but not a pretrained model folder (config.json and "
                             "model.safetensors, written by save_pretrained / diffmvae-train's <run>/pretrained)")
        return from_pretrained(path)
    cfg, weights = _saved_config_and_weights(path)
    return model_from_weights(cfg, weights, path, "the weights of the model its stored config builds"), cfg


def run_evaluate(cfg: DictConfig, out: Path) -> dict:
    """Evaluate ``cfg.checkpoint``; ``cfg`` is the saved run's config with this call's evaluation
    settings (:func:`saved_run_config`)."""
    from .builders import build_datasets, build_objective
    from .evaluation import evaluate, save_metrics, write_report

    if cfg.checkpoint is None:
        raise ValueError("diffmvae-evaluate needs checkpoint=<run dir>/model.pt")
    _seed(cfg.seed)
    vae, _ = load_run(cfg.checkpoint)
    train_set, _, test_set = build_datasets(cfg)
    _seed(cfg.seed)  # as diffmvae-train seeds its evaluation
    start = time.time()
    metrics = evaluate(vae, test_set, train_set, cfg, out, objective=build_objective(cfg))
    metrics["evaluation_seconds"] = round(time.time() - start, 1)
    save_metrics(metrics, out / "metrics.json")
    write_report(metrics, out / "report.md", title=f"evaluation of {cfg.checkpoint}")
    print(f"outputs in {out}")
    return metrics


def run_sample(cfg: DictConfig, out: Path) -> Path:
    """Unconditional samples of ``cfg.checkpoint`` with ``cfg.sample``'s settings."""
    from .figures import figure_captions, save_unconditional_figure
    from .guidance import guidance_weight
    from .nets.hint import hint_start
    from .sampling_precision import sample_precision

    if cfg.checkpoint is None:
        raise ValueError("diffmvae-sample needs checkpoint=<run dir>/model.pt")
    _seed(cfg.seed)
    vae, _ = load_run(cfg.checkpoint)
    s = cfg.sample
    with (guidance_weight(vae, s.get("guidance")), sample_precision(vae, s.get("sample_precision")),
          hint_start(vae, s.get("hint_start"))):
        gen = vae.sample(s.num, prior=s.prior, sampler=s.sampler, steps=s.steps)
    (out / "samples").mkdir(parents=True)
    torch.save({k: v.cpu() for k, v in gen.items()}, out / "samples" / "samples.pt")
    save_unconditional_figure({s.prior: gen}, vae.names, out / "samples" / "samples.png", n=min(s.num, 16),
                              captions=figure_captions(cfg, vae.names))
    print(f"outputs in {out}")
    return out / "samples"


def _main(fn, cfg: DictConfig, setup) -> None:
    try:
        cfg, out = setup(cfg)  # every check; hydra's record of the call written only once they pass
        fn(cfg, out)
    except TrainingInterrupted as err:
        print(f"{err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except (ValueError, FileNotFoundError, FileExistsError, PermissionError, FloatingPointError) as err:
        # FloatingPointError: train.NonFiniteLossError (a NaN/inf training loss); PermissionError: an
        # unwritable run directory (its message names the path)
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def train_main(cfg: DictConfig) -> None:
    """diffmvae-train: train (or resume, trainer.resume_from=<run dir>), fit the latent prior, evaluate."""
    _main(run_train, cfg, setup=_train_setup)


@hydra.main(version_base=None, config_path="configs", config_name="config")
def evaluate_main(cfg: DictConfig) -> None:
    """diffmvae-evaluate checkpoint=...: evaluate a saved model."""
    _main(run_evaluate, cfg, setup=_saved_run_setup("evaluate"))


@hydra.main(version_base=None, config_path="configs", config_name="config")
def sample_main(cfg: DictConfig) -> None:
    """diffmvae-sample checkpoint=...: unconditional samples."""
    _main(run_sample, cfg, setup=_saved_run_setup("sample"))
