"""mixed_dim.v1: power-law widths, integer widths, frequency blocks, exact outputs and bytes, budgets."""

import math

import pytest
import torch

from embcompress import BudgetError
from embcompress.memory import baseline_bytes
from embcompress.tables.full import FullEmbedding
from embcompress.tables.mixed_dim import (
    MixedDimEmbedding, PlanBlock, PlanPart, block_bounds, plan_mixed_dims, zipf_block_popularity,
)

from .conftest import assert_bytes

BUDGET_CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


def widths_by_id(plan, field):
    """[(start, stop, width)] of one field, in id order."""
    return [(s, t, d) for f, s, t, d, _ in plan.parts if f == field]


def reference(table, ids):
    """Embed a [B, F] batch one id at a time from the documented layout: weights[g] holds the rows of the parts of
    width dims[g] in plan order; projection holds each block's projection_rows rows in block order."""
    D, plan = table.embedding_dim, table.plan
    row_start, seen = {}, {d: 0 for d in table.dims}
    for part in plan.parts:
        row_start[part] = seen[part[3]]
        seen[part[3]] += part[2] - part[1]
    proj_start = [0]
    for block in plan.blocks:
        proj_start.append(proj_start[-1] + block[5])
    out = torch.empty(*ids.shape, D)
    for i in range(ids.shape[0]):
        for f in range(ids.shape[1]):
            v = int(ids[i, f])
            part = next(p for p in plan.parts if p[0] == f and p[1] <= v < p[2])
            _, start, _, d, b = part
            row = table.weights[table.dims.index(d)][row_start[part] + v - start]
            out[i, f] = row if d == D else row @ table.projection[proj_start[b] : proj_start[b] + d]
    return out


# ---------------------------------------------------------------------------------------------- power law
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.6, 1.0])
def test_widths_follow_the_power_law(alpha):
    cards, D = [200_000, 30_000, 5_000, 700, 90], 32
    scale = 10.0 * 5_000**alpha  # width 10 for the middle field, whatever alpha
    plan = MixedDimEmbedding(cards, D, scale=scale, alpha=alpha).plan
    means = []
    for f, n in enumerate(cards):
        # The paper's rule with p = 1/n (d = lambda * n ** -alpha), clipped to [1, D]
        x = min(max(scale * n**-alpha, 1.0), D)
        (block,) = [b for b in plan.blocks if b[0] == f]
        full = block[4] == D
        if not full:
            assert block[4] == pytest.approx(x, rel=1e-12)
        runs = widths_by_id(plan, f)
        assert sum(t - s for s, t, _ in runs) == n
        mean = sum((t - s) * d for s, t, d in runs) / n
        if full:  # stored full width because factorising would not save memory
            assert {d for *_, d in runs} == {D} and n * D <= n * x + x * D
        else:
            assert {d for *_, d in runs} <= {math.floor(x), math.ceil(x)}
            assert abs(mean - x) <= 0.5 / n + 1e-12  # the integer widths realise x up to one id's rounding
        means.append(mean)
    if alpha > 0:  # larger fields get narrower vectors (equal only where both are clipped to 1 or D)
        assert all(a <= b for a, b in zip(means, means[1:])) and len(set(means)) >= 3
    else:
        assert len(set(means)) == 1


def test_widths_grow_with_scale_and_stay_in_1_to_D():
    cards, D = [50_000, 2_000, 60], 16
    previous = None
    for scale in [0.0, 0.5, 5.0, 30.0, 100.0, 1e3, 1e9]:
        plan = plan_mixed_dims(cards, D, scale=scale, alpha=0.4, blocks_per_field=1, round_dims=False)
        widths = [d for *_, d, _ in plan.parts]
        assert all(isinstance(d, int) and 1 <= d <= D for d in widths)
        means = [sum((t - s) * d for s, t, d in widths_by_id(plan, f)) / n for f, n in enumerate(cards)]
        if previous is not None:
            assert all(m >= p for m, p in zip(means, previous))
        previous = means
    assert set(widths) == {D}


# ------------------------------------------------------------------------------------------ integer widths
@pytest.mark.parametrize("D", [16, 12, 1])
@pytest.mark.parametrize("scale", [0.0, 1.0, 3.7, 40.0, 1e6])
def test_round_dims_gives_int_powers_of_two_even_for_tiny_fields(D, scale):
    cards = [1, 2, 3, 4, 5, 1000, 77]
    table = MixedDimEmbedding(cards, D, scale=scale, round_dims=True, blocks_per_field=3)
    for d, w in zip(table.dims, table.weights):
        assert type(d) is int and w.shape[1] == d
        assert d == D or d & (d - 1) == 0, f"width {d} is neither a power of two nor D={D}"
    ids = torch.tensor([[0, 1, 2, 3, 4, 999, 76], [0, 0, 0, 0, 0, 0, 0]])
    out = table(ids)
    assert out.shape == (2, len(cards), D) and torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(table, ids))
    for f, n in enumerate(cards):  # single-id and tiny fields are full width: a projection would cost more
        if n <= 3 and D > 1:
            assert {d for *_, d in widths_by_id(table.plan, f)} == {D}


