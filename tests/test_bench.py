"""The benchmark runner and the CLI, end to end on a tiny suite."""

import json
import subprocess
import sys

import pytest
import yaml

from embcompress import SpecError
from embcompress.plot import pareto_front
from embcompress.suite import default_suite_path, load_suite
from embcompress.cli import main

TINY = {
    "name": "tiny",
    "data": {"synthetic": {"rows": 20_000, "cardinality_exponent": 0.25}},
    "embedding_dim": 8,
    "model": {"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [16]},
    "train": {"epochs": 1, "batch_size": 2048, "lr": 0.01},
    "seeds": [0],
    "reference": False,  # fitted in the CLI test below; the other tests count runs
    "methods": [
        {"name": "full", "table": {"type": "full.v1", "sparse": True}},
        {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": [4, 16]},
    ],
}


def write(tmp_path, suite):
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    return path


def test_default_suite_is_valid():
    suite = load_suite(default_suite_path())
    assert {m.name for m in suite.methods} >= {"full", "hashing"}
    assert len(suite.runs()) >= 4


@pytest.mark.slow
def test_bench_cli_writes_table_results_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, {**TINY, "reference": True})), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Bayes-optimal test AUC" in printed and "| hashing | 16x |" in printed
    lines = (out / "results.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["status"] for r in records] == ["reference"] + ["ok"] * 3
    # The one-hot logistic regression reference is fitted once, on the same data, and printed beside the runs.
    ref = records[0]
    assert 0.5 < ref["test_auc"] < records[0]["bayes_auc"]
    assert f"sklearn one-hot LR on the same train split (C={ref['C']:g}" in printed
    assert f"test AUC **{ref['test_auc']:.4f}**" in printed
    records = records[1:]
    hashed = [r for r in records if r["method"] == "hashing"]
    for r in hashed:
        assert r["bytes"] <= r["baseline_bytes"] / r["target_ratio"]
        assert r["ratio"] == pytest.approx(r["baseline_bytes"] / r["bytes"])
    assert (out / "report.md").read_text().startswith("# tiny")
    assert (out / "memory_vs_auc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, message", [
    ({"methods": [{"table": {"type": "hashing.v9"}}]}, r"methods\[0\].table: unknown table 'hashing.v9'. Did you mean .*'hashing.v1'"),
    ({"methods": [{"table": {"type": "hashing.v1", "num_bucket": 3}}]}, "unknown key 'num_bucket'"),
    ({"methods": [{"table": {"type": "hashing.v1"}, "compression": [0]}]}, "positive"),
    ({"model": {"type": "dlrm.v1", "top": [3]}}, "unknown key 'top'"),
    ({"epochs": 3}, "unknown key"),
])
def test_malformed_suites_fail_before_training(tmp_path, change, message):
    path = write(tmp_path, {**TINY, **change})
    with pytest.raises(SpecError, match=message):
        load_suite(path)
    assert main(["bench", "run", str(path), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert not (tmp_path / "o").exists()


def test_missing_suite_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_suite(tmp_path / "nope.yaml")


def test_pareto_front():
    pts = [(10, 0.70), (20, 0.75), (30, 0.74), (40, 0.80), (5, 0.60)]
    assert pareto_front(pts) == [(5, 0.60), (10, 0.70), (20, 0.75), (40, 0.80)]


@pytest.mark.slow
def test_console_script_help_and_list():
    out = subprocess.run([sys.executable, "-m", "embcompress.cli", "list"], capture_output=True, text=True, check=True)
    assert "full.v1" in out.stdout and "hashing.v1" in out.stdout and "dlrm.v1" in out.stdout
    help_ = subprocess.run([sys.executable, "-m", "embcompress.cli", "--help"], capture_output=True, text=True)
    assert help_.returncode == 0 and "bench" in help_.stdout


def test_report_regenerates_the_table_from_jsonl(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, {**TINY, "methods": TINY["methods"][:1]})), "--out", str(out),
                 "--quiet"]) == 0
    capsys.readouterr()
    (out / "report.md").unlink()
    assert main(["bench", "report", str(out / "results.jsonl"), "--title", "again"]) == 0
    record = json.loads((out / "results.jsonl").read_text())
    report = (out / "report.md").read_text()
    assert report.startswith("# again")
    assert f"| {record['test_auc']:.4f} |" in report and f"{record['bytes']:,}" in report
    from embcompress.results import results_frame

    frame = results_frame(out / "results.jsonl")
    assert frame.loc[0, "test_auc"] == record["test_auc"] and frame.loc[0, "bytes"] == record["bytes"]


