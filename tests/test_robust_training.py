"""Robust runs: exact resume, non-finite losses (stop / skip), atomic checkpoints, SIGTERM / Ctrl-C,
and reproducible metrics for the same seed (library and ``diffmvae-train``)."""

import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pyro
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyro_diffmvae.cli import resume_config, resume_paths
from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.objectives import ELBO
from pyro_diffmvae.prior import LatentMLP, LatentScorePrior
from pyro_diffmvae.training.run_log import FlushLogOnCheckpoint, RunCSVLogger
from pyro_diffmvae.train import (AtomicCheckpointIO, DiffMVAEModule, NonFiniteLossError, ResumableDataLoader,
                                 SaveOnInterrupt, make_trainer, run_checkpoints)

N_CLASSES, D_IMG, LATENT = 4, 6, 3


def paired_data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 2, (N_CLASSES, D_IMG), generator=torch.Generator().manual_seed(1)).float() * 2 - 1
    c = torch.randint(0, N_CLASSES, (n,), generator=g)
    return {"label": nn.functional.one_hot(c, N_CLASSES).float(), "img": protos[c] + 0.1 * torch.randn(n, D_IMG, generator=g)}


class DictDataset(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return self.data["img"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


class Encoder(nn.Module):
    """tanh on the input: a huge data value does not blow up the encoder (only the likelihood)."""

    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, 2 * LATENT))

    def forward(self, x):
        return self.net(torch.tanh(x)).chunk(2, -1)


class Eps(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IMG + LATENT + 1, 32), nn.SiLU(), nn.Linear(32, D_IMG))

    def forward(self, x_t, z, t):
        return self.net(torch.cat([x_t, z, t[:, None]], -1))


def diffusion_vae():
    """Subset sampling and diffusion-time draws: every step uses the global RNG."""
    torch.manual_seed(0)
    return MultimodalVAE([
        Modality("label", Encoder(N_CLASSES), FeedForwardDecoder(nn.Linear(LATENT, N_CLASSES), (N_CLASSES,), "bernoulli")),
        Modality("img", Encoder(D_IMG), DiffusionDecoder(Eps(), (D_IMG,), weighting="simple", sampler="ddim", sampler_steps=5)),
    ], LATENT, subset_strategy="sample")


def feedforward_vae():
    torch.manual_seed(0)
    return MultimodalVAE([
        Modality("label", Encoder(N_CLASSES), FeedForwardDecoder(nn.Linear(LATENT, N_CLASSES), (N_CLASSES,), "bernoulli")),
        Modality("img", Encoder(D_IMG), FeedForwardDecoder(nn.Linear(LATENT, D_IMG), (D_IMG,), "normal", scale=0.5)),
    ], LATENT, subset_strategy="sample")


def trainer(tmp, max_steps, callbacks=(), **kw):
    kw.setdefault("enable_checkpointing", any(isinstance(c, ModelCheckpoint) for c in callbacks))
    kw.setdefault("logger", False)
    return make_trainer(max_steps=max_steps, default_root_dir=str(tmp), enable_progress_bar=False,
                        enable_model_summary=False, use_distributed_sampler=False, callbacks=list(callbacks), **kw)


# ------------------------------------------------------------------------------- (a), (e) resume
DATA = paired_data(256)  # 8 batches of 32 per epoch
N_STEPS = 10  # validation every 4 steps; epochs of 8 steps


def resumable_module():
    pyro.clear_param_store()
    vae = diffusion_vae()  # seeds the initialisation
    prior = LatentScorePrior(LATENT, LatentMLP(LATENT, hidden=16, num_blocks=1))
    # the ELBO's parts every step: Lightning repeats a value logged at an earlier step in the rows
    # after it, up to the next log, which a resumed run (no earlier value) cannot repeat
    return DiffMVAEModule(vae, lr=1e-2, latent_prior=prior, ema_decay=0.9, log_parts_every=1, seed=0)


class Record(L.Callback):
    """The batches seen and the losses, step by step."""

    def __init__(self):
        self.rows = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rows.append((trainer.global_step, float(batch["img"].sum()), float(outputs["loss"])))


class StopAt(L.Callback):
    """Send a real signal to this process during step ``step`` (or during its validation), ``times`` times."""

    def __init__(self, step, signum, in_validation=False, times=1):
        self.step, self.signum, self.in_validation, self.times = step, signum, in_validation, times

    def _send(self):
        for _ in range(self.times):
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.in_validation and trainer.global_step == self.step - 1:
            self._send()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if self.in_validation and not trainer.sanity_checking and trainer.global_step == self.step:
            self._send()


