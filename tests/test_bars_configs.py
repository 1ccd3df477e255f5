"""The BARS reproduction suites load, carry the BARS settings, and every model in them builds and runs."""

import math
from dataclasses import replace

import pytest
import torch

from embcompress.registry import build_model, build_table
from embcompress.results import read_results
from embcompress.runner import run_suite
from embcompress.suite import default_suite_path, load_data, load_suite

BENCHMARKS = default_suite_path().parent
X4 = BENCHMARKS / "bars_criteo_x4_001.yaml"
X1 = BENCHMARKS / "bars_criteo_x1_dlrm.yaml"


def _criteo_lines(n=80):
    """Criteo-format lines: label, 13 integer features (some missing, some negative), 26 hex values."""
    rows = []
    for i in range(n):
        dense = ["" if (i + j) % 9 == 0 else str((i * (j + 1)) % 23 - 1) for j in range(13)]
        cats = ["" if (i + j) % 11 == 0 else f"{(i * 7 + j) % (3 + j):08x}" for j in range(26)]
        rows.append("\t".join([str((i * 5 + i // 3) % 2)] + dense + cats))
    return "".join(row + "\n" for row in rows)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from embcompress.criteo import prepare_criteo

    tmp = tmp_path_factory.mktemp("bars")
    (tmp / "train.txt").write_text(_criteo_lines())
    bucketed, plain = tmp / "x4", tmp / "x1"
    prepare_criteo(tmp / "train.txt", bucketed, split="random", seed=2018, min_count=2, dense_buckets=True)
    prepare_criteo(tmp / "train.txt", plain, split="random", seed=2018)
    return {"x4": bucketed, "x1": plain}


def test_x4_suite_has_the_bars_settings(folders):
    suite = load_suite(X4, data_path=folders["x4"])
    assert suite.data == {"criteo": {"path": str(folders["x4"]), "dense": False}}  # kept under --data-path
    assert suite.embedding_dim == 16
    assert [(m.name, m.spec["type"]) for m in suite.models] == [
        ("fm", "fm.v1"), ("wide&deep", "wide_deep.v1"), ("deepfm", "deepfm.v1"), ("dcn", "dcn.v1"),
        ("dcn-v2", "dcn_v2.v1"), ("finalmlp", "finalmlp.v1"),
    ]
    specs = {m.name: m.spec for m in suite.models}
    deep5 = [1000] * 5
    assert all(specs[n]["deep_mlp"] == deep5 for n in ("wide&deep", "deepfm", "dcn", "dcn-v2"))
    assert specs["finalmlp"]["mlp1"] == deep5 and specs["finalmlp"]["mlp2"] == [500]
    assert specs["finalmlp"]["num_heads"] == 50 and specs["finalmlp"]["gate_mlp"] is None
    assert specs["dcn"]["cross_layers"] == 4 and specs["dcn-v2"]["cross_layers"] == 3
    assert specs["dcn-v2"]["low_rank"] is None and specs["dcn-v2"]["structure"] == "parallel"
    assert suite.train == {"optimizer": "adam", "lr": 0.001, "batch_size": 10000, "epochs": 100, "patience": 2,
                           "lr_decay": 0.1, "weight_decay": 0.0, "embedding_weight_decay": 1e-5}
    assert [m.table for m in suite.methods] == [{"type": "full.v1", "sparse": False}]


def test_x1_dlrm_suite_has_the_bars_settings(folders):
    suite = load_suite(X1, data_path=folders["x1"])
    assert suite.data == {"criteo": {"path": str(folders["x1"])}}  # raw dense features
    assert suite.embedding_dim == 10
    assert [(m.name, m.spec) for m in suite.models] == [
        ("dlrm", {"type": "dlrm.v1", "bottom_mlp": [400, 400, 400], "top_mlp": [400, 400, 400]})
    ]
    assert suite.train["batch_size"] == 4096 and suite.train["lr"] == 0.001 and suite.train["optimizer"] == "adam"
    assert suite.train["embedding_weight_decay"] == 1e-5 and suite.train["patience"] == 2
    assert [m.table for m in suite.methods] == [{"type": "full.v1", "sparse": False}]


@pytest.mark.parametrize("which", ["x4", "x1"])
def test_every_model_builds_and_runs_on_prepared_data(folders, which):
    suite = load_suite(X4 if which == "x4" else X1, data_path=folders[which])
    data = load_data(suite)
    assert data.num_dense == (0 if which == "x4" else 13)
    assert data.sparse.shape[1] == (39 if which == "x4" else 26)
    batch = data.split("train")
    dense, sparse = batch.dense[:8], batch.sparse[:8].long()
    for model_spec in suite.models:
        torch.manual_seed(0)
        table = build_table(dict(suite.methods[0].table), data.cardinalities, suite.embedding_dim,
                            field_names=data.field_names)
        model = build_model(model_spec.spec, table, data.num_dense).eval()
        with torch.no_grad():
            logits = model(dense, sparse)
        assert logits.shape == (8,) and torch.isfinite(logits).all(), model_spec.name


def test_one_short_real_run_of_the_x4_suite(folders, tmp_path):
    """The committed training options (Adam, L2 on a dense-gradient table, lr decay) run end to end on FM."""
    suite = load_suite(X4, data_path=folders["x4"])
    short = replace(suite, models=suite.models[:1], train={**suite.train, "epochs": 2, "batch_size": 16})
    run_suite(short, tmp_path / "out", progress=False)
    (record,) = [r for r in read_results(tmp_path / "out" / "results.jsonl") if r["status"] != "reference"]
    assert record["status"] == "ok" and record["model"] == "fm" and record["embedding_dim"] == 16
    assert math.isfinite(record["test_logloss"])
