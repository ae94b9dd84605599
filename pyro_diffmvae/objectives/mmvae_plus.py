r"""MMVAE+ (Palumbo et al. 2023): shared and private latents, auxiliary priors, the mixture bound."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..fusion import poe, subset_family
from ..nets.mmvae_plus import PrivateLatentDecoder, SharedPrivateEncoder
from . import gaussian
from .base import Objective, mixture_of_experts_posterior
from .gaussian import check_estimator, masked, mixture_log_density, normal_log_prob, resolve_beta, std_normal_log_prob, stratum_bound, weighted_log_likelihood

__all__ = ["MMVAEPlus"]


class MMVAEPlus(Objective):
    r"""MMVAE+ (Palumbo, Daunhawer & Vogt 2023, "MMVAE+: Enhancing the Generative Quality of
    Multimodal VAEs without Compromises", ICLR; §3): every modality has a shared latent z (experts
    mixed as in MMVAE) and a private latent :math:`w_m` with posterior :math:`q(w_m\mid x_m)`, prior
    :math:`p(w_m)=\mathcal N(0,I)` and an auxiliary prior :math:`r_n(w_n)` with learned scale; the
    decoders take :math:`[z, w]`. Stratum m draws :math:`z_m^k\sim q(z\mid x_m)`,
    :math:`w_m^k\sim q(w_m\mid x_m)`, and for every other modality n a fresh
    :math:`\tilde w_n^k\sim r_n(w_n)` (reparameterised, so :math:`s_n` learns through the
    cross-modal likelihoods); the log-weight is

    .. math:: \log w_m^k = \lambda_m\log p(x_m\mid z_m^k, w_m^k) + \sum_{n\ne m}\lambda_n\log p(x_n\mid z_m^k,\tilde w_n^k)
              + \beta\big[\log p(z_m^k) + \log p(w_m^k) - \log q(z_m^k\mid X) - \log q(w_m^k\mid x_m)\big],

    with :math:`q(z\mid X)` the mixture density of :class:`MMVAE`, and the objective
    :math:`\frac1M\sum_m\log\frac1K\sum_k w_m^k` (``"iwae"``/``"dreg"``) or
    :math:`\frac1M\sum_m\frac1K\sum_k\log w_m^k` (``"elbo"``). This is the authors' ``_m_elbo`` /
    ``m_dreg`` (their ``--obj elbo`` is the IWAE form, equal to ours at K = 1); for DReG the
    hook weights both :math:`z_m^k` and :math:`w_m^k` and both posteriors' parameters are
    detached, as there (see :func:`stratum_bound` and the caveat of :class:`MMVAE`).

    The vae must be built with :class:`SharedPrivateEncoder` encoders and
    :class:`PrivateLatentDecoder` decoders (``build_model`` does so when
    ``model.objective=mmvae_plus``: private encoders of size ``model.private_latent_dim`` and
    decoders over ``latent_dim + private_latent_dim`` inputs). Not reproduced: the authors'
    Laplace posteriors/priors of the PolyMNIST run (their CUB run is Gaussian, as here) and their
    softmax/softplus scale parameterisations (here ``exp`` of a learned log-scale, r initialised at 1).

    Missing modalities: strata, mixture and reconstructed targets run over each example's observed
    set :math:`O_b`.

    :param estimator: ``"elbo"``, ``"iwae"`` or ``"dreg"``; ``num_samples``: K;
        ``beta``: β (default ``vae.beta``; authors: 2.5 on PolyMNIST, 1.0 on CUB).

    Noise (:func:`~pyro_diffmvae.objectives.gaussian.standard_normal`): one ``(M, K, B, D)`` draw for z; then for each modality m of the batch (in
    modality order) a ``(K, B, D_w)`` draw for :math:`w_m`, followed by one ``(K, B, D_w)`` draw for
    each other modality n of the batch (modality order) for :math:`\tilde w_n`.
    """

    name = "mmvae_plus"
    conditional_kind = "mixture"

    def __init__(self, estimator: str = "elbo", num_samples: int = 1, beta: float | None = None):
        check_estimator(estimator, num_samples)
        self.estimator, self.num_samples, self.beta = estimator, num_samples, beta

    @staticmethod
    def check_vae(vae) -> None:
        bad = [n for n, m in vae.modalities.items()
               if not (isinstance(m.encoder, SharedPrivateEncoder) and isinstance(m.decoder, PrivateLatentDecoder))]
        if bad:
            raise ValueError(
                f"the mmvae_plus objective needs SharedPrivateEncoder encoders and PrivateLatentDecoder decoders "
                f"(private latents); modalities {bad} lack them — build the model with model.objective=mmvae_plus "
                "and model.private_latent_dim set"
            )

    def per_example(self, vae, batch: Mapping) -> dict[str, torch.Tensor]:
        self.check_vae(vae)
        data, available, B = vae.parse_batch(batch)
        mu, logvar = vae.experts(data, available)  # shared, (B, M, D)
        M, K, D = mu.shape[1], self.num_samples, mu.shape[2]
        beta = resolve_beta(self.beta, vae)
        dreg = self.estimator == "dreg"
        z = mu.transpose(0, 1)[:, None] + torch.exp(0.5 * logvar).transpose(0, 1)[:, None] * gaussian.standard_normal((M, K, B, D), mu)
        mu_q, logvar_q = (mu.detach(), logvar.detach()) if dreg else (mu, logvar)
        log_ratio_z = std_normal_log_prob(z) - mixture_log_density(z, mu_q, logvar_q, available)  # (M, K, B)
        present = [n for n in vae.names if n in data]
        lws, ws = [], []
        zero = torch.zeros(K, B, dtype=mu.dtype, device=mu.device)
        for j, name in enumerate(vae.names):
            if name not in data:
                lws.append(zero)
                continue
            mu_w, logvar_w = vae.modalities[name].encoder.private(data[name])  # (B, D_w)
            w = mu_w + torch.exp(0.5 * logvar_w) * gaussian.standard_normal((K,) + tuple(mu_w.shape), mu_w)
            ws.append(w)
            mu_wq, logvar_wq = (mu_w.detach(), logvar_w.detach()) if dreg else (mu_w, logvar_w)
            lw = beta * (log_ratio_z[j] + std_normal_log_prob(w) - normal_log_prob(w, mu_wq, logvar_wq))
            for n in present:
                dec = vae.modalities[n].decoder
                if n == name:
                    w_n = w
                else:  # w~_n ~ r_n(w_n), reparameterised through the learned auxiliary scale
                    w_n = dec.aux_scale() * gaussian.standard_normal((K, B, dec.private_dim), mu)
                u = torch.cat([z[j], w_n], -1)
                lw = lw + weighted_log_likelihood(vae, n, u, data[n], available[:, vae.names.index(n)])
            lws.append(lw)
        lw = torch.stack(lws)  # (M, K, B)
        if dreg:  # hooks on z (all strata) and on each stratum's w
            per_stratum = stratum_bound(lw, self.estimator, [z])
            if lw.requires_grad:
                w_tilde = torch.softmax(lw.detach(), 1)
                rows = [j for j, n in enumerate(vae.names) if n in data]
                for j, w in zip(rows, ws):
                    if w.requires_grad:
                        w.register_hook(lambda grad, wt=w_tilde[j]: grad * wt.unsqueeze(-1))
        else:
            per_stratum = stratum_bound(lw, self.estimator, [])
        bound = masked(per_stratum, available.T).sum(0) / available.sum(-1).to(per_stratum.dtype)
        return {"loss": -bound}

    def conditional(self, vae, batch: Mapping, given: Sequence[str]):
        """The uniform mixture of the given shared experts (each decoder then draws its
        private latent from p(w)): one given modality's expert, chosen uniformly."""
        return mixture_of_experts_posterior(vae, batch, given)

    def __repr__(self):
        return f"MMVAEPlus(estimator={self.estimator!r}, num_samples={self.num_samples}, beta={self.beta})"
