import math

import pytest
import torch
from torch import nn

from pyro_diffmvae.likelihoods import ScoreMatchingLikelihood
from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder, Modality
from pyro_diffmvae.prior import LatentUNet
from pyro_diffmvae import samplers


class Fixed(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, z):
        return self.out.expand((z.shape[0],) + self.out.shape)


def test_bernoulli_normal_laplace_log_probs_by_hand():
    z = torch.zeros(2, 3)
    p = torch.tensor([[0.0, 2.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    bern = FeedForwardDecoder(Fixed(p), (1, 2), "bernoulli")
    lp = bern(z).log_prob(x.reshape(2, 1, 2))
    expected = (x * torch.log(torch.sigmoid(p[0])) + (1 - x) * torch.log(1 - torch.sigmoid(p[0]))).sum(-1)
    torch.testing.assert_close(lp, expected)
    normal = FeedForwardDecoder(Fixed(p[0]), (2,), "normal", scale=0.5)
    torch.testing.assert_close(normal(z).log_prob(x), (-0.5 * math.log(2 * math.pi * 0.25) - (x - p[0]) ** 2 / 0.5).sum(-1))
    laplace = FeedForwardDecoder(Fixed(p[0]), (2,), "laplace", scale=0.5, learn_scale=True)
    torch.testing.assert_close(laplace(z).log_prob(x), (-math.log(2 * 0.5) - (x - p[0]).abs() / 0.5).sum(-1))
    assert isinstance(laplace.log_scale, nn.Parameter) and not isinstance(normal.log_scale, nn.Parameter)
    torch.testing.assert_close(bern.generate(z), torch.sigmoid(p).expand(2, 1, 2))


def test_categorical_tokens():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]))  # (L=2, V=3)
    dec = FeedForwardDecoder(Fixed(logits), (2,), "categorical", num_classes=3)
    tokens = torch.tensor([[0, 2], [1, 1]])
    torch.testing.assert_close(dec(torch.zeros(2, 4)).log_prob(tokens), torch.log(torch.tensor([0.7 * 0.8, 0.2 * 0.1])))
    assert dec.generate(torch.zeros(1, 4)).tolist() == [[0, 2]]
    mod = Modality("text", nn.Identity(), dec)
    with pytest.raises(ValueError, match="integer tokens"):
        mod.check_data(torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 3\), got range \[0, 5\]"):
        mod.check_data(torch.tensor([[0, 5], [1, 1]]))


def test_decoder_errors():
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        FeedForwardDecoder(nn.Identity(), (2,), "poisson")
    with pytest.raises(ValueError, match="needs num_classes"):
        FeedForwardDecoder(nn.Identity(), (2,), "categorical")
    dec = FeedForwardDecoder(nn.Linear(3, 5), (4,), "bernoulli")
    with pytest.raises(ValueError, match=r"decoder net returned shape \(2, 5\), expected \(n, 4\)"):
        dec(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="unknown weighting"):
        DiffusionDecoder(nn.Identity(), (4,), weighting="g2")
    with pytest.raises(ValueError, match="weight must be positive"):
        Modality("a", nn.Identity(), dec, weight=0.0)


def test_diffusion_decoder_builds_score_matching_likelihood():
    eps = lambda x_t, z, t: torch.zeros_like(x_t)
    dec = DiffusionDecoder(eps, (3, 4, 4), weighting="simple", num_draws=2, sampler="ode", sampler_steps=3)
    lik = dec(torch.zeros(5, 7))
    assert isinstance(lik, ScoreMatchingLikelihood)
    assert lik.batch_shape == (5,) and lik.event_shape == (3, 4, 4)
    assert lik.weighting_name == "simple" and lik.num_draws == 2 and not lik.is_bound
    assert not dec.is_bound and "not a bound" in dec.objective
    assert DiffusionDecoder(eps, (3,)).is_bound
    assert dec.generate(torch.zeros(2, 7), sampler="ddim", steps=2).shape == (2, 3, 4, 4)


@pytest.mark.parametrize("sampler,clips", [("ddim", True), ("dpmpp_2m", True), ("ode", False)])
def test_diffusion_decoder_passes_its_output_range_to_x0_samplers(monkeypatch, sampler, clips):
    # DDIM and DPM-Solver++ clip x̂0 at every step to the decoder's output range; the torchsde samplers
    # take no x0_range. Fails if the decoder stops passing it to one of them (or passes it to torchsde).
    seen = {}
    real = samplers.SAMPLERS[sampler]

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setitem(samplers.SAMPLERS, sampler, spy)
    eps = lambda x_t, z, t: torch.zeros_like(x_t)
    dec = DiffusionDecoder(eps, (3,), sampler=sampler, sampler_steps=4, output_range=(-1.0, 1.0))
    x = dec.generate(torch.zeros(2, 2))
    assert x.shape == (2, 3) and x.abs().max() <= 1.0
    assert seen.get("x0_range") == ((-1.0, 1.0) if clips else None)


def test_latent_unet_reshapes():
    net = LatentUNet(64, (1, 8, 8), base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=())
    out = net(torch.randn(3, 64), None, torch.rand(3))
    assert out.shape == (3, 64)
    with pytest.raises(ValueError, match="must be square"):
        LatentUNet(64, (4, 4, 8))


def test_diffusion_decoder_output_range_clamps_samples():
    eps = lambda x_t, z, t: -10.0 * torch.ones_like(x_t)  # drives samples far outside [-1, 1]
    free = DiffusionDecoder(eps, (4,), sampler="ddim", sampler_steps=3).generate(torch.zeros(2, 1))
    assert free.abs().max() > 1.5
    clamped = DiffusionDecoder(eps, (4,), sampler="ddim", sampler_steps=3, output_range=(-1, 1)).generate(torch.zeros(2, 1))
    assert clamped.min() >= -1 and clamped.max() <= 1
