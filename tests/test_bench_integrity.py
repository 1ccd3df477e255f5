"""Result integrity of the benchmark runner (issue 14, items 7-11): run keys follow the data's content, no run
is recorded twice, an undefined AUC is a failure in strict JSON, suites are checked whole before anything trains,
and malformed results lines are named by file and line."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from embcompress import SpecError
from embcompress.plot import plot_results
from embcompress.report import format_table
from embcompress.results import read_results
from embcompress.runner import reference_key, run_key, run_suite, trial_key
from embcompress.suite import default_suite_path, load_suite
from embcompress.cli import main

BENCHMARKS = default_suite_path().parent
TINY = {
    "name": "tiny",
    "data": {"synthetic": {"rows": 20_000, "cardinality_exponent": 0.25}},
    "embedding_dim": 8,
    "model": {"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [16]},
    "train": {"epochs": 1, "batch_size": 2048, "lr": 0.01},
    "seeds": [0],
    "reference": False,
    "methods": [
        {"name": "full", "table": {"type": "full.v1", "sparse": True}},
        {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": [4, 16]},
    ],
}


def write(tmp_path, suite, name="suite.yaml"):
    path = tmp_path / name
    path.write_text(suite if isinstance(suite, str) else yaml.safe_dump(suite))
    return path


def strict_records(path):
    """Records of a results file parsed as strict JSON (a bare NaN or Infinity fails)."""
    def refuse(constant):
        raise AssertionError(f"{path}: non-JSON constant {constant}")

    return [json.loads(line, parse_constant=refuse) for line in Path(path).read_text().splitlines()]


def criteo_folder(tmp_path, name, n=70, label=lambda i: i % 2, values=5):
    """A prepared Criteo folder of ``n`` hand-made rows (dlrm split: 6/7 train, then test, then val)."""
    from embcompress.criteo import prepare_criteo

    lines = ["\t".join([str(label(i))] + [str(i % 7)] * 13 + [f"{i % values:08x}"] * 26) for i in range(n)]
    tsv = tmp_path / f"{name}.tsv"
    tsv.write_text("".join(line + "\n" for line in lines))
    out = tmp_path / name
    prepare_criteo(tsv, out, dense_buckets=True)
    return out


CRITEO_SUITE = {"name": "c", "embedding_dim": 4, "model": {"type": "lr.v1"}, "reference": False,
                "train": {"epochs": 1, "batch_size": 64}, "methods": [{"name": "full", "table": {"type": "full.v1"}}]}


# ------------------------------------------------------------------------------------ 7: stale results
def test_a_rebuilt_data_folder_is_not_reported_as_done(tmp_path):
    folder = criteo_folder(tmp_path, "data")
    path = write(tmp_path, {**CRITEO_SUITE, "data": {"criteo": {"path": str(folder)}}})
    out = tmp_path / "out"
    first = run_suite(load_suite(path), out, progress=False)
    assert [r["status"] for r in first] == ["ok"]
    # the same folder rebuilt from other rows: other cardinalities, so other bytes
    shutil.rmtree(folder)
    criteo_folder(tmp_path, "data", n=140, values=9)
    suite = load_suite(path)
    assert run_key(suite, suite.runs()[0]) != first[0]["run_key"]
    second = run_suite(suite, out, progress=False)
    assert second[0]["run_key"] != first[0]["run_key"]
    assert second[0]["baseline_bytes"] > first[0]["baseline_bytes"]  # measured on the new cardinalities
    assert len(read_results(out / "results.jsonl")) == 2


def test_a_copied_data_folder_keeps_its_results(tmp_path):
    folder = criteo_folder(tmp_path, "data")
    copy = tmp_path / "elsewhere"
    shutil.copytree(folder, copy)
    path = write(tmp_path, {**CRITEO_SUITE, "data": {"criteo": {"path": str(folder)}}})
    a, b = load_suite(path), load_suite(path, data_path=copy)
    assert run_key(a, a.runs()[0]) == run_key(b, b.runs()[0])  # the key follows the content, not the path
    assert reference_key(a) == reference_key(b)


def test_a_folder_changed_after_the_suite_was_loaded_is_refused(tmp_path):
    folder = criteo_folder(tmp_path, "data")
    suite = load_suite(write(tmp_path, {**CRITEO_SUITE, "data": {"criteo": {"path": str(folder)}}}))
    shutil.rmtree(folder)
    criteo_folder(tmp_path, "data", n=140, values=9)
    with pytest.raises(SpecError, match="changed since the suite was loaded"):
        run_suite(suite, tmp_path / "out", progress=False)


COMMITTED = [("init_std.jsonl", "init_std.yaml"), ("methods.jsonl", "methods.yaml"),
             ("methods.jsonl", "methods_seeds.yaml"), ("models.jsonl", "models.yaml"),
             pytest.param("synthetic_full.jsonl", "synthetic_full.yaml", marks=pytest.mark.slow)]


@pytest.mark.parametrize("results, suite_file", COMMITTED)
def test_committed_results_keep_their_run_keys(results, suite_file):
    suite = load_suite(BENCHMARKS / suite_file)
    records = [r for r in read_results(BENCHMARKS / "results" / results) if r.get("suite") == suite.name]
    keys = {run_key(suite, run) for run in suite.runs()}
    trial_keys = {trial_key(suite, run, trial) for run in suite.runs() for trial in suite.trials()}
    runs = [r for r in records if r["status"] in ("ok", "failed")]
    assert runs and all(r["run_key"] in keys for r in runs)
    assert all(r["run_key"] in trial_keys for r in records if r["status"] == "trial")
    assert all(r["run_key"] == reference_key(suite) for r in records if r["status"] == "reference")


# ------------------------------------------------------------------------------------ 8: duplicates
@pytest.mark.parametrize("change, message", [
    ({"methods": [TINY["methods"][0], {"name": "full", "table": {"type": "hashing.v1"}, "compression": [4]}]},
     r"suite.yaml: methods\[1\].name: 'full' is already the name of methods\[0\]"),
    ({"methods": [{"table": {"type": "full.v1"}}, {"table": {"type": "full.v1", "sparse": True}}]},
     r"methods\[1\].name: 'full.v1' is already the name of methods\[0\]"),
    ({"seeds": [0, 1, 0]}, r"suite.yaml: seeds\[2\]: seed 0 is already seeds\[0\]"),
    ({"methods": [{"table": {"type": "hashing.v1"}, "compression": [4, 16, 4.0]}]},
     r"methods\[0\].compression\[2\]: ratio 4.0 is already compression\[0\]"),
    ({"train": {"epochs": 1}, "tune": {"lr": [0.01, 0.1, 0.01]}},
     r"suite.yaml: tune.lr\[2\]: 0.01 is already tune.lr\[0\]"),
])
def test_duplicate_names_seeds_and_ratios_are_rejected(tmp_path, change, message):
    with pytest.raises(SpecError, match=message):
        load_suite(write(tmp_path, {**TINY, **change}))


def _claim(out: Path, key: str, pid: int, host: str | None = None) -> None:
    import socket

    (out / ".claims").mkdir(parents=True, exist_ok=True)
    (out / ".claims" / f"{key}.json").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))


def test_a_run_claimed_by_a_live_process_is_skipped_and_a_dead_claim_is_taken_over(tmp_path, capsys):
    suite = load_suite(write(tmp_path, {**TINY, "methods": TINY["methods"][:1] + [
        {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": [4]}]}))
    (full, full_key), (hashed, hashed_key) = [(r, run_key(suite, r)) for r in suite.runs()]
    out = tmp_path / "out"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a run killed part-way leaves its claim behind with a pid that no longer runs
    try:
        _claim(out, full_key, sleeper.pid)
        _claim(out, hashed_key, gone.pid)
        records = run_suite(suite, out, progress=False)
        assert [r["method"] for r in records] == ["hashing"]  # taken over; the live claim is left alone
        assert f"being run by process {sleeper.pid}" in capsys.readouterr().out
        assert not (out / ".claims" / f"{hashed_key}.json").exists()  # released once recorded
        assert (out / ".claims" / f"{full_key}.json").exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    records = run_suite(suite, out, progress=False)  # the claimer died without recording: taken over now
    assert sorted(r["method"] for r in records) == ["full", "hashing"]
    keys = [r["run_key"] for r in read_results(out / "results.jsonl")]
    assert sorted(keys) == sorted({full_key, hashed_key})


@pytest.mark.slow
def test_two_unsharded_processes_never_run_one_run_twice(tmp_path):
    suite = {**TINY, "methods": [TINY["methods"][0], {**TINY["methods"][1], "compression": [2, 4, 8]}]}
    path, out = write(tmp_path, suite), tmp_path / "out"
    cmd = [sys.executable, "-m", "embcompress.cli", "bench", "run", str(path), "--out", str(out), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    records = strict_records(out / "results.jsonl")
    keys = [r["run_key"] for r in records]
    assert len(keys) == len(set(keys)) == 4, [(r["method"], r["target_ratio"]) for r in records]
    assert not (out / ".claims").exists()  # every claim released, the folder removed


# ------------------------------------------------------------------------------------ 9: undefined AUC
@pytest.mark.parametrize("reference", [False, True])
def test_a_test_split_without_positives_is_a_failed_run_in_strict_json(tmp_path, capsys, reference):
    # dlrm split of 70 rows: rows 60-64 are the test split, all negatives here
    folder = criteo_folder(tmp_path, "data", label=lambda i: 0 if 60 <= i < 65 else i % 2)
    path = write(tmp_path, {**CRITEO_SUITE, "reference": reference, "data": {"criteo": {"path": str(folder)}}})
    out = tmp_path / "out"
    assert main(["bench", "run", str(path), "--out", str(out), "--quiet"]) == 1
    records = strict_records(out / "results.jsonl")
    runs = [r for r in records if r["status"] != "reference_failed"]
    assert [r["status"] for r in runs] == ["failed"]
    assert "the test split has no positives (0 of 5 rows): AUC undefined" in runs[0]["error"]
    if reference:  # the LR reference cannot be fitted either: recorded, not a traceback
        assert [r["status"] for r in records if r not in runs] == ["reference_failed"]
    report = (out / "report.md").read_text()
    assert "FAILED: full" in report and "no positives" in report
    assert (out / "memory_vs_auc.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["bench", "report", str(out / "results.jsonl")]) == 0


def test_the_report_survives_records_without_a_usable_auc(tmp_path):
    base = {"status": "ok", "model": "m", "seed": 0, "test_logloss": 0.5, "samples_per_second": 1.0,
            "best_epoch": 1, "dense_parameters": 10, "bytes": 1000, "ratio": 1.0, "target_ratio": None}
    records = [{**base, "method": "full", "test_auc": 0.7},
               {**base, "method": "nan", "test_auc": math.nan},
               {**base, "method": "none", "test_auc": None},
               {**base, "method": "missing"},
               {**base, "method": "zero-bytes", "test_auc": 0.6, "bytes": 0},
               {"status": "reference", "name": "LR", "C": 0.1, "test_auc": None, "test_logloss": None}]
    table = format_table(records)
    assert "| full | - | 1,000 |" in table
    assert "3 run(s) recorded as finished have no test AUC" in table and "nan" in table
    plot_results(records, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_data_that_fails_to_load_is_recorded_as_failed_runs(tmp_path, monkeypatch, capsys):
    import embcompress.runner

    def empty_train(suite):  # what CTRData says of a data set with no training rows
        raise ValueError("synthetic: the train split is empty")

    monkeypatch.setattr(embcompress.runner, "load_data", empty_train)
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, TINY)), "--out", str(out), "--quiet"]) == 1
    records = strict_records(out / "results.jsonl")
    assert [r["status"] for r in records] == ["failed"] * 3
    assert all(r["error"] == "data: ValueError: synthetic: the train split is empty" for r in records)
    assert "the train split is empty" in capsys.readouterr().out


def test_results_are_written_as_strict_json(tmp_path):
    from embcompress.results import append_line

    results = tmp_path / "results.jsonl"
    append_line(results, {"status": "ok", "x": math.inf, "nested": {"y": math.nan}})
    record = strict_records(results)[0]
    assert record["x"] is None and record["nested"]["y"] is None
    assert record["non_finite"] == ["nested.y", "x"]


# ------------------------------------------------------------------------------------ 10: late validation
def _method(table, **extra):
    return {"methods": [TINY["methods"][0], {"name": "bad", "table": table, **extra}]}


@pytest.mark.parametrize("change, message", [
    (_method({"type": "hashing.v1", "seed": -1}, compression=[4, 16]),
     r"suite.yaml: methods\[1\].table at 4x: .*seed.*-1"),
    ({"model": {"type": "dlrm.v1", "bottom_mlp": [-8], "top_mlp": [16]}},
     r"suite.yaml: model \(dlrm.v1\) with methods\[0\].table: .*bottom_mlp.*-8"),
    ({"embedding_dim": True}, r"suite.yaml: embedding_dim: expected a positive int, got True"),
    ({"seeds": 3}, r"suite.yaml: seeds: expected a non-empty list of non-negative ints such as \[0, 1, 2\], got 3"),
    ({"seeds": [-1]}, r"suite.yaml: seeds\[0\]: expected a non-negative int, got -1"),
    (_method("hashing.v1"),
     r"suite.yaml: methods\[1\].table: expected a mapping with a \"type\" key, got 'hashing.v1'"),
    (_method({"type": "hashing.v1", "budget_bytes": 5000}, compression=[4]),
     r"suite.yaml: methods\[1\]: table.budget_bytes and compression both set the size; give one of them"),
    ({"train": {**TINY["train"], "lr": -1}}, r"suite.yaml: train: TrainConfig: lr must be a positive finite number, got -1"),
    ({"train": {**TINY["train"], "epochs": True}}, r"suite.yaml: train.epochs: expected an int, got True"),
    ({"train": {**TINY["train"], "seed": 3}}, r"suite.yaml: train.seed: set by the runner"),
    ({"train": [1, 2]}, r"suite.yaml: train: expected a mapping of training settings, got \[1, 2\]"),
    ({"train": {"epochs": 1}, "tune": {"lr": [0.01, True]}},
     r"suite.yaml: tune.lr\[1\]: expected a finite number, got True"),
    ({"data": {"synthetic": {"rows": 2000, "seed": -1}}},
     r"suite.yaml: data.synthetic: SyntheticConfig: seed must be a non-negative int, got -1"),
    ({"data": {"synthetic": {"rows": "2000"}}}, r"suite.yaml: data.synthetic.rows: expected an int, got '2000'"),
    ({"data": {"synthetic": {"rows": 2000, "click_rate": 2}}},
     r"suite.yaml: data.synthetic: SyntheticConfig: click_rate must be a finite number in \(0, 1\), got 2"),
    (_method({"type": "hashing.v1"}, compression=[math.inf]),
     r"methods\[1\].compression\[0\]: expected a positive finite number, got inf"),
])
def test_a_suite_is_checked_whole_before_anything_trains(tmp_path, change, message):
    path = write(tmp_path, {**TINY, **change})
    with pytest.raises(SpecError, match=message):
        load_suite(path)
    assert main(["bench", "run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path, capsys):
    from embcompress.speed import load_speed_suite

    path = write(tmp_path, "name: x\nmethods:\n  - table: {type: full.v1\n  - x: [\n")
    with pytest.raises(SpecError, match=r"suite.yaml: line \d+, column \d+: not valid YAML"):
        load_suite(path)
    with pytest.raises(SpecError, match=r"suite.yaml: line \d+, column \d+: not valid YAML"):
        load_speed_suite(path)
    assert main(["bench", "run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_tables_are_built_on_the_data_sets_own_cardinalities(tmp_path):
    import re

    from embcompress.criteo import read_manifest
    from embcompress.memory import baseline_bytes

    folder = criteo_folder(tmp_path, "data", values=3)
    full = baseline_bytes(read_manifest(folder)["cardinalities"], 4)  # a few KB; the synthetic default is 3 MB
    spec = {**CRITEO_SUITE, "data": {"criteo": {"path": str(folder)}},
            "methods": [{"table": {"type": "full.v1", "budget_bytes": 2 * full}},
                        {"table": {"type": "hashing.v1"}, "compression": [1e6]}]}  # unreachable: a failed run
    load_suite(write(tmp_path, spec))
    spec["methods"][0]["table"]["budget_bytes"] = full // 2  # a table given without a ratio must build
    with pytest.raises(SpecError, match=r"suite.yaml: methods\[0\].table: .*minimum budget") as err:
        load_suite(write(tmp_path, spec))
    assert int(re.search(r"minimum budget ([\d,]+)", str(err.value)).group(1).replace(",", "")) < 2 * full


@pytest.mark.slow
def test_every_committed_suite_loads(tmp_path):
    folder = criteo_folder(tmp_path, "bucketed")  # for the Criteo suites: every table and model is built on it
    suites = sorted(BENCHMARKS.glob("*.yaml"))
    assert len(suites) >= 10
    for path in suites:
        if path.name.startswith("speed") and "batch_size" in (yaml.safe_load(path.read_text()) or {}):
            continue  # a speed suite (embcompress.speed), checked in test_bench
        raw = yaml.safe_load(path.read_text())
        suite = load_suite(path, data_path=folder) if "criteo" in (raw.get("data") or {}) else load_suite(path)
        assert suite.runs(), path


# ------------------------------------------------------------------------------------ 11: malformed records
@pytest.mark.parametrize("line, message", [
    ("[1, 2, 3]", r"results.jsonl: line 2: expected a JSON object \(one record\), got \[1, 2, 3\]"),
    ('{"status": "ok"}', r"results.jsonl: line 2: a record with status 'ok' lacks 'method', 'seed'"),
    ('{"method": "x"}', r"results.jsonl: line 2: a record without a 'status'"),
    ('{"status": "done"}', r"results.jsonl: line 2: unknown status 'done'"),
    ('{"status": "failed", "method": 3, "seed": 0, "error": "x"}', r"line 2: 'method' must be a string, got 3"),
])
def test_malformed_result_records_name_the_file_and_line(tmp_path, capsys, line, message):
    results = tmp_path / "results.jsonl"
    good = {"status": "failed", "method": "m", "seed": 0, "error": "e", "target_ratio": None}
    results.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_results(results)
    assert main(["bench", "report", str(results)]) == 2
    assert "line 2" in capsys.readouterr().err
