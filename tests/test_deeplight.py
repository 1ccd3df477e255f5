"""deeplight.v1: the sparsity ramp and its step hook, masked numbers, the exact final prune, the served sparse rows
and their bytes, budgets on the served table, checkpoints of a pruned table and the staged hook."""

import io
import math

import pytest
import torch

from embcompress import BudgetError, build_model, build_table
from embcompress.memory import baseline_bytes
from embcompress.specs import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic, scaled_cardinalities
from embcompress.tables.deeplight import (
    DeepLightEmbedding, DeepLightExport, DeepLightSchedule, RampPruner, largest_magnitudes, ramp_kept, ramp_sparsity,
)
from embcompress.training import TrainConfig, make_optimizers

CARDS = [300, 3, 57, 1000]  # 1,360 rows


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def reloaded(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def bags_for(table, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (table.num_fields, batch), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[f].sum()),), generator=g)
                        for f, n in enumerate(table.cardinalities)])
    return values, lengths, torch.rand(values.shape, generator=g)


def run_steps(table, steps, optimizer="adam", lr=0.05, batch=128):
    """``steps`` training steps as the training loop takes them: the optimizers of ``make_optimizers`` (the
    table's RampPruner last), zeroed, backward, stepped in order. Returns the optimizers."""
    opts = make_optimizers(table, TrainConfig(optimizer=optimizer, lr=lr, progress=False))
    assert isinstance(opts[-1], RampPruner)
    for s in range(steps):
        ids = ids_for(table, batch, seed=s)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (table(ids) - 1.0).pow(2).sum().backward()
        for opt in opts:
            opt.step()
    return opts


# ------------------------------------------------------------------------------------------------ the ramp
def test_ramp_formula_approaches_the_target_from_above():
    assert ramp_sparsity(0, 0.8) == 0.0
    assert ramp_sparsity(100, 0.8) == pytest.approx(0.8 * 0.01)
    assert ramp_sparsity(200, 0.8, ramp_steps=2) == pytest.approx(0.8 * (1 - 0.99**100))
    kept = [ramp_kept(10_000, 1_000, t) for t in range(0, 200_000, 1_000)]
    assert kept == sorted(kept, reverse=True) and kept[0] == 10_000 and kept[-1] > 1_000 >= kept[-1] - 9
    assert ramp_kept(10_000, 1_000, 10**9) == 1_000  # only where 0.99 ** x underflows
    t = 6_000
    assert ramp_kept(10_000, 1_000, t) == 10_000 - math.floor(9_000 * (1 - 0.99 ** (t / 100)))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_the_kept_fraction_follows_the_ramp_through_the_training_loops_hook(optimizer):
    t = DeepLightEmbedding(500, 4, kept_numbers=200, prune_every=5, ramp_steps=2)
    total = t.total_numbers
    assert total == 2000 and t.kept == total and t.sparsity() == 0.0
    target = 1 - 200 / total
    opts = make_optimizers(t, TrainConfig(optimizer=optimizer, lr=0.05, progress=False))
    previous = t.mask.clone()
    for step in range(1, 61):
        ids = torch.randint(0, 500, (64,), generator=torch.Generator().manual_seed(step))
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        t(ids).pow(2).sum().backward()
        for opt in opts:
            opt.step()
        last = (step // 5) * 5  # the last re-prune
        assert int(t.steps) == step and t.kept == ramp_kept(total, 200, last, 2) == int(t.mask.sum())
        # the kept fraction is 1 - s(t) within one re-prune's granularity
        assert 1 - ramp_sparsity(step, target, 2) - 1 / total <= t.kept / total
        assert t.kept / total <= 1 - ramp_sparsity(max(step - 5, 0), target, 2) + 1 / total
        assert not (t.mask & ~previous).any()  # no regrowth: the mask only shrinks
        previous = t.mask.clone()
    assert t.kept > 200  # the ramp never reaches the target itself
    assert t.prune_()["kept"] == 200 == int(t.mask.sum()) and t.at_target


def test_a_prune_keeps_the_largest_magnitudes_with_ties_broken_by_position():
    w = torch.tensor([[3.0, -1.0, 0.5], [1.0, -3.0, 1.0], [0.0, 2.0, -1.0]])
    mask = torch.ones(3, 3, dtype=torch.bool)
    assert largest_magnitudes(w, mask, 4).tolist() == [[True, True, False], [False, True, False],
                                                       [False, True, False]]  # 3, -3, 2 and the first of the 1s
    mask[0, 0] = False  # a pruned number stays pruned, whatever its magnitude
    assert largest_magnitudes(w, mask, 2).tolist() == [[False, False, False], [False, True, False],
                                                       [False, True, False]]
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=3000)
    before = t.weight.detach().abs().clone()
    t.prune_()
    assert int(t.mask.sum()) == 3000
    assert before[t.mask].min() >= before[~t.mask].max()  # global magnitude, one threshold over every field


