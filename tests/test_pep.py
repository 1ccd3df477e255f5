"""pep.v1: the soft threshold and its granularities, thresholds that learn, pruning to the budget, the lottery-ticket
retrain, the served sparse table and its bytes, budgets on the served table, checkpoints across the stage change
and the staged hook."""

import io
import math

import pytest
import torch

from embcompress import BudgetError, build_model, build_table
from embcompress.memory import baseline_bytes
from embcompress.sparse_rows import SparseRows, format_bytes
from embcompress.specs import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic, scaled_cardinalities
from embcompress.tables.pep import PEPEmbedding, PEPExport, PEPSchedule, soft_threshold_std
from embcompress.training import TrainConfig, train

CARDS = [300, 3, 57, 1000]  # 1,360 rows


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def bags_for(table, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (table.num_fields, batch), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[f].sum()),), generator=g)
                        for f, n in enumerate(table.cardinalities)])
    return values, lengths


def reloaded(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def field_of_rows(table) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(table.num_fields), torch.tensor(table.cardinalities))


# ------------------------------------------------------------------------------------------ the soft threshold
@pytest.mark.parametrize("granularity, shape", [("field", (4, 1)), ("dimension", (1, 8)),
                                                ("field_dimension", (4, 8))])
def test_the_output_is_the_soft_thresholded_row(granularity, shape):
    t = PEPEmbedding(CARDS, 8, threshold=granularity, init_std=0.3)
    assert t.threshold.shape == shape and t.threshold_type == granularity
    with torch.no_grad():  # thresholds from 0.05 to 0.6, other per field and/or dimension
        t.threshold.copy_(torch.logit(torch.linspace(0.05, 0.6, math.prod(shape)).view(shape)))
    ids = ids_for(t)
    out = t(ids)
    for f in range(4):
        v = t.weight[ids[:, f] + t.offsets[f]]
        g = torch.sigmoid(t.threshold[0 if granularity == "dimension" else f])
        expected = torch.sign(v) * torch.clamp(v.abs() - g, min=0)
        torch.testing.assert_close(out[:, f], expected, rtol=1e-6, atol=1e-7)  # sigmoid's SIMD and scalar paths
    assert (out == 0).any() and (out != 0).any()


def test_the_threshold_of_a_single_table():
    t = PEPEmbedding(50, 4, init_std=0.3)
    assert t.threshold.shape == (1, 4)
    with torch.no_grad():
        t.threshold.fill_(0.0)  # sigmoid(0) = 0.5
    ids = torch.tensor([[0, 49, 3]])
    v = t.weight[ids]
    assert torch.equal(t(ids), torch.sign(v) * torch.relu(v.abs() - 0.5))


def test_init_std_is_the_std_of_the_thresholded_output():
    # sigmoid(-10) = 4.5e-5 is half of init_std=1e-4: the rows are drawn wider so that what stage 1 returns has it
    t = PEPEmbedding([40_000, 10_000], 16, init_std=1e-4)
    out = t(ids_for(t, batch=20_000))
    assert abs(out.std().item() / 1e-4 - 1) < 0.03
    assert float(t.init_scale) > 1.3e-4 and soft_threshold_std(float(t.init_scale), 1 / (1 + math.exp(10))) == \
        pytest.approx(1e-4, rel=1e-6)
    wide = PEPEmbedding([40_000], 16)  # the default init_std 1/4: the threshold is negligible
    assert float(wide.init_scale) == pytest.approx(0.25, rel=1e-3)


# ------------------------------------------------------------------------------------- thresholds that learn
def _short_fit(threshold_init: float, **options):
    data = make_synthetic(SyntheticConfig(rows=2000, seed=5))
    torch.manual_seed(0)
    table = PEPEmbedding(data.cardinalities, 8, threshold_init=threshold_init, **options)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    before = table.threshold.detach().clone()
    train(model, data, TrainConfig(epochs=1, batch_size=250, progress=False))
    return table, before


@pytest.mark.parametrize("threshold_init", [-10.0, -8.0])
def test_the_thresholds_move_from_their_init_in_a_short_training(threshold_init):
    table, before = _short_fit(threshold_init)
    moved = (table.threshold.detach() - before).abs()
    assert torch.equal(before, torch.full_like(before, threshold_init))
    assert (moved > 1e-4).float().mean() > 0.9  # Adam moves (nearly) every threshold, by about lr a step
    assert table.threshold.grad is not None


