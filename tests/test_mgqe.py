"""mgqe.v1: DPQ whose tail ids choose among the first K_tail centroids only; exact export and bytes."""

import io

import pytest
import torch

from embcompress.memory import baseline_bytes
from embcompress.tables.dpq import DPQEmbedding, DPQExport
from embcompress.tables.mgqe import MGQEEmbedding

CARDS = [300, 3, 57, 1000]


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def test_frequent_ids_are_the_first_of_each_field():
    table = MGQEEmbedding([1000, 3, 57, 10], 8, frequent_fraction=0.1)
    assert table.frequent.tolist() == [100, 1, 6, 1]  # ceil(0.1 * n): 0.1 * 1000 stays 100
    assert MGQEEmbedding([5, 9], 8, frequent_fraction=0.0).frequent.tolist() == [0, 0]
    assert MGQEEmbedding([5, 9], 8, frequent_fraction=1.0).frequent.tolist() == [5, 9]


def tail_and_head_codes(table, codes):
    tail, head = [], []
    for f, n in enumerate(table.cardinalities):
        off, k = int(table.offsets[f]), int(table.frequent[f])
        head.append(codes[off : off + k])
        tail.append(codes[off + k : off + n])
    return torch.cat(head).long(), torch.cat(tail).long()


def test_tail_ids_only_use_the_first_k_tail_centroids_before_and_after_training():
    table = MGQEEmbedding(CARDS, 8, parts=2, codebook_size=64, tail_codebook_size=4, frequent_fraction=0.2,
                          sparse=True)
    head, tail = tail_and_head_codes(table, table.export().codes)
    assert int(tail.max()) < 4 and int(head.max()) >= 4  # the frequent ids do use the larger codebook
    opts = [torch.optim.SparseAdam(table.sparse_parameters(), lr=0.05), torch.optim.Adam([table.codebook], lr=0.05)]
    for step in range(5):
        out = table(ids_for(table, seed=step))
        loss = (out - 1).pow(2).sum() + table.regularization_loss()
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    served = table.export()
    head, tail = tail_and_head_codes(table, served.codes)
    assert int(tail.max()) < 4 and int(head.max()) >= 4
    ids = ids_for(table, batch=1000, seed=7)
    codes = table.codes_of(ids, torch.arange(4))
    is_tail = ids >= table.frequent
    assert bool((codes[is_tail] < 4).all())
    assert torch.equal(served(ids), table.eval()(ids))


def test_export_equals_the_table_with_bags_and_round_trips():
    table = MGQEEmbedding(CARDS, 8, parts=4, codebook_size=32, tail_codebook_size=8)
    ids = ids_for(table)
    trained = table(ids).detach()
    served = table.export()
    assert type(served) is DPQExport and served.codes.dtype == torch.uint8
    assert torch.equal(served(ids), table.eval()(ids)) and torch.equal(served(ids), trained)
    lengths = torch.tensor([[2, 0, 1], [1, 3, 1], [0, 0, 2], [1, 1, 1]])
    values = torch.cat([torch.randint(0, table.cardinalities[f], (int(lengths[f].sum()),)) for f in range(4)])
    assert torch.equal(served.forward_bags(values, lengths, mode="mean"),
                       table.forward_bags(values, lengths, mode="mean"))
    buf = io.BytesIO()
    torch.save(served.state_dict(), buf)
    buf.seek(0)
    fresh = DPQExport(CARDS, 8, parts=4, codebook_size=32)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(fresh(ids), served(ids))


def test_bytes_hand_count():
    table = MGQEEmbedding([10, 3, 7], 4, parts=2, codebook_size=300, tail_codebook_size=10)
    # training: queries 20 x 4 fp32, codebook 2 x 300 x 2 fp32, int64 offsets and frequent counts [3]
    report = table.memory_report()
    assert report.total_bytes == 20 * 4 * 4 + 2 * 300 * 2 * 4 + 2 * 3 * 8
    # served: int16 codes (K = 300 > 256) for head and tail alike, the codebook, the offsets
    served = 20 * 2 * 2 + 2 * 300 * 2 * 4 + 3 * 8
    assert report.serving_bytes == served == table.export().memory_report().total_bytes
    assert MGQEEmbedding.planned_bytes([10, 3, 7], 4, parts=2, codebook_size=300, tail_codebook_size=10) == served


def test_full_fraction_is_dpq():
    torch.manual_seed(3)
    dpq = DPQEmbedding(CARDS, 8, parts=2, codebook_size=16)
    torch.manual_seed(3)
    mgqe = MGQEEmbedding(CARDS, 8, parts=2, codebook_size=16, tail_codebook_size=2, frequent_fraction=1.0)
    mgqe.load_state_dict({**dpq.state_dict(), "frequent": mgqe.frequent, "_extra_state": mgqe.get_extra_state()})
    ids = ids_for(dpq)
    assert torch.equal(mgqe(ids), dpq(ids))


@pytest.mark.parametrize("ratio", [2, 4, 16, 40])
def test_budget_at_or_under(ratio):
    cards = [100_000, 20_000, 3_000, 500, 40, 3]
    budget = baseline_bytes(cards, 16) / ratio
    table = MGQEEmbedding.from_budget(cards, 16, budget_bytes=budget)
    assert table.memory_report().serving_bytes <= budget
    assert table.memory_report().serving_bytes == DPQEmbedding.planned_bytes(cards, 16, parts=table.parts)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"mgqe.v1: tail_codebook_size must be an int in \[1, 32\], got 64"):
        MGQEEmbedding(CARDS, 8, codebook_size=32)
    with pytest.raises(ValueError, match=r"mgqe.v1: frequent_fraction must be .*1.5"):
        MGQEEmbedding(CARDS, 8, frequent_fraction=1.5)
    with pytest.raises(ValueError, match=r"mgqe.v1: parts=3 must divide"):
        MGQEEmbedding(CARDS, 8, parts=3)