@pytest.mark.slow
def test_report_numbers_are_recomputed_from_the_jsonl(tmp_path, capsys):
    import numpy as np

    suite = {**TINY, "seeds": [0, 1], "methods": [
        TINY["methods"][0], {**TINY["methods"][1], "compression": [4, 16]},
        {"name": "frequent", "table": {"type": "hashing.v1", "frequent": 40}, "compression": [4, 1000]},
    ]}
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, suite)), "--out", str(out), "--quiet"]) == 1  # 1000x fails
    capsys.readouterr()
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    report = (out / "report.md").read_text()
    groups = {}
    for r in records:
        if r["status"] == "ok":
            groups.setdefault((r["method"], r["target_ratio"]), []).append(r)
    assert len(groups) == 4 and all(len(rs) == 2 for rs in groups.values())
    full = np.mean([r["test_auc"] for r in groups[("full", None)]])
    means = {}
    for (method, target), rs in groups.items():
        auc = np.array([r["test_auc"] for r in rs])
        means[(method, target)] = auc.mean()
        row = (f"| {method} | {f'{target:g}x' if target else '-'} | {int(np.mean([r['bytes'] for r in rs])):,} "
               f"| {np.mean([r['ratio'] for r in rs]):.2f}x | {auc.mean():.4f} ± {auc.std():.4f} "
               f"| {auc.mean() - full:+.4f} ")
        assert row in report, row
    for target in (4.0, 16.0):
        method = max((m for m, t in means if t == target), key=lambda m: means[(m, target)])
        assert f"| {target:g}x | {method} |" in report
    assert "| frequent | " in report.split("Test AUC by method and budget")[1]
    full_wall = np.mean([r["wall_seconds"] for r in groups[("full", None)]])
    wall = np.mean([r["wall_seconds"] for (m, _), rs in groups.items() if m == "frequent" for r in rs])
    row = next(line for line in report.split("Test AUC by method and budget")[1].splitlines()
               if line.startswith("| frequent | "))
    assert row.endswith(f"| {wall / full_wall:.2f}x |"), row  # over the full table's, every budget it reached
    assert report.count("FAILED: frequent at 1000x (dlrm.v1; seeds 0, 1): BudgetError") == 1


def test_bench_without_a_subcommand_runs_the_default_suite(monkeypatch, capsys):
    import embcompress.runner

    seen = {}

    def fake_run_suite(suite, out, *, device, progress, shard):
        seen["suite"], seen["device"], seen["shard"] = suite.name, device, shard
        raise ValueError("stop here")

    monkeypatch.setattr(embcompress.runner, "run_suite", fake_run_suite)
    assert main(["bench", "--device", "cpu", "--quiet"]) == 2
    assert seen == {"suite": "default", "device": "cpu", "shard": (0, 1)}
    assert "stop here" in capsys.readouterr().err


def test_speed_suite_runs_and_reports_ratios(tmp_path):
    from embcompress.speed import format_speed, load_speed_suite, run_speed

    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "batch_size": 256, "cardinality_divisor": 2000, "steps": 2, "repeats": 2, "torchrec": False,
        "methods": [{"name": "full", "table": {"type": "full.v1", "sparse": True}},
                    {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": 8},
                    # staged but served as trained (its index map is counted): timed as it is, not as an export
                    {"name": "cce", "table": {"type": "cce.v1", "sparse": True}, "compression": 8}],
    }))
    suite = load_speed_suite(path)
    records = run_speed(suite, progress=False)
    assert [r["status"] for r in records] == ["ok", "ok", "ok"], [r.get("error") for r in records]
    assert records[0]["vs_full"] == 1.0
    assert records[1]["ratio"] == pytest.approx(8, rel=0.05)
    assert "| hashing | 8x |" in format_speed(records, suite, "cpu")


