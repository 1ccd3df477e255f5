"""The hash family of embcompress.hashing against an independent pure-Python reference.

The reference below is written from the definition in the module docstring only, on unsigned 64-bit words held
in Python ints; torch returns the same words as two's-complement int64.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from embcompress import hashing

M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15


# ---------------------------------------------------------------------------------------------------------------
# Reference implementation (uint64 as Python ints)
# ---------------------------------------------------------------------------------------------------------------


def ref_mix64(z: int) -> int:
    """splitmix64 finalizer of z + golden gamma (Vigna's splitmix64.c), all modulo 2**64."""
    z = (z + GAMMA) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def ref_hash64(x: int, s: int) -> int:
    return ref_mix64((x & M64) ^ ref_mix64(s & M64))


def ref_bucket(x: int, s: int, m: int) -> int:
    return (ref_hash64(x, s) % (1 << 63)) % m


def ref_field_seeds(seed: int, num_fields: int) -> list[int]:
    return [ref_mix64((seed * num_fields + f) & M64) for f in range(num_fields)]


def ref_mix64_arithmetic_shift(z: int) -> int:
    """A wrong variant (sign-extending shifts), to show the fixed vectors tell the two apart."""

    def sar(v: int, s: int) -> int:
        signed = v - (1 << 64) if v >> 63 else v
        return (signed >> s) & M64

    z = (z + GAMMA) & M64
    z = ((z ^ sar(z, 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ sar(z, 27)) * 0x94D049BB133111EB) & M64
    return z ^ sar(z, 31)


def u64(v: int) -> int:
    """Unsigned view of an int64 returned by torch."""
    return v & M64


def i64(v: int) -> int:
    """Two's-complement int64 view of an unsigned word (to build torch tensors)."""
    v &= M64
    return v - (1 << 64) if v >> 63 else v


# ---------------------------------------------------------------------------------------------------------------
# Fixed vectors
# ---------------------------------------------------------------------------------------------------------------

EDGE_IDS = [
    0, 1, 2, 3, 2**24 - 1, 2**24, 2**24 + 1, 2**31 - 2, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**32 + 5,
    2**53 - 1, 2**53, 2**53 + 1, 2**62, 2**62 + 1, 2**63 - 2, 2**63 - 1,
]
SEEDS = [0, 1, 12345, 2**31 - 1]
MODULI = [1, 2, 7, 64, 1000, 2**31 - 1, 2**32, 2**40 + 3, 2**63 - 1]


def _random_ids(n: int = 300, seed: int = 20240601) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(v) for v in rng.integers(0, 2**63 - 1, size=n, dtype=np.int64, endpoint=True)]


ALL_IDS = EDGE_IDS + _random_ids()


def ids_tensor(ids=ALL_IDS) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.int64)


# ---------------------------------------------------------------------------------------------------------------
# The reference itself
# ---------------------------------------------------------------------------------------------------------------


def test_reference_matches_published_splitmix64_vector():
    # First output of splitmix64 seeded with 1234567 (Vigna's splitmix64.c).
    assert ref_mix64(1234567) == 6457827717110365317


def test_reference_matches_splitmix64_generator_sequence():
    # splitmix64 as a generator: state += gamma; output finalize(state). mix64(z) == finalize(z + gamma),
    # so the k-th output from seed s is mix64(s + (k - 1) * gamma).
    state = 1234567
    outputs = []
    for _ in range(3):
        outputs.append(ref_mix64(state))
        state = (state + GAMMA) & M64
    assert outputs[0] == 6457827717110365317
    assert outputs[1] == 3203168211198807973
    assert outputs[2] == 9817491932198370423


# ---------------------------------------------------------------------------------------------------------------
# torch implementation == reference
# ---------------------------------------------------------------------------------------------------------------


def test_mix64_published_vector():
    out = hashing.mix64(torch.tensor([1234567], dtype=torch.int64))
    assert out.dtype == torch.int64
    assert u64(int(out[0])) == 6457827717110365317


def test_golden_gamma_constant():
    assert u64(hashing.GOLDEN_GAMMA) == GAMMA


def test_mix64_equals_reference_on_fixed_and_random_words():
    # mix64 takes any 64-bit word, including negative int64 (top bit set).
    words = ALL_IDS + [-1, -2, -(2**63), -(2**31), i64(0xDEADBEEFCAFEBABE)]
    out = hashing.mix64(torch.tensor(words, dtype=torch.int64)).tolist()
    assert [u64(v) for v in out] == [ref_mix64(u64(w)) for w in words]


def test_mix64_is_a_bijection_on_sample():
    # Distinct inputs -> distinct outputs (mix64 is a bijection on 64-bit words).
    x = torch.arange(200_000, dtype=torch.int64)
    assert torch.unique(hashing.mix64(x)).numel() == x.numel()


