"""hash_embedding.v1: importance-weighted sums of hashed pool rows, checked by hand against the documented hashes."""

import pytest
import torch

from embcompress import BudgetError
from embcompress.hashing import bucket, field_seeds
from embcompress.memory import baseline_bytes
from embcompress.tables import HashEmbedding

BUDGET_CARDS = [100_000, 20_000, 3_000, 500, 40, 3]
IDS = [[7, 7], [2**40 + 3, 3], [2**62, 0], [12, 2**31 - 1]]


def hand_rows(x: int, f: int, num_fields: int, k: int, seed: int, num_buckets: int) -> list[int]:
    """The documented rows of id ``x`` in field ``f``: k pool rows, then the importance row (K = B)."""
    seeds = field_seeds(seed, num_fields * (k + 1))
    return [int(bucket(torch.tensor(x), seeds[f * (k + 1) + i], num_buckets)) for i in range(k + 1)]


def hand_table(**options) -> HashEmbedding:
    """D=3, B=5, k=2, with the pool and importance weights set by hand to distinct values."""
    t = HashEmbedding([100, 100], 3, num_buckets=5, num_hashes=2, seed=2, **options)
    with torch.no_grad():
        t.pool.copy_(torch.tensor([[1.0, 2, 3], [-4, 5, 0.5], [7, -8, 9], [0.25, 11, -12], [13, 14, 15]]))
        if t.importance is not None:
            t.importance.copy_(torch.tensor([[0.5, -1.0], [2.0, 3.0], [-0.75, 0.25], [1.5, 4.0], [-2.0, 0.125]]))
    return t


def test_output_equals_the_hand_computed_weighted_sum():
    t = hand_table()
    pool, imp = t.pool.tolist(), t.importance.tolist()
    out = t(torch.tensor(IDS))
    for b, row in enumerate(IDS):
        for f, x in enumerate(row):
            r0, r1, rk = hand_rows(x, f, 2, 2, 2, 5)
            expected = [imp[rk][0] * pool[r0][c] + imp[rk][1] * pool[r1][c] for c in range(3)]
            assert out[b, f].tolist() == pytest.approx(expected)


def test_without_weights_the_output_is_the_plain_sum_of_the_same_rows():
    plain = hand_table(weights=False)
    assert plain.importance is None and plain.seeds.shape == (2, 2)
    assert torch.equal(plain.seeds, hand_table().seeds[:, :2])  # the pool rows do not depend on `weights`
    pool = plain.pool.tolist()
    out = plain(torch.tensor(IDS))
    for b, row in enumerate(IDS):
        for f, x in enumerate(row):
            r0, r1, _ = hand_rows(x, f, 2, 2, 2, 5)
            assert out[b, f].tolist() == pytest.approx([pool[r0][c] + pool[r1][c] for c in range(3)])


def test_append_weights_projects_the_concatenation():
    t = hand_table(append_weights=True)
    assert t.projection.shape == (3, 5)
    assert torch.equal(t.projection, torch.tensor([[1.0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0]]))
    with torch.no_grad():
        t.projection.copy_(torch.tensor([[1.0, 0, 2, -1, 0], [0.5, 1, 0, 0, 3], [0, -2, 1, 0.25, 1]]))
    pool, imp, W = t.pool.tolist(), t.importance.tolist(), t.projection.tolist()
    out = t(torch.tensor(IDS))
    for b, row in enumerate(IDS):
        for f, x in enumerate(row):
            r0, r1, rk = hand_rows(x, f, 2, 2, 2, 5)
            v = [imp[rk][0] * pool[r0][c] + imp[rk][1] * pool[r1][c] for c in range(3)]
            z = v + imp[rk]
            expected = [sum(W[o][i] * z[i] for i in range(5)) for o in range(3)]
            assert out[b, f].tolist() == pytest.approx(expected)


def test_identity_projection_at_init_keeps_the_weighted_sum():
    a = HashEmbedding([50, 60], 4, num_buckets=30, seed=1)
    b = HashEmbedding([50, 60], 4, num_buckets=30, seed=1, append_weights=True)
    b.pool.data.copy_(a.pool.data)
    ids = torch.tensor([[1, 2], [49, 59]])
    torch.testing.assert_close(a(ids), b(ids))


