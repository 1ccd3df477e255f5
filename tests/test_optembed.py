"""OptEmbed: the straight-through mask, the regulariser, the budgeted search, the schedule, retraining and the
compact export."""

import copy
import inspect
import io
import random

import numpy as np
import pytest
import torch
import yaml

from embcompress.contract import BudgetError
from embcompress.memory import baseline_bytes
from embcompress.optembed import (
    OptEmbedSchedule, SearchConfig, evolutionary_search, replace_table, rewind_, run_optembed,
)
from embcompress.registry import SpecError, build_model, build_table
from embcompress.runner import run_suite
from embcompress.suite import load_suite
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.tables.optembed import OptEmbed, OptEmbedExport, RowMaskSTE
from embcompress.training import TrainConfig, predict

from .conftest import assert_bytes

CARDS = [50, 7, 300, 3]


def ids_for(cards, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cards], dim=1)


# ------------------------------------------------------------------------------------------- supernet pieces
@pytest.mark.parametrize(
    ("u", "scale"),
    [(-2.0, 0.0), (-1.01, 0.0), (-1.0, 0.4), (-0.7, 0.4), (-0.41, 0.4), (-0.4, 0.4), (-0.25, 1.0), (0.0, 2.0),
     (0.1, 1.6), (0.3, 0.8), (0.4, 0.4), (0.5, 0.4), (1.0, 0.4), (1.01, 0.0), (3.0, 0.0)],
)
def test_straight_through_gradient_is_the_piecewise_formula(u, scale):
    x = torch.tensor([u], dtype=torch.float64, requires_grad=True)
    out = RowMaskSTE.apply(x)
    assert out.item() == (1.0 if u > 0 else 0.0)
    out.backward(torch.tensor([3.0], dtype=torch.float64))
    assert x.grad.item() == pytest.approx(3.0 * scale, abs=1e-12)


def test_threshold_gradient_flows_through_the_mask_of_looked_up_rows():
    table = OptEmbed(4, 2, init_std=0.1)
    with torch.no_grad():
        table.weight.copy_(torch.tensor([[0.1, 0.1], [0.3, -0.2], [2.0, 0.0], [0.05, 0.0]]))
    out = table.eval()(torch.tensor([0, 1, 2]))
    out.sum().backward()
    # d out.sum() / d t = -sum_rows (sum of the row) * scale(||e||_1 - t): rows 0, 1 in the window, row 2 beyond 1
    expected = -(0.2 * (2 - 4 * 0.2) + 0.1 * 0.4 + 2.0 * 0.0)
    assert table.threshold.grad.item() == pytest.approx(expected, rel=1e-6)


def test_regulariser_gradient_pushes_thresholds_up():
    table = OptEmbed(CARDS, 8).set_threshold_training(lr=0.1, alpha=0.5)
    reg = table.regularization_loss()
    assert reg.item() == pytest.approx(0.5 * len(CARDS))  # alpha * sum(exp(-0)) at t = 0
    reg.backward()
    assert bool((table.threshold.grad < 0).all())
    opt = torch.optim.SGD(table.sgd_parameter_groups())
    opt.step()
    torch.testing.assert_close(table.threshold.detach(), torch.full((len(CARDS),), 0.05))


def test_training_loop_updates_thresholds_with_their_own_sgd_rate():
    data = make_synthetic(SyntheticConfig(rows=6000, seed=3))
    torch.manual_seed(0)
    table = build_table({"type": "optembed.v1"}, data.cardinalities, 8).set_threshold_training(lr=0.5, alpha=0.1)
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [8]}, table, data.num_dense)
    from embcompress.training import train

    train(model, data, TrainConfig(epochs=1, batch_size=500, progress=False))
    assert bool((table.threshold > 0).all()), table.threshold


