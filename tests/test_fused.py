"""Fused row tables (fbgemm's kernel, the optimizer in backward) against the reference path: the same outputs,
and the same rows after optimizer steps, for every row-based table and every CPU-fused optimizer."""

import pytest
import torch

from embcompress import build_model, build_table
from embcompress.fused import FusedLearningRate, FusedRows, fused_available
from embcompress.lowp import rowwise_adagrad_
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, make_optimizers, train

pytestmark = pytest.mark.skipif(not fused_available(), reason="fbgemm-gpu is not installed")

CARDS, DIM, LR, EPS = [500, 120, 7, 60], 8, 0.05, 1e-8
SPECS = {
    "full": {"type": "full.v1"},
    "hashing": {"type": "hashing.v1", "num_buckets": 40},
    "hashing-shared": {"type": "hashing.v1", "num_buckets": 90, "shared": True},
    "hashing-frequent": {"type": "hashing.v1", "num_buckets": 30, "frequent": 10},
    "qr": {"type": "qr.v1", "collisions": 8},
    "unified": {"type": "unified.v1", "num_buckets": 150, "chunks": 2},
    "hash-embedding": {"type": "hash_embedding.v1", "num_buckets": 64},
    "hash-embedding-appended": {"type": "hash_embedding.v1", "num_buckets": 64, "append_weights": True},
    "hash-embedding-unweighted": {"type": "hash_embedding.v1", "num_buckets": 64, "weights": False},
    "mixed-dim": {"type": "mixed_dim.v1", "scale": 16, "alpha": 0.3, "round_dims": True},  # widths 2, 4, 8
}


def _pair(spec: dict, optimizer: str):
    torch.manual_seed(3)
    ref = build_table({**spec, "sparse": True}, CARDS, DIM)
    torch.manual_seed(3)
    fused = build_table({**spec, "fused_optimizer": optimizer}, CARDS, DIM)
    return ref, fused


def _ids(batch: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=gen) for n in CARDS], dim=1)


def _reference_step(ref, optimizer: str, states: dict) -> None:
    """The update the fused kernel should have made, from the autograd rows' sparse gradients."""
    for name, table in ref._row_tables().items():
        if table.grad is None or table.shape[1] % 4:
            continue
        grad = table.grad.coalesce()
        rows, g = grad.indices()[0], grad.values()
        with torch.no_grad():
            if optimizer == "sgd":
                table.index_add_(0, rows, -LR * g)
            elif optimizer == "adagrad":
                acc = states.setdefault(name, torch.zeros_like(table)).index_add_(0, rows, g * g)[rows]
                table.index_add_(0, rows, -LR * g / (acc.sqrt() + EPS))
            else:
                table.index_add_(0, rows, -rowwise_adagrad_(states.setdefault(name, {}), table.shape[0], rows, g,
                                                             LR, EPS))
        table.grad = None


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad", "rowwise_adagrad"])
@pytest.mark.parametrize("method", list(SPECS))
def test_fused_rows_give_the_reference_outputs_and_the_reference_rows_after_two_steps(method, optimizer):
    ref, fused = _pair(SPECS[method], optimizer)
    assert any(isinstance(t, FusedRows) for t in fused._row_tables().values())
    (opt,) = fused.row_optimizers(LR)
    assert isinstance(opt, FusedLearningRate)
    states: dict = {}
    for step in range(2):
        ids = _ids(seed=step)
        out_ref, out_fused = ref(ids), fused(ids)
        torch.testing.assert_close(out_fused, out_ref, rtol=1e-6, atol=1e-7)
        target = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(10 + step))
        (out_ref * target).sum().backward()
        (out_fused * target).sum().backward()
        opt.step()
        _reference_step(ref, optimizer, states)
        for name, table in ref._row_tables().items():
            held = fused._row_tables()[name]
            if isinstance(held, FusedRows):
                torch.testing.assert_close(held.weight, table.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} {step}")
            else:  # too narrow for the kernel: an autograd parameter on both sides, the same gradient
                torch.testing.assert_close(held.grad.to_dense(), table.grad.to_dense())
                held.grad = table.grad = None
    if optimizer != "sgd":  # the state is the reference's too
        name, held = next((n, t) for n, t in fused._row_tables().items() if isinstance(t, FusedRows))
        ((_, state),) = held.optimizer_state().items()
        expected = states[name] if optimizer == "adagrad" else states[name]["sum"]
        torch.testing.assert_close(state.reshape(expected.shape), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", list(SPECS))
def test_fused_tables_count_rows_state_and_metadata_and_export_plain_rows(method):
    ref, fused = _pair(SPECS[method], "rowwise_adagrad")
    report, plain = fused.memory_report(), ref.memory_report()
    rows = {n: t for n, t in fused._row_tables().items() if isinstance(t, FusedRows)}
    assert report.parameter_bytes == plain.parameter_bytes  # the same rows, held by the kernel
    assert report.optimizer_state_bytes == sum(t.shape[0] * 4 for t in rows.values())  # one fp32 sum a row
    metadata = sum(b.numel() * b.element_size() for t in rows.values() for b in t.stored_tensors()[1])
    assert report.buffer_bytes == plain.buffer_bytes + metadata and metadata > 0
    assert report.serving_bytes == plain.total_bytes == fused.export().memory_report().total_bytes
    ids = _ids()
    served = fused.export()
    assert not any(isinstance(m, FusedRows) for m in served.modules()) and served.fused_optimizer is None
    torch.testing.assert_close(served(ids), fused.eval()(ids))


def test_fused_checkpoint_round_trip_keeps_rows_and_optimizer_state():
    _, fused = _pair(SPECS["hashing"], "rowwise_adagrad")
    fused(_ids()).sum().backward()
    state = fused.state_dict()
    assert {"weight.weight", "weight.momentum1"} <= set(state) and not any("kernel" in k for k in state)
    _, fresh = _pair({**SPECS["hashing"], "seed": 9}, "rowwise_adagrad")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight.weight, fused.weight.weight)
    assert torch.equal(fresh.weight.optimizer_state()["momentum1"], fused.weight.optimizer_state()["momentum1"])
    torch.testing.assert_close(fresh.eval()(_ids()), fused.eval()(_ids()))
    plain = build_table(SPECS["hashing"], CARDS, DIM)
    with pytest.raises(ValueError, match="fused_optimizer"):  # another backend: refused, naming the option
        plain.load_state_dict(state)