@pytest.mark.parametrize("round_dims", [False, True])
@pytest.mark.parametrize("budget", [1, 40, 100, 300, 1_000, 3_000, 10_000])
def test_tiny_budgets_build_or_raise_a_clean_budget_error(round_dims, budget):
    cards = [1, 2, 3, 5, 300]
    try:
        table = MixedDimEmbedding.from_budget(cards, 8, budget_bytes=budget, round_dims=round_dims)
    except BudgetError as err:
        smallest = MixedDimEmbedding.planned_bytes(cards, 8, scale=0.0, round_dims=round_dims)
        assert f"minimum budget {smallest:,} bytes" in str(err) and smallest > budget
        return
    assert table.memory_report().total_bytes <= budget
    assert table(torch.tensor([[0, 1, 2, 4, 299]])).shape == (1, 5, 8)


# -------------------------------------------------------------------------------------- frequency blocks
@pytest.mark.parametrize("n", [*range(1, 40), 100, 1000, 12_345, 10**6, 2**40])
@pytest.mark.parametrize("blocks", [1, 2, 3, 4, 7])
def test_block_bounds_tile_the_ids_exactly_with_growing_blocks(n, blocks):
    bounds = block_bounds(n, blocks)
    assert bounds[0] == 0 and bounds[-1] == n
    assert all(a < b for a, b in zip(bounds, bounds[1:]))  # non-empty blocks
    assert len(bounds) - 1 == min(blocks, len(bounds) - 1) <= min(blocks, n)
    if n >= 1000:  # geometric: every block at least as big as the one before, and as many as asked for
        sizes = [b - a for a, b in zip(bounds, bounds[1:])]
        assert len(sizes) == blocks and all(a <= b for a, b in zip(sizes, sizes[1:]))


def test_zipf_popularity_is_a_distribution_and_falls_with_rank():
    for n in [7, 300, 10**6]:
        bounds = block_bounds(n, 5)
        pops = [zipf_block_popularity(n, a, b) for a, b in zip(bounds, bounds[1:])]
        assert sum(p * (b - a) for p, a, b in zip(pops, bounds, bounds[1:])) == pytest.approx(1.0, rel=1e-12)
        assert all(p > q for p, q in zip(pops, pops[1:]))
        assert zipf_block_popularity(n, 0, n) == 1 / n
        assert zipf_block_popularity(n, 0, 1) == pytest.approx(1 / sum(1 / r for r in range(1, n + 1)))


@pytest.mark.parametrize("round_dims", [False, True])
@pytest.mark.parametrize("scale", [20.0, 80.0, 300.0])
def test_popular_ids_never_get_fewer_dims_than_rarer_ids(round_dims, scale):
    cards = [100_000, 20_000, 3_000, 500, 40, 3]
    table = MixedDimEmbedding(cards, 16, scale=scale, blocks_per_field=4, round_dims=round_dims)
    plan = table.plan
    for f, n in enumerate(cards):
        runs = widths_by_id(plan, f)
        assert runs[0][0] == 0 and runs[-1][1] == n and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
        widths = [d for *_, d in runs]
        assert widths == sorted(widths, reverse=True)
        blocks = [b for b in plan.blocks if b[0] == f]
        first, rest = blocks[0], blocks[1:]
        assert all(first[4] >= b[4] for b in rest)  # targets fall with rank
        first_min = min(d for s, t, d in runs if s < first[2])
        assert all(d <= first_min for s, t, d in runs if s >= first[2])
    assert len(plan.blocks) > len(cards)  # blocks are really used


