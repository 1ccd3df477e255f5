"""Training bytes and serving bytes: what a table holds while it trains (stored bytes plus the optimizer state
held for it) and what it stores to serve (OptEmbed's export), in the tables, the training result, the runner's
records and the report."""

import pytest
import torch
import yaml

from embcompress import build_model, build_table
from embcompress.distributed import launch
from embcompress.memory import baseline_bytes
from embcompress.optembed import OptEmbedSchedule, SearchConfig, run_optembed
from embcompress.report import format_table
from embcompress.runner import run_suite
from embcompress.suite import load_suite
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.tables.optembed import OptEmbed, OptEmbedExport
from embcompress.training import TrainConfig, train

MODEL = {"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [8]}
DIM = 4


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(rows=4000, cardinality_exponent=0.25, seed=3))


# ------------------------------------------------------------------------------------- OptEmbed's serving bytes
def test_a_fresh_supernet_serves_every_row_at_full_width():
    table = OptEmbed([100, 37, 5], 8)
    export = table.export()
    assert table.kept_per_field() == [100, 37, 5] and export.dims.tolist() == [8, 8, 8]
    assert table.serving_bytes() == export.memory_report().total_bytes == table.memory_report().serving_bytes
    assert table.memory_report().serving_bytes < table.memory_report().total_bytes  # no thresholds, one map
    assert export.serving_bytes() is None  # the export serves as it is
    with torch.device("meta"):  # no values: a fresh table's export
        assert OptEmbed([100, 37, 5], 8).serving_bytes() == table.serving_bytes()


def test_supernet_serving_bytes_are_its_exports_after_pruning_search_and_freeze():
    torch.manual_seed(0)
    table = OptEmbed([300, 40, 7], 8, oov="learned")
    with torch.no_grad():
        table.threshold.fill_(0.065)  # about half the rows' L1 norms (8 * 0.01 * sqrt(2 / pi))
    kept = table.kept_per_field()
    assert 0 < sum(kept) < 347
    table.set_dims([3, 8, 1])
    assert table.serving_bytes() == table.export().memory_report().total_bytes == table.export_bytes([3, 8, 1], kept)
    table.freeze([2, 5, 1])
    with torch.no_grad():
        table.threshold.fill_(-1.0)  # the frozen mask, not the thresholds, decides once retraining
    export = table.export()
    assert table.serving_bytes() == export.memory_report().total_bytes and export.dims.tolist() == [2, 5, 1]
    assert table.memory_report().ratio == pytest.approx(baseline_bytes([300, 40, 7], 8) / table.serving_bytes())


def test_the_pipeline_serves_what_the_supernet_said_it_would(data):
    torch.manual_seed(0)
    table = build_table({"type": "optembed.v1", "budget_bytes": baseline_bytes(data.cardinalities, DIM) / 4},
                        data.cardinalities, DIM)
    model = build_model(MODEL, table, data.num_dense)
    schedule = OptEmbedSchedule(threshold_lr=1.0, search=SearchConfig(generations=1, population=4, keep=2,
                                                                      mutations=2, crossovers=2, search_rows=500))
    fit = run_optembed(model, table, data, TrainConfig(epochs=1, batch_size=512, lr=0.01, progress=False), schedule)
    assert isinstance(fit.table, OptEmbedExport)
    assert table.serving_bytes() == fit.table.memory_report().total_bytes == fit.table.memory_report().serving_bytes
    # Retraining under Adam held two moments of every parameter that still trains (the thresholds do not).
    trained = [table.weight]
    assert fit.result.table_optimizer_bytes == 2 * sum(4 * p.numel() for p in trained) + 4 * len(trained)


# ------------------------------------------------------------------------------ the training result's state bytes
def _fit(data, optimizer: str, sparse: bool):
    torch.manual_seed(0)
    table = build_table({"type": "full.v1", "sparse": sparse}, data.cardinalities, DIM)
    model = build_model(MODEL, table, data.num_dense)
    return table, train(model, data, TrainConfig(epochs=1, batch_size=1024, optimizer=optimizer, progress=False))


