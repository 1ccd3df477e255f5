"""DLRM and the training loop on small synthetic data: it learns, it is deterministic, sparse paths work."""

import math

import pytest
import torch

from embcompress import build_model, build_table
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, make_optimizers, train

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
    opts = make_optimizers(model, TrainConfig(optimizer="adam"))
    assert [type(o).__name__ for o in opts] == ["Adam", "SparseAdam"]
    assert opts[1].param_groups[0]["params"] == [table.weight]
    assert all(p is not table.weight for p in opts[0].param_groups[0]["params"])
    assert [type(o).__name__ for o in make_optimizers(model, TrainConfig(optimizer="adagrad"))] == ["Adagrad"]


def test_bad_train_config():
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="lamb")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


@pytest.mark.slow
def test_sgd_and_adagrad_take_sparse_tables(data):
    for optimizer in ("sgd", "adagrad"):
        torch.manual_seed(0)
        table = build_table({"type": "full.v1", "sparse": True}, data.cardinalities, 8)
        model = build_model(SMALL_MODEL, table, data.num_dense)
        # Plain SGD moves DLRM's dot products slowly from a small init: it needs far bigger steps than Adagrad.
        lr, emb_lr = (0.05, 0.05) if optimizer == "adagrad" else (1.0, 10.0)
        cfg = TrainConfig(epochs=2, batch_size=1024, lr=lr, embedding_lr=emb_lr, optimizer=optimizer, progress=False)
        result = train(model, data, cfg)
        assert result.test_auc > 0.6, (optimizer, result.test_auc)


def test_embedding_learning_rate_and_weight_decay_groups(data):
    table = build_table({"type": "hashing.v1", "num_buckets": 32}, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    (opt,) = make_optimizers(model, TrainConfig(lr=0.01, embedding_lr=0.1, weight_decay=1e-5,
                                                embedding_weight_decay=1e-3))
    dense_group, table_group = opt.param_groups
    assert table_group["params"] == [table.weight] and table_group["lr"] == 0.1
    assert table_group["weight_decay"] == 1e-3 and dense_group["weight_decay"] == 1e-5
    sparse_table = build_table({"type": "full.v1", "sparse": True}, data.cardinalities, 8)
    with pytest.raises(ValueError, match="embedding_weight_decay"):
        make_optimizers(build_model(SMALL_MODEL, sparse_table, data.num_dense),
                        TrainConfig(embedding_weight_decay=1e-3))


@pytest.mark.parametrize("spec, undecayed", [
    ({"type": "pep.v1", "kept_numbers": 100}, "threshold"),
    ({"type": "autosrh.v1", "kept_numbers": 100}, "alpha"),
    ({"type": "autodim.v1"}, "alpha"),
])
def test_embedding_weight_decay_spares_learned_thresholds_and_architecture_weights(data, spec, undecayed):
    table = build_table(spec, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    opts = make_optimizers(model, TrainConfig(embedding_weight_decay=1e-3))  # AutoDim's clock is one more
    decay = {id(p): g.get("weight_decay") for o in opts for g in getattr(o, "param_groups", ()) for p in g["params"]}
    assert decay[id(getattr(table, undecayed))] == 0.0  # decay would pull every threshold / logit one way
    rows = table.tables[0] if spec["type"] == "autodim.v1" else table.weight
    assert decay[id(rows)] == 1e-3


def test_checkpoint_round_trip_gives_identical_predictions(data, tmp_path):
    from embcompress.training import predict

    path = tmp_path / "best.pt"
    torch.manual_seed(0)
    table = build_table({"type": "hashing.v1", "num_buckets": 64, "seed": 3}, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    train(model, data, TrainConfig(epochs=2, batch_size=1024, lr=0.01, progress=False, checkpoint=str(path)))
    torch.manual_seed(99)
    fresh = build_model(SMALL_MODEL, build_table({"type": "hashing.v1", "num_buckets": 64}, data.cardinalities, 8),
                        data.num_dense)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    test = data.split("test")
    assert (predict(fresh, test) == predict(model, test)).all()


@pytest.mark.slow
def test_learning_rate_drops_after_epochs_without_improvement(data):
    result = fit_config(data, TrainConfig(epochs=5, batch_size=1024, lr=0.05, patience=5, lr_decay=0.5,
                                          progress=False))
    best = -1.0
    for prev, cur in zip(result.history, result.history[1:]):
        improved = prev["val_auc"] > best
        best = max(best, prev["val_auc"])
        assert cur["lr"] == pytest.approx(prev["lr"] * (1.0 if improved else 0.5))


def fit_config(data, cfg):
    torch.manual_seed(0)
    table = build_table({"type": "full.v1", "sparse": True}, data.cardinalities, 8)
    return train(build_model(SMALL_MODEL, table, data.num_dense), data, cfg)


@pytest.mark.parametrize("optimizer", [pytest.param("adam", marks=pytest.mark.slow), "adagrad"])
def test_embedding_l2_reaches_sparse_tables_and_only_touched_rows(data, optimizer):
    # L2 on the looked-up vectors: sparse-gradient tables get it through their sparse gradient, so rows no batch
    # touches keep their initial values exactly, and the touched rows end smaller than without it.
    def fitted(l2):
        torch.manual_seed(0)
        table = build_table({"type": "full.v1", "sparse": True, "init_std": 0.1}, data.cardinalities, 8)
        start = table.weight.detach().clone()
        model = build_model(SMALL_MODEL, table, data.num_dense)
        train(model, data, TrainConfig(epochs=1, batch_size=1024, lr=0.01, optimizer=optimizer, embedding_l2=l2,
                                       progress=False, patience=1))
        return table, start

    plain, start = fitted(0.0)
    shrunk, start2 = fitted(0.05)
    assert torch.equal(start, start2)
    train_ids = torch.from_numpy(data.sparse[slice(*data.splits["train"])]) + plain.offsets
    touched = torch.zeros(plain.weight.shape[0], dtype=torch.bool)
    touched[train_ids.reshape(-1)] = True
    assert (~touched).any() and touched.any()
    assert torch.equal(shrunk.weight.detach()[~touched], start[~touched])
    norm = lambda t: t.weight.detach()[touched].norm(dim=1).mean().item()  # noqa: E731
    assert norm(shrunk) < 0.85 * norm(plain), (norm(shrunk), norm(plain))


def test_embedding_l2_is_checked_and_its_hooks_are_removed(data):
    with pytest.raises(ValueError, match="embedding_l2.*-1"):
        TrainConfig(embedding_l2=-1)
    table = build_table({"type": "hashing.v1", "num_buckets": 32}, data.cardinalities, 8)
    model = build_model(SMALL_MODEL, table, data.num_dense)
    train(model, data, TrainConfig(epochs=1, batch_size=4096, embedding_l2=1e-3, progress=False))
    assert not table._forward_hooks
