"""tt_rec.v1: TT cores, the chain product, TT-SVD round trip, init scale, layout, gradients and budgets."""

import io
import math

import pytest
import torch

from embcompress import BudgetError, build_table
from embcompress.contract import IdError
from embcompress.memory import baseline_bytes
from embcompress.tables.tt_rec import TTRecEmbedding, dim_factors, row_factors, tt_decompose, tt_field_bytes

CRITEO_LIKE = [200_000, 50_000, 8_000, 1_500, 300, 60, 4]


def explicit_row(table: TTRecEmbedding, field: int, x: int) -> torch.Tensor:
    """The row of id ``x`` written out as the TT chain sum over both rank indices (float64)."""
    n1, n2, n3 = (int(m) for m in table.moduli[field])
    i1, i2, i3 = x // (n2 * n3), (x // n3) % n2, x % n3
    d1, d2, d3 = table.dims
    r = table.ranks[field]
    g1, g2, g3 = (c.detach().double() for c in table.field_cores(field))
    a = g1[i1].view(d1, r)
    b = g2[i2].view(r, d2, r)
    c = g3[i3].view(r, d3)
    return torch.einsum("ak,kbl,lc->abc", a, b, c).reshape(-1)


# ------------------------------------------------------------------------------------------------ factors
@pytest.mark.parametrize("n", [1, 2, 7, 8, 9, 100, 999, 1000, 1001, 12_345, 10**6, 2**24 + 8, 10**9])
def test_row_factors_cover_n_with_little_padding_and_the_smallest_in_the_middle(n):
    n1, n2, n3 = row_factors(n)
    assert n1 * n2 * n3 >= n
    assert n2 == min(n1, n2, n3)
    if n >= 1000:
        assert n1 * n2 * n3 <= n * 1.1


@pytest.mark.parametrize("D, expected", [(1, (1, 1, 1)), (4, (2, 1, 2)), (8, (2, 2, 2)), (16, (4, 2, 2)),
                                         (7, (7, 1, 1)), (64, (4, 4, 4)), (12, (3, 2, 2))])
def test_dim_factors_multiply_to_D(D, expected):
    assert dim_factors(D) == expected and math.prod(expected) == D


# ----------------------------------------------------------------------------------------------- the math
def test_a_row_equals_the_explicit_core_product():
    cards = [5000, 150, 777, 30]
    table = TTRecEmbedding(cards, 8, rank=[6, 3, 4, 5], threshold=100)  # three rank groups and a plain field
    assert table.ranks == (6, 3, 4, 0) and table.group_ranks == (3, 4, 6)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randint(0, n, (12,), generator=g) for n in cards], 1)
    ids[0] = torch.tensor([n - 1 for n in cards])
    out = table(ids).double()
    for f in range(3):
        for b in range(ids.shape[0]):
            torch.testing.assert_close(out[b, f], explicit_row(table, f, int(ids[b, f])), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out[:, 3], table.rows[ids[:, 3] + int(table.offsets[3, 0])].double())


@pytest.mark.parametrize("n, D", [(60, 8), (64, 8), (97, 4), (210, 12)])
def test_full_rank_tt_of_a_small_matrix_reproduces_it_exactly(n, D):
    g = torch.Generator().manual_seed(n)
    matrix = torch.randn(n, D, generator=g, dtype=torch.float64)
    (n1, n2, n3), (d1, d2, d3) = row_factors(n), dim_factors(D)
    full_rank = max(min(n1 * d1, n2 * d2 * n3 * d3), min(n1 * d1 * n2 * d2, n3 * d3))
    cores = tt_decompose(matrix, full_rank)
    table = TTRecEmbedding(n, D, rank=full_rank, threshold=0).load_field_(0, [c.float() for c in cores])
    torch.testing.assert_close(table(torch.arange(n)).double(), matrix, rtol=1e-4, atol=1e-5)
    # below the matrix's TT ranks the decomposition is a truncation: no longer exact
    low = TTRecEmbedding(n, D, rank=1, threshold=0).load_field_(0, [c.float() for c in tt_decompose(matrix, 1)])
    assert (low(torch.arange(n)).double() - matrix).abs().max() > 1e-2


