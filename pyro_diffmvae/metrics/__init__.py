"""Evaluation metrics: sample F1, FID / feature Fréchet distances, factor coherence (trained and published
classifiers), bits per dimension, the probability-flow ODE log-likelihood, CLIP score, and a diffusion decoder's
denoising error by time.

Not re-exported by ``pyro_diffmvae/__init__``; use ``from pyro_diffmvae.metrics import ...``.
"""

from .clip_score import CLIPScore, clip_scores
from .denoising_error import denoising_error_by_time
from .coherence import (
    FactorClassifier,
    agreement,
    factor_accuracy,
    load_or_train_classifier,
    predict_factors,
    train_factor_classifier,
)
from .f1 import UndefinedMetricWarning, binarize, sample_f1
from .fid import FeatureFID, FIDInceptionFeatures, InceptionFeatures, feature_statistics, frechet_distance, quantize_images
from .likelihood import BitsPerDim, bits_per_dim, diffusion_bpd, diffusion_nll
from .ode_likelihood import ODELogLikelihood, ode_log_likelihood
from .published_classifiers import MoPoEDigitClassifier, PublishedClassifier, load_mopoe_digit_classifier

__all__ = [
    "denoising_error_by_time",
    "sample_f1",
    "binarize",
    "UndefinedMetricWarning",
    "frechet_distance",
    "feature_statistics",
    "InceptionFeatures",
    "FIDInceptionFeatures",
    "quantize_images",
    "FeatureFID",
    "FactorClassifier",
    "MoPoEDigitClassifier",
    "PublishedClassifier",
    "load_mopoe_digit_classifier",
    "train_factor_classifier",
    "load_or_train_classifier",
    "predict_factors",
    "factor_accuracy",
    "agreement",
    "bits_per_dim",
    "diffusion_nll",
    "diffusion_bpd",
    "BitsPerDim",
    "ode_log_likelihood",
    "ODELogLikelihood",
    "CLIPScore",
    "clip_scores",
]
