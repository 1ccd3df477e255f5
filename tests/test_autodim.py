"""autodim.v1: the supernet and its temperature, the architecture weights, the budgeted choice, the served table's
bytes and export, budgets on the served table, checkpoints and the staged hook."""

import io
import math

import pytest
import torch

from embcompress import BudgetError, build_model, build_table
from embcompress.memory import baseline_bytes
from embcompress.specs import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic, scaled_cardinalities
from embcompress.tables.autodim import (
    AutoDimEmbedding, AutoDimSchedule, AutoDimServed, TemperatureClock, choose_dims, default_candidates, served_bytes,
)
from embcompress.training import TrainConfig, make_optimizers, train

CARDS = [300, 3, 57, 1000]


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def bags_for(cards, batch=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (len(cards), batch), generator=g)
    values = torch.cat([torch.randint(0, n, (int(lengths[f].sum()),), generator=g) for f, n in enumerate(cards)])
    return values, lengths


def reloaded(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# ------------------------------------------------------------------------------------------ the supernet
def test_the_supernet_holds_every_candidate_and_mixes_them_by_the_eval_weights():
    t = AutoDimEmbedding(CARDS, 8, candidates=[1, 4, 8]).eval()
    report = t.memory_report()
    names = {n: tuple(p.shape) for n, p in t.named_parameters()}
    assert names == {"tables.0": (1360, 1), "tables.1": (1360, 4), "tables.2": (1360, 8),
                     "projections.0": (4, 1, 8), "projections.1": (4, 4, 8), "alpha": (4, 3)}
    assert report.parameter_bytes == 4 * (1360 * 13 + 4 * 5 * 8 + 12)  # every candidate's rows and projections
    assert report.buffer_bytes == 4 * 8 + 8  # offsets, step count
    with torch.no_grad():
        t.alpha.copy_(torch.randn(4, 3))
    ids = ids_for(t)
    rows = ids + t.offsets
    tau = t.temperature()
    w = torch.softmax(t.alpha / tau, -1)
    e1 = torch.einsum("bfd,fde->bfe", t.tables[0][rows], t.projections[0])
    e4 = torch.einsum("bfd,fde->bfe", t.tables[1][rows], t.projections[1])
    e8 = t.tables[2][rows]
    expected = e1 * w[:, 0, None] + e4 * w[:, 1, None] + e8 * w[:, 2, None]
    torch.testing.assert_close(t(ids), expected)
    values, lengths = bags_for(CARDS)  # the bag path (per-id projections) agrees with the column path
    pooled = t.forward_bags(values, lengths, mode="mean")
    assert pooled.shape == (5, 4, 8)
    assert torch.equal(t.eval()(ids), t(ids))  # eval is deterministic


def test_training_mode_draws_gumbel_noise_and_the_forward_never_moves_the_clock():
    t = AutoDimEmbedding(CARDS, 8)
    ids = ids_for(t, batch=16)
    torch.manual_seed(1)
    a = t(ids)
    torch.manual_seed(1)
    b = t(ids)
    torch.manual_seed(2)
    c = t(ids)
    assert torch.equal(a, b) and not torch.equal(a, c)  # noise from the global generator
    assert int(t.steps) == 0  # forward passes do not advance the temperature
    w = t.train().mixing_weights()
    assert w.shape == (4, 4) and torch.allclose(w.sum(-1), torch.ones(4))


# ------------------------------------------------------------------------------------------- temperature
def test_temperature_follows_max_floor_one_minus_decay_times_steps():
    t = AutoDimEmbedding(CARDS, 8).set_temperature_schedule(decay=0.15, min_temperature=0.2)
    seen = []
    for _ in range(8):
        seen.append(t.temperature())
        t.advance_temperature_()
    assert seen == pytest.approx([1.0, 0.85, 0.7, 0.55, 0.4, 0.25, 0.2, 0.2])
    # the default is the benchmark's 0.00005 / 2000 per sample at TrainConfig's batch of 4096
    fresh = AutoDimEmbedding(CARDS, 8)
    assert fresh.temperature_decay == pytest.approx(0.00005 / 2000 * 4096) and fresh.min_temperature == 0.01
    # eval weights sharpen as the temperature falls: softmax(alpha / tau)
    with torch.no_grad():
        t.alpha.copy_(torch.tensor([[0.0, 0.1, 0.2, 0.3]] * 4))
    t.eval()
    sharp = t.mixing_weights()
    t.steps.zero_()
    flat = t.mixing_weights()
    torch.testing.assert_close(sharp, torch.softmax(t.alpha / 0.2, -1))
    assert sharp[0, -1] > flat[0, -1]


def test_the_training_loop_steps_the_clock_once_per_optimisation_step():
    data = make_synthetic(SyntheticConfig(rows=2000, seed=3))
    table = AutoDimEmbedding(data.cardinalities, 8).set_temperature_schedule(decay=1e-3, min_temperature=0.01)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    cfg = TrainConfig(epochs=2, batch_size=400, progress=False, patience=5)
    opts = make_optimizers(model, cfg)
    clocks = [o for o in opts if isinstance(o, TemperatureClock)]
    assert len(clocks) == 1 and clocks[0].state_dict()["state"] == {}
    result = train(model, data, cfg)
    steps_per_epoch = math.ceil(len(data.split("train")) / 400)
    assert int(table.steps) == steps_per_epoch * result.best_epoch  # the best epoch's state is kept
    assert table.temperature() == pytest.approx(1 - 1e-3 * int(table.steps))
    assert result.table_optimizer_bytes > 0  # Adam's moments; the clock holds none


# ------------------------------------------------------------------------------- architecture weights
def test_the_architecture_weights_move_in_a_short_training():
    data = make_synthetic(SyntheticConfig(rows=3000, seed=5))
    torch.manual_seed(0)
    table = AutoDimEmbedding(data.cardinalities, 8)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    assert torch.equal(table.alpha, torch.zeros_like(table.alpha))
    train(model, data, TrainConfig(epochs=1, batch_size=100, lr=0.01, progress=False))
    weights = table.architecture_weights()
    assert weights.shape == (26, 4) and torch.allclose(weights.sum(-1), torch.ones(26))
    assert (weights.max(-1).values - weights.min(-1).values).min() > 1e-3  # every field moved off uniform
    assert table.alpha.grad is not None


# ---------------------------------------------------------------------------------------------- the choice
def test_the_choice_is_the_argmax_when_it_fits():
    t = AutoDimEmbedding(CARDS, 8, candidates=[1, 2, 4, 8])
    assert t.chosen_dims() == [1, 1, 1, 1]  # tied weights: the narrowest
    with torch.no_grad():
        t.alpha.copy_(torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 3.0], [3.0, 0, 0, 0], [0, 3.0, 0, 0]]))
    assert t.chosen_dims() == [4, 8, 1, 2]
    t.budget_bytes = served_bytes(CARDS, 8, [4, 8, 1, 2])  # exactly enough
    assert t.chosen_dims() == [4, 8, 1, 2] and t.serving_bytes() == t.budget_bytes