def test_speed_suite_with_torchrec_optimizers_and_a_staged_table(tmp_path):
    pytest.importorskip("torchrec")
    from embcompress.speed import format_speed, load_speed_suite, run_speed

    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "batch_size": 256, "cardinality_divisor": 2000, "steps": 2, "repeats": 2,
        "methods": [{"name": "full adagrad", "table": {"type": "full.v1", "sparse": True}, "optimizer": "adagrad"},
                    {"name": "optembed", "table": {"type": "optembed.v1", "sparse": True}, "compression": 4}],
    }))
    suite = load_speed_suite(path)
    records = run_speed(suite, progress=False)
    assert [r["status"] for r in records] == ["ok"] * 7, [r.get("error") for r in records]
    assert records[0]["optimizer"] == "adagrad"
    assert records[1]["ratio"] >= 4 and records[1]["bytes"] == pytest.approx(records[0]["bytes"] / 4, rel=0.01)
    fused = records[3]
    assert fused["method"] == "torchrec FusedEmbeddingBagCollection (fused Adagrad)"
    assert max(r["vs_torchrec"] for r in records[2:4]) == 1.0
    # torchrec's quantized collections: serving only, their kernels' bytes (int8 rows padded to 16 bytes)
    quant = {r["table"]["type"]: r for r in records[4:]}
    assert set(quant) == {"torchrec-quant-fp16", "torchrec-quant-int8", "torchrec-quant-int4"}
    rows = records[0]["bytes"] // 4 // 16
    assert quant["torchrec-quant-int8"]["bytes"] >= rows * 32 and quant["torchrec-quant-int8"]["vs_full"] is None
    assert "| torchrec quantized collection, int8 rows (serving only) | - |" in format_speed(records, suite, "cpu")
    assert "serving only" in format_speed(records, suite, "cpu")


def test_speed_suite_rejects_an_unknown_optimizer(tmp_path):
    from embcompress.speed import load_speed_suite

    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump({"methods": [{"table": {"type": "full.v1"}, "optimizer": "adamw"}]}))
    with pytest.raises(SpecError, match="optimizer must be one of adam, adagrad, sgd, got 'adamw'"):
        load_speed_suite(path)


def test_committed_speed_suites_are_valid():
    from embcompress.speed import load_speed_suite

    suite = load_speed_suite(default_suite_path().parent / "speed.yaml")
    assert any(spec["type"] == "full.v1" and spec.get("sparse") for spec in (m.table for m in suite.methods))
    gpu = load_speed_suite(default_suite_path().parent / "speed_gpu.yaml")
    assert {m.table.get("fused_optimizer") for m in gpu.methods} == {None, "adam"}


def test_speed_cli_takes_another_batch_size_and_times_fused_rows(tmp_path, capsys):
    pytest.importorskip("fbgemm_gpu")
    path = tmp_path / "speed.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "batch_size": 256, "cardinality_divisor": 2000, "steps": 2, "repeats": 2, "torchrec": False,
        "methods": [{"name": "hashing fused", "table": {"type": "hashing.v1", "fused_optimizer": "sgd"},
                     "compression": 8}],
    }))
    assert main(["bench", "speed", str(path), "--batch-size", "96", "--out", str(tmp_path / "o"), "--quiet"]) == 0
    report = (tmp_path / "o" / "report.md").read_text()
    assert report.count("Batch 96,") == 1 and "| hashing fused | 8x |" in report


def _suite_with_runs(tmp_path, n_ratios=4):
    suite = {**TINY, "methods": [TINY["methods"][0], {**TINY["methods"][1], "compression": [2, 4, 8, 16][:n_ratios]}]}
    return write(tmp_path, suite)


@pytest.mark.slow
def test_rerun_skips_finished_runs(tmp_path, capsys):
    path, out = _suite_with_runs(tmp_path, 1), tmp_path / "out"
    assert main(["bench", "run", str(path), "--out", str(out), "--quiet"]) == 0
    first = (out / "results.jsonl").read_text()
    assert main(["bench", "run", str(path), "--out", str(out), "--quiet"]) == 0
    assert (out / "results.jsonl").read_text() == first  # nothing ran again
    records = [json.loads(line) for line in first.splitlines()]
    assert all(r["git_commit"] is None or len(r["git_commit"]) == 40 for r in records)
    assert all(r["peak_rss_mb"] > 0 and r["torch"] for r in records)


