"""embcompress.frequency: id counts, frequency ranks, and the FrequencyRanked wrapper for un-ranked ids."""

import io
import re

import numpy as np
import pytest
import torch

from embcompress import BudgetError
from embcompress import frequency
from embcompress.frequency import (
    FrequencyRanked,
    build_frequency_ranked,
    count_ids,
    frequency_ranks,
    ranks_from_counts,
    remap_bytes_for,
)
from embcompress.memory import baseline_bytes, measure
from embcompress.tables import FullEmbedding

CARDS = [500, 40, 3]
DIM = 8


def shuffled_zipf_data(rows: int = 4000, cards=CARDS, seed: int = 0):
    """[rows, F] ids whose popularity follows Zipf, encoded in a random (not frequency) order per field.

    Returns the ids and, per field, ``encoder[k]`` = the id of the k-th most popular value.
    """
    rng = np.random.default_rng(seed)
    encoders = [rng.permutation(n) for n in cards]
    zipf = [1.0 / np.arange(1, n + 1) for n in cards]
    cols = [enc[rng.choice(n, rows, p=z / z.sum())] for enc, n, z in zip(encoders, cards, zipf)]
    return np.stack(cols, axis=1), encoders


def ranked_ids(ids: torch.Tensor, ranks) -> torch.Tensor:
    return torch.stack([ranks[f][ids[..., f]] for f in range(ids.shape[-1])], dim=-1)


# ------------------------------------------------------------------------------------------------- ranks, counts
def test_ranks_are_a_permutation_ordered_by_count_with_ties_by_id():
    counts = np.array([3, 0, 5, 3, 0, 1, 5, 2])
    ranks = ranks_from_counts(counts)
    assert ranks.dtype == torch.int64
    assert sorted(ranks.tolist()) == list(range(8))
    order = torch.argsort(ranks).tolist()  # order[rank] = id
    assert order == [2, 6, 0, 3, 7, 5, 1, 4]  # 5, 5, 3, 3, 2, 1, then the unseen ids 1 and 4 in id order


def test_frequency_ranks_of_observed_ids():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 50, 300) ** 2 % 97  # uneven counts, many ties, unseen ids
    ranks = frequency_ranks(torch.from_numpy(ids), 97)
    counts = np.bincount(ids, minlength=97)
    order = torch.argsort(ranks).numpy()
    assert sorted(order.tolist()) == list(range(97))
    # Counts never increase with rank, equal counts keep id order.
    keys = list(zip(-counts[order], order))
    assert keys == sorted(keys)
    unseen = order[counts[order] == 0]
    assert (counts[order][: len(order) - len(unseen)] > 0).all() and list(unseen) == sorted(unseen)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0, 5, 7], 7), "got id 7 at position 2, outside its domain \\[0, 7\\)"),
        (([0, -1], 7), "got id -1"),
        (([0.5], 7), "must hold integers, got dtype float64"),
        (([0], 0), "cardinality must be a positive int, got 0"),
    ],
)
def test_frequency_ranks_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        frequency_ranks(*args)


def test_ranks_from_counts_rejects_negative_counts():
    with pytest.raises(ValueError, match="non-negative, got -2 for id 1"):
        ranks_from_counts([4, -2, 0])


def test_count_ids_counts_each_field_in_blocks(monkeypatch):
    ids, _ = shuffled_zipf_data(1000)
    expected = [np.bincount(ids[:, f], minlength=n) for f, n in enumerate(CARDS)]
    monkeypatch.setattr(frequency, "_COUNT_CHUNK_ROWS", 64)  # many blocks, the last one ragged
    for source in (ids, torch.from_numpy(ids), ids.astype(np.int32)):
        counts = count_ids(source, CARDS)
        assert [c.dtype for c in counts] == [np.int64] * 3
        assert all(np.array_equal(c, e) for c, e in zip(counts, expected))


