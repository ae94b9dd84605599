r"""Sampling a diffusion decoder in bfloat16: its ε-network under autocast, the sampler in float32.

A reverse-time sampler spends nearly all its time in the network (10–1,000 calls per image); the solver's
arithmetic is cheap. With ``sample_precision="bf16"`` each call runs under ``torch.autocast`` with
``torch.bfloat16`` (convolutions and matrix products in bf16, reductions and normalisations as autocast
chooses) and its output is returned in the input's dtype, so the sampler's state, the data prediction
:math:`\hat x_0 = (x_t - \sigma_t\hat\epsilon)/\alpha_t`, clipping and the solver's steps stay in float32.

**Cost and accuracy.** On a CPU with AVX512-BF16 (AMD Zen 4, Intel Sapphire Rapids and later) the UNet's
calls run about 1.6–1.9× faster; on CPUs without it bf16 is emulated and slower — on a CPU whose oneDNN has no
bf16 kernels at all (AVX2 only, no AVX-512) 8.4× slower than float32, measured on a 2-core AMD EPYC, and
:meth:`~pyro_diffmvae.modality.DiffusionDecoder.generate` warns there (:func:`bf16_is_native`); on GPUs it is
the usual fast path. ``experiments/benchmarks/bench_sample_precision.py`` measures both on the machine at hand.
bf16 keeps 8 bits of mantissa: the network's output carries a relative error of about 2⁻⁸ ≈ 0.4 %. A v- or
x₀-predicting network's :math:`\hat x_0` inherits that error as it is; an ε-predicting one's is multiplied by
:math:`\sigma_t/\alpha_t` (≈ 150 at t = 1 for the default VP schedule), so use bf16 sampling with
ε-prediction only after checking its effect (:func:`~pyro_diffmvae.metrics.denoising_error_by_time`, or an
FD at both precisions). The default, ``"fp32"``, changes nothing; reports say when bf16 was used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .decoder_settings import diffusion_decoder_setting

__all__ = ["SAMPLE_PRECISIONS", "check_sample_precision", "AutocastEps", "sample_precision", "bf16_is_native",
           "warn_if_bf16_is_emulated"]

#: the accepted names and the autocast dtype each stands for (``None``: no autocast)
SAMPLE_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


def check_sample_precision(name) -> str:
    if name not in SAMPLE_PRECISIONS:
        raise ValueError(f"unknown sample precision {name!r}; known: {sorted(SAMPLE_PRECISIONS)}")
    return name


def bf16_is_native(device) -> bool:
    """Whether bf16 autocast has fast kernels on ``device``: on a CPU, whether oneDNN reports bf16 support
    (AVX-512, or AVX512-BF16 / AMX where it runs natively); on CUDA, ``torch.cuda.is_bf16_supported()``; other
    devices are assumed to have it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN: no bf16 kernels either
            return False
    return True


def warn_if_bf16_is_emulated(device) -> None:
    """Warn (once per call site) that bf16 sampling on ``device`` is emulated and slower than float32."""
    if bf16_is_native(device):
        return
    where = (f"this CPU (capability {torch.backends.cpu.get_cpu_capability()})" if torch.device(device).type == "cpu"
             else f"device {device}")
    warnings.warn(f"sample_precision='bf16' on {where}: it has no fast bf16 kernels, so the network runs emulated "
                  "and slower than in float32 (8.4x slower on a 2-core AVX2 AMD EPYC, "
                  "experiments/results/bench_sample_precision_cpu.md); sample with sample_precision='fp32' "
                  "(evaluation.sample_precision=fp32)", stacklevel=3)


class AutocastEps(nn.Module):
    """``eps_net(x, z, t)`` under ``torch.autocast(x.device.type, dtype)``, its output cast back to ``x.dtype``."""

    def __init__(self, eps_net, dtype: torch.dtype):
        super().__init__()
        self.eps_net, self.dtype = eps_net, dtype

    def forward(self, x: torch.Tensor, z: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            eps = self.eps_net(x, z, t)
        return eps.to(x.dtype)


def sample_precision(vae, name: str | None):
    """Generate with ``name`` (``"fp32"`` or ``"bf16"``) in every diffusion decoder of ``vae`` for the block
    (``None``: each decoder's own); yields ``{modality: precision in use}`` for the diffusion decoders (empty
    without any) and restores every decoder's setting on exit."""
    if name is not None:
        check_sample_precision(name)
    return diffusion_decoder_setting(vae, "sample_precision", name)
