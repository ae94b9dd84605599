"""pyro-diffmvae: multimodal VAEs with diffusion decoders (Diff-MVAE) as Pyro probabilistic programs.

The public API is re-exported here; see each module for the math behind it. Data flow:
data → batch → guide (experts → fusion → z) → model (prior → likelihoods) → ELBO → optimiser;
sampling: (given modalities → posterior | latent prior) → z → decoders.
"""

from .fusion import poe, subset_family, subset_weights
from .likelihoods import ScoreMatchingLikelihood
from .modality import DiffusionDecoder, FeedForwardDecoder, Modality
from .model import MultimodalVAE, elbo_terms
from .nets.unet import ConditionalUNet
from .prior import LatentMLP, LatentScorePrior, LatentUNet, collect_latents
from .samplers import SAMPLERS, sample, sample_ddim, sample_probability_flow, sample_reverse_sde
from .sde import VPSDE
from .train import DiffMVAEModule, fit_svi, make_trainer
from .weighting import WEIGHTINGS, get_weighting, likelihood_weighting, simple_weighting, unit_weighting

__version__ = "0.1.0"

__all__ = [
    "VPSDE",
    "ScoreMatchingLikelihood",
    "ConditionalUNet",
    "SAMPLERS",
    "sample",
    "sample_ddim",
    "sample_probability_flow",
    "sample_reverse_sde",
    "WEIGHTINGS",
    "get_weighting",
    "likelihood_weighting",
    "simple_weighting",
    "unit_weighting",
    "poe",
    "subset_family",
    "subset_weights",
    "Modality",
    "FeedForwardDecoder",
    "DiffusionDecoder",
    "MultimodalVAE",
    "elbo_terms",
    "LatentScorePrior",
    "LatentMLP",
    "LatentUNet",
    "collect_latents",
    "DiffMVAEModule",
    "make_trainer",
    "fit_svi",
]