def test_training_mode_samples_every_width_and_eval_uses_the_set_widths():
    table = OptEmbed(5, 4)
    with torch.no_grad():
        table.weight.fill_(1.0)
    torch.manual_seed(0)
    widths = table.train()(torch.zeros(4000, dtype=torch.long)).ne(0).sum(-1)
    counts = torch.bincount(widths, minlength=5)
    assert counts[0] == 0 and bool((counts[1:] > 850).all()), counts  # Uniform{1..4}: ~1000 each
    table.eval().set_dims([3])
    assert table(torch.tensor([1, 2])).ne(0).sum(-1).tolist() == [3, 3]


def test_pruned_rows_output_zero_or_the_learned_field_vector():
    for oov in ("zero", "learned"):
        table = OptEmbed([3, 2], 2, oov=oov).eval()
        with torch.no_grad():
            table.weight.copy_(torch.tensor([[1.0, 1.0], [0.01, 0.0], [1.0, 0.0], [0.0, 0.01], [2.0, 2.0]]))
            table.threshold.fill_(0.5)
            if oov == "learned":
                table.oov.copy_(torch.tensor([[7.0, 8.0], [9.0, 10.0]]))
        out = table(torch.tensor([[1, 0], [0, 1]]))
        fill = [[0.0, 0.0], [0.0, 0.0]] if oov == "zero" else [[7.0, 8.0], [9.0, 10.0]]
        torch.testing.assert_close(out[0, 0], torch.tensor(fill[0]))  # field 0 row 1: pruned
        torch.testing.assert_close(out[0, 1], torch.tensor(fill[1]))  # field 1 row 0: pruned
        torch.testing.assert_close(out[1, 1], torch.tensor([2.0, 2.0]))


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="threshold must be one of"):
        OptEmbed(CARDS, 4, threshold="row")
    with pytest.raises(ValueError, match="optembed.v1: oov must be one of .*got 'none'"):
        OptEmbed(CARDS, 4, oov="none")
    with pytest.raises(ValueError, match="optembed.v1: threshold_lr must be a positive finite number, got 0"):
        OptEmbed(CARDS, 4).set_threshold_training(lr=0, alpha=0.1)
    with pytest.raises(ValueError, match=r"dims must lie in \[1, 4\]"):
        OptEmbed(CARDS, 4).set_dims([1, 2, 5, 1])
    with pytest.raises(ValueError, match="one width per field"):
        OptEmbed(CARDS, 4).set_dims([1, 2])


# ----------------------------------------------------------------------------------------------- the search
def _problem(seed: int, num_fields: int = 8, max_dim: int = 16):
    rng = random.Random(seed)
    kept = [rng.randint(1, 500) for _ in range(num_fields)]
    value = [rng.random() for _ in range(num_fields)]

    def size(c):
        return 100 + 4 * sum(k * d for k, d in zip(kept, c))

    def fitness(c):
        return sum(v * (1 - 0.8 ** d) for v, d in zip(value, c))

    return kept, size, fitness


@pytest.mark.parametrize("seed", range(5))
def test_evolution_never_evaluates_or_returns_a_candidate_over_budget(seed):
    kept, size, fitness = _problem(seed)
    budget = size([1] * 8) + random.Random(seed).randint(0, 4 * sum(kept) * 6)
    seen = []

    def tracked(c):
        seen.append(c)
        return fitness(c)

    res = evolutionary_search(8, 16, tracked, size, budget_bytes=budget, weights=kept,
                              cfg=SearchConfig(generations=8, seed=seed))
    assert res.bytes == size(res.best) <= budget
    assert seen and all(size(c) <= budget for c in seen)
    assert all(1 <= d <= 16 for c in seen for d in c)
    assert res.fitness == max(fitness(c) for c in seen)
    assert res.evaluations == len(set(seen)) == len(seen)  # each candidate is scored once


def test_evolution_is_deterministic_with_a_seed_and_improves_on_its_start():
    kept, size, fitness = _problem(11)
    budget = size([6] * 8)
    runs = [evolutionary_search(8, 16, fitness, size, budget_bytes=budget, weights=kept,
                                cfg=SearchConfig(generations=10, seed=s)) for s in (4, 4, 5)]
    assert runs[0].best == runs[1].best and runs[0].history == runs[1].history
    assert runs[0].history != runs[2].history
    assert runs[0].history[-1]["fitness"] > runs[0].history[0]["fitness"]