def fit(tmp, max_steps, callbacks=(), ckpt_path=None, log_dir=None):
    """Train; with ``log_dir``, log every step to ``<log_dir>/logs/metrics.csv`` as diffmvae-train does
    (continued from ``ckpt_path``'s step on a resume)."""
    module = resumable_module()
    rec = Record()
    log = {}
    if log_dir is not None:
        step = None if ckpt_path is None else int(torch.load(ckpt_path, weights_only=True)["global_step"])
        log = dict(logger=RunCSVLogger(log_dir, resume_step=step), log_every_n_steps=1)
        callbacks = [*callbacks, FlushLogOnCheckpoint()]
    tr = trainer(tmp, max_steps, [rec, *callbacks], val_check_interval=4, check_val_every_n_epoch=None,
                 limit_val_batches=1, **log)
    loader = ResumableDataLoader(DictDataset(DATA), batch_size=32, seed=3)
    tr.fit(module, loader, DataLoader(DictDataset(paired_data(64, seed=1)), batch_size=32), ckpt_path=ckpt_path)
    return module, tr, rec.rows


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    module, tr, rows = fit(tmp, N_STEPS, log_dir=tmp)
    return module.state_dict(), tr.optimizers[0].state_dict(), rows, (tmp / "logs" / "metrics.csv").read_text()


def assert_same_state(state, other):
    assert state.keys() == other.keys()
    for k in state:
        assert torch.equal(state[k], other[k]), k


@pytest.mark.parametrize("stop,stop_at", [("max_steps", 5), ("sigterm", 5), ("ctrl_c", 5),  # mid-epoch
                                          ("sigterm", 4), ("sigterm_in_validation", 4),  # a validation step
                                          ("max_steps", 8), ("sigterm", 8)])  # the end of an epoch
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, uninterrupted, stop, stop_at):
    """N steps in one go == N/2 steps, stop, resume from last.ckpt to N: parameters, EMA, latent prior,
    Adam state, batches and losses are identical (RNG states and the data position are restored), and
    so is ``logs/metrics.csv``, row for row (Lightning's logger deleted the earlier rows on resume, a
    SIGTERM lost the interrupted step's row, and the rows after it were labelled a step late)."""
    full_state, full_optim, full_rows, full_log = uninterrupted
    ckpt_dir = tmp_path / "checkpoints"
    if stop == "max_steps":  # last.ckpt written by ModelCheckpoint at the end of a step
        cb = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=1)
        _, tr, rows = fit(tmp_path, stop_at, [cb], log_dir=tmp_path)
    else:  # SIGTERM (or Ctrl-C, routed the same way) during step stop_at: SaveOnInterrupt writes last.ckpt
        signum = signal.SIGINT if stop == "ctrl_c" else signal.SIGTERM
        saver = SaveOnInterrupt(ckpt_dir)
        with pytest.raises(SIGTERMException):
            fit(tmp_path, N_STEPS, [StopAt(stop_at, signum, in_validation=stop.endswith("validation")), saver],
                log_dir=tmp_path)
        assert saver.saved_path == ckpt_dir / "last.ckpt"
        assert saver.signal_name == ("SIGINT" if stop == "ctrl_c" else "SIGTERM")
        rows = None
    assert sorted(os.listdir(ckpt_dir)) == ["last.ckpt"]  # atomic writes leave no temporary file
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == stop_at
    if rows is not None:
        assert rows == full_rows[:stop_at]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers given back
    module, tr, resumed_rows = fit(tmp_path / "resumed", N_STEPS, ckpt_path=ckpt_dir / "last.ckpt", log_dir=tmp_path)
    assert tr.global_step == N_STEPS
    expected_log = full_log
    if stop == "sigterm" and stop_at % 8 == 0:  # an epoch's last step: its validation is not run (known, documented)
        lines = full_log.splitlines(keepends=True)
        val_loss = lines[0].rstrip("\n").split(",").index("val/loss")
        expected_log = "".join(row for row in lines if not (row.startswith(f"0,{stop_at - 1},")
                                                          and row.rstrip("\n").split(",")[val_loss] != ""))
        assert expected_log != full_log
    assert (tmp_path / "logs" / "metrics.csv").read_text() == expected_log
    assert resumed_rows == full_rows[stop_at:]  # same batches (data position) and losses (RNG) after the resume
    assert_same_state(full_state, module.state_dict())  # VAE, latent prior, EMA (and its n_averaged)
    assert int(module.state_dict()["ema.img.n_averaged"]) == N_STEPS  # the EMA continued, not restarted
    optim = tr.optimizers[0].state_dict()
    for k, s in full_optim["state"].items():
        for name in s:
            assert torch.equal(s[name], optim["state"][k][name]), (k, name)


