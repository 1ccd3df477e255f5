"""``hashing.v1``: the hashing trick for embedding tables.

Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009; applied to embedding
tables e.g. in Shi et al., "Compositional Embeddings Using Complementary Partitions", KDD 2020 (the baseline).

Each id is mapped to ``bucket(id, seed_f, m_f)`` (see :mod:`embcompress.hashing`) in a table of ``m_f`` rows,
so ids beyond any vocabulary are accepted and colliding ids share a row. Two layouts:

* per field (default): field ``f`` gets ``m_f = min(n_f, num_buckets_f)`` rows, all fused in one weight. A field
  whose bucket count reaches its cardinality is stored uncompressed and indexed by the id itself, since
  hashing it would only add collisions; ``hash_small_fields=True`` hashes every field (every field then takes
  raw, unbounded ids).
* ``shared=True``: one table of ``num_buckets`` rows for all fields, each field hashed with its own seed, so
  the same id in two fields lands on different rows.
"""

from __future__ import annotations

import itertools
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import BudgetError, CompressedEmbedding, init_rows_
from embcompress.hashing import bucket, field_seeds
from embcompress.registry import TABLES

_MAX_SEED = 2**31


@TABLES.register("hashing.v1")
class HashingEmbedding(CompressedEmbedding):
    """Hashed tables, per field or shared.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``. Hashed fields accept any id in ``[0, 2**63)``.

    Args:
        num_buckets: rows per field (an int for every field, or one int per field), or the rows of the shared
            table when ``shared=True``.
        shared: one table for all fields.
        hash_small_fields: hash fields even where ``num_buckets >= n_f`` (default: such fields are stored
            uncompressed and need ids below ``n_f``).
        seed: selects the hash functions; the derived per-field seeds are saved in the state_dict.
        sparse: sparse gradients (use with ``torch.optim.SparseAdam``).

    >>> import torch
    >>> t = HashingEmbedding(10**12, 8, num_buckets=1000)  # a single table over raw 64-bit ids
    >>> t(torch.tensor([3, 2**40 + 7])).shape
    torch.Size([2, 8])
    >>> t.memory_report().ratio > 1e9
    True
    """

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        num_buckets: int | Sequence[int],
        shared: bool = False,
        hash_small_fields: bool = False,
        seed: int = 0,
        sparse: bool = False,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < _MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**31), got {seed!r}")
        rows = self._rows_per_field(num_buckets, shared)
        self.shared = bool(shared)
        self.sparse = bool(sparse)
        if self.shared:
            direct = [False] * self.num_fields
            offsets = [0] * self.num_fields
            total = rows[0]
        else:
            direct = [m >= n and not hash_small_fields for m, n in zip(rows, self.cardinalities)]
            offsets = list(itertools.accumulate(rows, initial=0))[:-1]
            total = sum(rows)
        self.accepts_raw_ids = not any(direct)
        self.weight = nn.Parameter(init_rows_(torch.empty(total, embedding_dim)))
        self.register_buffer("seeds", field_seeds(int(seed), self.num_fields))
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("direct", torch.tensor(direct, dtype=torch.bool))
        self._any_direct = any(direct)

    def _rows_per_field(self, num_buckets: int | Sequence[int], shared: bool) -> list[int]:
        if isinstance(num_buckets, numbers.Integral) and not isinstance(num_buckets, bool):
            values = [int(num_buckets)] * self.num_fields
        elif shared:
            raise ValueError(f"with shared=True, num_buckets must be one int (the shared rows), got {num_buckets!r}")
        else:
            values = list(num_buckets)
            if len(values) != self.num_fields:
                raise ValueError(f"num_buckets has {len(values)} entries for {self.num_fields} fields")
        for f, m in enumerate(values):
            if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
                raise ValueError(f"num_buckets of field {f} must be a positive int, got {m!r}")
        if shared:
            return values
        return [min(int(m), n) for m, n in zip(values, self.cardinalities)]

    def id_limits(self) -> Sequence[int]:
        return [n if d else -1 for n, d in zip(self.cardinalities, self.direct.tolist())]

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = bucket(ids, self.seeds[fields], self.rows[fields])
        if self._any_direct:
            rows = torch.where(self.direct[fields], ids, rows)
        return F.embedding(rows + self.offsets[fields], self.weight, sparse=self.sparse)

    @classmethod
    def from_budget(
        cls,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        budget_bytes: int,
        shared: bool = False,
        hash_small_fields: bool = False,
        seed: int = 0,
        sparse: bool = False,
    ):
        """Spend the budget on rows: shared, or water-filled over fields (``m_f = min(n_f, c)``, largest ``c``)."""
        budget = cls._check_budget(budget_bytes)
        options = dict(shared=shared, hash_small_fields=hash_small_fields, seed=seed, sparse=sparse)
        overhead = cls.planned_bytes(cardinalities, embedding_dim, num_buckets=1, **options) - (
            (1 if shared else len(_as_list(cardinalities))) * embedding_dim * 4
        )
        rows = (budget - overhead) // (embedding_dim * 4)
        cards = _as_list(cardinalities)
        need = 1 if shared else len(cards)
        if rows < need:
            raise BudgetError(
                f"hashing.v1: a budget of {budget:,} bytes leaves room for {max(rows, 0)} rows of dim "
                f"{embedding_dim} after {overhead:,} bytes of buffers; at least {need} needed "
                f"(minimum budget {overhead + need * embedding_dim * 4:,} bytes)"
            )
        if shared:
            return cls(cardinalities, embedding_dim, num_buckets=int(rows), **options)
        return cls(cardinalities, embedding_dim, num_buckets=water_fill(cards, int(rows)), **options)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.weight.shape[0]}, shared={self.shared}, sparse={self.sparse}"


def _as_list(cardinalities: int | Sequence[int]) -> list[int]:
    return [int(cardinalities)] if isinstance(cardinalities, numbers.Integral) else [int(c) for c in cardinalities]


def water_fill(cardinalities: Sequence[int], total_rows: int) -> list[int]:
    """Split ``total_rows`` over fields as ``min(n_f, c)`` with the largest cap ``c`` that fits.

    Small fields keep every row; the rows left over after the cap go one each to the largest capped fields.
    Returns exactly ``min(total_rows, sum(n_f))`` rows in all, every field at least one.
    """
    cards = list(cardinalities)
    if total_rows >= sum(cards):
        return cards
    lo, hi = 1, max(cards)  # invariant: cap lo fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(n, mid) for n in cards) <= total_rows:
            lo = mid
        else:
            hi = mid - 1
    rows = [min(n, lo) for n in cards]
    spare = total_rows - sum(rows)
    for f in sorted(range(len(cards)), key=lambda i: -cards[i]):
        if spare <= 0:
            break
        if cards[f] > rows[f]:
            rows[f] += 1
            spare -= 1
    return rows
