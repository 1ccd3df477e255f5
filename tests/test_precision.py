"""Row precision (issue 17, items 1 and 5): quantized rows, stochastic rounding, the eval view and the export."""

from __future__ import annotations

import pytest
import torch

from embcompress.quantize import (
    PRECISIONS, QuantizedRows, dequantize_rows, fake_quantize_rows, quantize_rows, row_bytes, stochastic_round,
)
from embcompress.registry import TABLES
from embcompress.tables.full import FullEmbedding
from embcompress.tables.hash_embedding import HashEmbedding
from embcompress.tables.hashing import HashingEmbedding

CARDS = [300, 7, 50]
ROW_TABLES = {
    "full.v1": {},
    "hashing.v1": {"num_buckets": 40},
    "hashing.v1/frequent": {"num_buckets": 40, "frequent": 5},
    "hashing.v2/shared": {"num_buckets": 64, "shared": True},
    "unified.v1": {"num_buckets": 64},
    "hash_embedding.v1": {"num_buckets": 32},
    "qr.v1": {},
    "qr.v1/concat": {"operation": "concat", "partitions": 3},
    "cce.v1": {"num_buckets": 8},
    "mixed_dim.v1": {"scale": 8.0, "blocks_per_field": 2},  # widths 1, 2, 3, 8: 1 stays fp32 at int8
}
LOW = [p for p in PRECISIONS if p != "fp32"]


def build(case: str, precision: str = "fp32", dim: int = 8, **extra):
    torch.manual_seed(0)
    return TABLES.get(case.split("/")[0])(CARDS, dim, precision=precision, **ROW_TABLES[case], **extra)


def ids_for(table, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randint(0, c, (n,), generator=g) for c in table.cardinalities], -1)


# ------------------------------------------------------------------------------------ rounding and storage
def test_stochastic_rounding_is_unbiased_and_seeded():
    values = torch.tensor([0.1, 0.5, 2.75, -1.3, 7.0]).repeat(40_000, 1)
    rounded = stochastic_round(values, torch.Generator().manual_seed(0))
    assert set(torch.unique(rounded - torch.floor(values)).tolist()) <= {0.0, 1.0}
    assert torch.allclose(rounded.mean(0), values[0], atol=0.01)
    again = stochastic_round(values, torch.Generator().manual_seed(0))
    other = stochastic_round(values, torch.Generator().manual_seed(1))
    assert torch.equal(rounded, again) and not torch.equal(rounded, other)
    assert torch.equal(rounded[:, 4], values[:, 4])  # integers stay


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_stochastic_row_quantization_is_unbiased(precision):
    row = torch.randn(1, 16)
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([dequantize_rows(quantize_rows(row, precision, stochastic=True, generator=g), precision, 16)
                        for _ in range(4000)]).mean(0)
    nearest = fake_quantize_rows(row, precision)
    step = (row.max() - row.min()) / (255 if precision == "int8" else 15)
    assert (mean - row).abs().max() < 0.05 * step  # unbiased ...
    assert (nearest - row).abs().max() > 0.1 * step  # ... while nearest rounding has a per-value error


@pytest.mark.parametrize("precision", PRECISIONS)
def test_quantization_error_and_layout(precision):
    rows = torch.randn(50, 13) * torch.logspace(-3, 1, 50).unsqueeze(-1)
    stored = quantize_rows(rows, precision)
    back = dequantize_rows(stored, precision, 13)
    assert back.dtype == torch.float32 and back.shape == rows.shape
    if precision in ("fp32", "fp16", "bf16"):
        assert torch.equal(back, rows.to(stored[0].dtype).float())
    else:
        codes, scale, offset = stored
        levels = 255 if precision == "int8" else 15
        assert codes.dtype == torch.uint8 and codes.shape == (50, 13 if precision == "int8" else 7)
        assert scale.dtype == offset.dtype == torch.float16
        # within half a step (and the offset's own rounding in fp16)
        span = rows.amax(-1) - rows.amin(-1)
        tol = span / levels * 0.51 + rows.amin(-1).abs() * 2**-10
        assert ((back - rows).abs().amax(-1) <= tol + 1e-6).all()
    assert sum(t.numel() * t.element_size() for t in stored) == 50 * row_bytes(13, precision)


def test_row_bytes_by_hand():
    assert [row_bytes(16, p) for p in PRECISIONS] == [64, 32, 32, 16 + 4, 8 + 4]
    assert row_bytes(5, "int4") == 3 + 4 and row_bytes(1, "int8") == 1 + 4


def test_constant_and_zero_rows():
    rows = torch.full((3, 8), 0.37)
    for precision in ("int8", "int4"):
        back = fake_quantize_rows(rows, precision)
        assert (back == back[0, 0]).all() and (back - rows).abs().max() <= 0.37 * 2**-11  # fp16's resolution
        assert torch.equal(fake_quantize_rows(torch.zeros(2, 8), precision), torch.zeros(2, 8))


def test_quantized_rows_gathered_equal_quantizing_the_gathered_rows():
    w = torch.randn(200, 16)
    idx = torch.tensor([[5, 199], [0, 5]])
    for precision in PRECISIONS:
        q = QuantizedRows(w, precision)
        assert torch.equal(q.lookup(idx), fake_quantize_rows(w[idx], precision))
        assert q.stored_bytes() == 200 * row_bytes(16, precision)