def test_resume_before_the_first_validation_keeps_writing_last_ckpt(tmp_path):
    """A run stopped by SIGTERM at step 2 (before its first validation, so last.ckpt is SaveOnInterrupt's,
    not ModelCheckpoint's) and resumed with the run's own checkpoints: last.ckpt advances to the
    last validation and best.ckpt appears, with no last-v1.ckpt. Catches: Lightning's version counter,
    which saved the resumed run to last-v1.ckpt and left last.ckpt at step 2 for the next resume."""
    ckpt_dir = tmp_path / "checkpoints"
    with pytest.raises(SIGTERMException):
        fit(tmp_path, N_STEPS, [StopAt(2, signal.SIGTERM), SaveOnInterrupt(ckpt_dir)])
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 2
    _, tr, _ = fit(tmp_path, N_STEPS, [run_checkpoints(ckpt_dir)], ckpt_path=ckpt_dir / "last.ckpt")
    assert tr.global_step == N_STEPS
    assert sorted(os.listdir(ckpt_dir)) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpt_dir / "last.ckpt", weights_only=True)["global_step"] == 8  # the last validation (every 4)


def test_second_ctrl_c_aborts_without_saving(tmp_path):
    with pytest.raises(SystemExit) as info:  # Lightning turns the KeyboardInterrupt into exit status 1
        fit(tmp_path, N_STEPS, [StopAt(3, signal.SIGINT, times=2), SaveOnInterrupt(tmp_path / "checkpoints")])
    assert info.value.code == 1
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# ------------------------------------------------------------------------- (b), (c) non-finite losses
BAD = 1e30  # Normal log-density of this value overflows to -inf in float32: loglik/img = -inf


def data_with_bad_batches(bad_batches, n_batches=8, batch=16):
    data = paired_data(n_batches * batch, seed=2)
    for b in bad_batches:
        data["img"][b * batch + 3, 0] = BAD
    return data


def nonfinite_fit(tmp, data, max_steps, callbacks=(), **module_kw):
    pyro.clear_param_store()
    module = DiffMVAEModule(feedforward_vae(), lr=1e-2, seed=0, log_parts_every=0, **module_kw)
    ckpt = ModelCheckpoint(dirpath=tmp / "checkpoints", save_last=True, save_top_k=0, every_n_train_steps=1)
    tr = trainer(tmp, max_steps, [ckpt, *callbacks])
    loader = ResumableDataLoader(DictDataset(data), batch_size=16, shuffle=False)  # batch k is step k
    tr.fit(module, loader)
    return module, tr


