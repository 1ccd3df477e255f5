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

Per-(field, hash) seeds. A table makes one seed per field ``f`` and per hash ``j`` (a chunk, one of the ``k``
hashes of an id) from the one user ``seed``. Two derivations exist, chosen by the table's registered version:

* ``.v1`` tables, :func:`field_seeds`: ``mix64(seed * F * k + f * k + j)``, a counter over all ``F * k`` slots.
  Kept as it was so ``.v1`` checkpoints keep their meaning, but the counter depends on ``F`` and ``k``: with any
  ``seed`` but 0, adding a field to a model re-hashes every field of the table, and user seeds alias one
  another (``seed=1`` with ``F=2`` gives field 0 the seed that ``seed=0`` gives field 2).
* ``.v2`` tables, :func:`keyed_seeds`: ``mix64(mix64(mix64(seed) ^ f) ^ j)``, a key chain. Field ``f``'s hash
  ``j`` depends on ``(seed, f, j)`` alone, never on the number of fields, of hashes or of chunks, so a field
  added at the end (or another ``k``) leaves every other field's rows where they were; and since each level
  hashes before the next index is mixed in, two ``(seed, f, j)`` never share a seed by construction (only by
  a chance 64-bit collision).

Torch has no uint64 arithmetic on every device, so the words live in int64: addition and multiplication wrap
the same way in two's complement, and the logical right shift is an arithmetic shift followed by a mask.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["GOLDEN_GAMMA", "mix64", "hash64", "bucket", "field_seeds", "keyed_seeds"]

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


# On the CPU the words are hashed in numpy's uint64 arithmetic: the same bits (wrapping multiplication, logical
# shifts without the masks), measured 5-11x faster than torch's int64 kernels on this formula (its shifts and
# remainders of full 64-bit words are slow), from a batch of one to training batches. Other devices use torch.
def _on_cpu(*tensors) -> bool:
    return all(not isinstance(t, torch.Tensor) or t.device.type == "cpu" for t in tensors)


def _words(t: torch.Tensor | int) -> np.ndarray | np.uint64:
    if isinstance(t, torch.Tensor):
        return t.numpy().view(np.uint64)  # integer words: never part of a graph, nothing to detach
    return np.uint64(int(t) % (1 << 64))


_NP_GAMMA, _NP_MUL1, _NP_MUL2 = (np.uint64(c % (1 << 64)) for c in (GOLDEN_GAMMA, _MUL1, _MUL2))
_NP_S30, _NP_S27, _NP_S31, _NP_LOW63 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(_LOW63)


def _mix64_words(z):
    if np.ndim(z) == 0:  # numpy warns on scalar wraparound (the arithmetic here); arrays wrap silently
        return _mix64_words(np.atleast_1d(z))[0]
    z = z + _NP_GAMMA
    z = (z ^ (z >> _NP_S30)) * _NP_MUL1
    z = (z ^ (z >> _NP_S27)) * _NP_MUL2
    return z ^ (z >> _NP_S31)


def _as_tensor(words, shape) -> torch.Tensor:
    """The int64 tensor of the uint64 ``words`` (a fresh array, or a scalar), of ``shape``."""
    words = np.asarray(words)
    if not words.flags.c_contiguous:
        words = np.ascontiguousarray(words)
    return torch.from_numpy(words.view(np.int64)).reshape(shape)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64 output function of each int64 word (a bijection on 64-bit words)."""
    if z.dtype != torch.int64:
        raise ValueError(f"mix64 expects an int64 tensor, got dtype {z.dtype}")
    if _on_cpu(z):
        return _as_tensor(_mix64_words(_words(z)), z.shape)
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
    if x.dtype == torch.int64 and _on_cpu(x, seed, m):
        words = _mix64_words(_words(x) ^ _mix64_words(_words(seed)))
        rows = (words & _NP_LOW63) % _words(m)
        return _as_tensor(rows, np.shape(rows))  # numpy broadcasts as torch does
    return (hash64(x, seed) & _LOW63) % m


def field_seeds(seed: int, num_fields: int) -> torch.Tensor:
    """The ``.v1`` seeds: ``mix64(seed * n + i)`` for slot ``i < n = num_fields``, ``LongTensor[n]``.

    ``.v1`` tables ask for ``n = F * k`` slots and read field ``f``'s hash ``j`` at ``f * k + j``, so every
    seed depends on ``F`` and ``k`` (see the module docstring); new tables use :func:`keyed_seeds`.
    """
    base = torch.arange(num_fields, dtype=torch.int64) + seed * num_fields
    return mix64(base)


def keyed_seeds(seed: int, num_fields: int, hashes: int | Sequence[int]) -> torch.Tensor:
    """The ``.v2`` seeds: ``mix64(mix64(mix64(seed) ^ f) ^ j)`` for field ``f < num_fields`` and hash ``j``.

    ``hashes`` is a count ``k`` (hashes ``0..k-1``) or the hash numbers themselves (any int64, e.g. a reserved
    one for a table's extra hash); returns ``LongTensor[num_fields, len(hashes)]``. Column ``j`` of row ``f``
    is the same for every ``num_fields > f`` and every other set of hashes.

    >>> a, b = keyed_seeds(0, 3, 2), keyed_seeds(0, 4, [0, 1, 2])
    >>> torch.equal(a, b[:3, :2])
    True
    """
    js = list(range(hashes)) if isinstance(hashes, int) else [int(j) for j in hashes]
    fields = torch.arange(num_fields, dtype=torch.int64).unsqueeze(1)
    key = mix64(torch.tensor(int(seed), dtype=torch.int64))
    return mix64(mix64(key ^ fields) ^ torch.tensor(js, dtype=torch.int64).view(1, -1))