def test_fused_options_are_checked():
    with pytest.raises(ValueError, match="fused_optimizer"):
        build_table({"type": "hashing.v1", "num_buckets": 40, "fused_optimizer": "lamb"}, CARDS, DIM)
    adam = build_table({"type": "full.v1", "fused_optimizer": "adam"}, CARDS, DIM)  # built here, trained on CUDA
    with pytest.raises(ValueError, match="CUDA only"):
        adam(_ids())
    assert adam.eval()(_ids()).shape == (64, len(CARDS), DIM)  # it serves here
    with pytest.raises(ValueError, match="choose one"):
        build_table({"type": "full.v1", "fused_optimizer": "sgd", "precision": "int8", "train_quantized": True},
                    CARDS, DIM)
    rows = FusedRows(torch.zeros(10, 4), optimizer="sgd")
    with pytest.raises(ValueError, match="fp32"):
        rows.double()


def test_a_fused_table_trains_a_model_in_the_training_loop():
    data = make_synthetic(SyntheticConfig(rows=20_000, cardinality_exponent=0.25, seed=3))
    torch.manual_seed(0)
    table = build_table({"type": "hashing.v1", "num_buckets": 60, "fused_optimizer": "rowwise_adagrad"},
                        data.cardinalities, 8)
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [16], "top_mlp": [32]}, table, data.num_dense)
    opts = make_optimizers(model, TrainConfig(embedding_lr=0.1))
    assert table.weight.lr == 0.1 and sum(isinstance(o, FusedLearningRate) for o in opts) == 1
    assert not any(p.numel() == table.weight.weight.numel() for o in opts for g in o.param_groups
                   for p in g["params"])  # the rows are nobody else's parameters
    before = table.weight.weight.clone()
    result = train(model, data, TrainConfig(epochs=1, batch_size=512, embedding_lr=0.1, progress=False))
    assert not torch.equal(before, table.weight.weight) and result.test_auc > 0.6
    assert result.table_optimizer_bytes == 0  # its state is the table's own (counted in its memory report)
    with pytest.raises(ValueError, match="embedding_weight_decay"):
        make_optimizers(model, TrainConfig(embedding_weight_decay=0.1))


def test_the_runner_counts_a_fused_tables_optimizer_state_in_its_training_bytes(tmp_path):
    import json

    import yaml

    from embcompress.cli import main

    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "data": {"synthetic": {"rows": 6000}}, "embedding_dim": 8, "reference": False,
        "model": {"type": "lr.v1"}, "train": {"epochs": 1, "batch_size": 512, "optimizer": "adagrad"}, "seeds": [0],
        "methods": [{"name": "hashing", "table": {"type": "hashing.v1", "fused_optimizer": "rowwise_adagrad"},
                     "compression": [8]}]}))
    assert main(["bench", "run", str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    (record,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    rows = record["parameter_bytes"] // (8 * 4)  # the fp32 rows of width 8, held by the kernel
    assert record["optimizer_state_bytes"] == rows * 4 > 0  # one fp32 sum a row
    assert record["training_bytes"] > record["serving_bytes"] + record["optimizer_state_bytes"]  # + metadata