def test_pruned_numbers_stay_zero_and_get_no_gradient_between_re_prunes():
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=2000, prune_every=1000)  # no re-prune in these steps
    run_steps(t, 3)  # Adam moments for every number
    t.prune_(5000)
    pruned = ~t.mask
    assert torch.equal(t.weight[pruned], torch.zeros(int(pruned.sum())))
    opts = make_optimizers(t, TrainConfig(lr=0.05, progress=False))
    run_steps(t, 3)
    for s in range(3):  # Adam's momentum would move them: the hook re-zeroes them after every step
        ids = ids_for(t, seed=10 + s)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        out = t(ids)
        (out - 1.0).pow(2).sum().backward()
        grad = t.weight.grad
        assert torch.equal(grad[pruned], torch.zeros(int(pruned.sum())))  # no gradient reaches them
        rows = (ids + t.offsets).reshape(-1)
        assert torch.equal(out.reshape(-1, 8)[~t.mask[rows]], torch.zeros(int((~t.mask[rows]).sum())))
        for opt in opts:
            opt.step()
        assert torch.equal(t.weight[pruned], torch.zeros(int(pruned.sum())))
    assert t.kept == 5000 and torch.equal(~t.mask, pruned)


def test_sparse_gradients_touch_only_the_batch_rows_and_keep_pruned_numbers_zero():
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=2000, prune_every=1000, sparse=True)
    run_steps(t, 3)  # SparseAdam moments for the rows the batches touched
    t.prune_(4000)
    pruned = ~t.mask
    run_steps(t, 4)
    assert t.weight.grad.is_sparse
    assert torch.equal(t.weight[pruned], torch.zeros(int(pruned.sum())))


# ------------------------------------------------------------------------------------------------ memory
def test_training_bytes_are_the_dense_table_and_a_byte_a_number_of_mask():
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=100)
    n = 1360 * 8
    report = t.memory_report()
    assert report.total_bytes == 4 * n + n + 4 * 8 + 8  # fp32 weight, bool mask, int64 offsets and step count
    assert report.buffers == {"bool": n, "int64": 4 * 8 + 8}
    opts = run_steps(t, 1)
    trained = t.memory_report(opts)
    assert trained.training_bytes == report.total_bytes + 2 * 4 * n + 4  # Adam's two moments and its step
    assert trained.serving_bytes == 100 * (2 + 1 + 4) + 4 * 8  # planned: COO with int16 rows and uint8 columns


# ------------------------------------------------------------------------------------------ the export
@pytest.mark.parametrize("kept, fmt, size", [
    # 100 rows x D=64 (6,400 numbers): pointers int32 [101] = 404 bytes, bitmap 8 bytes a row, uint8 rows/columns
    (50, "coo", 50 * (1 + 1 + 4)),  # most rows keep nothing: CSR 404 + 250, bitmap 404 + 800 + 200
    (600, "csr", 404 + 600 * (1 + 4)),  # 6 a row: COO 3,600, bitmap 3,604
    (5000, "bitmap", 404 + 100 * 8 + 5000 * 4),  # 50 a row: CSR 25,404, COO 30,000
])
def test_export_serves_the_pruned_tables_outputs_bit_for_bit_in_the_smallest_format(kept, fmt, size):
    t = DeepLightEmbedding([60, 40], 64, kept_numbers=kept, sparse=True)
    with pytest.raises(ValueError, match="call prune_"):
        t.export()
    assert t.serving_bytes() == size + 2 * 8  # planned, before the prune
    run_steps(t, 2)
    t.prune_()
    served = t.export()
    assert isinstance(served, DeepLightExport) and not served.training and served.format == fmt
    assert not list(served.parameters()) and served.rows.nnz == kept
    assert served.memory_report().total_bytes == t.serving_bytes() == size + 2 * 8  # actual, after
    ids = ids_for(t, batch=3000)
    assert torch.equal(served(ids), t.eval()(ids)) and torch.equal(served(ids), t.train()(ids))
    assert torch.equal(served(ids).signbit(), t.eval()(ids).signbit())  # a pruned number is +0.0 in both
    values, lengths, weights = bags_for(t)
    for mode in ("sum", "mean"):
        assert torch.equal(served.forward_bags(values, lengths, mode=mode, weights=weights),
                           t.forward_bags(values, lengths, mode=mode, weights=weights))
    with pytest.raises(BudgetError, match="cannot compress"):
        DeepLightExport.from_budget([60, 40], 64, budget_bytes=10**6)
    with pytest.raises(ValueError, match="fp32"):
        t.export("int8")


