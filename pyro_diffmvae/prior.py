r"""The auxiliary latent score prior for unconditional generation.

A VAE trained with the subset ELBO leaves "holes" in latent space: the aggregate posterior
:math:`q(z) = \mathbb E_{p_{\mathrm{data}}}[q(z\mid x_{\mathrm{all}})]` is not :math:`\mathcal N(0, I)`.
The paper fits an auxiliary latent diffusion model to :math:`z_0\sim q(z\mid x_{\mathrm{all}})` (full
PoE) with the unweighted ε-MSE (Ho et al. 2020),

.. math:: \mathcal L(\phi) = \mathbb E_{t\sim U[\epsilon,T],\,\epsilon}\,
          \|\hat\epsilon_\phi(\alpha_t z_0 + \sigma_t\epsilon, t) - \epsilon\|^2 ,

and samples :math:`z` by the reverse SDE (``torchsde``) or DDIM before decoding. The loss is
``-ScoreMatchingLikelihood(..., weighting="simple").log_prob(z0)`` up to the factor
:math:`\tfrac12(T-\epsilon)`, so the same code scores decoders and the prior.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from . import samplers as _samplers
from .likelihoods import ScoreMatchingLikelihood
from .metrics.ode_likelihood import ode_log_likelihood
from .nets.unet import ConditionalUNet
from .sde import VPSDE

__all__ = ["LatentScorePrior", "LatentMLP", "LatentUNet", "collect_latents", "sinusoidal_embedding"]


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of times ``t (n,)`` → ``(n, 2 * (dim // 2))``: ``[sin(1000 t ω_k), cos(1000 t ω_k)]``
    at the geometric frequencies ``ω_k = 10000^(-k / (dim // 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
    args = 1000.0 * t[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], -1)


class LatentMLP(nn.Module):
    """ε-predictor for latents: residual MLP blocks modulated by a sinusoidal time embedding."""

    def __init__(self, latent_dim: int, hidden: int = 256, num_blocks: int = 3, time_dim: int = 64):
        super().__init__()
        self.time_dim = time_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(latent_dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
            for _ in range(num_blocks)
        )
        self.out = nn.Sequential(nn.LayerNorm(hidden), nn.SiLU(), nn.Linear(hidden, latent_dim))

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        return self.time_mlp(sinusoidal_embedding(t, self.time_dim))

    def forward(self, z_t: torch.Tensor, cond, t: torch.Tensor) -> torch.Tensor:
        emb = self.embed_time(t)
        h = self.inp(z_t)
        for block in self.blocks:
            h = h + block(h + emb)
        return self.out(h)


class LatentUNet(nn.Module):
    """ε-predictor for large latents: reshape z to ``(C, H, W)`` and use an unconditional UNet."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], **unet_kwargs):
        super().__init__()
        if math.prod(shape) != latent_dim or shape[1] != shape[2]:
            raise ValueError(f"LatentUNet: shape {shape} must be square and hold latent_dim={latent_dim} values")
        self.shape = tuple(shape)
        self.unet = ConditionalUNet(in_channels=shape[0], image_size=shape[1], z_dim=None, **unet_kwargs)

    def forward(self, z_t, cond, t):
        return self.unet(z_t.reshape((-1,) + self.shape), None, t).reshape(z_t.shape)


