"""Keyed ``.v2`` seeds (issue 15, item 4), and ``.v1`` checkpoints that keep loading and giving their outputs.

``.v2`` tables seed field ``f``'s hash ``j`` by ``(seed, f, j)`` alone, so adding a field (or a hash, a chunk)
leaves every other lookup where it was; ``.v1`` tables keep their ``F``-dependent counter, checked against the
committed fixture ``tests/fixtures/v1_checkpoints.pt`` (written by ``make_v1_checkpoints.py`` before ``.v2``
existed).
"""

from __future__ import annotations

import pathlib

import pytest
import torch

from embcompress import build_table
from embcompress.hashing import field_seeds, keyed_seeds, mix64
from embcompress.tables import (
    HashEmbedding, HashEmbeddingV2, HashingEmbedding, HashingEmbeddingV2, UnifiedEmbedding, UnifiedEmbeddingV2,
)
from embcompress.tables.hash_embedding import IMPORTANCE_HASH

from .test_hashing import M64, ref_mix64

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "v1_checkpoints.pt"


def signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


def ref_keyed(seed: int, f: int, j: int) -> int:
    """``mix64(mix64(mix64(seed) ^ f) ^ j)`` on uint64 words (Python ints), as an int64 value."""
    return signed(ref_mix64(ref_mix64(ref_mix64(seed) ^ f) ^ (j & M64)))


# ----------------------------------------------------------------------------------------------- derivation
@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
def test_keyed_seeds_follow_the_documented_formula(seed):
    hashes = [0, 1, 2, IMPORTANCE_HASH]
    got = keyed_seeds(seed, 5, hashes)
    assert got.dtype == torch.int64 and got.shape == (5, 4)
    assert got.tolist() == [[ref_keyed(seed, f, j) for j in hashes] for f in range(5)]
    assert torch.equal(keyed_seeds(seed, 5, 3), got[:, :3])


def test_keyed_seeds_do_not_depend_on_the_number_of_fields_or_hashes():
    small = keyed_seeds(7, 3, 2)
    assert torch.equal(keyed_seeds(7, 4, 2)[:3], small)
    assert torch.equal(keyed_seeds(7, 3, 5)[:, :2], small)
    assert torch.equal(keyed_seeds(7, 10, [1])[:3, 0], small[:, 1])


def test_v2_seeds_do_not_alias_across_user_seeds():
    # v1: mix64(seed * F + f): seed=1 with F=2 gives field 0 the seed that seed=0 gives field 2 of any F=3 table.
    assert int(field_seeds(1, 2)[0]) == int(field_seeds(0, 3)[2])
    assert int(HashingEmbedding([50] * 2, 4, num_buckets=8, seed=1).seeds[0, 0]) == int(
        HashingEmbedding([50] * 3, 4, num_buckets=8, seed=0).seeds[2, 0])
    assert int(keyed_seeds(1, 2, 1)[0, 0]) != int(keyed_seeds(0, 3, 1)[2, 0])
    # Every (seed, field, hash) over a grid gets a seed of its own.
    words = torch.cat([keyed_seeds(s, 16, [0, 1, 2, IMPORTANCE_HASH]).flatten() for s in range(16)])
    assert words.unique().numel() == words.numel() == 16 * 16 * 4


def test_v2_seeds_are_the_same_on_every_device():
    seeds = keyed_seeds(3, 4, 2)
    assert seeds.device.type == "cpu"
    if torch.cuda.is_available():
        key = mix64(torch.tensor(3, dtype=torch.int64, device="cuda"))
        fields = torch.arange(4, device="cuda").unsqueeze(1)
        on_gpu = mix64(mix64(key ^ fields) ^ torch.arange(2, device="cuda"))
        assert torch.equal(on_gpu.cpu(), seeds)


# ------------------------------------------------------------------------------------------- tables, F vs F+1
V2_CASES = {
    "hashing": (HashingEmbeddingV2, HashingEmbedding, dict(num_buckets=16)),
    "hashing-shared": (HashingEmbeddingV2, HashingEmbedding, dict(num_buckets=32, shared=True)),
    "hashing-frequent": (HashingEmbeddingV2, HashingEmbedding, dict(num_buckets=16, frequent=4)),
    "hashing-small-fields": (HashingEmbeddingV2, HashingEmbedding, dict(num_buckets=16, hash_small_fields=True)),
    "unified": (UnifiedEmbeddingV2, UnifiedEmbedding, dict(num_buckets=32, chunks=2, num_tables=2)),
    "hash_embedding": (HashEmbeddingV2, HashEmbedding, dict(num_buckets=32, append_weights=True)),
    "hash_embedding-plain": (HashEmbeddingV2, HashEmbedding, dict(num_buckets=32, num_hashes=3, weights=False)),
}
CARDS = [1000, 300, 7]


def copy_leading_(dst: torch.nn.Module, src: torch.nn.Module) -> None:
    """Copy each parameter of ``src`` into the leading block of ``dst``'s (the rows of the fields they share)."""
    with torch.no_grad():
        for (name, p), (other, q) in zip(src.named_parameters(), dst.named_parameters()):
            assert name == other
            q[tuple(slice(0, n) for n in p.shape)].copy_(p)