def test_the_served_bytes_count_only_kept_numbers_that_are_not_zero():
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=300)
    t.prune_()
    with torch.no_grad():
        t.weight[t.mask.nonzero()[:10].unbind(1)] = 0.0  # ten kept numbers trained to exactly zero
    assert t.serving_bytes() == 290 * 7 + 32 == t.export().memory_report().total_bytes
    ids = ids_for(t)
    assert torch.equal(t.export()(ids), t(ids))


# -------------------------------------------------------------------------------------------------- budgets
SYNTH_CARDS = list(scaled_cardinalities(SyntheticConfig().cardinality_exponent))  # 51,384 ids in 26 fields
MINIMUM = 1 * (4 + 1 + 4) + 26 * 8  # one number in COO (int32 row: 51,384 rows > 2**15), and the offsets


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256, 1000])
def test_budgets_bind_the_served_table(ratio):
    assert sum(SYNTH_CARDS) == 51_384 and MINIMUM == 217
    budget = baseline_bytes(SYNTH_CARDS, 16) / ratio
    t = DeepLightEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
    assert t.budget_bytes == int(budget) and t.kept == t.total_numbers  # it trains dense
    assert 0.95 * budget <= t.serving_bytes() <= budget  # planned
    assert DeepLightEmbedding.planned_bytes(SYNTH_CARDS, 16, kept_numbers=t.kept_numbers + 1) > budget  # the most
    t.prune_()  # the final prune: exactly the target, within the budget
    assert int(t.mask.sum()) == t.kept_numbers and t.serving_bytes() <= budget
    assert t.export().memory_report().total_bytes == t.serving_bytes()


def test_the_minimum_budget_is_one_kept_number():
    t = DeepLightEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM)
    assert t.kept_numbers == 1 and t.serving_bytes() == MINIMUM
    with pytest.raises(BudgetError, match=r"deeplight.v1: .*minimum budget 217 bytes"):
        DeepLightEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM - 1)
    with pytest.raises(SpecError, match="kept_numbers"):
        build_table({"type": "deeplight.v1", "budget_bytes": 10**5, "kept_numbers": 5}, SYNTH_CARDS, 16)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_pruned_table_saves_and_reloads_its_mask_and_step_count():
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=1000, prune_every=3, ramp_steps=1)
    run_steps(t, 7)
    assert 1000 < t.kept < t.total_numbers and int(t.steps) == 7
    state = reloaded(t.state_dict())
    fresh = DeepLightEmbedding(CARDS, 8, kept_numbers=1000, prune_every=3, ramp_steps=1)
    fresh.load_state_dict(state)
    assert fresh.kept == t.kept and fresh._steps == 7 and torch.equal(fresh.mask, t.mask)
    ids = ids_for(t)
    assert torch.equal(fresh(ids), t(ids)) and fresh.serving_bytes() == t.serving_bytes()
    # the ramp goes on from the saved step: both prune at step 9 to the same count
    torch.manual_seed(3)
    run_steps(t, 2)
    torch.manual_seed(3)
    run_steps(fresh, 2)
    assert fresh.kept == t.kept == ramp_kept(t.total_numbers, 1000, 9, 1) and torch.equal(fresh.mask, t.mask)
    # and at the target
    t.prune_()
    again = DeepLightEmbedding(CARDS, 8, kept_numbers=1000, prune_every=50)  # the ramp's pace is not checked
    again.load_state_dict(reloaded(t.state_dict()))
    assert again.at_target and torch.equal(again.export()(ids), t.export()(ids))
    with pytest.raises(ValueError, match="kept_numbers=1000.*kept_numbers=999"):
        DeepLightEmbedding(CARDS, 8, kept_numbers=999).load_state_dict(state)