def test_count_ids_rejects_bad_input(monkeypatch):
    monkeypatch.setattr(frequency, "_COUNT_CHUNK_ROWS", 4)
    ids = np.zeros((10, 3), dtype=np.int64)
    ids[9, 1] = 40
    with pytest.raises(ValueError, match="field 1 got id 40 at position 9, outside its domain \\[0, 40\\)"):
        count_ids(ids, CARDS)
    with pytest.raises(ValueError, match="shape \\[N, 3\\]"):
        count_ids(ids[:, :2], CARDS)
    with pytest.raises(ValueError, match="integer ids"):
        count_ids(ids.astype(float), CARDS)


# ------------------------------------------------------------------------------------------------------ wrapper
@pytest.fixture
def data():
    ids, encoders = shuffled_zipf_data()
    return torch.from_numpy(ids), count_ids(ids, CARDS), encoders


def test_wrapper_gives_frequent_ids_the_wide_blocks(data):
    ids, counts, encoders = data
    t = build_frequency_ranked({"type": "mixed_dim.v1", "blocks_per_field": 2, "budget_bytes": 6000}, counts, DIM)
    ranks = [ranks_from_counts(c) for c in counts]
    torch.testing.assert_close(t(ids), t.inner(ranked_ids(ids, ranks)), rtol=0, atol=0)
    # The most popular value of field 0 lands in the widest part, the least popular one in the narrowest.
    parts = [(s, e, d) for f, s, e, d, _ in t.inner.plan.parts if f == 0]
    width = {rank: d for s, e, d in parts for rank in range(s, e)}
    top, rare = int(encoders[0][0]), int(torch.argmax(ranks[0]))
    assert int(ranks[0][top]) == 0 and max(d for *_, d in parts) > min(d for *_, d in parts)
    assert width[int(t.rank_ids(torch.tensor([[top, 0, 0]]))[0, 0])] == max(d for *_, d in parts)
    assert width[int(t.rank_ids(torch.tensor([[rare, 0, 0]]))[0, 0])] == min(d for *_, d in parts)
    # Without the wrapper the same table would give that width to whatever value was encoded as 0.
    assert encoders[0][0] != 0


def test_wrapper_gives_the_k_most_frequent_ids_dedicated_rows(data):
    _, counts, _ = data
    t = build_frequency_ranked({"type": "hashing.v1", "frequent": 5, "num_buckets": 20}, counts, DIM)
    top5 = torch.from_numpy(np.argsort(-counts[0], kind="stable")[:5])
    batch = torch.stack([top5, torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long)], dim=1)
    inner = t.inner
    rows = inner.offsets[0] + t.rank_ids(batch)[:, 0]
    assert sorted(t.rank_ids(batch)[:, 0].tolist()) == [0, 1, 2, 3, 4]
    torch.testing.assert_close(t(batch)[:, 0], inner.weight[rows])


def test_memory_report_is_the_inner_table_plus_the_remap(data):
    _, counts, _ = data
    t = build_frequency_ranked({"type": "qr.v1"}, counts, DIM)
    remap = sum(CARDS) * 4 + len(CARDS) * 8
    assert t.remap.dtype == torch.int32 and t.remap_bytes == remap == remap_bytes_for(CARDS)
    report, inner = t.memory_report(), t.inner.memory_report()
    assert report.total_bytes == inner.total_bytes + remap
    assert report.parameters == inner.parameters
    assert report.buffer_bytes == inner.buffer_bytes + remap
    assert report.baseline_bytes == baseline_bytes(CARDS, DIM)
    assert measure(t, report.baseline_bytes) == report  # the module holds nothing else, nothing counted twice


@pytest.mark.parametrize(
    "spec", [{"type": "hashing.v1", "frequent": 10}, {"type": "mixed_dim.v1", "blocks_per_field": 3}]
)
@pytest.mark.parametrize("ratio", [2, 4])
def test_budget_includes_the_remap(data, spec, ratio):
    _, counts, _ = data
    dim = 16  # the remap is 1 / D of the baseline; mixed dimensions compress at most ~D x, so 4x needs D > 8
    budget = baseline_bytes(CARDS, dim) / ratio
    t = build_frequency_ranked({**spec, "budget_bytes": budget}, counts, dim)
    assert t.memory_report().total_bytes <= budget
    assert t.memory_report().total_bytes >= 0.9 * budget


