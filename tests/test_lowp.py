"""Low-precision training (issue 17, item 1): rows held at int8/int4 while training, stochastic write-back."""

import inspect

import pytest
import torch

from embcompress.lowp import QuantizedRowOptimizer, TrainedRows
from embcompress.quantize import QuantizedRows, row_bytes
from embcompress import build_model
from embcompress.registry import TABLES, build_table
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, make_optimizers, train

CARDS = [300, 40, 7]
D = 16
SPECS = {  # every table that takes the option, at a size that compresses
    "full.v1": {},
    "hashing.v1": {"num_buckets": 64},
    "hashing.v2": {"num_buckets": 64},
    "unified.v1": {"num_buckets": 96},
    "unified.v2": {"num_buckets": 96},
    "hash_embedding.v1": {"num_buckets": 48},
    "hash_embedding.v2": {"num_buckets": 48},
    "qr.v1": {"collisions": 4},
    "mixed_dim.v1": {"scale": 8.0, "blocks_per_field": 2},
}


def test_every_table_with_the_option_is_covered():
    takes = {n for n in TABLES.names() if "train_quantized" in inspect.signature(TABLES.get(n)).parameters}
    assert takes == set(SPECS)


def _table(name, precision="int8", **extra):
    return build_table({"type": name, **SPECS[name], "precision": precision, "train_quantized": True,
                        "sparse": True, **extra}, CARDS, D)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_no_fp32_row_table_is_held(name):
    t = _table(name)
    stores = [v for v in t._row_tables().values() if isinstance(v, TrainedRows)]
    assert stores, "no row table is held quantized"
    kept = [v for v in t._row_tables().values() if not isinstance(v, TrainedRows)]
    for v in kept:  # only a table too narrow to shrink at int8 stays fp32 (hash embedding's importance weights)
        assert t.served_precision(v.shape[1]) == "fp32"
    # Stored bytes are what it serves: nothing else to export.
    report = t.memory_report()
    assert t.serving_bytes() is None or t.serving_bytes() == report.total_bytes
    assert report.serving_bytes == report.total_bytes


