r"""Fréchet distances between image sets in a pluggable feature space (FID and relatives).

For feature sets with means :math:`\mu_1,\mu_2` and covariances :math:`\Sigma_1,\Sigma_2`

.. math::

    \mathrm{FD} = \|\mu_1-\mu_2\|^2 + \operatorname{tr}\big(\Sigma_1 + \Sigma_2
      - 2(\Sigma_1\Sigma_2)^{1/2}\big).

:class:`FeatureFID` accumulates the statistics with
:class:`torchmetrics.image.fid.FrechetInceptionDistance`, handing it a feature module:

* :class:`FIDInceptionFeatures` — **the FID of published tables**: the FID Inception-v3 (the
  2015-12-05 TensorFlow graph's weights, as ``pytorch-fid`` and ``torch-fidelity`` use them) through
  torchmetrics' ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=<file>)``,
  which runs ``torch-fidelity``'s ``FeatureExtractorInceptionV3`` (the ``torch-fidelity`` package is
  needed). The weights come from a **local file** (never downloaded): torch-fidelity's
  ``weights-inception-2015-12-05-6726825d.pth`` (pytorch-fid distributes the same weights as
  ``pt_inception-2015-12-05-6726825d.pth``). Images are quantised to ``uint8`` first
  (:func:`quantize_images`), as the reference implementations read saved PNGs, and resized to
  299×299 with TensorFlow-1 bilinear interpolation (torchmetrics' ``antialias=False``, the
  reference's resize). Reported as ``"FID"``.
* :class:`InceptionFeatures` — torchvision's ImageNet Inception-v3 from a local file, 2048-d pool
  features, also reported as ``"FID"`` by :class:`FeatureFID`, but **not** the FID of published
  tables (other weights, another architecture variant, another resize); compare only numbers
  computed with the same weights file. The evaluation uses :class:`FIDInceptionFeatures`.
* any ``nn.Module`` mapping images to ``(N, d)`` features, e.g. a data set classifier's
  penultimate layer (:meth:`~pyro_diffmvae.metrics.coherence.FactorClassifier.feature_extractor`).
  The result is a Fréchet distance in that feature space, reported as ``"FD_<name>"`` so that it is
  never mistaken for Inception FID.

Image convention: :meth:`FeatureFID.update` takes the library's images, float in **[-1, 1]**
(``uint8`` in [0, 255] is also accepted and mapped by ``x/127.5 - 1``). Float values slightly
outside [-1, 1] (diffusion samples) are clamped; values further out than ``range_tolerance``
are an error (they usually mean [0, 255] floats were passed). Extractors receive [-1, 1] images;
the Inception extractors convert them to what their network expects themselves.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..io import read_state_dict

__all__ = ["frechet_distance", "feature_statistics", "quantize_images", "InceptionFeatures", "FIDInceptionFeatures",
           "FeatureFID", "FID_INCEPTION_WEIGHTS_FILE"]

#: torch-fidelity's file name of the FID Inception weights (pytorch-fid: ``pt_inception-2015-12-05-6726825d.pth``)
FID_INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _np64(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    a = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"frechet_distance: {name} contains non-finite values")
    return a


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (divisor N − 1, as torchmetrics) of ``(N, d)`` features, float64."""
    f = _np64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feature_statistics needs an (N, d) array with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    r"""Fréchet distance between :math:`\mathcal N(\mu_1,\Sigma_1)` and :math:`\mathcal N(\mu_2,\Sigma_2)`.

    Computed in float64 with symmetric eigendecompositions:
    :math:`\operatorname{tr}(\Sigma_1\Sigma_2)^{1/2} = \sum_i \sqrt{\lambda_i}` with
    :math:`\lambda_i` the eigenvalues of the PSD matrix :math:`\Sigma_1^{1/2}\Sigma_2\Sigma_1^{1/2}`
    (which has the same spectrum as :math:`\Sigma_1\Sigma_2`); tiny negative eigenvalues from
    round-off are clipped to 0. Covariances must be symmetric (to 1e-6 relative).
    """
    m1, m2 = _np64(mu1, "mu1").reshape(-1), _np64(mu2, "mu2").reshape(-1)
    s1, s2 = _np64(sigma1, "sigma1"), _np64(sigma2, "sigma2")
    d = m1.shape[0]
    if m2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"frechet_distance: shapes disagree: mu1 {m1.shape}, sigma1 {s1.shape}, mu2 {m2.shape}, sigma2 {s2.shape}"
        )
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if not np.allclose(s, s.T, rtol=1e-6, atol=1e-6 * max(1.0, float(np.abs(s).max()))):
            raise ValueError(f"frechet_distance: {name} is not symmetric")
    r1 = _sqrt_psd((s1 + s1.T) / 2)
    m = r1 @ ((s2 + s2.T) / 2) @ r1
    lam = np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)
    diff = m1 - m2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.sqrt(lam).sum())


