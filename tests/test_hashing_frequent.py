"""hashing.v1 with frequent=K: dedicated rows for ids < K, double hashing for the rest."""

import pytest
import torch

from embcompress import BudgetError
from embcompress.hashing import bucket
from embcompress.memory import baseline_bytes
from embcompress.tables import HashingEmbedding

from .conftest import assert_bytes

CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


def test_frequent_ids_get_their_own_rows():
    t = HashingEmbedding([1000, 30], 4, num_buckets=[50, 50], frequent=10)
    ids = torch.stack([torch.arange(10), torch.arange(10)], dim=1)
    out = t(ids)
    torch.testing.assert_close(out[:, 0], t.weight[t.offsets[0] + torch.arange(10)])
    torch.testing.assert_close(out[:, 1], t.weight[t.offsets[1] + torch.arange(10)])
    assert len({tuple(v) for v in out[:, 0].tolist()}) == 10


def test_other_ids_are_the_sum_of_two_hashed_rows():
    t = HashingEmbedding([1000, 30], 4, num_buckets=[50, 50], frequent=10, seed=4)
    ids = torch.tensor([10, 11, 999, 512])
    out = t(torch.stack([ids, torch.zeros_like(ids)], dim=1))[:, 0]
    b1 = bucket(ids, t.seeds[0, 0], 50) + 10
    b2 = bucket(ids, t.seeds[0, 1], 50) + 10
    assert not torch.equal(b1, b2)
    torch.testing.assert_close(out, t.weight[b1] + t.weight[b2])


def test_field_whose_rest_fits_is_stored_directly():
    t = HashingEmbedding([1000, 30], 4, num_buckets=[50, 50], frequent=10)
    assert t.direct.tolist() == [False, True]
    ids = torch.tensor([[0, 29], [0, 15]])
    torch.testing.assert_close(t(ids)[:, 1], t.weight[t.offsets[1] + ids[:, 1]])
    with pytest.raises(ValueError, match="field1.*30"):
        t(torch.tensor([[0, 30]]))


def test_memory_hand_count():
    t = HashingEmbedding([1000, 30], 4, num_buckets=[50, 50], frequent=10)
    rows = (10 + 50) + (10 + 20)  # field 1: 20 remaining ids fit in 50 rows, so it keeps all 30 rows
    # per field: 2 int64 seeds, int64 row count, offset and dedicated count, one bool
    assert_bytes(t, rows * 4 * 4 + 2 * (2 * 8 + 8 + 8 + 8 + 1))


def test_output_scale_matches_the_full_table():
    torch.manual_seed(0)
    t = HashingEmbedding([200_000], 16, num_buckets=20_000, frequent=1000)
    frequent = t(torch.arange(1000).unsqueeze(1))
    hashed = t(torch.arange(1000, 200_000, 7).unsqueeze(1))
    for out in (frequent, hashed):
        assert out.std().item() == pytest.approx(16**-0.5, rel=0.1)


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256])
def test_budget_with_frequent_rows(ratio):
    budget = baseline_bytes(CARDS, 16) / ratio
    try:
        t = HashingEmbedding.from_budget(CARDS, 16, budget_bytes=budget, frequent=100)
    except BudgetError as err:
        assert "minimum budget" in str(err)
        return
    assert 0.95 * budget <= t.memory_report().total_bytes <= budget
    assert t.dedicated.tolist() == [100, 100, 100, 100, 40, 3]


def test_budget_below_the_dedicated_rows_names_the_minimum():
    with pytest.raises(BudgetError, match="minimum budget"):
        HashingEmbedding.from_budget(CARDS, 16, budget_bytes=20_000, frequent=1000)


def test_bad_options():
    with pytest.raises(ValueError, match="shared"):
        HashingEmbedding(CARDS, 16, num_buckets=100, shared=True, frequent=10)
    with pytest.raises(ValueError, match="frequent.*-1"):
        HashingEmbedding(CARDS, 16, num_buckets=100, frequent=-1)


def test_frequent_trains_with_sparse_adam():
    t = HashingEmbedding(CARDS, 8, num_buckets=64, frequent=5, sparse=True)
    opt = torch.optim.SparseAdam(t.sparse_parameters(), lr=0.1)
    ids = torch.stack([torch.randint(0, n, (256,)) for n in CARDS], dim=1)
    before = t(ids).detach()
    t(ids).pow(2).sum().backward()
    opt.step()
    assert (t(ids) - before).abs().sum() > 0
