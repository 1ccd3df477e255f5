"""Deep Hash Embedding (``dhe.v1``, issue 16 item 3): encoding math, determinism, init, budgets, bytes."""

import io
import json
import subprocess
import sys

import pytest
import torch

from embcompress import BudgetError
from embcompress.hashing import hash64, keyed_seeds
from embcompress.memory import baseline_bytes
from embcompress.tables.dhe import DeepHashEmbedding, dhe_encoding, dhe_field_keys, dhe_seeds

CARDS = [20_000, 3, 570, 8_000]
RAW = torch.tensor([0, 1, 2**24 + 1, 2**31 - 1, 2**53 + 1, 2**62, 2**63 - 1])


def random_ids(cards, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, n, (batch,), generator=g) for n in cards], dim=1)


# ------------------------------------------------------------------------------------------------ encoding
def test_seeds_are_keyed_seeds_of_seed_field_and_hash():
    assert torch.equal(dhe_seeds(dhe_field_keys(5, 4), 7), keyed_seeds(5, 4, 7))
    # field f's seeds do not depend on how many fields there are
    assert torch.equal(dhe_field_keys(3, 2), dhe_field_keys(3, 6)[:2])


def test_encoding_is_the_documented_uniform_transform():
    seeds = keyed_seeds(0, 1, 64)[0]
    enc = dhe_encoding(RAW, seeds)
    assert enc.shape == (len(RAW), 64) and enc.dtype == torch.float32
    h = hash64(RAW.unsqueeze(-1), seeds)
    top = [[(int(w) % 2**64) >> 40 for w in row] for row in h]  # the top 24 bits of the unsigned word
    expected = torch.tensor([[(2 * t + 1 - 2**24) / 2**24 for t in row] for row in top], dtype=torch.float64)
    assert torch.equal(enc.double(), expected)  # exact: odd integers below 2**24 times 2**-24
    assert enc.abs().max() < 1
    big = dhe_encoding(torch.arange(20_000), seeds)
    assert abs(big.mean().item()) < 0.01 and abs(big.var().item() - 1 / 3) < 0.01  # uniform on (-1, 1)


_CHILD = """
import json, torch
from embcompress.tables.dhe import DeepHashEmbedding
t = DeepHashEmbedding([10**12, 40], 4, width=32, seed=11)
ids = torch.tensor([[0, 0], [2**40 + 7, 39], [2**63 - 1, 5]])
print(json.dumps(t.encode(ids, torch.arange(2)).tolist()))
"""


def test_encoding_is_deterministic_across_processes():
    child = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, check=True,
                           timeout=120)
    theirs = json.loads(child.stdout)
    torch.manual_seed(99)  # the encoding does not depend on torch's RNG
    t = DeepHashEmbedding([10**12, 40], 4, width=32, seed=11)
    ids = torch.tensor([[0, 0], [2**40 + 7, 39], [2**63 - 1, 5]])
    assert t.encode(ids, torch.arange(2)).tolist() == theirs


def test_encoding_is_a_function_of_field_id_and_seed():
    a = DeepHashEmbedding(CARDS, 8, width=16, seed=3)
    torch.manual_seed(1)
    b = DeepHashEmbedding(CARDS + [50], 8, width=16, seed=3)  # another init, one more field
    ids = random_ids(CARDS, 32)
    fields = torch.arange(4)
    enc = a.encode(ids, fields)
    assert torch.equal(enc, b.encode(ids, fields))
    assert torch.equal(enc[5:9], a.encode(ids[5:9], fields))  # not a function of the rest of the batch
    assert not torch.equal(enc, DeepHashEmbedding(CARDS, 8, width=16, seed=4).encode(ids, fields))
    # the same id in two fields gets two encodings
    same = torch.full((1, 4), 2)
    e = a.encode(same, fields)[0]
    assert len({tuple(row) for row in e.tolist()}) == 4


def test_same_seed_gives_the_same_table_and_outputs():
    ids = random_ids(CARDS, 64)
    torch.manual_seed(0)
    a = DeepHashEmbedding(CARDS, 8, width=24, seed=2)
    torch.manual_seed(0)
    b = DeepHashEmbedding(CARDS, 8, width=24, seed=2)
    assert torch.equal(a(ids), b(ids))


# ----------------------------------------------------------------------------------------- forward, training
def test_raw_unbounded_ids_are_accepted_and_distinct():
    t = DeepHashEmbedding(10**6, 8, width=16)
    assert t.accepts_raw_ids and list(t.id_limits()) == [-1]
    out = t(RAW)
    assert out.shape == (len(RAW), 8)
    assert len({tuple(v) for v in out.tolist()}) == len(RAW)
    assert torch.equal(out[3], t(RAW[3:4])[0])
    with pytest.raises(ValueError, match="-1"):
        t(torch.tensor([-1]))


