"""unified.v1: salted multiplexing of all fields into one shared table, chunked lookups, budgets."""

import pytest
import torch

from embcompress import BudgetError
from embcompress.hashing import bucket, field_seeds
from embcompress.memory import baseline_bytes
from embcompress.tables import UnifiedEmbedding

BUDGET_CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


def test_seeds_are_the_documented_field_seeds():
    t = UnifiedEmbedding([5, 6, 7], 8, num_buckets=10, chunks=4, seed=3)
    assert t.seeds.dtype == torch.int64 and t.seeds.shape == (3, 4)
    assert torch.equal(t.seeds.flatten(), field_seeds(3, 12))


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_chunks_concatenate_the_hashed_rows(chunks):
    D, M = 8, 97
    t = UnifiedEmbedding([2**40, 2**40, 2**40], D, num_buckets=M, chunks=chunks, seed=5)
    ids = torch.tensor([[0, 1, 2], [2**31 - 1, 2**53 + 1, 2**62], [12345, 12345, 12345]])
    out = t(ids)
    d = D // chunks
    assert out.shape == (3, 3, D)
    for f in range(3):
        for j in range(chunks):
            rows = bucket(ids[:, f], field_seeds(5, 3 * chunks)[f * chunks + j], M)
            assert torch.equal(out[:, f, j * d : (j + 1) * d], t.weight[rows])


def test_salts_make_the_same_id_differ_across_fields():
    M = 1000
    t = UnifiedEmbedding([2**40, 2**40], 8, num_buckets=M)
    ids = torch.arange(10_000)
    both = torch.stack([ids, ids], dim=1)
    rows = bucket(both.unsqueeze(-1), t.seeds, M).squeeze(-1)  # [N, 2]
    same = (rows[:, 0] == rows[:, 1]).float().mean().item()
    assert same < 0.01  # chance agreement is 1/M
    out = t(both)
    differ = (out[:, 0] != out[:, 1]).any(-1).float().mean().item()
    assert differ > 0.99


def test_row_occupancy_is_consistent_with_uniform_hashing():
    M, n = 1000, 200_000
    t = UnifiedEmbedding([n, n], 4, num_buckets=M, seed=11)
    ids = torch.arange(n)  # consecutive ids: the pattern a weak hash fails on
    for f in range(2):
        counts = torch.bincount(bucket(ids, t.seeds[f, 0], M), minlength=M).double()
        expected = n / M
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        # chi-square with M - 1 = 999 degrees of freedom: mean 999, std ~ 44.7; a loose +-5 sigma window
        assert 999 - 5 * 44.7 < chi2 < 999 + 5 * 44.7
        assert counts.max() < 1.35 * expected and counts.min() > 0.65 * expected


def test_raw_ids_near_2_pow_62():
    t = UnifiedEmbedding(10, 4, num_buckets=64, chunks=2)
    assert t.accepts_raw_ids and list(t.id_limits()) == [-1]
    ids = torch.tensor([2**62, 2**62 + 1, 2**63 - 1, 2**62 - 1])
    out = t(ids)
    assert out.shape == (4, 4) and torch.isfinite(out).all()
    assert torch.equal(out[1], t(torch.tensor([2**62 + 1]))[0])
    assert not torch.equal(out[0], out[1])  # distinct rows for these ids (checked against the buckets below)
    rows = bucket(ids.unsqueeze(-1), t.seeds[0], 64)
    assert torch.equal(out, t.weight[rows].flatten(-2))


def test_num_tables_deals_fields_round_robin():
    M, T = 50, 3
    t = UnifiedEmbedding([100] * 7, 4, num_buckets=M, num_tables=T, chunks=2)
    assert t.weight.shape == (T * M, 2)
    assert t.offsets.tolist() == [(f % T) * M for f in range(7)]
    ids = torch.randint(0, 100, (32, 7))
    rows = bucket(ids.unsqueeze(-1), t.seeds, M) + t.offsets.unsqueeze(-1)
    assert torch.equal(t(ids), t.weight[rows].flatten(-2))
    # field f only ever reads rows of table f % T
    for f in range(7):
        table = rows[:, f] // M
        assert (table == f % T).all()
    assert t.memory_report().parameter_bytes == T * M * 2 * 4


def test_bags_hash_like_one_hot_ids():
    t = UnifiedEmbedding([100, 100], 4, num_buckets=37, chunks=2, num_tables=2)
    values = torch.tensor([3, 4, 3])
    lengths = torch.tensor([[2], [1]])
    out = t.forward_bags(values, lengths)
    expected0 = t(torch.tensor([[3, 0], [4, 0]]))[:, 0].sum(0)
    expected1 = t(torch.tensor([[0, 3]]))[0, 1]
    torch.testing.assert_close(out[0, 0], expected0)
    torch.testing.assert_close(out[0, 1], expected1)


def test_init_scale_matches_a_full_table_row():
    D = 16
    t = UnifiedEmbedding([10**6] * 2, D, num_buckets=20_000, chunks=4)
    out = t(torch.randint(0, 10**6, (4096, 2)))
    assert out.std().item() == pytest.approx(D**-0.5, rel=0.05)


def test_indivisible_dim_names_both_numbers():
    with pytest.raises(ValueError, match=r"D=10.*chunks=4"):
        UnifiedEmbedding([5, 5], 10, num_buckets=8, chunks=4)
    with pytest.raises(ValueError, match=r"D=10.*chunks=3"):
        UnifiedEmbedding.from_budget([5, 5], 10, budget_bytes=10_000, chunks=3)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_buckets=0), "num_buckets"),
        (dict(num_buckets=8, chunks=0), "chunks"),
        (dict(num_buckets=8, num_tables=True), "num_tables"),
        (dict(num_buckets=8, num_tables=3), "num_tables=3"),
        (dict(num_buckets=8, seed=-1), "seed"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        UnifiedEmbedding([5, 5], 4, **options)


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256])
@pytest.mark.parametrize("options", [{}, dict(chunks=4), dict(chunks=2, num_tables=3, sparse=True)])
def test_from_budget_within_5_percent(ratio, options):
    budget = baseline_bytes(BUDGET_CARDS, 16) / ratio
    t = UnifiedEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=budget, **options)
    total = t.memory_report().total_bytes
    assert 0.95 * budget <= total <= budget
    # exact layout: the largest M that fits
    per_m = t.num_tables * t.chunk_dim * 4
    buffers = len(BUDGET_CARDS) * t.chunks * 8 + len(BUDGET_CARDS) * 8
    assert total == t.num_buckets * per_m + buffers
    assert total + per_m > budget


def test_from_budget_too_small_names_the_minimum():
    with pytest.raises(BudgetError, match="minimum budget 112"):  # 64 (one row of 16 fp32) + 24 (seeds) + 24 (offsets)
        UnifiedEmbedding.from_budget([5, 5, 5], 16, budget_bytes=100)