# --------------------------------------------------------------------------------------------- outputs
def test_output_is_the_row_times_its_projection_by_hand():
    # field 0 (n=1000): x = 40 * 1000**-0.5 = 1.265 -> ids 0..264 width 2, ids 265..999 width 1, one projection
    # [2, 8]; field 1 (n=10): x = 12.6 -> clipped to 8 = D, stored full width.
    table = MixedDimEmbedding([1000, 10], 8, scale=40.0, alpha=0.5)
    assert table.plan.parts == ((0, 0, 265, 2, 0), (0, 265, 1000, 1, 0), (1, 0, 10, 8, 1))
    assert table.dims == (1, 2, 8) and table.projection.shape == (2, 8)
    with torch.no_grad():
        table.weights[0].copy_(torch.arange(735.0).unsqueeze(1))  # width 1: ids 265.. of field 0
        table.weights[1].copy_(torch.arange(530.0).view(265, 2) / 100)  # width 2: ids 0..264 of field 0
        table.weights[2].copy_(-torch.arange(80.0).view(10, 8))  # full width: field 1
        table.projection.copy_(torch.arange(16.0).view(2, 8) - 3)
    out = table(torch.tensor([[3, 7], [500, 0], [264, 9], [265, 1]]))
    P = torch.arange(16.0).view(2, 8) - 3
    torch.testing.assert_close(out[0, 0], torch.tensor([0.06, 0.07]) @ P)
    torch.testing.assert_close(out[1, 0], 235.0 * P[0])  # id 500 is row 500 - 265 of the width-1 weight
    torch.testing.assert_close(out[2, 0], torch.tensor([5.28, 5.29]) @ P)
    torch.testing.assert_close(out[3, 0], 0.0 * P[0])
    torch.testing.assert_close(out[0, 1], -torch.arange(56.0, 64.0))
    torch.testing.assert_close(out[1, 1], -torch.arange(8.0))


@pytest.mark.parametrize(
    "cards, options",
    [
        ([5000, 800, 90, 7], dict(scale=30.0)),  # several widths, one block each
        ([900] * 5, dict(scale=3.0, alpha=0.0)),  # one width, 5 projections: one GEMM over spread rows
        ([900] * 20, dict(scale=3.0, alpha=0.0)),  # one width, 20 > D projections: batched matmul path
        ([100_000, 20_000, 3_000, 40], dict(scale=150.0, blocks_per_field=4)),
        ([100_000, 20_000, 3_000, 40] * 6, dict(scale=120.0, blocks_per_field=3, round_dims=True)),
    ],
)
def test_forward_and_gradients_match_a_per_id_reference(cards, options):
    table = MixedDimEmbedding(cards, 16, **options)
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randint(0, n, (40,), generator=g) for n in cards], dim=1)
    ids[0] = 0
    ids[1] = torch.tensor(cards) - 1
    out = table(ids)
    expected = reference(table, ids)
    torch.testing.assert_close(out, expected)
    weight = torch.randn(out.shape, generator=g)
    params = list(table.parameters())
    grads = torch.autograd.grad((out * weight).sum(), params)
    ref_grads = torch.autograd.grad((expected * weight).sum(), params, allow_unused=True)
    for a, b, p in zip(grads, ref_grads, params):
        torch.testing.assert_close(a, torch.zeros_like(p) if b is None else b)


def test_sparse_rows_dense_projection():
    table = MixedDimEmbedding([3000, 500, 40], 16, scale=40.0, sparse=True)
    assert table.sparse_parameters() == list(table.weights)
    table(torch.tensor([[0, 1, 2], [2999, 499, 39]])).sum().backward()
    assert all(w.grad.is_sparse for w in table.weights)
    assert table.projection.grad is not None and not table.projection.grad.is_sparse
    assert MixedDimEmbedding([3000, 40], 16, scale=40.0).sparse_parameters() == []


@pytest.mark.parametrize("options", [dict(), dict(blocks_per_field=4), dict(round_dims=True)])
def test_outputs_start_at_the_full_tables_scale(options):
    cards, D = [20_000, 5_000, 1_000, 300, 100, 30, 10] * 3, 16
    table = MixedDimEmbedding.from_budget(cards, D, budget_bytes=baseline_bytes(cards, D) / 4, **options)
    assert len(table.dims) > 2 and table.projection is not None
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (4096,), generator=g) for n in cards], dim=1)
    with torch.no_grad():
        std = table(ids).std().item()
    assert abs(std - D**-0.5) <= 0.2 * D**-0.5


# ---------------------------------------------------------------------------------------- memory & budget
def test_memory_report_equals_a_hand_count():
    table = MixedDimEmbedding([1000, 10], 8, scale=40.0, alpha=0.5)
    rows = 735 * 1 + 265 * 2 + 10 * 8  # widths 1 and 2 in field 0, full width 8 in field 1
    projection = 2 * 8  # field 0's one projection: hi = 2 rows of D = 8
    # int64: per field its first part and the start of its second part (field 0 has 2 parts, field 1 pads);
    # group, shift, slot of 3 parts; the stacked projection rows of the width-2 part (2) and width-1 part (1)
    buffers = 2 * 2 + 3 * 3 + 2 + 1
    assert_bytes(table, 5572, parameters=(rows + projection) * 4, buffers=buffers * 8)
    assert table.plan.total_bytes == 5572