def test_evolution_without_budget_and_impossible_budget():
    kept, size, fitness = _problem(2)
    res = evolutionary_search(8, 16, fitness, size, cfg=SearchConfig(generations=30, seed=0))
    assert sum(res.best) >= 8 * 12  # fitness grows with every width, so the search climbs towards 16
    with pytest.raises(BudgetError, match="minimum budget"):
        evolutionary_search(8, 16, fitness, size, budget_bytes=size([1] * 8) - 1)


def test_crossover_mixes_parents_over_the_fields():
    # Two fields whose fitness needs one parent's first field and the other's second: only a crossover point
    # between the fields (drawn over the field count) can make the best child.
    def fitness(c):
        return float(c == (16, 16))

    cfg = SearchConfig(population=2, keep=2, mutations=0, crossovers=4, generations=3, seed=0)
    calls = []
    res = evolutionary_search(2, 16, lambda c: calls.append(c) or fitness(c), lambda c: 0, cfg=cfg)
    parents = calls[:2]
    assert all(c in {(p[0][0], p[1][1]) for p in (parents, parents[::-1])} | set(parents) for c in calls[2:])
    assert res.best in set(calls)


# ---------------------------------------------------------------------------------------- retrain & export
def _frozen_table(oov="zero", seed=0):
    torch.manual_seed(seed)
    table = OptEmbed(CARDS, 8, init_std=0.3, oov=oov)
    with torch.no_grad():
        table.threshold.copy_(torch.tensor([1.5, 0.5, 2.0, 0.1]))
        if table.oov is not None:
            table.oov.normal_()
    table.freeze([3, 8, 1, 5])
    return table.eval()


@pytest.mark.parametrize("oov", ["zero", "learned"])
def test_export_equals_the_retrained_table_and_model(oov):
    table = _frozen_table(oov)
    kept = table.kept_per_field()
    assert 0 < sum(kept) < sum(CARDS)
    ids = ids_for(CARDS, 1000, seed=1)
    export = table.export()
    assert torch.equal(export(ids), table(ids))
    assert export.memory_report().total_bytes == table.export_bytes([3, 8, 1, 5])
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [8]}, table, 3).eval()
    from embcompress.data import Batch

    batch = Batch(torch.rand(1000, 3), ids, torch.zeros(1000))
    before = predict(model, batch)
    replace_table(model, table, export)
    assert model.embeddings is export
    assert (before == predict(model, batch)).all()


def test_export_memory_report_equals_a_hand_count():
    table = OptEmbed([10, 3, 7], 4).eval()
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[0, 1, 2, 5, 10, 13, 14, 19]] = True  # kept: 4 in field 0, 1 in field 1, 3 in field 2
    table.freeze([2, 4, 1], mask)
    export = table.export()
    # values 4*2 + 1*4 + 3*1 fp32 and D = 4 trailing zeros; bitmap: one 64-row block = 8 uint8; block counts
    # 1 int32; int64 offsets, widths and bases for 3 fields
    expected = (4 * 2 + 1 * 4 + 3 * 1 + 4) * 4 + 8 + 4 + 3 * 3 * 8
    assert_bytes(export, expected, parameters=0)  # an inference table: buffers only
    assert table.export_bytes([2, 4, 1]) == expected


@pytest.mark.parametrize("density", [0.0, 0.3, 0.97, 1.0])
def test_export_rank_map_across_many_blocks(density):
    cards = [1000, 130, 70]
    torch.manual_seed(0)
    mask = torch.rand(sum(cards)) < density  # 1.0: every word has its sign bit set
    weight = torch.randn(sum(cards), 6)
    export = OptEmbedExport.from_rows(cards, 6, weight, mask, [6, 2, 4])
    rows = torch.arange(sum(cards))
    kept, rank = export._rank(rows)
    assert torch.equal(kept, mask)
    assert torch.equal(rank, torch.cumsum(mask.long(), 0) - mask.long())


