"""Evaluation networks from local files: MoPoE's released PolyMNIST digit classifiers
(``evaluation.classifiers_dir``) and the FID Inception (``evaluation.fid_inception_weights``).

Nothing is downloaded: the files are randomly initialised state dicts of the published architectures
(``MoPoEDigitClassifier``; torch-fidelity's ``FeatureExtractorInceptionV3``, built here without its
weights), saved under the published file names in ``tmp_path``.
"""

import math
from pathlib import Path
from unittest import mock

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pyro_diffmvae.data.registry import get_dataset
from pyro_diffmvae.evaluation.frechet import fd_feature_space, feature_fids
from pyro_diffmvae.evaluation.readback import published_label_classifier
from pyro_diffmvae.evaluation.uncertainty import fd_of_features
from pyro_diffmvae.metrics.coherence import predict_factors
from pyro_diffmvae.metrics.fid import FeatureFID, FIDInceptionFeatures, quantize_images
from pyro_diffmvae.metrics.published_classifiers import (MOPOE_CLASSIFIER_FILE, MoPoEDigitClassifier,
                                                         load_mopoe_digit_classifier)

#: the parameters of MoPoE's ``ClfImg`` as its released state dicts name them (written from the
#: published architecture, not from our module)
CLFIMG_STATE = {"encoder.0.weight": (10, 3, 4, 4), "encoder.0.bias": (10,), "encoder.3.weight": (20, 10, 4, 4),
                "encoder.3.bias": (20,), "encoder.7.weight": (128, 980), "encoder.7.bias": (128,),
                "encoder.10.weight": (10, 128), "encoder.10.bias": (10,)}
MODALITIES = ["m0", "m1"]