def test_budget_errors_name_the_minimum(data):
    _, counts, _ = data
    remap = remap_bytes_for(CARDS)
    with pytest.raises(BudgetError, match=f"remap alone takes {remap:,} bytes.*minimum budget {remap:,} bytes"):
        build_frequency_ranked({"type": "hashing.v1", "budget_bytes": remap}, counts, DIM)
    with pytest.raises(BudgetError, match="left for the inner table.*minimum budget ([0-9,]+) bytes") as err:
        build_frequency_ranked({"type": "mixed_dim.v1", "budget_bytes": remap + 100}, counts, DIM)
    # The whole table's minimum (remap included) is named, and a budget of exactly that builds.
    found = re.search(r"minimum budget ([0-9,]+) bytes with the remap", str(err.value))
    minimum = int(found.group(1).replace(",", ""))
    t = build_frequency_ranked({"type": "mixed_dim.v1", "budget_bytes": minimum}, counts, DIM)
    assert t.memory_report().total_bytes <= minimum


def test_out_of_domain_ids_name_the_field(data):
    _, counts, _ = data
    # hashing.v1 alone takes raw ids in field 0; behind the remap, ids must lie in [0, n_f) in every field.
    spec = {"type": "hashing.v1", "num_buckets": 50}
    t = build_frequency_ranked(spec, counts, DIM, field_names=["a", "b", "c"])
    assert t.field_names == t.inner.field_names == ("a", "b", "c")
    with pytest.raises(ValueError, match="field 'a' \\(index 0\\) got id 500 .*outside its domain \\[0, 500\\)"):
        t(torch.tensor([[500, 0, 0]]))
    with pytest.raises(ValueError, match="field 'c' \\(index 2\\) got id -1"):
        t(torch.tensor([[0, 0, -1]]))
    with pytest.raises(ValueError, match="shape \\[..., 3\\]"):
        t(torch.tensor([[0, 0]]))
    t.set_field_names(["x", "y", "z"])
    assert t.inner.field_names == ("x", "y", "z")


def test_forward_bags_pools_ranked_ids(data):
    _, counts, _ = data
    t = build_frequency_ranked({"type": "mixed_dim.v1", "blocks_per_field": 2, "scale": 30.0}, counts, DIM)
    ranks = [ranks_from_counts(c) for c in counts]
    lengths = torch.tensor([[2, 0], [1, 3], [1, 1]])  # [F = 3, B = 2]
    values = torch.tensor([499, 3, 39, 0, 1, 39, 2, 0])
    pooled = t.forward_bags(values, lengths, mode="mean")
    assert pooled.shape == (2, 3, DIM)
    ranked = torch.cat([ranks[0][values[:2]], ranks[1][values[2:6]], ranks[2][values[6:]]])
    torch.testing.assert_close(pooled, t.inner.forward_bags(ranked, lengths, mode="mean"))
    with pytest.raises(ValueError, match="field2.*got id 3"):
        t.forward_bags(torch.tensor([0, 0, 3]), torch.ones(3, 1, dtype=torch.long))


def test_wrapper_trains_with_the_inner_tables_sparse_parameters(data):
    ids, counts, _ = data
    t = build_frequency_ranked({"type": "mixed_dim.v1", "blocks_per_field": 2, "scale": 30.0, "sparse": True},
                               counts, DIM)
    sparse = t.sparse_parameters()
    assert sparse and [id(p) for p in sparse] == [id(p) for p in t.inner.sparse_parameters()]
    dense = [p for p in t.parameters() if id(p) not in {id(q) for q in sparse}]
    opts = [torch.optim.SparseAdam(sparse, lr=0.1), torch.optim.Adam(dense, lr=0.1)]
    batch = ids[:256]
    before = t(batch).detach().clone()
    t(batch).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.is_sparse for p in sparse if p.grad is not None)
    for o in opts:
        o.step()
    assert not torch.allclose(t(batch), before)
    assert t.sgd_parameter_groups() == [] and t.regularization_loss() is None