def test_popcount64_counts_every_bit_of_signed_words():
    from embcompress.tables.optembed import _popcount64

    words = torch.randint(-(2**63), 2**63 - 1, (2000,), dtype=torch.int64, generator=torch.Generator().manual_seed(0))
    words = torch.cat([words, torch.tensor([0, -1, 1, -(2**63), 2**63 - 1])])
    expected = [bin(w & (2**64 - 1)).count("1") for w in words.tolist()]
    assert _popcount64(words).tolist() == expected


def test_an_export_saved_in_the_old_layout_still_loads():
    cards = [70, 30]
    mask = torch.rand(100, generator=torch.Generator().manual_seed(1)) < 0.5
    export = OptEmbedExport.from_rows(cards, 4, torch.randn(100, 4), mask, [4, 2])
    state = export.state_dict()
    old = {**state, "popcount": torch.zeros(256, dtype=torch.uint8), "values": state["values"][:-4]}
    loaded = OptEmbedExport.from_state_dict(old, cards, 4)
    ids = torch.stack([torch.arange(30), torch.arange(30)], 1)
    assert torch.equal(loaded(ids), export(ids))


def test_every_stage_survives_a_state_dict_round_trip():
    ids = ids_for(CARDS)
    supernet = OptEmbed(CARDS, 8, threshold="id", oov="learned").eval()
    with torch.no_grad():
        supernet.threshold.uniform_(0, 0.1)
        supernet.set_dims([2, 3, 4, 5])
    other = OptEmbed(CARDS, 8, threshold="id", oov="learned").eval()
    other.load_state_dict(supernet.state_dict())
    assert torch.equal(other.threshold, supernet.threshold) and other.dims.tolist() == [2, 3, 4, 5]
    assert torch.equal(other(ids), supernet(ids))

    frozen = _frozen_table("learned")
    buf = io.BytesIO()
    torch.save(frozen.state_dict(), buf)
    buf.seek(0)
    fresh = OptEmbed(CARDS, 8, oov="learned").eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    assert fresh.stage == "retrain" and torch.equal(fresh.row_mask, frozen.row_mask)
    assert torch.equal(fresh(ids), frozen(ids))

    export = frozen.export()
    buf = io.BytesIO()
    torch.save(export.state_dict(), buf)
    buf.seek(0)
    loaded = OptEmbedExport.from_state_dict(torch.load(buf, weights_only=True), CARDS, 8)
    assert torch.equal(loaded(ids), export(ids))


def test_budget_floor_is_the_id_map():
    with pytest.raises(BudgetError, match="minimum budget"):
        OptEmbed.from_budget([10**6], 16, budget_bytes=1000)


# ------------------------------------------------------------------------------------------- the pipeline
@pytest.fixture(scope="module")
def small_data():
    return make_synthetic(SyntheticConfig(rows=12000, seed=5))


@pytest.mark.slow
def test_pipeline_lands_under_budget_and_exports_the_retrained_model(small_data):
    data = small_data
    budget = baseline_bytes(data.cardinalities, 8) / 8
    torch.manual_seed(0)
    table = build_table({"type": "optembed.v1", "budget_bytes": budget}, data.cardinalities, 8)
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [8]}, table, data.num_dense)
    schedule = OptEmbedSchedule(threshold_lr=1.0, search=SearchConfig(generations=2, search_rows=800))
    fit = run_optembed(model, table, data, TrainConfig(epochs=2, batch_size=256, lr=0.01, progress=False), schedule)
    assert isinstance(fit.table, OptEmbedExport) and model.embeddings is fit.table
    assert fit.table.memory_report().total_bytes <= budget
    assert set(fit.stages) == {"supernet", "search", "retrain", "export"}
    assert fit.details["kept_rows"] < fit.details["total_rows"]
    assert fit.details["dims"] == fit.table.dims.tolist()
    assert len(fit.details["search_history"]) == 3  # the schedule's 2 generations after the initial population
    assert table.threshold_lr == 1.0  # the schedule's rate trained the thresholds
    assert 0.5 < fit.result.test_auc <= 1