# ------------------------------------------------------------------------------------------------- options
def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"deeplight.v1: kept_numbers must be an int in \[1, 10880\] or None, "
                                         r"got 10881"):
        DeepLightEmbedding(CARDS, 8, kept_numbers=10881)
    with pytest.raises(ValueError, match=r"deeplight.v1: prune_every must be a positive int, got 0"):
        DeepLightEmbedding(CARDS, 8, prune_every=0)
    with pytest.raises(ValueError, match=r"deeplight.v1: ramp_steps must be a positive int, got 2.5"):
        DeepLightEmbedding(CARDS, 8, ramp_steps=2.5)
    with pytest.raises(ValueError, match=r"deeplight.v1: init_std must be"):
        DeepLightEmbedding(CARDS, 8, init_std=0.0)
    t = DeepLightEmbedding(CARDS, 8, kept_numbers=100)
    t.prune_(500)
    with pytest.raises(ValueError, match=r"kept must be an int in \[1, 500\]"):
        t.prune_(501)  # a prune never lets numbers back
    with torch.no_grad():
        t.weight[tuple(t.mask.nonzero()[0])] = float("nan")  # a kept number (a pruned one is not ranked)
    with pytest.raises(ValueError, match="deeplight.v1: the table holds non-finite values"):
        t.prune_()
    assert t.kept == 500  # refused before the mask changed


@pytest.mark.parametrize("init_std", [0.01, 0.5])
def test_init_std_is_the_std_of_the_returned_vectors(init_std):
    t = DeepLightEmbedding([20_000, 8_000], 16, kept_numbers=1000, init_std=init_std)
    out = t(ids_for(t, batch=20_000))
    assert abs(out.std().item() / init_std - 1) < 0.05


# ---------------------------------------------------------------------------------------- the staged hook
def test_schedule_from_dict():
    s = DeepLightSchedule.from_dict({"train_epochs": 2, "finetune_epochs": 1})
    assert (s.train_epochs, s.finetune_epochs) == (2, 1)
    assert DeepLightSchedule.from_dict(None) == DeepLightSchedule()
    with pytest.raises(SpecError, match="did you mean 'train_epochs'"):
        DeepLightSchedule.from_dict({"train_epoch": 3})
    with pytest.raises(SpecError, match=r"m\.schedule: DeepLightSchedule: train_epochs must be a positive int or "
                                        r"None, got 0"):
        DeepLightSchedule.from_dict({"train_epochs": 0}, "m.schedule")


def test_fit_staged_ramps_prunes_to_the_target_and_fine_tunes():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    budget = baseline_bytes(data.cardinalities, 8) / 8
    spec = {"type": "deeplight.v1", "budget_bytes": budget, "prune_every": 2, "ramp_steps": 1, "sparse": True}
    table = build_table(spec, data.cardinalities, 8)
    assert table.trains_in_stages and table.schedule_type is DeepLightSchedule
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    stored = table.memory_report().total_bytes
    schedule = table.schedule_type.from_dict({"train_epochs": 1, "finetune_epochs": 1})
    fit = table.fit_staged(model, data, TrainConfig(epochs=3, batch_size=500, progress=False), schedule)
    assert fit.table is table and fit.model is model and set(fit.stages) == {"train", "prune", "finetune"}
    d = fit.details
    steps = math.ceil(len(data.split("train")) / 500)  # one epoch of the ramp
    assert d["ramp_steps_run"] == steps
    assert d["ramp_kept"] == ramp_kept(table.total_numbers, table.kept_numbers, steps - steps % 2, 1)
    assert table.kept_numbers < d["ramp_kept"] < table.total_numbers  # the ramp pruned, not to the target
    assert d["kept"] == table.kept_numbers == int(table.mask.sum()) and d["pruned"] == d["ramp_kept"] - d["kept"]
    assert table.kept == table.kept_numbers and int(table.steps) == 2 * steps  # fine-tuning kept the mask
    assert d["table_bytes"] == stored and d["ramp_optimizer_bytes"] > 0
    assert d["peak_training_bytes"] == stored + max(d["ramp_optimizer_bytes"], d["finetune_optimizer_bytes"])
    assert d["serving_bytes"] == table.memory_report().serving_bytes <= budget
    assert len(fit.result.history) == 1 and 0.0 <= fit.result.test_auc <= 1.0
    ids = torch.from_numpy(data.sparse[:64])
    assert torch.equal(table.export()(ids), table.eval()(ids))
    with pytest.raises(ValueError, match="not a submodule"):
        DeepLightEmbedding(data.cardinalities, 8).fit_staged(torch.nn.Linear(1, 1), data, TrainConfig(epochs=1),
                                                             schedule)
