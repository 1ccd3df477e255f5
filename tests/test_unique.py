"""The batch de-duplication helpers, and the tables that compute each distinct lookup once."""

from __future__ import annotations

import pytest
import torch

from embcompress.tables.cce import CCEEmbedding
from embcompress.tables.dhe import DeepHashEmbedding
from embcompress.tables.robe import RobeEmbedding
from embcompress.tables.tt_rec import TTRecEmbedding
from embcompress.unique import unique_pairs, unique_rows


@pytest.mark.parametrize("shape", [(0,), (1,), (7, 3), (64, 5)])
def test_unique_pairs_matches_torch_unique_over_rows(shape):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 4, shape, generator=g)
    fields = torch.arange(shape[-1]) % 2 if len(shape) > 1 else torch.tensor(1)
    uids, ufields, inverse = unique_pairs(ids, fields)
    pairs = torch.stack([torch.broadcast_to(fields, ids.shape).reshape(-1), ids.reshape(-1)], -1)
    expected, expected_inverse = torch.unique(pairs, dim=0, return_inverse=True)
    assert torch.equal(torch.stack([ufields, uids], -1), expected.reshape(-1, 2))
    assert torch.equal(inverse, expected_inverse.reshape(-1))


def test_unique_pairs_keeps_ids_that_a_combined_key_would_overflow():
    big = 2**63 - 1
    ids = torch.tensor([big, big, big - 1, big], dtype=torch.int64)
    fields = torch.tensor([0, 1, 0, 0])
    uids, ufields, inverse = unique_pairs(ids, fields)
    assert uids.tolist() == [big - 1, big, big] and ufields.tolist() == [0, 0, 1]
    assert torch.equal(uids[inverse], ids) and torch.equal(ufields[inverse], fields)


def test_unique_rows_round_trips():
    rows = torch.tensor([[5, 1], [5, 0]])
    unique, inverse = unique_rows(rows)
    assert unique.tolist() == [0, 1, 5] and torch.equal(unique[inverse], rows.reshape(-1))


def _grads(table, ids):
    table.zero_grad()
    (table(ids) * torch.arange(table.embedding_dim)).sum().backward()
    return {n: (p.grad.to_dense() if p.grad.is_sparse else p.grad).clone() for n, p in table.named_parameters()}


@pytest.mark.parametrize("make", [
    lambda: TTRecEmbedding([300, 500], 8, rank=3, threshold=0, sparse=True),
    lambda: DeepHashEmbedding([300, 500], 8, width=16),
    lambda: RobeEmbedding([300, 500], 8, size=101, block_size=4, sparse=True),
    lambda: CCEEmbedding([300, 500], 8, num_buckets=16, chunks=2, sparse=True),
], ids=["tt_rec", "dhe", "robe", "cce"])
def test_repeated_lookups_give_the_vectors_and_summed_gradients_of_single_ones(make):
    torch.manual_seed(0)
    table = make()
    ids = torch.tensor([[3, 7], [3, 7], [299, 7], [3, 499]])
    out = table(ids)
    singles = torch.stack([table(row.unsqueeze(0))[0] for row in ids])
    assert torch.allclose(out, singles, atol=1e-6)
    summed = None
    for row in ids:
        g = _grads(table, row.unsqueeze(0))
        summed = g if summed is None else {n: summed[n] + g[n] for n in g}
    together = _grads(table, ids)
    for name in together:
        assert torch.allclose(together[name], summed[name], atol=1e-5), name
