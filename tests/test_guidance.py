"""Conditioning dropout and guidance on the latent (pyro_diffmvae.guidance, DiffusionDecoder), against
hand-computed combinations and binomial rates."""

import pytest
import torch

from pyro_diffmvae.guidance import guidance_weight
from pyro_diffmvae.guidance import GuidedEps, drop_conditioning
from pyro_diffmvae.modality import DiffusionDecoder, Modality
from pyro_diffmvae.model import MultimodalVAE


def linear_eps(x, z, t):
    """ε̂(x, z, t) = 2x + (1 + t) Σ_j z_j: affine in z, so every guided value is computable by hand."""
    return 2.0 * x + (1.0 + t)[:, None] * z.sum(-1, keepdim=True)


def test_guided_eps_is_the_hand_combination():
    # ε_w = ε(x, ∅) + w (ε(x, z) - ε(x, ∅)); with ∅ = (0.5, -1): Σ∅ = -0.5, so by hand
    # ε_w = 2x + (1 + t)(-0.5 + w (Σz + 0.5)). Catches swapped halves or w on the wrong term.
    x, z, t = torch.randn(4, 3), torch.randn(4, 2), torch.rand(4)
    null = torch.tensor([0.5, -1.0])
    for w in (0.0, 1.0, 3.0):
        expected = 2.0 * x + (1.0 + t)[:, None] * (-0.5 + w * (z.sum(-1, keepdim=True) + 0.5))
        torch.testing.assert_close(GuidedEps(linear_eps, null, w)(x, z, t), expected)


def test_drop_conditioning_replaces_whole_examples_at_the_binomial_rate():
    # 20,000 examples, p = 0.3: SE of the rate 0.0032; 5 SE = 0.016. Catches dropping single coordinates
    # instead of whole latents, or using 1 - p.
    torch.manual_seed(0)
    z = torch.ones(100, 200, 4)
    null = torch.full((4,), -7.0)
    out = drop_conditioning(z, null, 0.3)
    dropped = (out == -7.0).all(-1)
    kept = (out == 1.0).all(-1)
    assert bool((dropped | kept).all())
    assert dropped.float().mean().item() == pytest.approx(0.3, abs=0.016)
    assert drop_conditioning(z, null, 0.0) is z


def _decoder(**kwargs):
    return DiffusionDecoder(linear_eps, (3,), weighting="simple", sampler="ddim", sampler_steps=5, **kwargs)


def test_training_drops_z_and_evaluation_does_not_and_the_null_latent_learns():
    seen = []

    def spy(x, z, t):
        seen.append(z.detach().clone())
        return linear_eps(x, z, t)

    dec = DiffusionDecoder(spy, (3,), weighting="simple", cond_dropout=0.25, latent_dim=2)
    with torch.no_grad():
        dec.null_z.copy_(torch.tensor([-3.0, -3.0]))
    z = torch.ones(8000, 2)
    torch.manual_seed(1)
    dec.train()
    dec(z).log_prob(torch.zeros(8000, 3)).sum().backward()
    rate = (seen[-1] == -3.0).all(-1).float().mean().item()
    assert rate == pytest.approx(0.25, abs=5 * (0.25 * 0.75 / 8000) ** 0.5)  # binomial, 5 SE
    assert dec.null_z.grad is not None and dec.null_z.grad.abs().sum() > 0  # the null latent is learned
    dec.eval()
    dec(z).log_prob(torch.zeros(8000, 3))
    assert bool((seen[-1] == 1.0).all())  # no dropout outside training


def test_guidance_zero_ignores_z_one_is_the_plain_decoder():
    # w = 0 is the unconditional network: samples do not depend on z. w = 1 is the plain decoder with
    # one network call of n rows per step (no null half). Catches guidance applied at w = 1 (2x the cost)
    # or the conditional half used at w = 0.
    dec = _decoder(cond_dropout=0.1, latent_dim=2)
    x_T_seed = 3
    z_a, z_b = torch.zeros(6, 2), torch.full((6, 2), 5.0)
    dec.guidance = 0.0
    torch.manual_seed(x_T_seed); a = dec.generate(z_a)
    torch.manual_seed(x_T_seed); b = dec.generate(z_b)
    torch.testing.assert_close(a, b)
    dec.guidance = 1.0
    plain = _decoder()
    torch.manual_seed(x_T_seed); c = dec.generate(z_b)
    torch.manual_seed(x_T_seed); d = plain.generate(z_b)
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, c)
    rows = []
    dec.eps_net = lambda x, z, t: rows.append(x.shape[0]) or linear_eps(x, z, t)
    dec.generate(z_b)
    assert rows == [6] * 6  # 5 DDIM steps + the Tweedie step
    dec.guidance = 2.0
    rows.clear()
    dec.generate(z_b)
    assert rows == [12] * 6  # both halves in one batched call


def test_guidance_settings_are_checked_and_dropout_is_not_a_bound():
    with pytest.raises(ValueError, match="guidance 2.0 needs the unconditional network"):
        _decoder(guidance=2.0)
    with pytest.raises(ValueError, match=r"cond_dropout must be a probability in \[0, 1\), got 1.0"):
        _decoder(cond_dropout=1.0, latent_dim=2)
    with pytest.raises(ValueError, match="needs latent_dim"):
        _decoder(cond_dropout=0.2)
    with pytest.raises(ValueError, match="guidance must be a finite number >= 0"):
        _decoder(cond_dropout=0.2, latent_dim=2, guidance=-1.0)
    bound = DiffusionDecoder(linear_eps, (3,), weighting="likelihood")
    dropped = DiffusionDecoder(linear_eps, (3,), weighting="likelihood", cond_dropout=0.1, latent_dim=2)
    assert bound.is_bound and not dropped.is_bound
    assert "conditioning dropout p = 0.1: not a bound" in dropped.objective


def test_evaluation_guidance_sets_every_diffusion_decoder_and_restores_it():
    class Enc(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2), torch.zeros(x.shape[0], 2)

    vae = MultimodalVAE([Modality("a", Enc(), _decoder(cond_dropout=0.1, latent_dim=2)),
                         Modality("b", Enc(), _decoder(cond_dropout=0.1, latent_dim=2))], latent_dim=2)
    with guidance_weight(vae, 3.0) as weights:
        assert weights == {"a": 3.0, "b": 3.0}
        assert vae.modalities["a"].decoder.guidance == 3.0
    assert vae.modalities["a"].decoder.guidance == 1.0 and vae.modalities["b"].decoder.guidance == 1.0
    with guidance_weight(vae, None) as weights:
        assert weights == {"a": 1.0, "b": 1.0}


def test_the_config_keys_reach_the_decoders_and_the_null_latent_is_saved():
    # Catches a builder that drops model.diffusion.cond_dropout / guidance, or a null latent outside the state dict
    # (a saved model would then come back without its unconditional network).
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_model

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["experiment=tiny", "model.diffusion.cond_dropout=0.2", "model.diffusion.guidance=2.5"])
    vae = build_model(cfg)
    dec = vae.modalities["image"].decoder
    assert (dec.cond_dropout, dec.guidance, tuple(dec.null_z.shape)) == (0.2, 2.5, (cfg.model.latent_dim,))
    assert any(k.endswith("decoder.null_z") for k in vae.state_dict())