@pytest.mark.parametrize("batch_norm", [False, True])
def test_gradients_reach_every_parameter_and_training_lowers_a_loss(batch_norm):
    t = DeepHashEmbedding(CARDS, 8, width=16, batch_norm=batch_norm)
    ids = random_ids(CARDS, 64)
    target = torch.randn(64, 4, 8)
    opt = torch.optim.Adam(t.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = (t(ids) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        if not losses:
            for name, p in t.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_batch_norm_eval_mode_is_deterministic_and_init_leaves_running_stats():
    t = DeepHashEmbedding(CARDS, 8, width=16, batch_norm=True)
    assert all(int(n.num_batches_tracked) == 0 for n in t.norms)  # the init probe does not update them
    t.eval()
    ids = random_ids(CARDS, 16)
    assert torch.equal(t(ids)[3:5], t(ids[3:5]))


INIT_CASES = [({}, 1e-3), ({}, 0.05), ({}, 1.0), ({"depth": 1}, 0.05), ({"depth": 3}, 0.05),
              ({"num_hashes": 64, "width": 16}, 0.05), ({"batch_norm": True}, 0.05),
              ({"batch_norm": True}, 1.0)]


@pytest.mark.parametrize("options, init_std", INIT_CASES, ids=[f"{o}-{s}" for o, s in INIT_CASES])
def test_init_std_is_the_std_of_the_returned_vectors(options, init_std):
    t = DeepHashEmbedding(CARDS, 16, init_std=init_std, **{"width": 32, **options})
    with torch.no_grad():
        out = t(random_ids(CARDS, 5_000))
    assert abs(out.std().item() / init_std - 1) < 0.10
    assert abs(out.mean().item()) < 0.1 * init_std  # centred


def test_state_dict_round_trip_restores_keys_and_weights():
    a = DeepHashEmbedding(CARDS, 8, width=16, seed=1, batch_norm=True).eval()
    b = DeepHashEmbedding(CARDS, 8, width=16, seed=9, batch_norm=True).eval()
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True))
    ids = random_ids(CARDS, 32)
    assert torch.equal(a(ids), b(ids))
    with pytest.raises(ValueError, match="batch_norm"):
        DeepHashEmbedding(CARDS, 8, width=16).load_state_dict(a.state_dict(), strict=False)


# ---------------------------------------------------------------------------------------- bytes and budgets
def test_bytes_by_hand():
    # k = width = 5: layers [5, 5] + [5] twice, out [4, 5] + [4] fp32; int64 keys [3]
    assert DeepHashEmbedding([10, 3, 7], 4, width=5).memory_report().total_bytes == (2 * 30 + 24) * 4 + 3 * 8
    # k = 9 fixed, depth 1, BN: [5, 9] + [5]; BN weight, bias, mean, var [5] fp32 and an int64 counter; out
    t = DeepHashEmbedding([10, 3, 7], 4, width=5, depth=1, num_hashes=9, batch_norm=True)
    assert t.memory_report().total_bytes == (9 * 5 + 5 + 4 * 5 + 5 * 4 + 4) * 4 + 8 + 3 * 8
    assert DeepHashEmbedding.planned_bytes([10, 3, 7], 4, width=5) == (2 * 30 + 24) * 4 + 3 * 8  # meta device


@pytest.mark.parametrize("ratio", [2, 16, 64, 256, 1000])
@pytest.mark.parametrize("num_hashes", [0, 1024])
def test_budgets_from_2x_to_1000x(ratio, num_hashes):
    cards = [100_000, 20_000, 3_000, 500, 40, 3]
    budget = baseline_bytes(cards, 16) / ratio
    try:
        t = DeepHashEmbedding.from_budget(cards, 16, budget_bytes=budget, num_hashes=num_hashes)
    except BudgetError as err:
        assert num_hashes == 1024 and "minimum budget" in str(err)
        return
    total = t.memory_report().total_bytes
    assert total <= budget
    if num_hashes == 0:  # k follows the width: fine steps at every ratio
        assert total >= 0.95 * budget
    assert DeepHashEmbedding.planned_bytes(cards, 16, width=t.width + 1, num_hashes=num_hashes) > budget


def test_a_budget_below_the_smallest_network_names_the_minimum():
    smallest = DeepHashEmbedding.planned_bytes([10**6], 16, width=1)
    with pytest.raises(BudgetError, match=f"minimum budget {smallest:,} bytes"):
        DeepHashEmbedding.from_budget([10**6], 16, budget_bytes=smallest - 1)
    assert DeepHashEmbedding.from_budget([10**6], 16, budget_bytes=smallest).width == 1


@pytest.mark.parametrize("option, value", [("width", 0), ("width", 2.5), ("depth", 0), ("depth", True),
                                           ("num_hashes", -1), ("num_hashes", "8"), ("batch_norm", 1),
                                           ("seed", -1), ("init_std", 0.0)])
def test_bad_options_name_the_option_and_value(option, value):
    with pytest.raises(ValueError, match=rf"dhe\.v1: {option} must be .*{value!r}"):
        DeepHashEmbedding(CARDS, 8, **{option: value})