class LatentScorePrior(nn.Module):
    r"""Latent diffusion prior :math:`p_\phi(z)` trained with the ε-MSE, sampled by DDIM / reverse SDE / ODE.

    :param latent_dim: D.
    :param eps_net: an ε-predictor ``eps_net(z_t, None, t)``; default :class:`LatentMLP`.
    :param sde: the VP-SDE (default ``VPSDE()``).
    :param sampler: defaults for :meth:`sample`.
    :param sampler_steps: see ``sampler`` above.
    :param fitted: whether the ε-network is ready to sample (:attr:`fitted`); ``None``: true when an
        ``eps_net`` is given (a closed form or a trained network), false for the default, freshly
        initialised :class:`LatentMLP`. :meth:`fit` and loading a state dict set it; :meth:`sample`
        refuses an unfitted prior (its samples would be noise shaped by random weights).

    Example::

        >>> prior = LatentScorePrior(latent_dim=32)
        >>> prior.fit(collect_latents(vae, loader), steps=2000)
        >>> vae.latent_prior = prior
        >>> vae.sample(16, prior="score")
    """

    def __init__(self, latent_dim: int, eps_net: nn.Module | None = None, sde: VPSDE | None = None,
                 sampler: str = "ddim", sampler_steps: int | None = None, fitted: bool | None = None):
        super().__init__()
        if sampler not in _samplers.SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; known samplers: {sorted(_samplers.SAMPLERS)}")
        self.latent_dim = latent_dim
        self.fitted = (eps_net is not None) if fitted is None else bool(fitted)
        self.eps_net = eps_net if eps_net is not None else LatentMLP(latent_dim)
        self.sde = sde if sde is not None else VPSDE()
        self.sampler = sampler
        self.sampler_steps = sampler_steps
        self.register_load_state_dict_post_hook(_mark_fitted)  # also when a parent (the VAE) loads

    def loss(self, z0: torch.Tensor) -> torch.Tensor:
        r"""Mean ε-MSE :math:`\mathbb E\|\hat\epsilon_\phi - \epsilon\|^2` over the batch (one (t, ε) draw per latent)."""
        if z0.dim() != 2 or z0.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (batch, {self.latent_dim}), got {tuple(z0.shape)}")
        lik = ScoreMatchingLikelihood(
            self.eps_net, None, self.sde, weighting="simple", event_shape=(self.latent_dim,), batch_shape=z0.shape[:1]
        )
        # -log_prob = 1/2 (T - eps) ||eps_hat - eps||^2 for uniform t and lambda = sigma^2
        return -lik.log_prob(z0).mean() * 2.0 / (self.sde.T - self.sde.eps)

    def check_latents(self, latents: torch.Tensor) -> None:
        """ValueError unless ``latents`` is a finite ``(N, latent_dim)`` tensor (what :meth:`fit` takes)."""
        if latents.dim() != 2 or latents.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (N, {self.latent_dim}), got {tuple(latents.shape)}")
        if latents.shape[0] == 0:
            raise ValueError(f"latents: an empty set (shape {tuple(latents.shape)}); the prior needs at least one latent")
        if not torch.isfinite(latents).all():
            raise ValueError("latents contain non-finite values")

    def fit(self, latents: torch.Tensor, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
            generator: torch.Generator | None = None, callback=None, ema_decay: float | None = None,
            progress: bool = False) -> list[float]:
        """Fit to a tensor of latents ``(N, D)`` with Adam (cosine learning rate); returns the loss per step.

        With ``ema_decay`` an exponential moving average of the ε-network's weights
        (``torch.optim.swa_utils``) is kept during training and copied into it at the end, so that
        sampling uses the averaged weights. ``progress``: a progress bar on stderr with the running loss.
        """
        from tqdm.auto import tqdm

        self.check_latents(latents)
        _check_positive_int("steps", steps)
        _check_positive_int("batch_size", batch_size)
        if ema_decay is not None and not 0.0 < ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in (0, 1), got {ema_decay}")
        averaged = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            averaged = AveragedModel(self.eps_net, multi_avg_fn=get_ema_multi_avg_fn(ema_decay))
        opt = torch.optim.Adam(self.eps_net.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        losses = []
        self.train()
        bar = tqdm(total=steps, desc=f"fitting {type(self).__name__}", unit="step", disable=not progress)
        for step in range(steps):
            idx = torch.randint(0, latents.shape[0], (min(batch_size, latents.shape[0]),), generator=generator)
            loss = self.loss(latents[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if averaged is not None:
                averaged.update_parameters(self.eps_net)
            losses.append(loss.item())
            bar.update(1)
            if progress and (step % 50 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if callback is not None:
                callback(step, loss.item())
        bar.close()
        if averaged is not None:
            with torch.no_grad():
                for p, q in zip(self.eps_net.parameters(), averaged.module.parameters()):
                    p.copy_(q)
        self.eval()
        self.fitted = True
        return losses

    def check_fitted(self) -> None:
        """ValueError unless the prior has been fitted (or loaded, or built on a given ε-network)."""
        if not self.fitted:
            raise ValueError(f"{type(self).__name__} has not been fitted: fit() it on latents first (or load the "
                             "weights of a fitted one); its untrained network would sample noise")

    def log_prob(self, z: torch.Tensor, divergence: str = "auto", num_probes: int = 4, rtol: float = 1e-5,
                 atol: float = 1e-5) -> torch.Tensor:
        r""":math:`\log p_\phi(z)` per latent ``(N,)`` (float64) by the probability-flow ODE of the prior,
        :math:`\log\pi(z_T) + \int_\epsilon^T\nabla\cdot\tilde f\,dt`
        (:func:`~pyro_diffmvae.metrics.ode_likelihood.ode_log_likelihood`, which also returns the
        Hutchinson standard error): the density of the ODE model of z (up to the solver's error), what
        ``prior="score"`` scores in :func:`~pyro_diffmvae.loglik.log_likelihood`."""
        self.check_latents(z)
        return ode_log_likelihood(self, z, None, divergence=divergence, num_probes=num_probes, rtol=rtol, atol=atol).value

    @torch.no_grad()
    def sample(self, n: int, sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        """Draw ``n`` latents with the reverse-time sampler (on the ε-network's device; the CPU for a
        network without parameters, such as a closed-form ε)."""
        _check_positive_int("n", n)
        if steps is not None:
            _check_positive_int("steps", steps)
        self.check_fitted()
        param = next(self.eps_net.parameters(), None)
        device = None if param is None else param.device
        return _samplers.sample(
            self.eps_net, (n, self.latent_dim), self.sde, method=sampler or self.sampler,
            steps=self.sampler_steps if steps is None else steps, device=device,
        )


def _mark_fitted(module: LatentScorePrior, incompatible_keys) -> None:
    """``load_state_dict`` post-hook: loaded weights are fitted weights."""
    module.fitted = True


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LatentScorePrior: {name} must be a positive integer, got {value!r}")


@torch.no_grad()
def collect_latents(vae, batches: Iterable, samples_per_example: int = 1) -> torch.Tensor:
    """Draw z₀ ~ q(z | all observed modalities) (full PoE) for every example of ``batches``
    (``vae.posterior(batch)``; for a two-stage model, the concatenated unimodal latents)."""
    out = []
    for batch in batches:
        q = vae.posterior(batch)
        out.append(q.sample((samples_per_example,)).reshape(-1, q.event_shape[-1]))
    if not out:
        raise ValueError("collect_latents: no batches")
    return torch.cat(out)
