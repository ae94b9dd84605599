"""experiments/paper_tables.py: mean ± std over seeds and the table layouts, from hand-made metrics."""

import importlib.util
import json
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("paper_tables", Path(__file__).resolve().parents[1] / "experiments" / "paper_tables.py")
paper_tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paper_tables)


STANDARD = {"protocol": {"name": "standard", "label": "standard"}}
QUICK = {"protocol": {"name": "quick", "label": "quick"}}


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
    assert rows[0].startswith("preset,1 given (missing targets only),2 given (missing targets only)")
    assert md.startswith(f"# polymnist_coherence, evaluation protocol {paper_tables.UNNAMED_PROTOCOL}")


def test_celebamask_table_columns_follow_the_given_subsets(tmp_path):
    out = tmp_path / "runs"
    _write(out, "celebamask_hq_diffmvae_star_cpu", 0, {"fd_name": "FD_classifier", "conditional": {
        "image": {"attributes_f1": 0.8}, "attributes": {"image_FD_classifier": 12.5, "image_label_f1": 0.6}},
        "unconditional": {"score": {"image_FD_classifier": 30.0, "agreement": 0.25}}, "training": {"train_seconds": 1800.0}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| preset")][0]
    assert header == ("| preset | image FD_classifier given attributes | attribute F1 of the image read back, given attributes "
                      "| attributes F1 given image | image FD_classifier unconditional score prior | agreement unconditional "
                      "score prior | train s |")
    # one seed without SEs: the values alone, not a spread of 0; a measurement that came out whole (FD 30.0,
    # 1800.0 s) keeps its decimals like every other measurement: only counts (steps) are printed without
    assert "| 12.500 (1) | 0.600 (1) | 0.800 (1) | 30.000 (1) | 0.250 (1) | 1800.000 (1) |" in md
    assert not (tmp_path / "results" / "table1_cub.md").exists()  # no CUB runs, no CUB tables
    assert not (tmp_path / "results" / "table2_cub_clip.md").exists()


def test_table3_reports_the_joint_bits_per_dim_with_its_note_and_only_where_some_run_has_it(tmp_path):
    # Catches: Table 3 without the joint NLL the zoo tables carry (issue 13: in every report and table), the
    # column shown without the note that says what the estimate is, or a column of dashes for runs without it.
    out = tmp_path / "runs"
    for seed, bpd in enumerate([3.5, 3.7]):
        _write(out, "celebamask_hq_diffmvae_vpred_cpu", seed, {"conditional": {"image": {"attributes_f1": 0.6}},
               "joint_log_likelihood": {"supported": True, "bits_per_dim": bpd, "nll_nats": -7000.0}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    assert "| preset | attributes F1 given image | joint bits/dim |" in md
    assert "| celebamask_hq_diffmvae_vpred_cpu | 0.600 ± 0.000 (2) | 3.600 ± 0.141 (2) |" in md
    assert paper_tables.JOINT_NOTE in md
    _write(out, "celebamask_hq_mopoe_cpu", 0, {"conditional": {"image": {"attributes_f1": 0.5}},
           "joint_log_likelihood": {"supported": True, "bits_per_dim": 6.9, "bits_per_dim_se": 0.01}})
    paper_tables.write_tables(out, tmp_path / "results")  # one seed: the estimate's own SE over the test examples
    assert "| celebamask_hq_mopoe_cpu | 0.500 (1) | 6.900 [SE 0.010] (1) |" in (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    (out / "celebamask_hq_mopoe_cpu" / "seed0" / "metrics.json").unlink()
    (out / "celebamask_hq_diffmvae_vpred_cpu" / "seed0" / "metrics.json").write_text(
        json.dumps({"conditional": {"image": {"attributes_f1": 0.6}}}))
    (out / "celebamask_hq_diffmvae_vpred_cpu" / "seed1" / "metrics.json").write_text(
        json.dumps({"conditional": {"image": {"attributes_f1": 0.6}}}))
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    assert "joint bits/dim" not in md and paper_tables.JOINT_NOTE not in md


def test_tables_say_what_each_row_ran_model_bound_sampler_and_guidance(tmp_path):
    # Catches a table that hides the sampler or the guidance weight a diffusion row was evaluated with, calls
    # a non-bound objective a bound, or prints the sampler for a feed-forward row (whose decoders use none).
    out = tmp_path / "runs"
    ledger = {"model": "diffmvae_star_v — Diff-MVAE*-v: v-MSE", "is_bound": False, "diffusion_decoders": {"image": {}}}
    _write(out, "celebamask_hq_diffmvae_star_v_guided_cpu", 0, {
        "ledger": ledger, "sampler": "dpmpp_2m", "sampler_steps": 9, "guidance": {"image": 2.0},
        "conditional": {"image": {"attributes_f1": 0.8}}})
    _write(out, "celebamask_hq_mopoe_cpu", 0, {
        "ledger": {"model": "mopoe", "is_bound": True, "diffusion_decoders": {}}, "sampler": "ddim", "sampler_steps": 50,
        "conditional": {"image": {"attributes_f1": 0.7}}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    assert "| celebamask_hq_diffmvae_star_v_guided_cpu | diffmvae_star_v, not a bound; dpmpp_2m 9 steps, guidance w = 2 | 0.800" in md
    _write(out, "polymnist_mopoe_cpu", 0, {"ledger": {"model": "mopoe", "is_bound": True}, "training": {"steps": 600}})
    paper_tables.write_zoo_table(out, tmp_path / "results", "polymnist", ["mopoe"])
    assert "| mopoe | mopoe, a bound | 600 (1) |" in (tmp_path / "results" / "zoo_polymnist.md").read_text()
    assert "| celebamask_hq_mopoe_cpu | mopoe, a bound | 0.700" in md
    assert paper_tables.what_ran({"sampler": "ddim"}) is None  # a run from before the ledger: no made-up label


def test_a_run_evaluated_again_is_its_own_row_with_the_runs_training_figures(tmp_path):
    # Catches: re-evaluations (e.g. another guidance weight) silently merged into the run's row as a second
    # "seed", or read without the steps and seconds of the training they evaluate.
    out = tmp_path / "runs"
    _write(out, "celebamask_hq_diffmvae_star_v_guided_cpu", 0, {
        "conditional": {"image": {"attributes_f1": 0.8}}, "training": {"steps": 3600, "train_seconds": 1800.0}})
    again = out / "celebamask_hq_diffmvae_star_v_guided_cpu" / "seed0" / "eval_w1"
    again.mkdir()
    (again / "metrics.json").write_text(json.dumps({"conditional": {"image": {"attributes_f1": 0.6}}}))
    runs = paper_tables.collect(out)
    assert sorted(runs) == ["celebamask_hq_diffmvae_star_v_guided_cpu", "celebamask_hq_diffmvae_star_v_guided_cpu [w1]"]
    assert [m["conditional"]["image"]["attributes_f1"] for m in runs["celebamask_hq_diffmvae_star_v_guided_cpu [w1]"]] == [0.6]
    assert runs["celebamask_hq_diffmvae_star_v_guided_cpu [w1]"][0]["training"] == {"steps": 3600, "train_seconds": 1800.0}
    assert len(runs["celebamask_hq_diffmvae_star_v_guided_cpu"]) == 1


def test_a_single_seed_shows_its_runs_standard_error_and_two_seeds_their_spread(tmp_path):
    # Catches: a one-seed cell printed as "± 0.000" (a spread of zero that says nothing), or a run's SE shown
    # as if it were the spread over seeds.
    out = tmp_path / "runs"
    _write(out, "celebamask_hq_mopoe_cpu", 0, {"fd_name": "FD_classifier", "conditional": {
        "attributes": {"image_FD_classifier": 40.0, "image_FD_classifier_se": 1.5}}})
    for seed, fd in enumerate([20.0, 24.0]):
        _write(out, "celebamask_hq_mopoe_star_cpu", seed, {"fd_name": "FD_classifier", "conditional": {
            "attributes": {"image_FD_classifier": fd, "image_FD_classifier_se": 1.0}}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table3_celebamask_hq.md").read_text()
    assert "| celebamask_hq_mopoe_cpu | 40.000 [SE 1.500] (1) |" in md
    assert "| celebamask_hq_mopoe_star_cpu | 22.000 ± 2.828 (2) |" in md  # sample std of 20 and 24


def test_a_step_budget_all_seeds_share_is_printed_once_and_differing_counts_get_their_spread():
    # Catches: a shared budget printed as "600.000 ± 0.000 (2)", or two different step counts (runs stopped by
    # a wall clock) collapsed into one number.
    steps = ("train steps", paper_tables._get("training", "steps"))
    same = paper_tables.build_table({"p": [{"training": {"steps": 600}}, {"training": {"steps": 600}}]}, [steps])
    assert same == [["p", "600 (2)"]]
    differ = paper_tables.build_table({"p": [{"training": {"steps": 600}}, {"training": {"steps": 604}}]}, [steps])
    assert differ == [["p", "602.000 ± 2.828 (2)"]]  # sample std of 600 and 604
    assert paper_tables.build_table({"p": [{"training": {"steps": 600}}]}, [steps]) == [["p", "600 (1)"]]
    fd = ("FD", paper_tables._get("fd"))  # a float metric equal in both seeds keeps its spread of zero
    assert paper_tables.build_table({"p": [{"fd": 30.0}, {"fd": 30.0}]}, [fd]) == [["p", "30.000 ± 0.000 (2)"]]


def test_unknown_table_is_named():
    with pytest.raises(ValueError, match="unknown table 'table9'"):
        paper_tables.table_columns("table9", {})


def test_cub_clip_table_means_and_says_when_no_clip_model_was_given(tmp_path):
    out = tmp_path / "runs"
    for seed, (generated, real) in enumerate([(20.0, 30.0), (24.0, 30.0)]):
        _write(out, "cub_diffmvae_star_cpu", seed, {"clip_model": "/models/clip-vit-base-patch32", **STANDARD,
                                                    "conditional": {"text": {"image_clip_score": generated}},
                                                    "reference": {"real_images_clip_score": real}})
    _write(out, "cub_mopoe_cpu", 0, {"clip_model": None, "fd_name": "FD_classifier", **STANDARD,
                                     "conditional": {"text": {"image_FD_classifier": 50.0}}})
    written = paper_tables.write_tables(out, tmp_path / "results")
    assert tmp_path / "results" / "table2_cub_clip.csv" in written
    md = (tmp_path / "results" / "table2_cub_clip.md").read_text()
    header = [line for line in md.splitlines() if line.startswith("| preset")][0]
    assert header == "| preset | CLIP score image given text | CLIP score real test images (reference) | CLIP model |"
    assert "evaluation protocol standard" in md.splitlines()[0]
    # mean 22, sample std sqrt((2^2 + 2^2) / 1) = 2.828
    assert "| cub_diffmvae_star_cpu | 22.000 ± 2.828 (2) | 30.000 ± 0.000 (2) | clip-vit-base-patch32 |" in md
    # no CLIP model: empty columns and a note, never a number
    assert "| cub_mopoe_cpu | – | – | none given |" in md
    assert "No CLIP model was given (evaluation.clip_model=null)" in md and "cub_mopoe_cpu (1 of 1)" in md
    assert "cub_diffmvae_star_cpu (" not in md.split("No CLIP model")[1]
    rows = (tmp_path / "results" / "table2_cub_clip.csv").read_text().splitlines()
    assert rows[2] == "cub_mopoe_cpu,–,–,none given"
    # Table 1 still comes from the same runs
    assert "| cub_mopoe_cpu | 50.000 (1) |" in (tmp_path / "results" / "table1_cub.md").read_text()


def test_clip_table_without_any_clip_run_has_only_empty_cells(tmp_path):
    out = tmp_path / "runs"
    _write(out, "cub_mopoe_cpu", 0, {"conditional": {"text": {"image_coherence": 0.1}}})  # a run from before CLIP
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "table2_cub_clip.md").read_text()
    assert "| cub_mopoe_cpu | – | – | none given |" in md and "No CLIP model was given" in md


def test_zoo_table_rows_follow_the_zoo_order_with_budget_fd_and_published_numbers(tmp_path):
    """zoo_polymnist: one row per model in the given order (models without runs left out), the budget,
    coherence means, the mean FD over the (M−1)-given subsets ((10 + 30)/2 = 20), the joint NLL ("not
    supported" for a two-stage model, not a blank), the published column."""
    out = tmp_path / "runs"
    cond = {"m0+m1": {"m2_FD_classifier": 10.0, "m2_coherence": 0.5}, "m1+m2": {"m0_FD_classifier": 30.0},
            "m0": {"m1_FD_classifier": 99.0}}
    for seed, c1 in enumerate([0.4, 0.6]):
        _write(out, "polymnist_mld_cpu", seed, {"fd_name": "FD_classifier", "training": {"steps": 600, "train_seconds": 10},
                                                "coherence_by_num_given": {"1": c1}, "conditional": cond,
                                                "unconditional": {"score": {"agreement": 0.25}},
                                                "joint_log_likelihood": {"supported": False, "reason": "two-stage"}})
    _write(out, "polymnist_mopoe_cpu", 0, {"coherence_by_num_given": {"1": 0.7}, "training": {"steps": 600},
                                           "coherence_by_num_given_se": {"1": 0.0123},
                                           "joint_log_likelihood": {"supported": True, "nll_nats": 3000.5,
                                                                    "bits_per_dim": 1.25}})
    paths = paper_tables.write_zoo_table(out, tmp_path / "results", "polymnist", ["mopoe", "mvae", "mld"])
    md = paths[0].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| m")]
    assert [r.split(" | ")[0] for r in rows] == ["| model", "| mopoe", "| mld"]
    assert rows[1].endswith("| 0.66 / 0.77 / 0.81 / 0.83 (Sutter et al. 2021) |")
    assert "| 600 (1) | – | 0.700 [SE 0.012] (1) | – |" in rows[1]  # one seed: the run's own SE of its coherence
    assert ("| mld | 600 (2) | 10 (2) | 0.500 ± 0.141 (2) | – | – | – | – | "
            "0.250 ± 0.000 (2) | 20.000 ± 0.000 (2) | not supported | not supported | – |") in md
    assert "| 3000.500 (1) | 1.250 (1) | 0.66 / 0.77 / 0.81 / 0.83 (Sutter et al. 2021) |" in rows[1]
    assert "two-stage models define no joint density" in md
    with pytest.raises(SystemExit, match="no experiment preset"):
        paper_tables.zoo_presets("polymnist", ["mopoe", "no_such_model"])
    assert paper_tables.zoo_presets("polymnist", paper_tables.ZOO_MODELS)[-2:] == ["polymnist_diffmvae_star_cpu",
                                                                                   "polymnist_diffmvae_star_v_cpu"]
    assert paper_tables.zoo_presets("shapes", paper_tables.ZOO_MODELS)[-1] == "shapes_diffmvae_star_v_cpu"


def test_a_finished_run_with_another_budget_is_not_reused(tmp_path):
    run = tmp_path / "runs" / "polymnist_mld_cpu" / "seed0"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text("{}")
    (run / ".hydra" / "overrides.yaml").write_text(
        "- experiment=polymnist_mld_cpu\n- seed=0\n- trainer.progress_bar=false\n- trainer.max_steps=600\n")
    assert paper_tables.run_presets(["polymnist_mld_cpu"], [0], tmp_path / "runs", ["trainer.max_steps=600"]) == [run]
    with pytest.raises(SystemExit, match=r"other overrides .*trainer.max_steps=1000"):
        paper_tables.run_presets(["polymnist_mld_cpu"], [0], tmp_path / "runs", ["trainer.max_steps=1000"])


def test_tables_name_the_protocol_and_refuse_to_mix_protocols(tmp_path):
    """Catches: a table that averages or lists quick-protocol runs beside standard ones (64 examples and
    2 subsets per size against the whole split: not comparable), or a caption without the protocol;
    an all-targets coherence column reported under the default convention's name."""
    out = tmp_path / "runs"
    _write(out, "polymnist_mopoe_cpu", 0, {**QUICK, "coherence_by_num_given": {"1": 0.5},
                                           "coherence_all_targets_by_num_given": {"1": 0.6}})
    paper_tables.write_tables(out, tmp_path / "results")
    md = (tmp_path / "results" / "polymnist_coherence.md").read_text()
    assert md.startswith("# polymnist_coherence, evaluation protocol quick (")
    header = [line for line in md.splitlines() if line.startswith("| preset")][0]
    assert "| 1 given (missing targets only) |" in header and header.endswith("| 4 given (all targets) |")
    assert "| polymnist_mopoe_cpu | 0.500 (1) |" in md and "| 0.600 (1) | – | – | – |" in md
    _write(out, "polymnist_mvae_cpu", 0, {**STANDARD, "coherence_by_num_given": {"1": 0.7}})
    with pytest.raises(SystemExit, match=r"polymnist_coherence: .*different protocols \(quick: polymnist_mopoe_cpu; "
                                         r"standard: polymnist_mvae_cpu\)"):
        paper_tables.write_tables(out, tmp_path / "results")
    with pytest.raises(SystemExit, match="zoo_polymnist: .*different protocols"):
        paper_tables.write_zoo_table(out, tmp_path / "results", "polymnist", ["mopoe", "mvae"])
    # one seed of a preset under another protocol is refused too
    _write(out, "polymnist_mvae_cpu", 1, {**QUICK, "coherence_by_num_given": {"1": 0.7}})
    with pytest.raises(SystemExit, match="different protocols"):
        paper_tables.table_protocol("t", {"polymnist_mvae_cpu": paper_tables.collect(out)["polymnist_mvae_cpu"]})


def test_a_hydra_multirun_sweep_runs_each_job_in_its_own_directory_and_tables_read_it(tmp_path):
    """``diffmvae-train -m`` at a tiny size (two models x two seeds, four jobs), then the tables' rows from the
    sweep directory: catches jobs that share or clash over one directory (the second refused as
    "already holds results"), a sweep layout collect() does not read, and the seeds of one setting
    split over rows (or two settings merged into one)."""
    import os
    import subprocess
    import sys

    code = "import sys; from pyro_diffmvae.cli import train_main as main; sys.argv[0] = 'diffmvae-train'; main()"
    env = dict(os.environ, HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    sweep = tmp_path / "sweep"
    res = subprocess.run([sys.executable, "-c", code, "-m", "experiment=tiny", "model=mopoe,mvtcae", "seed=0,1",
                          "latent_prior.fit=false", "evaluation.num_examples=4", f"dataset.cache_dir={tmp_path}/cache",
                          f"evaluation.classifier_cache={tmp_path}/cls", f"hydra.sweep.dir={sweep}"],
                         cwd=tmp_path, capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    runs = paper_tables.collect(sweep)
    assert sorted(runs) == ["tiny model=mopoe", "tiny model=mvtcae"] and all(len(v) == 2 for v in runs.values())
    assert {m["training"]["objective"] for m in runs["tiny model=mvtcae"]} == {"mvtcae"}
    assert paper_tables.sweep_label(["experiment=polymnist_mopoe_cpu", "seed=1", "trainer.max_steps=600"]) == \
        "polymnist_mopoe_cpu"


def test_guidance_table_reads_each_evaluation_with_its_sampler_and_weight(tmp_path, capsys):
    """experiments/guidance_table.py, from hand-made metrics: catches a row that loses the guidance weight (a
    guided and an unguided evaluation would read alike), an NFE without the Tweedie step, or SEs dropped."""
    spec = importlib.util.spec_from_file_location("guidance_table", Path(__file__).resolve().parents[1] / "experiments" / "guidance_table.py")
    guidance_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guidance_table)
    metrics = {"sampler": "dpmpp_2m", "sampler_steps": 9, "guidance": {"image": 2.0}, "fd_name": "FD_classifier",
               "conditional": {"attributes": {"image_FD_classifier": 50.25, "image_FD_classifier_se": 1.5,
                                              "image_label_f1": 0.61, "image_label_f1_se": 0.01},
                               "image": {"attributes_f1": 0.7, "attributes_f1_se": 0.005}},
               "unconditional": {"score": {"image_FD_classifier": 40.0, "agreement": 0.2, "agreement_se": 0.01}},
               "joint_log_likelihood": {"supported": True, "nll_nats": 1234.56, "nll_nats_se": 7.0},
               "evaluation_seconds": 321.0}
    d = tmp_path / "p0.1_s0" / "eval_dpm10_w2.0"
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    guidance_table.main([str(tmp_path)])
    row = capsys.readouterr().out.splitlines()[-1]
    assert row == ("| 0.1 | 0 | dpmpp_2m-9 | 10 | 2.0 | 50.2 ± 1.5 | 0.610 ± 0.010 | – | 0.700 ± 0.005 | 40.0 | – | "
                   "0.200 ± 0.010 | – | 1234.6 ± 7.0 | 321.0 |")
    with pytest.raises(SystemExit, match="no <OUT>"):
        guidance_table.main([str(tmp_path / "p0.1_s0")])


def _write_with_overrides(out: Path, preset: str, seed: int, metrics: dict, overrides: list[str]) -> Path:
    _write(out, preset, seed, metrics)
    run = out / preset / f"seed{seed}"
    (run / ".hydra").mkdir()
    (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    return run


def test_a_table_grows_over_sessions_from_the_run_records(tmp_path, monkeypatch):
    """Catches: a second seed's table that loses the first seed once its run directory is gone (a new
    checkout), a record silently overwritten by a rerun with other numbers, and a recorded run trained again.
    Seed 0 (coherence 0.6) runs in one session's ``out``, seed 1 (0.8) in the next one's; the table of the
    second session has both: mean 0.7, sample std sqrt(0.02) = 0.141."""
    records = tmp_path / "records" / "polymnist.jsonl"
    budget = ["trainer.max_steps=600"]
    first, second = tmp_path / "first", tmp_path / "second"
    _write_with_overrides(first, "polymnist_mopoe_cpu", 0, {**STANDARD, "coherence_by_num_given": {"1": 0.6}},
                          ["experiment=polymnist_mopoe_cpu", "seed=0", *budget])
    assert paper_tables.collect(first, records)["polymnist_mopoe_cpu"] == [{**STANDARD, "coherence_by_num_given": {"1": 0.6}}]
    line = json.loads(records.read_text())
    assert (line["run"], line["row"], line["overrides"]) == ("polymnist_mopoe_cpu/seed0", "polymnist_mopoe_cpu",
                                                            ["experiment=polymnist_mopoe_cpu", "seed=0", *budget])

    _write(second, "polymnist_mopoe_cpu", 1, {**STANDARD, "coherence_by_num_given": {"1": 0.8}})
    paper_tables.write_tables(second, tmp_path / "results", records)
    row = (tmp_path / "results" / "polymnist_coherence.csv").read_text().splitlines()[1]
    assert "0.700 ± 0.141 (2)" in row
    assert len(records.read_text().splitlines()) == 2  # seed 1 appended, seed 0 not written twice
    assert paper_tables.collect(tmp_path / "empty", records)["polymnist_mopoe_cpu"] == [
        {**STANDARD, "coherence_by_num_given": {"1": 0.6}}, {**STANDARD, "coherence_by_num_given": {"1": 0.8}}]

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(paper_tables.subprocess, "run", no_training)
    paper_tables.run_presets(["polymnist_mopoe_cpu"], [0], tmp_path / "third", budget, records)
    with pytest.raises(SystemExit, match=r"polymnist_mopoe_cpu/seed0 in .*other overrides.*trainer.max_steps=900"):
        paper_tables.run_presets(["polymnist_mopoe_cpu"], [0], tmp_path / "third", ["trainer.max_steps=900"], records)

    rerun = tmp_path / "rerun"
    _write(rerun, "polymnist_mopoe_cpu", 0, {**STANDARD, "coherence_by_num_given": {"1": 0.5}})
    with pytest.raises(SystemExit, match=r"'polymnist_mopoe_cpu/seed0' is recorded in .* with other metrics"):
        paper_tables.collect(rerun, records)
    assert len(records.read_text().splitlines()) == 2


def test_a_malformed_or_duplicated_run_record_is_named_with_its_line(tmp_path):
    """Catches: a corrupt record file read as if it were empty (a table quietly missing rows) or a raw
    JSON traceback without the file and line."""
    records = tmp_path / "r.jsonl"
    good = json.dumps({"run": "p/seed0", "row": "p", "metrics": {}})
    records.write_text(good + "\n{not json\n")
    with pytest.raises(SystemExit, match=r"r.jsonl:2 is not a run record"):
        paper_tables.collect(tmp_path / "out", records)
    records.write_text(good + "\n" + json.dumps({"run": "p/seed0", "row": "p"}) + "\n")
    with pytest.raises(SystemExit, match=r"r.jsonl:2 is not a run record.*metrics"):
        paper_tables.read_records(records)
    records.write_text(good + "\n" + good + "\n")
    with pytest.raises(SystemExit, match=r"r.jsonl:2: run 'p/seed0' is recorded twice"):
        paper_tables.read_records(records)


def test_the_runs_of_a_row_are_in_seed_order_seed10_after_seed2(tmp_path):
    """Catches: runs listed in string order (seed10 before seed2), which scrambles a text column's values
    (e.g. the samplers of the seeds) against the seed order."""
    for seed in (10, 2):
        _write(tmp_path, "polymnist_mopoe_cpu", seed, {"seed": seed})
    assert [m["seed"] for m in paper_tables.collect(tmp_path)["polymnist_mopoe_cpu"]] == [2, 10]