def clfimg_state(seed: int) -> dict[str, torch.Tensor]:
    """A random state dict with ClfImg's keys and shapes (what a released file holds)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(shape, generator=g) * 0.3 for k, shape in CLFIMG_STATE.items()}


def constant_digit_state(digit: int) -> dict[str, torch.Tensor]:
    """ClfImg weights whose logits are ``onehot(digit)`` for every image (all weights zero but the last bias)."""
    state = {k: torch.zeros(shape) for k, shape in CLFIMG_STATE.items()}
    state["encoder.10.bias"][digit] = 1.0
    return state


def write_classifiers(folder: Path, states: dict[str, dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for m, state in states.items():
        torch.save(state, folder / MOPOE_CLASSIFIER_FILE.format(modality=m))
    return folder


# ------------------------------------------------------------------------ MoPoE's classifiers
def test_the_architecture_has_clfimgs_parameter_names_and_shapes_and_loads_released_files(tmp_path):
    """Catches: a classifier whose parameter names or shapes differ from the released ``ClfImg``
    (e.g. a Sequential with the dropouts left out shifts every index, Linear(980 → 128) read as 20·7·7
    of another layout), so that the released files would not load with strict=True; a file name other
    than the released ``pretrained_img_to_digit_clf_m<k>``."""
    assert {k: tuple(v.shape) for k, v in MoPoEDigitClassifier().state_dict().items()} == CLFIMG_STATE
    folder = write_classifiers(tmp_path / "clf", {f"m{k}": clfimg_state(k) for k in range(5)})
    assert sorted(p.name for p in folder.iterdir()) == [f"pretrained_img_to_digit_clf_m{k}" for k in range(5)]
    for k in range(5):
        clf = load_mopoe_digit_classifier(folder / f"pretrained_img_to_digit_clf_m{k}")
        loaded = clf.net.state_dict()
        assert all(torch.equal(loaded[key], value) for key, value in clfimg_state(k).items())
        assert clf.factor_sizes == [10] and clf.num_features == 128


def test_a_checkpoint_dict_holding_the_state_dict_loads_too(tmp_path):
    """Catches: a loader that accepts only the bare state dict, refusing ``{"state_dict": ...}`` checkpoints."""
    path = tmp_path / "pretrained_img_to_digit_clf_m0"
    torch.save({"state_dict": clfimg_state(0), "epoch": 3}, path)
    assert torch.equal(load_mopoe_digit_classifier(path).net.encoder[0].weight, clfimg_state(0)["encoder.0.weight"])


def _renamed(state):
    state = dict(state)
    state["encoder.1.weight"] = state.pop("encoder.0.weight")
    return state


def _reshaped(state):
    return {**state, "encoder.7.weight": torch.zeros(128, 720)}


@pytest.mark.parametrize("make, error, message", [
    (_renamed, ValueError, r"missing keys \['encoder.0.weight'\]; unexpected keys \['encoder.1.weight'\]"),
    (_reshaped, ValueError, r"wrong shapes \['encoder.7.weight: file \(128, 720\), expected \(128, 980\)'\]"),
    (lambda state: {}, ValueError, "not a state dict"),
    (lambda state: [1, 2], ValueError, "holds a list, not a state dict"),
])
def test_a_state_dict_with_wrong_keys_or_shapes_is_an_error_naming_the_file_and_the_problem(tmp_path, make, error, message):
    """Catches: a wrong file loaded non-strictly (random layers read the samples), or an error that
    does not say which file and which keys or shapes are wrong."""
    path = tmp_path / "pretrained_img_to_digit_clf_m3"
    torch.save(make(clfimg_state(0)), path)
    with pytest.raises(error, match=message) as info:
        load_mopoe_digit_classifier(path)
    assert "pretrained_img_to_digit_clf_m3" in str(info.value)


class _Payload:
    """A pickle that creates a file when it is unpickled (what a malicious 'module' file could do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_missing_corrupt_and_pickled_code_files_are_refused_and_never_run(tmp_path):
    """Catches: a missing file taken as 'train one instead' or reported without its name; a corrupt
    file's raw unpickling error; a whole pickled object unpickled with weights_only=False (which runs
    its code: the marker file would exist)."""
    with pytest.raises(FileNotFoundError, match="pretrained_img_to_digit_clf_m9"):
        load_mopoe_digit_classifier(tmp_path / "pretrained_img_to_digit_clf_m9")
    corrupt = tmp_path / "pretrained_img_to_digit_clf_m0"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(ValueError, match=r"could not read .*pretrained_img_to_digit_clf_m0.*weights_only=True"):
        load_mopoe_digit_classifier(corrupt)
    marker = tmp_path / "code_ran"
    pickled = tmp_path / "pretrained_img_to_digit_clf_m1"
    torch.save({"encoder.0.weight": _Payload(marker)}, pickled)
    with pytest.raises(ValueError, match=r"pretrained_img_to_digit_clf_m1.*pickled module \(refused"):
        load_mopoe_digit_classifier(pickled)
    assert not marker.exists()


def test_the_loaded_classifier_reads_what_the_network_computes_on_unit_interval_inputs(tmp_path):
    """Catches: the library's [-1, 1] images passed to the classifier unconverted (it reads [0, 1],
    ToTensor of the PNGs) or converted wrongly; dropout left on at evaluation (two reads differ); a
    read-back that is not the argmax of the released network's logits."""
    path = write_classifiers(tmp_path, {"m0": clfimg_state(5)}) / "pretrained_img_to_digit_clf_m0"
    clf = load_mopoe_digit_classifier(path)
    clf.train()
    assert not clf.training  # stays in eval mode
    net = MoPoEDigitClassifier()
    net.load_state_dict(clfimg_state(5))
    net.eval()
    x = torch.rand(6, 3, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = net((x + 1) / 2)
        (logits,) = clf(x)
        torch.testing.assert_close(logits, expected)
        assert not torch.allclose(logits, net(x))  # the conversion matters
        torch.testing.assert_close(clf.features(x), net.features((x + 1) / 2))
    assert torch.equal(predict_factors(clf, x), expected.argmax(-1, keepdim=True))
    assert torch.equal(predict_factors(clf, x), predict_factors(clf, x))
    constant = write_classifiers(tmp_path / "seven", {"m0": constant_digit_state(7)}) / "pretrained_img_to_digit_clf_m0"
    assert (predict_factors(load_mopoe_digit_classifier(constant), x) == 7).all()
    with pytest.raises(ValueError, match=r"reads images of shape \(N, 3, 28, 28\), got \(6, 3, 32, 32\)"):
        clf(torch.zeros(6, 3, 32, 32))


def test_classifiers_dir_errors_name_the_folder_the_file_or_the_data_set(tmp_path):
    """Catches: classifiers_dir silently ignored for a data set without published classifiers (its
    numbers would be labelled as read by released networks), a missing folder or modality file
    reported without its path."""
    polymnist, shapes = get_dataset("polymnist"), get_dataset("shapes")
    labels = polymnist.evaluation.labels(None, None)
    with pytest.raises(ValueError, match=r"data set 'shapes' declares no published classifiers.*do: \[.*'polymnist'"):
        published_label_classifier(tmp_path, shapes, "image", labels)
    with pytest.raises(FileNotFoundError, match="no_such_folder is not a folder"):
        published_label_classifier(tmp_path / "no_such_folder", polymnist, "m0", labels)
    write_classifiers(tmp_path, {"m0": clfimg_state(0)})
    net, info = published_label_classifier(tmp_path, polymnist, "m0", labels)
    assert info == {"source": f"published (MoPoE ClfImg from {tmp_path / 'pretrained_img_to_digit_clf_m0'})",
                    "path": str(tmp_path / "pretrained_img_to_digit_clf_m0")}
    with pytest.raises(FileNotFoundError, match="pretrained_img_to_digit_clf_m1"):
        published_label_classifier(tmp_path, polymnist, "m1", labels)


class FakePolyMNIST(torch.utils.data.Dataset):
    """PolyMNIST-shaped examples (two 3×28×28 modalities in [-1, 1], a digit label), in memory."""

    def __init__(self, labels, seed):
        self.labels = torch.tensor(labels)
        self.images = torch.rand(len(labels), 2, 3, 28, 28, generator=torch.Generator().manual_seed(seed)) * 2 - 1

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"m0": self.images[i, 0], "m1": self.images[i, 1], "meta": {"label": self.labels[i], "index": i}}


def _polymnist_cfg(tmp_path, *overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=[
            "experiment=tiny", "dataset=polymnist", "model=mopoe", f"dataset.modalities={MODALITIES}",
            "dataset.diffusion_modalities=[]", "evaluation.num_examples=null", "evaluation.batch_size=4",
            "evaluation.bootstrap=0", "evaluation.probe_train_size=8", "evaluation.classifier_train_size=20",
            f"evaluation.classifier_cache={tmp_path}/cache", *overrides])


def test_polymnist_evaluation_reads_with_the_published_classifiers_and_reports_their_source(tmp_path):
    """Catches: evaluation.classifiers_dir not reaching the evaluation (a classifier trained and
    cached instead: the cache folder would exist, and the coherence would not be the constant
    classifiers' 1/2); the report or ledger not saying which classifiers read the samples; trained
    classifiers labelled as comparable with published tables."""
    from pyro_diffmvae.builders import build_model
    from pyro_diffmvae.evaluation import evaluate, write_report

    folder = write_classifiers(tmp_path / "clf", {m: constant_digit_state(3) for m in MODALITIES})
    test_set, train_set = FakePolyMNIST([3, 5] * 4, seed=0), FakePolyMNIST([3, 5] * 10, seed=1)
    cfg = _polymnist_cfg(tmp_path, f"evaluation.classifiers_dir={folder}")
    torch.manual_seed(0)
    vae = build_model(cfg)
    metrics = evaluate(vae, test_set, train_set, cfg, tmp_path / "published", figures=False)
    assert not (tmp_path / "cache").exists()
    sources = metrics["ledger"]["evaluation_networks"]["label_classifiers"]
    assert sources == {m: f"published (MoPoE ClfImg from {folder / f'pretrained_img_to_digit_clf_{m}'})" for m in MODALITIES}
    assert metrics["classifier"]["m0"]["source"] == sources["m0"]
    # every image reads 3; half the test labels are 3
    assert metrics["conditional"]["m0"]["m1_coherence"] == pytest.approx(0.5)
    assert metrics["conditional"]["m1"]["m0_coherence"] == pytest.approx(0.5)
    assert metrics["fd_name"] == "FD_classifier" and metrics["ledger"]["evaluation_networks"]["as_published"] is False
    write_report(metrics, tmp_path / "report.md")
    text = (tmp_path / "report.md").read_text()
    assert f"label classifier of m1: published (MoPoE ClfImg from {folder}" in text
    assert "FD_classifier: penultimate features of each modality's label classifier" in text
    assert ("the samples are scored by FD_classifier, not FID; set evaluation.fid_inception_weights (the FID "
            "Inception) to read them") in text

    trained = evaluate(vae, test_set, train_set, _polymnist_cfg(tmp_path), tmp_path / "trained", figures=False)
    assert trained["classifier"]["m0"]["source"].startswith(f"trained by this run (cache {tmp_path / 'cache'}")
    write_report(trained, tmp_path / "trained.md")
    text = (tmp_path / "trained.md").read_text()
    assert "label classifier of m0: trained by this run (cache" in text
    assert "read by label classifiers trained by this library (m0, m1) and scored by FD_classifier" in text
    assert "set evaluation.classifiers_dir (the released MoPoE ClfImg classifiers) and evaluation.fid_inception" in text


# ------------------------------------------------------------------------------ FID Inception
@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory) -> Path:
    """A random state dict of torch-fidelity's FeatureExtractorInceptionV3, saved under its file name.
    The network is built without loading weights (its constructor would download them); the
    convolutions get He-normal weights so that the 2048-d features do not vanish."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    with mock.patch("torch_fidelity.feature_extractor_inceptionv3.torch.load", return_value={}), \
         mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, *a, **k: None):
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=g) * math.sqrt(2.0 / v[0].numel()) if k.endswith("conv.weight") else v
             for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("fid") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def fid_case(fid_weights):
    """4 real and 4 generated images, our FID features of them, and torchmetrics'
    ``FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=..., antialias=False)``
    updated with their uint8 quantisation (called directly: the reference)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    g = torch.Generator().manual_seed(2)
    real, fake = torch.rand(4, 3, 28, 28, generator=g) * 2 - 1, (torch.rand(4, 3, 28, 28, generator=g) * 2 - 1) * 0.5
    ours = FIDInceptionFeatures(fid_weights)
    reference = FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=str(fid_weights), antialias=False)
    reference.update(quantize_images(real), real=True)
    reference.update(quantize_images(fake), real=False)
    with torch.no_grad():
        features = ours(real), ours(fake)
    return dict(real=real, fake=fake, ours=ours, reference=reference, features=features)