def _check_gray_or_rgb(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"{who} expects images of shape (N, 1 or 3, H, W), got {tuple(x.shape)}")


class InceptionFeatures(nn.Module):
    """torchvision Inception-v3 pool features (2048-d) with weights from a local file.

    :param weights_path: a ``state_dict`` saved with ``torch.save`` (e.g. torchvision's
        ``inception_v3_google-0cc3c7bd.pth``). A missing file is a :class:`FileNotFoundError`;
        nothing is ever downloaded. Whether the file has the auxiliary classifier
        (``AuxLogits.*``) and how many classes its ``fc`` has are read from the file.
    :param transform_input: torchvision's flag, ``True`` for its ImageNet weights (it sets this
        when it loads them itself).
    :param antialias: antialiased bilinear resize to 299×299.

    ``forward`` takes images in [-1, 1] of shape ``(N, 1 or 3, H, W)``, maps them to [0, 1],
    repeats a single channel to RGB, resizes to 299×299 and normalises with the ImageNet mean/std
    (torchvision's preprocessing for this model), and returns ``(N, 2048)`` features (the
    average-pool output, i.e. ``fc`` replaced by the identity). The module is always in eval mode.
    """

    num_features = 2048
    input_size = 299

    def __init__(self, weights_path, transform_input: bool = True, antialias: bool = True):
        super().__init__()
        from torchvision.models import inception_v3

        path = os.fspath(weights_path)
        state = read_state_dict(path, "torchvision Inception-v3 weights (e.g. inception_v3_google-0cc3c7bd.pth)")
        if "fc.weight" not in state:
            raise ValueError(
                f"{path!r} does not hold an Inception-v3 state_dict (no 'fc.weight' key); "
                "save it with torch.save(model.state_dict(), path)"
            )
        aux = any(k.startswith("AuxLogits.") for k in state)
        net = inception_v3(
            weights=None,
            aux_logits=aux,
            init_weights=False,
            transform_input=transform_input,
            num_classes=int(state["fc.weight"].shape[0]),
        )
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{path!r} is not a torchvision Inception-v3 state_dict: {e}") from e
        net.fc = nn.Identity()
        net.AuxLogits = None
        net.aux_logits = False
        self.net = net
        self.weights_path = path
        self.antialias = antialias
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → resized, ImageNet-normalised RGB batch of shape (N, 3, 299, 299)."""
        _check_gray_or_rgb(x, "InceptionFeatures")
        x = (x.float() + 1.0) / 2.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False, antialias=self.antialias
            )
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))


def quantize_images(x: torch.Tensor) -> torch.Tensor:
    r"""Images in [-1, 1] → ``uint8`` in [0, 255], as saving them as PNG does:
    :math:`u = \lfloor 255\,(x+1)/2 + \tfrac12 \rfloor` clamped to [0, 255] (``torchvision.utils.save_image``'s
    rounding: round half up). ``uint8`` input is returned as it is."""
    if x.dtype == torch.uint8:
        return x
    return ((x.float() + 1.0) / 2.0).mul(255).add(0.5).clamp(0, 255).to(torch.uint8)


class FIDInceptionFeatures(nn.Module):
    """The FID Inception-v3's 2048-d pool features (module docstring), weights from a local file.

    :param weights_path: torch-fidelity's ``FeatureExtractorInceptionV3`` state dict
        (``weights-inception-2015-12-05-6726825d.pth``). It is read with
        ``torch.load(weights_only=True)`` first (:func:`~pyro_diffmvae.io.read_state_dict`: a missing
        file, a corrupt one or a pickled module is an error naming it), then handed to torchmetrics'
        ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=..., antialias=False)``,
        whose network this module runs; wrong keys or shapes are a :class:`ValueError` naming the file.
    :param antialias: torchmetrics' flag; ``False`` (the default) resizes as the reference FID does.

    ``forward`` takes images in [-1, 1] (or ``uint8``) of shape ``(N, 1 or 3, H, W)``, quantises them
    to ``uint8`` (:func:`quantize_images`), repeats a single channel to RGB and returns ``(N, 2048)``
    features — exactly torchmetrics' FID features of the quantised images. Always in eval mode.
    """

    num_features = 2048

    def __init__(self, weights_path, antialias: bool = False):
        super().__init__()
        path = os.fspath(weights_path)
        read_state_dict(path, f"FID Inception weights (torch-fidelity's {FID_INCEPTION_WEIGHTS_FILE})")
        try:
            from torchmetrics.image.fid import FrechetInceptionDistance

            metric = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=path, antialias=antialias)
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(f"the FID Inception needs the torch-fidelity package (pip install torch-fidelity): {e}") from e
        except RuntimeError as e:  # load_state_dict: missing / unexpected keys, wrong shapes
            raise ValueError(f"{path!r} is not a torch-fidelity FeatureExtractorInceptionV3 state dict: {e}") from e
        self.net = metric.inception
        self.weights_path = path
        self.antialias = antialias
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_gray_or_rgb(x, "FIDInceptionFeatures")
        u = quantize_images(x)
        return self.net(u.expand(-1, 3, -1, -1) if u.shape[1] == 1 else u)


class _FeatureAdapter(nn.Module):
    """Runs the user's extractor in eval mode and checks/flattens its output to (N, d)."""

    def __init__(self, extractor: nn.Module, num_features: int):
        super().__init__()
        self.extractor = extractor
        self.num_features = int(num_features)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.extractor(x)
        if not isinstance(f, torch.Tensor):
            raise TypeError(f"feature extractor must return a tensor of shape (N, d), got {type(f).__name__}")
        f = f.reshape(f.shape[0], -1) if f.dim() != 2 else f
        if f.shape != (x.shape[0], self.num_features):
            raise ValueError(
                f"feature extractor returned shape {tuple(f.shape)}, expected ({x.shape[0]}, {self.num_features})"
            )
        if not torch.isfinite(f).all():
            raise ValueError("feature extractor returned non-finite features")
        return f


