"""``unified.v1`` / ``unified.v2``: Unified Embedding, one hashed table multiplexed across all fields.

Coleman et al., "Unified Embedding: Battle-Tested Feature Representations for Web-Scale ML Systems",
NeurIPS 2023.

Every field hashes into the same table of ``M`` rows of width ``d_chunk = D / chunks``; the fields share the
rows (feature multiplexing) instead of each owning a slice of the budget, so a large field borrows capacity
from small ones and the whole budget is one knob. Field ``f`` makes ``k = chunks`` lookups, each with its own
salted hash of (field, chunk), and concatenates them to ``D = k * d_chunk``:

    seed[f, j]  = field_seeds(seed, F * k)[f * k + j]        (unified.v1)
                = mix64(mix64(mix64(seed) ^ f) ^ j)          (unified.v2, keyed_seeds)
    row[f, j]   = bucket(id, seed[f, j], M) + table_offset[f]
    out[..., j * d_chunk:(j + 1) * d_chunk] = weight[row[f, j]]

The salts make the same raw id land on unrelated rows in different fields, and every field takes raw,
unbounded non-negative ids. With ``num_tables = T > 1`` the fields are dealt round robin to ``T`` tables of
``M`` rows each (field ``f`` -> table ``f % T``), stored fused as one weight of ``T * M`` rows with per-field
row offsets, so a batch is still one bucket call and one gather.

The two versions differ in the seeds only (:mod:`embcompress.hashing`): ``.v1``'s depend on ``F`` and ``k``
(with ``seed > 0``, adding a field re-hashes every field); ``.v2``'s depend on ``(seed, f, j)`` alone. ``.v1``
stays as it was for its checkpoints; use ``.v2`` for new models.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from embcompress.fused import check_fused_optimizer
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, check_bool, check_positive_int, check_seed, init_rows_, resolve_init_std,
)
from embcompress.hashing import bucket, field_seeds, keyed_seeds
from embcompress.quantize import check_precision
from embcompress.registry import TABLES


@TABLES.register("unified.v1")
class UnifiedEmbedding(CompressedEmbedding):
    """One (or a few) shared hashed tables for all fields, each id read as ``chunks`` salted lookups.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; every field accepts any id in ``[0, 2**63)``.
    Stored: ``weight`` ``[num_tables * M, D / chunks]`` fp32, ``seeds`` ``[F, chunks]`` int64 and ``offsets``
    ``[F]`` int64 (first row of each field's table).

    Args:
        num_buckets: ``M``, the rows of each shared table.
        chunks: lookups per id; each reads a row of width ``D / chunks`` (``D`` must be divisible).
        num_tables: number of shared tables; fields are assigned round robin (``f % num_tables``).
        seed: selects the hash functions; the derived seeds are saved in the state_dict.
        sparse: sparse gradients for ``weight`` (use with ``torch.optim.SparseAdam``).
        precision: the precision its row tables are served at (:mod:`embcompress.quantize`: fp32, fp16, bf16,
            int8, int4): trained in fp32, returned at that precision in eval mode and by :meth:`export`,
            and counted so in serving bytes and budgets.
        train_quantized: hold the rows at ``precision`` (int8 or int4) while training too, updated by
            row-wise Adagrad with stochastic rounding (:mod:`embcompress.lowp`); no fp32 master is kept.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = UnifiedEmbedding([10**9, 500, 3], 8, num_buckets=1000, chunks=2)
    >>> t(torch.tensor([[2**40 + 7, 499, 2], [0, 0, 0]])).shape
    torch.Size([2, 3, 8])
    >>> t.memory_report().total_bytes == 1000 * 4 * 4 + 3 * 2 * 8 + 3 * 8
    True
    """

    accepts_raw_ids = True
    #: How the per-(field, chunk) seeds derive from ``seed``: ``"counter"`` (``.v1``) or ``"keyed"`` (``.v2``).
    seed_scheme: ClassVar[str] = "counter"

    row_parameters = ('weight',)  # stored at `precision` when served

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        num_buckets: int,
        chunks: int = 1,
        num_tables: int = 1,
        seed: int = 0,
        sparse: bool = False,
        precision: str = "fp32",
        train_quantized: bool = False,
        fused_optimizer: str | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.num_buckets = check_positive_int("num_buckets", num_buckets, owner=self)
        self.chunks = check_positive_int("chunks", chunks, owner=self)
        self.num_tables = check_positive_int("num_tables", num_tables, owner=self)
        if embedding_dim % self.chunks:
            raise self._fail(
                f"embedding_dim D={embedding_dim} is not divisible by chunks={self.chunks}: each of the chunks "
                f"lookups reads D / chunks columns (choose chunks among the divisors of {embedding_dim})"
            )
        if self.num_tables > self.num_fields:
            raise self._fail(
                f"num_tables={self.num_tables} exceeds the {self.num_fields} field(s): fields are dealt round "
                f"robin, so tables beyond the number of fields would never be read"
            )
        seed = check_seed(seed, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        self.chunk_dim = self.embedding_dim // self.chunks
        # Chunks are entries of the output, so each starts at init_std itself.
        self.weight = nn.Parameter(init_rows_(torch.empty(self.num_tables * self.num_buckets, self.chunk_dim),
                                              self.init_std))
        if self.seed_scheme == "keyed":
            seeds = keyed_seeds(seed, self.num_fields, self.chunks)
        else:
            seeds = field_seeds(int(seed), self.num_fields * self.chunks).view(self.num_fields, self.chunks)
        self.register_buffer("seeds", seeds.clone())
        offsets = [(f % self.num_tables) * self.num_buckets for f in range(self.num_fields)]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # [..., 1] against the [..., k] seeds of each id's field: every chunk hashed in one call.
        rows = bucket(ids.unsqueeze(-1), self.seeds[fields], self.num_buckets)
        rows = rows + self.offsets[fields].unsqueeze(-1)
        out = self.read_rows(self.weight, rows)  # [..., k, d_chunk]
        return out.flatten(-2)

    budget_keys = ("num_buckets",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        """``M``, the rows of each shared table."""
        return BudgetKnob("num_buckets", 1, None, lambda m: {"num_buckets": int(m)})

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_buckets={self.num_buckets}, chunks={self.chunks}, "
            f"num_tables={self.num_tables}, sparse={self.sparse}"
        )


@TABLES.register("unified.v2")
class UnifiedEmbeddingV2(UnifiedEmbedding):
    """``unified.v1`` with keyed seeds: field ``f``'s chunk ``j`` is seeded by ``(seed, f, j)`` alone.

    Same options, layout, bytes and forward as :class:`UnifiedEmbedding`; only the seeds differ
    (:func:`~embcompress.hashing.keyed_seeds`), so adding a field or a chunk leaves the other seeds unchanged.

    >>> import torch
    >>> a = UnifiedEmbeddingV2([10**9, 500], 8, num_buckets=1000, chunks=2)
    >>> b = UnifiedEmbeddingV2([10**9, 500, 3], 8, num_buckets=1000, chunks=4)
    >>> torch.equal(a.seeds, b.seeds[:2, :2])
    True
    """

    seed_scheme = "keyed"