def test_fid_features_are_torchmetrics_fid_features_of_the_uint8_quantised_images(fid_case):
    """Catches: FID features that are not torchmetrics' ``FrechetInceptionDistance(feature=2048,
    feature_extractor_weights_path=...)`` features (another network, resize or input scaling), float
    images scored without the uint8 quantisation of the reference, or quantised by truncation (as
    torchmetrics' normalize=True does) instead of rounding; FID statistics accumulated otherwise than
    torchmetrics' (equal statistics: equal FID, its compute being a function of them)."""
    real, fake, ours, reference = (fid_case[k] for k in ("real", "fake", "ours", "reference"))
    f_real, _ = fid_case["features"]
    u_real = quantize_images(real)
    assert u_real.dtype == torch.uint8
    assert torch.equal(u_real, ((real + 1) / 2 * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8))
    with torch.no_grad():
        assert f_real.shape == (4, 2048) and float(f_real.std(0).mean()) > 1e-3
        assert torch.equal(f_real, reference.inception(u_real))
        # quantisation: float images off their uint8 levels by less than half a level read as those levels
        assert torch.equal(ours(u_real.float() / 127.5 - 1 + 0.3 / 127.5), f_real)
    fid = FeatureFID(ours)
    assert fid.metric_name == "FID"
    fid.update(fake, real=False)
    mean, cov = fid.statistics(real=False)
    ref_mean = reference.fake_features_sum / 4
    torch.testing.assert_close(torch.from_numpy(mean), ref_mean, rtol=0, atol=0)
    ref_cov = (reference.fake_features_cov_sum - 4 * torch.outer(ref_mean, ref_mean)) / 3
    torch.testing.assert_close(torch.from_numpy(cov), ref_cov, rtol=0, atol=0)


