"""cce.v1: the chunk formula, the stored index map and its bytes, re-clustering, budgets and the staged hook."""

import io

import pytest
import torch

from embcompress import build_model, build_table
from embcompress.budget import BudgetError, solve_knob
from embcompress.cce import CCESchedule
from embcompress.hashing import bucket, mix64
from embcompress.memory import baseline_bytes
from embcompress.registry import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.tables.cce import CCEEmbedding, index_dtype, kmeans
from embcompress.training import TrainConfig

CARDS = [1000, 40, 300]


def small(**options) -> CCEEmbedding:
    return CCEEmbedding(CARDS, 8, **{"num_buckets": [16, 8, 20], "chunks": 2, "clustered_per_row": 4, **options})


def expected_vectors(t: CCEEmbedding, ids: torch.Tensor, f: int) -> torch.Tensor:
    """The module docstring's formula, one id and chunk at a time."""
    c, dc = t.chunks, t.embedding_dim // t.chunks
    m, k = int(t.rows[f]), int(t.clustered[f])
    base, off = int(t.row_offsets[f]), int(t.index_offsets[f])
    out = torch.empty(len(ids), t.embedding_dim)
    for i, x in enumerate(ids.tolist()):
        for j in range(c):
            xt = torch.tensor(x)
            h0 = int(t.index[off + x, j]) if x < k else int(bucket(xt, t.seeds0[f, j], m))
            h1 = int(bucket(xt, t.seeds1[f, j], m))
            out[i, j * dc : (j + 1) * dc] = t.table0[(base + h0) * c + j] + t.table1[(base + h1) * c + j]
    return out


# ------------------------------------------------------------------------------------------------ the formula
def test_forward_is_the_documented_chunk_sum_for_clustered_hashed_and_raw_ids():
    t = small()
    assert t.clustered.tolist() == [64, 32, 80]  # min(n_f, 4 * m_f)
    ids = torch.tensor([[0, 0, 0], [63, 31, 79], [64, 32, 80], [999, 39, 299], [2**40 + 7, 2**53 + 1, 2**62]])
    out = t(ids)
    for f in range(3):
        torch.testing.assert_close(out[:, f], expected_vectors(t, ids[:, f], f), rtol=0, atol=0)


def test_the_fresh_index_is_the_hash_so_the_table_starts_as_hashing():
    t = small()
    for f in range(3):
        k, off = int(t.clustered[f]), int(t.index_offsets[f])
        x = torch.arange(k).unsqueeze(-1)
        assert torch.equal(t.index[off : off + k].long(), bucket(x, t.seeds0[f], int(t.rows[f])))


def test_index_dtype_is_the_smallest_that_holds_the_rows_and_is_counted():
    assert [index_dtype(m) for m in (1, 256, 257, 32_768, 32_769)] == [
        torch.uint8, torch.uint8, torch.int16, torch.int16, torch.int32]
    for m, size in ((200, 1), (300, 2), (40_000, 4)):
        t = CCEEmbedding([100_000], 16, num_buckets=m, chunks=4, clustered_per_row=2)
        assert t.index.shape == (2 * m, 4) and t.index.element_size() == size
        assert t.index_bytes() == 2 * m * 4 * size
        floats = 2 * m * 16 * 4
        int64s = 2 * 4 * 8 + 4 * 8 + 8  # seeds0, seeds1 [1, 4]; rows, clustered, two offsets [1]; generation
        assert t.memory_report().total_bytes == floats + t.index_bytes() + int64s
        assert CCEEmbedding.planned_bytes([100_000], 16, num_buckets=m, chunks=4, clustered_per_row=2) == (
            t.memory_report().total_bytes)  # the meta build the budget solver measures counts the index too


def test_clustered_per_row_none_indexes_the_whole_vocabulary():
    t = CCEEmbedding(CARDS, 8, num_buckets=16, clustered_per_row=None)
    assert t.clustered.tolist() == CARDS and t.index.shape == (sum(CARDS), 4)


# ------------------------------------------------------------------------------------------- re-clustering
def test_kmeans_finds_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[[-5.0, 0.0], [5.0, 0.0], [0.0, 5.0]]])
    points = (centers[:, torch.arange(300) % 3] + 0.1 * torch.randn(1, 300, 2, generator=g))
    found = kmeans(points, 3, 10, torch.Generator().manual_seed(1))
    found = found[0][found[0][:, 0].argsort()]
    torch.testing.assert_close(found, centers[0][centers[0][:, 0].argsort()], atol=0.05, rtol=0)