@pytest.mark.parametrize("optimizer, sparse, per_value, step_bytes", [
    ("adam", False, 2 * 4, 4),  # Adam: exp_avg and exp_avg_sq in fp32, and a float32 step tensor
    ("adam", True, 2 * 4, 0),  # SparseAdam: the same moments; its step is a Python int, not a tensor
    ("adagrad", False, 4, 4),  # Adagrad: the running sum of squares, and a float32 step tensor
    ("adagrad", True, 4, 4),  # sparse Adagrad: the same state
    ("sgd", False, 0, 0),  # plain SGD without momentum holds nothing
])
def test_train_result_counts_the_tables_optimizer_state_by_hand(data, optimizer, sparse, per_value, step_bytes):
    table, result = _fit(data, optimizer, sparse)
    (weight,) = list(table.parameters())
    assert weight.shape == (sum(data.cardinalities), DIM) and weight.dtype == torch.float32
    assert result.table_optimizer_bytes == per_value * sum(data.cardinalities) * DIM + step_bytes


def _ddp_fit(seed: int) -> dict:
    data = make_synthetic(SyntheticConfig(rows=4000, cardinality_exponent=0.25, seed=3))
    table, result = _fit(data, "adam", False)
    return {"table_optimizer_bytes": result.table_optimizer_bytes, "rows": sum(data.cardinalities)}


@pytest.mark.slow
def test_each_rank_reports_the_state_of_its_replica():
    ranks = launch(_ddp_fit, 2, 0)
    assert [r["table_optimizer_bytes"] for r in ranks] == [2 * 4 * ranks[0]["rows"] * DIM + 4] * 2


# ------------------------------------------------------------------------------------------- records and report
@pytest.fixture(scope="module")
def records(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bytes")
    suite_file = tmp / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "bytes", "data": {"synthetic": {"rows": 4000, "cardinality_exponent": 0.25, "seed": 3}},
        "embedding_dim": DIM, "model": MODEL, "train": {"epochs": 1, "batch_size": 1000, "lr": 0.01},
        "seeds": [0], "reference": False,
        "methods": [
            {"name": "full", "table": {"type": "full.v1", "sparse": True}},
            {"name": "hashing", "table": {"type": "hashing.v1"}, "compression": [4]},
            {"name": "hashing-int8", "table": {"type": "hashing.v1", "precision": "int8"}, "compression": [4]},
            {"name": "optembed", "table": {"type": "optembed.v1"}, "compression": [4],
             "schedule": {"threshold_lr": 1.0, "generations": 1, "population": 4, "keep": 2, "mutations": 2, "crossovers": 2,
                          "search_rows": 500}},
        ],
    }))
    out = run_suite(load_suite(suite_file), tmp / "out", progress=False)
    assert [r["status"] for r in out] == ["ok"] * 4, [r.get("error") for r in out]
    return {r["method"]: r for r in out}


@pytest.mark.slow
def test_records_hold_training_and_serving_bytes(records):
    for r in records.values():
        assert r["bytes"] == r["serving_bytes"]  # ``bytes`` stays the serving bytes older records hold
        assert r["ratio"] == pytest.approx(r["baseline_bytes"] / r["serving_bytes"])
    hashing = records["hashing"]
    assert hashing["optimizer_state_bytes"] > 0
    assert hashing["training_bytes"] == hashing["serving_bytes"] + hashing["optimizer_state_bytes"]
    int8 = records["hashing-int8"]  # trains fp32 rows and serves them at int8, with more rows for the budget
    assert int8["serving_bytes"] <= int8["target_bytes"] < int8["training_bytes"] - int8["optimizer_state_bytes"]
    assert int8["precision"] == "int8" and 0.5 < int8["fp32_test_auc"] < 1 and int8["fp32_test_auc"] != int8["test_auc"]
    assert "precision" not in hashing and "fp32_test_auc" not in hashing
    full = records["full"]  # full.v1 sparse: SparseAdam's two fp32 moments per value, its step an int
    assert full["optimizer_state_bytes"] == 2 * full["baseline_bytes"]
    assert full["training_bytes"] == full["serving_bytes"] + full["optimizer_state_bytes"]
    optembed = records["optembed"]  # the supernet (every row, full width, thresholds) trained; the export serves
    assert optembed["serving_bytes"] <= optembed["baseline_bytes"] / 4
    assert optembed["training_bytes"] >= optembed["serving_bytes"] + optembed["optimizer_state_bytes"]
    assert optembed["training_bytes"] > optembed["baseline_bytes"] + optembed["optimizer_state_bytes"]