@pytest.mark.parametrize("case", list(V2_CASES))
@pytest.mark.parametrize("seed", [0, 5])
def test_adding_a_field_leaves_the_other_fields_outputs_unchanged(case, seed):
    v2, v1, options = V2_CASES[case]
    small = v2(CARDS, 8, seed=seed, **options)
    big = v2(CARDS + [50], 8, seed=seed, **options)
    assert torch.equal(big.seeds[: len(CARDS)], small.seeds)
    copy_leading_(big, small)
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randint(0, n, (256,), generator=g) for n in CARDS + [50]], dim=1)
    assert torch.equal(big(ids)[:, : len(CARDS)], small(ids[:, : len(CARDS)]))
    # The v1 table of the same options re-hashes every field, unless seed=0 (its counter seed * F * k + f * k + j
    # then starts at 0 for every F): what v2 fixes.
    moved = not torch.equal(v1(CARDS + [50], 8, seed=seed, **options).seeds[: len(CARDS)],
                            v1(CARDS, 8, seed=seed, **options).seeds)
    assert moved == (seed != 0)


def test_more_hashes_or_chunks_keep_the_first_ones():
    plain = HashingEmbeddingV2(CARDS, 8, num_buckets=16)
    double = HashingEmbeddingV2(CARDS, 8, num_buckets=16, frequent=4)
    assert torch.equal(double.seeds[:, :1], plain.seeds)
    two = UnifiedEmbeddingV2(CARDS, 8, num_buckets=32, chunks=2)
    four = UnifiedEmbeddingV2(CARDS, 8, num_buckets=32, chunks=4)
    assert torch.equal(four.seeds[:, :2], two.seeds)
    k2 = HashEmbeddingV2(CARDS, 8, num_buckets=32, num_hashes=2)
    k3 = HashEmbeddingV2(CARDS, 8, num_buckets=32, num_hashes=3)
    unweighted = HashEmbeddingV2(CARDS, 8, num_buckets=32, num_hashes=2, weights=False)
    assert torch.equal(k3.seeds[:, :2], k2.seeds[:, :2]) and torch.equal(k3.seeds[:, 3], k2.seeds[:, 2])
    assert torch.equal(unweighted.seeds, k2.seeds[:, :2])
    assert torch.equal(k2.seeds, keyed_seeds(0, len(CARDS), [0, 1, IMPORTANCE_HASH]))


@pytest.mark.parametrize("case", list(V2_CASES))
def test_v2_is_v1_but_for_the_seeds(case):
    v2, v1, options = V2_CASES[case]
    new, old = v2(CARDS, 8, **options), v1(CARDS, 8, **options)
    assert type(new).__mro__[1] is v1 and new.registry_name.endswith(".v2") and old.registry_name.endswith(".v1")
    assert new.memory_report().total_bytes == old.memory_report().total_bytes
    state = {k: v for k, v in old.state_dict().items() if k not in ("seeds", "_extra_state")}
    new.load_state_dict({**new.state_dict(), **state})
    old.seeds.copy_(new.seeds)
    ids = torch.tensor([[999, 299, 6], [0, 0, 0], [12, 140, 3]])
    assert torch.equal(new(ids), old(ids))


@pytest.mark.parametrize("case", list(V2_CASES))
def test_a_v1_checkpoint_does_not_load_into_a_v2_table(case):
    v2, v1, options = V2_CASES[case]
    with pytest.raises(ValueError, match=r"\.v2: the checkpoint was saved from a '[a-z_]+\.v1' table"):
        v2(CARDS, 8, **options).load_state_dict(v1(CARDS, 8, **options).state_dict())


def test_v2_names_build_from_specs_and_budgets():
    for name in ("hashing.v2", "unified.v2", "hash_embedding.v2"):
        table = build_table({"type": name, "budget_bytes": 20_000}, CARDS, 8)
        assert table.registry_name == name and table.memory_report().total_bytes <= 20_000
        assert table.get_extra_state()["table"] == name


# ------------------------------------------------------------------------------------------ v1 checkpoints
def load_fixture() -> dict:
    return torch.load(FIXTURE, weights_only=True)["cases"]


@pytest.mark.parametrize("name", sorted(load_fixture()))
def test_v1_checkpoints_load_and_give_their_saved_outputs(name):
    case = load_fixture()[name]
    table = build_table(case["spec"], case["cardinalities"], case["embedding_dim"])
    assert table.registry_name == case["spec"]["type"] and table.registry_name.endswith(".v1")
    # The buffers (seeds, offsets, plans) a fresh build derives are the checkpoint's: the derivation is unchanged.
    buffers = dict(table.named_buffers())
    for key, saved in case["state_dict"].items():
        if key in buffers:
            assert torch.equal(buffers[key], saved), f"{name}: a fresh build derives another {key!r}"
    table.load_state_dict(case["state_dict"])
    with torch.no_grad():
        assert torch.equal(table(case["ids"]), case["expected"])


def test_the_fixture_covers_every_v1_method_it_promises():
    names = {case["spec"]["type"] for case in load_fixture().values()}
    assert names == {"hashing.v1", "unified.v1", "hash_embedding.v1", "qr.v1", "full.v1", "mixed_dim.v1"}
    assert FIXTURE.stat().st_size < 64 * 1024