def test_the_choice_fits_the_budget_trading_the_least_weight_per_byte():
    weights = [[0.0, 0.1, 0.2, 0.7],   # field 0 (300 ids): wants 8, 4 is a close second
               [0.0, 0.0, 0.0, 1.0],   # field 1 (3 ids)
               [0.1, 0.1, 0.1, 0.7],
               [0.0, 0.0, 0.45, 0.55]]  # field 3 (1000 ids): 8 over 4 by a hair, and its rows cost most
    cands = (1, 2, 4, 8)
    argmax = [8, 8, 8, 8]
    assert choose_dims(weights, CARDS, 8, cands) == (argmax, 0)
    budget = served_bytes(CARDS, 8, argmax) - 1
    dims, moves = choose_dims(weights, CARDS, 8, cands, budget)
    # field 3's step 8 -> 4 saves 1000 * 4 * 4 - 4 * 4 * 8 = 15,872 bytes for 0.10 of weight: the cheapest trade
    assert (dims, moves) == ([8, 8, 8, 4], 1)
    tight = served_bytes(CARDS, 8, [4, 8, 4, 2])
    dims, moves = choose_dims(weights, CARDS, 8, cands, tight)
    assert served_bytes(CARDS, 8, dims) <= tight and moves > 1
    floor = served_bytes(CARDS, 8, [1, 1, 1, 1])  # every field at its cheapest candidate
    assert choose_dims(weights, CARDS, 8, cands, floor)[0] == [1, 1, 1, 1]
    with pytest.raises(BudgetError, match=f"minimum budget {floor:,} bytes"):
        choose_dims(weights, CARDS, 8, cands, floor - 1)
    # a field of one id is cheapest at full width (8 numbers against 1 + a [1, 8] projection): it moves up there
    one = [300, 1, 57, 1000]
    floor = served_bytes(one, 8, [1, 8, 1, 1])
    assert choose_dims([[1.0, 0, 0, 0]] * 4, one, 8, cands, floor) == ([1, 8, 1, 1], 1)