def test_the_references_init_never_learns():
    # sigmoid(-150) is exactly 0 in fp32 and so is its gradient: the reference's thresholds stay where they start
    table, before = _short_fit(-150.0, sparse=True)
    assert torch.equal(table.threshold.detach(), before)
    assert torch.sigmoid(torch.tensor(-150.0)) == 0


# ---------------------------------------------------------------------------------------------- pruning
def test_the_learned_mask_is_kept_when_it_is_within_the_budget():
    t = PEPEmbedding(CARDS, 8, init_std=0.3)
    with torch.no_grad():
        t.threshold.fill_(float(torch.logit(torch.tensor(0.3))))  # prunes |v| < 0.3: about 68% of the numbers
    learned = t.thresholded() != 0
    w0 = t.weight.detach().clone()
    stats = t.prune_()
    assert stats["learned_kept"] == stats["kept"] == int(learned.sum()) < 0.4 * 1360 * 8
    assert torch.equal(t.weight != 0, learned)
    assert torch.equal(t.weight, torch.where(learned, w0, torch.zeros(())))  # the kept numbers' initial values
    assert not t.threshold.requires_grad and t.mask.shape == (1360, 1) and t.mask.dtype == torch.uint8


def test_over_the_budget_the_largest_thresholded_magnitudes_are_kept():
    t = PEPEmbedding(CARDS, 8, kept_numbers=1000, init_std=0.3)
    with torch.no_grad():
        t.threshold.copy_(torch.logit(torch.rand(4, 8) * 0.2))  # thresholds 0 to 0.2: most numbers survive them
    thresholded = t.thresholded()
    assert int((thresholded != 0).sum()) > 1000
    stats = t.prune_()
    assert stats["kept"] == 1000 and stats["learned_kept"] > 1000
    kept = t.weight != 0
    assert thresholded.abs()[kept].min() >= thresholded.abs()[~kept].max()  # by thresholded magnitude, not raw
    with pytest.raises(ValueError, match="pruned already"):
        t.prune_()


def test_ties_at_the_cut_go_to_the_first_numbers_of_the_fused_table():
    t = PEPEmbedding([6], 2, kept_numbers=3, threshold_init=-100.0)
    with torch.no_grad():
        t.weight.copy_(torch.tensor([[0.1, 0.5], [0.5, 0.2], [0.5, 0.5], [-0.5, 0.1], [0.3, 0.3], [0.1, 0.1]]))
    t.prune_()
    assert (t.weight != 0).nonzero().tolist() == [[0, 1], [1, 0], [2, 0]]


# ------------------------------------------------------------------------------------------------ the retrain
def test_the_retrain_starts_from_the_initial_weights():
    t = PEPEmbedding(CARDS, 8, kept_numbers=4000, init_std=0.2)
    w0 = t.weight.detach().clone()
    assert torch.equal(t.initial_rows(), w0)  # drawn again, bit for bit, from the seed and scale it holds
    opt = torch.optim.Adam(t.parameters(), lr=0.05)
    for step in range(5):
        out = t(ids_for(t, seed=step))
        opt.zero_grad()
        (out - 0.3).pow(2).sum().backward()
        opt.step()
    assert not torch.equal(t.weight, w0)  # trained
    t.prune_()
    kept = t.weight != 0
    assert int(kept.sum()) == 4000
    assert torch.equal(t.weight[kept], w0[kept])  # reset to the initial values, not the trained ones


@pytest.mark.parametrize("sparse", [False, True])
def test_masked_weights_stay_exactly_zero_in_the_retrain(sparse):
    t = PEPEmbedding(CARDS, 8, kept_numbers=2000, sparse=sparse, init_std=0.2)
    t.prune_()
    kept = t.weight.detach() != 0
    before = t.weight.detach().clone()
    opt = (torch.optim.SparseAdam(t.sparse_parameters(), lr=0.05) if sparse
           else torch.optim.Adam([t.weight], lr=0.05, weight_decay=0.1))
    for step in range(5):
        ids = ids_for(t, seed=step)
        out = t(ids)
        assert torch.equal(out, t.weight[ids + t.offsets])  # the masked rows: what the table holds
        opt.zero_grad()
        (out - 1.0).pow(2).sum().backward()
        grad = t.weight.grad.to_dense() if sparse else t.weight.grad
        assert torch.equal(grad[~kept], torch.zeros_like(grad[~kept]))
        opt.step()
    after = t.weight.detach()
    assert torch.equal(after[~kept], torch.zeros_like(after[~kept]))  # exactly zero, weight decay or not
    assert (after[kept] != before[kept]).float().mean() > 0.3  # the kept numbers train
    assert t.threshold.grad is None  # no threshold in the retrain