def test_training_hooks_are_the_inner_tables():
    class Regularised(FullEmbedding):
        def regularization_loss(self):
            return self.weight.pow(2).sum()

        def sgd_parameter_groups(self):
            return [{"params": [self.weight], "lr": 0.5}]

    inner = Regularised([4, 2], 3)
    t = FrequencyRanked(inner, [torch.arange(4), torch.arange(2)])
    torch.testing.assert_close(t.regularization_loss(), inner.regularization_loss())
    assert t.sgd_parameter_groups()[0]["params"][0] is inner.weight


def test_state_dict_round_trip(data):
    ids, counts, _ = data
    spec = {"type": "hashing.v1", "frequent": 8, "budget_bytes": 8000}
    t = build_frequency_ranked(spec, counts, DIM)
    buffer = io.BytesIO()
    torch.save(t.state_dict(), buffer)
    buffer.seek(0)
    # Built from other counts (another remap) and another seed: the loaded state replaces both.
    other_counts = [np.roll(c, 7) for c in counts]
    u = build_frequency_ranked({**spec, "seed": 3}, other_counts, DIM)
    assert not torch.equal(u.remap, t.remap)
    u.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(u(ids), t(ids))


def test_single_table_and_int64_sizes():
    counts = np.array([0, 4, 1, 9])
    t = build_frequency_ranked({"type": "full.v1"}, counts, 2)  # a bare array: a single table
    assert t.single and t(torch.tensor([3, 1])).shape == (2, 2)
    torch.testing.assert_close(t(torch.tensor([3, 1, 2, 0])), t.inner(torch.tensor([0, 1, 2, 3])))
    with pytest.raises(ValueError, match="the table got id 4"):
        t(torch.tensor([4]))
    # Ranks of a field beyond int32 take 8 bytes each (arithmetic only: such a table is not built here).
    assert remap_bytes_for([2**31 + 1, 10]) == (2**31 + 11) * 8 + 16
    assert remap_bytes_for([2**31, 10]) == (2**31 + 10) * 4 + 16


def test_bad_counts_and_ranks_are_rejected():
    with pytest.raises(ValueError, match="counts of field 1 must be non-negative, got -1 for id 2"):
        build_frequency_ranked({"type": "full.v1"}, [np.ones(3, dtype=int), np.array([1, 0, -1])], 2)
    with pytest.raises(ValueError, match="counts of field 0 must be a non-empty 1-D array"):
        build_frequency_ranked({"type": "full.v1"}, [np.ones((2, 2), dtype=int)], 2)
    with pytest.raises(ValueError, match="counts is empty"):
        build_frequency_ranked({"type": "full.v1"}, [], 2)
    with pytest.raises(ValueError, match="counts of field 0 must hold integers"):
        build_frequency_ranked({"type": "full.v1"}, [np.array([0.5, 1.0])], 2)
    inner = FullEmbedding([3, 2], 2)
    with pytest.raises(ValueError, match="field 0 must be a permutation of range\\(3\\); rank 1 appears 2 times"):
        FrequencyRanked(inner, [torch.tensor([0, 1, 1]), torch.arange(2)])
    with pytest.raises(ValueError, match="ranks of field 1 must have shape \\[2\\]"):
        FrequencyRanked(inner, [torch.arange(3), torch.arange(3)])
    with pytest.raises(ValueError, match="got 1 rank arrays for the inner table's 2 fields"):
        FrequencyRanked(inner, [torch.arange(3)])
    with pytest.raises(ValueError, match="inner must be a CompressedEmbedding"):
        FrequencyRanked(torch.nn.Embedding(3, 2), [torch.arange(3)])


def test_staged_tables_are_rejected():
    class Staged(FullEmbedding):
        trains_in_stages = True

    with pytest.raises(ValueError, match="trains in stages"):
        FrequencyRanked(Staged([3], 2), [torch.arange(3)])


def test_build_table_spec_errors_pass_through(data):
    _, counts, _ = data
    with pytest.raises(ValueError, match="unknown key 'frequnt'"):
        build_frequency_ranked({"type": "hashing.v1", "frequnt": 3}, counts, DIM)
