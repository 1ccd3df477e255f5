"""autosrh.v1: the search stage (rows times alphas per dimension group, the L1 term on touched alphas), the prune
to the budget, retraining with the mask fixed, the served sparse rows and their bytes, budgets on the served
table, checkpoints across the stage change and the staged hook."""

import io

import pytest
import torch

from embcompress import BudgetError, build_model, build_table
from embcompress.memory import baseline_bytes
from embcompress.sparse_rows import format_bytes, smallest_format
from embcompress.specs import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic, scaled_cardinalities
from embcompress.tables.autosrh import (
    AutoSrhEmbedding, AutoSrhExport, AutoSrhSchedule, group_widths, select_pairs, served_bytes,
)
from embcompress.training import TrainConfig, regularization

CARDS = [300, 3, 57, 1000]  # 1,360 rows
N = sum(CARDS)
SYNTH_CARDS = scaled_cardinalities(SyntheticConfig().cardinality_exponent)  # the default synthetic data
# One pair of the narrowest group (2 numbers at D=16, G=6) in COO: int32 row (51,384 rows), uint8 column, fp32 value;
# 26 int64 offsets.
MINIMUM = 2 * (4 + 1 + 4) + 26 * 8


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def reloaded(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def random_alphas_(table, seed=0):
    with torch.no_grad():
        table.alpha.copy_(torch.randn(table.alpha.shape, generator=torch.Generator().manual_seed(seed)))
    return table


def expand(table, per_group: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` -> ``[..., D]``: each group's value over its dimensions."""
    return per_group.repeat_interleave(torch.tensor(table.widths), dim=-1)


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)


# ---------------------------------------------------------------------------------------------- the table
def test_group_widths_when_groups_do_not_divide_the_width():
    assert group_widths(16, 6) == (3, 3, 3, 3, 2, 2)  # the default at D=16: the first D mod G one wider
    assert group_widths(16, 4) == (4,) * 4 and group_widths(7, 7) == (1,) * 7
    assert AutoSrhEmbedding(CARDS, 16).groups == 6 and AutoSrhEmbedding(CARDS, 4).groups == 4  # min(6, D)
    assert AutoSrhEmbedding(CARDS, 16).widths == (3, 3, 3, 3, 2, 2)


def test_search_stage_scales_each_group_by_its_alpha_and_reports_its_training_bytes():
    t = random_alphas_(AutoSrhEmbedding(CARDS, 16, kept_numbers=4000))
    ids = ids_for(t)
    rows = ids + t.offsets
    assert torch.equal(t(ids), t.weight[rows] * expand(t, t.alpha[rows]))
    report = t.memory_report()
    assert report.total_bytes == N * 16 * 4 + N * 6 * 4 + 4 * 8  # rows, alphas, offsets; the mask is empty
    opt = torch.optim.Adam(t.parameters(), lr=0.1)
    t(ids).pow(2).sum().backward()
    opt.step()
    trained = t.memory_report([opt])
    assert trained.training_bytes == report.total_bytes + 2 * (N * 16 + N * 6) * 4 + 2 * 4  # 2 moments, 2 steps
    assert trained.serving_bytes == served_bytes(N, 16, 4, 4000)  # what it will serve: at most 4,000 numbers


def test_init_std_is_the_std_of_the_rows_since_alphas_start_at_one():
    t = AutoSrhEmbedding([50_000, 20_000], 16, init_std=0.05)
    assert torch.equal(t.alpha, torch.ones_like(t.alpha))
    assert abs(t(ids_for(t, 20_000)).std().item() / 0.05 - 1) < 0.05


def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"autosrh.v1: groups must be an int in \[1, 8\] or None, got 9"):
        AutoSrhEmbedding(CARDS, 8, groups=9)
    with pytest.raises(ValueError, match="groups.*got 0"):
        AutoSrhEmbedding(CARDS, 8, groups=0)
    with pytest.raises(ValueError, match="groups.*got 2.5"):
        AutoSrhEmbedding(CARDS, 8, groups=2.5)
    with pytest.raises(ValueError, match=r"kept_numbers must be an int in \[2, 21760\] or None, got 1"):
        AutoSrhEmbedding(CARDS, 16, kept_numbers=1)  # under one pair of the narrowest group (2 numbers)
    with pytest.raises(ValueError, match="kept_numbers.*got 21761"):
        AutoSrhEmbedding(CARDS, 16, kept_numbers=N * 16 + 1)
    with pytest.raises(ValueError, match="sparse must be a bool.*'no'"):
        AutoSrhEmbedding(CARDS, 16, sparse="no")
    with pytest.raises(ValueError, match="alpha_l1.*-1"):
        AutoSrhEmbedding(CARDS, 16).set_alpha_l1(-1)


# ---------------------------------------------------------------------------------------------- the L1 term
def test_the_l1_term_covers_the_touched_rows_once_each_and_then_resets():
    t = random_alphas_(AutoSrhEmbedding(CARDS, 8, groups=4))
    assert regularization(torch.nn.Sequential(t)) is not None  # the loop asks before any batch: a zero term
    ids = torch.tensor([[1, 0, 5, 7], [1, 2, 5, 9]])  # rows 1, 300, 302, 308, 365, 367, 369: row 1 and 308 twice
    t(ids)
    t.forward_bags(torch.tensor([4]), torch.tensor([[1], [0], [0], [0]]))  # one more forward: row 4
    rows = torch.unique(torch.cat([(ids + t.offsets).flatten(), torch.tensor([4])]))
    term = t.set_alpha_l1(0.5).regularization_loss()
    torch.testing.assert_close(term, 0.5 * t.alpha[rows].abs().sum())
    assert t.regularization_loss().item() == 0  # read once: the next step starts afresh
    with torch.no_grad():
        t(ids)  # no gradient, no term
    t.eval()(ids)  # eval passes are not training steps
    assert t.regularization_loss().item() == 0
    assert t.set_alpha_l1(0).regularization_loss() is None


def test_the_l1_term_shrinks_the_touched_alphas_only():
    torch.manual_seed(0)
    t = AutoSrhEmbedding(CARDS, 8, groups=4).set_alpha_l1(1.0)
    opt = torch.optim.SGD(t.parameters(), lr=0.05)
    ids = ids_for(t, batch=32)
    touched = torch.zeros(N, dtype=torch.bool)
    touched[(ids + t.offsets).flatten()] = True
    for _ in range(5):  # the L1 pull alone (a zero-weight task loss keeps the graph)
        loss = 0.0 * t(ids).sum() + t.regularization_loss()
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = t.alpha.detach()
    torch.testing.assert_close(alpha[touched], torch.full_like(alpha[touched], 1 - 5 * 0.05))
    assert torch.equal(alpha[~touched], torch.ones_like(alpha[~touched]))  # untouched rows pay nothing


def test_a_short_training_with_the_l1_term_moves_the_alphas_below_their_init():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    from embcompress.training import train

    means = {}
    for l1 in (0.0, 1e-5):  # none, and the benchmark's
        torch.manual_seed(0)
        table = AutoSrhEmbedding(data.cardinalities, 8).set_alpha_l1(l1)
        model = build_model({"type": "lr.v1"}, table, data.num_dense)
        train(model, data, TrainConfig(epochs=1, batch_size=500, lr=0.01, progress=False))
        alpha = table.alpha.detach()
        moved = alpha != 1
        assert moved.float().mean() > 0.1  # the rows the epoch read move from their init
        means[l1] = float(alpha[moved].abs().mean())
    assert means[1e-5] < means[0.0] - 0.01  # the L1 term pulls them down (Adam: its sign, not its size, counts)


# ---------------------------------------------------------------------------------------------- the prune
def test_select_pairs_with_equal_widths_keeps_exactly_the_largest():
    alpha = torch.randn(50, 4, generator=torch.Generator().manual_seed(3))
    keep, numbers = select_pairs(alpha, (2, 2, 2, 2), 61)
    assert numbers == 60 and int(keep.sum()) == 30  # floor(61 / 2) pairs
    assert alpha.abs()[keep].min() > alpha.abs()[~keep].max()


def test_the_prune_keeps_the_largest_alpha_pairs_and_meets_the_budget():
    t = random_alphas_(AutoSrhEmbedding(CARDS, 16, kept_numbers=5001))  # widths 3, 3, 3, 3, 2, 2
    budget = t.serving_bytes()
    weight, alpha = t.weight.detach().clone(), t.alpha.detach().clone()
    ids = ids_for(t)
    before = t(ids).detach()
    stats = t.prune_()
    keep = t.keep.bool()
    width = torch.tensor(t.widths).expand_as(keep)
    assert stats["kept_numbers"] == int(width[keep].sum()) == 5001 == t.kept  # a narrow pair fills the rest
    assert stats["kept_pairs"] == int(keep.sum()) and stats["pairs"] == N * 6
    # Every pruned pair that ranks above a kept one is wider: skipped because it did not fit what was left.
    a = alpha.abs()
    ranked_above = a[~keep][:, None] > a[keep][None, :]
    assert bool((width[~keep][:, None] > width[keep][None, :])[ranked_above].all())
    assert int(ranked_above.sum()) < N  # ... which happens at the budget's edge only
    # The alphas are folded into the kept groups, bit for bit; the pruned groups are zero.
    mask = expand(t, keep)
    assert torch.equal(t.weight.detach()[mask], (weight * expand(t, alpha))[mask])
    assert bool((t.weight.detach()[~mask] == 0).all()) and t.alpha.numel() == 0
    assert t.memory_report().total_bytes == N * 16 * 4 + N * 6 * 1 + 4 * 8  # rows, the uint8 mask, offsets
    out = t(ids).detach()
    assert torch.equal(out[mask[ids + t.offsets]], before[mask[ids + t.offsets]])
    assert t.serving_bytes() <= budget
    assert len(stats["field_mean_width"]) == 4 and len(stats["group_kept_fraction"]) == 6
    assert sum(w * c for w, c in zip(stats["field_mean_width"], CARDS)) == pytest.approx(5001, abs=0.5)  # rounded
    assert t.regularization_loss() is None
    with pytest.raises(ValueError, match="pruned already"):
        t.prune_()


def test_masked_groups_stay_zero_in_retraining():
    for sparse in (False, True):
        torch.manual_seed(0)
        t = random_alphas_(AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=4, sparse=sparse))
        t.prune_()
        mask = expand(t, t.keep.bool())
        kept_before = t.weight.detach()[mask].clone()
        params = [p for p in t.parameters() if p.requires_grad]
        assert params == [t.weight] and t.sparse_parameters() == ([t.weight] if sparse else [])
        opt = (torch.optim.SparseAdam if sparse else torch.optim.Adam)(params, lr=0.05)
        for step in range(5):
            ids = ids_for(t, seed=step)
            out = t(ids)
            assert bool((out[~mask[ids + t.offsets]] == 0).all())
            opt.zero_grad()
            (out - 1).pow(2).sum().backward()
            opt.step()
        assert bool((t.weight.detach()[~mask] == 0).all())  # no gradient reaches a pruned group
        assert not torch.equal(t.weight.detach()[mask], kept_before)  # the kept ones retrain


# ---------------------------------------------------------------------------------------------- served table
def _retrained(kept_numbers, dim=16, groups=4, steps=3):
    torch.manual_seed(0)
    t = random_alphas_(AutoSrhEmbedding(CARDS, dim, kept_numbers=kept_numbers, groups=groups))
    t.prune_()
    opt = torch.optim.Adam(t.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        t(ids_for(t, seed=10 + step)).sin().sum().backward()
        opt.step()
    return t


def test_export_serves_the_retrained_outputs_bit_for_bit_and_its_bytes_by_hand():
    t = _retrained(8000)
    served = t.export()
    assert isinstance(served, AutoSrhExport) and not any(p.requires_grad for p in served.parameters())
    ids = ids_for(t, batch=512)
    assert torch.equal(bits(served(ids)), bits(t.eval()(ids)))
    # 2,000 pairs of 4 numbers. Bitmap: int32 row pointers [1361], 2 uint8 of bits per row (D=16), 8,000 fp32
    # values; 4 int64 offsets.
    assert served.format == "bitmap"
    by_hand = 1361 * 4 + 1360 * 2 + 8000 * 4 + 4 * 8
    assert served.memory_report().total_bytes == t.serving_bytes() == by_hand
    assert AutoSrhEmbedding.planned_bytes(CARDS, 16, kept_numbers=8000, groups=4) == by_hand  # planned = served
    for mode in ("sum", "mean"):  # multi-hot bags through both
        lengths = torch.tensor([[2, 0, 1], [1, 3, 1], [0, 0, 2], [1, 1, 1]])
        g = torch.Generator().manual_seed(1)
        values = torch.cat([torch.randint(0, CARDS[f], (int(lengths[f].sum()),), generator=g) for f in range(4)])
        weights = torch.rand(values.shape, generator=g)
        assert torch.equal(bits(served.forward_bags(values, lengths, mode=mode, weights=weights)),
                           bits(t.forward_bags(values, lengths, mode=mode, weights=weights)))


def test_few_kept_numbers_are_served_as_coo_and_the_bytes_follow_the_format():
    t = _retrained(500, groups=None)  # widths 3, 3, 3, 3, 2, 2
    served = t.export()
    # COO: int16 row (1,360 rows), uint8 column, fp32 value per number; the bitmap would pay 2 bytes per row
    assert served.format == "coo" and t.kept in (499, 500)  # a 1-number gap no pair fills may be left
    nnz = served.rows.nnz
    assert served.memory_report().total_bytes == t.serving_bytes() == nnz * (2 + 1 + 4) + 4 * 8
    assert smallest_format(N, 16, nnz) == ("coo", format_bytes("coo", N, 16, nnz))
    ids = ids_for(t)
    assert torch.equal(bits(served(ids)), bits(t.eval()(ids)))


def test_export_before_the_prune_is_refused():
    with pytest.raises(ValueError, match="needs the pruned table"):
        AutoSrhEmbedding(CARDS, 8).export()
    with pytest.raises(ValueError, match="fp32"):
        _retrained(800).export("int8")


# ---------------------------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256, 1000])
def test_budgets_bind_the_served_table_or_name_the_minimum(ratio):
    assert sum(SYNTH_CARDS) == 51_384 and len(SYNTH_CARDS) == 26 and MINIMUM == 226
    budget = baseline_bytes(SYNTH_CARDS, 16) / ratio
    t = AutoSrhEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)  # every ratio here is above the minimum
    assert t.budget_bytes == int(budget) and not t.pruned
    assert 0.95 * budget <= t.serving_bytes() <= budget  # planned
    assert AutoSrhEmbedding.planned_bytes(SYNTH_CARDS, 16, kept_numbers=t.kept_numbers + 1) > budget  # the largest
    if ratio in (16, 256):
        random_alphas_(t).prune_()
        assert t.kept_numbers - 1 <= t.kept <= t.kept_numbers and t.serving_bytes() <= budget  # served


def test_the_minimum_budget_is_one_narrow_pair_and_under_it_the_error_names_it():
    t = AutoSrhEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM)
    assert t.kept_numbers == 2 and t.serving_bytes() == MINIMUM
    with pytest.raises(BudgetError, match=r"autosrh.v1: .*minimum budget 226 bytes"):
        AutoSrhEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM - 1)
    ratio = baseline_bytes(SYNTH_CARDS, 16) / MINIMUM
    assert 14_000 < ratio < 15_000


def test_a_budget_spec_builds_through_the_registry():
    budget = baseline_bytes(CARDS, 8) / 4
    t = build_table({"type": "autosrh.v1", "budget_bytes": budget, "groups": 4}, CARDS, 8)
    assert isinstance(t, AutoSrhEmbedding) and t.groups == 4 and t.serving_bytes() <= budget
    with pytest.raises(Exception, match="kept_numbers"):  # the budget decides it
        build_table({"type": "autosrh.v1", "budget_bytes": budget, "kept_numbers": 10}, CARDS, 8)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_pruned_table_saves_and_reloads_into_a_fresh_table():
    t = _retrained(3000, dim=8, groups=4)
    state = reloaded(t.state_dict())
    fresh = AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=4)
    assert not fresh.pruned
    fresh.load_state_dict(state)
    assert fresh.pruned and fresh.kept == t.kept and fresh.alpha.numel() == 0
    ids = ids_for(t)
    assert torch.equal(bits(fresh.eval()(ids)), bits(t.eval()(ids)))
    assert fresh.serving_bytes() == t.serving_bytes()
    assert torch.equal(bits(fresh.export()(ids)), bits(t.export()(ids)))
    # ... and a search-stage checkpoint back into the pruned table
    search = random_alphas_(AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=4))
    fresh.load_state_dict(reloaded(search.state_dict()))
    assert not fresh.pruned and fresh.alpha.requires_grad and torch.equal(fresh(ids), search(ids))


def test_a_checkpoint_of_other_options_or_a_bad_mask_is_refused():
    t = _retrained(3000, dim=8, groups=4)
    state = reloaded(t.state_dict())
    with pytest.raises(ValueError, match="kept_numbers"):
        AutoSrhEmbedding(CARDS, 8, kept_numbers=2000, groups=4).load_state_dict(state)
    with pytest.raises(ValueError, match="groups"):
        AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=2).load_state_dict(state)
    bad = dict(state, keep=torch.ones_like(state["keep"]))  # keeps every pair: over kept_numbers
    with pytest.raises(ValueError, match="over kept_numbers=3,000"):
        AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=4).load_state_dict(bad)
    bad = dict(state, keep=state["keep"] * 2)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        AutoSrhEmbedding(CARDS, 8, kept_numbers=3000, groups=4).load_state_dict(bad)


# ---------------------------------------------------------------------------------------- the staged hook
def test_schedule_from_dict():
    s = AutoSrhSchedule.from_dict({"search_epochs": 2, "retrain_epochs": 1, "alpha_l1": 1e-4})
    assert (s.search_epochs, s.retrain_epochs, s.alpha_l1) == (2, 1, 1e-4)
    assert AutoSrhSchedule.from_dict(None) == AutoSrhSchedule() and AutoSrhSchedule().alpha_l1 == 1e-5
    with pytest.raises(SpecError, match="did you mean 'alpha_l1'"):
        AutoSrhSchedule.from_dict({"alpha_l2": 3})
    with pytest.raises(SpecError, match=r"m\.schedule: AutoSrhSchedule: retrain_epochs must be a positive int or "
                                        r"None, got 0"):
        AutoSrhSchedule.from_dict({"retrain_epochs": 0}, "m.schedule")
    with pytest.raises(SpecError, match=r"alpha_l1 must be a finite number >= 0, got 'big'"):
        AutoSrhSchedule.from_dict({"alpha_l1": "big"})


def test_fit_staged_searches_prunes_and_retrains():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    budget = baseline_bytes(data.cardinalities, 8) / 8
    table = build_table({"type": "autosrh.v1", "budget_bytes": budget, "sparse": True}, data.cardinalities, 8)
    assert table.trains_in_stages and table.schedule_type is AutoSrhSchedule
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    search_bytes = table.memory_report().total_bytes
    schedule = table.schedule_type.from_dict({"search_epochs": 1, "retrain_epochs": 1, "alpha_l1": 1e-3})
    fit = table.fit_staged(model, data, TrainConfig(epochs=3, batch_size=500, progress=False), schedule)
    assert fit.table is table and table.pruned and fit.model is model
    assert set(fit.stages) == {"search", "prune", "retrain"}
    d = fit.details
    assert d["search_table_bytes"] == search_bytes and d["search_optimizer_bytes"] > 0 and d["alpha_l1"] == 1e-3
    assert d["alpha_moved"] > 0  # the search trained the alphas
    assert d["kept_numbers"] <= table.kept_numbers and d["kept_pairs"] > 0
    assert len(d["field_mean_width"]) == len(data.cardinalities)
    # what the runner reports as training bytes: the search held the alphas and their Adam moments
    assert d["peak_training_bytes"] == search_bytes + d["search_optimizer_bytes"]
    assert d["peak_training_bytes"] > table.memory_report().total_bytes + fit.result.table_optimizer_bytes
    assert d["serving_bytes"] == table.memory_report().serving_bytes <= budget
    assert len(fit.result.history) == 1 and 0.0 <= fit.result.test_auc <= 1.0
    ids = torch.from_numpy(data.sparse[:64])
    assert torch.equal(bits(table.export()(ids)), bits(table.eval()(ids)))
    with pytest.raises(ValueError, match="pruned already"):
        table.fit_staged(model, data, TrainConfig(epochs=1, progress=False), schedule)
    with pytest.raises(ValueError, match="not a submodule"):
        AutoSrhEmbedding(data.cardinalities, 8).fit_staged(torch.nn.Linear(1, 1), data, TrainConfig(epochs=1),
                                                            schedule)
    with pytest.raises(ValueError, match="AutoSrhSchedule or None"):
        AutoSrhEmbedding(data.cardinalities, 8).fit_staged(model, data, TrainConfig(epochs=1), {"alpha_l1": 1})


def _search_in_a_process_group():
    """One search epoch of a small DLRM, dense and sparse alphas, with a large L1 weight (so that it matters)."""
    from embcompress.training import train

    data = make_synthetic(SyntheticConfig(rows=3_000, cardinality_exponent=0.2, seed=5))
    out = {}
    for sparse in (False, True):
        torch.manual_seed(0)
        table = AutoSrhEmbedding(data.cardinalities, 8, kept_numbers=2000, sparse=sparse).set_alpha_l1(1e-2)
        model = build_model({"type": "dlrm.v1", "bottom_mlp": [16], "top_mlp": [16]}, table, data.num_dense)
        train(model, data, TrainConfig(epochs=1, batch_size=333, lr=0.01, progress=False))
        out[sparse] = {"alpha": table.alpha.detach().clone(), "weight": table.weight.detach().clone()}
    return out


@pytest.mark.slow
def test_the_l1_term_in_a_process_group_is_the_single_process_term():
    # Each rank gathers every rank's touched rows, so all add the term of the whole global batch: DDP's average of
    # its gradient is the single-process gradient, and two processes follow one (up to float summation order).
    from embcompress.distributed import launch

    single = _search_in_a_process_group()
    ranks = launch(_search_in_a_process_group, 2)
    for sparse in (False, True):
        r0, r1 = ranks[0][sparse], ranks[1][sparse]
        assert torch.equal(r0["alpha"], r1["alpha"]) and torch.equal(r0["weight"], r1["weight"])
        assert not torch.equal(r0["alpha"], torch.ones_like(r0["alpha"]))
        torch.testing.assert_close(r0["alpha"], single[sparse]["alpha"], rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(r0["weight"], single[sparse]["weight"], rtol=1e-4, atol=2e-5)