def test_a_budgeted_supernet_serves_within_its_budget_whatever_the_weights():
    base = baseline_bytes(CARDS, 8)
    t = AutoDimEmbedding.from_budget(CARDS, 8, budget_bytes=base / 3)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        with torch.no_grad():
            t.alpha.copy_(torch.randn(4, 4, generator=g) * 3)
        assert t.serving_bytes() <= t.budget_bytes == int(base / 3)
        served = t.served_table()
        assert served.dims == tuple(t.chosen_dims()) and served.memory_report().total_bytes == t.serving_bytes()


# ------------------------------------------------------------------------------------------ served table
def test_served_bytes_by_hand():
    t = AutoDimServed([300, 3, 57, 1000], 8, dims=[4, 8, 1, 4])
    # groups by width: 1 -> field 2 (57 rows), 4 -> fields 0 and 3 (1300 rows), 8 -> field 1 (3 rows)
    assert t.widths == (1, 4, 8)
    assert [tuple(w.shape) for w in t.weights] == [(57, 1), (1300, 4), (3, 8)]
    assert [tuple(p.shape) for p in t.projections] == [(1, 1, 8), (2, 4, 8)]
    expected = 4 * (300 * 4 + 3 * 8 + 57 * 1 + 1000 * 4) + 4 * 8 * (4 + 1 + 4) + 3 * 8 * 4
    report = t.memory_report()
    assert report.total_bytes == report.serving_bytes == t.serving_bytes() == expected
    assert served_bytes([300, 3, 57, 1000], 8, [4, 8, 1, 4]) == expected
    assert report.baseline_bytes == 1360 * 8 * 4
    # the supernet's planned serving bytes are those of its choice
    s = AutoDimEmbedding([300, 3, 57, 1000], 8, candidates=[1, 4, 8])
    assert s.serving_bytes() == 4 * 1360 * 1 + 4 * 8 * 4 + 3 * 8 * 4


def test_served_rows_and_projections_make_the_vectors():
    t = AutoDimServed(CARDS, 8, dims=[4, 8, 1, 4])
    ids = ids_for(t)
    out = t(ids)
    shift, slot = t.field_shift, t.field_slot
    for f, d in enumerate(t.dims):
        g = t.widths.index(d)
        rows = t.weights[g][ids[:, f] + shift[f]]
        want = rows if d == 8 else rows @ t.projections[g][slot[f]]
        torch.testing.assert_close(out[:, f], want)
    values, lengths = bags_for(CARDS)
    pooled = t.forward_bags(values, lengths)
    pos = 0
    for f in range(4):
        for b in range(5):
            k = int(lengths[f, b])
            one = torch.zeros(k, 4, dtype=torch.long)
            one[:, f] = values[pos:pos + k]
            torch.testing.assert_close(pooled[b, f], t(one)[:, f].sum(0))
            pos += k


@pytest.mark.parametrize("sparse", [False, True])
def test_export_equals_the_eval_outputs_bit_for_bit(sparse):
    t = AutoDimServed(CARDS, 8, dims=[2, 8, 1, 4], sparse=sparse)
    opt = torch.optim.SparseAdam(t.sparse_parameters(), lr=0.1) if sparse else torch.optim.Adam(t.parameters(), 0.1)
    t(ids_for(t, seed=4)).pow(2).sum().backward()  # trained a step, so the rows are not their init
    opt.step()
    served = t.export()
    assert not served.training and not any(p.requires_grad for p in served.parameters())
    ids = ids_for(t, batch=2000)
    assert torch.equal(served(ids), t.eval()(ids))
    values, lengths = bags_for(CARDS, batch=50)
    weights = torch.rand(values.shape)
    for mode in ("sum", "mean"):
        assert torch.equal(served.forward_bags(values, lengths, mode=mode, weights=weights),
                           t.forward_bags(values, lengths, mode=mode, weights=weights))
    assert served.memory_report().total_bytes == t.serving_bytes()
    with pytest.raises(ValueError, match="fp32"):
        t.export("int8")
    with pytest.raises(BudgetError, match="cannot compress"):
        AutoDimServed.from_budget(CARDS, 8, budget_bytes=10**6)
    with pytest.raises(ValueError, match="run fit_staged"):
        AutoDimEmbedding(CARDS, 8).export()


def test_a_single_served_table_takes_ids_of_any_shape():
    t = AutoDimServed(500, 8, dims=2)
    ids = torch.tensor([[0, 499, 3], [7, 7, 7]])
    out = t(ids)
    assert out.shape == (2, 3, 8) and torch.equal(out[1, 0], out[1, 2])
    assert torch.equal(t.export()(ids), t.eval()(ids))