def test_recluster_centroids_nearest_index_and_residuals_against_the_new_h1():
    # The vocabulary (1000 ids) exceeds both the k-means sample (40) and the clustered ids (64): the case where the
    # reference recomputes residuals with a stale h1.
    t = small()
    ids = torch.arange(1000)
    before = t(torch.stack([ids, ids % 40, ids % 300], 1)).detach()[:, 0]
    old_seeds1 = t.seeds1.clone()
    stats = t.recluster_(iterations=5, sample=40, seed=3)
    assert int(t.generation) == stats["generation"] == 1
    assert torch.equal(t.seeds1, mix64(old_seeds1))  # h1 re-drawn, deterministically
    f, c, dc, m, k = 0, 2, 4, 16, 64
    T0 = t.table0.detach().view(-1, c, dc)[:m]  # field 0's rows
    T1 = t.table1.detach().view(-1, c, dc)[:m]
    old = before.view(1000, c, dc)
    h0 = t.index[:k].long()  # every clustered id sits at its nearest centroid
    dist = (old[:k].unsqueeze(1) - T0.unsqueeze(0)).pow(2).sum(-1)  # [k, m, c]
    assert torch.equal(h0, dist.argmin(1))
    h0_all = torch.cat([h0, bucket(ids[k:].unsqueeze(-1), t.seeds0[f], m)])
    h1_new = bucket(ids.unsqueeze(-1), t.seeds1[f], m)
    for j in range(c):
        residual = old[:, j] - T0[h0_all[:, j], j]
        for r in range(m):
            hit = h1_new[:, j] == r
            want = residual[hit].mean(0) if hit.any() else torch.zeros(dc)
            torch.testing.assert_close(T1[r, j], want, atol=1e-5, rtol=1e-5)
    after = t(torch.stack([ids, ids % 40, ids % 300], 1)).detach()[:, 0]
    assert stats["change"] > 0 and not torch.equal(after, before)


def planted(n=500, m=32, c=2, dc=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, m, dc, generator=g)
    z = torch.randint(0, m, (n, c), generator=g)
    return centers[torch.arange(c), z].reshape(n, c * dc) + 0.05 * torch.randn(n, c * dc, generator=g)


def test_reclustering_lowers_the_reconstruction_error_of_a_planted_clustered_table():
    # Targets: every chunk of every id is one of m planted centres (plus noise). Hashing cannot place ids by
    # cluster; re-clustering moves ids with similar learned chunks onto one row. Training alone converges and stops.
    n, m = 500, 32
    target, ids = planted(n, m), torch.arange(n)

    def fit(t, steps=120):
        opt = torch.optim.Adam(t.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            (t(ids) - target).pow(2).mean().backward()
            opt.step()
        with torch.no_grad():
            return float((t(ids) - target).pow(2).mean())

    torch.manual_seed(0)
    table = CCEEmbedding(n, 8, num_buckets=m, chunks=2, clustered_per_row=None, init_std=0.1)
    control = CCEEmbedding(n, 8, num_buckets=m, chunks=2, clustered_per_row=None, init_std=0.1)
    errors = [fit(table)]
    for r in range(3):
        table.recluster_(iterations=10, sample=n, seed=r)
        errors.append(fit(table))
    trained_only = fit(control, 120 * 4)
    assert errors[-1] < 0.85 * errors[0] and errors[-1] < 0.85 * trained_only, (errors, trained_only)
    assert errors == sorted(errors, reverse=True)  # every re-clustering helps


def test_recluster_is_deterministic_for_a_seed():
    torch.manual_seed(1)
    a = small()
    torch.manual_seed(1)
    b = small()
    ids = torch.tensor([[5, 3, 7], [999, 39, 2**40]])
    a.recluster_(iterations=3, sample=50, seed=2)
    b.recluster_(iterations=3, sample=50, seed=2)
    assert torch.equal(a(ids), b(ids)) and torch.equal(a.index, b.index)


# ----------------------------------------------------------------------------------- init, grads, determinism
@pytest.mark.parametrize("options", [{}, {"chunks": 1}, {"chunks": 8, "clustered_per_row": None}])
def test_init_std_is_the_std_of_the_returned_vectors(options):
    t = CCEEmbedding([20_000, 570], 16, num_buckets=[2000, 100], init_std=0.05, **options)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, 20_000, (20_000,), generator=g), torch.randint(0, 570, (20_000,), generator=g)], 1)
    assert abs(t(ids).std().item() / 0.05 - 1) < 0.1


def test_gradients_reach_both_tables_and_sparse_gradients_train():
    ids = torch.tensor([[1, 2, 3], [999, 39, 2**40]])
    t = small()
    t(ids).pow(2).sum().backward()
    assert t.table0.grad.abs().sum() > 0 and t.table1.grad.abs().sum() > 0
    s = small(sparse=True)
    assert s.sparse_parameters() == [s.table0, s.table1]
    opt = torch.optim.SparseAdam(s.sparse_parameters(), lr=0.1)
    before = s(ids).detach()
    s(ids).pow(2).sum().backward()
    assert s.table0.grad.is_sparse and s.table1.grad.is_sparse
    opt.step()
    assert not torch.equal(s(ids), before)