@pytest.mark.slow
def test_sigkill_mid_suite_then_rerun_records_every_run_once(tmp_path):
    import os
    import signal
    import time

    path, out = _suite_with_runs(tmp_path), tmp_path / "out"
    results = out / "results.jsonl"
    cmd = [sys.executable, "-m", "embcompress.cli", "bench", "run", str(path), "--out", str(out), "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = results.read_text()
    assert 2 <= killed.count("\n") < 5, "the kill must land mid-suite"
    with open(results, "a") as fh:  # what a kill in the middle of a write would leave
        fh.write('{"run_key": "partial')
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    text = results.read_text()
    assert text.endswith("\n") and text.startswith(killed)
    records = [json.loads(line) for line in text.splitlines()]
    keys = [r["run_key"] for r in records]
    assert len(keys) == len(set(keys)) == 5
    assert all(r["status"] == "ok" for r in records)


@pytest.mark.slow
def test_two_shards_share_one_results_file(tmp_path):
    path, out = _suite_with_runs(tmp_path), tmp_path / "out"
    cmd = [sys.executable, "-m", "embcompress.cli", "bench", "run", str(path), "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd + ["--shard", f"{i}/2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err.decode()
    text = (out / "results.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines()]
    suite = load_suite(path)
    expected = {(r.method.name, r.ratio, r.seed) for r in suite.runs()}
    got = [(r["method"], r["target_ratio"], r["seed"]) for r in records]
    assert len(got) == len(set(got)) == len(expected) == 5 and set(got) == expected
    # a third process over the whole suite finds everything done
    assert subprocess.run(cmd, capture_output=True).returncode == 0
    assert (out / "results.jsonl").read_text() == text


def test_shard_positions_split_the_suite(tmp_path):
    from embcompress.runner import run_suite

    suite = load_suite(_suite_with_runs(tmp_path, 4))
    runs = suite.runs()
    out = tmp_path / "out"
    first = run_suite(suite, out, progress=False, shard=(1, 3))
    assert [(r["method"], r["target_ratio"]) for r in first] == [(r.method.name, r.ratio) for r in runs[1::3]]
    with pytest.raises(ValueError, match="0 <= i < n"):
        run_suite(suite, out, progress=False, shard=(3, 3))


@pytest.mark.parametrize("text", ["2/2", "1", "a/b", "0/0"])
def test_bad_shard_option_is_rejected(text, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "run", "--shard", text])
    assert "--shard" in capsys.readouterr().err


def test_a_dead_writers_partial_line_is_cut_before_the_next_append(tmp_path):
    from embcompress.results import append_line

    results = tmp_path / "results.jsonl"
    results.write_text('{"a": 1}\n{"run_key": "half')
    append_line(results, {"b": 2})
    assert results.read_text() == '{"a": 1}\n{"b": 2}\n'


def test_failed_run_is_recorded_and_the_suite_goes_on(tmp_path, capsys):
    suite = {**TINY, "methods": [{"name": "too-small", "table": {"type": "hashing.v1"}, "compression": [1e9]},
                                 TINY["methods"][0]]}
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, suite)), "--out", str(out), "--quiet"]) == 1
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "ok"]
    assert "BudgetError" in records[0]["error"] and "minimum budget" in records[0]["error"]
    assert "FAILED: too-small" in capsys.readouterr().out


def test_several_models_side_by_side(tmp_path, capsys):
    suite = {**TINY, "models": [{"name": "lr", "type": "lr.v1"}, {"type": "fm.v1"}], "methods": TINY["methods"][:1]}
    del suite["model"]
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, suite)), "--out", str(out), "--quiet"]) == 0
    report = (out / "report.md").read_text()
    assert "| model | dense params |" in report
    assert "| lr |" in report and "| fm.v1 |" in report
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["model"] for r in records} == {"lr", "fm.v1"}
    assert all(r["dense_parameters"] > 0 for r in records)
    both = {**suite, "model": TINY["model"]}
    with pytest.raises(SpecError, match="either 'model'"):
        load_suite(write(tmp_path, both))


SAMPLE = default_suite_path().parents[2] / "shared" / "data" / "criteo_sample_200.tsv"