@pytest.mark.slow
def test_the_report_shows_serving_and_training_bytes(records):
    table = format_table(list(records.values()))
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    assert header.startswith("| method | target | serving bytes | ratio | test AUC |")
    assert header.endswith("| seeds | training bytes |")
    hashing = records["hashing"]
    row = next(line for line in table.splitlines() if line.startswith("| hashing | 4x |"))
    assert row.startswith(f"| hashing | 4x | {hashing['serving_bytes']:,} | {hashing['ratio']:.2f}x |")
    assert row.endswith(f"| 1 | {hashing['training_bytes']:,} |")
    assert "the ratio is the fp32 baseline's bytes over them" in table
    assert "Training bytes: what the table that trained (a staged method's supernet) stores plus" in table


def test_the_report_of_older_records_has_no_training_column_or_a_dash():
    base = {"status": "ok", "model": "m", "seed": 0, "test_auc": 0.7, "test_logloss": 0.5, "samples_per_second": 1.0,
            "best_epoch": 1, "dense_parameters": 10, "ratio": 1.0, "target_ratio": None}
    old = [{**base, "method": "full", "bytes": 1000}]
    table = format_table(old)
    assert "| method | target | serving bytes | ratio | test AUC |" in table and "training bytes |" not in table
    assert "| full | - | 1,000 | 1.00x | 0.7000 |" in table
    assert "These runs did not record training bytes" in table
    mixed = old + [{**base, "method": "new", "bytes": 500, "serving_bytes": 500, "training_bytes": 1500,
                    "optimizer_state_bytes": 1000, "ratio": 2.0}]
    table = format_table(mixed)
    assert "| full | - | 1,000 | 1.00x | 0.7000 |" in table and "| 1 | — |" in table
    assert "| new | - | 500 | 2.00x | 0.7000 |" in table and "| 1 | 1,500 |" in table


def test_the_report_names_methods_whose_stored_bytes_are_mostly_buffers():
    base = {"status": "ok", "model": "m", "seed": 0, "test_auc": 0.7, "test_logloss": 0.5, "samples_per_second": 1.0,
            "best_epoch": 1, "dense_parameters": 10, "ratio": 4.0, "target_ratio": 4.0, "bytes": 1000}
    records = [
        {**base, "method": "indexed", "parameter_bytes": 400, "buffer_bytes": 600},
        {**base, "method": "indexed", "target_ratio": 16.0, "parameter_bytes": 950, "buffer_bytes": 50},
        {**base, "method": "rows", "parameter_bytes": 990, "buffer_bytes": 10},
        {**base, "method": "export", "parameter_bytes": 0, "buffer_bytes": 1000},  # frozen: all buffers
    ]
    table = format_table(records)
    assert "Buffers (stored index or id maps and seeds, never trained) are at least 10%" in table
    assert "- indexed: 60% at 4x\n" in table + "\n"
    assert "- rows:" not in table and "- export:" not in table
    assert "Buffers (" not in format_table(records[2:])


def test_the_report_shows_what_a_served_precision_cost():
    base = {"status": "ok", "model": "m", "seed": 0, "test_logloss": 0.5, "samples_per_second": 1.0,
            "best_epoch": 1, "dense_parameters": 10, "ratio": 2.6, "target_ratio": 2.0, "bytes": 1000}
    records = [{**base, "method": "full-int8", "precision": "int8", "test_auc": 0.70, "fp32_test_auc": 0.71},
               {**base, "method": "full-int8", "seed": 1, "precision": "int8", "test_auc": 0.72, "fp32_test_auc": 0.72},
               {**base, "method": "hashing", "test_auc": 0.69}]
    table = format_table(records)
    assert "| full-int8 | 2x | int8 | 1,000 | 0.7100 | 0.7150 | -0.0050 |" in table
    assert "| hashing | 2x | int8" not in table and "Served precision" not in format_table(records[2:])
