import math

import pytest
import torch

from pyro_diffmvae.sde import VPSDE


class GaussianEpsPredictor(torch.nn.Module):
    r"""Linear ε-predictor of an isotropic Gaussian N(mean, var·I) (optionally z-dependent mean).

    For data N(m, s²I) the VP-SDE marginal is p_t = N(α_t m, v_t I), v_t = α_t² s² + σ_t², and the
    exact ε-predictor is ε*(x_t, t) = σ_t (x_t − α_t m)/v_t. ``scale`` multiplies it (a wrong
    predictor for scale ≠ 1). With ``z_to_mean=True`` the mean is z[:, :1] (broadcast over x).
    """

    def __init__(self, sde, mean=0.0, var=1.0, scale=1.0, z_to_mean=False):
        super().__init__()
        self.sde, self.mean, self.var, self.scale, self.z_to_mean = sde, mean, var, scale, z_to_mean

    def forward(self, x_t, z, t):
        pad = (-1,) + (1,) * (x_t.dim() - 1)
        alpha, sigma2 = self.sde.alpha(t).reshape(pad), self.sde.sigma2(t).reshape(pad)
        mean = z[:, :1].reshape(pad) if self.z_to_mean else self.mean
        v = alpha**2 * self.var + sigma2
        return self.scale * sigma2.sqrt() * (x_t - alpha * mean) / v


def gaussian_nll(x, mean, var):
    """−log N(x; mean, var·I) summed over the last dim."""
    d = x.shape[-1]
    return 0.5 * d * math.log(2 * math.pi * var) + 0.5 * ((x - mean) ** 2).sum(-1) / var


def load_paper_tables():
    """``experiments/paper_tables.py`` as a module (it is a script, not part of the package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("paper_tables", Path(__file__).resolve().parents[1] / "experiments"
                                                  / "paper_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def toy_evaluation(monkeypatch, routine):
    """``pyro_diffmvae.evaluation.routines.evaluate`` on a toy data set whose routine is ``routine`` (called as the
    data set's), without the joint log-likelihood, with a not-a-bound ledger whose model is "toy" and whose one
    diffusion decoder is "a"."""
    import types

    from pyro_diffmvae.evaluation import routines

    monkeypatch.setattr(routines, "get_dataset", lambda cfg: types.SimpleNamespace(
        name="toy", evaluation=types.SimpleNamespace(routine="toy"), modalities=lambda cfg: {}))
    monkeypatch.setitem(routines.ROUTINES, "toy", routine)
    monkeypatch.setattr(routines, "joint_log_likelihood", lambda *a, **k: None)
    monkeypatch.setattr(routines, "bound_ledger", lambda vae, cfg, metrics, objective: {
        "model": "toy", "is_bound": False, "diffusion_decoders": {"a": {}}})
    return routines.evaluate


@pytest.fixture
def sde():
    return VPSDE()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
