"""pyro-diffmvae: multimodal VAEs with diffusion decoders (Diff-MVAE) as Pyro probabilistic programs.

The public API is re-exported here; see each module for the math behind it.
"""

from .likelihoods import ScoreMatchingLikelihood
from .nets.unet import ConditionalUNet
from .samplers import SAMPLERS, sample, sample_ddim, sample_probability_flow, sample_reverse_sde
from .sde import VPSDE
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
]