@pytest.mark.slow
def test_the_runner_treats_optembed_as_one_method(tmp_path):
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "name": "oe", "data": {"synthetic": {"rows": 6000, "seed": 1}}, "embedding_dim": 8,
        "model": {"type": "dlrm.v1", "bottom_mlp": [8], "top_mlp": [8]},
        "train": {"epochs": 1, "batch_size": 500},
        "methods": [{"name": "optembed", "compression": [4],
                     "table": {"type": "optembed.v1"}}],
    }))
    records = run_suite(load_suite(suite_file), tmp_path / "out", progress=False)
    (rec,) = [r for r in records if r["status"] != "reference"]
    assert "error" not in rec, rec.get("error")
    assert rec["bytes"] <= rec["baseline_bytes"] / 4 and rec["ratio"] >= 4
    assert set(rec["stage_seconds"]) == {"supernet", "search", "retrain", "export"}
    assert rec["stages"]["kept_rows"] <= rec["stages"]["total_rows"]


def test_suite_spec_typos_in_optembed_options_are_caught(tmp_path):
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({
        "data": {"synthetic": {"rows": 1000}}, "model": {"type": "lr.v1"},
        "methods": [{"compression": [4], "table": {"type": "optembed.v1", "treshold": "id"}}],
    }))
    with pytest.raises(ValueError, match="did you mean 'threshold'"):
        load_suite(suite_file)
    # The schedule's options are not table options any more: the table refuses them by name.
    with pytest.raises(SpecError, match="unknown key 'generations'"):
        build_table({"type": "optembed.v1", "generations": 3}, CARDS, 4)


# ------------------------------------------------------------------------------------------- the schedule
def test_the_table_takes_only_table_options():
    options = [n for n, p in inspect.signature(OptEmbed).parameters.items() if p.kind is p.KEYWORD_ONLY]
    assert options == ["threshold", "oov", "init_std", "sparse", "budget_bytes"]
    assert OptEmbed.schedule_type is OptEmbedSchedule
    hook = inspect.signature(OptEmbed.fit_staged).parameters
    assert list(hook) == ["self", "model", "data", "cfg", "schedule"] and hook["schedule"].default is None


def test_schedule_from_a_flat_mapping():
    schedule = OptEmbedSchedule.from_dict({"threshold_lr": 0.3, "generations": 10, "search_rows": 20000,
                                           "rewind": False, "retrain_epochs": np.int64(2), "seed": 7})
    assert schedule == OptEmbedSchedule(threshold_lr=0.3, rewind=False, retrain_epochs=2,
                                        search=SearchConfig(generations=10, search_rows=20000, seed=7))
    assert type(schedule.retrain_epochs) is int
    assert OptEmbedSchedule.from_dict({}) == OptEmbedSchedule.from_dict(None) == OptEmbedSchedule()
    assert set(OptEmbedSchedule.keys()) == {"population", "keep", "mutations", "crossovers", "generations",
                                            "mutate_prob", "seed", "search_rows", "threshold_lr", "alpha",
                                            "rewind", "retrain_epochs", "prune"}


@pytest.mark.parametrize("mapping, pattern", [
    ({"generation": 3}, r"^suite\.yaml: methods\[2\]\.schedule: unknown key 'generation'; did you mean 'generations'"),
    ({"threshold": 0.1}, r"unknown key 'threshold'; did you mean 'threshold_lr'"),
    ({"search": {"generations": 3}}, r"unknown key 'search'.*accepted keys: population"),
    ({"rewind": "no"}, r"methods\[2\]\.schedule: OptEmbedSchedule: rewind must be a bool.*'no'"),
    ({"mutations": 2.7}, r"SearchConfig: mutations must be a non-negative int.*2\.7"),
    ({"generations": "5"}, r"SearchConfig: generations must be a non-negative int.*'5'"),
    ({"threshold_lr": 0}, r"OptEmbedSchedule: threshold_lr must be a positive finite number, got 0"),
    ({"alpha": -1.0}, r"OptEmbedSchedule: alpha must be a finite number >= 0, got -1\.0"),
    ({"retrain_epochs": 0}, r"OptEmbedSchedule: retrain_epochs must be a positive int or None, got 0"),
    ({"search_rows": 0}, r"SearchConfig: search_rows must be a positive int or None, got 0"),
    ([("generations", 3)], r"a schedule is a mapping"),
])
def test_bad_schedules_name_the_key_and_value(mapping, pattern):
    with pytest.raises(SpecError, match=pattern):
        OptEmbedSchedule.from_dict(mapping, "suite.yaml: methods[2].schedule")