# ---------------------------------------------------------------------------------------- export and bytes
@pytest.mark.parametrize("cards, dim, kept, fmt, expected", [
    # 20 rows x D=4: 10 kept in COO (uint8 row, uint8 column, fp32 value), 60 in the bitmap (int32 pointers
    # [21], a byte a row, fp32 values)
    ([10, 3, 7], 4, 10, "coo", 10 * (1 + 1 + 4) + 3 * 8),
    ([10, 3, 7], 4, 60, "bitmap", 21 * 4 + 20 * 1 + 60 * 4 + 3 * 8),
    # 40,000 rows x D=16, 60,000 kept: CSR (int32 pointers [40,001], uint8 column + fp32 value each) beats COO's
    # int32 rows (9 bytes a value) and the bitmap's two bytes a row
    ([40_000], 16, 60_000, "csr", 40_001 * 4 + 60_000 * (1 + 4) + 8),
])
def test_export_serves_the_retrained_table_bit_for_bit_in_exact_bytes(cards, dim, kept, fmt, expected):
    t = PEPEmbedding(cards, dim, kept_numbers=kept, sparse=True, init_std=0.2)
    assert t.serving_bytes() == PEPEmbedding.planned_bytes(cards, dim, kept_numbers=kept) == expected  # planned
    with pytest.raises(ValueError, match="call prune_"):
        t.export()
    t.prune_()
    with torch.no_grad():  # as if retrained: the kept numbers moved (sparse Adam would only touch those)
        t.weight.mul_(1.5)
        t.weight.sub_(1e-3 * (t.weight == 0))  # masked out whatever they hold: their outputs still read +0.0
    served = t.export()
    assert isinstance(served, PEPExport) and isinstance(served.rows, SparseRows) and not served.training
    assert served.rows.format == fmt and served.rows.nnz == kept
    assert {n for n, _ in served.named_buffers()} <= {"offsets", "rows.values", "rows.pointers", "rows.columns",
                                                     "rows.row_index", "rows.bitmap"}
    assert not list(served.parameters())
    assert served.memory_report().total_bytes == t.serving_bytes() == t.memory_report().serving_bytes == expected
    assert format_bytes(fmt, sum(cards), dim, kept) + 8 * len(cards) == expected
    ids = ids_for(t, batch=3000)
    if t.single:
        ids = ids[:, 0]
    assert torch.equal(served(ids), t.eval()(ids)) and torch.equal(served(ids), t.train()(ids))
    assert torch.equal(served(ids).signbit(), t.eval()(ids).signbit())  # a pruned number is +0.0 in both
    if not t.single:
        values, lengths = bags_for(t, batch=40)
        for mode in ("sum", "mean"):
            assert torch.equal(served.forward_bags(values, lengths, mode=mode), t.forward_bags(values, lengths,
                                                                                               mode=mode))
    with pytest.raises(BudgetError, match="cannot compress"):
        PEPExport.from_budget(cards, dim, budget_bytes=10**6)


def test_memory_report_while_training_and_after_pruning():
    t = PEPEmbedding(CARDS, 8, kept_numbers=500)
    held = 1360 * 8 * 4 + 4 * 8 * 4 + 4 * 8 + 8 + 4  # rows, [F, D] thresholds, offsets, init seed and scale
    assert t.memory_report().total_bytes == held
    opt = torch.optim.Adam(t.parameters(), lr=0.01)
    t(ids_for(t)).sum().backward()
    opt.step()
    trained = t.memory_report([opt])
    assert trained.training_bytes == held + 2 * (1360 * 8 + 4 * 8) * 4 + 2 * 4  # Adam's moments and steps
    assert trained.serving_bytes == 500 * (2 + 1 + 4) + 4 * 8  # planned: COO, int16 rows of 1,360
    t.prune_()
    assert t.memory_report().total_bytes == held + 1360 * 1  # and the mask, a bit a number
    assert t.serving_bytes() == 500 * 7 + 32


