"""pyro-diffmvae: multimodal VAEs with diffusion decoders (Diff-MVAE) as Pyro probabilistic programs.

The public API is re-exported here; see each module for the math behind it. Data flow:
data → batch → guide (experts → fusion → z) → model (prior → likelihoods) → objective → optimiser;
sampling: (given modalities → posterior | latent prior) → z → decoders.
"""

from .fusion import FUSIONS, Fusion, make_fusion, poe, subset_family, subset_weights
from .likelihoods import ScoreMatchingLikelihood
from .loglik import LogLikelihood, log_likelihood
from .modality import DiffusionDecoder, FeedForwardDecoder, Modality
from .model import MultimodalVAE
from .objectives import ELBO, OBJECTIVES, Objective, elbo_terms, make_objective
from .nets.unet import ConditionalUNet
from .pretrained import from_pretrained, save_pretrained
from .prior import LatentMLP, LatentScorePrior, LatentUNet, collect_latents
from .samplers import SAMPLERS, sample, sample_ddim, sample_dpmpp_2m, sample_probability_flow, sample_reverse_sde
from .sde import VPSDE
from .weighting import WEIGHTINGS, get_weighting, likelihood_weighting, simple_weighting, unit_weighting

def _version() -> str:
    """The installed distribution's version (pyproject.toml is the one place it is written)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyro-diffmvae")
    except PackageNotFoundError:  # a source tree on sys.path that was never installed
        return "0+unknown"


__version__ = _version()

#: names whose modules import Lightning (about 8 s on a 2-core CPU, through torchmetrics and
#: torchvision): loaded on first use, so that ``import pyro_diffmvae`` (the apps' start, a notebook)
#: does not pay for it unless it trains with Lightning
_LAZY = {"DiffMVAEModule": ".training", "make_trainer": ".training", "fit_svi": ".training"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "VPSDE",
    "ScoreMatchingLikelihood",
    "ConditionalUNet",
    "SAMPLERS",
    "sample",
    "sample_ddim",
    "sample_dpmpp_2m",
    "sample_probability_flow",
    "sample_reverse_sde",
    "WEIGHTINGS",
    "get_weighting",
    "likelihood_weighting",
    "simple_weighting",
    "unit_weighting",
    "poe",
    "Fusion",
    "FUSIONS",
    "make_fusion",
    "Objective",
    "OBJECTIVES",
    "ELBO",
    "make_objective",
    "subset_family",
    "subset_weights",
    "Modality",
    "FeedForwardDecoder",
    "DiffusionDecoder",
    "MultimodalVAE",
    "log_likelihood",
    "LogLikelihood",
    "elbo_terms",
    "LatentScorePrior",
    "LatentMLP",
    "LatentUNet",
    "collect_latents",
    "save_pretrained",
    "from_pretrained",
    "DiffMVAEModule",
    "make_trainer",
    "fit_svi",
]
