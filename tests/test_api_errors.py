"""The API's silent cases are errors that name the mistake (issue: nothing run that should not run).

Each test names the silent behaviour it replaces: a NaN schedule, a cast mask, a zero or negative
count turned into a default or an empty result, an unconditional sample returned as a conditional.
"""

import math

import pytest
import torch
from torch import nn

from pyro_diffmvae import VPSDE, FeedForwardDecoder, LatentMLP, LatentScorePrior, Modality, MultimodalVAE, poe

D = 3


class Expert(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Linear(dim, 2 * D)

    def forward(self, x):
        return self.net(x).chunk(2, -1)


def two_modality_vae():
    torch.manual_seed(0)
    return MultimodalVAE([
        Modality(m, Expert(4), FeedForwardDecoder(nn.Linear(D, 4), (4,), "normal", scale=1.0)) for m in ("a", "b")
    ], D, fusion="mopoe")


@pytest.mark.parametrize("kwargs,message", [
    ({"T": math.inf}, r"VPSDE T must be a finite real number, got inf"),
    ({"beta_max": math.nan}, r"VPSDE beta_max must be a finite real number, got nan"),
    ({"beta_min": "0.1"}, r"VPSDE beta_min must be a finite real number, got '0.1' \(str\)"),
    ({"eps": True}, r"VPSDE eps must be a finite real number, got True \(bool\)"),
])
def test_vpsde_rejects_non_finite_and_non_numeric_parameters(kwargs, message):
    """Catches: VPSDE(T=inf) accepted (every alpha, sigma is NaN downstream), a string compared with
    a float deep inside __post_init__ (a TypeError that does not name the field)."""
    with pytest.raises(ValueError, match=message):
        VPSDE(**kwargs)
    assert VPSDE(beta_min=1, T=2).T == 2  # integers are real numbers


def test_poe_mask_must_be_boolean_and_broadcast_to_the_experts():
    """Catches: a float mask cast to booleans (0.5 -> True: the expert silently takes part) and a
    mask of the wrong shape failing inside torch.broadcast_tensors."""
    mu, logvar = torch.zeros(2, 3, D), torch.zeros(2, 3, D)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor.*float32"):
        poe(mu, logvar, torch.full((2, 3), 0.5))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 5\) does not broadcast to the experts' \(\.\.\., M\) = \(2, 3\)"):
        poe(mu, logvar, torch.ones(2, 5, dtype=torch.bool))
    # three unit experts and the prior: precision 4 (the valid call still works)
    m, lv = poe(mu, logvar, torch.ones(3, dtype=torch.bool))
    assert torch.allclose(lv, torch.full((2, D), -math.log(4.0)))


@pytest.mark.parametrize("n", [0, -2, 2.0, True])
def test_sample_needs_a_positive_integer_count(n):
    """Catches: sample(0) failing in a reshape, sample(-2) in tensor creation, sample(2.0) accepted."""
    with pytest.raises(ValueError, match=r"sample: n must be a positive integer"):
        two_modality_vae().sample(n)


def test_sample_prior_steps_zero_is_an_error_not_the_default():
    """Catches: ``steps or default`` turning prior_steps=0 (and steps=0 of the prior) into the default."""
    vae = two_modality_vae()
    prior = LatentScorePrior(D, LatentMLP(D, hidden=8, num_blocks=1), sampler_steps=7)
    vae.latent_prior = prior
    with pytest.raises(ValueError, match=r"prior_steps must be a positive integer or None.*got 0"):
        vae.sample(2, prior="score", prior_steps=0)
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        prior.sample(2, steps=0)
    assert prior.sample(2, steps=None).shape == (2, D)  # None: the prior's own default


def test_latent_prior_fit_rejects_zero_steps_and_an_empty_latent_set():
    """Catches: fit(steps=0) returning [] (an unfitted prior reported as fitted) and an empty latent
    set failing inside torch.randint."""
    prior = LatentScorePrior(D, LatentMLP(D, hidden=8, num_blocks=1))
    with pytest.raises(ValueError, match=r"steps must be a positive integer, got 0"):
        prior.fit(torch.randn(10, D), steps=0)
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got -1"):
        prior.fit(torch.randn(10, D), steps=1, batch_size=-1)
    with pytest.raises(ValueError, match=r"an empty set \(shape \(0, 3\)\)"):
        prior.fit(torch.randn(0, D), steps=2)
    assert len(prior.fit(torch.randn(10, D), steps=2)) == 2


def test_generate_refuses_an_empty_given_set_and_examples_without_any_given_modality():
    """Catches: generate(given=[]) and generate(given=["b"]) on examples that have no "b" returning
    samples of the prior as if they were conditioned on something."""
    vae = two_modality_vae()
    batch = {"a": torch.randn(3, 4), "b": torch.randn(3, 4)}
    with pytest.raises(ValueError, match=r"given=\[\] must be a non-empty list.*use sample\(\)"):
        vae.generate(batch, given=[])
    with pytest.raises(ValueError, match=r"given='a' must be a non-empty list"):
        vae.generate(batch, given="a")
    missing_b = {"a": batch["a"], "b": batch["b"], "available": {"b": torch.tensor([True, False, False])}}
    with pytest.raises(ValueError, match=r"examples \[1, 2\] of the batch \(2 of 3\) have none of the given modalities \['b'\]"):
        vae.generate(missing_b, given=["b"])
    with pytest.raises(ValueError, match=r"unknown modality names \['c'\]"):
        vae.generate(batch, given=["c"])
    out = vae.generate(missing_b, given=["a", "b"])  # every example has "a"
    assert out == {}  # both modalities given: no target left
    assert vae.generate(batch, given=["a"])["b"].shape == (3, 4)


