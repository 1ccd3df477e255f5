"""DLRM and the training loop on small synthetic data: it learns, it is deterministic, sparse paths work."""

import math

import pytest
import torch

from embcompress import build_model, build_table
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, _optimizers, train

SMALL_MODEL = {"type": "dlrm.v1", "bottom_mlp": [16], "top_mlp": [32]}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(rows=40_000, cardinality_exponent=0.25, seed=3))


def fit(data, table_spec, seed=0, epochs=2):
    torch.manual_seed(seed)
    table = build_table(table_spec, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    return train(model, data, TrainConfig(epochs=epochs, batch_size=1024, lr=0.01, seed=seed, progress=False))


def test_dlrm_shapes_and_backward(data):
    table = build_table({"type": "full.v1"}, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    batch = data.split("train")
    logits = model(batch.dense[:32], batch.sparse[:32])
    assert logits.shape == (32,)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_dlrm_rejects_a_single_table():
    with pytest.raises(ValueError, match="feature collection"):
        build_model(SMALL_MODEL, build_table({"type": "full.v1"}, 10, 8), 13)


@pytest.mark.parametrize("spec", [
    {"type": "full.v1", "sparse": True},
    {"type": "full.v1", "sparse": False},
    {"type": "hashing.v1", "num_buckets": 64, "sparse": True},
])
def test_training_learns(data, spec):
    result = fit(data, spec)
    assert result.test_auc > 0.65, result  # a constant predictor scores 0.5
    assert result.test_auc < data.bayes_auc + 0.01
    assert result.history[0]["train_logloss"] > result.history[-1]["train_logloss"]
    assert result.samples_per_second > 0 and math.isfinite(result.test_logloss)


def test_same_seed_same_auc(data):
    a = fit(data, {"type": "hashing.v1", "num_buckets": 64}, seed=5, epochs=1)
    b = fit(data, {"type": "hashing.v1", "num_buckets": 64}, seed=5, epochs=1)
    assert a.test_auc == b.test_auc and a.test_logloss == b.test_logloss


def test_sparse_tables_get_sparse_optimizers(data):
    table = build_table({"type": "full.v1", "sparse": True}, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    opts = _optimizers(model, TrainConfig(optimizer="adam"))
    assert [type(o).__name__ for o in opts] == ["Adam", "SparseAdam"]
    assert opts[1].param_groups[0]["params"] == [table.weight]
    assert all(p is not table.weight for p in opts[0].param_groups[0]["params"])
    assert [type(o).__name__ for o in _optimizers(model, TrainConfig(optimizer="adagrad"))] == ["Adagrad"]


def test_bad_train_config():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