@pytest.mark.parametrize("seed", SEEDS)
def test_hash64_equals_reference(seed):
    out = hashing.hash64(ids_tensor(), seed).tolist()
    assert [u64(v) for v in out] == [ref_hash64(x, seed) for x in ALL_IDS]


@pytest.mark.parametrize("seed", SEEDS)
def test_hash64_tensor_seed_equals_int_seed(seed):
    x = ids_tensor()
    assert torch.equal(hashing.hash64(x, torch.tensor(seed, dtype=torch.int64)), hashing.hash64(x, seed))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("m", MODULI)
def test_bucket_equals_reference(seed, m):
    out = hashing.bucket(ids_tensor(), seed, m)
    assert out.dtype == torch.int64
    expected = [ref_bucket(x, seed, m) for x in ALL_IDS]
    assert out.tolist() == expected
    assert all(0 <= v < m for v in expected)


def test_bucket_differs_between_seeds():
    x = ids_tensor()
    a = hashing.bucket(x, 0, 2**40 + 3)
    b = hashing.bucket(x, 1, 2**40 + 3)
    assert (a != b).float().mean().item() > 0.99


@pytest.mark.parametrize("seed, num_fields", [(0, 1), (0, 26), (1, 26), (12345, 3), (2**31 - 1, 26)])
def test_field_seeds_equals_reference(seed, num_fields):
    out = hashing.field_seeds(seed, num_fields)
    assert out.dtype == torch.int64
    assert out.shape == (num_fields,)
    assert [u64(v) for v in out.tolist()] == ref_field_seeds(seed, num_fields)
    assert len(set(out.tolist())) == num_fields


def test_bucket_broadcasts_per_field_seeds_and_moduli():
    num_fields = 5
    seeds = hashing.field_seeds(7, num_fields)
    moduli = [1, 7, 1000, 2**31 - 1, 2**40 + 3]
    m_t = torch.tensor(moduli, dtype=torch.int64)
    ids = _random_ids(40 * num_fields, seed=3)
    ids[:num_fields] = [0, 1, 2**31 - 1, 2**53 + 1, 2**63 - 1]
    x = torch.tensor(ids, dtype=torch.int64).reshape(40, num_fields)

    out = hashing.bucket(x, seeds, m_t)
    assert out.shape == (40, num_fields)
    seeds_u = [u64(s) for s in seeds.tolist()]
    expected = [[ref_bucket(int(x[b, f]), seeds_u[f], moduli[f]) for f in range(num_fields)] for b in range(40)]
    assert out.tolist() == expected

    # Same as hashing each column on its own with a scalar seed and modulus.
    for f in range(num_fields):
        col = hashing.bucket(x[:, f], int(seeds[f]), moduli[f])
        assert torch.equal(out[:, f], col)

    # hash64 broadcasts the same way.
    h = hashing.hash64(x, seeds)
    assert [[u64(v) for v in row] for row in h.tolist()] == [
        [ref_hash64(int(x[b, f]), seeds_u[f]) for f in range(num_fields)] for b in range(40)
    ]


def test_bucket_gathered_field_indices_like_tables():
    # The tables index seeds/rows by a field tensor of the ids' shape: bucket(ids, seeds[fields], rows[fields]).
    seeds = hashing.field_seeds(0, 3)
    rows = torch.tensor([10, 1000, 2**33 + 1], dtype=torch.int64)
    ids = torch.tensor([[5, 2**40, 2**63 - 1], [0, 1, 2]], dtype=torch.int64)
    fields = torch.arange(3).expand(2, 3)
    out = hashing.bucket(ids, seeds[fields], rows[fields])
    expected = [
        [ref_bucket(int(ids[b, f]), u64(int(seeds[f])), int(rows[f])) for f in range(3)] for b in range(2)
    ]
    assert out.tolist() == expected


def test_fixed_vectors_distinguish_arithmetic_shift():
    # The vectors used above would catch an arithmetic (sign-extending) shift in the implementation.
    words = [u64(w) for w in ALL_IDS]
    differing = sum(ref_mix64(w) != ref_mix64_arithmetic_shift(w) for w in words)
    assert differing > len(words) // 4
    out = hashing.mix64(torch.tensor(ALL_IDS, dtype=torch.int64)).tolist()
    assert [u64(v) for v in out] != [ref_mix64_arithmetic_shift(w) for w in words]


