"""qr.v1: complementary partitions, exact integer rows, composition, init scale, bags and budgets."""

import itertools
import math

import pytest
import torch

from embcompress import BudgetError, build_table
from embcompress.memory import baseline_bytes
from embcompress.tables.full import FullEmbedding
from embcompress.tables.qr import QREmbedding, partition_indices, partition_plan, sub_dims

BUDGET_CARDS = [100_000, 20_000, 3_000, 500, 40, 3]


def combos_are_unique(parts: torch.Tensor) -> bool:
    """True when no two rows of ``parts`` ``[N, k]`` are equal."""
    return torch.unique(parts, dim=0).shape[0] == parts.shape[0]


def digits(ids: torch.Tensor, plan) -> torch.Tensor:
    divisors, moduli = (torch.tensor(v, dtype=torch.int64) for v in plan)
    return partition_indices(ids, divisors, moduli)


# ----------------------------------------------------------------------------------- complementary partitions
@pytest.mark.parametrize("scheme", ["qr", "crt"])
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 7, 64, 1000, 4099])
@pytest.mark.parametrize("c", [1, 2, 3, 10, 64, 5000])
def test_every_id_has_a_unique_combination_exhaustively(scheme, k, n, c):
    plan = partition_plan(n, c, scheme, k)
    divisors, moduli = plan
    assert len(moduli) == k and math.prod(moduli) >= n
    if scheme == "crt":
        assert all(math.gcd(a, b) == 1 for a, b in itertools.combinations(moduli, 2))
        assert set(divisors) == {1}
    parts = digits(torch.arange(n), plan)
    assert bool((parts >= 0).all()) and bool((parts < torch.tensor(moduli)).all())
    assert combos_are_unique(parts)


@pytest.mark.parametrize("options", [
    dict(), dict(scheme="crt"), dict(partitions=3), dict(partitions=3, operation="concat"), dict(operation="add"),
])
def test_table_rows_are_unique_per_field_and_stay_in_the_field(options):
    cards = [5000, 150, 777]
    table = QREmbedding(cards, 4, collisions=[13, 4, 30], threshold=100, **options)
    used = []  # per field, the (weight, row) pairs it reads; concat keeps the first D % k partitions apart
    for f, n in enumerate(cards):
        rows = table.partition_rows(torch.arange(n), torch.tensor(f))
        assert combos_are_unique(rows)
        used.append({(int(j < table.num_wide), r) for j in range(rows.shape[1]) for r in rows[:, j].tolist()})
    assert all(not (a & b) for a, b in itertools.combinations(used, 2)), "fields must not share rows"
    stored = table.weight.shape[0] + (table.weight_wide.shape[0] if table.weight_wide is not None else 0)
    assert sum(map(len, used)) == stored, "every stored row is read by some id"


@pytest.mark.parametrize("scheme, k, c", [("qr", 2, 3163), ("qr", 2, 17), ("qr", 3, 216), ("crt", 2, 3163),
                                          ("crt", 3, 215), ("crt", 4, 50)])
def test_ten_million_ids_keep_unique_combinations(scheme, k, c):
    n = 10**7
    with torch.device("meta"):  # the plan is known without allocating any table
        table = QREmbedding(n, 16, collisions=c, scheme=scheme, partitions=k)
    plan = table.plans[0]
    divisors, moduli = plan
    assert plan == partition_plan(n, c, scheme, k)
    assert math.prod(moduli) >= n
    if scheme == "qr":  # mixed radix: the digits are a positional representation, so x is recovered exactly
        assert list(divisors) == [math.prod(moduli[:j]) for j in range(k)]
    else:  # Chinese remainder theorem: pairwise coprime moduli with product >= n
        assert all(math.gcd(a, b) == 1 for a, b in itertools.combinations(moduli, 2))
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([torch.randint(0, n, (200_000,), generator=g), torch.arange(n - 5000, n), torch.arange(5000)])
    ids = torch.unique(ids)
    parts = digits(ids, plan)
    assert bool((parts < torch.tensor(moduli)).all())
    assert combos_are_unique(parts)
    if scheme == "qr":
        assert torch.equal((parts * torch.tensor(divisors)).sum(-1), ids)


