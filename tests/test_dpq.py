"""dpq.v1: the export serves exactly what the table computes, exact bytes, the straight-through gradient and
the codebook / commitment loss, budgets on the served bytes."""

import io

import pytest
import torch

from embcompress import BudgetError, build_table
from embcompress.memory import baseline_bytes
from embcompress.specs import SpecError
from embcompress.tables.dpq import DPQEmbedding, DPQExport, nearest_codes

CARDS = [300, 3, 57, 1000]


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def bags_for(table, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (table.num_fields, 5), generator=g)
    values = torch.cat([torch.randint(0, table.cardinalities[f], (int(lengths[f].sum()),), generator=g)
                        for f in range(table.num_fields)])
    return values, lengths


@pytest.mark.parametrize("parts, K", [(1, 16), (2, 256), (4, 300), (8, 7)])
def test_export_outputs_equal_the_tables_exactly(parts, K):
    table = DPQEmbedding(CARDS, 8, parts=parts, codebook_size=K)
    ids = ids_for(table)
    values, lengths = bags_for(table)
    trained = table(ids).detach()  # training mode: the value is the centroid too
    served = table.export()
    assert not served.training and not any(p.requires_grad for p in served.parameters())
    assert {n for n, _ in served.named_buffers()} == {"codes", "codebook", "offsets"}  # no query table
    assert torch.equal(served(ids), table.eval()(ids))
    assert torch.equal(served(ids), trained)
    for mode in ("sum", "mean"):
        assert torch.equal(served.forward_bags(values, lengths, mode=mode),
                           table.forward_bags(values, lengths, mode=mode))


def test_export_stays_equal_after_training():
    table = DPQEmbedding(CARDS, 8, parts=4, codebook_size=32, sparse=True)
    opts = [torch.optim.SparseAdam(table.sparse_parameters(), lr=0.05), torch.optim.Adam([table.codebook], lr=0.05)]
    for step in range(5):
        out = table(ids_for(table, seed=step))
        loss = out.pow(2).sum() + table.regularization_loss()
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    ids = ids_for(table, batch=2000, seed=9)
    assert torch.equal(table.export()(ids), table.eval()(ids))


def test_codes_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    q, cb = torch.randn(500, 2, 3, generator=g), torch.randn(2, 64, 3, generator=g)
    whole = nearest_codes(q, cb)
    assert torch.equal(torch.cat([nearest_codes(q[i : i + 7], cb) for i in range(0, 500, 7)]), whole)
    brute = ((q.unsqueeze(2) - cb.unsqueeze(0)) ** 2).sum(-1).argmin(-1)
    assert torch.equal(whole, brute)


@pytest.mark.parametrize("K, dtype, itemsize", [(256, torch.uint8, 1), (257, torch.int16, 2),
                                                 (32_768, torch.int16, 2), (32_769, torch.int32, 4)])
def test_codes_dtype_and_serving_bytes(K, dtype, itemsize):
    table = DPQEmbedding([20, 5], 4, parts=2, codebook_size=K)
    served = table.export()
    assert served.codes.dtype == dtype and served.codes.shape == (25, 2)
    expected = 25 * 2 * itemsize + K * 4 * 4 + 2 * 8  # codes, codebook [2, K, 2] fp32, int64 offsets [2]
    assert table.memory_report().serving_bytes == expected == served.memory_report().total_bytes
    assert DPQEmbedding.planned_bytes([20, 5], 4, parts=2, codebook_size=K) == expected


def test_training_bytes_hand_count():
    table = DPQEmbedding([10, 3, 7], 4, parts=2, codebook_size=5)
    stored = 20 * 4 * 4 + 2 * 5 * 2 * 4 + 3 * 8  # queries, codebook, offsets
    opt = torch.optim.Adam(table.parameters(), lr=0.01)
    (table(torch.tensor([[1, 2, 3]])).sum() + table.regularization_loss()).backward()
    opt.step()
    report = table.memory_report([opt])
    assert report.total_bytes == stored
    # Adam: two fp32 moments per parameter and one fp32 step counter per parameter
    assert report.training_bytes == stored + 2 * (20 * 4 + 2 * 5 * 2) * 4 + 2 * 4
    assert report.serving_bytes == 20 * 2 + 2 * 5 * 2 * 4 + 3 * 8
    assert report.ratio == pytest.approx(20 * 4 * 4 / report.serving_bytes)


def test_straight_through_gradient_reaches_queries_and_codebook():
    table = DPQEmbedding(50, 4, parts=2, codebook_size=8)
    ids = torch.tensor([3, 7, 3, 41])
    upstream = torch.randn(4, 4)
    (table(ids) * upstream).sum().backward()
    expected = torch.zeros(50, 4).index_add_(0, ids, upstream)
    assert torch.equal(table.queries.grad, expected)  # the identity through the quantiser
    codes = table.codes_of(ids, torch.tensor(0))
    cb_expected = torch.zeros(2, 8, 2)
    for j in range(2):
        cb_expected[j].index_add_(0, codes[:, j], upstream[:, 2 * j : 2 * j + 2])
    torch.testing.assert_close(table.codebook.grad, cb_expected)  # the chosen centroids only


