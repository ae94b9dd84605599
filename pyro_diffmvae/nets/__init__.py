"""Neural networks: the z- and t-conditioned UNet ε-predictor (encoders and decoders follow)."""

from .unet import ConditionalUNet

__all__ = ["ConditionalUNet"]
