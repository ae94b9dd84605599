"""Training: a Lightning module around Pyro's ELBO, and a plain SVI loop for notebooks.

The Lightning module follows Pyro's own ``svi_lightning`` example: ``training_step`` returns
``elbo.differentiable_loss(model, guide, batch)`` (divided by the batch size, so the logged loss
is the negative ELBO per example) and Lightning does devices, precision, clipping, checkpoints
and progress bars. The parts of the ELBO (per-modality log-likelihoods, KL) are logged every
``log_parts_every`` steps from one extra forward pass without gradients.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import lightning as L
import pyro
import torch
from pyro.infer import SVI, TraceMeanField_ELBO

from .model import MultimodalVAE, elbo_terms
from .prior import LatentScorePrior

__all__ = ["DiffMVAEModule", "make_trainer", "fit_svi"]


def _batch_size(vae: MultimodalVAE, batch: Mapping) -> int:
    """The leading size of the batch's first modality (the model and guide validate the batch)."""
    for name in vae.names:
        if name in batch:
            return int(batch[name].shape[0])
    return vae.parse_batch(batch)[2]  # raises the clear error


class DiffMVAEModule(L.LightningModule):
    """Lightning module that trains a :class:`MultimodalVAE` with ``TraceMeanField_ELBO``.

    :param vae: the model.
    :param lr, weight_decay, betas: Adam settings.
    :param num_particles: ELBO particles (vectorised draws are not used: diffusion decoders
        already draw (t, ε) per example).
    :param latent_prior: an optional :class:`LatentScorePrior` trained *alongside* the VAE on
        detached z ~ q(z | all observed modalities) (its loss is added; gradients stay apart).
    :param log_parts_every: log the ELBO's parts every this many steps (0: never).
    :param ema_decay: keep an exponential moving average (``torch.optim.swa_utils``) of the
        diffusion decoders' ε-networks with this decay, and copy it into the decoders when
        training ends, so that sampling uses the averaged weights (``None``: no EMA).
    """

    def __init__(
        self,
        vae: MultimodalVAE,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        num_particles: int = 1,
        latent_prior: LatentScorePrior | None = None,
        log_parts_every: int = 50,
        ema_decay: float | None = None,
    ):
        super().__init__()
        self.vae = vae
        self.latent_prior = latent_prior
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.log_parts_every = log_parts_every
        self.elbo = TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=2)
        self.ema_decay = ema_decay
        self.ema = None
        if ema_decay is not None:
            if not 0.0 < ema_decay < 1.0:
                raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = torch.nn.ModuleDict({
                name: AveragedModel(m.decoder.eps_net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
                for name, m in vae.modalities.items() if m.is_diffusion
            })

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.ema is not None:
            for name, averaged in self.ema.items():
                averaged.update_parameters(self.vae.modalities[name].decoder.eps_net)

    def on_train_end(self):
        """Copy the EMA weights into the diffusion decoders (sampling then uses them)."""
        if self.ema is not None:
            with torch.no_grad():
                for name, averaged in self.ema.items():
                    net = self.vae.modalities[name].decoder.eps_net
                    for p, q in zip(net.parameters(), averaged.module.parameters()):
                        p.copy_(q)

    def negative_elbo(self, batch: Mapping) -> torch.Tensor:
        """−ELBO per example (the quantity minimised)."""
        return self.elbo.differentiable_loss(self.vae.model, self.vae.guide, batch) / _batch_size(self.vae, batch)

    def training_step(self, batch, batch_idx):
        loss = self.negative_elbo(batch)
        B = _batch_size(self.vae, batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=B)
        if self.latent_prior is not None:
            with torch.no_grad():
                z0 = self.vae.posterior(batch).sample()
            prior_loss = self.latent_prior.loss(z0)
            self.log("train/prior_loss", prior_loss, prog_bar=True, batch_size=B)
            loss = loss + prior_loss
        if self.log_parts_every and self.global_step % self.log_parts_every == 0:
            with torch.no_grad():
                for key, value in elbo_terms(self.vae, batch).items():
                    self.log(f"train/{key}", value, batch_size=B)
        return loss

    def validation_step(self, batch, batch_idx):
        B = _batch_size(self.vae, batch)
        with torch.no_grad():
            terms = elbo_terms(self.vae, batch)
        for key, value in terms.items():
            self.log(f"val/{key}", value, batch_size=B, prog_bar=(key == "elbo"))
        self.log("val/loss", -terms["elbo"], batch_size=B)
        return -terms["elbo"]

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas, weight_decay=self.weight_decay)


def make_trainer(
    max_steps: int = 1000,
    accelerator: str = "auto",
    devices="auto",
    gradient_clip_val: float | None = 1.0,
    precision="32-true",
    default_root_dir: str | None = None,
    log_every_n_steps: int = 10,
    enable_progress_bar: bool = True,
    **kwargs,
) -> L.Trainer:
    """A Lightning trainer with this project's defaults (CPU-friendly; GPU when there is one)."""
    return L.Trainer(
        max_steps=max_steps,
        accelerator=accelerator,
        devices=devices,
        gradient_clip_val=gradient_clip_val,
        precision=precision,
        default_root_dir=default_root_dir,
        log_every_n_steps=log_every_n_steps,
        enable_progress_bar=enable_progress_bar,
        **kwargs,
    )


def fit_svi(
    vae: MultimodalVAE,
    batches: Iterable[Mapping],
    steps: int,
    lr: float = 1e-3,
    clip_norm: float | None = 10.0,
    num_particles: int = 1,
    callback=None,
) -> list[float]:
    """Train with a plain ``pyro.infer.SVI`` loop (``ClippedAdam``); returns −ELBO per example per step.

    ``batches`` is cycled until ``steps`` steps are done.
    """
    optim_args = {"lr": lr}
    if clip_norm is not None:
        optim_args["clip_norm"] = clip_norm
    svi = SVI(vae.model, vae.guide, pyro.optim.ClippedAdam(optim_args), TraceMeanField_ELBO(num_particles=num_particles, max_plate_nesting=2))
    losses: list[float] = []
    while len(losses) < steps:
        progressed = False
        for batch in batches:
            progressed = True
            losses.append(svi.step(batch) / _batch_size(vae, batch))
            if callback is not None:
                callback(len(losses), losses[-1])
            if len(losses) >= steps:
                break
        if not progressed:
            raise ValueError("fit_svi: no batches")
    return losses