@pytest.mark.parametrize("init_std", [1e-3, 0.3])
def test_init_std_is_the_std_of_the_served_tables_vectors(init_std):
    cards = [20_000, 3, 570, 8_000]
    t = AutoDimServed(cards, 16, dims=[2, 16, 4, 1], init_std=init_std)
    out = t(torch.stack([torch.randint(0, n, (20_000,)) for n in cards], 1))
    assert abs(out.std().item() / init_std - 1) < 0.1


# ----------------------------------------------------------------------------------------------- checkpoints
def test_the_served_table_saves_and_loads():
    t = AutoDimServed(CARDS, 8, dims=[2, 8, 1, 4])
    torch.optim.Adam(t.parameters(), 0.1).zero_grad()
    ids = ids_for(t)
    state = reloaded(t.state_dict())
    fresh = AutoDimServed(CARDS, 8, dims=[2, 8, 1, 4], init_std=0.5)
    assert not torch.equal(fresh(ids), t(ids))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(ids), t(ids))
    again = AutoDimServed.from_state_dict(state)
    assert again.dims == (2, 8, 1, 4) and torch.equal(again(ids), t(ids))
    assert torch.equal(AutoDimServed.from_state_dict(reloaded(t.export().state_dict()))(ids), t(ids))
    with pytest.raises(ValueError, match=r"dims=\[2, 8, 1, 4\].*dims=\[2, 8, 2, 4\]"):
        AutoDimServed(CARDS, 8, dims=[2, 8, 2, 4]).load_state_dict(state)


def test_the_supernet_saves_and_loads_with_its_clock():
    t = AutoDimEmbedding(CARDS, 8, budget_bytes=20_000).advance_temperature_(7)
    with torch.no_grad():
        t.alpha.normal_()
    other = AutoDimEmbedding(CARDS, 8)  # another budget: it shapes the choice, not what the tensors mean
    other.load_state_dict(reloaded(t.state_dict()))
    ids = ids_for(t)
    assert int(other.steps) == 7 and torch.equal(other.eval()(ids), t.eval()(ids))
    with pytest.raises(ValueError, match="candidates"):
        AutoDimEmbedding(CARDS, 8, candidates=[2, 4, 8]).load_state_dict(reloaded(t.state_dict()))


# ---------------------------------------------------------------------------------------------- options
def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"autodim.v1: candidates must be widths in \[1, 8\].*\[2, 16\]"):
        AutoDimEmbedding(CARDS, 8, candidates=[2, 16])
    with pytest.raises(ValueError, match=r"autodim.v1: candidates must be strictly increasing, got \[4, 2\]"):
        AutoDimEmbedding(CARDS, 8, candidates=[4, 2])
    with pytest.raises(ValueError, match=r"autodim.v1: candidates\[1\] must be a positive int, got 0"):
        AutoDimEmbedding(CARDS, 8, candidates=[2, 0])
    with pytest.raises(ValueError, match=r"autodim.v1: budget_bytes must be a positive finite number or None"):
        AutoDimEmbedding(CARDS, 8, budget_bytes=0)
    with pytest.raises(ValueError, match=r"autodim.v1 \(served\): dims must be widths in \[1, 8\]"):
        AutoDimServed(CARDS, 8, dims=[2, 9, 1, 1])
    with pytest.raises(ValueError, match=r"dims has 3 entries for 4 fields"):
        AutoDimServed(CARDS, 8, dims=[2, 8, 1])
    with pytest.raises(ValueError, match=r"min_temperature must be a finite number in \(0, 1\], got 0"):
        AutoDimEmbedding(CARDS, 8).set_temperature_schedule(decay=0.1, min_temperature=0)
    assert default_candidates(16) == (1, 2, 4, 8, 16) and AutoDimEmbedding(CARDS, 4).candidates == (1, 2, 4)


def test_schedule_from_dict():
    s = AutoDimSchedule.from_dict({"search_epochs": 2, "retrain_epochs": 1, "temperature_decay": 1e-6})
    assert (s.search_epochs, s.retrain_epochs, s.temperature_decay, s.min_temperature) == (2, 1, 1e-6, 0.01)
    assert AutoDimSchedule.from_dict(None) == AutoDimSchedule()
    assert AutoDimSchedule().temperature_decay == 0.00005 / 2000
    with pytest.raises(SpecError, match="did you mean 'min_temperature'"):
        AutoDimSchedule.from_dict({"min_temp": 0.1})
    with pytest.raises(SpecError, match=r"m\.schedule: AutoDimSchedule: search_epochs must be a positive int or "
                                        r"None, got 0"):
        AutoDimSchedule.from_dict({"search_epochs": 0}, "m.schedule")
    with pytest.raises(SpecError, match=r"min_temperature must be a finite number in \(0, 1\], got 1\.5"):
        AutoDimSchedule.from_dict({"min_temperature": 1.5})