@pytest.mark.parametrize("sparse", [False, True])
def test_gradients_reach_pool_importance_and_projection(sparse):
    t = HashEmbedding([1000, 50], 8, num_buckets=64, append_weights=True, sparse=sparse)
    out = t(torch.randint(0, 50, (256, 2)))
    (out * torch.randn_like(out)).sum().backward()
    for name in ("pool", "importance", "projection"):
        grad = getattr(t, name).grad
        assert grad is not None, name
        grad = grad.to_dense() if grad.is_sparse else grad
        assert grad.abs().sum() > 0, name
    if sparse:
        assert t.sparse_parameters() == [t.pool, t.importance]
        assert t.pool.grad.is_sparse and t.importance.grad.is_sparse and not t.projection.grad.is_sparse
    else:
        assert t.sparse_parameters() == []


@pytest.mark.parametrize("options", [{}, dict(weights=False), dict(append_weights=True), dict(num_hashes=4)])
def test_init_output_has_the_full_table_scale(options):
    D = 16
    t = HashEmbedding([10**6] * 2, D, num_buckets=50_000, **options)
    out = t(torch.randint(0, 10**6, (4096, 2)))
    assert out.std().item() == pytest.approx(D**-0.5, rel=0.2)


def test_same_id_reads_different_rows_in_different_fields():
    B = 1000
    t = HashEmbedding([2**40, 2**40], 8, num_buckets=B)
    ids = torch.arange(5000)
    rows = bucket(ids.view(-1, 1, 1), t.seeds, B)  # [N, F, k + 1]
    assert (rows[:, 0] == rows[:, 1]).float().mean().item() < 0.01
    out = t(torch.stack([ids, ids], dim=1))
    assert (out[:, 0] != out[:, 1]).any(-1).all()


def test_raw_ids_near_2_pow_62():
    t = HashEmbedding(10, 4, num_buckets=64)
    assert t.accepts_raw_ids and list(t.id_limits()) == [-1]
    ids = torch.tensor([2**62, 2**62 + 1, 2**63 - 1])
    out = t(ids)
    assert out.shape == (3, 4) and torch.isfinite(out).all()
    assert torch.equal(out[1], t(torch.tensor([2**62 + 1]))[0])


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(num_buckets=0), "num_buckets"),
        (dict(num_buckets=8, num_hashes=0), "num_hashes"),
        (dict(num_buckets=8, weights=0), "weights"),
        (dict(num_buckets=8, weights=False, append_weights=True), "append_weights=True needs weights=True"),
        (dict(num_buckets=8, seed=2**31), "seed"),
    ],
)
def test_bad_options_raise(options, match):
    with pytest.raises(ValueError, match=match):
        HashEmbedding([5, 5], 4, **options)


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256])
@pytest.mark.parametrize("options", [{}, dict(weights=False), dict(append_weights=True, num_hashes=3, sparse=True)])
def test_from_budget_within_5_percent(ratio, options):
    D, F = 16, len(BUDGET_CARDS)
    budget = baseline_bytes(BUDGET_CARDS, D) / ratio
    t = HashEmbedding.from_budget(BUDGET_CARDS, D, budget_bytes=budget, **options)
    total = t.memory_report().total_bytes
    assert 0.95 * budget <= total <= budget
    k, w = t.num_hashes, t.weights
    per_b = (D + (k if w else 0)) * 4
    expected = t.num_buckets * per_b + (D * (D + k) * 4 if t.append_weights else 0) + F * (k + w) * 8
    assert total == expected and total + per_b > budget  # the largest B that fits


def test_from_budget_too_small_names_the_minimum():
    # one pool row (16 fp32) + one importance row (2 fp32) + 3 x 3 int64 seeds = 64 + 8 + 72
    with pytest.raises(BudgetError, match="minimum budget 144"):
        HashEmbedding.from_budget([5, 5, 5], 16, budget_bytes=100)