@pytest.mark.skipif(not SAMPLE.is_file(), reason=f"shared fixture {SAMPLE} is absent")
def test_suite_on_a_prepared_criteo_folder(tmp_path, capsys):
    from embcompress.criteo import prepare_criteo

    prepared = tmp_path / "criteo"
    prepare_criteo([SAMPLE], prepared, split="random", seed=1)
    suite = {**TINY, "data": {"criteo": {"path": str(prepared)}}, "train": {**TINY["train"], "batch_size": 64}}
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, suite)), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["ok"] * 3
    assert records[0]["bayes_auc"] is None and records[0]["baseline_bytes"] > 0
    assert "Bayes" not in capsys.readouterr().out


def test_missing_criteo_folder_fails_before_training(tmp_path):
    suite = {**TINY, "data": {"criteo": {"path": str(tmp_path / "nowhere")}}}
    with pytest.raises(SpecError, match="nowhere.*embcompress data criteo"):
        load_suite(write(tmp_path, suite))
    with pytest.raises(SpecError, match="data must be"):
        load_suite(write(tmp_path, {**TINY, "data": {"criteo": {"path": "x"}, "synthetic": {}}}))


@pytest.mark.slow
def test_committed_criteo_suite_is_well_formed_apart_from_its_data(tmp_path):
    """criteo_kaggle.yaml needs the user's prepared folder; everything else in it must validate here."""
    raw = yaml.safe_load((default_suite_path().parent / "criteo_kaggle.yaml").read_text())
    with pytest.raises(SpecError, match="kaggle_dlrm"):
        load_suite(default_suite_path().parent / "criteo_kaggle.yaml")
    suite = load_suite(write(tmp_path, {**raw, "data": {"synthetic": {"rows": 100}}}))
    assert {m.name for m in suite.models} == {"dlrm", "dcn"} and suite.seeds == (0, 1, 2)


def test_criteo_suite_without_dense_features_uses_the_buckets(tmp_path):
    from embcompress.suite import load_data
    from embcompress.criteo import prepare_criteo

    lines = ["\t".join([str(i % 2)] + [str(i % 7)] * 13 + [f"{i % 5:08x}"] * 26) for i in range(60)]
    (tmp_path / "t.tsv").write_text("".join(line + "\n" for line in lines))
    plain, bucketed = tmp_path / "plain", tmp_path / "bucketed"
    prepare_criteo(tmp_path / "t.tsv", plain)
    prepare_criteo(tmp_path / "t.tsv", bucketed, dense_buckets=True)
    spec = {"data": {"criteo": {"path": str(bucketed), "dense": False}}, "model": {"type": "lr.v1"},
            "methods": [{"table": {"type": "full.v1"}}]}
    suite_file = tmp_path / "s.yaml"
    suite_file.write_text(yaml.safe_dump(spec))
    suite = load_suite(suite_file)
    data = load_data(suite)
    assert data.num_dense == 0 and data.sparse.shape == (60, 39)
    assert load_suite(suite_file, data_path=bucketed).data["criteo"]["dense"] is False  # kept with --data-path
    spec["data"]["criteo"]["path"] = str(plain)
    suite_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="no bucketized dense fields"):
        load_suite(suite_file)
    spec["data"]["criteo"]["dense"] = "no"
    suite_file.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="dense must be true or false"):
        load_suite(suite_file)


@pytest.mark.slow
def test_synthetic_full_covers_every_method_model_budget_and_seed():
    from embcompress.registry import list_tables

    suite = load_suite(default_suite_path().parent / "synthetic_full.yaml")
    assert [m.name for m in suite.models] == ["dlrm", "dcn"] and suite.seeds == (0, 1, 2)
    # One version of each method family: a .v2 that only re-keys seeds adds nothing the grid must measure.
    family = {name.rsplit(".", 1)[0] for name in list_tables()}
    assert {m.table["type"].rsplit(".", 1)[0] for m in suite.methods} >= family, "add the new method to synthetic_full"
    # the full table served at a precision has one size (fp16 2x, int8 2.67x, int4 5.33x): one budget each
    one_size = {"full-fp16": (1.99,), "full-int8": (2,), "full-int4": (4,), "full-int8-trained": (2,)}
    assert all(m.compression == one_size.get(m.name, (2, 4, 16, 64, 256, 1000)) for m in suite.methods
               if m.name != "full")
    assert len(suite.runs()) == 2 * 3 * (1 + 31 * 6 + 4)


