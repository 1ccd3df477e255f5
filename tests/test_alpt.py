"""ALPT (issue 17, item 2): integer rows with learned step sizes, trained at their precision."""

import math

import pytest
import torch

from embcompress import build_model, build_table
from embcompress.budget import BudgetError
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.tables.alpt import ALPTEmbedding, _pack, _unpack
from embcompress.training import TrainConfig, make_optimizers, train

CARDS = [100, 30, 5]
D = 16


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_round_trips(bits):
    q = torch.randint(0, 1 << bits, (7, 13), dtype=torch.uint8)
    packed = _pack(q, bits)
    assert packed.shape == (7, math.ceil(13 * bits / 8))
    assert torch.equal(_unpack(packed, bits, 13), q)


@pytest.mark.parametrize("bits,step", [(8, "row"), (4, "row"), (2, "row"), (8, "field"), (2, "field")])
def test_bytes_by_hand(bits, step):
    t = ALPTEmbedding(CARDS, D, bits=bits, step=step)
    n, f = sum(CARDS), len(CARDS)
    steps = n if step == "row" else f
    stored = n * D * bits // 8 + steps * 4 + f * 8 + (f * 8 if step == "field" else 0)  # codes, steps, offsets
    report = t.memory_report()
    assert report.total_bytes == stored and report.serving_bytes == stored
    assert report.parameter_bytes == 0
    opts = make_optimizers(t, TrainConfig(lr=0.01))
    t(torch.tensor([[1, 2, 3]])).sum().backward()
    for o in opts:
        o.step()
    assert t.memory_report(opts).training_bytes == stored + n * 4 + steps * 4  # the two Adagrad sums


def test_rows_are_step_times_code():
    t = ALPTEmbedding(CARDS, D, bits=4).eval()
    out = t(torch.tensor([[5, 6, 1]]))[0]
    rows = torch.tensor([5, 100 + 6, 130 + 1])
    q = _unpack(t.rows.codes[rows], 4, D).float() - 8
    assert torch.equal(out, q * t.rows.step[rows].unsqueeze(1))
    assert q.min() >= -8 and q.max() <= 7


def test_step_grows_when_rows_clip():
    """LSQ's estimator: a row pushed past the largest code pulls its step size up; rows not read keep theirs."""
    t = ALPTEmbedding(CARDS, D, bits=2)
    (opt,) = t.row_optimizers(0.5)
    before = t.rows.step.clone()
    for _ in range(3):
        out = t.train()(torch.tensor([[4, 0, 0]]))
        (-out[0, 0].sum() * 100).backward()  # every coordinate of row 4 wants to grow
        opt.step()
    assert t.rows.step[4] > before[4]
    assert torch.equal(t.rows.step[5:100], before[5:100])


def test_seeded_and_deterministic():
    def run(seed):
        torch.manual_seed(0)
        t = ALPTEmbedding(CARDS, D, bits=4, seed=seed)
        (opt,) = t.row_optimizers(0.05)
        g = torch.Generator().manual_seed(1)
        for _ in range(5):
            ids = torch.stack([torch.randint(0, c, (32,), generator=g) for c in CARDS], 1)
            (t(ids) * torch.randn(32, 3, D, generator=g)).sum().backward()
            opt.step()
        return t.rows.codes.clone(), t.rows.step.clone()

    a, b, c = run(0), run(0), run(1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_budgets():
    base = sum(CARDS) * D * 4
    assert build_table({"type": "alpt.v1", "budget_bytes": base // 2}, CARDS, D).bits == 8
    assert build_table({"type": "alpt.v1", "budget_bytes": base // 4}, CARDS, D).bits == 4
    assert build_table({"type": "alpt.v1", "budget_bytes": base // 7}, CARDS, D).bits == 2
    for ratio in (8, 16, 64, 256, 1000):  # 8 bytes a row at int2, and the field offsets
        with pytest.raises(BudgetError, match=r"\(bits=2\): minimum budget 1,104 bytes"):
            build_table({"type": "alpt.v1", "budget_bytes": base // ratio}, CARDS, D)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="bits must be one of"):
        ALPTEmbedding(CARDS, D, bits=3)
    with pytest.raises(ValueError, match="step"):
        ALPTEmbedding(CARDS, D, step="column")


@pytest.mark.parametrize("step", ["row", "field"])
def test_trains_exports_and_reloads(step):
    data = make_synthetic(SyntheticConfig(rows=4000, seed=5))
    torch.manual_seed(0)
    t = ALPTEmbedding(data.cardinalities, D, bits=8, step=step)
    model = build_model({"type": "lr.v1"}, t, data.num_dense)
    codes, steps = t.rows.codes.clone(), t.rows.step.clone()
    result = train(model, data, TrainConfig(epochs=1, batch_size=256, lr=0.05, seed=0))
    assert result.val_auc > 0.55
    assert not torch.equal(t.rows.codes, codes) and not torch.equal(t.rows.step, steps)
    t.eval()
    ids = data.split("test").sparse[:64]
    served = t.export()
    assert torch.equal(served(ids), t(ids))
    assert served.memory_report().total_bytes == t.memory_report().total_bytes
    again = ALPTEmbedding(data.cardinalities, D, bits=8, step=step)
    again.load_state_dict(t.state_dict())
    assert torch.equal(again.eval()(ids), t(ids))
    with pytest.raises(ValueError, match="bits"):
        ALPTEmbedding(data.cardinalities, D, bits=4, step=step).load_state_dict(t.state_dict())


def test_a_process_group_is_refused():
    from embcompress.distributed import DistContext
    with pytest.raises(ValueError, match="one process"):
        DistContext.wrap(ALPTEmbedding(CARDS, D), "cpu")


def test_the_step_grows_by_orders_of_magnitude_when_it_must():
    """Rows initialised at std 1e-4 (DeepCTR's convention) that training wants 100x larger: the step, learned in
    log space, follows them within a hundred steps, and the rows stop saturating."""
    t = ALPTEmbedding(50, 8, bits=8, init_std=1e-4)
    (opt,) = t.row_optimizers(0.1)
    start = t.rows.step.clone()
    target = torch.full((8,), 0.1)  # 7,000 std: codes of at most 127 steps need a step 56x the initial one
    for _ in range(100):
        out = t.train()(torch.arange(10))
        (out - target).pow(2).sum().backward()
        opt.step()
    assert (t.rows.step[:10] > 50 * start[:10]).all()
    assert torch.allclose(t.eval()(torch.arange(10)), target.expand(10, 8), atol=0.01)
