"""experiments/paper_tables.py: mean ± std over seeds and the table layouts, from hand-made metrics."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paper_tables", Path(__file__).resolve().parents[1] / "experiments" / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_tables)


def _write(out: Path, preset: str, seed: int, metrics: dict) -> None:
    d = out / preset / f"seed{seed}"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_polymnist_table_mean_and_sample_std(tmp_path):
    out = tmp_path / "runs"
    for seed, (c1, agree) in enumerate([(0.5, 0.1), (0.7, 0.3)]):
        _write(out, "polymnist_mopoe_cpu", seed, {"coherence_by_num_given": {"1": c1, "2": 0.9},
                                                  "unconditional": {"normal": {"agreement": agree}}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "polymnist_coherence.md").read_text()
    # mean 0.6, sample std sqrt(((0.1)^2 + (0.1)^2) / 1) = 0.1414
    assert "| polymnist_mopoe_cpu | 0.600 ± 0.141 (2) | 0.900 ± 0.000 (2) | – | – | 0.200 ± 0.141 (2) | – |" in md
    rows = (tmp_path / "results" / "polymnist_coherence.csv").read_text().splitlines()
    assert rows[0].startswith("preset,1 given,2 given")


def test_celebamask_table_columns_follow_the_given_subsets(tmp_path):
    out = tmp_path / "runs"
    _write(out, "celebamask_hq_diffmvae_star_cpu", 0, {"fd_name": "FD_classifier", "conditional": {
        "image": {"attributes_f1": 0.8}, "attributes": {"image_FD_classifier": 12.5}}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| preset")][0]
    assert header == "| preset | image FD_classifier given attributes | attributes F1 given image |"
    assert "| 12.500 ± 0.000 (1) | 0.800 ± 0.000 (1) |" in md
    assert not (tmp_path / "results" / "table1_cub.md").exists()  # no CUB runs, no CUB table


def test_unknown_table_is_named():
    with pytest.raises(ValueError, match="unknown table 'table9'"):
        paper_tables.table_columns("table9", {})