# ---------------------------------------------------------------------------------------------- budgets
SYNTH_CARDS = list(scaled_cardinalities(SyntheticConfig().cardinality_exponent))  # 51,384 ids in 26 fields
MINIMUM = (4 + 1 + 4) + 26 * 8  # one kept number in COO (int32 row of 51,384, uint8 column, fp32), offsets


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256, 1000])
def test_budgets_bind_the_served_table(ratio):
    assert sum(SYNTH_CARDS) == 51_384 and MINIMUM == 217
    budget = baseline_bytes(SYNTH_CARDS, 16) / ratio
    t = PEPEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
    assert t.budget_bytes == int(budget) and not t.pruned
    assert 0.95 * budget <= t.serving_bytes() <= budget
    assert PEPEmbedding.planned_bytes(SYNTH_CARDS, 16, kept_numbers=t.kept_numbers + 1) > budget  # the largest
    if ratio == 1000:
        assert t.kept_numbers == 342  # (3,288 - 208) // 9 in COO
    if ratio in (16, 256):
        t.prune_()
        assert t.serving_bytes() <= budget and t.export().memory_report().total_bytes == t.serving_bytes()


def test_a_budget_under_one_kept_number_names_the_minimum():
    assert PEPEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM).kept_numbers == 1
    with pytest.raises(BudgetError, match=r"pep.v1: .*minimum budget 217 bytes"):
        PEPEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM - 1)


def test_an_enormous_budget_buys_at_most_the_full_tables_bytes():
    t = PEPEmbedding.from_budget(CARDS, 8, budget_bytes=10**12)
    full = 1360 * 8 * 4 + 4 * 8
    assert t.budget_bytes == full and t.serving_bytes() <= full < PEPEmbedding.planned_bytes(CARDS, 8)


# ------------------------------------------------------------------------------------------------ checkpoints
def test_a_pruned_table_saves_and_reloads_into_a_fresh_table():
    t = PEPEmbedding(CARDS, 8, kept_numbers=3000, threshold="field")
    t.prune_()
    with torch.no_grad():
        t.weight.mul_(2.0)  # retrained
    state = reloaded(t.state_dict())
    torch.manual_seed(9)
    fresh = PEPEmbedding(CARDS, 8, kept_numbers=3000, threshold="field", threshold_init=-8.0)  # stage 1, other draw
    assert not torch.equal(fresh.init_seed, t.init_seed)
    fresh.load_state_dict(state)
    assert fresh.pruned and not fresh.threshold.requires_grad and torch.equal(fresh.init_seed, t.init_seed)
    ids = ids_for(t)
    assert torch.equal(fresh(ids), t(ids)) and fresh.serving_bytes() == t.serving_bytes()
    assert torch.equal(fresh.export()(ids), t.export()(ids))
    assert torch.equal(fresh.initial_rows(), t.initial_rows())  # the checkpoint's initial rows
    # and back: a stage-1 checkpoint restores the thresholded layout, and its thresholds train again
    first = PEPEmbedding(CARDS, 8, kept_numbers=3000, threshold="field")
    fresh.load_state_dict(reloaded(first.state_dict()))
    assert not fresh.pruned and fresh.threshold.requires_grad and torch.equal(fresh(ids), first(ids))
    with pytest.raises(ValueError, match="kept_numbers=3000.*kept_numbers=2000"):
        PEPEmbedding(CARDS, 8, kept_numbers=2000, threshold="field").load_state_dict(state)
    with pytest.raises(ValueError, match="threshold='field'.*threshold='dimension'"):
        PEPEmbedding(CARDS, 8, kept_numbers=3000, threshold="dimension").load_state_dict(state)


def test_an_export_saves_and_reloads():
    t = PEPEmbedding(CARDS, 8, kept_numbers=3000)
    t.prune_()
    served = t.export()
    state = reloaded(served.state_dict())
    options = state["_extra_state"]["options"]
    again = PEPExport(CARDS, 8, kept=options["kept"], fmt=options["fmt"])
    again.load_state_dict(state)
    ids = ids_for(t)
    assert torch.equal(again(ids), served(ids))


# ------------------------------------------------------------------------------------------------- options
def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"pep.v1: kept_numbers must be an int in \[1, 10880\] or None, got 10881"):
        PEPEmbedding(CARDS, 8, kept_numbers=10_881)
    with pytest.raises(ValueError, match=r"pep.v1: threshold must be one of .*'row'"):
        PEPEmbedding(CARDS, 8, threshold="row")
    with pytest.raises(ValueError, match=r"pep.v1: threshold_init must be a finite number, got nan"):
        PEPEmbedding(CARDS, 8, threshold_init=float("nan"))
    with pytest.raises(ValueError, match=r"pep.v1: init_std must be .*got -1"):
        PEPEmbedding(CARDS, 8, init_std=-1.0)
    with pytest.raises(ValueError, match="precision='int8'"):
        t = PEPEmbedding(CARDS, 8)
        t.prune_()
        t.export("int8")