def test_ids_above_2_pow_24_map_to_the_exact_quotient_and_remainder():
    c = 2**17 + 3
    n = 2**34 + 11
    table = QREmbedding(n, 1, collisions=c)
    q_rows = -(-n // c)
    assert table.plans[0] == ((1, c), (c, q_rows))
    xs = [2**24 + 1, 2**24 + 3, 2**31 - 1, 2**31 + 7, 2**33 + 12_345, n - 1]
    rows = table.partition_rows(torch.tensor(xs), torch.tensor(0))
    expected = [[x % c, c + x // c] for x in xs]  # Python ints; the remainder table comes first
    assert rows.tolist() == expected
    out = table(torch.tensor(xs))[:, 0]
    w = table.weight[:, 0]
    assert torch.equal(out, torch.stack([w[r] * w[q] for r, q in expected]))
    # Ids beyond 2**53, where float64 division is not exact either: three partitions keep the table small.
    c = 2**20 + 7
    table = QREmbedding(2**60, 1, collisions=c, partitions=3)
    xs = [2**53 + 1, 2**60 - 1, 2**59 + 2**40 + 5]
    rows = table.partition_rows(torch.tensor(xs), torch.tensor(0)).tolist()
    top = -(-(2**60) // c**2)
    assert table.plans[0] == ((1, c, c * c), (c, c, top))
    assert rows == [[x % c, c + (x // c) % c, 2 * c + x // c**2] for x in xs]
    # Without a table: ids up to 2**62.
    big_c = 2**30 + 7
    plan = partition_plan(2**62 + 5, big_c)
    xs = [2**53 + 1, 2**62 + 3, 2**62 - 1]
    assert digits(torch.tensor(xs), plan).tolist() == [[x % big_c, x // big_c] for x in xs]


# --------------------------------------------------------------------------------------------- composition
def set_weights(table: QREmbedding) -> None:
    with torch.no_grad():
        for w in (table.weight, table.weight_wide):
            if w is not None:
                w.copy_(torch.arange(w.numel(), dtype=torch.float32).view_as(w) / 7 - 3)


def test_operations_follow_their_formula_on_a_hand_example():
    n, c, x = 40, 6, 29  # q = 4, r = 5
    for op in ("mult", "add"):
        t = QREmbedding(n, 3, collisions=c, operation=op, threshold=0)
        set_weights(t)
        assert t.partition_rows(torch.tensor(x), torch.tensor(0)).tolist() == [5, 6 + 4]
        r, q = t.weight[5], t.weight[10]
        expected = r * q if op == "mult" else r + q
        torch.testing.assert_close(t(torch.tensor([x]))[0], expected)
    t = QREmbedding(n, 5, collisions=c, operation="concat", threshold=0)
    set_weights(t)
    assert sub_dims(5, 2, "concat") == (3, 2)
    assert t.weight_wide.shape == (6, 3) and t.weight.shape == (7, 2)
    torch.testing.assert_close(t(torch.tensor([x]))[0], torch.cat([t.weight_wide[5], t.weight[4]]))
    # three factors: 29 = 1 + 3*(1 + 3*3) with radices (3, 3, ceil(40 / 9) = 5)
    t = QREmbedding(n, 2, collisions=3, partitions=3, threshold=0)
    set_weights(t)
    assert t.plans[0] == ((1, 3, 9), (3, 3, 5))
    w = t.weight
    torch.testing.assert_close(t(torch.tensor([x]))[0], w[2] * w[3 + 0] * w[6 + 3])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dim", [4, 5, 7, 16, 17])
def test_concat_sub_dims_sum_to_the_embedding_dim(k, dim):
    dims = sub_dims(dim, k, "concat")
    assert sum(dims) == dim and max(dims) - min(dims) <= 1 and len(dims) == k
    t = QREmbedding([1000, 30], dim, collisions=9, partitions=k, operation="concat", sparse=True)
    assert t(torch.tensor([[999, 29], [0, 0]])).shape == (2, 2, dim)
    stored = sum(p.numel() for p in t.parameters())
    assert stored == sum(m * d for m, d in zip(t.plans[0][1], dims)) + 30 * dim  # no padding anywhere
    assert len(t.sparse_parameters()) == (2 if dim % k else 1)


@pytest.mark.parametrize("op", ["mult", "add", "concat"])
def test_threshold_fields_keep_a_full_table(op):
    cards = [1000, 200, 13]
    t = QREmbedding(cards, 4, collisions=10, operation=op)  # default threshold 200: fields 1 and 2 are full
    assert t.full.tolist() == [False, True, True]
    qr_floats = sum(m * d for m, d in zip(t.plans[0][1], sub_dims(4, 2, op)))  # (10 + 100) rows
    assert sum(p.numel() for p in t.parameters()) == qr_floats + (200 + 13) * 4
    for f, n in [(1, 200), (2, 13)]:
        ids = torch.zeros(n, 3, dtype=torch.long)
        ids[:, f] = torch.arange(n)
        out = t(ids)[:, f]
        if op == "concat":
            off = t.offsets[f]
            expected = torch.cat([t.weight[off[0] + torch.arange(n)], t.weight[off[1] + torch.arange(n)]], dim=1)
        else:
            expected = t.weight[t.offsets[f, 0] + torch.arange(n)]
        assert torch.equal(out, expected)
    with pytest.raises(ValueError, match=r"'field2'.*13"):
        t(torch.tensor([[0, 0, 13]]))


@pytest.mark.parametrize("op, k", [("mult", 2), ("add", 2), ("mult", 3)])
def test_full_fields_return_their_row_bit_exactly_even_where_the_composed_branch_overflows(op, k):
    # A full field's partitions all read its one row; its "composed" value (row**k, k * row) overflows to inf for
    # 3e38, and a blend such as lerp(inf, row, 1) = row - (row - inf) * 0 would return NaN there.
    t = QREmbedding([1000, 13], 4, collisions=10, partitions=k, threshold=20, operation=op)
    assert t.full.tolist() == [False, True]
    full_rows = t.offsets[1, 0] + torch.arange(13)
    with torch.no_grad():
        t.weight[full_rows] = torch.randn(13, 4) / 3
        t.weight[full_rows[5]] = torch.tensor([3e38, -3e38, 1e-45, 1 / 3])
    ids = torch.tensor([[999, 5], [3, 12], [0, 0]])
    out = t(ids)
    assert torch.equal(out[:, 1], t.weight[t.offsets[1, 0] + ids[:, 1]])
    assert torch.isfinite(out[:, 0]).all()
    # A full row's gradient is the output's, exactly: nothing comes through the composed branch (checked on rows
    # whose partial products stay finite; 0 * inf in the product's backward would be NaN whatever the select).
    t(ids[1:])[:, 1].sum().backward()
    expected = torch.zeros(13, 4)
    expected[[12, 0]] = 1.0
    assert torch.equal(t.weight.grad[full_rows], expected)


@pytest.mark.parametrize("options", [
    dict(), dict(operation="add"), dict(operation="concat"), dict(partitions=3), dict(partitions=3, scheme="crt"),
    dict(partitions=3, operation="add"), dict(partitions=4, operation="concat"),
])
def test_composed_vectors_start_at_the_full_table_scale(options):
    dim = 16
    t = QREmbedding([100_000, 150], dim, collisions=[20, 1], **options)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (20_000,), generator=g) for n in (100_000, 150)], 1)
    out = t(ids).detach()
    for f in range(2):
        std = float(out[:, f].std())
        assert std == pytest.approx(dim**-0.5, rel=0.2), (f, std)
    if options.get("operation", "mult") == "mult":  # every sub-table weight is zero-mean: no all-positive init
        assert float((t.weight < 0).float().mean()) == pytest.approx(0.5, abs=0.05)


def test_bags_compose_per_id_then_pool():
    t = QREmbedding([1000, 50], 8, collisions=10, threshold=20)
    values = torch.tensor([123, 456, 789, 7, 8])  # field 0: one bag {123, 456, 789}; field 1: one bag {7, 8}
    lengths = torch.tensor([[3], [2]])
    out = t.forward_bags(values, lengths)[0]
    per_id = t(torch.tensor([[123, 7], [456, 8], [789, 7]]))[:, 0]
    torch.testing.assert_close(out[0], per_id.sum(0))
    rows = t.partition_rows(values[:3], torch.tensor(0))
    pooled_first = t.weight[rows[:, 0]].sum(0) * t.weight[rows[:, 1]].sum(0)  # the public code's semantics
    assert not torch.allclose(out[0], pooled_first, atol=1e-3)
    torch.testing.assert_close(out[1], t(torch.tensor([[0, 7], [0, 8]]))[:, 1].sum(0))


# ------------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("options", [dict(), dict(operation="concat"), dict(scheme="crt", operation="add")])
@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256])
def test_from_budget_lands_within_five_percent_or_names_the_smallest_budget(ratio, options):
    budget = baseline_bytes(BUDGET_CARDS, 16) / ratio
    try:
        t = QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=budget, **options)
    except BudgetError as err:
        msg = str(err)
        assert "qr.v1" in msg and "minimum budget" in msg
        smallest = int(msg.split("minimum budget ")[1].split(" ")[0].replace(",", ""))
        assert smallest > budget
        at_min = QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=smallest, **options)
        assert at_min.memory_report().total_bytes == smallest  # the named budget is reachable
        with pytest.raises(BudgetError):
            QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=smallest - 1, **options)
        return
    total = t.memory_report().total_bytes
    assert total <= budget and (ratio == 2 or 0.95 * budget <= total)  # 2x: the coarse steps described above
    assert t.full.tolist() == [n <= 200 for n in BUDGET_CARDS]


def test_from_budget_default_options_reach_64x_and_refuse_256x():
    base = baseline_bytes(BUDGET_CARDS, 16)
    assert QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 64).memory_report().ratio >= 64
    with pytest.raises(BudgetError, match="minimum budget"):
        QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 256)