def test_schedule_fields_are_validated_when_built():
    with pytest.raises(ValueError, match="OptEmbedSchedule: search must be a SearchConfig, got {'generations': 3}"):
        OptEmbedSchedule(search={"generations": 3})
    with pytest.raises(ValueError, match="OptEmbedSchedule: rewind must be a bool"):
        OptEmbedSchedule(rewind=1)
    with pytest.raises(ValueError, match="run_optembed: schedule must be an OptEmbedSchedule"):
        run_optembed(nn_holding(OptEmbed(CARDS, 4)), None, None, TrainConfig(), schedule={"rewind": False})


def nn_holding(table):
    return build_model({"type": "lr.v1"}, table, 0)


def test_rewind_keeps_the_threshold_objects_and_restores_everything_else():
    table = OptEmbed(CARDS, 4, oov="learned")
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [4], "top_mlp": [4]}, table, 3)
    initial = copy.deepcopy(model.state_dict())
    threshold = table.threshold
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = threshold.detach().clone()
    rewind_(model, initial, keep=[table.threshold])
    assert table.threshold is threshold and torch.equal(table.threshold, trained)
    for name, value in model.state_dict().items():
        if name.endswith("_extra_state"):
            continue
        expected = trained if value.data_ptr() == threshold.data_ptr() else initial[name]
        assert torch.equal(value, expected), name


def test_fit_staged_passes_the_schedule(small_data):
    torch.manual_seed(0)
    table = build_table({"type": "optembed.v1", "budget_bytes": baseline_bytes(small_data.cardinalities, 8) / 2},
                        small_data.cardinalities, 8)
    model = build_model({"type": "lr.v1"}, table, small_data.num_dense)
    schedule = OptEmbedSchedule.from_dict({"generations": 1, "search_rows": 300, "threshold_lr": 0.5,
                                           "rewind": False, "retrain_epochs": 1})
    fit = table.fit_staged(model, small_data, TrainConfig(epochs=1, batch_size=1000, progress=False), schedule)
    assert len(fit.details["search_history"]) == 2 and table.threshold_lr == 0.5
    assert len(fit.result.history) == 1  # retrain_epochs
    with pytest.raises(ValueError, match="not a submodule"):  # the model serves the export now
        table.fit_staged(model, small_data, TrainConfig(epochs=1, progress=False), schedule)
    with pytest.raises(ValueError, match="supernet stage, not 'retrain'"):  # the table was frozen
        table.fit_staged(nn_holding(table), small_data, TrainConfig(epochs=1, progress=False), schedule)


# ------------------------------------------------------------------------------------- dtypes and numpy ints
def test_a_bf16_table_returns_bf16_in_every_stage():
    table = OptEmbed(CARDS, 8, oov="learned").to(torch.bfloat16)
    ids = ids_for(CARDS, 16)
    assert table.train()(ids).dtype == torch.bfloat16
    assert table.eval().set_dims([1, 2, 3, 4])(ids).dtype == torch.bfloat16
    assert table.freeze([1, 2, 3, 4])(ids).dtype == torch.bfloat16


