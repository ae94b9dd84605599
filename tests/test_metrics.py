"""Tests of pyro_diffmvae.metrics: sample F1, Fréchet distances, factor coherence, bits per dimension."""

import math
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pyro_diffmvae.likelihoods import ScoreMatchingLikelihood
from pyro_diffmvae.metrics import (
    FactorClassifier,
    FeatureFID,
    InceptionFeatures,
    UndefinedMetricWarning,
    agreement,
    binarize,
    bits_per_dim,
    diffusion_bpd,
    diffusion_nll,
    factor_accuracy,
    feature_statistics,
    frechet_distance,
    load_or_train_classifier,
    predict_factors,
    sample_f1,
    train_factor_classifier,
)
from pyro_diffmvae.modality import DiffusionDecoder, FeedForwardDecoder
from pyro_diffmvae.sde import VPSDE



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The models here are tiny: with 2 threads on a shared 2-core machine, thread contention made the
    # classifier test ~50x slower (16 s instead of 0.3 s). Restored afterwards for other test modules.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- F1


def test_sample_f1_matches_sklearn_including_empty_rows():
    skm = pytest.importorskip("sklearn.metrics", reason="scikit-learn is needed for the reference F1")
    rng = np.random.default_rng(0)
    for trial in range(5):
        t = (rng.random((60, 7)) < 0.2).astype(int)
        p = (rng.random((60, 7)) < 0.2).astype(int)
        t[:4] = 0
        p[:2] = 0  # rows 0-1 both empty, rows 2-3 empty target only
        p[10] = 0  # empty prediction only (if t[10] has ones)
        for zd in ["warn", 0.0, 1.0, float("nan")]:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = skm.f1_score(t, p, average="samples", zero_division=zd)
                got = sample_f1(torch.from_numpy(p), torch.from_numpy(t).bool(), zero_division=zd)
            assert got == pytest.approx(ref, abs=1e-12), (trial, zd)
    # dims after the first are flattened
    t3 = rng.random((20, 2, 3)) < 0.3
    p3 = rng.random((20, 2, 3)) < 0.3
    ref = skm.f1_score(t3.reshape(20, -1), p3.reshape(20, -1), average="samples", zero_division=1.0)
    assert sample_f1(p3, t3, zero_division=1.0) == pytest.approx(ref, abs=1e-12)


def test_sample_f1_hand_computed():
    pred = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    target = torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 1]])
    # example 1: 2*1/(2+1) = 2/3; example 2: both empty -> zero_division; example 3: no overlap -> 0
    with pytest.warns(UndefinedMetricWarning, match="1 of 3 samples"):
        assert sample_f1(pred, target) == pytest.approx(2 / 9)
    assert sample_f1(pred, target, zero_division=0.0) == pytest.approx(2 / 9)
    assert sample_f1(pred, target, zero_division=1.0) == pytest.approx(5 / 9)
    assert sample_f1(pred, target, zero_division=float("nan")) == pytest.approx(1 / 3)
    assert math.isnan(sample_f1(torch.zeros(2, 3), torch.zeros(2, 3), zero_division=float("nan")))
    assert sample_f1(target, target, zero_division=1.0) == 1.0