# -------------------------------------------------------------------------------------- tables and export
@pytest.mark.parametrize("precision", LOW)
@pytest.mark.parametrize("case", sorted(ROW_TABLES))
def test_export_serves_what_the_eval_view_returns(case, precision):
    table = build(case, precision, dim=16, sparse=True)  # CCE's chunks of 4: narrow enough rows still shrink
    ids = ids_for(table)
    train_out = table(ids)
    master = build(case, "fp32", dim=16, sparse=True)
    assert torch.equal(train_out, master(ids))  # training reads the fp32 masters
    table.eval()
    served = table.export()
    assert torch.equal(table(ids), served(ids))
    lengths = torch.tensor([[2, 0, 1]] * len(CARDS))
    values = torch.cat([ids[:3, f] for f in range(len(CARDS))])
    assert torch.equal(table.forward_bags(values, lengths), served.forward_bags(values, lengths))
    assert not any(p.requires_grad for p in served.parameters())
    assert table.memory_report().serving_bytes == served.memory_report().total_bytes
    assert served.memory_report().serving_bytes == served.memory_report().total_bytes
    assert table.memory_report().total_bytes > served.memory_report().total_bytes  # the masters are not kept
    assert not torch.equal(table(ids), master.eval()(ids))  # the eval view is quantized


@pytest.mark.parametrize("case", sorted(ROW_TABLES))
def test_serving_bytes_replace_each_row_table_by_its_quantized_size(case):
    fp32 = build(case)
    stored = fp32.memory_report().total_bytes
    assert fp32.memory_report().serving_bytes == stored
    for precision in LOW:
        table = build(case, precision)
        expected = stored
        for t in table._row_tables().values():
            n, w = t.shape
            kept = precision if row_bytes(w, precision) < 4 * w else "fp32"
            expected += n * row_bytes(w, kept) - 4 * n * w
        assert table.memory_report().serving_bytes == expected


def test_full_table_bytes_by_hand():
    # 10 + 3 rows of D=4, plus int64 offsets [2]
    for precision, per_row in [("fp32", 16), ("fp16", 8), ("bf16", 8), ("int8", 4 + 4), ("int4", 2 + 4)]:
        table = FullEmbedding([10, 3], 4, precision=precision)
        assert table.memory_report().serving_bytes == 13 * per_row + 2 * 8
        assert table.export().memory_report().total_bytes == 13 * per_row + 2 * 8
        assert table.memory_report().total_bytes == 13 * 16 + 2 * 8  # trained in fp32


def test_narrow_row_tables_stay_fp32_when_quantizing_would_grow_them():
    cce = TABLES.get("cce.v1")
    narrow = cce(CARDS, 4, num_buckets=8, chunks=4, precision="int8").export()  # rows of 1: 4 B < 1 + 4 B
    assert narrow.table0.precision == narrow.table1.precision == "fp32"
    assert cce(CARDS, 4, num_buckets=8, chunks=4, precision="fp16").export().table0.precision == "fp16"
    served = HashEmbedding(CARDS, 16, num_buckets=32, num_hashes=2, precision="int8").export()
    assert served.importance.precision == served.pool.precision == "int8"  # rows of 2: 2 + 4 B < 8 B


def test_export_at_another_precision_than_trained():
    table = build("hashing.v1").eval()
    ids = ids_for(table)
    served = table.export("int4")
    assert torch.equal(served(ids), build("hashing.v1", "int4").eval()(ids))
    assert served.precision == "int4" and table.precision == "fp32"
    with pytest.raises(ValueError, match=r"hashing\.v1.*precision.*'int3'"):
        table.export("int3")


@pytest.mark.parametrize("case", ["full.v1", "qr.v1", "cce.v1"])
def test_export_state_dict_round_trip(case):
    served = build(case, "int8").export()
    other = build(case, "int8")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    other = other.export()
    other.load_state_dict(served.state_dict())
    ids = ids_for(served)
    assert torch.equal(other(ids), served(ids))
    with pytest.raises(ValueError, match="precision"):
        build(case, "int4").export().load_state_dict(served.state_dict())


def test_a_checkpoint_keeps_its_precision():
    saved = build("full.v1", "int8").state_dict()
    with pytest.raises(ValueError, match="precision='int8'.*precision='fp32'"):
        build("full.v1").load_state_dict(saved)
    build("full.v1", "int8").load_state_dict(saved)


def test_bad_precision_is_refused_naming_it():
    with pytest.raises(ValueError, match=r"full\.v1.*precision.*'int7'"):
        FullEmbedding(CARDS, 4, precision="int7")


def test_tables_without_row_tables_export_fp32_only():
    table = TABLES.get("dhe.v1")(CARDS, 8, width=16).eval()
    ids = ids_for(table)
    assert torch.equal(table.export()(ids), table(ids))
    with pytest.raises(ValueError, match="no row tables"):
        table.export("int8")


# ------------------------------------------------------------------------------------------------ budgets
def test_budgets_buy_more_rows_at_lower_precision():
    cards = [5000, 300, 20]
    full = FullEmbedding.planned_bytes(cards, 16)
    rows = {}
    for precision in PRECISIONS:
        t = HashingEmbedding.from_budget(cards, 16, budget_bytes=full // 8, precision=precision)
        assert t.memory_report().serving_bytes <= full // 8
        rows[precision] = t.weight.shape[0]
    assert rows["fp32"] < rows["fp16"] == rows["bf16"] < rows["int8"] < rows["int4"]
    assert rows["int8"] == pytest.approx(rows["fp32"] * 64 / 20, rel=0.02)
    # the full table at int8 fits a 2x budget (20 of 64 bytes a row)
    assert FullEmbedding.from_budget(cards, 16, budget_bytes=full // 2, precision="int8").memory_report().ratio \
        == pytest.approx(64 / 20, rel=0.01)