def test_the_init_follows_the_global_seed():
    torch.manual_seed(3)
    a = PEPEmbedding(CARDS, 8)
    torch.manual_seed(3)
    b = PEPEmbedding(CARDS, 8)
    c = PEPEmbedding(CARDS, 8)
    assert torch.equal(a.weight, b.weight) and not torch.equal(a.weight, c.weight)


# ---------------------------------------------------------------------------------------- the staged hook
def test_schedule_from_dict():
    s = PEPSchedule.from_dict({"train_epochs": 2, "retrain_epochs": 1})
    assert (s.train_epochs, s.retrain_epochs) == (2, 1)
    assert PEPSchedule.from_dict(None) == PEPSchedule() == PEPSchedule.from_dict({})
    with pytest.raises(SpecError, match="did you mean 'retrain_epochs'"):
        PEPSchedule.from_dict({"retrain": 3})
    with pytest.raises(SpecError, match=r"m\.schedule: PEPSchedule: retrain_epochs must be a positive int or "
                                        r"None, got 0"):
        PEPSchedule.from_dict({"retrain_epochs": 0}, "m.schedule")
    with pytest.raises(SpecError, match=r"train_epochs must be a positive int or None, got 2\.5"):
        PEPSchedule.from_dict({"train_epochs": 2.5})


def test_fit_staged_trains_the_thresholds_prunes_and_retrains():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    budget = baseline_bytes(data.cardinalities, 8) / 8
    table = build_table({"type": "pep.v1", "budget_bytes": budget, "sparse": True}, data.cardinalities, 8)
    assert table.trains_in_stages and table.schedule_type is PEPSchedule and table.budget_bytes == int(budget)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    first_bytes = table.memory_report().total_bytes
    initial = table.weight.detach().clone()
    schedule = table.schedule_type.from_dict({"train_epochs": 1, "retrain_epochs": 1})
    fit = table.fit_staged(model, data, TrainConfig(epochs=3, batch_size=500, progress=False), schedule)
    assert fit.table is table and table.pruned and fit.model is model
    assert set(fit.stages) == {"train", "prune", "retrain"}
    assert (table.threshold != -10.0).all()  # the thresholds learned in stage 1
    assert fit.details["train_table_bytes"] == first_bytes and fit.details["train_optimizer_bytes"] > 0
    assert fit.details["kept"] <= table.kept_numbers
    kept = table.masked_weight() != 0
    assert not torch.equal(table.weight[kept], initial[kept])  # retrained from the initial values
    peak = fit.details["peak_training_bytes"]
    assert peak == max(first_bytes + fit.details["train_optimizer_bytes"],
                       table.memory_report().total_bytes + fit.result.table_optimizer_bytes)
    assert fit.details["serving_bytes"] == table.memory_report().serving_bytes <= budget
    assert len(fit.result.history) == 1 and 0.0 <= fit.result.test_auc <= 1.0
    ids = torch.from_numpy(data.sparse[:64])
    assert torch.equal(table.export()(ids), table.eval()(ids))
    with pytest.raises(ValueError, match="pruned already"):
        table.fit_staged(model, data, TrainConfig(epochs=1, progress=False), schedule)
    with pytest.raises(ValueError, match="not a submodule"):
        PEPEmbedding(data.cardinalities, 8).fit_staged(torch.nn.Linear(1, 1), data, TrainConfig(epochs=1), schedule)
    with pytest.raises(ValueError, match="must be a PEPSchedule"):
        PEPEmbedding(data.cardinalities, 8).fit_staged(model, data, TrainConfig(epochs=1), {"train_epochs": 1})


def _fit_in_a_process_group():
    data = make_synthetic(SyntheticConfig(rows=3_000, cardinality_exponent=0.2, seed=5))
    torch.manual_seed(0)
    table = build_table({"type": "pep.v1", "budget_bytes": baseline_bytes(data.cardinalities, 8) / 8,
                         "sparse": True}, data.cardinalities, 8)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    table.fit_staged(model, data, TrainConfig(epochs=1, batch_size=333, progress=False))
    return {"mask": table.mask.clone(), "weight": table.weight.detach().clone(),
            "threshold": table.threshold.detach().clone()}


@pytest.mark.slow
def test_fit_staged_in_a_process_group_keeps_the_replicas_equal():
    # The thresholds' dense gradient is all-reduced like the rows'; every rank prunes the same table to the same
    # mask (a uint8 buffer, which gloo broadcasts) and resets it from the same seed.
    from embcompress.distributed import launch

    ranks = launch(_fit_in_a_process_group, 2)
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ("mask", "weight", "threshold"))
    assert ranks[0]["mask"].shape[0] > 0
