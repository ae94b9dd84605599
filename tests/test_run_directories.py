"""Settings checked before any work, overrides that cannot apply refused, run directories that a
refused call leaves as they were, and the resumed optimizer using the resumed learning rate
(issue 15: "nothing lost, nothing run that should not run")."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pyro_diffmvae.cli import resume_config, saved_run_config
from pyro_diffmvae.settings import RULES, check_settings, known_keys

CONFIG_DIR = Path(__file__).resolve().parents[1] / "pyro_diffmvae" / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def composed(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=list(overrides))


def run_app(app: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    code = f"import sys; from pyro_diffmvae.cli import {app}_main as main; sys.argv[0] = 'diffmvae-{app}'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


def snapshot(folder: Path) -> dict:
    """Every file under ``folder`` with its bytes and modification time."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------- settings
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_preset_passes_the_settings_check(experiment):
    """Catches: a preset with a value out of range, or a key the base config does not define (a
    typo in a preset would otherwise be accepted, since presets may add keys)."""
    cfg = composed(f"experiment={experiment}")
    for app in ("train", "evaluate", "sample"):
        check_settings(cfg, app)


@pytest.mark.parametrize("override,message", [
    ("trainer.max_steps=0", "trainer.max_steps=0: must be a positive integer"),
    ("trainer.batch_size=-4", "trainer.batch_size=-4: must be a positive integer"),
    ("trainer.lr=-1", "trainer.lr=-1: must be a finite number > 0"),
    ("trainer.lr=0", "trainer.lr=0: must be a finite number > 0"),
    ("trainer.ema_decay=1.5", "trainer.ema_decay=1.5: must be a number in (0, 1)"),
    ("trainer.nonfinite=ignore", "trainer.nonfinite='ignore': must be one of ['stop', 'skip']"),
    ("trainer.val_every_n_steps=true", "trainer.val_every_n_steps=True: must be a positive integer"),
    ("latent_prior.sampler=euler", "latent_prior.sampler='euler': must be a sampler name"),
    ("latent_prior.steps=0", "latent_prior.steps=0: must be a positive integer"),
    ("evaluation.sampler_steps=0", "evaluation.sampler_steps=0: must be a positive integer"),
    ("evaluation.bootstrap=1", "evaluation.bootstrap=1: must be 0 (no bootstrap) or an integer >= 2"),
    ("evaluation.protocol=full", "evaluation.protocol='full': must be a protocol name"),
    ("evaluation.loglik_examples=-1", "evaluation.loglik_examples=-1: must be an integer >= 0"),
    ("model.diffusion.sampler_steps=0", "model.diffusion.sampler_steps=0: must be a positive integer"),
    ("model.latent_dim=0", "model.latent_dim=0: must be a positive integer"),
    ("trainer.kl_warmup_steps=-5", "trainer.kl_warmup_steps=-5: must be an integer >= 0"),
    ("model.diffusion.cond_dropout=1.0", "model.diffusion.cond_dropout=1.0: must be a probability in [0, 1)"),
    ("model.diffusion.guidance=-2", "model.diffusion.guidance=-2: must be a finite number >= 0"),
    ("evaluation.guidance=-1", "evaluation.guidance=-1: must be a finite number >= 0 or null"),
    ("evaluation.sample_precision=fp16", "evaluation.sample_precision='fp16': must be one of ['fp32', 'bf16']"),
    ("sample.sample_precision=bfloat16", "sample.sample_precision='bfloat16': must be one of ['fp32', 'bf16']"),
    ("evaluation.hint_start=0", "evaluation.hint_start=0: must be a time in (0, 1] or null (off)"),
    ("sample.hint_start=1.5", "sample.hint_start=1.5: must be a time in (0, 1] or null (off)"),
    ("trainer.max_time=600", 'trainer.max_time=600: must be null or a positive duration "DD:HH:MM:SS"'),
    ("trainer.max_time=00:00:00:00", "trainer.max_time='00:00:00:00': must be null or a positive duration"),
    ("+trainer.max_stepz=3", "trainer.max_stepz: unknown setting (did you mean trainer.max_steps?)"),
    ("+evaluation.num_exampels=3", "evaluation.num_exampels: unknown setting (did you mean evaluation.num_examples?)"),
    ("+sede=3", "sede: unknown setting (did you mean seed?)"),
])
def test_bad_settings_are_named_before_anything_runs(override, message):
    """Catches: a setting that is only found bad where it is read (``evaluation.sampler_steps=0``
    after training), one never checked (``max_steps=0`` trains nothing and "finishes"), and a
    misspelled key appended with ``+`` being accepted."""
    cfg = composed("experiment=tiny", override)
    app = "sample" if override.startswith("sample.") else "train"
    with pytest.raises(ValueError, match="nothing was run") as err:
        check_settings(cfg, app)
    assert message in str(err.value)