class FeatureFID:
    r"""Fréchet distance between real and generated images in an extractor's feature space.

    :param extractor: an :class:`FIDInceptionFeatures` or :class:`InceptionFeatures` (→
        ``metric_name == "FID"``) or any
        ``nn.Module`` mapping ``(N, ...)`` images in [-1, 1] to ``(N, d)`` features
        (→ ``metric_name == "FD_<name>"``). It is put in eval mode and run without gradients.
    :param name: short name of the feature space for a non-Inception extractor (required then,
        e.g. ``"shapes_clf"``); ignored for Inception.
    :param num_features: ``d``; default: ``extractor.num_features`` if present, else probed on
        the first batch.
    :param reset_real_features: as in torchmetrics: ``False`` keeps the real statistics across
        :meth:`reset` (compute them once, compare many generators).
    :param range_tolerance: float images may exceed [-1, 1] by this much (then they are clamped);
        further out is an error.

    Example::

        >>> fid = FeatureFID(FIDInceptionFeatures("weights/weights-inception-2015-12-05-6726825d.pth"))
        >>> fid.update(test_images, real=True); fid.update(samples, real=False)
        >>> {fid.metric_name: fid.compute()}
    """

    def __init__(
        self,
        extractor: nn.Module,
        name: Optional[str] = None,
        *,
        num_features: Optional[int] = None,
        reset_real_features: bool = True,
        range_tolerance: float = 0.5,
    ):
        if not isinstance(extractor, nn.Module):
            raise TypeError(f"extractor must be an nn.Module, got {type(extractor).__name__}")
        self.is_inception = isinstance(extractor, (InceptionFeatures, FIDInceptionFeatures))
        if not self.is_inception:
            if not name or not isinstance(name, str):
                raise ValueError(
                    "a non-Inception feature extractor needs a name (the result is reported as "
                    "'FD_<name>', a Fréchet distance in that feature space, not FID)"
                )
            self.name = name
        else:
            self.name = "inception"
        self.extractor = extractor.eval()
        if num_features is None:
            nf = getattr(extractor, "num_features", None)
            if isinstance(nf, torch.Tensor):
                nf = int(nf.item())
            num_features = nf if isinstance(nf, int) else None
        self.num_features = num_features
        self.reset_real_features = reset_real_features
        self.range_tolerance = float(range_tolerance)
        self._metric = None
        if num_features is not None:
            self._build(num_features)

    @classmethod
    def inception(cls, weights_path, **kwargs) -> "FeatureFID":
        """FID with torchvision's :class:`InceptionFeatures` loaded from ``weights_path``."""
        return cls(InceptionFeatures(weights_path), **kwargs)

    @classmethod
    def fid_inception(cls, weights_path, **kwargs) -> "FeatureFID":
        """The FID of published tables: :class:`FIDInceptionFeatures` loaded from ``weights_path``."""
        return cls(FIDInceptionFeatures(weights_path), **kwargs)

    @property
    def metric_name(self) -> str:
        """``"FID"`` for the Inception extractor, else ``"FD_<name>"``."""
        return "FID" if self.is_inception else f"FD_{self.name}"

    @property
    def num_real(self) -> int:
        return 0 if self._metric is None else int(self._metric.real_features_num_samples)

    @property
    def num_fake(self) -> int:
        return 0 if self._metric is None else int(self._metric.fake_features_num_samples)

    def _build(self, num_features: int) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.num_features = int(num_features)
        self._metric = FrechetInceptionDistance(
            feature=_FeatureAdapter(self.extractor, self.num_features),
            reset_real_features=self.reset_real_features,
            normalize=True,  # custom extractor: float inputs (only affects torchmetrics' shape probe)
        )

    def _device(self):
        p = next(self.extractor.parameters(), None)
        return p.device if p is not None else None

    def _prepare(self, images) -> torch.Tensor:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.dim() < 2 or images.shape[0] == 0:
            raise ValueError(f"images must have shape (N, ...) with N >= 1, got {tuple(images.shape)}")
        if images.dtype == torch.uint8:
            x = images.float() / 127.5 - 1.0
        elif images.is_floating_point():
            x = images.detach()
            if not torch.isfinite(x).all():
                raise ValueError("images contain non-finite values")
            lo, hi = float(x.min()), float(x.max())
            if lo < -1 - self.range_tolerance or hi > 1 + self.range_tolerance:
                raise ValueError(
                    f"images must lie in [-1, 1] (the library's convention), got range [{lo:.3g}, {hi:.3g}]; "
                    "convert [0, 1] images with 2*x - 1 and [0, 255] ones with x/127.5 - 1"
                )
            x = x.clamp(-1.0, 1.0)
        else:
            raise ValueError(f"images must be float in [-1, 1] or uint8, got {images.dtype}")
        dev = self._device()
        return x.to(dev) if dev is not None else x

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of real (``real=True``) or generated images, float in [-1, 1] or uint8."""
        x = self._prepare(images)
        if self._metric is None:
            with torch.no_grad():
                f = self.extractor(x[:1])
            self._build(f.reshape(1, -1).shape[1])
        self._metric.update(x, real=bool(real))

    def compute(self) -> float:
        """The Fréchet distance between the accumulated real and generated statistics."""
        if self.num_real < 2 or self.num_fake < 2:
            raise RuntimeError(
                f"{self.metric_name} needs at least 2 real and 2 generated images, got "
                f"{self.num_real} real and {self.num_fake} generated"
            )
        return float(self._metric.compute())

    def statistics(self, real: bool) -> tuple[np.ndarray, np.ndarray]:
        """The accumulated mean and covariance (float64, divisor N − 1) of the real or generated features."""
        m = self._metric
        n = self.num_real if real else self.num_fake
        if n < 2:
            raise RuntimeError(f"need at least 2 {'real' if real else 'generated'} images, got {n}")
        s = (m.real_features_sum if real else m.fake_features_sum).double().cpu()
        c = (m.real_features_cov_sum if real else m.fake_features_cov_sum).double().cpu()
        mu = s / n
        cov = (c - n * torch.outer(mu, mu)) / (n - 1)
        return mu.numpy(), cov.numpy()

    def reset(self) -> None:
        """Forget the generated statistics (and the real ones unless ``reset_real_features=False``)."""
        if self._metric is not None:
            self._metric.reset()

    def to(self, device) -> "FeatureFID":
        self.extractor.to(device)
        if self._metric is not None:
            self._metric.to(device)
        return self

    def __repr__(self):
        return f"FeatureFID({self.metric_name}, num_features={self.num_features}, real={self.num_real}, fake={self.num_fake})"
