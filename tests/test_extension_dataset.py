"""A user's data set and networks, outside the package, through the command-line apps.

``tests/extension/toy_dataset.py`` declares the ``toy`` data set (a label ``y = i mod 3``, modalities
``vector`` and ``label``), ``tests/extension/configs/dataset/toy.yaml`` names it by
``dataset.spec._target_``, and ``tests/extension/toy_networks.py`` holds a user encoder and a decoder
net that ignores ``z`` (``ConstantLogits``: the decoded label is always class ``winner``). Nothing of
the package is edited: the apps find the yaml with ``hydra.searchpath`` and the modules on ``PYTHONPATH``.

Because the label decoder ignores z, the label read back from every generated ``label`` is
``winner``, so its coherence with the test labels is the fraction of the first ``num_examples`` test
examples whose label is ``winner`` — a number computed by hand below.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from pyro_diffmvae.builders import build_model
from pyro_diffmvae.data.registry import DATASETS, get_dataset, register_dataset
from pyro_diffmvae.networks import NETWORKS, build_encoder, register_network

EXTENSION = Path(__file__).resolve().parent / "extension"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]
WINNER = 2  # ConstantLogits' class: test labels i mod 3 of i = 0..7 equal 2 at i = 2, 5


@pytest.fixture
def on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(EXTENSION))


def run_app(app: str, *overrides: str, cwd) -> subprocess.CompletedProcess:
    code = f"import sys; from pyro_diffmvae.cli import {app}_main as main; sys.argv[0] = 'diffmvae-{app}'; main()"
    path = os.pathsep.join([str(EXTENSION), str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1", PYTHONPATH=path)
    return subprocess.run([sys.executable, "-c", code, *overrides], cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=600)


TOY = [f"hydra.searchpath=[file://{EXTENSION / 'configs'}]", "dataset=toy", "experiment=tiny",
       "+model.networks.vector.encoder._target_=toy_networks.ToyEncoder", "+model.networks.vector.encoder.hidden=7",
       "+model.networks.label.decoder._target_=toy_networks.ConstantLogits",
       f"+model.networks.label.decoder.winner={WINNER}"]


def test_user_dataset_and_networks_train_evaluate_and_sample_through_the_apps(tmp_path, on_path):
    """Catches: a data set that must be registered in the package to be found (train fails); an
    evaluation that ignores the spec's read-back functions, its F1 flag or its labels (the coherence,
    F1 and their keys below); a builder that drops ``model.networks`` or the yaml's extra keys (the
    network types and ``hidden=7``); a sample app that cannot rebuild the user's data set."""
    import toy_networks

    res = run_app("train", *TOY, f"hydra.run.dir={tmp_path}/train", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "train" / "metrics.json").read_text())
    test_labels = torch.arange(8) % 3  # evaluation.num_examples=8 (experiment=tiny) of the toy test split
    expected = (test_labels == WINNER).float().mean().item()
    assert expected == 0.25
    cond = metrics["conditional"]
    assert set(cond) == {"vector", "label"}
    given_vector = cond["vector"]
    assert given_vector["label_coherence"] == pytest.approx(expected, abs=1e-12)
    assert given_vector["label_f1"] == pytest.approx(expected, abs=1e-12)  # one-hot winner vs one-hot truth
    assert given_vector["coherence"] == pytest.approx(expected, abs=1e-12)  # the only generated modality
    # vector: read back, not binary; the all-targets convention regenerates the given label (read back too)
    assert set(cond["label"]) == {"vector_coherence", "coherence", "label_coherence_regenerated", "coherence_all_targets",
                                  "vector_coherence_se", "coherence_se", "label_coherence_regenerated_se",
                                  "coherence_all_targets_se"}
    assert metrics["protocol"]["label"] == "standard (modified: num_examples=8)"  # experiment=tiny
    assert metrics["ledger"]["objective"] == "elbo" and metrics["ledger"]["protocol"] == metrics["protocol"]["label"]
    by_k = metrics["coherence_by_num_given"]
    assert by_k == {"1": pytest.approx((expected + cond["label"]["vector_coherence"]) / 2)}
    assert metrics["classifier"] == {} and metrics["fd_name"] is None  # no modality is read by a classifier
    assert set(metrics["latent_linear_accuracy"]) == {"vector", "label", "all"}
    assert set(metrics["unconditional"]) == {"normal", "score"}
    assert (tmp_path / "train" / "figures" / "conditional.png").is_file()

    from pyro_diffmvae.cli import load_run

    vae, cfg = load_run(tmp_path / "train" / "model.pt")
    encoder = vae.modalities["vector"].encoder
    assert type(encoder) is toy_networks.ToyEncoder and encoder.hidden == 7
    assert type(vae.modalities["label"].decoder.net) is toy_networks.ConstantLogits
    assert cfg.dataset.spec._target_ == "toy_dataset.make_spec"

    # evaluate and sample find the user's data set and networks from the config stored with the model
    res = run_app("evaluate", f"checkpoint={tmp_path}/train/model.pt", f"hydra.run.dir={tmp_path}/eval", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert again["conditional"]["vector"]["label_coherence"] == pytest.approx(expected, abs=1e-12)

    res = run_app("sample", f"checkpoint={tmp_path}/train/model.pt", "sample.prior=normal",
                  f"hydra.run.dir={tmp_path}/sample", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    samples = torch.load(tmp_path / "sample" / "samples" / "samples.pt")
    assert samples["vector"].shape == (4, 5)
    assert (samples["label"].argmax(-1) == WINNER).all()


def test_unknown_dataset_error_names_it_and_lists_the_known_ones(tmp_path):
    """Catches: a bare KeyError, or a message that does not say which name is unknown or what is known."""
    with pytest.raises(ValueError) as err:
        get_dataset("no_such_data")
    assert "'no_such_data'" in str(err.value)
    assert all(name in str(err.value) for name in ["shapes", "polymnist", "celebamask_hq", "cub"])
    res = run_app("train", "experiment=tiny", "dataset.name=no_such_data", f"hydra.run.dir={tmp_path}/a", cwd=tmp_path)
    assert res.returncode == 2 and "unknown dataset 'no_such_data'" in res.stderr and "'shapes'" in res.stderr


def test_dataset_spec_target_is_checked(on_path):
    """Catches: a ``dataset.spec`` whose spec has another name, or that is no DatasetSpec, accepted silently."""
    import toy_dataset

    spec = get_dataset(OmegaConf.create({"dataset": {"name": "toy", "spec": {"_target_": "toy_dataset.make_spec"}}}))
    assert spec.name == "toy" and spec.build is toy_dataset.build
    with pytest.raises(ValueError, match=r"gave the data set 'toy', but dataset.name is 'other'"):
        get_dataset(OmegaConf.create({"name": "other", "spec": {"_target_": "toy_dataset.make_spec"}}))
    with pytest.raises(TypeError, match="not a pyro_diffmvae.data.spec.DatasetSpec"):
        get_dataset(OmegaConf.create({"name": "toy", "spec": {"_target_": "builtins.dict"}}))
    with pytest.raises(ValueError, match="dataset.spec must be a mapping with a _target_"):
        get_dataset(OmegaConf.create({"name": "toy", "spec": "toy_dataset.make_spec"}))


def test_register_dataset_makes_a_name_known(on_path):
    """Catches: register_dataset not reaching get_dataset, or silently replacing a registered data set."""
    import toy_dataset

    spec = toy_dataset.make_spec()
    try:
        assert register_dataset(spec) is spec and get_dataset("toy") is spec
        with pytest.raises(ValueError, match="'toy' is already registered"):
            register_dataset(toy_dataset.make_spec())
    finally:
        DATASETS.pop("toy", None)
    with pytest.raises(ValueError, match="'shapes' is already registered"):
        register_dataset(dataclasses.replace(get_dataset("shapes")))


def _shapes_cfg(*overrides):
    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        return compose("config", overrides=["experiment=tiny", *overrides])


def test_user_encoder_by_target_on_a_builtin_dataset(on_path):
    """Catches: ``model.networks`` ignored for the built-in data sets, the builder's arguments (shape,
    latent_dim) not passed, or a bad entry accepted (it must name the key)."""
    import toy_networks

    vae = build_model(_shapes_cfg("+model.networks.attributes.encoder._target_=toy_networks.ToyEncoder"))
    encoder = vae.modalities["attributes"].encoder
    assert type(encoder) is toy_networks.ToyEncoder
    assert encoder.net[0].in_features == 17 and encoder.net[-1].out_features == 2 * 8  # shape (17,), latent_dim 8
    assert type(vae.modalities["mask"].encoder).__name__ == "ConvEncoder"  # the others keep their kind's
    with pytest.raises(ValueError, match=r"model.networks.attributes.encoder must be a mapping with a _target_"):
        build_model(_shapes_cfg("+model.networks.attributes.encoder=toy_networks.ToyEncoder"))
    with pytest.raises(ValueError, match=r"model.networks.attributes.encoder sets \['latent_dim'\]"):
        build_model(_shapes_cfg("+model.networks.attributes.encoder._target_=toy_networks.ToyEncoder",
                                "+model.networks.attributes.encoder.latent_dim=3"))
    with pytest.raises(ValueError, match=r"model.networks.image.decoder .* decoded by a diffusion decoder"):
        build_model(_shapes_cfg("+model.networks.image.decoder._target_=toy_networks.ConstantLogits"))


def test_network_kinds_registry():
    """Catches: an unknown network kind falling back silently to a default, and register_network not
    reaching the builder."""
    cfg = _shapes_cfg()
    spec = {"shape": (4,), "likelihood": "normal", "network": "no_such_kind"}
    with pytest.raises(ValueError, match=r"modality 'x': unknown network kind 'no_such_kind'; known: .*'conv'"):
        build_encoder("x", spec, cfg)
    marker = torch.nn.Identity()
    try:
        register_network("no_such_kind", encoder=lambda s, c: marker, decoder=lambda s, c: marker)
        assert build_encoder("x", spec, cfg) is marker
        with pytest.raises(ValueError, match="already registered"):
            register_network("no_such_kind", encoder=None, decoder=None)
    finally:
        NETWORKS.pop("no_such_kind", None)