class Snapshot(L.Callback):
    """last.ckpt's bytes and the parameters before and after the steps in ``steps``."""

    def __init__(self, steps):
        self.steps, self.ckpt, self.before, self.after = steps, {}, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx in self.steps:
            self.ckpt[batch_idx] = (Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt").read_bytes()
            self.before[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx in self.steps:
            self.after[batch_idx] = [p.detach().clone() for p in pl_module.parameters()]


def test_nonfinite_loss_stops_naming_step_and_term_and_keeps_last_checkpoint(tmp_path):
    snap = Snapshot({3})
    with pytest.raises(NonFiniteLossError) as info:
        nonfinite_fit(tmp_path, data_with_bad_batches([3]), 8, [snap])
    msg = str(info.value)
    assert "global step 3" in msg and "loglik/img=-inf" in msg, msg
    assert "loglik/label" not in msg and "kl=" not in msg, msg  # only the term that went non-finite
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.read_bytes() == snap.ckpt[3]  # no checkpoint written for the bad step
    assert torch.load(last, weights_only=True)["global_step"] == 3
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["last.ckpt"]


def nan_at_step(k):
    """An objective (the ELBO) that returns NaN at global step ``k``: the ELBO terms stay finite."""
    elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2)
    calls = []

    def objective(vae, batch):
        calls.append(1)
        loss = elbo.differentiable_loss(vae.model, vae.guide, batch)
        return loss * float("nan") if len(calls) == k + 1 else loss

    return objective


def test_objective_hook_and_a_nan_objective(tmp_path):
    data = paired_data(64)
    with pytest.raises(NonFiniteLossError, match=r"global step 2 .*all objective terms are finite"):
        nonfinite_fit(tmp_path, data, 4, objective=nan_at_step(2))
    # the hook is what is minimised: twice the ELBO doubles the logged loss against the ELBO's
    pyro.clear_param_store()
    elbo = ELBO()
    module = DiffMVAEModule(feedforward_vae(), objective=lambda vae, b: 2 * elbo.loss(vae, b))
    batch = next(iter(DataLoader(DictDataset(data), batch_size=64)))
    pyro.set_rng_seed(0)
    twice = module.loss(batch)
    pyro.set_rng_seed(0)
    torch.testing.assert_close(twice, 2 * elbo.loss(module.vae, batch) / 64)


def test_nonfinite_skip_counts_skips_and_stops_after_max(tmp_path):
    snap = Snapshot({3, 5})
    module, tr = nonfinite_fit(tmp_path / "a", data_with_bad_batches([3, 5]), 7, [snap], nonfinite="skip")
    assert module.skipped_nonfinite == 2
    assert float(tr.callback_metrics["train/skipped_nonfinite"]) == 2.0
    for k in (3, 5):  # no update for a skipped batch
        assert all(torch.equal(a, b) for a, b in zip(snap.before[k], snap.after[k]))
    assert tr.global_step == 7  # Lightning counts the skipped steps (max_steps counts batches)
    adam_steps = {int(s["step"]) for s in tr.optimizers[0].state.values()}
    assert adam_steps == {5}
    assert torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)["diffmvae_state"] == {"skipped_nonfinite": 2}
    with pytest.raises(NonFiniteLossError, match=r"2 non-finite training losses skipped \(max_nonfinite=2\).*global step 5"):
        nonfinite_fit(tmp_path / "b", data_with_bad_batches([3, 5]), 7, nonfinite="skip", max_nonfinite=2)
    with pytest.raises(ValueError, match="nonfinite must be"):
        DiffMVAEModule(feedforward_vae(), nonfinite="ignore")