def test_a_matrix_of_low_tt_rank_is_exact_at_that_rank():
    # a table built as a rank-2 TT is recovered exactly by a rank-2 TT-SVD (and with zero padding at rank 5)
    source = TTRecEmbedding(1000, 8, rank=2, threshold=0)
    matrix = source(torch.arange(1000)).detach().double()
    for rank in (2, 5):
        table = TTRecEmbedding(1000, 8, rank=rank, threshold=0)
        table.load_field_(0, [c.float() for c in tt_decompose(matrix, rank)])
        torch.testing.assert_close(table(torch.arange(1000)).double(), matrix, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rank", [1, 4, 16, 48])
@pytest.mark.parametrize("init_std", [1e-3, 0.3])
def test_init_std_holds_at_every_rank(rank, init_std):
    # plain N(0, s) cores would give rows of std rank * s**3: 48x apart between rank 1 and rank 48
    torch.manual_seed(rank)
    table = TTRecEmbedding([30_000, 10_000], 16, rank=rank, init_std=init_std)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, n, (8_000,), generator=g) for n in table.cardinalities], 1)
    out = table(ids)
    assert abs(out.std().item() / init_std - 1) < 0.10, (rank, out.std().item())
    assert abs(out.mean().item()) < 0.05 * init_std


# ---------------------------------------------------------------------------------------------- layout
def test_bytes_follow_the_layout_and_small_fields_stay_plain():
    table = TTRecEmbedding([10**6, 5000, 150], 16, rank=[8, 4, 8], threshold=200)
    assert table.ranks == (8, 4, 0)
    expected = tt_field_bytes(10**6, 16, 8) + tt_field_bytes(5000, 16, 4) + 150 * 16 * 4 + 3 * (8 + 9 * 8)
    assert table.memory_report().total_bytes == expected
    assert tt_field_bytes(10**6, 16, 8) == 4 * 8 * (100 * 4 + 100 * 2 * 8 + 100 * 2)
    plain = TTRecEmbedding([10**3, 50], 16, rank=[0, 0])  # rank 0: plain rows only
    assert not list(plain.cores) and plain.rows.shape == (1050, 16)


def test_padding_ids_are_refused_not_clamped():
    table = TTRecEmbedding([1001, 50], 8, rank=3)
    assert math.prod(row_factors(1001)) > 1001  # slices exist for ids 1001.., but they are not ids of the field
    with pytest.raises(IdError, match=r"'field0'.*1001"):
        table(torch.tensor([[1001, 0]]))