def test_numpy_int_cardinalities_are_accepted():
    cards = [np.int64(c) for c in CARDS]
    table = OptEmbed(cards, np.int64(4)).eval()
    assert table.cardinalities == tuple(CARDS)
    assert OptEmbed.from_budget(cards, 4, budget_bytes=10**5).cardinalities == tuple(CARDS)
    mask = torch.rand(sum(CARDS), generator=torch.Generator().manual_seed(0)) < 0.5
    weight = torch.randn(sum(CARDS), 4)
    export = OptEmbedExport.from_rows(cards, 4, weight, mask, [4, 3, 2, 1])
    single = OptEmbedExport.from_rows(np.int64(50), 4, weight[:50], mask[:50], [3])
    assert single.single and single(torch.tensor([0, 49])).shape == (2, 4)
    ids = ids_for(CARDS, 64)
    assert torch.equal(OptEmbedExport.from_state_dict(export.state_dict(), cards, 4)(ids), export(ids))
    loaded = OptEmbedExport.from_state_dict(single.state_dict(), np.int64(50), 4)
    assert torch.equal(loaded(torch.arange(50)), single(torch.arange(50)))


def test_a_checkpoint_saved_with_the_old_schedule_options_still_loads():
    table = _frozen_table()
    state = table.state_dict()
    extra = state["_extra_state"]
    old = {**extra["options"], "threshold_lr": 0.3, "alpha": 0.01, "population": 20, "keep": 10, "mutations": 10,
           "crossovers": 10, "generations": 10, "mutate_prob": 0.1, "search_rows": 20000, "rewind": True,
           "retrain_epochs": None}
    fresh = OptEmbed(CARDS, 8, init_std=0.3).eval()
    fresh.load_state_dict({**state, "_extra_state": {**extra, "options": old}})
    ids = ids_for(CARDS)
    assert fresh.stage == "retrain" and torch.equal(fresh(ids), table(ids))
    with pytest.raises(ValueError, match="built with threshold='field'; this table has threshold='id'"):
        OptEmbed(CARDS, 8, threshold="id").load_state_dict(state)


@pytest.mark.parametrize("ratio", [2, 4, 16, 64])
def test_budget_mode_lands_at_the_budget(small_data, ratio):
    """``prune="budget"``: asked for Nx, the export lands within 10% of Nx (at most the budget), where the learned
    thresholds alone would land wherever their learning rate took them."""
    data = small_data
    budget = baseline_bytes(data.cardinalities, 8) / ratio
    torch.manual_seed(0)
    table = build_table({"type": "optembed.v1", "budget_bytes": budget}, data.cardinalities, 8)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    schedule = OptEmbedSchedule(prune="budget", threshold_lr=1.0, search=SearchConfig(generations=2, search_rows=800))
    fit = run_optembed(model, table, data, TrainConfig(epochs=1, batch_size=500, lr=0.01, progress=False), schedule)
    served = fit.table.memory_report().total_bytes
    assert 0.9 * budget <= served <= budget
    assert fit.details["prune"] == "budget" and fit.details["kept_rows"] == int(table.row_mask.sum())
    assert 0.5 < fit.result.test_auc <= 1


def test_budget_mode_keeps_a_prefix_of_the_importance_order():
    from embcompress.optembed import _RowsByImportance

    torch.manual_seed(0)
    table = OptEmbed([40, 30, 20], 4, budget_bytes=600)
    with torch.no_grad():
        table.threshold.copy_(torch.tensor([0.0, 0.5, -0.5]))
    rows = _RowsByImportance(table)
    dims = (4, 2, 1)
    mask = rows.mask(dims)
    k = rows.rows(dims)
    assert int(mask.sum()) == k > 0
    assert table.export_bytes(dims, table.kept_per_field(mask)) <= 600
    bigger = torch.zeros_like(mask)
    bigger[rows.order[: k + 1]] = True
    assert table.export_bytes(dims, table.kept_per_field(bigger)) > 600
    importance = table.weight.abs().sum(-1) - table._row_thresholds()
    assert importance[mask].min() >= importance[~mask].max()
    assert rows.rows((1, 1, 1)) >= rows.rows((4, 4, 4))  # narrower widths keep more rows
    with pytest.raises(ValueError, match="prune"):
        OptEmbedSchedule(prune="top-k")
