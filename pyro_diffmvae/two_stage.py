r"""Two-stage latent-score fusion baselines: SBM-VAE-C (Wesego & Rooshenas 2024) and MLD (Bounoua et al. 2024).

Both replace the multimodal posterior by a diffusion model on the *concatenated* latents of
independently trained unimodal models, :math:`u = [z_1, \dots, z_M] \in \mathbb R^{M d}`:

**Stage 1 — unimodal models, one latent** :math:`z_m \in \mathbb R^d` **per modality**
(:class:`TwoStageVAE`, a :class:`~pyro_diffmvae.model.MultimodalVAE` whose Pyro program has one
latent site ``z_<name>`` per modality instead of a shared z). Trained with the stock ELBO machinery
(``objective=elbo``, Lightning, checkpoints, DDP):

* ``stage1="vae"`` (SBM-VAE): M independent VAEs, the sum of the unimodal ELBOs

  .. math:: \mathcal L_1 = \sum_m \Big\{\lambda_m\,\mathbb E_{q(z_m\mid x_m)}\log p(x_m\mid z_m)
            - \beta\,\mathrm{KL}(q(z_m\mid x_m)\,\Vert\,\mathcal N(0, I))\Big\};

* ``stage1="autoencoder"`` (MLD): M deterministic autoencoders :math:`z_m = e_m(x_m)` (the expert's
  mean), trained on :math:`\sum_m \lambda_m \log p(x_m\mid e_m(x_m))`. As a Pyro program: the guide
  is ``Delta(e_m(x_m))`` and the model's ``z_m`` has an improper flat prior, so the ELBO is exactly
  the weighted reconstruction log-likelihood (both log-densities are 0; ``TraceMeanField_ELBO``
  falls back to them when no analytic KL exists).

**Stage 2 — a diffusion model on u** (:class:`JointLatentDiffusion`, a
:class:`~pyro_diffmvae.prior.LatentScorePrior` over :math:`Md` dimensions, fitted after stage 1
exactly where the Diff-MVAE latent prior is fitted). Latents are standardised per dimension with
their training mean and standard deviation, :math:`\tilde u = (u - \mu)/s` (MLD does this; for
SBM-VAE it only rescales). The ε-network takes one diffusion time per modality,
:math:`\hat\epsilon_\phi(\tilde u_\tau, \tau)` with :math:`\tau \in [0, T]^M`
(:class:`MultiTimeLatentMLP`):

* ``mode="sbm"`` (SBM-VAE-C): unconditional score model, all blocks share one time,
  :math:`\tau = t\mathbf 1`, loss :math:`\mathbb E\|\hat\epsilon_\phi(\alpha_t\tilde u + \sigma_t\epsilon, t\mathbf 1) - \epsilon\|^2`.
  **Conditional sampling re-noises the observed latents**: at every reverse step the observed
  blocks are the forward-diffused observed latents :math:`\alpha_t\tilde u_O + \sigma_t\epsilon_O`
  (replacement / inpainting), only the unobserved blocks follow the learned score.
* ``mode="mld"`` (MLD): **multi-time masked diffusion**. Per example, with probability
  ``p_joint`` all blocks are diffused at one time :math:`t`; otherwise each block is independently a
  *conditioning* block with probability ½ (at least one block stays diffused) that enters clean,
  :math:`\tau_m = 0`, while the others are diffused at :math:`t`. The loss is the ε-MSE over the
  diffused blocks only, :math:`\sum_{m\notin C}\|\hat\epsilon_{\phi,m} - \epsilon_m\|^2 / (d\,|\bar C|)`.
  Conditional sampling feeds the observed blocks clean with :math:`\tau_O = 0` and integrates the others.

Both conditionings are implemented by wrapping the ε-network (:meth:`JointLatentDiffusion.conditioned_eps`)
so that on the observed blocks it returns the *exact* noise :math:`(x_O - \alpha_t\tilde u_O)/\sigma_t`:
every sampler of :mod:`~pyro_diffmvae.samplers` (DDIM, probability-flow ODE, reverse SDE through
``torchsde``) then keeps :math:`\hat x_0 = \tilde u_O` on the observed blocks and moves the observed
state along the forward marginal, and the unobserved blocks follow the learned (conditional) score.

Generation: ``generate(batch, given)`` encodes the given modalities, samples the missing blocks
from stage 2 and decodes each target from its own block; ``sample(n, prior="score")`` samples u
jointly; ``sample(n, prior="normal")`` draws each block independently (N(0, I) for the VAEs, the
latents' own per-dimension Gaussian for the autoencoders), the no-fusion reference.

Why not a subset ELBO: neither baseline has a multimodal posterior; the two stages are trained
separately (the papers' procedure), and stage 2 is a score-matching fit, not part of an ELBO.
Not reproduced: SBM's optional coherence guidance with a time-dependent classifier on the latents
(the "-C" row of the Diff-MVAE paper is read here as SBM-VAE with this conditional sampling), and the
authors' network sizes (see ``configs/model/{sbm_vae_c,mld}.yaml``).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn

from .fusion import Fusion
from .model import MultimodalVAE
from .modality import Modality
from . import samplers as _samplers
from .prior import LatentMLP, LatentScorePrior, sinusoidal_embedding
from .sde import VPSDE

__all__ = ["TwoStageVAE", "JointLatentDiffusion", "MultiTimeLatentMLP", "STAGE1", "MODES"]

STAGE1 = ("vae", "autoencoder")
MODES = ("sbm", "mld")


class MultiTimeLatentMLP(LatentMLP):
    r"""ε-predictor on M concatenated latent blocks of size d with one diffusion time per block.

    ``forward(u_t (B, M·d), cond, tau)`` with ``tau`` of shape ``(B,)`` (one time for all blocks) or
    ``(B, M)``. Each block's time gets a sinusoidal embedding; the M embeddings are concatenated and
    projected to modulate the residual MLP blocks of :class:`~pyro_diffmvae.prior.LatentMLP`.
    """

    def __init__(self, num_blocks_latent: int, block_dim: int, hidden: int = 256, num_blocks: int = 3, time_dim: int = 32):
        M, d = int(num_blocks_latent), int(block_dim)
        super().__init__(M * d, hidden=hidden, num_blocks=num_blocks, time_dim=M * time_dim)
        self.M, self.d, self.block_time_dim = M, d, int(time_dim)

    def embed_time(self, tau: torch.Tensor) -> torch.Tensor:
        B = tau.shape[0] if tau.dim() else 1
        if tau.dim() <= 1:
            tau = tau.reshape(-1, 1).expand(B, self.M)
        emb = sinusoidal_embedding(tau.reshape(-1), self.block_time_dim).reshape(tau.shape[0], self.M * self.block_time_dim)
        return self.time_mlp(emb)


class JointLatentDiffusion(LatentScorePrior):
    r"""Stage 2 of SBM-VAE-C / MLD: a diffusion model on the standardised concatenated latents (module docstring).

    :param num_modalities: M; ``block_dim``: d (the joint latent has M·d dimensions, block m = modality m).
    :param mode: ``"sbm"`` (one time, conditional sampling by re-noising) or ``"mld"`` (multi-time masked training).
    :param p_joint: MLD's probability of a fully diffused (unconditional) training example.
    """

    def __init__(self, num_modalities: int, block_dim: int, mode: str = "sbm", eps_net: nn.Module | None = None,
                 sde: VPSDE | None = None, p_joint: float = 0.5, sampler: str = "ddim", sampler_steps: int | None = None,
                 fitted: bool | None = None):
        if mode not in MODES:
            raise ValueError(f"unknown joint latent diffusion mode {mode!r}; known: {list(MODES)}")
        if not 0.0 <= p_joint <= 1.0:
            raise ValueError(f"p_joint must lie in [0, 1], got {p_joint}")
        M, d = int(num_modalities), int(block_dim)
        if M < 1 or d < 1:
            raise ValueError(f"num_modalities and block_dim must be positive, got {M}, {d}")
        super().__init__(M * d, eps_net if eps_net is not None else MultiTimeLatentMLP(M, d), sde=sde,
                         sampler=sampler, sampler_steps=sampler_steps,
                         fitted=(eps_net is not None) if fitted is None else fitted)
        self.num_modalities, self.block_dim, self.mode, self.p_joint = M, d, mode, float(p_joint)
        self.register_buffer("shift", torch.zeros(M * d))
        self.register_buffer("scale", torch.ones(M * d))

    # ------------------------------------------------------------------ standardisation
    def normalise(self, u: torch.Tensor) -> torch.Tensor:
        return (u - self.shift) / self.scale

    def denormalise(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.scale + self.shift

    def _block_mask(self, observed: torch.Tensor, B: int) -> torch.Tensor:
        """``(B, M)`` bool from ``(M,)`` or ``(B, M)``, expanded to ``(B, M·d)``."""
        observed = torch.as_tensor(observed, dtype=torch.bool, device=self.shift.device)
        if observed.dim() == 1:
            observed = observed[None].expand(B, -1)
        if observed.shape != (B, self.num_modalities):
            raise ValueError(f"observed must have shape ({self.num_modalities},) or ({B}, {self.num_modalities}), "
                             f"got {tuple(observed.shape)}")
        return observed

    def _expand(self, block: torch.Tensor) -> torch.Tensor:
        return block.repeat_interleave(self.block_dim, dim=-1)

    # ------------------------------------------------------------------ training
    def loss(self, u0: torch.Tensor, t: torch.Tensor | None = None, noise: torch.Tensor | None = None,
             conditioning: torch.Tensor | None = None) -> torch.Tensor:
        r"""Mean ε-MSE per diffused dimension on *raw* latents ``u0`` (standardised here).

        ``t`` (B,), ``noise`` (B, M·d) and ``conditioning`` (B, M) bool (MLD's clean blocks) default to
        fresh draws (t uniform on [ε, T]); pass them to fix the randomness."""
        if u0.dim() != 2 or u0.shape[1] != self.latent_dim:
            raise ValueError(f"latents must have shape (batch, {self.latent_dim}), got {tuple(u0.shape)}")
        B, M = u0.shape[0], self.num_modalities
        x0 = self.normalise(u0)
        if t is None:
            t, _ = self.sde.sample_time((B,), device=u0.device, dtype=u0.dtype)
        if noise is None:
            noise = torch.randn_like(x0)
        if conditioning is None:
            conditioning = torch.zeros(B, M, dtype=torch.bool, device=u0.device)
            if self.mode == "mld" and M > 1:
                masked = torch.rand(B, device=u0.device) >= self.p_joint
                conditioning = (torch.rand(B, M, device=u0.device) < 0.5) & masked[:, None]
                full = conditioning.all(-1)  # keep one block diffused: free a random one
                free = torch.randint(0, M, (B,), device=u0.device)
                conditioning[full, free[full]] = False
        conditioning = self._block_mask(conditioning, B)
        if self.mode == "sbm" and conditioning.any():
            raise ValueError("mode='sbm' trains an unconditional score model: conditioning blocks are MLD's")
        if conditioning.all(-1).any():
            raise ValueError("every example needs at least one diffused block")
        cond = self._expand(conditioning)
        x_t = torch.where(cond, x0, self.sde.perturb(x0, t, noise))
        tau = torch.where(conditioning, torch.zeros_like(t)[:, None], t[:, None].expand(B, M))
        eps_hat = self.eps_net(x_t, None, tau)
        diffused = (~cond).to(x0.dtype)
        return (((eps_hat - noise) ** 2) * diffused).sum() / diffused.sum()

    def fit(self, latents: torch.Tensor, steps: int = 2000, batch_size: int = 256, lr: float = 1e-3,
            generator: torch.Generator | None = None, callback=None, ema_decay: float | None = None,
            progress: bool = False) -> list[float]:
        """Set the standardisation from ``latents`` (per-dimension mean and std), then fit as
        :meth:`LatentScorePrior.fit`."""
        self.check_latents(latents)
        if latents.shape[0] < 2:
            raise ValueError("fitting needs at least 2 latents (to standardise them)")
        with torch.no_grad():
            self.shift.copy_(latents.mean(0))
            self.scale.copy_(latents.std(0).clamp_min(1e-4))
        return super().fit(latents, steps=steps, batch_size=batch_size, lr=lr, generator=generator,
                           callback=callback, ema_decay=ema_decay, progress=progress)

    # ------------------------------------------------------------------ sampling
    def conditioned_eps(self, x_obs: torch.Tensor, observed: torch.Tensor):
        r"""An ε-network for the samplers that conditions on standardised observed blocks ``x_obs``
        (B, M·d) where ``observed`` (B, M) is true: on those blocks it returns the exact noise
        :math:`(x_t - \alpha_t x_O)/\sigma_t`; the network sees the re-noised state (``"sbm"``) or the
        clean observed blocks with time 0 (``"mld"``)."""
        cond = self._expand(observed)
        sde, net, mode = self.sde, self.eps_net, self.mode

        def eps(x_t, _z, t):
            B = x_t.shape[0]
            t = t.expand(B) if t.dim() == 0 else t
            alpha, sigma = sde.alpha(t)[:, None], sde.sigma(t)[:, None]
            if mode == "mld":
                tau = torch.where(observed, torch.zeros_like(t)[:, None], t[:, None].expand_as(observed))
                out = net(torch.where(cond, x_obs, x_t), None, tau)
            else:
                out = net(x_t, None, t)
            return torch.where(cond, (x_t - alpha * x_obs) / sigma, out)

        return eps

    def log_prob(self, u: torch.Tensor, **ode_options) -> torch.Tensor:
        r""":math:`\log p_\phi(u)` of *raw* joint latents: the ODE log-density of the standardised
        :math:`\tilde u = (u - \mu)/s` minus the log-Jacobian :math:`\sum_i\log s_i` (options as
        :meth:`LatentScorePrior.log_prob`)."""
        self.check_latents(u)
        return super().log_prob(self.normalise(u), **ode_options) - self.scale.log().sum().double()

    @torch.no_grad()
    def sample(self, n: int, sampler: str | None = None, steps: int | None = None) -> torch.Tensor:
        """``n`` joint latents (raw scale) from the unconditional reverse process."""
        return self.denormalise(super().sample(n, sampler=sampler, steps=steps))

    @torch.no_grad()
    def sample_conditional(self, u_obs: torch.Tensor, observed, sampler: str | None = None,
                           steps: int | None = None) -> torch.Tensor:
        """Complete raw joint latents ``u_obs`` (B, M·d; unobserved blocks are ignored) whose blocks
        ``observed`` ((M,) or (B, M) bool) are given; returns (B, M·d) with the observed blocks unchanged."""
        if u_obs.dim() != 2 or u_obs.shape[1] != self.latent_dim:
            raise ValueError(f"u_obs must have shape (batch, {self.latent_dim}), got {tuple(u_obs.shape)}")
        observed = self._block_mask(observed, u_obs.shape[0])
        if observed.all():  # nothing to complete
            return u_obs.clone()
        self.check_fitted()
        x_obs = torch.where(self._expand(observed), self.normalise(u_obs), torch.zeros_like(u_obs))
        x = _samplers.sample(self.conditioned_eps(x_obs, observed), tuple(u_obs.shape), self.sde,
                             method=sampler or self.sampler, steps=steps or self.sampler_steps,
                             device=u_obs.device, dtype=u_obs.dtype)
        return torch.where(self._expand(observed), u_obs, self.denormalise(x))


class TwoStageVAE(MultimodalVAE):
    r"""Stage 1 of SBM-VAE-C (``stage1="vae"``) and MLD (``stage1="autoencoder"``), plus generation
    through the stage-2 :class:`JointLatentDiffusion` held in ``latent_prior`` (module docstring).

    :param modalities: the modalities; each encoder gives ``(mu, logvar)`` of size ``block_dim``
        (``logvar`` is unused by the autoencoders) and each decoder takes a ``block_dim`` latent.
    :param block_dim: d, the latent size of one modality (``latent_dim`` of the networks).
    """

    def __init__(self, modalities: Sequence[Modality], block_dim: int, stage1: str = "vae", beta: float = 1.0,
                 name: str = "two_stage"):
        if stage1 not in STAGE1:
            raise ValueError(f"unknown stage-1 model {stage1!r}; known: {list(STAGE1)}")
        super().__init__(modalities, block_dim, fusion="poe", beta=beta, name=name)
        # no posterior fusion: the stage-2 diffusion relates the modalities
        self.fusion = Fusion("two_stage", subsets="full", prior_expert="every")
        self.stage1 = stage1
        self.proper_prior = stage1 == "vae"  # the autoencoders' flat prior is improper: their ELBO bounds nothing

    @property
    def joint_dim(self) -> int:
        return len(self.names) * self.latent_dim

    # -------------------------------------------------------------- programs
    def model(self, batch: Mapping) -> None:
        r"""∏_m p(z_m) p(x_m | z_m)^{λ_m}: N(0, I) priors (β-scaled) for the VAEs, improper flat
        priors for the autoencoders; missing modalities masked."""
        data, available, B = self.parse_batch(batch)
        zero = available.new_zeros((), dtype=next(self.parameters()).dtype)
        with pyro.plate("data", B, dim=-1):
            for j, name in enumerate(self.names):
                if name not in data:
                    continue
                modality = self.modalities[name]
                with poutine.mask(mask=available[:, j]):
                    if self.stage1 == "vae":
                        with poutine.scale(scale=self.beta):
                            z = pyro.sample(f"z_{name}", dist.Normal(zero, 1.0).expand([self.latent_dim]).to_event(1))
                    else:
                        z = pyro.sample(f"z_{name}", dist.ImproperUniform(
                            dist.constraints.real, (B,), (self.latent_dim,)))
                    with poutine.scale(scale=modality.weight):
                        pyro.sample(f"x_{name}", modality.decoder(z), obs=data[name])

    def guide(self, batch: Mapping) -> None:
        r"""q(z_m | x_m) = N(μ_m, σ_m²) per observed modality (VAEs) or Delta(μ_m) (autoencoders)."""
        pyro.module(self.pyro_name, self)
        data, available, B = self.parse_batch(batch)
        mu, logvar = self.experts(data, available)
        with pyro.plate("data", B, dim=-1):
            for j, name in enumerate(self.names):
                if name not in data:
                    continue
                with poutine.mask(mask=available[:, j]):
                    if self.stage1 == "vae":
                        with poutine.scale(scale=self.beta):
                            pyro.sample(f"z_{name}", dist.Normal(mu[:, j], torch.exp(0.5 * logvar[:, j])).to_event(1))
                    else:
                        pyro.sample(f"z_{name}", dist.Delta(mu[:, j], event_dim=1))

    def joint(self, data: Mapping, available: torch.Tensor, private_latents: bool = False) -> None:
        """Not this model's program: a two-stage model has one latent ``z_<name>`` per modality (:meth:`model`)."""
        raise NotImplementedError("a two-stage model has no shared z: its program is model(), one latent z_<name> per modality")

    # ------------------------------------------------------------ inference
    def _given_latents(self, batch: Mapping, given: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Encoder means and standard deviations of the given modalities, ``(B, M, d)`` each (zeros elsewhere)."""
        data, available, B = self.parse_batch(batch)
        unknown = [g for g in given if g not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in given; known: {self.names}")
        for g in given:
            j = self.names.index(g)
            if g not in data or not bool(available[:, j].all()):
                raise ValueError(f"two-stage models condition on whole modalities: {g!r} must be present "
                                 "for every example of the batch")
        mu, logvar = self.experts({g: data[g] for g in given}, available)
        return mu, torch.exp(0.5 * logvar), B

    def posterior(self, batch: Mapping, given: Sequence[str] | None = None) -> dist.TorchDistribution:
        """The stage-1 latents of the ``given`` modalities (default all), concatenated in model
        order, ``(B, len(given)·d)``: N(μ, σ²) for the VAEs, Delta(μ) for the autoencoders."""
        given = self.names if given is None else list(given)
        mu, std, B = self._given_latents(batch, given)
        given = [n for n in self.names if n in given]
        idx = [self.names.index(g) for g in given]
        mu, std = mu[:, idx].reshape(B, -1), std[:, idx].reshape(B, -1)
        if self.stage1 == "autoencoder":
            return dist.Delta(mu, event_dim=1)
        return dist.Normal(mu, std).to_event(1)

    def _joint_prior(self) -> JointLatentDiffusion:
        if not isinstance(self.latent_prior, JointLatentDiffusion):
            raise ValueError("generation needs the stage-2 joint latent diffusion: fit a JointLatentDiffusion on "
                             "collect_latents(vae, ...) and set vae.latent_prior (diffmvae-train does this when "
                             "latent_prior.fit=true)")
        return self.latent_prior

    def _blocks(self, u: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: u[:, j * self.latent_dim:(j + 1) * self.latent_dim] for j, n in enumerate(self.names)}

    @torch.no_grad()
    def decode(self, z: torch.Tensor, targets: Sequence[str] | None = None, sampler: str | None = None,
               steps: int | None = None) -> dict[str, torch.Tensor]:
        """Decode joint latents ``(B, M·d)``: each target modality from its own block."""
        targets = self.names if targets is None else list(targets)
        unknown = [t for t in targets if t not in self.modalities]
        if unknown:
            raise ValueError(f"unknown modality names {unknown} in targets; known: {self.names}")
        if z.dim() != 2 or z.shape[1] != self.joint_dim:
            raise ValueError(f"joint latents must have shape (batch, {self.joint_dim}), got {tuple(z.shape)}")
        blocks = self._blocks(z)
        return {t: self.modalities[t].decoder.generate(blocks[t], sampler=sampler, steps=steps) for t in targets}

    @torch.no_grad()
    def generate(self, batch: Mapping, given: Sequence[str], targets: Sequence[str] | None = None,
                 sampler: str | None = None, steps: int | None = None, use_mean: bool = False,
                 prior_sampler: str | None = None, prior_steps: int | None = None) -> dict[str, torch.Tensor]:
        """Encode the given modalities (a sample of q(z_m | x_m), or its mean with ``use_mean``),
        complete the other blocks with the stage-2 conditional sampler, decode the targets."""
        given = list(given)
        targets = [n for n in self.names if n not in given] if targets is None else list(targets)
        mu, std, B = self._given_latents(batch, given)
        z = mu if (use_mean or self.stage1 == "autoencoder") else mu + std * torch.randn_like(std)
        observed = torch.tensor([n in given for n in self.names], device=z.device)
        u = self._joint_prior().sample_conditional(z.reshape(B, -1), observed, sampler=prior_sampler, steps=prior_steps)
        return self.decode(u, targets, sampler=sampler, steps=steps)

    @torch.no_grad()
    def sample(self, n: int, prior: str = "normal", targets: Sequence[str] | None = None, sampler: str | None = None,
               steps: int | None = None, prior_sampler: str | None = None, prior_steps: int | None = None
               ) -> dict[str, torch.Tensor]:
        """Unconditional generation: ``prior="score"`` samples the joint latents from stage 2;
        ``prior="normal"`` draws every block independently (no fusion): N(0, I) for the VAEs, the
        training latents' per-dimension Gaussian (stage 2's standardisation) for the autoencoders."""
        device = self.subsets.device
        if prior == "score":
            u = self._joint_prior().sample(n, sampler=prior_sampler, steps=prior_steps)
        elif prior == "normal":
            u = torch.randn(n, self.joint_dim, device=device)
            if self.stage1 == "autoencoder":
                u = self._joint_prior().denormalise(u)
        else:
            raise ValueError(f"unknown prior {prior!r}; known: 'normal', 'score'")
        return self.decode(u, targets, sampler=sampler, steps=steps)
