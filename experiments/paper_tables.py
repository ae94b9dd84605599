"""Run experiment presets over seeds and build the paper's tables (Markdown + CSV, mean ± std over seeds).

Run (each preset × seed is one ``diffmvae-train`` in ``<out>/<preset>/seed<k>``; a finished run is
reused, never overwritten)::

    python experiments/paper_tables.py run --presets polymnist_mopoe_cpu polymnist_diffmvae_star_cpu \\
        --seeds 0 1 --out experiments/runs [-- extra hydra overrides]

Train the whole model zoo on one data set with one shared budget and build its table
(``zoo_<dataset>``: coherence by number of given modalities, unconditional coherence, FD; the
published PolyMNIST coherences beside ours)::

    python experiments/paper_tables.py zoo --dataset polymnist --seeds 0 --max-steps 600 --out experiments/runs

Build the tables from whatever runs exist, this script's or a hydra multirun sweep's::

    python experiments/paper_tables.py tables --out experiments/runs --results experiments/results
    diffmvae-train -m experiment=polymnist_mopoe_cpu,polymnist_mvtcae_cpu seed=0,1 trainer.max_steps=600 \
        hydra.sweep.dir=experiments/sweeps/zoo            # each job in experiments/sweeps/zoo/<job>
    python experiments/paper_tables.py tables --out experiments/sweeps/zoo
    python experiments/paper_tables.py zoo-table --dataset polymnist --out experiments/sweeps/zoo

Tables that grow over sessions: run directories (checkpoints, samples) are ignored by git and gone in a
new checkout, so every subcommand takes ``--records <file>.jsonl``, a committed record of each run's
``metrics.json``: the tables are built from the recorded runs plus those under ``--out``, and the new
ones are appended to the record (a recorded run is never overwritten)::

    python experiments/paper_tables.py run --seeds 1 --presets celebamask_hq_mopoe_cpu --out experiments/runs/table3_cpu \\
        --records experiments/results/records/table3_celebamask_hq_cpu.jsonl --results <dir> -- ...

Why ``run`` and ``zoo`` keep their own runner beside multirun: they skip a finished run that ran with
the same overrides (rerun the same command after a crash or a session's end and only the missing
runs train), and they refuse one whose overrides differ; ``diffmvae-train -m`` trains every job again
and numbers the directories by job.

Tables (one Markdown and one CSV file each, rows = presets):

* ``table1_cub``: CUB FD/FID of images generated from text and unconditionally (paper Table 1);
* ``table2_cub_clip``: CUB CLIP score of images generated from text, with the CLIP score of the real
  test images against their captions as a reference (paper Table 2). It needs runs evaluated with
  ``evaluation.clip_model=<local CLIP folder>``; a preset evaluated without one has empty ("–") CLIP
  columns, "none given" in its "CLIP model" column and a note under the Markdown table — no number
  is made up;
* ``table3_celebamask_hq``: CelebAMask-HQ F1 of attributes and masks and FD/FID of images for every
  given subset (paper Table 3);
* ``polymnist_coherence``: conditional coherence by number of given modalities and unconditional
  coherence with N(0, I) and the latent score prior (the MoPoE / MMVAE+ PolyMNIST table).

Every FD column says in its header whether it is Inception FID or a classifier-feature FD. CLIP
scores from different CLIP models are not comparable: the "CLIP model" column names the folder(s).

Every table's caption names the evaluation protocol of its runs (``metrics["protocol"]["label"]``:
``standard``, ``quick`` or ``"<protocol> (modified: ...)"``; runs from before protocols were recorded
are ``unnamed``), and a table whose runs were evaluated under different protocols is refused
(:func:`table_protocol`): their numbers are not comparable. Every coherence column names its
convention: *missing targets only* (MMVAE+ / MultiVae, the default) or *all targets* (MoPoE).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence


_TRAIN = "import sys; from pyro_diffmvae.cli import train_main; sys.argv[0] = 'diffmvae-train'; train_main()"


def run_presets(presets: Sequence[str], seeds: Sequence[int], out: Path, overrides: Sequence[str] = (),
                records: Path | None = None) -> list[Path]:
    """``diffmvae-train experiment=<preset> seed=<k>`` for every pair; returns the run directories. A pair
    that is finished under ``out`` or recorded in ``records`` (:func:`update_records`) is not trained again,
    provided it ran with the same ``overrides``."""
    recorded = _recorded_overrides(records) if records is not None else {}
    runs = []
    for preset in presets:
        for seed in seeds:
            run_dir = out / preset / f"seed{seed}"
            runs.append(run_dir)
            if (run_dir / "metrics.json").exists():
                _check_same_overrides(run_dir, overrides)
                print(f"[paper_tables] {run_dir} is finished; reusing it")
                continue
            run_id = f"{preset}/seed{seed}"
            if run_id in recorded:
                _check_same_overrides(run_dir, overrides, ran=recorded[run_id], where=f"{run_id} in {records}")
                print(f"[paper_tables] {run_id} is recorded in {records}; not training it again")
                continue
            cmd = [sys.executable, "-c", _TRAIN, f"experiment={preset}", f"seed={seed}",
                   f"hydra.run.dir={run_dir}", "trainer.progress_bar=false", *overrides]
            print("[paper_tables] " + " ".join(cmd), flush=True)
            subprocess.run(cmd, check=True)
    return runs


def _check_same_overrides(run_dir: Path, overrides: Sequence[str], ran: Sequence[str] | None = None,
                          where: str | None = None) -> None:
    """A finished run is reused only if it ran with the same extra overrides (e.g. the same budget)
    as asked for now; its ``.hydra/overrides.yaml`` (or, for a recorded run, ``ran``) says what it ran with."""
    if ran is None:
        ran = _overrides_of(run_dir)
        if ran is None:
            return
    own = ("experiment", "seed", "trainer.progress_bar", "hydra.run.dir")  # what run_presets itself passes
    differ = sorted(set(overrides) ^ {o for o in ran if o.split("=")[0] not in own})
    if differ:
        raise SystemExit(f"{where or run_dir} is finished but ran with other overrides (they differ in {differ}); "
                         "remove it or choose another --out" + (" and --records" if where else ""))


def _overrides_of(run_dir: Path) -> list[str] | None:
    """The overrides a run ran with (its ``.hydra/overrides.yaml``), or None without that file."""
    stored = run_dir / ".hydra" / "overrides.yaml"
    if not stored.is_file():
        return None
    return [line[2:].strip() for line in stored.read_text().splitlines() if line.startswith("- ")]


def _recorded_overrides(records: Path) -> dict[str, list[str]]:
    """``{run id: overrides}`` of the runs in ``records`` that recorded their overrides."""
    return {run_id: r["overrides"] for run_id, r in _record_lines(records).items() if r.get("overrides") is not None}


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single seed)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def collect(out: Path, records: Path | None = None) -> dict[str, list[dict]]:
    """``{row: [metrics of each run]}`` from ``<out>/<preset>/seed*/metrics.json`` (this script's
    runs), from ``<out>/<preset>/seed*/eval_*/metrics.json`` (a trained run evaluated again with
    other settings, ``diffmvae-evaluate ... hydra.run.dir=<run>/eval_<label>``: row ``"<preset> [<label>]"``,
    with the run's training figures) and from ``<out>/<job>/metrics.json`` (a hydra multirun sweep, ``diffmvae-train -m``), whose
    rows are named by :func:`sweep_label`; with ``records``, also from that run-record file (:func:`read_records`),
    which is then brought up to date with the runs under ``out`` (:func:`update_records`)."""
    found = runs_under(out)
    if records is not None:
        found = update_records(records, found, out)
    rows: dict[str, list[dict]] = {}
    for run_id in sorted(found, key=_natural):  # seed2 before seed10, sweep job 2 before job 10
        row, metrics = found[run_id]
        rows.setdefault(row, []).append(metrics)
    return rows


def _natural(text: str) -> list:
    """A sort key that orders the numbers inside ``text`` by value."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def runs_under(out: Path) -> dict[str, tuple[str, dict]]:
    """``{run id: (row, metrics)}`` for every run under ``out`` (the layouts of :func:`collect`); the run id
    is the run's directory relative to ``out`` (``<preset>/seed1``, ``<preset>/seed1/eval_w1``, ``<job>``)."""
    found: dict[str, tuple[str, dict]] = {}
    for path in sorted(out.glob("*/seed*/metrics.json")):
        found[path.parent.relative_to(out).as_posix()] = (path.parent.parent.name, json.loads(path.read_text()))
    for path in sorted(out.glob("*/seed*/eval_*/metrics.json")):  # re-evaluations of a trained run (diffmvae-evaluate)
        run = path.parent.parent
        metrics = json.loads(path.read_text())
        trained = run / "metrics.json"
        if "training" not in metrics and trained.is_file():  # the model's training is the run's
            metrics["training"] = json.loads(trained.read_text()).get("training")
        found[path.parent.relative_to(out).as_posix()] = (f"{run.parent.name} [{path.parent.name[len('eval_'):]}]",
                                                          metrics)
    for path in out.glob("*/metrics.json"):  # a sweep's jobs (ordered by collect)
        overrides = path.parent / ".hydra" / "overrides.yaml"
        if overrides.is_file():
            found[path.parent.name] = (sweep_label(_read_overrides(overrides)), json.loads(path.read_text()))
    return found


def read_records(records: Path) -> dict[str, tuple[str, dict]]:
    """The run records of ``records`` (JSON lines ``{"run": id, "row": row, "metrics": {...}}``, see
    :func:`update_records`) as ``{run id: (row, metrics)}``; a malformed line or a run recorded twice
    is an error that names the file and the line."""
    return {run_id: (r["row"], r["metrics"]) for run_id, r in _record_lines(records).items()}


def _record_lines(records: Path) -> dict[str, dict]:
    """``{run id: record}`` of the checked lines of ``records`` (none if the file does not exist yet)."""
    found: dict[str, dict] = {}
    if not records.is_file():
        return found
    for number, line in enumerate(records.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            run_id, row, metrics = record["run"], record["row"], record["metrics"]
        except (ValueError, KeyError, TypeError) as err:
            raise SystemExit(f"{records}:{number} is not a run record ({{\"run\", \"row\", \"metrics\"}}): {err}")
        if not (isinstance(run_id, str) and isinstance(row, str) and isinstance(metrics, dict)):
            raise SystemExit(f"{records}:{number}: run and row must be strings and metrics an object")
        if run_id in found:
            raise SystemExit(f"{records}:{number}: run {run_id!r} is recorded twice")
        found[run_id] = record
    return found


def _canonical(record: tuple[str, dict]) -> str:
    """A record as comparable text (a NaN in the metrics equals itself here, unlike in ``==``)."""
    return json.dumps(record, sort_keys=True)


def update_records(records: Path, runs: Mapping[str, tuple[str, dict]], out: Path) -> dict[str, tuple[str, dict]]:
    """Add the runs of ``runs`` (:func:`runs_under`) that ``records`` lacks to it and return every recorded run.

    Why: run directories (checkpoints, samples) are too large to commit and do not outlive a checkout, so a
    table that grows over several sessions (a second seed, a new row) is rebuilt from the committed record
    of each run's ``metrics.json`` (with the overrides it ran with, from ``<out>/<run id>/.hydra``) plus the
    runs of this session. A run that is already recorded with other
    metrics is refused, naming it: a record is never silently overwritten (remove its line to replace it)."""
    recorded = read_records(records)
    new = {}
    for run_id, (row, metrics) in runs.items():
        if run_id not in recorded:
            new[run_id] = (row, metrics)
        elif _canonical(recorded[run_id]) != _canonical((row, metrics)):
            raise SystemExit(f"run {run_id!r} is recorded in {records} with other metrics than its metrics.json; "
                             "remove its line from the record file to replace it, or use another --records")
    if new:
        records.parent.mkdir(parents=True, exist_ok=True)
        with open(records, "a") as f:
            for run_id in sorted(new):
                row, metrics = new[run_id]
                record = {"run": run_id, "row": row, "overrides": _overrides_of(out / run_id), "metrics": metrics}
                f.write(json.dumps(record, sort_keys=True) + "\n")
    return {**recorded, **new}


def _read_overrides(path: Path) -> list[str]:
    from omegaconf import OmegaConf

    return [str(o) for o in OmegaConf.load(path)]


def sweep_label(overrides: Sequence[str]) -> str:
    """A sweep job's row: its ``experiment`` (the preset, as this script's rows are named), then every
    other config-group choice (``model=mopoe``, ...); ``seed`` and dotted settings are left out, so
    the seeds of one setting share a row (a sweep over a dotted setting: give each value its own
    ``--out``)."""
    choices = dict(o.split("=", 1) for o in overrides if "=" in o and not o.startswith(("+", "~")))
    label = [choices.pop("experiment", "default")]
    label += [f"{k}={v}" for k, v in choices.items() if k != "seed" and "." not in k]
    return " ".join(label)


Column = tuple[str, Callable[[Mapping], float | str | None]]

#: the protocol label of a run whose metrics.json predates evaluation protocols
UNNAMED_PROTOCOL = "unnamed (metrics.json from before evaluation protocols)"


def run_protocol(metrics: Mapping) -> str:
    """The evaluation protocol a run was evaluated under (its label)."""
    protocol = metrics.get("protocol")
    return str(protocol.get("label", protocol.get("name"))) if isinstance(protocol, Mapping) else UNNAMED_PROTOCOL


def table_protocol(table: str, runs: Mapping[str, list[dict]]) -> str:
    """The one protocol of ``runs``; a clear error naming the presets when they mix protocols."""
    by_protocol: dict[str, set[str]] = {}
    for preset, seeds in runs.items():
        for m in seeds:
            by_protocol.setdefault(run_protocol(m), set()).add(preset)
    if len(by_protocol) > 1:
        which = "; ".join(f"{p}: {', '.join(sorted(presets))}" for p, presets in sorted(by_protocol.items()))
        raise SystemExit(f"table {table}: its runs were evaluated under different protocols ({which}); their numbers "
                         "are not comparable. Re-evaluate them under one protocol (diffmvae-evaluate "
                         "evaluation.protocol=...) or build the table from runs of one protocol (another --out)")
    return next(iter(by_protocol), UNNAMED_PROTOCOL)


def _get(*keys: str, with_se: bool = True) -> Callable[[Mapping], int | float | None]:
    """A reader of ``metrics[k1][k2]...``; its ``se`` attribute reads the run's own standard error beside it
    (``...[kn + "_se"]``), which :func:`build_table` shows for a row of one seed."""
    def read(metrics: Mapping):
        node = metrics
        for k in keys:
            if not isinstance(node, Mapping) or k not in node:
                return None
            node = node[k]
        if isinstance(node, bool) or not isinstance(node, (int, float)):
            return None
        return node if isinstance(node, int) else float(node)  # an int stays one: a count (steps), not a measurement
    if with_se:
        read.se = _get(*keys[:-1], keys[-1] + "_se", with_se=False)
    return read


def _by_num_given(key: str, k: int) -> Callable[[Mapping], int | float | None]:
    """A reader of ``metrics[key][str(k)]`` (a coherence by number of given modalities); its ``se`` reads the
    run's standard error, which the evaluation stores beside the dict as ``metrics[key + "_se"][str(k)]``."""
    read = _get(key, str(k), with_se=False)
    read.se = _get(key + "_se", str(k), with_se=False)
    return read


def _coherence_by_num_given(key: str, convention: str) -> list[Column]:
    """The four columns "k given (<convention>)", k = 1…4, of ``metrics[key]`` (:func:`_by_num_given`)."""
    return [(f"{k} given ({convention})", _by_num_given(key, k)) for k in range(1, 5)]


def _joint(key: str) -> Callable[[Mapping], float | str | None]:
    """A reader of ``metrics["joint_log_likelihood"][key]``: "not supported" for models it cannot
    score (two-stage), ``None`` for runs evaluated without it."""
    def read(metrics: Mapping):
        joint = metrics.get("joint_log_likelihood")
        if not isinstance(joint, Mapping):
            return None
        return _get(key)(joint) if joint.get("supported") else "not supported"
    read.se = _get("joint_log_likelihood", key + "_se", with_se=False)  # the SE over test examples, for one seed
    return read


JOINT_NOTE = ("Joint NLL: −log p(x) of all modalities per test example (nats) and per dimension of the 8-bit data "
              "(bits/dim, images dequantised), by importance sampling with each model's own posterior "
              "(evaluation.loglik_*; each run's report.md names the estimator and whether it is a bound); "
              "two-stage models define no joint density to estimate (\"not supported\").")

#: the joint NLL columns of every zoo table (``metrics["joint_log_likelihood"]``)
JOINT_BITS_PER_DIM: Column = ("joint bits/dim", _joint("bits_per_dim"))
JOINT_COLUMNS: list[Column] = [("joint NLL nats", _joint("nll_nats")), JOINT_BITS_PER_DIM]


def _clip_model(metrics: Mapping) -> str:
    """The CLIP folder's name a run was evaluated with, or "none given"."""
    path = metrics.get("clip_model")
    return Path(str(path)).name if path else "none given"


def what_ran(metrics: Mapping) -> str | None:
    """A run's model and how its diffusion decoders were sampled, in one cell: ``"<model>, <bound | not a bound>"``
    and, for a run with diffusion decoders, ``"; <sampler> <steps> steps"``, the guidance weights other than 1 and
    ``", bf16 networks"`` for bf16 sampling, the start time of a start from the noised hint (from ``metrics["ledger"]``,
    ``["sampler"]``, ``["sampler_steps"]``, ``["guidance"]``, ``["sample_precision"]`` and ``["hint_start"]``); ``None`` for a run evaluated before the ledger existed."""
    ledger = metrics.get("ledger")
    if not isinstance(ledger, Mapping):
        return None
    cell = str(ledger.get("model", "?")).split(" — ")[0]
    if ledger.get("is_bound") is not None:
        cell += ", a bound" if ledger["is_bound"] else ", not a bound"
    if ledger.get("diffusion_decoders"):
        cell += f"; {metrics.get('sampler', '?')} {metrics.get('sampler_steps', '?')} steps"
        weights = sorted({float(w) for w in (metrics.get("guidance") or {}).values() if float(w) != 1.0})
        if weights:
            cell += ", guidance w = " + "/".join(f"{w:g}" for w in weights)
        if "bf16" in (metrics.get("sample_precision") or {}).values():
            cell += ", bf16 networks"
        starts = sorted({float(t) for t in (metrics.get("hint_start") or {}).values() if t is not None})
        if starts:
            cell += ", from the noised hint at t0 = " + "/".join(f"{t:g}" for t in starts)
    return cell


#: the first column of the tables after the preset: what each row ran (:func:`what_ran`)
WHAT_RAN: Column = ("model; decoders' sampler", what_ran)


def columns_some_run_has(columns: Sequence[Column], runs: Mapping[str, list[dict]]) -> list[Column]:
    """The columns whose reader finds a value in at least one run: a table's optional columns (what ran,
    the all-targets coherence, a conditional some data set lacks) are left out rather than shown as "–"."""
    return [c for c in columns if any(c[1](m) is not None for seeds in runs.values() for m in seeds)]


def _format_value(value: float | int) -> str:
    """A count (an ``int``: steps) without decimals, a measurement (a ``float``, even a whole one) with three."""
    return f"{value:d}" if isinstance(value, int) else f"{value:.3f}"


def build_table(runs: Mapping[str, list[dict]], columns: Sequence[Column]) -> list[list[str]]:
    """Rows ``[preset, "mean ± std (n)" ...]``; a value of one seed with its run's standard error (a reader's
    ``se``) is ``"value [SE se] (1)"``, without one ``"value (1)"``, and a count every seed shares
    ``"value (n)"`` (e.g. ``"600 (2)"`` steps; :func:`_format_value`: counts without decimals, measurements
    with three); a value missing in every seed is "–"; a text column (its reader returns strings) lists the
    distinct values over the seeds."""
    rows = []
    for preset, seeds in sorted(runs.items()):
        row = [preset]
        for _, read in columns:
            found = [(v, m) for v, m in ((read(m), m) for m in seeds) if v is not None]
            vals = [v for v, _ in found]
            se = read.se(found[0][1]) if len(found) == 1 and hasattr(read, "se") else None
            if not vals:
                row.append("–")
            elif all(isinstance(v, str) for v in vals):
                row.append(" / ".join(sorted(set(vals))))
            elif se is not None:
                row.append(f"{vals[0]:.3f} [SE {se:.3f}] (1)")
            elif len(vals) == 1 or (len(set(vals)) == 1 and all(isinstance(v, int) for v in vals)):
                # one seed without an SE, or a count every seed shares (steps): the value alone
                row.append(f"{_format_value(vals[0])} ({len(vals)})")
            else:
                mean, std = _mean_std(vals)
                row.append(f"{mean:.3f} ± {std:.3f} ({len(vals)})")
        rows.append(row)
    return rows


def _fd_name(runs: Mapping[str, list[dict]]) -> str:
    names = {m.get("fd_name") for seeds in runs.values() for m in seeds if m.get("fd_name")}
    return "/".join(sorted(names)) or "FD"


def _table1_cub(runs: Mapping[str, list[dict]]) -> list[Column]:
    fd = _fd_name(runs)
    return [(f"image {fd} given text", _get("conditional", "text", f"image_{fd}")),
            (f"image {fd} unconditional N(0,I)", _get("unconditional", "normal", f"image_{fd}")),
            (f"image {fd} unconditional score prior", _get("unconditional", "score", f"image_{fd}")),
            ("image class coherence given text (missing targets only)", _get("conditional", "text", "image_coherence"))]


def _table2_cub_clip(runs: Mapping[str, list[dict]]) -> list[Column]:
    return [("CLIP score image given text", _get("conditional", "text", "image_clip_score")),
            ("CLIP score real test images (reference)", _get("reference", "real_images_clip_score")),
            ("CLIP model", _clip_model)]


def _table3_celebamask_hq(runs: Mapping[str, list[dict]]) -> list[Column]:
    fd = _fd_name(runs)
    given = sorted({g for seeds in runs.values() for m in seeds for g in m.get("conditional", {})})
    cols: list[Column] = []
    for g in given:
        cols += [(f"attributes F1 given {g}", _get("conditional", g, "attributes_f1")),
                 (f"mask F1 given {g}", _get("conditional", g, "mask_f1")),
                 (f"image {fd} given {g}", _get("conditional", g, f"image_{fd}")),
                 (f"attribute F1 of the image read back, given {g}", _get("conditional", g, "image_label_f1"))]
    for prior, name in (("normal", "N(0,I)"), ("score", "score prior")):  # unconditional generation (paper: Table 3's last rows)
        cols += [(f"image {fd} unconditional {name}", _get("unconditional", prior, f"image_{fd}")),
                 (f"agreement unconditional {name}", _get("unconditional", prior, "agreement"))]
    cols += [JOINT_BITS_PER_DIM]  # the comparable unit (the nats are of the images scaled to [-1, 1]: see each report)
    cols += [("train steps", _get("training", "steps")), ("train s", _get("training", "train_seconds"))]
    return columns_some_run_has([WHAT_RAN, *cols], runs)


def _polymnist_coherence(runs: Mapping[str, list[dict]]) -> list[Column]:
    missing_targets = _coherence_by_num_given("coherence_by_num_given", "missing targets only")
    all_targets = _coherence_by_num_given("coherence_all_targets_by_num_given", "all targets")
    unconditional = [("unconditional N(0,I)", _get("unconditional", "normal", "agreement")),
                     ("unconditional score prior", _get("unconditional", "score", "agreement"))]
    # the coherence and unconditional columns are the table's shape ("–" where a run lacks one); what ran is
    # optional, the all-targets convention too, as one block of four
    return [*columns_some_run_has([WHAT_RAN], runs), *missing_targets, *unconditional,
            *(all_targets if columns_some_run_has(all_targets, runs) else [])]


#: table name → its columns for the runs it is built from
TABLE_COLUMNS: dict[str, Callable[[Mapping[str, list[dict]]], list[Column]]] = {
    "table1_cub": _table1_cub, "table2_cub_clip": _table2_cub_clip,
    "table3_celebamask_hq": _table3_celebamask_hq, "polymnist_coherence": _polymnist_coherence}


def table_columns(kind: str, runs: Mapping[str, list[dict]]) -> list[Column]:
    if kind not in TABLE_COLUMNS:
        raise ValueError(f"unknown table {kind!r}")
    return TABLE_COLUMNS[kind](runs)


TABLES = {"table1_cub": "cub", "table2_cub_clip": "cub", "table3_celebamask_hq": "celebamask_hq",
          "polymnist_coherence": "polymnist"}


def table_notes(kind: str, runs: Mapping[str, list[dict]]) -> list[str]:
    """Lines written under a Markdown table."""
    if kind == "table2_cub_clip":
        without = {p: sum(not m.get("clip_model") for m in seeds) for p, seeds in sorted(runs.items())}
        without = {p: k for p, k in without.items() if k}
        if without:
            which = ", ".join(f"{p} ({k} of {len(runs[p])})" for p, k in without.items())
            return [f"No CLIP model was given (evaluation.clip_model=null) in some runs, so they have no CLIP score: "
                    f"{which}. A preset without any scored run shows \"–\"; the number in brackets counts the scored runs. "
                    "Runs with the override evaluation.clip_model=<local CLIP folder> fill these columns."]
    return []


def _write_table(results: Path, name: str, title: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                 notes: Sequence[str] = ()) -> list[Path]:
    """``<results>/<name>.md`` (title, table, one paragraph per note) and ``<name>.csv``; returns both paths."""
    results.mkdir(parents=True, exist_ok=True)
    md, csv_path = results / f"{name}.md", results / f"{name}.csv"
    md.write_text("\n".join([
        f"# {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows), "", *(line for note in notes for line in (note, ""))]))
    with open(csv_path, "w", newline="") as f:
        csv.writer(f).writerows([list(header), *rows])
    return [md, csv_path]


def write_tables(out: Path, results: Path, records: Path | None = None) -> list[Path]:
    """Build every table whose data set has runs under ``out`` (or in ``records``); returns the files written."""
    runs = collect(out, records)
    written = []
    for kind, prefix in TABLES.items():
        selected = {p: s for p, s in runs.items() if p.startswith(prefix)}
        if not selected:
            continue
        protocol = table_protocol(kind, selected)
        columns = table_columns(kind, selected)
        rows = build_table(selected, columns)
        header = ["preset"] + [name for name, _ in columns]
        written += _write_table(results, kind, f"{kind}, evaluation protocol {protocol} (mean ± std over seeds, "
                                "number of seeds in brackets; [SE ...]: one seed, with its run's standard error; a value "
                                "alone: one seed)",
                                header, rows,
                                [*table_notes(kind, selected), *([JOINT_NOTE] if JOINT_BITS_PER_DIM in columns else [])])
    return written


#: the zoo of ``zoo``: every model with a ``<dataset>_<model>_cpu`` preset, in the paper's order
ZOO_MODELS = ("mvae", "mmvae", "mopoe", "mopoe_star", "mvtcae", "mmvae_plus", "sbm_vae_c", "mld", "diffmvae_star",
              "diffmvae_star_v")

#: published PolyMNIST conditional coherence for 1/2/3/4 given modalities (as quoted in the MoPoE,
#: MVTCAE and MMVAE+ papers; their budgets, backgrounds and classifiers, not ours)
PUBLISHED_POLYMNIST = {
    "mopoe": "0.66 / 0.77 / 0.81 / 0.83 (Sutter et al. 2021)",
    "mvtcae": "0.69 / 0.77 / 0.83 / 0.86 (Hwang et al. 2021)",
    "mmvae": "0.71 (Palumbo et al. 2023)",
    "mmvae_plus": "≈ 0.86–0.87 (Palumbo et al. 2023)",
}


def zoo_presets(dataset: str, models: Sequence[str]) -> list[str]:
    """``<dataset>_<model>_cpu`` for each model; a model without that preset is a clear error."""
    configs = Path(__file__).resolve().parents[1] / "pyro_diffmvae" / "configs" / "experiment"
    presets = [f"{dataset}_{m}_cpu" for m in models]
    missing = [p for p in presets if not (configs / f"{p}.yaml").is_file()]
    if missing:
        raise SystemExit(f"no experiment preset {missing} in {configs}; the zoo runs models with a "
                         f"{dataset}_<model>_cpu preset")
    return presets


def _zoo_coherence_columns(fd: str) -> list[Column]:
    """The zoo columns of a labelled data set: coherence by number of given modalities (missing targets only)."""
    return _coherence_by_num_given("coherence_by_num_given", "missing targets only")


def _zoo_factor_columns(fd: str) -> list[Column]:
    """The zoo columns of the shapes scenes: per-factor accuracy read back by the classifier (chance 1/3,
    the mean of 1/|factor|) and F1."""
    return [("image factor acc given attributes", _get("conditional", "attributes", "image_factor_acc")),
            ("image factor acc given mask", _get("conditional", "mask", "image_factor_acc")),
            ("attributes F1 given image", _get("conditional", "image", "attributes_f1")),
            ("mask F1 given attributes", _get("conditional", "attributes", "mask_f1"))]


class ZooLayout(NamedTuple):
    """The columns of a ``zoo_<dataset>`` table besides the budget and the unconditional coherence."""

    columns: Callable[[str], list[Column]] = _zoo_coherence_columns  # fd name -> columns
    mean_fd_all_but_one: bool = True  # the mean FD of the missing modality given all others
    published: Mapping[str, str] | None = None  # model -> published coherences, a last column


#: table name → its layout; a ``zoo_<dataset>`` table not named here has the default layout
ZOO_LAYOUTS: dict[str, ZooLayout] = {
    "zoo_shapes": ZooLayout(columns=_zoo_factor_columns, mean_fd_all_but_one=False),
    "zoo_polymnist": ZooLayout(published=PUBLISHED_POLYMNIST),
}


def write_zoo_table(out: Path, results: Path, dataset: str, models: Sequence[str],
                    records: Path | None = None) -> list[Path]:
    """``zoo_<dataset>.md/.csv``: one row per model (zoo order) with the budget it had, coherence by
    number of given modalities, unconditional coherence with N(0, I) and the latent score prior
    (stage 2 for the two-stage models), and, for PolyMNIST, the published coherences
    (:data:`ZOO_LAYOUTS`)."""
    runs = collect(out, records)
    fd = _fd_name(runs)
    table = f"zoo_{dataset}"
    presets = {f"{dataset}_{m}_cpu" for m in models}
    selected = {p: s for p, s in runs.items() if p in presets}
    protocol = table_protocol(table, selected)
    layout = ZOO_LAYOUTS.get(table, ZooLayout())
    columns = columns_some_run_has([WHAT_RAN], selected)
    columns += [("steps", _get("training", "steps")), ("train s", _get("training", "train_seconds"))]
    columns += layout.columns(fd)
    columns += [("unconditional N(0,I)", _get("unconditional", "normal", "agreement")),
                ("unconditional score prior", _get("unconditional", "score", "agreement"))]
    if layout.mean_fd_all_but_one:
        columns.append((f"mean {fd} given all but one", lambda m: _mean_fd_all_but_one(m, fd)))
    columns += JOINT_COLUMNS
    rows = []
    for model in models:
        preset = f"{dataset}_{model}_cpu"
        if preset not in runs:
            continue
        row = build_table({preset: runs[preset]}, columns)[0]
        row[0] = model
        if layout.published is not None:
            row.append(layout.published.get(model, "–"))
        rows.append(row)
    if not rows:
        return []
    header = ["model"] + [name for name, _ in columns] + (["published coherence 1/2/3/4 given"] if layout.published else [])
    return _write_table(results, table,
                        f"{table}: every model with one budget, evaluation protocol {protocol} (mean ± std over "
                        "seeds, number of seeds in brackets)",
                        header, rows, [f"Runs under {out}" + (f" and recorded in {records}" if records else "")
                                       + ". The published numbers come from other budgets, backgrounds "
                                       "and classifiers: compare them for order of magnitude only.", JOINT_NOTE])


def _mean_fd_all_but_one(metrics: Mapping, fd: str) -> float | None:
    """Mean FD of the one missing modality over the given subsets of size M − 1 that were evaluated."""
    cond = metrics.get("conditional", {})
    if not cond:
        return None
    M = max(len(g.split("+")) for g in cond) + 1
    vals = [v for g, row in cond.items() if len(g.split("+")) == M - 1
            for k, v in row.items() if k.endswith(f"_{fd}")]
    return sum(vals) / len(vals) if vals else None


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train presets over seeds, then build the tables")
    run.add_argument("--presets", nargs="+", required=True)
    run.add_argument("--seeds", nargs="+", type=int, default=[0])
    run.add_argument("--out", type=Path, default=Path("experiments/runs"))
    run.add_argument("--results", type=Path, default=Path("experiments/results"))
    run.add_argument("overrides", nargs="*", help="extra hydra overrides (after --)")
    zoo = sub.add_parser("zoo", help="train every model of the zoo on one data set with one budget and seeds, "
                                     "then build its table (zoo_<dataset>) and the paper tables")
    zoo.add_argument("--dataset", default="polymnist")
    zoo.add_argument("--models", nargs="+", default=list(ZOO_MODELS))
    zoo.add_argument("--seeds", nargs="+", type=int, default=[0])
    zoo.add_argument("--max-steps", type=int, default=None, help="the shared budget (default: the presets' own)")
    zoo.add_argument("--out", type=Path, default=Path("experiments/runs"))
    zoo.add_argument("--results", type=Path, default=Path("experiments/results"))
    zoo.add_argument("overrides", nargs="*", help="extra hydra overrides (after --)")
    tables = sub.add_parser("tables", help="build the tables from existing runs (or a multirun sweep directory)")
    tables.add_argument("--out", type=Path, default=Path("experiments/runs"))
    tables.add_argument("--results", type=Path, default=Path("experiments/results"))
    zoo_table = sub.add_parser("zoo-table", help="build zoo_<dataset> from existing runs (or a multirun sweep)")
    zoo_table.add_argument("--dataset", default="polymnist")
    zoo_table.add_argument("--models", nargs="+", default=list(ZOO_MODELS))
    zoo_table.add_argument("--out", type=Path, default=Path("experiments/runs"))
    zoo_table.add_argument("--results", type=Path, default=Path("experiments/results"))
    for command in (run, zoo, tables, zoo_table):
        command.add_argument("--records", type=Path, default=None,
                             help="a run-record file (JSON lines, e.g. experiments/results/records/<table>.jsonl): its "
                                  "runs join those under --out in the tables, and the runs under --out that it lacks "
                                  "are added to it, so that a table can grow over sessions whose run directories are gone")
    args = parser.parse_args(argv)
    written = []
    if args.command == "run":
        run_presets(args.presets, args.seeds, args.out, args.overrides, args.records)
    if args.command == "zoo":
        if args.max_steps is not None and args.max_steps < 1:
            raise SystemExit(f"--max-steps must be positive, got {args.max_steps}")
        budget = [] if args.max_steps is None else [f"trainer.max_steps={args.max_steps}"]
        run_presets(zoo_presets(args.dataset, args.models), args.seeds, args.out, budget + list(args.overrides),
                    args.records)
        written += write_zoo_table(args.out, args.results, args.dataset, args.models, args.records)
    if args.command == "zoo-table":
        written += write_zoo_table(args.out, args.results, args.dataset, args.models, args.records)
    for path in written + write_tables(args.out, args.results, args.records):
        print(f"[paper_tables] wrote {path}")


if __name__ == "__main__":
    main()