def test_same_seed_same_table_and_hashes_are_functions_of_id_and_seed():
    ids = torch.tensor([[5, 3, 7], [999, 39, 2**40]])
    torch.manual_seed(1)
    a = small(seed=4)
    torch.manual_seed(1)
    b = small(seed=4)
    assert torch.equal(a(ids), b(ids))
    c = small(seed=5)
    assert not torch.equal(a.seeds0, c.seeds0) and not torch.equal(a.index, c.index)
    # the rows an id reads do not depend on the batch it comes in
    assert torch.equal(a(ids[1:]), a(ids)[1:])


def test_state_dict_round_trip_after_reclustering():
    t = small()
    t.recluster_(iterations=2, sample=64, seed=0)
    buf = io.BytesIO()
    torch.save(t.state_dict(), buf)
    buf.seek(0)
    other = small(seed=9)
    other.load_state_dict(torch.load(buf, weights_only=True))
    ids = torch.tensor([[5, 3, 7], [999, 39, 2**40]])
    assert torch.equal(other(ids), t(ids)) and int(other.generation) == 1


def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"cce.v1: chunks=3 must divide embedding_dim=8"):
        small(chunks=3)
    with pytest.raises(ValueError, match=r"cce.v1: clustered_per_row must be a positive int or None, got 0"):
        small(clustered_per_row=0)
    with pytest.raises(ValueError, match=r"cce.v1: num_buckets"):
        small(num_buckets=2.5)
    with pytest.raises(ValueError, match="sample"):
        small().recluster_(sample=0)


# -------------------------------------------------------------------------------------------------- budgets
BUDGET_CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


@pytest.mark.parametrize("ratio", [2, 16, 64, 256, 1000])
def test_budgets_are_met_at_most_and_within_5_percent(ratio):
    budget = baseline_bytes(BUDGET_CARDS, 16) / ratio
    t = CCEEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=budget)
    total = t.memory_report().total_bytes
    assert 0.95 * budget <= total <= budget and t.budget_bytes == int(budget)
    assert t.index_bytes() > 0  # the index is part of what the budget buys
    knob, value = solve_knob(CCEEmbedding, BUDGET_CARDS, 16, budget, {})
    assert CCEEmbedding.planned_bytes(BUDGET_CARDS, 16, **knob.kwargs(value + 1)) > budget  # the largest


def test_indexing_the_whole_vocabulary_caps_the_ratio_and_names_the_minimum():
    base = baseline_bytes(BUDGET_CARDS, 16)
    assert CCEEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 4, clustered_per_row=None)
    with pytest.raises(BudgetError, match=r"cce.v1: .*minimum budget [\d,]+ bytes"):
        CCEEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 64, clustered_per_row=None)


# ---------------------------------------------------------------------------------------- the staged hook
def test_schedule_from_dict():
    s = CCESchedule.from_dict({"reclusterings": 2, "sample": 100, "final_epochs": 1})
    assert (s.reclusterings, s.sample, s.final_epochs, s.epochs_between) == (2, 100, 1, 1)
    assert CCESchedule.from_dict(None) == CCESchedule()
    with pytest.raises(SpecError, match="did you mean 'kmeans_iterations'"):
        CCESchedule.from_dict({"kmeans_iteration": 3})
    with pytest.raises(SpecError, match=r"m\.schedule: CCESchedule: reclusterings must be a non-negative int, got -1"):
        CCESchedule.from_dict({"reclusterings": -1}, "m.schedule")


def test_fit_staged_trains_reclusters_and_trains_again():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    table = build_table({"type": "cce.v1", "budget_bytes": baseline_bytes(data.cardinalities, 8) / 8},
                        data.cardinalities, 8)
    assert table.trains_in_stages and table.schedule_type is CCESchedule
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    bytes_before = table.memory_report().total_bytes
    schedule = table.schedule_type.from_dict({"reclusterings": 2, "kmeans_iterations": 3, "sample": 500})
    fit = table.fit_staged(model, data, TrainConfig(epochs=1, batch_size=500, progress=False), schedule)
    assert fit.table is table and int(table.generation) == 2
    assert set(fit.stages) == {"train0", "recluster0", "train1", "recluster1", "final"}
    assert len(fit.details["reclusterings"]) == 2 and fit.details["index_bytes"] == table.index_bytes()
    assert fit.table.memory_report().total_bytes == bytes_before  # the index was there from the start
    assert 0.0 <= fit.result.test_auc <= 1.0
    with pytest.raises(ValueError, match="not a submodule"):
        table.fit_staged(torch.nn.Linear(1, 1), data, TrainConfig(epochs=1, progress=False), schedule)