def test_sample_f1_errors_and_binarize():
    with pytest.raises(ValueError, match=r"shape \(3, 4\).*\(3, 5\)"):
        sample_f1(torch.zeros(3, 4), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="binary.*binarize"):
        sample_f1(torch.tensor([[0.7, 0.0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="binary"):
        sample_f1(torch.tensor([[2, 0]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="zero_division"):
        sample_f1(torch.ones(1, 2), torch.ones(1, 2), zero_division=0.5)
    probs = torch.tensor([[0.2, 0.5, 0.51, 0.9]])
    assert binarize(probs).tolist() == [[False, False, True, True]]
    assert binarize(probs, threshold=0.3).tolist() == [[False, True, True, True]]
    assert sample_f1(binarize(probs), torch.tensor([[0, 0, 1, 1]])) == 1.0


# ---------------------------------------------------------------------------- FID


class Scaled(nn.Module):
    """Features = factor * flattened image (lets Gaussian feature draws pass through [-1, 1] images)."""

    def __init__(self, factor=1.0):
        super().__init__()
        self.factor = factor

    def forward(self, x):
        return self.factor * x.flatten(1)


def test_frechet_distance_diagonal_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 3.0, -1.0])
    s1, s2 = np.array([1.0, 4.0, 0.25]), np.array([4.0, 1.0, 0.25])
    # ||mu1-mu2||^2 = 1 + 4 = 5; sum(s1 + s2 - 2 sqrt(s1 s2)) = (5-4) + (5-4) + 0 = 2
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(7.0, abs=1e-10)
    # torch inputs and a non-diagonal pair against scipy's sqrtm
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = a @ a.T, b @ b.T
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    ref = ((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * sqrtm(c1 @ c2).real)
    got = frechet_distance(torch.from_numpy(m1), torch.from_numpy(c1), m2, c2)
    assert got == pytest.approx(ref, rel=1e-8)
    with pytest.raises(ValueError, match="shapes disagree"):
        frechet_distance(m1, c1, m2[:4], c2)
    with pytest.raises(ValueError, match="not symmetric"):
        frechet_distance(m1, a, m2, c2)


def test_fid_identical_sets_is_zero_and_naming():
    x = torch.rand(400, 3, 2, 2) * 2 - 1  # 12 features
    fd = FeatureFID(nn.Flatten(), "pix")
    assert fd.metric_name == "FD_pix"
    fd.update(x[:250], real=True)
    fd.update(x[250:], real=True)
    fd.update(x, real=False)
    assert (fd.num_real, fd.num_fake, fd.num_features) == (400, 400, 12)
    assert abs(fd.compute()) < 1e-3
    fd.reset()
    assert fd.num_real == 0 and fd.num_fake == 0
    with pytest.raises(RuntimeError, match="at least 2 real"):
        fd.compute()
    with pytest.raises(ValueError, match="needs a name"):
        FeatureFID(nn.Flatten())
    # a classifier's penultimate features are "FD_<name>", never "FID"
    clf = FactorClassifier(3, 8, [2, 3], width=4)
    assert FeatureFID(clf.feature_extractor(), "clf").metric_name == "FD_clf"


def test_fid_image_range_handling():
    fd = FeatureFID(nn.Flatten(), "pix")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fd.update(torch.full((4, 1, 2, 2), 200.0), real=True)  # [0, 255] floats
    fd.update(torch.full((3, 1, 1, 1), 1.2), real=True)  # clamped to 1
    fd.update(torch.full((3, 1, 1, 1), 255, dtype=torch.uint8), real=False)  # uint8 255 -> 1
    assert abs(fd.compute()) < 1e-9
    mu, _ = fd.statistics(real=True)
    assert mu.tolist() == [1.0]


def test_fid_of_gaussian_features_matches_true_parameters():
    torch.manual_seed(0)
    mu1, mu2 = torch.tensor([0.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, -0.5, 0.5, 0.0])
    a = torch.tensor([[1, 0.3, 0, 0], [0, 1, 0.2, 0], [0, 0, 0.8, 0.1], [0, 0, 0, 0.5]])
    b = torch.tensor([[0.7, 0, 0, 0], [0.2, 1.2, 0, 0], [0, 0.3, 0.6, 0], [0.1, 0, 0, 1]])
    s1, s2 = a @ a.T, b @ b.T
    n, scale = 20_000, 20.0
    f1 = torch.distributions.MultivariateNormal(mu1, s1).sample((n,)).double()
    f2 = torch.distributions.MultivariateNormal(mu2, s2).sample((n,)).double()
    fd = FeatureFID(Scaled(scale), "gauss")
    # images are features / 20 (|feature| < 20 always here) so they lie in [-1, 1]; the extractor undoes it
    fd.update((f1 / scale).reshape(n, 4, 1, 1), real=True)
    fd.update((f2 / scale).reshape(n, 4, 1, 1), real=False)
    est = fd.compute()
    true = frechet_distance(mu1, s1, mu2, s2)
    # The plug-in estimate's bias is O(d tr(S)/n) ~ 1e-3, and its sd is dominated by the mean term,
    # 2 sqrt(dmu^T (S1 + S2) dmu / n) = 0.019 here (0.019 measured over 200 seeds), so 0.1 is ~5 sd.
    assert abs(est - true) < 0.1, (est, true)
    assert true > 1.5  # the tolerance is small relative to the value
    # the torchmetrics result equals the closed form applied to its accumulated statistics
    assert est == pytest.approx(frechet_distance(*fd.statistics(True), *fd.statistics(False)), rel=1e-4)
    # and the statistics are those of the features
    m, c = feature_statistics(f1)
    np.testing.assert_allclose(fd.statistics(True)[0], m, atol=1e-5)
    np.testing.assert_allclose(fd.statistics(True)[1], c, atol=1e-4)


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path_factory.mktemp("inception") / "inception_random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_inception_loading_errors(tmp_path):
    missing = tmp_path / "no_such_inception.pth"
    with pytest.raises(FileNotFoundError, match="no_such_inception.pth"):
        InceptionFeatures(missing)
    with pytest.raises(FileNotFoundError, match="no_such_inception.pth"):
        FeatureFID.inception(missing)
    bad = tmp_path / "bad.pth"
    torch.save({"a": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth"):
        InceptionFeatures(bad)


def test_inception_features_from_local_file(inception_file):
    from torchvision.models import inception_v3
    from torchvision.transforms.v2 import functional as TF

    inc = InceptionFeatures(inception_file)
    assert inc.num_features == 2048 and not inc.training
    inc.train()
    assert not inc.training  # stays in eval mode
    torch.manual_seed(1)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        f = inc(x)
        assert f.shape == (2, 2048) and torch.isfinite(f).all()
        # the same as torchvision's own pipeline: [0, 1] -> resize 299 -> ImageNet normalise -> net
        ref_net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
        ref_net.load_state_dict(torch.load(inception_file, weights_only=True))
        ref_net.fc = nn.Identity()
        ref_net.eval()
        y = TF.resize((x + 1) / 2, [299, 299], antialias=True)
        y = TF.normalize(y, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        torch.testing.assert_close(f, ref_net(y), rtol=1e-4, atol=1e-4)
        assert inc(x[:, :1]).shape == (2, 2048)  # grayscale is repeated to RGB
    fid = FeatureFID(inc)
    assert fid.metric_name == "FID" and fid.num_features == 2048
    fid.update(x, real=True)
    fid.update(x.flip(-1), real=False)
    assert fid.num_real == 2 and fid.num_fake == 2


@pytest.mark.slow
def test_inception_fid_compute(inception_file):
    # the 2048-d torchmetrics compute (eigvals of a 2048x2048 product) takes 3-7 s on one shared core
    # (~20 s with 2 contending threads); the same compute path is tested at small d above
    fid = FeatureFID.inception(inception_file)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    fid.update(x, real=True)
    fid.update(x, real=False)
    assert abs(fid.compute()) < 1e-2


# ---------------------------------------------------------------------- coherence


def synthetic_factor_images(n, seed):
    """3x8x8 images: factor 0 (3 classes) = the bright colour channel, factor 1 (2 classes) = bright half."""
    g = torch.Generator().manual_seed(seed)
    f = torch.stack([torch.randint(0, 3, (n,), generator=g), torch.randint(0, 2, (n,), generator=g)], 1)
    x = -0.5 + 0.3 * torch.randn(n, 3, 8, 8, generator=g)
    x[torch.arange(n), f[:, 0]] += 1.0
    half = torch.zeros(n, 1, 8, 8)
    half[f[:, 1] == 0, :, :, :4] = 0.6
    half[f[:, 1] == 1, :, :, 4:] = 0.6
    return (x + half).clamp(-1, 1), f


def test_factor_classifier_learns_separable_task():
    x, f = synthetic_factor_images(512, 0)
    xv, fv = synthetic_factor_images(256, 1)
    net, val = train_factor_classifier(x, f, [3, 2], val_images=xv, val_factors=fv, steps=120, batch_size=32, width=8, lr=3e-3, seed=0)
    assert isinstance(net, FactorClassifier) and not net.training
    assert val["all"] > 0.9 and min(val["per_factor"]) > 0.9, val
    pred = predict_factors(net, xv, batch_size=100)
    assert pred.shape == (256, 2) and pred.dtype == torch.long
    assert factor_accuracy(pred, fv) == val
    assert net.features(xv[:5]).shape == (5, net.num_features)
    # same seed, same classifier
    net2, _ = train_factor_classifier(x[:64], f[:64], [3, 2], steps=3, batch_size=32, width=8, seed=5)
    net3, _ = train_factor_classifier(x[:64], f[:64], [3, 2], steps=3, batch_size=32, width=8, seed=5)
    torch.testing.assert_close(net2.state_dict(), net3.state_dict())
    with pytest.raises(ValueError, match="factor f must lie"):
        train_factor_classifier(x[:8], f[:8] + 2, [3, 2], steps=1)


def test_predict_factors_restores_mode():
    net = FactorClassifier(3, 8, [3, 2], width=4).train()
    out = predict_factors(net, torch.zeros(5, 3, 8, 8))
    assert out.shape == (5, 2) and net.training
    with pytest.raises(ValueError, match=r"\(N, 3, 8, 8\)"):
        net(torch.zeros(2, 1, 8, 8))


def test_load_or_train_classifier_caches_atomically(tmp_path):
    calls = []

    def train_fn():
        calls.append(1)
        torch.manual_seed(3)
        net = FactorClassifier(1, (6, 10), [2, 4], width=4)
        return net, {"mean": 0.5, "per_factor": [0.25, 0.75]}

    cache = tmp_path / "sub" / "clf.pt"
    net, info = load_or_train_classifier(cache, train_fn)
    assert calls == [1] and cache.is_file() and info["mean"] == 0.5
    assert os.listdir(cache.parent) == ["clf.pt"]  # no temporary file left behind
    net2, info2 = load_or_train_classifier(cache, train_fn)
    assert calls == [1] and info2 == info and not net2.training
    x = torch.randn(7, 1, 6, 10)
    torch.testing.assert_close(predict_factors(net, x), predict_factors(net2, x))
    torch.testing.assert_close(net.features(x), net2.features(x))
    cache.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="clf.pt.*corrupt"):
        load_or_train_classifier(cache, train_fn)
    with pytest.raises(TypeError, match="FactorClassifier"):
        load_or_train_classifier(tmp_path / "other.pt", lambda: nn.Linear(2, 2))


def test_factor_accuracy_hand_computed():
    pred = torch.tensor([[0, 1], [1, 1], [-1, 0], [2, 0]])
    true = torch.tensor([[0, 1], [1, 0], [0, 0], [2, 0]])
    acc = factor_accuracy(pred, true, factor_names=["shape", "colour"])
    # factor 0: rows 0, 1, 3 right (row 2 is -1 = unknown = wrong); factor 1: rows 0, 2, 3 right
    assert acc["per_factor"] == [0.75, 0.75]
    assert acc["mean"] == 0.75
    assert acc["all"] == 0.5  # rows 0 and 3
    assert acc["by_name"] == {"shape": 0.75, "colour": 0.75}
    # -1 is wrong even against a (hypothetical) -1 ... true factors must be >= 0
    with pytest.raises(ValueError, match=">= 0"):
        factor_accuracy(pred, pred)
    with pytest.raises(ValueError, match="shape"):
        factor_accuracy(pred, true[:3])


def test_agreement_hand_computed():
    a = torch.tensor([[0, 1, 2], [1, 1, 1], [2, 0, 1], [-1, 0, 0]])
    b = torch.tensor([[0, 1, 2], [1, 0, 1], [2, 0, 0], [-1, 0, 0]])
    c = torch.tensor([[0, 1, 2], [1, 1, 1], [2, 0, 1], [0, 0, 0]])
    # all columns: row 0 agrees; row 1 differs in col 1; row 2 in col 2; row 3 has an unknown (-1)
    assert agreement([a, b]) == 0.25
    assert agreement([a, b], factors=[0]) == 0.75
    assert agreement([a, b], factors=[0, 2]) == 0.5
    assert agreement([a, c]) == 0.75  # a == c except row 3, where a is unknown
    assert agreement([a, b, c], factors=[1]) == 0.75  # row 1: b differs
    assert agreement([c, c]) == 1.0
    with pytest.raises(ValueError, match="at least two"):
        agreement([a])
    with pytest.raises(ValueError, match="shape"):
        agreement([a, b[:3]])
    with pytest.raises(ValueError, match="columns"):
        agreement([a, b], factors=[3])


# --------------------------------------------------------------------- likelihood


class ConditionalGaussianEps(nn.Module):
    """Exact ε-predictor of x | z ~ N(0.5 z_0, var I) under the VP-SDE (any event shape).

    The marginal at t is N(α_t m, v_t I), v_t = α_t² var + σ_t², so ε*(x_t) = σ_t (x_t − α_t m)/v_t.
    """

    def __init__(self, sde, var):
        super().__init__()
        self.sde, self.var = sde, var

    def mean(self, z):
        return 0.5 * z[:, 0]

    def forward(self, x_t, z, t):
        pad = (-1,) + (1,) * (x_t.dim() - 1)
        alpha, s2 = self.sde.alpha(t).reshape(pad), self.sde.sigma2(t).reshape(pad)
        m = self.mean(z).reshape(pad)
        return s2.sqrt() * (x_t - alpha * m) / (alpha**2 * self.var + s2)


def test_bits_per_dim_hand_computed():
    # (100 + 10 ln 127.5) / (10 ln 2) = 100/6.931472 + log2(127.5) = 14.426950 + 6.994353
    assert bits_per_dim(100.0, 10) == pytest.approx(21.421303, abs=1e-5)
    assert bits_per_dim(100.0, 10, data_scale=1.0) == pytest.approx(14.426950, abs=1e-5)
    t = bits_per_dim(torch.tensor([0.0, 100.0]), 10)
    torch.testing.assert_close(t, torch.tensor([6.994353, 21.421303]))
    with pytest.raises(ValueError):
        bits_per_dim(1.0, 0)


def _setup_gaussian(n=128, shape=(2, 2, 2), var=0.09, seed=0):
    g = torch.Generator().manual_seed(seed)
    sde = VPSDE()
    net = ConditionalGaussianEps(sde, var)
    z = torch.randn(n, 3, generator=g)
    m = net.mean(z).reshape((n,) + (1,) * len(shape))
    x = (m + math.sqrt(var) * torch.randn((n,) + shape, generator=g)).clamp(-1, 1)
    return sde, net, z, x, m


def test_diffusion_bpd_exact_gaussian_matches_closed_form():
    sde, net, z, x, m = _setup_gaussian()
    var, d = 0.09, 8
    # a decoder trained with another weighting: the bound is still built with the likelihood weighting
    dec = DiffusionDecoder(net, (2, 2, 2), sde, weighting="simple")
    assert not dec.is_bound
    torch.manual_seed(0)
    est = bits_per_dim(diffusion_nll(dec, x, z, num_draws=256, dequantize=False), d)
    true_nll = 0.5 * d * math.log(2 * math.pi * var) + 0.5 * ((x - m) ** 2).flatten(1).sum(1).double() / var
    true = bits_per_dim(true_nll, d)
    diff = est - true
    se = diff.std().item() / math.sqrt(diff.numel())
    # exact predictor: the bound exceeds -log p by ~1e-4 nats/dim (KL(p_T||pi) + O(B(eps)))
    assert abs(diff.mean().item()) < 4 * se + 2e-3, (diff.mean().item(), se)
    assert se < 0.05  # the check is sharp: a missing d*log(127.5) term is ~7 bits/dim
    torch.manual_seed(0)
    res = diffusion_bpd(dec, x, z, num_draws=256, dequantize=False)
    assert res.mean == pytest.approx(est.mean().item(), abs=1e-9)
    assert res.stderr == pytest.approx(est.std().item() / math.sqrt(est.numel()), rel=1e-9)
    # the same with the bare eps_net, in small batches (batching does not change the estimator)
    torch.manual_seed(1)
    res2 = diffusion_bpd(net, x, z, num_draws=16, dequantize=False, sde=sde, batch_size=40)
    assert abs(res2.mean - true.mean().item()) < 5 * res2.stderr


def test_diffusion_bpd_dequantised_matches_closed_form():
    # A coarse grid (data_scale s = 2: x in {-1, -0.5, 0, 0.5, 1}) makes the dequantisation term
    # (~0.66 bits/dim here) large against the Monte Carlo error (~0.03), so dropping or mis-scaling
    # the noise fails; the derivation is the same for any s (s = 127.5 for 8-bit data).
    var, d, s = 0.09, 8, 2.0
    sde, net, z, x, m = _setup_gaussian(seed=2, var=var)
    x = ((x + 1) * s).round().clamp(0, 2 * s) / s - 1  # on the grid k/s - 1
    torch.manual_seed(0)
    nll = diffusion_nll(DiffusionDecoder(net, (2, 2, 2), sde), x, z, num_draws=256, data_scale=s)
    est = bits_per_dim(nll, d, data_scale=s)
    # E_u[(x + u/s - m)^2] = (x-m)^2 + (x-m)/s + 1/(3 s^2),  u ~ U[0, 1)
    r = (x - m).double()
    e_sq = (r**2 + r / s + 1 / (3 * s**2)).flatten(1).sum(1)
    true = bits_per_dim(0.5 * d * math.log(2 * math.pi * var) + 0.5 * e_sq / var, d, data_scale=s)
    diff = est - true
    se = diff.std().item() / math.sqrt(diff.numel())
    assert abs(diff.mean().item()) < 4 * se + 2e-3, (diff.mean().item(), se)
    torch.manual_seed(0)
    res = diffusion_bpd(DiffusionDecoder(net, (2, 2, 2), sde), x, z, num_draws=256, data_scale=s)
    assert res.mean == pytest.approx(est.mean().item(), abs=1e-9)
    with pytest.warns(UserWarning, match="8-bit grid"):
        diffusion_bpd(net, x + 1e-2, z, num_draws=1, sde=sde, data_scale=s)


def test_diffusion_bpd_rejects_non_bounds_and_accepts_bound_likelihood():
    sde, net, z, x, m = _setup_gaussian(n=64)
    simple = ScoreMatchingLikelihood(net, z, sde, weighting="simple", event_shape=(2, 2, 2))
    with pytest.raises(ValueError, match="not a bound"):
        diffusion_bpd(simple, x, num_draws=1)
    ff = FeedForwardDecoder(nn.Linear(3, 8), (8,), likelihood="bernoulli")
    with pytest.raises(ValueError, match="not a diffusion likelihood bound"):
        diffusion_bpd(ff, x.flatten(1), z)
    with pytest.raises(ValueError, match="expected"):
        diffusion_bpd(DiffusionDecoder(net, (8,), sde), x, z)
    bound = ScoreMatchingLikelihood(net, z, sde, event_shape=(2, 2, 2), num_draws=8, control_variate=True)
    with pytest.raises(ValueError, match="own z"):
        diffusion_bpd(bound, x, z)
    res = diffusion_bpd(bound, x, num_draws=4, dequantize=False)
    true = bits_per_dim(
        0.5 * 8 * math.log(2 * math.pi * 0.09) + 0.5 * ((x - m) ** 2).flatten(1).sum(1).double() / 0.09, 8
    )
    assert abs(res.mean - true.mean().item()) < 5 * res.stderr