# ------------------------------------------------------------------------------------------------ tuning
NO_LR = {**TINY, "train": {k: v for k, v in TINY["train"].items() if k != "lr"}}
TUNED = {**NO_LR, "reference": False, "tune": {"lr": [0.001, 0.03], "embedding_l2": [0.0, 1e-3]},
         "methods": [TINY["methods"][0], {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": [4]}]}


@pytest.mark.slow
def test_tuning_grid_trains_every_combination_and_keeps_the_best_on_validation(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, TUNED)), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    runs = [r for r in records if r["status"] == "ok"]
    trials = [r for r in records if r["status"] == "trial"]
    assert len(runs) == 2 and len(trials) == 8
    combos = {(lr, l2) for lr in (0.001, 0.03) for l2 in (0.0, 1e-3)}
    for run in runs:
        mine = [t for t in trials if t["parent_key"] == run["run_key"]]
        assert {(t["tuned"]["lr"], t["tuned"]["embedding_l2"]) for t in mine} == combos  # same grid for every method
        best = max(mine, key=lambda t: t["val_auc"])
        assert run["tuned"] == best["tuned"] and run["test_auc"] == best["test_auc"]
        assert sorted(t["val_auc"] for t in run["trials"]) == sorted(t["val_auc"] for t in mine)
    report = (out / "report.md").read_text()
    assert "tuned on validation" in report and "embedding_l2=" in report
    # Resume: a killed tuning keeps its finished trials. Drop one run's final line and its last trial.
    victim = runs[1]
    kept = [line for line, r in zip((out / "results.jsonl").read_text().splitlines(), records)
            if r["run_key"] != victim["run_key"] and r is not [t for t in trials if t["parent_key"] == victim["run_key"]][-1]]
    (out / "results.jsonl").write_text("\n".join(kept) + "\n")
    assert main(["bench", "run", str(write(tmp_path, TUNED)), "--out", str(out), "--quiet"]) == 0
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(again) == len(kept) + 2  # the one missing trial and the run's final line, nothing else
    assert next(r for r in again[-2:] if r["status"] == "ok")["tuned"] == victim["tuned"]
    # A grid that grows keeps what it has: moving batch_size from train into the grid at its value, plus a new
    # value, trains only the new combinations (one per run and existing combination), then the final lines.
    grown = {**TUNED, "train": {k: v for k, v in TUNED["train"].items() if k != "batch_size"},
             "tune": {**TUNED["tune"], "batch_size": [TINY["train"]["batch_size"], 4096]}}
    assert main(["bench", "run", str(write(tmp_path, grown)), "--out", str(out), "--quiet"]) == 0
    final = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    added = final[len(again):]
    assert sorted(r["status"] for r in added) == ["ok"] * 2 + ["trial"] * 8
    assert {r["tuned"]["batch_size"] for r in added if r["status"] == "trial"} == {4096}


@pytest.mark.parametrize("tune, message", [
    ({"lr": []}, "tune.lr must be a non-empty list"),
    ({"seed": [0, 1]}, "tune.seed: not a tunable"),
    ({"init_std": [0.1, 0]}, "tune.init_std: init_std must be a positive"),
    ({"lr": [0.1, -1]}, "tune.lr: TrainConfig: lr must be a positive finite number, got -1"),
    ({"lr": 0.1}, "tune.lr must be a non-empty list"),
    ([0.1], "tune must be a mapping"),
])
def test_bad_tuning_grids_are_rejected(tmp_path, tune, message):
    with pytest.raises(SpecError, match=message):
        load_suite(write(tmp_path, {**NO_LR, "tune": tune}))
    with pytest.raises(SpecError, match="tune.lr is also fixed in train"):
        load_suite(write(tmp_path, {**TINY, "tune": {"lr": [0.1]}}))
    fixed = {**TINY, "tune": {"init_std": [0.1]}, "methods": [{"table": {"type": "full.v1", "init_std": 0.5}}]}
    with pytest.raises(SpecError, match=r"methods\[0\] \(full.v1\) sets \['init_std'\], which the tuning grid"):
        load_suite(write(tmp_path, fixed))


@pytest.mark.slow
def test_a_grid_over_init_std_reaches_every_table(tmp_path):
    suite = {**NO_LR, "tune": {"init_std": [0.01, 0.3]}, "train": {**NO_LR["train"], "lr": 0.01}}
    out = tmp_path / "out"
    assert main(["bench", "run", str(write(tmp_path, suite)), "--out", str(out), "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    trials = [r for r in records if r["status"] == "trial"]
    assert len(trials) == 2 * 3 and {r["table"]["type"] for r in trials} == {"full.v1", "hashing.v1"}
    # Same data, model and seed: only the initial scale differs between a run's two trials, and it shows.
    for key in {t["parent_key"] for t in trials}:
        a, b = sorted((t for t in trials if t["parent_key"] == key), key=lambda t: t["tuned"]["init_std"])
        assert (a["tuned"], b["tuned"]) == ({"init_std": 0.01}, {"init_std": 0.3})
        assert (a["init_std"], b["init_std"]) == (0.01, 0.3)  # what the built table was given
        assert a["test_auc"] != b["test_auc"]


def test_report_marks_tables_well_under_their_budget():
    from embcompress.report import format_table

    base = {"status": "ok", "model": "m", "target_ratio": 2.0, "seed": 0, "test_auc": 0.7, "test_logloss": 0.5,
            "samples_per_second": 1.0, "best_epoch": 1, "dense_parameters": 10, "baseline_bytes": 2000}
    records = [{**base, "method": "coarse", "bytes": 800, "ratio": 2.5, "target_bytes": 1000.0},
               {**base, "method": "close", "bytes": 990, "ratio": 2.02, "target_bytes": 1000.0}]
    table = format_table(records)
    assert "| coarse | 2x | 800 † |" in table and "| close | 2x | 990 |" in table
    assert "† more than 5% under its budget" in table


def test_methods_seeds_suite_repeats_runs_of_the_methods_suite():
    # methods_seeds.yaml adds seeds to some runs of methods.yaml in the same results folder: its seed-0 runs must
    # be the very runs methods.yaml made (same run keys), so nothing but the methods and the seeds may differ.
    from embcompress.runner import run_key

    bench_dir = default_suite_path().parent
    methods, seeds = load_suite(bench_dir / "methods.yaml"), load_suite(bench_dir / "methods_seeds.yaml")
    keys = {run_key(methods, r) for r in methods.runs()}
    repeated = [r for r in seeds.runs() if r.seed == 0]
    assert repeated and all(run_key(seeds, r) in keys for r in repeated)


def test_a_method_trains_with_its_own_settings(tmp_path, monkeypatch):
    """``methods[i].train`` overrides the suite's settings for that method's runs, is part of their keys only
    when given (other runs keep theirs), and is checked at load like the suite's."""
    from embcompress import runner
    from embcompress.runner import run_key
    from embcompress.synthetic import SyntheticConfig, make_synthetic

    own = {**TINY, "methods": [TINY["methods"][0], {**TINY["methods"][1], "train": {"embedding_lr": 0.1}}]}
    plain = load_suite(write(tmp_path, TINY))
    (tmp_path / "own").mkdir()
    tuned = load_suite(write(tmp_path / "own", own))
    assert tuned.methods[1].train == {"embedding_lr": 0.1} and tuned.methods[0].train == {}
    keys = [run_key(plain, r) for r in plain.runs()], [run_key(tuned, r) for r in tuned.runs()]
    assert keys[0][0] == keys[1][0] and not set(keys[0][1:]) & set(keys[1][1:])
    seen = []
    monkeypatch.setattr(runner, "train", lambda model, data, cfg: seen.append(cfg) or (_ for _ in ()).throw(
        RuntimeError("stop")))
    with pytest.raises(RuntimeError):
        runner.run_one(tuned, make_synthetic(SyntheticConfig(rows=2000, cardinality_exponent=0.25)),
                       tuned.runs()[1], device="cpu", progress=False)
    assert seen[0].embedding_lr == 0.1 and seen[0].lr == 0.01
    bad = {**TINY, "methods": [{**TINY["methods"][1], "train": {"embeding_lr": 0.1}}]}
    with pytest.raises(SpecError, match=r"methods\[0\].*embeding_lr"):
        load_suite(write(tmp_path, bad))
    bad = {**TINY, "methods": [{**TINY["methods"][1], "train": {"seed": 3}}]}
    with pytest.raises(SpecError, match=r"methods\[0\].*seed"):
        load_suite(write(tmp_path, bad))