# ----------------------------------------------------------------------------- (d) atomic checkpoints
def test_atomic_checkpoint_io_replaces_or_leaves_the_old_file(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    old = path.read_bytes()
    assert os.listdir(path.parent) == ["last.ckpt"]
    io.save_checkpoint({"step": torch.tensor(2)}, path)
    assert int(io.load_checkpoint(path)["step"]) == 2 and os.listdir(path.parent) == ["last.ckpt"]
    old = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):  # dies half-way through writing
        f.write(b"partial checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"step": torch.tensor(3)}, path)
    assert path.read_bytes() == old and os.listdir(path.parent) == ["last.ckpt"]
    # the trainer uses it by default
    tr = make_trainer(max_steps=1, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    assert isinstance(tr.strategy.checkpoint_io, AtomicCheckpointIO)
    assert any(isinstance(c, SaveOnInterrupt) for c in tr.callbacks)


# ------------------------------------------------------------------- resume: paths and config rules
def test_resume_paths_and_config_rules(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{run / 'checkpoints' / 'last.ckpt'} does not exist"):
        resume_paths(run)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resume_paths(tmp_path / "nowhere")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resume_paths(run) == (run, run / "checkpoints" / "last.ckpt")
    assert resume_paths(run / "checkpoints" / "last.ckpt")[0] == run
    with pytest.raises(ValueError, match="give the run directory"):
        resume_paths(run / "checkpoints" / "best.ckpt")
    (run / "model.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already finished"):
        resume_paths(run)
    stored = {"seed": 3, "model": {"latent_dim": 8}, "trainer": {"max_steps": 6, "lr": 0.1, "resume_from": None},
              "evaluation": {"enabled": True}}
    cfg = OmegaConf.create({"seed": 0, "model": {"latent_dim": 16}, "trainer": {
        "max_steps": 50, "lr": 0.5, "resume_from": str(run), "nonfinite": "stop"}, "evaluation": {"enabled": False}})
    out = resume_config(cfg, stored, ["trainer.resume_from=" + str(run), "trainer.max_steps=50", "evaluation.enabled=false"], run)
    assert out.seed == 3 and out.model.latent_dim == 8 and out.trainer.lr == 0.1  # the run's own config
    assert out.trainer.max_steps == 50 and out.evaluation.enabled is False  # allowed overrides
    assert out.trainer.nonfinite == "stop" and out.trainer.resume_from == str(run)  # new keys, the run
    for bad in ["model.latent_dim=16", "seed=1", "experiment=tiny", "trainer.batch_size=8"]:
        with pytest.raises(ValueError, match="cannot change"):
            resume_config(cfg, stored, [bad], run)


# ------------------------------------------------------------------ (e), (f) diffmvae-train end to end
def train_app(*overrides, cwd, popen=False):
    code = "import sys; from pyro_diffmvae.cli import train_main as main; sys.argv[0] = 'diffmvae-train'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", code, *overrides]
    if popen:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)


def without_timings(metrics):
    """The metrics without wall-clock times, and with each run's own classifier cache folder
    (``cls_<run>``, named in the classifiers' ``source``) written as one name: everything else must match."""
    if isinstance(metrics, dict):
        return {k: without_timings(v) for k, v in metrics.items() if not k.endswith("_seconds")}
    if isinstance(metrics, str):
        return re.sub(r"/cls_\w+/", "/cls_<run>/", metrics)
    return metrics


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    """One uninterrupted tiny run (24 steps, validation and last.ckpt every 3) and its overrides.

    Every run gets its own factor-classifier cache, so that every run trains its classifier: loading a
    cached one consumes the global RNG (``metrics.coherence.load_or_train_classifier`` builds the
    network outside its RNG fork), which shifts the evaluation's later draws."""
    root = tmp_path_factory.mktemp("cli")
    common = ["experiment=tiny", "trainer.max_steps=24", "trainer.log_parts_every=1", f"dataset.cache_dir={root}/cache"]
    res = train_app(*common, f"hydra.run.dir={root}/reference", f"evaluation.classifier_cache={root}/cls_reference", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    return root, common, json.loads((root / "reference" / "metrics.json").read_text())


def test_same_seed_same_metrics(cli_reference):
    root, common, reference = cli_reference
    res = train_app(*common, f"hydra.run.dir={root}/again", f"evaluation.classifier_cache={root}/cls_again", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((root / "again" / "metrics.json").read_text())
    assert reference["training"]["steps"] == 24 and "conditional" in reference
    assert without_timings(again) == without_timings(reference)


def test_sigterm_writes_a_resumable_checkpoint_and_resume_matches_uninterrupted(cli_reference):
    root, common, reference = cli_reference
    run = root / "interrupted"
    proc = train_app(*common, f"hydra.run.dir={run}", f"evaluation.classifier_cache={root}/cls_interrupted", cwd=root,
                     popen=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)  # the first validation (step 3) writes last.ckpt; training goes on to step 24
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "training stopped by SIGTERM" in stderr and f"diffmvae-train trainer.resume_from={run}" in stderr
    step = torch.load(last, weights_only=True)["global_step"]
    assert 3 <= step < 24 and not (run / "model.pt").exists()
    assert not [n for n in os.listdir(run / "checkpoints") if n.endswith(".tmp")]
    # the run directory is still protected, except for resuming; resuming keeps the run's config.
    # A refused call leaves every file as it was (hydra's .hydra/ record included)
    record = (run / ".hydra" / "config.yaml").read_bytes()
    res = train_app(*common, "trainer.max_steps=30", f"hydra.run.dir={run}", cwd=root)
    assert res.returncode != 0 and "already holds results" in res.stderr
    res = train_app(f"trainer.resume_from={run}", "model.latent_dim=4", f"hydra.run.dir={run}", cwd=root)
    assert res.returncode == 2 and "cannot change 'model.latent_dim'" in res.stderr, res.stderr[-3000:]
    res = train_app(f"trainer.resume_from={run}", "trainer.max_steps=2", f"hydra.run.dir={run}", cwd=root)
    assert res.returncode == 2 and f"is below the step of {last} ({step})" in res.stderr, res.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == record and not (run / ".hydra" / "resume_1").exists()
    # resuming with hydra.run.dir at the run itself: its record stays, the resume is recorded beside it
    res = train_app(f"trainer.resume_from={run}", f"hydra.run.dir={run}", cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == record
    assert f"trainer.resume_from={run}" in (run / ".hydra" / "resume_1" / "overrides.yaml").read_text()
    resumed = json.loads((run / "metrics.json").read_text())
    assert without_timings(resumed) == without_timings(reference)  # same as never interrupted
    # the training log continues from the checkpoint: the same rows, steps and values as never interrupted
    # (Lightning's logger deleted the rows before the resume and labelled the later ones a step late)
    assert (run / "logs" / "metrics.csv").read_text() == (root / "reference" / "logs" / "metrics.csv").read_text()
    res = train_app(f"trainer.resume_from={root}/reference_missing", f"hydra.run.dir={root}/resume_none", cwd=root)
    assert res.returncode == 2 and "reference_missing" in res.stderr and "does not exist" in res.stderr