# ---------------------------------------------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from embcompress.hashing import bucket, hash64, field_seeds
    ids = torch.tensor(json.loads(sys.argv[1]), dtype=torch.int64)
    out = {
        "bucket": {str(m): bucket(ids, 12345, m).tolist() for m in (7, 1000, 2**31 - 1, 2**40 + 3)},
        "hash64": hash64(ids, 0).tolist(),
        "field_seeds": field_seeds(3, 26).tolist(),
    }
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_hash_identical_across_processes():
    ids = EDGE_IDS + _random_ids(50, seed=9)
    x = ids_tensor(ids)
    local = {
        "bucket": {str(m): hashing.bucket(x, 12345, m).tolist() for m in (7, 1000, 2**31 - 1, 2**40 + 3)},
        "hash64": hashing.hash64(x, 0).tolist(),
        "field_seeds": hashing.field_seeds(3, 26).tolist(),
    }
    results = []
    for hash_seed in ("0", "4242"):  # Python's own string hashing differs between these; ours must not
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, json.dumps(ids)],
            capture_output=True, text=True, env=env, timeout=120, check=False,
        )
        assert proc.returncode == 0, proc.stderr
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    for child in results:
        assert child == local
    # And both agree with the reference.
    for m in (7, 1000, 2**31 - 1, 2**40 + 3):
        assert results[0]["bucket"][str(m)] == [ref_bucket(i, 12345, m) for i in ids]
    assert [u64(v) for v in results[0]["hash64"]] == [ref_hash64(i, 0) for i in ids]
    assert [u64(v) for v in results[0]["field_seeds"]] == ref_field_seeds(3, 26)


# ---------------------------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------------------------


_BAD_DTYPES = [torch.int32, torch.int16, torch.int8, torch.uint8, torch.float32, torch.float64, torch.bool]
_BAD_DTYPES += [getattr(torch, name) for name in ("uint64", "uint32") if hasattr(torch, name)]


@pytest.mark.parametrize("dtype", _BAD_DTYPES, ids=str)
def test_mix64_rejects_non_int64(dtype):
    with pytest.raises(ValueError, match="int64"):
        hashing.mix64(torch.zeros(3, dtype=dtype))


def test_hash64_and_bucket_reject_float_ids():
    # Ids must be integers: float ids fail loudly instead of hashing their values silently.
    with pytest.raises((ValueError, RuntimeError, TypeError)):
        hashing.bucket(torch.zeros(3, dtype=torch.float64), 0, 10)


# ---------------------------------------------------------------------------------------------------------------
# Distribution
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 12345])
@pytest.mark.parametrize("m", [64, 1000])
def test_buckets_roughly_uniform_on_sequential_ids(seed, m):
    n = 100_000 if m == 64 else 1_000_000  # mean count >= 1000, so 20% is > 6 sd
    counts = torch.bincount(hashing.bucket(torch.arange(n, dtype=torch.int64), seed, m), minlength=m)
    assert counts.numel() == m
    mean = n / m
    assert counts.min().item() >= 0.8 * mean
    assert counts.max().item() <= 1.2 * mean
    # Chi-square: E = m - 1, sd = sqrt(2 (m - 1)); allow a wide margin.
    chi2 = (((counts.double() - mean) ** 2) / mean).sum().item()
    assert chi2 < (m - 1) + 6 * (2 * (m - 1)) ** 0.5


def test_every_output_bit_balanced():
    # Each of the 64 bits of hash64 is set about half the time on sequential ids (the top bit included, which a
    # sign-extending shift would skew).
    h = hashing.hash64(torch.arange(100_000, dtype=torch.int64), 0)
    bits = ((h.unsqueeze(1) >> torch.arange(64)) & 1).double().mean(dim=0)
    assert bits.min().item() > 0.48
    assert bits.max().item() < 0.52


def test_buckets_uniform_on_high_ids():
    # Ids that differ only in high bits (e.g. hashed raw 64-bit keys with a common low part) spread out too.
    x = torch.arange(50_000, dtype=torch.int64) << 40
    counts = torch.bincount(hashing.bucket(x, 1, 50), minlength=50)
    mean = 50_000 / 50
    assert counts.min().item() >= 0.8 * mean
    assert counts.max().item() <= 1.2 * mean


def _torch_mix64(z: torch.Tensor) -> torch.Tensor:  # the formula in torch's int64 ops: the path off the CPU
    z = z + hashing.GOLDEN_GAMMA
    z = (z ^ hashing._shr(z, 30)) * hashing._MUL1
    z = (z ^ hashing._shr(z, 27)) * hashing._MUL2
    return z ^ hashing._shr(z, 31)


def test_cpu_words_match_the_torch_formula_bit_for_bit():
    x = ids_tensor(EDGE_IDS + _random_ids(500, seed=4)).view(-1, 1).expand(-1, 3)
    assert torch.equal(hashing.mix64(x), _torch_mix64(x))
    assert torch.equal(hashing.mix64(x[0, 0]), _torch_mix64(x[0, 0]))  # a 0-d word
    seeds = ids_tensor(_random_ids(3, seed=5))
    moduli = torch.tensor([7, 2**31 - 1, 2**62 + 5])
    expected = (_torch_mix64(x ^ _torch_mix64(seeds)) & ((1 << 63) - 1)) % moduli
    assert torch.equal(hashing.bucket(x, seeds, moduli), expected)
    assert torch.equal(hashing.bucket(x.t(), seeds.view(3, 1), moduli.view(3, 1)), expected.t())  # strided
    assert hashing.bucket(x.to("meta"), seeds.to("meta"), moduli.to("meta")).shape == expected.shape