@pytest.mark.slow
def test_the_evaluations_fid_equals_torchmetrics_fid(fid_case):
    """Catches: an FD formula (the evaluation's, from per-example features) that differs from
    torchmetrics' FID at 2048 dimensions. Slow: two 2048-d FID computes (eigenvalues of 2048×2048
    products), 5-15 s on a shared CPU core; the formula is checked at small d in test_metrics."""
    f_real, f_fake = fid_case["features"]
    expected = float(fid_case["reference"].compute())
    assert expected > 1.0
    assert fd_of_features(f_real.double(), f_fake.double()) == pytest.approx(expected, rel=1e-6)


def test_fid_weights_errors_name_the_file(fid_weights, tmp_path):
    """Catches: a missing FID weights file silently downloaded (or reported without its path), a corrupt
    file's raw error, another network's state dict loaded into the FID Inception, a pickled object
    unpickled by torch-fidelity's weights_only=False load."""
    with pytest.raises(FileNotFoundError, match="no_such_weights.pth"):
        FIDInceptionFeatures(tmp_path / "no_such_weights.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="could not read '.*corrupt.pth'"):
        FIDInceptionFeatures(corrupt)
    other = tmp_path / "clfimg.pth"
    torch.save(clfimg_state(0), other)
    with pytest.raises(ValueError, match="clfimg.pth' is not a torch-fidelity FeatureExtractorInceptionV3 state dict"):
        FIDInceptionFeatures(other)
    marker, pickled = tmp_path / "code_ran", tmp_path / "pickled.pth"
    torch.save({"fc.weight": _Payload(marker)}, pickled)
    with pytest.raises(ValueError, match="pickled.pth"):
        FIDInceptionFeatures(pickled)
    assert not marker.exists()


def test_the_evaluation_reports_FID_with_the_weights_and_FD_classifier_without(fid_weights, tmp_path):
    """Catches: evaluation.fid_inception_weights not reaching the evaluation (FD_classifier reported),
    one Inception network loaded per modality, the ledger not naming the weights, and the retired
    evaluation.inception_weights (torchvision's Inception, reported as 'FID') still accepted."""
    folder = write_classifiers(tmp_path, {m: clfimg_state(0) for m in MODALITIES})
    polymnist = get_dataset("polymnist")
    labels = polymnist.evaluation.labels(None, None)
    classifiers = {m: published_label_classifier(folder, polymnist, m, labels)[0] for m in MODALITIES}
    ev = OmegaConf.create({"fid_inception_weights": str(fid_weights)})
    fids = feature_fids(ev, classifiers)
    assert {m: f.metric_name for m, f in fids.items()} == {"m0": "FID", "m1": "FID"}
    assert fids["m0"].extractor is fids["m1"].extractor
    assert str(fid_weights) in fd_feature_space(ev, "FID")
    plain = feature_fids(OmegaConf.create({"fid_inception_weights": None}), classifiers)
    assert {f.metric_name for f in plain.values()} == {"FD_classifier"} and plain["m0"].num_features == 128
    with pytest.raises(ValueError, match="evaluation.inception_weights .* is retired"):
        feature_fids(OmegaConf.create({"inception_weights": "/x/inception_v3_google.pth"}), classifiers)
