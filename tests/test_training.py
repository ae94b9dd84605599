"""Learning on tiny synthetic data: SVI and Lightning raise the ELBO; cross-modal generation
beats chance; the latent score prior recovers a 2-D Gaussian mixture."""

import math

import lightning as L
import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE
from pyro_diffmvae.prior import LatentMLP, LatentScorePrior, collect_latents
from pyro_diffmvae.train import DiffMVAEModule, fit_svi, make_trainer

N_CLASSES, D_IMG, LATENT = 4, 8, 4


def paired_data(n, seed=0):
    """A 'label' (one-hot, Bernoulli) and an 8-d 'image' = class prototype (±1) + N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randint(0, 2, (N_CLASSES, D_IMG), generator=torch.Generator().manual_seed(123)).float() * 2 - 1
    c = torch.randint(0, N_CLASSES, (n,), generator=g)
    img = protos[c] + 0.1 * torch.randn(n, D_IMG, generator=g)
    return {"label": nn.functional.one_hot(c, N_CLASSES).float(), "img": img}, c, protos


class Eps(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D_IMG + LATENT + 16, 128), nn.SiLU(), nn.Linear(128, 128), nn.SiLU(), nn.Linear(128, D_IMG))

    def forward(self, x_t, z, t):
        freqs = torch.arange(1, 9, dtype=t.dtype, device=t.device)
        temb = torch.cat([torch.sin(math.pi * freqs * t[:, None]), torch.cos(math.pi * freqs * t[:, None])], -1)
        return self.net(torch.cat([x_t, z, temb], -1))


class Encoder(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 64), nn.SiLU(), nn.Linear(64, 2 * LATENT))

    def forward(self, x):
        return self.net(x).chunk(2, -1)


def make_vae(strategy="sample"):
    torch.manual_seed(0)
    return MultimodalVAE(
        [
            Modality("label", Encoder(N_CLASSES), FeedForwardDecoder(nn.Linear(LATENT, N_CLASSES), (N_CLASSES,), "bernoulli")),
            Modality("img", Encoder(D_IMG), DiffusionDecoder(Eps(), (D_IMG,), weighting="simple", sampler="ddim", sampler_steps=50)),
        ],
        LATENT,
        subset_strategy=strategy,
        beta=0.5,
    )


def batches(data, size, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = data["img"].shape[0]
    for _ in range(steps):
        idx = torch.randint(0, n, (size,), generator=g)
        yield {k: v[idx] for k, v in data.items()}


def test_svi_learns_and_cross_modal_generation_beats_chance():
    pyro.clear_param_store()
    data, c, protos = paired_data(2048)
    vae = make_vae()
    losses = fit_svi(vae, list(batches(data, 128, 400)), steps=400, lr=3e-3)
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < first - 2.5, (first, last)  # the ELBO per example rises by more than 2.5 nats (5.5 -> 2.1 seen)
    # label -> image: classify generated images by the nearest prototype; chance is 1/4
    test, c_test, _ = paired_data(400, seed=1)
    gen = vae.generate(test, given=["label"], use_mean=True)["img"]
    pred = torch.cdist(gen, protos).argmin(-1)
    acc = (pred == c_test).float().mean().item()
    assert acc > 0.6, acc
    # image -> label
    lab = vae.generate(test, given=["img"], use_mean=True)["label"].argmax(-1)
    assert (lab == c_test).float().mean().item() > 0.6


class DictDataset(Dataset):
    def __init__(self, data):
        self.data = data

    def __len__(self):
        return self.data["img"].shape[0]

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.data.items()}


def test_lightning_module_trains_with_prior_alongside(tmp_path):
    pyro.clear_param_store()
    data, _, _ = paired_data(1024)
    vae = make_vae("enumerate")
    prior = LatentScorePrior(LATENT, LatentMLP(LATENT, hidden=64, num_blocks=1))
    module = DiffMVAEModule(vae, lr=3e-3, latent_prior=prior, log_parts_every=10)
    loader = DataLoader(DictDataset(data), batch_size=128, shuffle=True)
    before = module.negative_elbo(next(iter(loader))).item()
    trainer = make_trainer(max_steps=120, default_root_dir=str(tmp_path), enable_progress_bar=False,
                           enable_checkpointing=False, logger=False, limit_val_batches=2)
    trainer.fit(module, loader, val_dataloaders=DataLoader(DictDataset(data), batch_size=256))
    after = module.negative_elbo(next(iter(loader))).item()
    assert after < before - 3.0, (before, after)
    metrics = trainer.callback_metrics
    for key in ["train/loss", "train/prior_loss", "val/elbo", "val/kl", "val/loglik/img", "val/loglik/label"]:
        assert key in metrics and math.isfinite(float(metrics[key])), key


def test_latent_score_prior_recovers_gaussian_mixture():
    torch.manual_seed(0)
    means = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]])
    covs = torch.stack([torch.tensor([[0.3, 0.1], [0.1, 0.2]]), torch.tensor([[0.2, -0.05], [-0.05, 0.4]]), 0.25 * torch.eye(2)])
    weights = torch.tensor([0.5, 0.3, 0.2])
    n = 20_000
    comp = torch.multinomial(weights, n, replacement=True)
    x = means[comp] + (torch.linalg.cholesky(covs)[comp] @ torch.randn(n, 2, 1)).squeeze(-1)
    prior = LatentScorePrior(2, LatentMLP(2, hidden=128, num_blocks=2), sampler="sde", sampler_steps=150)
    prior.fit(x, steps=600, batch_size=512, lr=3e-3)
    z = prior.sample(4000)
    k = torch.cdist(z, means).argmin(-1)
    for j in range(3):
        zj = z[k == j]
        assert abs(len(zj) / len(z) - weights[j].item()) < 0.05
        torch.testing.assert_close(zj.mean(0), means[j], atol=0.15, rtol=0)
        torch.testing.assert_close(torch.cov(zj.T), covs[j], atol=0.12, rtol=0)


def test_collect_latents_and_score_prior_sampling_through_vae():
    data, _, _ = paired_data(64)
    vae = make_vae()
    z = collect_latents(vae, batches(data, 32, 2), samples_per_example=2)
    assert z.shape == (128, LATENT)
    prior = LatentScorePrior(LATENT, LatentMLP(LATENT, hidden=32, num_blocks=1), sampler_steps=5)
    prior.fit(z, steps=3)
    vae.latent_prior = prior
    out = vae.sample(3, prior="score", steps=5)
    assert out["img"].shape == (3, D_IMG) and out["label"].shape == (3, N_CLASSES)
    with pytest.raises(ValueError, match=r"latents must have shape \(N, 4\)"):
        prior.fit(torch.zeros(5, 3), steps=1)


def test_ema_of_diffusion_decoders_is_copied_in_at_the_end(tmp_path):
    pyro.clear_param_store()
    data, _, _ = paired_data(256)
    vae = make_vae()
    module = DiffMVAEModule(vae, lr=1e-2, ema_decay=0.5)
    assert set(module.ema) == {"img"}
    net = vae.modalities["img"].decoder.eps_net
    snapshots = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            snapshots.append([p.detach().clone() for p in net.parameters()])

    trainer = make_trainer(max_steps=3, default_root_dir=str(tmp_path), enable_progress_bar=False,
                           enable_checkpointing=False, logger=False, callbacks=[Record()])
    trainer.fit(module, DataLoader(DictDataset(data), batch_size=64))
    # EMA with decay 0.5 over the three post-step weights w1, w2, w3: 0.25 w1 + 0.25 w2 + 0.5 w3
    # (the first update copies w1)
    expected = [0.25 * a + 0.25 * b + 0.5 * c for a, b, c in zip(*snapshots)]
    for p, e in zip(net.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        DiffMVAEModule(make_vae(), ema_decay=1.5)


def test_latent_prior_ema_copies_the_running_average_into_the_network():
    """With ema_decay, the fitted weights are the EMA of the iterates: check it against a hand-kept
    average w <- d*w + (1-d)*p of the same training run (same seed, same draws)."""
    from pyro_diffmvae.prior import LatentMLP, LatentScorePrior

    latents = torch.randn(64, 3)
    torch.manual_seed(1)
    plain = LatentScorePrior(3, LatentMLP(3, hidden=8, num_blocks=1))
    init = [p.detach().clone() for p in plain.eps_net.parameters()]
    avg = None
    d = 0.9

    def track(step, loss):
        nonlocal avg
        params = [p.detach().clone() for p in plain.eps_net.parameters()]
        avg = params if avg is None else [d * a + (1 - d) * p for a, p in zip(avg, params)]

    torch.manual_seed(2)
    plain.fit(latents, steps=5, batch_size=16, callback=track)
    torch.manual_seed(1)
    ema = LatentScorePrior(3, LatentMLP(3, hidden=8, num_blocks=1))
    assert all(torch.equal(p, q) for p, q in zip(ema.eps_net.parameters(), init))
    torch.manual_seed(2)
    ema.fit(latents, steps=5, batch_size=16, ema_decay=d)
    for p, a in zip(ema.eps_net.parameters(), avg):
        torch.testing.assert_close(p, a)
    with pytest.raises(ValueError, match="ema_decay"):
        ema.fit(latents, steps=1, ema_decay=1.5)