def test_every_problem_is_listed_at_once_and_sample_settings_are_checked_by_sample():
    """Catches: a check that stops at the first problem (the user fixes one key per run), and an
    app that checks settings it does not read (``sample.*`` in train) or misses its own."""
    cfg = composed("experiment=tiny", "trainer.max_steps=0", "evaluation.batch_size=0", "sample.num=0")
    with pytest.raises(ValueError) as err:
        check_settings(cfg, "train")
    assert "trainer.max_steps=0" in str(err.value) and "evaluation.batch_size=0" in str(err.value)
    assert "sample.num" not in str(err.value)
    with pytest.raises(ValueError, match=r"sample.num=0: must be a positive integer"):
        check_settings(cfg, "sample")
    check_settings(composed("experiment=tiny"), "train")  # the defaults pass


def test_evaluation_guidance_without_conditioning_dropout_is_refused_before_training():
    """Catches: ``evaluation.guidance=2`` on a model trained without dropout passing the checks and failing
    only in the evaluation after the whole training (the decoder has no null latent to guide with)."""
    base = ("experiment=tiny", "model=diffmvae_star_v")
    with pytest.raises(ValueError, match=r"evaluation.guidance=2.0: needs a model trained with model.diffusion.cond_dropout > 0"):
        check_settings(composed(*base, "evaluation.guidance=2.0"), "train")
    check_settings(composed(*base, "evaluation.guidance=2.0", "model.diffusion.cond_dropout=0.1"), "train")
    check_settings(composed(*base, "evaluation.guidance=1.0"), "train")  # w = 1 is the plain decoder
    check_settings(composed(*base, "evaluation.guidance=2.0", "evaluation.enabled=false"), "train")  # no evaluation
    check_settings(composed("experiment=celebamask_hq_diffmvae_star_v_guided_cpu"), "train")


def test_every_rule_names_a_key_of_the_base_config():
    """Catches: a rule for a key that was renamed (it would silently check nothing)."""
    cfg = composed("model=mld", "experiment=tiny")  # the two-stage keys exist only for two-stage models
    known = known_keys()
    for key in RULES:
        section, rest = key.split(".", 1)
        if section in known:
            assert rest.split(".")[0] in known[section], key
        else:
            assert OmegaConf.select(cfg, key, default="<missing>") != "<missing>", key


# -------------------------------------------------------------------- overrides that cannot apply
def test_resume_refuses_the_batch_size_and_ema_and_applies_the_rest():
    stored = {"seed": 3, "model": {"latent_dim": 8}, "trainer": {"max_steps": 6, "lr": 0.1, "ema_decay": None,
                                                                  "batch_size": 4, "resume_from": None},
              "evaluation": {"enabled": True}}
    cfg = OmegaConf.create({"seed": 0, "model": {"latent_dim": 16}, "trainer": {
        "max_steps": 50, "lr": 0.5, "ema_decay": 0.99, "batch_size": 8, "resume_from": "run"},
        "evaluation": {"enabled": False}})
    out = resume_config(cfg, stored, ["trainer.lr=0.5"], Path("run"))
    assert out.trainer.lr == 0.5 and out.trainer.batch_size == 4
    for bad in ["trainer.ema_decay=0.99", "trainer.batch_size=8"]:
        with pytest.raises(ValueError, match=f"cannot change '{bad.split('=')[0]}' when resuming"):
            resume_config(cfg, stored, [bad], Path("run"))


def test_evaluate_keeps_the_runs_own_evaluation_settings_and_refuses_model_overrides():
    """Catches: ``diffmvae-evaluate`` replacing the run's evaluation settings by the defaults (a
    preset's protocol or sizes lost), and ``model=...`` / ``model.latent_dim=...`` / ``experiment=...``
    being accepted and ignored (the model is rebuilt from the stored config)."""
    stored = OmegaConf.create({"seed": 3, "model": {"latent_dim": 8}, "dataset": {"root": "a", "cache_dir": "c"},
                               "evaluation": {"protocol": "quick", "num_unconditional": 8}})
    overrides = ["checkpoint=run/model.pt", "evaluation.batch_size=5", "seed=7", "dataset.cache_dir=d"]
    call = composed(*overrides)
    cfg = saved_run_config(call, stored, overrides, "evaluate")
    assert cfg.evaluation.protocol == "quick" and cfg.evaluation.num_unconditional == 8  # the run's own
    assert cfg.evaluation.batch_size == 5 and cfg.seed == 7 and cfg.dataset.cache_dir == "d"  # this call's
    assert cfg.evaluation.bootstrap == call.evaluation.bootstrap  # a key added since the run: the default
    assert cfg.model.latent_dim == 8 and cfg.checkpoint == "run/model.pt"
    for bad in ["model=mopoe", "model.latent_dim=64", "experiment=tiny", "trainer.lr=1", "~evaluation.bootstrap"]:
        with pytest.raises(ValueError, match=r"cannot change .* in diffmvae-evaluate: the model is rebuilt"):
            saved_run_config(call, stored, [bad], "evaluate")
    with pytest.raises(ValueError, match="cannot change 'evaluation.batch_size' in diffmvae-sample"):
        saved_run_config(call, stored, ["evaluation.batch_size=5"], "sample")


