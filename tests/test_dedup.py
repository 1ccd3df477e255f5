"""dedup.v1: the full stage, LSH grouping, the served blocks and remap and their bytes, budgets on the served
table, fine-tuning, checkpoints across the stage change and the staged hook."""

import io

import pytest
import torch

from embcompress import BudgetError, build_model, build_table
from embcompress.memory import baseline_bytes
from embcompress.specs import SpecError
from embcompress.synthetic import SyntheticConfig, make_synthetic, scaled_cardinalities
from embcompress.tables.dedup import DedupEmbedding, DedupExport, DedupSchedule, lsh_groups
from embcompress.training import TrainConfig

CARDS = [300, 3, 57, 1000]  # 1,360 rows: 340 blocks of 4


def ids_for(table, batch=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in table.cardinalities], 1)


def reloaded(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def planted(n: int = 40, dim: int = 4, block_rows: int = 2, copies=(3, 7, 11), **options) -> DedupEmbedding:
    """A table whose blocks ``copies`` are one block, bit for bit; the others are independent random rows."""
    t = DedupEmbedding(n, dim, block_rows=block_rows, **options)  # a single table: ids of any shape
    with torch.no_grad():
        w = t.weight.view(-1, block_rows, dim)
        for c in copies[1:]:
            w[c] = w[copies[0]]
    return t


# ------------------------------------------------------------------------------------------- the full stage
def test_before_dedup_it_is_the_full_table_and_reports_its_training_bytes():
    t = DedupEmbedding(CARDS, 8, kept_blocks=20, sparse=False)
    ids = ids_for(t)
    assert torch.equal(t(ids), t.weight[ids + t.offsets])
    report = t.memory_report()
    assert report.total_bytes == 1360 * 8 * 4 + 4 * 8  # the full fp32 rows and the offsets; the remap is empty
    opt = torch.optim.Adam(t.parameters(), lr=0.1)
    t(ids).pow(2).sum().backward()
    opt.step()
    trained = t.memory_report([opt])
    assert trained.training_bytes == report.total_bytes + 2 * 1360 * 8 * 4 + 4  # Adam's two moments, its step
    assert trained.serving_bytes == 20 * 4 * 8 * 4 + 340 * 1 + 4 * 8  # what it will serve: at most 20 blocks


# ------------------------------------------------------------------------------------------ served bytes
def test_served_bytes_by_hand_before_and_after_dedup():
    t = DedupEmbedding([10, 3, 7], 4, kept_blocks=2, block_rows=4)
    planned = 2 * 4 * 4 * 4 + 5 * 1 + 3 * 8  # 2 blocks x 4 rows x D=4 fp32; uint8 remap of ceil(20/4)=5; offsets
    assert t.serving_bytes() == DedupEmbedding.planned_bytes([10, 3, 7], 4, kept_blocks=2, block_rows=4) == planned
    stats = t.dedup_()
    assert stats["kept"] == 2 and stats["blocks"] == 5
    assert t.weight.shape == (8, 4) and t.remap.shape == (5,) and t.remap.dtype == torch.uint8
    assert t.serving_bytes() == t.memory_report().total_bytes == t.export().memory_report().total_bytes == planned


@pytest.mark.parametrize("kept, dtype, size", [(1, torch.uint8, 1), (256, torch.uint8, 1), (257, torch.int16, 2),
                                               (32_768, torch.int16, 2), (32_769, torch.int32, 4)])
def test_remap_dtype_is_the_smallest_that_holds_the_kept_count(kept, dtype, size):
    cards, br = [150_000, 50_003], 4
    blocks = -(-200_003 // br)
    expected = 4 * kept * br * 16 + blocks * size + 2 * 8
    assert DedupEmbedding.planned_bytes(cards, 16, kept_blocks=kept, block_rows=br) == expected
    if kept <= 256:  # deduplicate for real (the small ones): the served remap has that dtype and those bytes
        t = DedupEmbedding([1200], 2, kept_blocks=kept, block_rows=br)
        t.dedup_()
        assert t.remap_index.dtype == dtype and t.remap_index.numel() == 300 and t.remap.numel() == 300 * size
        assert t.serving_bytes() == 4 * kept * br * 2 + 300 * size + 8


# ------------------------------------------------------------------------------------------------ the LSH
def test_lsh_is_deterministic_under_a_seed():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(3))
    a, info = lsh_groups(x, 60, seed=5)
    b, _ = lsh_groups(x.clone(), 60, seed=5)
    c, _ = lsh_groups(x, 60, seed=6)
    assert torch.equal(a, b) and int(a.max()) + 1 == 60 and info["widenings"] > 0
    assert not torch.equal(a, c)  # another seed, other projections
    # groups are numbered by their first block
    firsts = [int((a == g).nonzero()[0]) for g in range(60)]
    assert firsts == sorted(firsts)
    t1, t2 = DedupEmbedding([2000], 4, kept_blocks=50, seed=2), DedupEmbedding([2000], 4, kept_blocks=50, seed=2)
    t2.load_state_dict(t1.state_dict())
    t1.dedup_()
    t2.dedup_()
    assert torch.equal(t1.remap, t2.remap) and torch.equal(t1.weight, t2.weight)


def test_identical_blocks_are_merged_and_different_ones_are_not():
    t = planted()  # 20 blocks of 2 rows; blocks 3, 7 and 11 identical
    stats = t.dedup_()  # no budget pressure (kept_blocks: every block)
    remap = t.remap_index.long()
    assert stats["natural_groups"] == stats["kept"] == 18 and stats["widenings"] == 0
    assert remap[3] == remap[7] == remap[11]
    others = [int(remap[b]) for b in range(20) if b not in (7, 11)]
    assert len(set(others)) == 18  # every other block keeps its own copy


def test_the_remap_changes_outputs_only_where_blocks_were_merged():
    t = DedupEmbedding([20, 13, 7], 4, kept_blocks=6, block_rows=2)  # 20 blocks down to 6: merges forced
    ids = torch.cartesian_prod(torch.arange(20), torch.arange(13), torch.arange(7))
    before_rows = t.weight.detach().clone()
    before = t(ids).detach()
    t.dedup_()
    after = t(ids).detach()
    remap = t.remap_index.long()
    sizes = torch.bincount(remap, minlength=6)
    rows = ids + t.offsets
    for f in range(3):
        block = rows[:, f] // 2
        alone = sizes[remap[block]] == 1
        assert torch.equal(after[alone, f], before[alone, f])  # a block in a group of one is unchanged, bit for bit
        for r in rows[~alone, f].unique().tolist():  # a merged row: the mean of that row of its group's blocks
            members = (remap == remap[r // 2]).nonzero().flatten()
            expect = before_rows[[int(m) * 2 + r % 2 for m in members if int(m) * 2 + r % 2 < 40]].double().mean(0)
            torch.testing.assert_close(t.weight[remap[r // 2] * 2 + r % 2].double(), expect)
    assert int(sizes.max()) > 1


def test_the_padding_of_the_last_block_does_not_dilute_its_group():
    t = DedupEmbedding([10], 2, kept_blocks=2, block_rows=4)  # blocks: rows 0-3, 4-7, and 8-9 + 2 padding rows
    with torch.no_grad():
        t.weight[4:8] = 100.0  # far from the others
        t.weight[8:10] = t.weight[0:2]
    first = t.weight[0:4].detach().clone()
    t.dedup_()
    assert t.remap_index.tolist() == [0, 1, 0]
    assert torch.equal(t.weight[0:4], first)  # rows 2, 3 averaged over block 0 alone, not halved by the padding


# ------------------------------------------------------------------------------------- export & fine-tuning
def test_export_serves_exactly_the_deduplicated_tables_outputs():
    t = DedupEmbedding(CARDS, 8, kept_blocks=37, sparse=True)
    with pytest.raises(ValueError, match="call dedup_"):
        t.export()
    t.dedup_()
    ids = ids_for(t, batch=2000)
    served = t.export()
    assert isinstance(served, DedupExport) and not served.training
    assert {n for n, _ in served.named_buffers()} == {"blocks", "remap", "offsets"} and not list(served.parameters())
    assert torch.equal(served(ids), t.eval()(ids)) and torch.equal(served(ids), t.train()(ids))
    lengths = torch.randint(0, 4, (4, 5), generator=torch.Generator().manual_seed(1))
    values = torch.cat([torch.randint(0, CARDS[f], (int(lengths[f].sum()),)) for f in range(4)])
    assert torch.equal(served.forward_bags(values, lengths), t.forward_bags(values, lengths))
    assert served.memory_report().total_bytes == t.serving_bytes()
    with pytest.raises(BudgetError, match="cannot compress"):
        DedupExport.from_budget(CARDS, 8, budget_bytes=10**6)


def test_fine_tuning_updates_the_kept_blocks_with_sparse_gradients():
    t = planted(sparse=True)
    t.dedup_()
    kept_row = int(t.remap_index[3]) * 2  # row 0 of the block that blocks 3, 7 and 11 share
    ids = torch.tensor([6, 14, 22])  # row 0 of blocks 3, 7 and 11
    before = t.weight.detach().clone()
    out = t(ids)
    out.sum().backward()
    grad = t.weight.grad
    assert grad.is_sparse
    assert torch.equal(grad.to_dense()[kept_row], torch.full((4,), 3.0))  # the three ids' gradients add up
    torch.optim.SparseAdam(t.sparse_parameters(), lr=0.1).step()
    changed = (t.weight.detach() != before).any(1).nonzero().flatten().tolist()
    assert changed == [kept_row]
    assert torch.equal(t(ids)[0], t(ids)[2])  # still one block


# ---------------------------------------------------------------------------------------------- checkpoints
def test_a_deduplicated_table_saves_and_reloads_into_a_fresh_table():
    t = DedupEmbedding(CARDS, 8, kept_blocks=300, seed=4)
    t.dedup_()
    state = reloaded(t.state_dict())
    fresh = DedupEmbedding(CARDS, 8, kept_blocks=300, seed=1)  # the full stage, another seed
    fresh.load_state_dict(state)
    assert fresh.deduplicated and fresh.seed == 4
    assert fresh.weight.shape == t.weight.shape and fresh.remap_index.dtype == torch.int16
    ids = ids_for(t)
    assert torch.equal(fresh(ids), t(ids)) and fresh.serving_bytes() == t.serving_bytes()
    # and back: a full-stage checkpoint restores the full layout
    full = DedupEmbedding(CARDS, 8, kept_blocks=300)
    fresh.load_state_dict(reloaded(full.state_dict()))
    assert not fresh.deduplicated and torch.equal(fresh(ids), full(ids))
    with pytest.raises(ValueError, match="kept_blocks=300.*kept_blocks=200"):
        DedupEmbedding(CARDS, 8, kept_blocks=200).load_state_dict(state)


def test_a_remap_outside_the_kept_blocks_is_refused():
    t = DedupEmbedding(CARDS, 8, kept_blocks=30)
    t.dedup_()
    state = t.state_dict()
    state["remap"] = state["remap"].clone()
    state["remap"][5] = 200
    with pytest.raises(ValueError, match="outside its"):
        DedupEmbedding(CARDS, 8, kept_blocks=30).load_state_dict(state)


# ------------------------------------------------------------------------------------------------- options
def test_options_are_checked_naming_the_option_and_value():
    with pytest.raises(ValueError, match=r"dedup.v1: kept_blocks must be an int in \[1, 340\] or None, got 341"):
        DedupEmbedding(CARDS, 8, kept_blocks=341)
    with pytest.raises(ValueError, match=r"dedup.v1: block_rows must be a positive int, got 0"):
        DedupEmbedding(CARDS, 8, block_rows=0)
    with pytest.raises(ValueError, match=r"dedup.v1: seed must be .*got -1"):
        DedupEmbedding(CARDS, 8, seed=-1)
    with pytest.raises(ValueError, match=r"dedup.v1: bucket_width must be a positive finite number, got 0"):
        DedupEmbedding(CARDS, 8).dedup_(bucket_width=0)
    t = DedupEmbedding(CARDS, 8)
    t.dedup_()
    with pytest.raises(ValueError, match="deduplicated already"):
        t.dedup_()


# -------------------------------------------------------------------------------------------------- budgets
SYNTH_CARDS = list(scaled_cardinalities(SyntheticConfig().cardinality_exponent))  # 51,384 ids in 26 fields
MINIMUM = 4 * 4 * 16 + 12_846 * 1 + 26 * 8  # one kept block of 4 rows, a uint8 remap of 12,846 blocks, offsets


@pytest.mark.parametrize("ratio", [2, 4, 16, 64, 256, 1000])
def test_budgets_bind_the_served_table_or_name_the_minimum(ratio):
    assert sum(SYNTH_CARDS) == 51_384 and MINIMUM == 13_310
    budget = baseline_bytes(SYNTH_CARDS, 16) / ratio
    if budget < MINIMUM:  # 256x and 1000x: the remap alone is over the budget
        with pytest.raises(BudgetError, match=r"dedup.v1: .*minimum budget 13,310 bytes"):
            DedupEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
        return
    t = DedupEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=budget)
    assert t.budget_bytes == int(budget) and not t.deduplicated
    assert 0.95 * budget <= t.serving_bytes() <= budget  # planned
    assert DedupEmbedding.planned_bytes(SYNTH_CARDS, 16, kept_blocks=t.kept_blocks + 1) > budget  # the largest
    if ratio in (16, 64):
        t.dedup_()
        assert int(t.remap_index.long().max()) + 1 <= t.kept_blocks and t.serving_bytes() <= budget  # served


def test_the_minimum_budget_is_built_and_block_rows_reaches_further():
    t = DedupEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=MINIMUM)
    assert t.kept_blocks == 1 and t.serving_bytes() == MINIMUM
    base = baseline_bytes(SYNTH_CARDS, 16)
    wider = DedupEmbedding.from_budget(SYNTH_CARDS, 16, budget_bytes=base / 256, block_rows=8)  # 256x: 8-row blocks
    assert wider.serving_bytes() <= base / 256


# ---------------------------------------------------------------------------------------- the staged hook
def test_schedule_from_dict():
    s = DedupSchedule.from_dict({"train_epochs": 2, "finetune_epochs": 1, "bucket_width": 0.1})
    assert (s.train_epochs, s.finetune_epochs, s.bucket_width, s.hashes) == (2, 1, 0.1, 16)
    assert DedupSchedule.from_dict(None) == DedupSchedule()
    with pytest.raises(SpecError, match="did you mean 'hashes'"):
        DedupSchedule.from_dict({"hash": 3})
    with pytest.raises(SpecError, match=r"m\.schedule: DedupSchedule: finetune_epochs must be a positive int or "
                                        r"None, got 0"):
        DedupSchedule.from_dict({"finetune_epochs": 0}, "m.schedule")
    with pytest.raises(SpecError, match=r"hashes must be a positive int, got 2\.5"):
        DedupSchedule.from_dict({"hashes": 2.5})


def test_fit_staged_trains_deduplicates_and_fine_tunes():
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    budget = baseline_bytes(data.cardinalities, 8) / 8
    table = build_table({"type": "dedup.v1", "budget_bytes": budget, "sparse": True}, data.cardinalities, 8)
    assert table.trains_in_stages and table.schedule_type is DedupSchedule
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    full_bytes = table.memory_report().total_bytes
    schedule = table.schedule_type.from_dict({"train_epochs": 1, "finetune_epochs": 1})
    fit = table.fit_staged(model, data, TrainConfig(epochs=3, batch_size=500, progress=False), schedule)
    assert fit.table is table and table.deduplicated and fit.model is model
    assert set(fit.stages) == {"train", "dedup", "finetune"}
    assert fit.details["full_table_bytes"] == full_bytes and fit.details["full_optimizer_bytes"] > 0
    assert fit.details["kept"] <= table.kept_blocks
    # what the runner reports as training bytes: stage 1's full table, over the fine-tuned table's
    assert fit.details["peak_training_bytes"] == full_bytes + fit.details["full_optimizer_bytes"]
    assert fit.details["peak_training_bytes"] > table.memory_report().total_bytes + fit.result.table_optimizer_bytes
    assert fit.details["serving_bytes"] == table.memory_report().serving_bytes <= budget
    assert len(fit.result.history) == 1 and 0.0 <= fit.result.test_auc <= 1.0
    ids = torch.from_numpy(data.sparse[:64])
    assert torch.equal(table.export()(ids), table.eval()(ids))
    with pytest.raises(ValueError, match="deduplicated already"):
        table.fit_staged(model, data, TrainConfig(epochs=1, progress=False), schedule)
    with pytest.raises(ValueError, match="not a submodule"):
        DedupEmbedding(data.cardinalities, 8).fit_staged(torch.nn.Linear(1, 1), data, TrainConfig(epochs=1),
                                                          schedule)


def _fit_in_a_process_group():
    data = make_synthetic(SyntheticConfig(rows=3_000, cardinality_exponent=0.2, seed=5))
    torch.manual_seed(0)
    table = build_table({"type": "dedup.v1", "kept_blocks": 466, "sparse": True}, data.cardinalities, 8)
    model = build_model({"type": "lr.v1"}, table, data.num_dense)
    table.fit_staged(model, data, TrainConfig(epochs=1, batch_size=333, progress=False))
    return {"remap": table.remap_index.clone(), "weight": table.weight.detach().clone()}


@pytest.mark.slow
def test_fit_staged_in_a_process_group_with_a_two_byte_remap():
    # DDP broadcasts every buffer when it wraps the model, and gloo (like NCCL) has no int16: the remap is held as
    # its bytes, so a 2-byte remap (256 < k <= 32,768) fine-tunes in a process group; the replicas stay equal.
    from embcompress.distributed import launch

    ranks = launch(_fit_in_a_process_group, 2)
    assert ranks[0]["remap"].dtype == torch.int16
    assert torch.equal(ranks[0]["remap"], ranks[1]["remap"]) and torch.equal(ranks[0]["weight"], ranks[1]["weight"])