@pytest.mark.parametrize(
    "options",
    [
        dict(scale=0.0), dict(scale=7.0), dict(scale=200.0), dict(scale=1e9),
        dict(scale=90.0, blocks_per_field=5), dict(scale=90.0, round_dims=True, blocks_per_field=2),
        dict(scale=9.0, alpha=0.0), dict(scale=900.0, alpha=1),
    ],
)
def test_closed_form_bytes_equal_the_measured_bytes(options):
    cards = [100_000, 20_000, 3_000, 500, 40, 3, 1]
    plan = plan_mixed_dims(cards, 16, **{"alpha": 0.3, "blocks_per_field": 1, "round_dims": False, **options})
    assert plan.total_bytes == MixedDimEmbedding.planned_bytes(cards, 16, **options)


@pytest.mark.parametrize("options", [dict(), dict(round_dims=True), dict(blocks_per_field=4), dict(alpha=0.8)])
@pytest.mark.parametrize("ratio", [2, 4, 8, 16, 64, 256])
def test_from_budget_lands_within_5_percent_under(options, ratio):
    budget = baseline_bytes(BUDGET_CARDS, 16) / ratio
    smallest = MixedDimEmbedding.planned_bytes(BUDGET_CARDS, 16, scale=0.0, **options)
    if smallest > budget:  # widths are >= 1: about D = 16x is the most this method can compress
        assert ratio >= 16
        with pytest.raises(BudgetError, match=f"mixed_dim.v1.*minimum budget {smallest:,} bytes"):
            MixedDimEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=budget, **options)
        return
    table = MixedDimEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=budget, **options)
    total = table.memory_report().total_bytes
    assert 0.95 * budget <= total <= budget
    assert ratio <= 8


def test_smallest_and_largest_budgets():
    smallest = MixedDimEmbedding.planned_bytes(BUDGET_CARDS, 16, scale=0.0)
    tightest = MixedDimEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=smallest)
    assert tightest.memory_report().total_bytes == smallest
    with pytest.raises(BudgetError, match="minimum budget"):
        MixedDimEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=smallest - 1)
    # A budget above the full table buys at most the full table's bytes: the widest rows that fit in them.
    full = FullEmbedding.planned_bytes(BUDGET_CARDS, 16)
    huge = MixedDimEmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=10 * baseline_bytes(BUDGET_CARDS, 16))
    assert huge.memory_report().total_bytes <= full and huge.dims[-1] == 16


# ------------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(scale=10.0, alpha=-0.1), r"alpha.*-0\.1"),
        (dict(scale=10.0, alpha=1.5), r"alpha.*1\.5"),
        (dict(scale=10.0, alpha=float("nan")), r"alpha.*nan"),
        (dict(scale=10.0, blocks_per_field=0), r"blocks_per_field.*got 0"),
        (dict(scale=10.0, blocks_per_field=-2), r"blocks_per_field.*-2"),
        (dict(scale=10.0, blocks_per_field=2.5), r"blocks_per_field.*2\.5"),
        (dict(scale=10.0, blocks_per_field=True), r"blocks_per_field.*True"),
        (dict(scale=-1.0), r"scale.*-1\.0"),
        (dict(scale=float("inf")), r"scale.*inf"),
        (dict(scale="10"), r"scale.*'10'"),
        (dict(scale=None), r"scale.*None"),
        (dict(scale=10.0, round_dims="yes"), r"round_dims.*'yes'"),
        (dict(scale=10.0, sparse=1), r"sparse.*1"),
    ],
)
def test_bad_options_raise_naming_the_value(options, match):
    with pytest.raises(ValueError, match=match):
        MixedDimEmbedding([100, 10], 8, **options)
    if "scale" in options and options["scale"] == 10.0:
        budget_options = {k: v for k, v in options.items() if k != "scale"}
        with pytest.raises(ValueError, match=match):
            MixedDimEmbedding.from_budget([100, 10], 8, budget_bytes=10_000, **budget_options)


def test_bad_dim_in_from_budget_raises():
    with pytest.raises(ValueError, match="embedding_dim.*0"):
        MixedDimEmbedding.from_budget([100, 10], 0, budget_bytes=10_000)


def test_plan_entries_are_named_tuples():
    plan = MixedDimEmbedding([1000, 10], 8, scale=40.0, alpha=0.5).plan
    first, _, full = plan.parts
    assert isinstance(first, PlanPart) and (first.field, first.start, first.stop, first.dim, first.block) == (
        0, 0, 265, 2, 0)
    assert full.dim == 8 and full.field == 1 and full.block == 1
    block = plan.blocks[0]
    assert isinstance(block, PlanBlock) and block.field == 0 and (block.start, block.stop) == (0, 1000)
    assert block.popularity == pytest.approx(1e-3) and block.target_dim == pytest.approx(40 * 1e-3**0.5)
    assert block.projection_rows == 2 and plan.blocks[1].projection_rows == 0  # field 1: full width, no projection
    assert plan.projection_bytes == 2 * 8 * 4
