"""Two-process DDP on CPU (gloo) with Lightning: per-rank seeding, data sharding, gradient averaging,
identical parameters across ranks, and a joint decision on a non-finite loss.

The training runs in a subprocess (this file run as a script; Lightning's ``strategy="ddp"`` starts
the second process by running the script again), so that a hang cannot block the test session.

**Why the gradient comparison is exact.** DDP all-reduces the gradients of each rank's loss, which
:class:`DiffMVAEModule` makes the *mean* over that rank's batch; with equal per-rank batches the
average of the two per-rank means is the mean over the union batch, so one DDP step must equal one
single-process step on the union batch. That only holds draw for draw if the objective has no
sampling noise (the two set-ups draw differently: each rank seeds ``seed + rank``). So the test uses
the ``objective`` hook with a noise-free objective: feed-forward decoders (no diffusion-time draws),
``subset_strategy="enumerate"`` (every subset, no subset draws) and the guide's ``z`` replaced by its
mean (the Normal KL stays analytic). The comparison is then exact up to float rounding.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pyro
import pytest
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import nn

from pyro_diffmvae.modality import FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.train import DiffMVAEModule, ResumableDataLoader, make_trainer

SEED, LR, LATENT, N_CLASSES, D_IMG = 7, 1e-2, 3, 4, 6
BATCH, STEPS, NAN_RANK, NAN_STEP = 8, 4, 1, 2


class MeanZ(Messenger):
    """Use the mean of every latent (unobserved) sample site instead of a draw (plates aside)."""

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["value"] is None and not site_is_subsample(msg):
            msg["value"] = msg["fn"].mean


class NoiseFreeObjective:
    """−ELBO at z = E_q[z] (``TraceMeanField_ELBO``: analytic KL), NaN on rank ``NAN_RANK`` at step ``NAN_STEP``."""

    def __init__(self):
        self.elbo = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2)
        self.calls = 0

    def __call__(self, vae, batch):
        loss = self.elbo.differentiable_loss(vae.model, MeanZ()(vae.guide), batch)
        step, self.calls = self.calls, self.calls + 1
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        return loss * float("nan") if (rank, step) == (NAN_RANK, NAN_STEP) else loss


def make_vae():
    torch.manual_seed(0)
    enc = lambda d: nn.Sequential(nn.Linear(d, 16), nn.SiLU(), nn.Linear(16, 2 * LATENT))  # noqa: E731

    class Encoder(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.net = enc(d)

        def forward(self, x):
            return self.net(x).chunk(2, -1)

    return MultimodalVAE([
        Modality("label", Encoder(N_CLASSES), FeedForwardDecoder(nn.Linear(LATENT, N_CLASSES), (N_CLASSES,), "bernoulli")),
        Modality("img", Encoder(D_IMG), FeedForwardDecoder(nn.Linear(LATENT, D_IMG), (D_IMG,), "normal", scale=0.5)),
    ], LATENT, subset_strategy="enumerate")


class Data(torch.utils.data.Dataset):
    def __init__(self, n=64):
        g = torch.Generator().manual_seed(0)
        c = torch.randint(0, N_CLASSES, (n,), generator=g)
        self.label = nn.functional.one_hot(c, N_CLASSES).float()
        self.img = torch.randn(N_CLASSES, D_IMG, generator=g)[c] + 0.1 * torch.randn(n, D_IMG, generator=g)

    def __len__(self):
        return len(self.img)

    def __getitem__(self, i):
        return {"label": self.label[i], "img": self.img[i], "meta": i}  # "meta": the example's index


def module():
    pyro.clear_param_store()
    return DiffMVAEModule(make_vae(), lr=LR, objective=NoiseFreeObjective(), seed=SEED, nonfinite="skip", log_parts_every=0)


class Record(L.Callback):
    """Each rank writes what it saw to ``<out>/rank<r>.pt``."""

    def __init__(self, out):
        self.out, self.rec = Path(out), {"batches": []}

    def params(self, pl_module):
        return {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_start(self, trainer, pl_module):
        self.rec["rng"] = torch.get_rng_state()  # after setup(): seeded with SEED + rank
        self.rec["init"] = self.params(pl_module)
        self.rec["world_size"] = trainer.world_size

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rec["batches"].append(batch)

    def on_after_backward(self, trainer, pl_module):
        if trainer.global_step == 0:  # DDP has all-reduced (averaged) the gradients by now
            self.rec["grads"] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 1:
            self.rec["after_first_step"] = self.params(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.rec["final"] = self.params(pl_module)
        self.rec["skipped_nonfinite"] = pl_module.skipped_nonfinite
        torch.save(self.rec, self.out / f"rank{trainer.global_rank}.pt")


def ddp_main(out):
    trainer = make_trainer(max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", gradient_clip_val=None,
                           logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                           use_distributed_sampler=False, callbacks=[Record(out)])
    trainer.fit(module(), ResumableDataLoader(Data(), batch_size=BATCH, seed=1))


def test_ddp_two_processes_average_gradients_and_stay_in_sync(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=Path(__file__).parents[1], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    # each rank seeds seed + rank: independent and reproducible draws
    for r, rec in enumerate((r0, r1)):
        torch.manual_seed(SEED + r)
        assert torch.equal(rec["rng"], torch.get_rng_state())
    # disjoint shares of the data, in an order that depends on the seed only
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        assert not set(b0["meta"].tolist()) & set(b1["meta"].tolist())
    # the first step: the DDP gradient == the single-process gradient of the union batch's mean loss
    union = {k: torch.cat([r0["batches"][0][k], r1["batches"][0][k]]) for k in ("label", "img")}
    single = module()
    single.load_state_dict({**single.state_dict(), **r0["init"]})
    loss = single.loss(union)
    loss.backward()
    params = dict(single.named_parameters())
    assert r0["grads"].keys() == r1["grads"].keys() == {n for n, p in params.items() if p.grad is not None}
    for name, grad in r0["grads"].items():
        assert torch.equal(grad, r1["grads"][name]), name
        torch.testing.assert_close(grad, params[name].grad, rtol=1e-5, atol=1e-7, msg=name)
    # ... and so is the update (Adam, no clipping)
    opt = torch.optim.Adam([p for p in single.parameters() if p.requires_grad], lr=LR)
    opt.step()
    for name, value in r0["after_first_step"].items():
        torch.testing.assert_close(value, params[name].detach(), rtol=1e-5, atol=1e-6, msg=name)
    # a NaN loss on one rank only: both ranks skip that step together (and do not hang)
    assert r0["skipped_nonfinite"] == r1["skipped_nonfinite"] == 1
    # the ranks end with identical parameters
    for name, value in r0["final"].items():
        assert torch.equal(value, r1["final"][name]), name
    assert not all(torch.equal(v, r0["init"][n]) for n, v in r0["final"].items())


def test_diffmvae_train_with_the_ddp_preset(tmp_path):
    """``diffmvae-train trainer=ddp`` (Lightning starts rank 1 with the same hydra run dir): rank 0
    checkpoints with both ranks' RNG states, then fits the prior and evaluates alone."""
    script = Path(sys.executable).parent / "diffmvae-train"
    if not script.exists():
        pytest.skip("the diffmvae-train console script is not installed next to this Python")
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    run = tmp_path / "run"
    res = subprocess.run([str(script), "experiment=tiny", "trainer=ddp", f"hydra.run.dir={run}",
                          f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    assert json.loads((run / "metrics.json").read_text())["training"]["steps"] == 6
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["diffmvae_config"]["trainer"]["strategy"] == "ddp"
    rng = ckpt["diffmvae_rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


if __name__ == "__main__":  # the DDP training of the test (rank 0, and rank 1 started by Lightning)
    ddp_main(sys.argv[1])
