"""The one hash family of embcompress: a keyed splitmix64 finalizer on int64 tensors.

Every hashing-based table maps ids to rows with the functions here, so a model hashes the same way on CPU and
GPU, in every process, and after a reload (the seeds are buffers in the state_dict). Python's ``hash()`` is
never used: it is salted per process for strings.

Definition (all arithmetic modulo 2**64, i.e. on unsigned 64-bit words)::

    mix64(z)     = splitmix64 finalizer of z + 0x9E3779B97F4A7C15
                   (Steele, Lea & Flood, "Fast splittable pseudorandom number generators", OOPSLA 2014;
                   constants from Vigna's splitmix64.c)
    hash64(x, s) = mix64(x XOR mix64(s))
    bucket(x, s, m) = (hash64(x, s) mod 2**63) mod m          # drop the top bit, then an exact int64 remainder

``mix64(1234567)`` is 6457827717110365317, the published first output of splitmix64 seeded with 1234567.

Torch has no uint64 arithmetic on every device, so the words live in int64: addition and multiplication wrap
the same way in two's complement, and the logical right shift is an arithmetic shift followed by a mask.
"""

from __future__ import annotations

import torch

__all__ = ["GOLDEN_GAMMA", "mix64", "hash64", "bucket", "field_seeds"]

_U64 = 1 << 64


def _as_int64(c: int) -> int:
    """Two's-complement view of an unsigned 64-bit constant."""
    return c - _U64 if c >= 1 << 63 else c


GOLDEN_GAMMA = _as_int64(0x9E3779B97F4A7C15)
_MUL1 = _as_int64(0xBF58476D1CE4E5B9)
_MUL2 = _as_int64(0x94D049BB133111EB)
_LOW63 = (1 << 63) - 1


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 words viewed as uint64."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 output function of each int64 word (a bijection on 64-bit words)."""
    if z.dtype != torch.int64:
        raise ValueError(f"mix64 expects an int64 tensor, got dtype {z.dtype}")
    z = z + GOLDEN_GAMMA
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def hash64(x: torch.Tensor, seed: torch.Tensor | int) -> torch.Tensor:
    """Keyed 64-bit hash of int64 ids ``x`` with ``seed`` (broadcastable int64), as int64 words."""
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=x.device)
    return mix64(x ^ mix64(seed_t))


def bucket(x: torch.Tensor, seed: torch.Tensor | int, m: torch.Tensor | int) -> torch.Tensor:
    """Row in ``[0, m)`` of each id: ``(hash64(x, seed) mod 2**63) mod m``, exact in int64."""
    return (hash64(x, seed) & _LOW63) % m


def field_seeds(seed: int, num_fields: int) -> torch.Tensor:
    """Independent per-field seeds derived from one user seed: ``mix64(seed * F + f)`` for field ``f``."""
    base = torch.arange(num_fields, dtype=torch.int64) + seed * num_fields
    return mix64(base)