# -------------------------------------------------------------------------------------------------- budgets
SYNTH_CARDS = list(scaled_cardinalities(SyntheticConfig().cardinality_exponent))  # 51,384 ids in 26 fields
# every field at width 1 (its cheapest: 4 n + a [1, 16] projection; no field has a single id), 3 int64 per field
MINIMUM = 4 * 51_384 + 26 * 16 * 4 + 26 * 3 * 8


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256, 1000])
def test_budgets_bind_the_served_table_or_name_the_minimum(ratio):
    assert sum(SYNTH_CARDS) == 51_384 and MINIMUM == 207_824
    budget = baseline_bytes(SYNTH_CARDS, 16) / ratio
    if budget < MINIMUM:  # 16x and beyond: under width 1 in every field (15.8x)
        with pytest.raises(BudgetError, match=r"autodim.v1: .*minimum budget 207,824 bytes"):
            AutoDimEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
        return
    with torch.device("meta"):  # sizes only: nothing is allocated
        t = AutoDimEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
    assert t.budget_bytes == int(budget) and t.serving_bytes() <= budget
    full = [[0.0] * 4 + [1.0]] * 26  # weights that want the full width everywhere: the budget decides
    dims, moves = choose_dims(full, SYNTH_CARDS, 16, t.candidates, t.budget_bytes)
    assert moves > 0 and served_bytes(SYNTH_CARDS, 16, dims) <= budget


def test_the_minimum_budget_is_built_and_a_budget_over_the_full_table_is_capped():
    with torch.device("meta"):
        t = AutoDimEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM)
        assert t.serving_bytes() == MINIMUM and t.minimum_serving_bytes() == MINIMUM
        big = AutoDimEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=10**12)
    assert big.budget_bytes == AutoDimEmbedding.budget_ceiling(SYNTH_CARDS, 16)
    # narrower candidates cannot go under width 1; a floor of 2 stops at about 8x
    with pytest.raises(BudgetError, match="minimum budget"):
        AutoDimEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=baseline_bytes(SYNTH_CARDS, 16) / 10,
                                     candidates=[2, 4, 8, 16])


# ---------------------------------------------------------------------------------------- the staged hook
def test_fit_staged_searches_chooses_within_the_budget_and_retrains():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    budget = baseline_bytes(data.cardinalities, 8) / 4
    table = build_table({"type": "autodim.v1", "budget_bytes": budget, "sparse": True}, data.cardinalities, 8,
                        field_names=data.field_names)
    assert table.trains_in_stages and table.schedule_type is AutoDimSchedule
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    schedule = table.schedule_type.from_dict({"search_epochs": 1, "retrain_epochs": 1, "temperature_decay": 1e-4})
    cfg = TrainConfig(epochs=3, batch_size=500, progress=False)
    fit = table.fit_staged(model, data, cfg, schedule)
    served = fit.table
    assert isinstance(served, AutoDimServed) and fit.model is model and set(fit.stages) == {"search", "retrain"}
    assert not any(m is table for m in model.modules()) and any(m is served for m in model.modules())
    assert served.field_names == tuple(data.field_names) and served.sparse
    d = fit.details
    assert list(served.dims) == d["dims"] and len(d["architecture_weights"]) == 26
    assert d["search_steps"] == 7 and d["temperature"] == pytest.approx(1 - 1e-4 * 500 * 7)  # 3,200 rows / 500
    assert d["peak_training_bytes"] == d["supernet_bytes"] + d["supernet_optimizer_bytes"]
    assert d["supernet_bytes"] == table.memory_report().total_bytes > served.memory_report().total_bytes
    assert d["serving_bytes"] == served.memory_report().serving_bytes == served_bytes(
        data.cardinalities, 8, served.dims) <= budget
    expected, _ = choose_dims(d["architecture_weights"], data.cardinalities, 8, table.candidates, int(budget))
    assert d["dims"] == expected
    assert len(fit.result.history) == 1 and 0.0 <= fit.result.test_auc <= 1.0
    ids = torch.from_numpy(data.sparse[:64])
    assert torch.equal(served.export()(ids), served.eval()(ids))
    with pytest.raises(ValueError, match="not a submodule"):  # the supernet is out of the model now
        table.fit_staged(model, data, cfg, schedule)
    with pytest.raises(ValueError, match="AutoDimSchedule"):
        AutoDimEmbedding(data.cardinalities, 8).fit_staged(model, data, cfg, {"search_epochs": 1})
