"""Label-based evaluation of the paper's data sets (evaluation_labels.py) and their builders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_diffmvae.evaluation_labels import given_subsets, linear_probe_accuracy

SHARED_DATA = Path(os.environ.get("PYRO_DIFFMVAE_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
needs_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA} "
                                "(set PYRO_DIFFMVAE_DATA to the shared data folder)")


def test_given_subsets_counts_and_limit():
    names = ["m0", "m1", "m2", "m3", "m4"]
    assert len(given_subsets(names)) == 2**5 - 2
    limited = given_subsets(names, max_per_size=2)
    assert [len(g) for g in limited] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert limited[:2] == [("m0",), ("m1",)]


def test_linear_probe_is_perfect_on_separable_and_chance_on_random_labels():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(600, 4, generator=g)
    y = torch.stack([(z[:, 0] > 0).long(), (z[:, 1] + z[:, 2] > 0).long()], 1)
    acc = linear_probe_accuracy(z[:400], y[:400], z[400:], y[400:], [2, 2])
    assert acc > 0.97
    y_random = torch.randint(0, 10, (600, 1), generator=g)
    chance = linear_probe_accuracy(z[:400], y_random[:400], z[400:], y_random[400:], [10])
    assert chance < 0.2  # 10 classes: chance 0.1


def _train(tmp_path, *overrides):
    code = "import sys; from pyro_diffmvae.cli import train_main as main; sys.argv[0] = 'diffmvae-train'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1", PYRO_DIFFMVAE_DATA=str(SHARED_DATA))
    res = subprocess.run([sys.executable, "-c", code, "experiment=tiny", f"hydra.run.dir={tmp_path}/run",
                          f"dataset.cache_dir={tmp_path}/cache", f"evaluation.classifier_cache={tmp_path}/cls", *overrides],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads((tmp_path / "run" / "metrics.json").read_text())


@needs_data
@pytest.mark.data
def test_polymnist_built_from_mnist_trains_and_reports_coherence_by_number_given(tmp_path):
    metrics = _train(tmp_path, "dataset=polymnist", f"dataset.root={tmp_path}/polymnist", "dataset.build.num_train=400",
                     "dataset.build.num_test=80", "dataset.modalities=[m0,m1,m2]", "dataset.diffusion_modalities=[m0]")
    assert json.loads((tmp_path / "polymnist" / "meta.json").read_text())["seed"] == 0
    cond = metrics["conditional"]
    assert set(cond) == {"m0", "m1", "m2", "m0+m1", "m0+m2", "m1+m2"}
    # a row's coherence is the mean over its generated modalities; the table averages the rows of each size
    torch.testing.assert_close(cond["m0"]["coherence"], (cond["m0"]["m1_coherence"] + cond["m0"]["m2_coherence"]) / 2)
    by_k = metrics["coherence_by_num_given"]
    assert set(by_k) == {"1", "2"}
    torch.testing.assert_close(by_k["2"], sum(cond[g]["coherence"] for g in ["m0+m1", "m0+m2", "m1+m2"]) / 3)
    assert all(0.0 <= v <= 1.0 for v in by_k.values())
    assert set(metrics["latent_linear_accuracy"]) == {"m0", "m1", "m2", "all"}
    assert set(metrics["unconditional"]) == {"normal", "score"}
    assert metrics["fd_name"] == "FD_classifier"
    assert "Conditional coherence by number of given modalities" in (tmp_path / "run" / "report.md").read_text()


@needs_data
@pytest.mark.data
def test_celebamask_hq_image_attributes_reports_f1_and_fd(tmp_path):
    metrics = _train(tmp_path, "dataset=celebamask_hq")
    cond = metrics["conditional"]
    assert set(cond) == {"image", "attributes"}
    assert 0.0 <= cond["image"]["attributes_f1"] <= 1.0
    assert cond["attributes"]["image_FD_classifier"] >= 0.0
    assert 0.0 <= cond["attributes"]["image_label_f1"] <= 1.0
    assert "attributes_label_f1" not in cond["image"]  # read directly: the same number as attributes_f1
    assert set(metrics["latent_linear_accuracy"]) == {"image", "attributes", "all"}


def test_polymnist_without_layout_or_build_names_the_root(tmp_path):
    from hydra import compose, initialize_config_module

    from pyro_diffmvae.builders import build_datasets

    with initialize_config_module(version_base=None, config_module="pyro_diffmvae.configs"):
        cfg = compose("config", overrides=["dataset=polymnist", f"dataset.root={tmp_path}/none", "dataset.build.enabled=false"])
    with pytest.raises(FileNotFoundError, match=r"none has no train/ folder.*<index>\.<label>\.png.*build\.enabled"):
        build_datasets(cfg)