def test_slices_are_exact_integers_above_2_pow_24():
    n = 2**40
    with torch.device("meta"):
        TTRecEmbedding(n, 8, rank=4)  # the layout is known without allocating
    table = TTRecEmbedding([2**24 + 8, 10], 8, rank=2)
    n1, n2, n3 = row_factors(2**24 + 8)
    ids = torch.tensor([2**24 + 1, 2**24 + 2, 2**24 + 7, 2**24 - 1])
    got = table._slices(ids, torch.tensor(0)) - table.offsets[0]
    expected = torch.tensor([[x // (n2 * n3), (x // n3) % n2, x % n3] for x in ids.tolist()])
    assert torch.equal(got, expected)
    rows = table(torch.stack([ids, torch.zeros_like(ids)], 1))[:, 0]
    assert len({tuple(v) for v in rows.tolist()}) == 4


def test_forward_bags_and_single_fields_agree():
    table = TTRecEmbedding([5000, 150, 777, 30], 8, rank=[6, 3, 6, 5], threshold=100)
    g = torch.Generator().manual_seed(2)
    ids = torch.stack([torch.randint(0, n, (16,), generator=g) for n in table.cardinalities], 1)
    out = table(ids)  # the column-split path
    lengths = torch.ones(4, 16, dtype=torch.long)
    bags = table.forward_bags(ids.t().reshape(-1), lengths)  # the per-id select path
    torch.testing.assert_close(bags, out)
    single = TTRecEmbedding(777, 8, rank=6)
    single.load_field_(0, [c.detach() for c in table.field_cores(2)])
    torch.testing.assert_close(single(ids[:, 2]), out[:, 2])


# ------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_core_and_the_rows():
    table = TTRecEmbedding([5000, 777, 30], 8, rank=[5, 4, 3])
    out = table(torch.tensor([[4999, 776, 29], [0, 0, 0], [1234, 5, 7]]))
    (out * torch.randn_like(out)).sum().backward()
    assert len(list(table.parameters())) == 2 * 3 + 1
    for name, p in table.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_sparse_gradients_train_with_sparse_adam():
    table = TTRecEmbedding([5000, 777, 30], 8, rank=[5, 4, 3], sparse=True)
    params = table.sparse_parameters()
    assert len(params) == len(list(table.parameters()))
    opt = torch.optim.SparseAdam(params, lr=0.05)
    ids = torch.tensor([[4999, 776, 29], [0, 0, 0]])
    target = torch.randn(2, 3, 8)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = (table(ids) - target).pow(2).mean()
        loss.backward()
        assert all(p.grad.is_sparse for p in params)
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 0.5 * first


def test_same_seed_same_outputs_and_a_reload_reproduces_them():
    ids = torch.tensor([[4999, 776, 29], [7, 8, 9]])
    torch.manual_seed(5)
    a = TTRecEmbedding([5000, 777, 30], 8, rank=4)
    torch.manual_seed(5)
    b = TTRecEmbedding([5000, 777, 30], 8, rank=4)
    assert torch.equal(a(ids), b(ids))
    c = TTRecEmbedding([5000, 777, 30], 8, rank=4)
    assert not torch.equal(a(ids), c(ids))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    c.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(a(ids), c(ids))
    with pytest.raises(ValueError, match="rank"):
        TTRecEmbedding([5000, 777, 30], 8, rank=5).load_state_dict(a.state_dict())


# ----------------------------------------------------------------------------------------------- options
@pytest.mark.parametrize("options, pattern", [
    (dict(rank=-1), r"tt_rec.v1: rank must be a non-negative int.*-1"),
    (dict(rank=2.5), r"tt_rec.v1: rank must be.*2\.5"),
    (dict(rank=[4, "4"]), r"tt_rec.v1: rank of field 1 must be.*'4'"),
    (dict(rank=[4]), r"tt_rec.v1: rank has 1 entries for 2 fields"),
    (dict(threshold=True), r"tt_rec.v1: threshold must be a non-negative int.*True"),
    (dict(sparse="yes"), r"tt_rec.v1: sparse must be a bool.*'yes'"),
    (dict(init_std=0.0), r"tt_rec.v1: init_std must be.*0\.0"),
])
def test_bad_options_name_the_option_and_value(options, pattern):
    with pytest.raises(ValueError, match=pattern):
        TTRecEmbedding([5000, 30], 8, **options)


# ----------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("ratio", [2, 16, 64, 256, 1000])
def test_budgets_at_the_issue_ratios(ratio):
    budget = baseline_bytes(CRITEO_LIKE, 16) / ratio
    try:
        table = build_table({"type": "tt_rec.v1", "budget_bytes": budget}, CRITEO_LIKE, 16)
    except BudgetError as err:
        assert "tt_rec.v1" in str(err) and "minimum budget" in str(err)
        return
    total = table.memory_report().total_bytes
    assert 0.95 * budget <= total <= budget, (ratio, table.ranks, total / budget)
    assert len(table.group_ranks) <= 2 and max(table.group_ranks) - min(table.group_ranks) <= 1
    assert table.ranks[-1] == 0  # under the threshold


def test_a_budget_under_the_smallest_table_names_the_minimum():
    with pytest.raises(BudgetError, match=r"tt_rec.v1: .*minimum budget [\d,]+ bytes"):
        TTRecEmbedding.from_budget(CRITEO_LIKE, 16, budget_bytes=2000)


def test_no_budget_stores_a_field_in_more_bytes_than_its_rows():
    for ratio in (1.2, 2, 8):
        table = TTRecEmbedding.from_budget(CRITEO_LIKE, 16, budget_bytes=baseline_bytes(CRITEO_LIKE, 16) / ratio)
        for n, r in zip(table.cardinalities, table.ranks):
            assert r == 0 or tt_field_bytes(n, 16, r) < n * 16 * 4