# ------------------------------------------------------------------------ the apps end to end
def test_refused_and_empty_runs_write_nothing(tmp_path):
    """Catches: hydra writing ``.hydra/`` (or a job log) into a directory before the app refuses it,
    a run that would train nothing (no full batch with drop_last) finishing with exit 0, and
    ``diffmvae-evaluate`` accepting model overrides it would ignore."""
    common = ["experiment=tiny", f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls",
              "evaluation.enabled=false", "latent_prior.fit=false"]
    run = tmp_path / "run"
    res = run_app("train", *common, f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert OmegaConf.load(run / ".hydra" / "config.yaml").trainer.max_steps == 6  # the apps' own record
    assert not list(run.glob("*.log"))
    before = snapshot(run)
    res = run_app("train", *common, "trainer.max_steps=3", f"hydra.run.dir={run}", cwd=tmp_path)
    assert res.returncode == 2 and "already holds results" in res.stderr
    assert snapshot(run) == before  # not even .hydra/config.yaml was rewritten
    for bad, message, written in [
            ("+trainer.max_stepz=3", "trainer.max_stepz: unknown setting", set()),
            ("trainer.max_steps=0", "trainer.max_steps=0: must be a positive integer", set()),
            # found once the data is built: only the call's record is there, no result
            ("trainer.batch_size=512", "larger than the training set (256 examples", {".hydra"})]:
        empty = tmp_path / f"empty_{len(os.listdir(tmp_path))}"
        res = run_app("train", *common, bad, f"hydra.run.dir={empty}", cwd=tmp_path)
        assert res.returncode == 2 and message in res.stderr, res.stderr[-2000:]
        assert {p.parts[0] for p in snapshot(empty)} == written if empty.exists() else not written
    res = run_app("evaluate", f"checkpoint={run}/model.pt", "model=mopoe", "model.latent_dim=64",
                  f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert res.returncode == 2 and "cannot change 'model'" in res.stderr
    assert snapshot(run) == before


def test_max_time_ends_training_first_and_the_metrics_say_so(tmp_path):
    """Catches: ``trainer.max_time`` not passed to Lightning (the run trains all 100,000 steps, or
    the test times out), and a run stopped by time reported as if it had reached max_steps."""
    import json

    res = run_app("train", "experiment=tiny", "trainer.max_steps=100000", "trainer.max_time=00:00:00:03",
                  "evaluation.enabled=false", "latent_prior.fit=false", f"dataset.cache_dir={tmp_path}/cache",
                  f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    training = json.loads((tmp_path / "run" / "metrics.json").read_text())["training"]
    assert 0 < training["steps"] < 100000 and training["stopped_by"] == "max_time"
    assert training["max_time"] == "00:00:00:03" and training["train_seconds"] < 60


# ----------------------------------------------------------------- the resumed learning rate
def test_a_resumed_run_trains_with_the_resumed_learning_rate(tmp_path):
    """Catches: Lightning restoring the optimizer's old learning rate over ``trainer.lr`` given to
    the resume (recorded in model.pt, not used): the checkpoint written after the resume must hold
    the new rate, and one step of Adam must move the weights by about that rate."""
    import lightning as L
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from pyro_diffmvae.training.module import DiffMVAEModule  # noqa: F401  (the hook under test)

    class Tiny(L.LightningModule):
        """The hook of DiffMVAEModule on the smallest module that has one: borrowed, not copied."""

        on_train_start = DiffMVAEModule.on_train_start
        on_train_batch_start = DiffMVAEModule.on_train_batch_start

        def __init__(self, lr):
            super().__init__()
            self.lr, self.weight_decay = lr, 0.0
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, idx):
            return (self.w - 1.0).pow(2).sum()

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr)

    data = DataLoader(TensorDataset(torch.zeros(8, 1)), batch_size=1)
    kw = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    first = L.Trainer(max_steps=2, **kw)
    first.fit(Tiny(lr=0.1), data)
    first.save_checkpoint(tmp_path / "a.ckpt")
    w_before = first.lightning_module.w.item()
    resumed_module = Tiny(lr=0.001)
    second = L.Trainer(max_steps=3, **kw)
    second.fit(resumed_module, data, ckpt_path=tmp_path / "a.ckpt")
    assert second.optimizers[0].param_groups[0]["lr"] == 0.001
    # Adam's step is about lr in size (the gradient's sign is constant here): 0.001, not 0.1
    assert abs(resumed_module.w.item() - w_before) == pytest.approx(0.001, rel=0.05)