def test_regularisation_is_the_codebook_and_commitment_loss():
    table = DPQEmbedding(50, 4, parts=2, codebook_size=8, beta=0.5)
    assert table.regularization_loss().item() == 0  # before any forward: zero, so a loop knows there is one
    ids = torch.tensor([3, 7, 3, 41])
    table(ids)
    loss = table.regularization_loss()
    uniq = torch.tensor([3, 7, 41])
    q = table.queries[ids].view(4, 2, 2)  # the mean over every lookup (id 3 twice), as the reference's
    c = table.export()(ids).view(4, 2, 2)
    expected = (c - q).pow(2).mean() * 1.5
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert table.codebook.grad.abs().sum() > 0 and table.queries.grad[uniq].abs().sum() > 0
    assert table.regularization_loss().item() == 0  # it resets
    with torch.no_grad():
        table(ids)
    table.eval()(ids)
    assert table.regularization_loss().item() == 0  # no term from evaluation


def test_terms_of_one_step_add_up_and_an_optimizer_step_starts_a_new_sum():
    table = DPQEmbedding(50, 4, parts=2, codebook_size=8)
    opt = torch.optim.SGD(table.parameters(), lr=0.1)
    table(torch.tensor([1]))
    first = table._pending.detach().clone()
    table(torch.tensor([2]))
    both = table._pending.detach().clone()
    assert both > first
    both_loss = table.regularization_loss()
    both_loss.backward()
    opt.step()
    table(torch.tensor([1]))
    table(torch.tensor([2]))  # no regularization_loss call in between: the old sum was dropped at the step
    opt.zero_grad()
    (table(torch.tensor([5])).sum()).backward()
    opt.step()
    table(torch.tensor([6]))
    q = table.queries[6].view(2, 2)
    c = table.eval()(torch.tensor([6])).view(2, 2)
    torch.testing.assert_close(table.regularization_loss(), (c - q).pow(2).mean() * 1.25)


def test_commitment_loss_is_positive_and_decreases():
    torch.manual_seed(0)
    table = DPQEmbedding(200, 8, parts=2, codebook_size=16)
    opt = torch.optim.Adam(table.parameters(), lr=0.02)
    ids = torch.arange(200)
    losses = []
    for _ in range(20):
        table(ids)
        loss = table.regularization_loss()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(v > 0 for v in losses)
    assert losses[-1] < 0.5 * losses[0]
    assert all(b <= a * 1.05 for a, b in zip(losses, losses[1:]))


@pytest.mark.parametrize("ratio", [4.5, 6, 8, 12, 16, 20, 40, 56])
def test_budget_binds_the_served_bytes(ratio):
    cards = [100_000, 20_000, 3_000, 500, 40, 3]
    budget = baseline_bytes(cards, 16) / ratio
    table = DPQEmbedding.from_budget(cards, 16, budget_bytes=budget, codebook_size=256)
    served = table.memory_report().serving_bytes
    assert served <= budget
    assert served == DPQEmbedding.planned_bytes(cards, 16, parts=table.parts)
    larger = [p for p in (1, 2, 4, 8, 16) if p > table.parts]
    if larger:  # the largest step within the budget
        assert DPQEmbedding.planned_bytes(cards, 16, parts=larger[0]) > budget
    assert table.memory_report().total_bytes > served  # the query table trains, but is not served


def test_budget_errors_name_the_minimum():
    cards = [100_000, 20_000]
    with pytest.raises(BudgetError, match=r"dpq.v1: .*minimum budget 136,400 bytes"):
        DPQEmbedding.from_budget(cards, 16, budget_bytes=baseline_bytes(cards, 16) / 64)
    assert DPQEmbedding.from_budget(cards, 16, budget_bytes=136_400).parts == 1  # 120,000 codes + 16,384 + 16
    with pytest.raises(SpecError, match="parts"):
        build_table({"type": "dpq.v1", "parts": 2, "budget_bytes": 10**6}, cards, 16)


def test_options_are_checked():
    with pytest.raises(ValueError, match=r"dpq.v1: parts=3 must divide embedding_dim=8"):
        DPQEmbedding(CARDS, 8, parts=3)
    with pytest.raises(ValueError, match=r"dpq.v1: codebook_size must be .*0"):
        DPQEmbedding(CARDS, 8, codebook_size=0)
    with pytest.raises(ValueError, match=r"dpq.v1: beta must be .*-1"):
        DPQEmbedding(CARDS, 8, beta=-1.0)
    with pytest.raises(ValueError, match=r"dpq.v1: the export serves fp32 codebooks"):
        DPQEmbedding(CARDS, 8).export("int8")


def test_export_state_dict_round_trip():
    table = DPQEmbedding(CARDS, 8, parts=4, codebook_size=300)
    served = table.export()
    buf = io.BytesIO()
    torch.save(served.state_dict(), buf)
    buf.seek(0)
    fresh = DPQExport(CARDS, 8, parts=4, codebook_size=300)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    ids = ids_for(table)
    assert torch.equal(fresh(ids), served(ids))
    with pytest.raises(ValueError, match="codebook_size"):  # a checkpoint of another layout is refused
        DPQExport(CARDS, 8, parts=4, codebook_size=256).load_state_dict(served.state_dict())
    with pytest.raises(BudgetError):
        DPQExport.from_budget(CARDS, 8, budget_bytes=10**6)


def test_init_std_and_meta():
    table = DPQEmbedding([20_000, 500], 16, parts=4, init_std=0.05)
    out = table(ids_for(table, batch=20_000))
    assert abs(out.std().item() / 0.05 - 1) < 0.1
    with torch.device("meta"):
        meta = DPQEmbedding([2**40], 16, parts=1)
    assert meta.serving_bytes() == 2**40 + 256 * 16 * 4 + 8
