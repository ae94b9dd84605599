"""Tests of pyro_diffmvae.metrics.denoising_error: the error of ε̂ and x̂₀ by diffusion time, against the
Bayes-optimal denoiser of Gaussian data."""

import math

import pytest
import torch

from pyro_diffmvae.metrics import denoising_error_by_time
from pyro_diffmvae.sde import VPSDE

MEAN, STD = 0.3, 0.5


def bayes_eps(sde):
    r"""The exact E[ε | x_t] for x0 ~ N(MEAN, STD² I): σ (x_t − α m) / (α² s² + σ²)."""
    def eps_net(x_t, z, t):
        shape = (-1,) + (1,) * (x_t.ndim - 1)
        a, s = sde.alpha(t).view(shape), sde.sigma(t).view(shape)
        return s * (x_t - a * MEAN) / (a**2 * STD**2 + s**2)
    return eps_net


def test_bayes_denoiser_matches_the_closed_form_errors():
    """e_ε² = α²s²/(α²s² + σ²), e_x0² = s²σ²/(α²s² + σ²), and the per-channel mean's error e_x0²/(H W) (the
    pixels' errors are independent). Fails if x̂₀ is formed with α and σ swapped or without dividing by α, or if
    the noise is drawn with another scale than x_t's."""
    sde = VPSDE()
    g = torch.Generator().manual_seed(0)
    x0 = MEAN + STD * torch.randn(4000, 3, 4, 4, generator=g)
    rows = denoising_error_by_time(bayes_eps(sde), sde, x0, None, times=(0.1, 0.5, 0.9, 1.0), generator=g)
    for row in rows:
        a2s2, s2 = row["alpha"] ** 2 * STD**2, row["sigma"] ** 2
        assert row["eps_rmse"] == pytest.approx(math.sqrt(a2s2 / (a2s2 + s2)), rel=0.02)
        x0_var = STD**2 * s2 / (a2s2 + s2)
        assert row["x0_rmse"] == pytest.approx(math.sqrt(x0_var), rel=0.02)
        assert row["mean_channel_rmse"] == pytest.approx(math.sqrt(x0_var / 16), rel=0.05)
        assert row["alpha"] == pytest.approx(sde.alpha(torch.tensor(row["t"])).item())


def test_x0_error_is_the_eps_error_times_sigma_over_alpha():
    """x̂₀ − x₀ = (σ/α)(ε − ε̂) exactly, for any network: here a deliberately poor one (ε̂ = 0.9 x_t + 0.01),
    whose x̂₀ error at t = 1 is ~150 times its ε error — the amplification that sinks ε-prediction's samplers.
    Fails if x̂₀ is clipped or formed from another time's α, σ."""
    sde = VPSDE()
    x0 = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    rows = denoising_error_by_time(lambda x, z, t: 0.9 * x + 0.01, sde, x0, None, times=(0.3, 1.0),
                                   generator=torch.Generator().manual_seed(2))
    for row in rows:
        assert row["x0_rmse"] == pytest.approx(row["sigma"] / row["alpha"] * row["eps_rmse"], rel=1e-5)
    assert rows[1]["sigma"] / rows[1]["alpha"] > 100


def test_passes_z_and_times_through_to_the_network():
    """The network sees the given z and one time per row; a flat (n, d) batch has no per-channel mean. Fails if z
    or t is not passed, or t is broadcast with another shape."""
    sde, seen = VPSDE(), []
    z = torch.randn(5, 2)

    def eps_net(x, zz, t):
        seen.append((zz, t))
        return torch.zeros_like(x)

    rows = denoising_error_by_time(eps_net, sde, torch.zeros(5, 7), z, times=(0.5,))
    assert seen[0][0] is z and torch.equal(seen[0][1], torch.full((5,), 0.5))
    assert rows[0]["mean_channel_rmse"] is None
    # ε̂ = 0 on x0 = 0: the ε error is that of a standard normal draw, √1
    assert rows[0]["eps_rmse"] == pytest.approx(1.0, abs=0.35)


@pytest.mark.parametrize("x0, z, times, match", [
    (torch.full((2, 3), float("nan")), None, (0.5,), "non-finite"),
    (torch.zeros(2, 3), torch.zeros(3, 1), (0.5,), "3 rows for 2 examples"),
    (torch.zeros(2, 3), None, (0.0, 0.5), r"times must be .* \(0, 1\]"),
    (torch.zeros(2, 3), None, (), "times must be"),
    (torch.zeros(3), None, (0.5,), "non-empty batch"),
])
def test_bad_input_is_named(x0, z, times, match):
    with pytest.raises(ValueError, match=match):
        denoising_error_by_time(lambda x, zz, t: x, VPSDE(), x0, z, times=times)