def test_full_table_bytes_by_hand():
    t = _table("full.v1")
    opts = make_optimizers(t, TrainConfig(lr=0.05))
    rows = sum(CARDS)
    stored = rows * (D + 2 + 2) + len(CARDS) * 8  # uint8 codes, fp16 scale and offset; int64 field offsets
    assert t.memory_report(opts).total_bytes == stored
    t(torch.tensor([[1, 2, 3]])).sum().backward()
    for o in opts:
        o.step()
    # Row-wise Adagrad: one fp32 sum per row, created at the first step.
    assert t.memory_report(opts).training_bytes == stored + rows * 4
    int4 = _table("full.v1", precision="int4")
    assert int4.memory_report().total_bytes == rows * (D // 2 + 4) + len(CARDS) * 8


def test_float_precisions_are_refused_by_name():
    with pytest.raises(ValueError, match="train_quantized=True .*int8 or int4.*precision='fp16'"):
        _table("full.v1", precision="fp16")
    with pytest.raises(ValueError, match="train_quantized"):
        build_table({"type": "full.v1", "train_quantized": "yes"}, CARDS, D)


@pytest.fixture(scope="module")
def data():
    return make_synthetic(SyntheticConfig(rows=4000, seed=5))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_trains_exports_and_reloads(name, data):
    torch.manual_seed(0)
    t = build_table({"type": name, "precision": "int8", "train_quantized": True, "sparse": True,
                     "budget_bytes": sum(data.cardinalities) * D * 4 // 3}, data.cardinalities, D)
    model = build_model({"type": "lr.v1"}, t, data.num_dense)
    before = {k: v.clone() for k, v in t.state_dict().items() if torch.is_tensor(v)}
    result = train(model, data, TrainConfig(epochs=1, batch_size=256, lr=0.05, seed=0))
    assert result.val_auc > 0.55
    moved = [k for k, v in t.state_dict().items() if torch.is_tensor(v) and k.endswith(".codes")
             and not torch.equal(v, before[k])]
    assert moved, "no stored code changed"
    t.eval()
    ids = data.split("test").sparse[:64]
    served = t.export()
    assert not any(isinstance(m, TrainedRows) for m in served.modules())
    assert all(type(v) is QuantizedRows for v in served._row_tables().values() if isinstance(v, QuantizedRows))
    assert torch.equal(served(ids), t(ids))
    assert served.memory_report().total_bytes == t.memory_report().serving_bytes
    again = build_table({"type": name, "precision": "int8", "train_quantized": True, "sparse": True,
                         "budget_bytes": sum(data.cardinalities) * D * 4 // 3}, data.cardinalities, D)
    again.load_state_dict(t.state_dict())
    assert torch.equal(again.eval()(ids), t(ids))


def test_a_checkpoint_of_the_fp32_trained_table_is_refused():
    fp32_trained = build_table({"type": "full.v1", "precision": "int8"}, CARDS, D)
    with pytest.raises(ValueError, match="train_quantized"):
        _table("full.v1").load_state_dict(fp32_trained.state_dict())


def test_sgd_update_is_unbiased_and_seeded():
    """Many seeded SGD steps of one tiny gradient: the mean stored value moves by lr * g, far below one step."""
    base = torch.linspace(-1, 1, 16).repeat(2000, 1)
    rows = TrainedRows(base, "int8")
    start = rows.dequantized()
    step = float(rows.scale[0])  # one quantization step of every row (all rows alike)
    opt = QuantizedRowOptimizer([rows], lr=1.0, rule="sgd", seed=3)
    grad = torch.zeros(16)
    grad[5:11] = 0.1 * step  # a tenth of a step, on interior coordinates (the ends fix the row's range)
    out = rows.lookup(torch.arange(2000))
    (out * grad).sum().backward()
    opt.step()
    moved = rows.dequantized() - start
    assert moved[:, 5:11].mean().item() == pytest.approx(-0.1 * step, rel=0.1)
    assert (moved[:, 5:11] != 0).float().mean() > 0.05  # individual rows did round away
    twin = TrainedRows(base, "int8")
    opt2 = QuantizedRowOptimizer([twin], lr=1.0, rule="sgd", seed=3)
    (twin.lookup(torch.arange(2000)) * grad).sum().backward()
    opt2.step()
    assert torch.equal(twin.codes, rows.codes)


def test_rowwise_adagrad_matches_its_formula_within_a_step():
    torch.manual_seed(0)
    w = torch.randn(50, 16)
    rows = TrainedRows(w, "int8")
    opt = QuantizedRowOptimizer([rows], lr=0.05, seed=0)
    start = rows.dequantized()
    idx = torch.tensor([4, 9, 4, 30])
    g_out = torch.randn(4, 16)
    (rows.lookup(idx) * g_out).sum().backward()
    opt.step()
    g = torch.zeros(50, 16).index_add_(0, idx, g_out)
    touched = torch.tensor([4, 9, 30])
    s = g[touched].pow(2).mean(1)
    expected = start[touched] - 0.05 * g[touched] / (s.sqrt() + 1e-8).unsqueeze(1)
    got = rows.dequantized()[touched]
    assert (got - expected).abs().max() <= rows.scale[touched].float().max() * 1.01
    assert torch.equal(opt.state[rows.codes]["sum"][touched], s)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[touched] = False
    assert torch.equal(rows.dequantized()[untouched], start[untouched])


def test_no_gradient_is_captured_in_eval_mode_or_without_grad():
    rows = TrainedRows(torch.randn(5, 4), "int4")
    with torch.no_grad():
        rows.lookup(torch.tensor([1]))
    rows.eval()
    assert not rows.lookup(torch.tensor([1])).requires_grad
    assert rows.take_gradient() is None


def test_optimizer_state_round_trips():
    rows = TrainedRows(torch.randn(20, 8), "int8")
    opt = QuantizedRowOptimizer([rows], lr=0.1, seed=1)
    rows.lookup(torch.tensor([1, 2])).sum().backward()
    opt.step()
    saved = opt.state_dict()
    twin = TrainedRows(torch.zeros(20, 8), "int8")
    twin.load_state_dict(rows.state_dict())
    opt2 = QuantizedRowOptimizer([twin], lr=0.1, seed=99)
    opt2.load_state_dict(saved)
    for r, o in ((rows, opt), (twin, opt2)):
        r.lookup(torch.tensor([2, 3])).sum().backward()
        o.step()
    assert torch.equal(rows.codes, twin.codes)


def test_a_process_group_is_refused():
    from embcompress.distributed import DistContext
    with pytest.raises(ValueError, match="in one process"):
        DistContext.wrap(_table("full.v1"), "cpu")


def test_budget_counts_the_quantized_rows():
    base = sum(CARDS) * D * 4
    t = build_table({"type": "hashing.v1", "precision": "int8", "train_quantized": True, "budget_bytes": base // 8},
                    CARDS, D)
    assert t.memory_report().total_bytes <= base // 8
    assert t.weight.num_rows * row_bytes(D, "int8") > base // 8 * 0.85


def test_a_frequency_ranked_wrapper_trains_its_quantized_rows():
    from embcompress.frequency import FrequencyRanked

    inner = _table("hashing.v1")
    t = FrequencyRanked(inner, [torch.arange(n) for n in CARDS])
    opts = make_optimizers(t, TrainConfig(lr=0.05))
    assert any(isinstance(o, QuantizedRowOptimizer) for o in opts)
    before = inner.weight.codes.clone()
    t(torch.tensor([[1, 2, 3]])).sum().backward()
    for o in opts:
        o.step()
    assert not torch.equal(inner.weight.codes, before) and not inner.weight._captured
    from embcompress.distributed import DistContext
    with pytest.raises(ValueError, match="in one process"):
        DistContext.wrap(t, "cpu")


def test_a_loop_that_never_steps_the_rows_is_warned():
    rows = TrainedRows(torch.randn(5, 4), "int8")
    with pytest.warns(RuntimeWarning, match="row_optimizers"):
        for _ in range(1000):
            rows.lookup(torch.tensor([1])).sum().backward()


def test_weight_decay_on_quantized_rows_is_refused():
    with pytest.raises(ValueError, match="embedding_weight_decay"):
        make_optimizers(_table("full.v1"), TrainConfig(embedding_weight_decay=0.1))


def test_torchrec_collection_of_a_table_trained_quantized():
    pytest.importorskip("torchrec", reason="torchrec is not installed")
    from embcompress.torchrec import ids_to_kjt, quantized_collection

    t = _table("full.v1").set_field_names(["a", "b", "c"]).eval()
    served = quantized_collection(t, "fp16")
    ids = torch.tensor([[5, 6, 1]])
    out = served(ids_to_kjt(ids, ["a", "b", "c"])).values().view(1, 3, D)
    torch.testing.assert_close(out, t(ids), atol=2e-3, rtol=0)