def test_from_budget_prefers_fewer_collisions_for_bigger_budgets():
    base = baseline_bytes(BUDGET_CARDS, 16)
    small = QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 16)
    large = QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=base / 4)
    assert large.plans[0][0][1] < small.plans[0][0][1]  # the quotient divisor of the largest field


def test_coarse_budget_builds_the_largest_table_under_it():
    # At 2x, two partitions move in coarse steps (c + ceil(n / c) rows): c = 2 is over the budget, c = 3 lands
    # far under it. A budget is a ceiling, so the c = 3 table is built (the report marks it as under target).
    budget = baseline_bytes(100_000, 16) / 2
    t = QREmbedding.from_budget(100_000, 16, budget_bytes=budget)
    assert t.plans[0][0] == (1, 3) and t.memory_report().total_bytes <= budget
    assert QREmbedding.planned_bytes(100_000, 16, collisions=2) > budget


def test_build_table_spec_and_budget():
    t = build_table({"type": "qr.v1", "budget_bytes": baseline_bytes(BUDGET_CARDS, 8) / 8, "operation": "add"},
                    BUDGET_CARDS, 8)
    assert isinstance(t, QREmbedding) and t.operation == "add"


# ------------------------------------------------------------------------------------------- bad options
@pytest.mark.parametrize("options, pattern", [
    (dict(collisions=0), "collisions.*0"),
    (dict(collisions=True), "collisions.*True"),
    (dict(collisions=[3, 4]), "collisions has 2 entries for 3 fields"),
    (dict(collisions=[3, 4, -1]), "collisions of field 2.*-1"),
    (dict(collisions="4"), "collisions.*'4'"),
    (dict(scheme="mixed"), "scheme.*'mixed'"),
    (dict(partitions=1), "partitions.*1"),
    (dict(partitions=2.0), r"partitions.*2\.0"),
    (dict(operation="dot"), "operation.*'dot'"),
    (dict(operation="concat", partitions=9), "embedding_dim=8.*partitions=9"),
    (dict(threshold=-1), "threshold.*-1"),
])
def test_bad_options_raise_and_name_the_value(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        QREmbedding([1000, 300, 20], 8, **options)


@pytest.mark.parametrize("args, pattern", [
    ((0, 4), "n must be an int >= 1, got 0"), ((10, 0), "collisions must be an int >= 1, got 0"),
    ((10, 2, "qr", 1), "partitions must be an int >= 2, got 1"), ((10, 2, "mod"), "scheme.*'mod'"),
])
def test_partition_plan_rejects_bad_arguments(args, pattern):
    with pytest.raises(ValueError, match=pattern):
        partition_plan(*args)


def test_all_full_tables_say_they_cannot_compress():
    with pytest.raises(BudgetError, match="qr.v1.*minimum budget"):
        QREmbedding.from_budget([40, 3], 8, budget_bytes=baseline_bytes([40, 3], 8) / 4)
    # All-full QR stores every row plus its plans: more than the full table, which no budget buys.
    assert QREmbedding.planned_bytes([40, 3], 8) > FullEmbedding.planned_bytes([40, 3], 8)
    with pytest.raises(BudgetError, match="above the full table's 1,392 bytes"):
        QREmbedding.from_budget([40, 3], 8, budget_bytes=baseline_bytes([40, 3], 8) * 2)


def test_bad_options_raise_in_from_budget_too():
    with pytest.raises(ValueError, match="operation.*'dot'"):
        QREmbedding.from_budget(BUDGET_CARDS, 16, budget_bytes=10**6, operation="dot")


# ------------------------------------------------------------------------------------------------- misc
@pytest.mark.parametrize("options", [
    dict(), dict(operation="add"), dict(operation="concat"), dict(operation="concat", partitions=3),
    dict(scheme="crt", partitions=3), dict(threshold=10**6),
])
def test_every_layout_handles_batches_bags_and_sparse_training(options):
    cards = [1000, 3, 57, 400]
    t = QREmbedding(cards, 7, collisions=5, sparse=True, **options)
    ids = torch.tensor([[999, 2, 56, 399], [0, 0, 0, 0]])
    assert t(ids.view(1, 2, 4)).shape == (1, 2, 4, 7)
    assert t(torch.empty(0, 4, dtype=torch.long)).shape == (0, 4, 7)
    single = QREmbedding(500, 7, collisions=5, **options)
    assert single(torch.tensor([[0, 499], [7, 7]])).shape == (2, 2, 7)
    bags = t.forward_bags(torch.tensor([1, 2, 0, 5, 6, 7]), torch.tensor([[2, 0], [1, 0], [1, 1], [0, 1]]), mode="mean")
    torch.testing.assert_close(bags[0, 0], t(torch.tensor([[1, 0, 0, 0], [2, 0, 0, 0]]))[:, 0].mean(0))
    opt = torch.optim.SparseAdam(t.sparse_parameters(), lr=0.1)
    before = t(ids).detach()
    t(ids).pow(2).sum().backward()
    assert all(p.grad.is_sparse for p in t.sparse_parameters())
    opt.step()
    assert not torch.equal(t(ids), before)


def test_meta_device_plan_matches_real_table_bytes():
    kwargs = dict(collisions=[7, 3, 1], operation="concat", partitions=3)
    real = QREmbedding([5000, 300, 9], 7, **kwargs)
    assert QREmbedding.planned_bytes([5000, 300, 9], 7, **kwargs) == real.memory_report().total_bytes