def test_an_attached_but_unfitted_latent_prior_is_refused_and_fitting_or_loading_makes_it_usable():
    """Catches: sample(prior="score") drawing from a freshly initialised prior network (noise shaped by
    random weights reported as the score prior's samples), and a prior whose fitted weights were
    loaded (model.pt) being refused."""
    from pyro_diffmvae.builders import build_latent_prior
    from omegaconf import OmegaConf

    vae = two_modality_vae()
    cfg = OmegaConf.create({"model": {"latent_dim": D}, "latent_prior": {
        "hidden": 8, "num_blocks": 1, "sampler": "ddim", "sampler_steps": 3}})
    vae.latent_prior = build_latent_prior(cfg)  # what diffmvae-train builds before fitting
    with pytest.raises(ValueError, match=r"LatentScorePrior has not been fitted"):
        vae.sample(2, prior="score")
    fitted = LatentScorePrior(D, LatentMLP(D, hidden=8, num_blocks=1), fitted=False)
    fitted.fit(torch.randn(16, D), steps=2)
    assert vae.sample(2, prior="normal")["a"].shape == (2, 4)  # N(0, I) needs no prior
    reloaded = two_modality_vae()
    reloaded.latent_prior = build_latent_prior(cfg)
    vae.latent_prior = fitted
    reloaded.load_state_dict(vae.state_dict())  # as load_run does: the VAE loads, the prior's hook fires
    assert reloaded.latent_prior.fitted
    assert reloaded.sample(2, prior="score")["a"].shape == (2, 4)
    # a given eps-network (a closed form or a trained net) is taken as ready, unless fitted=False
    assert LatentScorePrior(D, LatentMLP(D)).fitted and not LatentScorePrior(D).fitted


def test_diffusion_data_outside_the_decoders_range_is_named():
    """Catches: images in [0, 255] (or 100x their range) given to a decoder whose noise schedule
    assumes [-1, 1]: training went on with a loss of 2e6."""
    from pyro_diffmvae import DiffusionDecoder

    class Eps(nn.Module):
        def forward(self, x_t, z, t):
            return torch.zeros_like(x_t)

    decoder = DiffusionDecoder(Eps(), (4,), weighting="simple", output_range=(-1.0, 1.0))
    vae = MultimodalVAE([Modality("img", Expert(4), decoder)], D, fusion="mopoe")
    with pytest.raises(ValueError, match=r"modality 'img': data lie in \[-100, 100\], outside the decoder's data "
                                         r"range \[-1, 1\] \(allowed margin 0.1\)"):
        vae.modalities["img"].check_data(torch.tensor([[-100.0, 0.0, 1.0, 100.0]]))
    vae.modalities["img"].check_data(torch.tensor([[-1.05, 0.0, 1.0, 1.09]]))  # dequantisation-sized overshoot
    from pyro.infer import Trace_ELBO

    with pytest.raises(ValueError, match=r"outside the decoder's data range"):
        Trace_ELBO().loss(vae.model, vae.guide, {"img": 50 * torch.rand(2, 4)})


def test_a_weighting_of_the_wrong_shape_is_named():
    """Catches: a user's weighting(t, sde) returning a scalar or a (B, 1) tensor, which broadcast
    silently (a (B, B) loss) or failed deep inside torch."""
    from pyro_diffmvae import ScoreMatchingLikelihood

    class Eps(nn.Module):
        def forward(self, x_t, z, t):
            return torch.zeros_like(x_t)

    for bad, got in [(lambda t, sde: t[:, None], r"\(5, 1\)"), (lambda t, sde: 1.0, "float")]:
        lik = ScoreMatchingLikelihood(Eps(), None, VPSDE(), weighting=bad, event_shape=(2,), batch_shape=(5,))
        with pytest.raises(ValueError, match=rf"returned {got} for t of shape \(5,\): a weighting\(t, sde\) must return "
                                             r"a tensor of t's shape"):
            lik.log_prob(torch.zeros(5, 2))


def test_a_batch_without_any_example_of_a_diffusion_modality_still_trains():
    """Catches: the range check reducing an empty tensor (``aminmax`` of no element is an error), so a
    batch in which no example has the image crashed instead of contributing the other modalities."""
    from pyro.infer import Trace_ELBO

    from pyro_diffmvae import DiffusionDecoder

    class Eps(nn.Module):
        def forward(self, x_t, z, t):
            return torch.zeros_like(x_t)

    decoder = DiffusionDecoder(Eps(), (4,), weighting="simple", output_range=(-1.0, 1.0))
    vae = MultimodalVAE([Modality("img", Expert(4), decoder),
                         Modality("b", Expert(4), FeedForwardDecoder(nn.Linear(D, 4), (4,), "normal", scale=1.0))],
                        D, fusion="mopoe")
    vae.modalities["img"].check_data(torch.empty(0, 4))
    batch = {"img": torch.zeros(2, 4), "b": torch.randn(2, 4), "available": {"img": torch.tensor([False, False])}}
    assert math.isfinite(Trace_ELBO().loss(vae.model, vae.guide, batch))
    with pytest.raises(ValueError, match=r"modality 'img': data contains non-finite values"):
        vae.modalities["img"].check_data(torch.tensor([[0.0, float("nan"), 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"modality 'img': data contains non-finite values"):
        vae.modalities["img"].check_data(torch.tensor([[0.0, float("-inf"), 0.0, 0.0]]))
