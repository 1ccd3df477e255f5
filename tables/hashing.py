"""``hashing.v1`` / ``.v2``: the hashing trick for embedding tables, with an optional frequency-aware variant.

Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009; applied to embedding
tables e.g. in Shi et al., "Compositional Embeddings Using Complementary Partitions", KDD 2020 (the baseline).
The frequency-aware variant follows Zhang et al., "Model Size Reduction Using Frequency Based Double Hashing
for Recommender Systems", RecSys 2020.

Each id is mapped to ``bucket(id, seed_f, m_f)`` (see :mod:`embcompress.hashing`) in a table of ``m_f`` rows,
so ids beyond any vocabulary are accepted and colliding ids share a row. Layouts:

* per field (default): field ``f`` gets ``m_f = min(n_f, num_buckets_f)`` rows, all fused in one weight. A field
  whose bucket count reaches its cardinality is stored uncompressed and indexed by the id itself, since
  hashing it would only add collisions; ``hash_small_fields=True`` hashes every field (every field then takes
  raw, unbounded ids).
* ``shared=True``: one table of ``num_buckets`` rows for all fields, each field hashed with its own seed, so
  the same id in two fields lands on different rows.
* ``frequent=K`` (per field): ids are frequency ranked, so the ``K`` most frequent values of a field are the ids
  ``< K``; they get dedicated rows, and every other id is the sum of two rows hashed with independent seeds into
  the field's ``num_buckets`` shared rows (double hashing: two ids collide on both rows far more rarely than
  on one). **This assumes frequency-ranked ids** and nothing checks it: with ids from another encoder the
  dedicated rows go to arbitrary values; rank them with :mod:`embcompress.frequency` (re-encode with
  ``frequency_ranks``, or wrap the table with ``build_frequency_ranked``, its remap counted in the budget).

``hashing.v2`` is the same table with seeds that depend on (``seed``, field, hash) alone
(:func:`~embcompress.hashing.keyed_seeds`): adding a field leaves the other fields' rows where they were, and
the ``frequent`` variant's first hash is the plain variant's. ``hashing.v1`` keeps the seeds of
:func:`~embcompress.hashing.field_seeds`, so its checkpoints keep their meaning; use ``.v2`` for new models.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import torch
from torch import nn

from embcompress.fused import check_fused_optimizer
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_per_field, check_positive_int,
    check_seed, init_rows_, resolve_init_std,
)
from embcompress.hashing import bucket, field_seeds, keyed_seeds
from embcompress.quantize import check_precision
from embcompress.registry import TABLES


@TABLES.register("hashing.v1")
class HashingEmbedding(CompressedEmbedding):
    """Hashed tables, per field or shared, optionally with dedicated rows for the most frequent ids.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``. Hashed fields accept any id in ``[0, 2**63)``.

    Args:
        num_buckets: hashed rows per field (an int for every field, or one int per field), or the rows of the
            shared table when ``shared=True``.
        shared: one table for all fields.
        frequent: ids below this get dedicated rows in their field (on top of ``num_buckets``); the others are
            the sum of two hashed rows. 0 (default) hashes every id once.
        hash_small_fields: hash fields even where the hashed rows reach the field's cardinality (default: such
            fields are stored uncompressed and need ids below ``n_f``).
        seed: selects the hash functions; the derived per-field seeds are saved in the state_dict.
        sparse: sparse gradients (use with ``torch.optim.SparseAdam``).
        precision: the precision its row tables are served at (:mod:`embcompress.quantize`: fp32, fp16, bf16,
            int8, int4): trained in fp32, returned at that precision in eval mode and by :meth:`export`,
            and counted so in serving bytes and budgets.
        train_quantized: hold the rows at ``precision`` (int8 or int4) while training too, updated by
            row-wise Adagrad with stochastic rounding (:mod:`embcompress.lowp`); no fp32 master is kept.
        init_std: std of the returned vectors at initialisation (double-hashed rows start at ``init_std /
            sqrt(2)`` so their sums match); ``None``: the library default.

    The per-(field, hash) seeds follow the class's :attr:`seed_scheme`: ``"counter"`` here
    (:func:`~embcompress.hashing.field_seeds`), ``"keyed"`` in :class:`HashingEmbeddingV2`.

    >>> import torch
    >>> t = HashingEmbedding(10**12, 8, num_buckets=1000)  # a single table over raw 64-bit ids
    >>> t(torch.tensor([3, 2**40 + 7])).shape
    torch.Size([2, 8])
    >>> t.memory_report().ratio > 1e8
    True
    >>> HashingEmbedding([5000, 40], 8, num_buckets=100, frequent=10)(torch.tensor([[4, 39]])).shape
    torch.Size([1, 2, 8])
    """

    #: How the per-(field, hash) seeds derive from ``seed``: ``"counter"`` (``.v1``) or ``"keyed"`` (``.v2``).
    seed_scheme: ClassVar[str] = "counter"

    row_parameters = ('weight',)  # stored at `precision` when served

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        num_buckets: int | Sequence[int],
        shared: bool = False,
        frequent: int = 0,
        hash_small_fields: bool = False,
        seed: int = 0,
        sparse: bool = False,
        precision: str = "fp32",
        train_quantized: bool = False,
        fused_optimizer: str | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        seed = check_seed(seed, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.shared = check_bool("shared", shared, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        hash_small_fields = check_bool("hash_small_fields", hash_small_fields, owner=self)
        self.frequent = check_int("frequent", frequent, lo=0, owner=self)  # dedicated rows per field
        if self.frequent and self.shared:
            raise self._fail("frequent > 0 needs per-field tables; it cannot be combined with shared=True")
        dedicated = [min(self.frequent, n) for n in self.cardinalities]
        rest = [n - k for n, k in zip(self.cardinalities, dedicated)]
        rows = self._rows_per_field(num_buckets, rest)
        if self.shared:
            direct = [False] * self.num_fields
            offsets = [0] * self.num_fields
            total = rows[0]
        else:
            # A field whose hashed rows cover its remaining ids stores every id in its own row.
            direct = [m >= r and (r == 0 or not hash_small_fields) for m, r in zip(rows, rest)]
            sizes = [k + m for k, m in zip(dedicated, rows)]
            offsets = list(itertools.accumulate(sizes, initial=0))[:-1]
            total = sum(sizes)
        num_hashes = 2 if self.frequent else 1
        self.weight = nn.Parameter(init_rows_(torch.empty(total, embedding_dim), self.init_std))
        if self.frequent:
            # Double-hashed vectors are sums of two rows: halve those rows' variance to keep the output's.
            with torch.no_grad():
                for k, m, off, d in zip(dedicated, rows, offsets, direct):
                    if not d:
                        self.weight[off + k : off + k + m].mul_(0.5**0.5)
        if self.seed_scheme == "keyed":
            seeds = keyed_seeds(seed, self.num_fields, num_hashes)
        else:
            seeds = field_seeds(int(seed), self.num_fields * num_hashes).view(-1, num_hashes)
        self.register_buffer("seeds", seeds)
        # The hash modulus; a field with no hashed rows is direct, and 1 keeps its (unused) modulo defined.
        self.register_buffer("rows", torch.tensor([max(m, 1) for m in rows], dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("direct", torch.tensor(direct, dtype=torch.bool))
        if self.frequent:
            self.register_buffer("dedicated", torch.tensor(dedicated, dtype=torch.int64))
        self._any_direct = any(direct)
        self.accepts_raw_ids = not self._any_direct

    def loaded_state_(self) -> None:
        if self.direct.device.type != "meta":  # the flags follow the loaded `direct`, not the constructor's
            self._any_direct = bool(self.direct.any())
            self.accepts_raw_ids = not self._any_direct

    def _rows_per_field(self, num_buckets: int | Sequence[int], rest: Sequence[int]) -> list[int]:
        if self.shared:  # one int, the shared table's rows (every field's modulus)
            return [check_positive_int("num_buckets", num_buckets, owner=self)] * self.num_fields
        values = check_per_field("num_buckets", num_buckets, self.num_fields, owner=self)
        return [min(m, r) for m, r in zip(values, rest)]

    def id_limits(self) -> Sequence[int]:
        return [n if d else -1 for n, d in zip(self.cardinalities, self.direct.tolist())]

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        offsets = self.per_field(self.offsets, fields)
        if not self.frequent:
            rows = bucket(ids, self.per_field(self.seeds, fields)[..., 0], self.per_field(self.rows, fields))
            if self._any_direct:
                rows = torch.where(self.per_field(self.direct, fields), ids, rows)
            return self.read_rows(self.weight, rows + offsets)
        dedicated = self.per_field(self.dedicated, fields)
        hashed = bucket(ids.unsqueeze(-1), self.per_field(self.seeds, fields),
                        self.per_field(self.rows, fields).unsqueeze(-1))
        hashed = hashed + dedicated.unsqueeze(-1)
        own_row = (ids < dedicated) | self.per_field(self.direct, fields)
        first = torch.where(own_row, ids, hashed[..., 0])
        # Ids with their own row gather it twice (the copy is zeroed), so no index leaves the field's rows.
        second = torch.where(own_row, ids, hashed[..., 1])
        rows = torch.stack([first, second], dim=-1) + offsets.unsqueeze(-1)
        if (fused := self.kernel_rows(self.weight)) is not None:
            # One kernel call over bags of one row (own rows) or two (double-hashed): no second gather to zero.
            return fused.bags(rows, torch.stack([torch.ones_like(own_row), ~own_row], dim=-1))
        # unbind, not [..., j, :]: each select's backward would write a zero-filled copy of the whole block
        first_vec, second_vec = self.read_rows(self.weight, rows).unbind(-2)
        return first_vec + second_vec * (~own_row).unsqueeze(-1).to(second_vec.dtype)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    budget_keys = ("num_buckets",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, *, shared: bool = False, frequent: int = 0,
                    **options) -> BudgetKnob:
        """The knob is the number of hashed rows: the shared table's, or split over fields by water-filling
        (``m_f = min(n_f, c)``, largest ``c``) after the ``frequent`` dedicated rows of each field."""
        if shared:
            return BudgetKnob("num_buckets", 1, None, lambda m: {"num_buckets": int(m)})
        cards = as_cardinalities(cardinalities)
        k = check_int("frequent", frequent, lo=0, owner=cls)
        rest = [n - min(k, n) for n in cards]
        hashed = [r for r in rest if r > 0]

        def split(rows) -> dict:
            filled = iter(water_fill(hashed, int(rows)) if hashed else [])
            return {"num_buckets": [next(filled) if r > 0 else 1 for r in rest]}

        return BudgetKnob("hashed rows", max(len(hashed), 1), max(sum(hashed), 1), split)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rows={self.weight.shape[0]}, shared={self.shared}, "
                f"frequent={self.frequent}, sparse={self.sparse}")


@TABLES.register("hashing.v2")
class HashingEmbeddingV2(HashingEmbedding):
    """``hashing.v1`` with keyed seeds: field ``f``'s hash ``j`` is seeded by ``(seed, f, j)`` alone.

    Same options, layout, bytes and forward as :class:`HashingEmbedding`; only the seeds differ
    (:func:`~embcompress.hashing.keyed_seeds`), so adding a field leaves the other fields' rows unchanged.

    >>> import torch
    >>> a = HashingEmbeddingV2([1000, 50], 8, num_buckets=100)
    >>> b = HashingEmbeddingV2([1000, 50, 20], 8, num_buckets=100)
    >>> torch.equal(a.seeds, b.seeds[:2])
    True
    """

    seed_scheme = "keyed"


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
