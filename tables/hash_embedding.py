"""``hash_embedding.v1`` / ``.v2``: hash embeddings, an importance-weighted sum of k hashed rows.

Svenstrup, Hansen & Winther, "Hash Embeddings for Efficient Word Representations", NeurIPS 2017; the
multi-hash sum without weights is the scheme of spaCy/thinc's ``HashEmbed``.

An id ``x`` of field ``f`` reads ``k`` rows of a pool ``E`` of ``B`` rows and mixes them with ``k`` trainable
importance weights read from a table ``P`` of ``K`` rows by one more hash::

    seed[f, i]  = field_seeds(seed, F * (k + 1))[f * (k + 1) + i]             i = 0..k  (.v1)
    seed[f, i]  = mix64(mix64(mix64(seed) ^ f) ^ j_i), j_i = i (i < k), j_k = -1     (.v2, keyed_seeds)
    h_i(x)      = bucket(x, seed[f, i], B)       i < k: pool rows;  i = k: importance row (K = B)
    v(x)        = sum_i P[h_k(x), i] * E[h_i(x)]                   (plain sum_i E[h_i(x)] when weights=False)
    out(x)      = W @ concat(v(x), P[h_k(x)])     with append_weights=True, W of shape [D, D + k], no bias

Two ids collide fully only if all ``k`` pool rows and the importance row coincide, so far fewer rows than ids
keep most ids distinguishable.

Layout choices:

* One pool shared by all fields, each field hashed with its own salts (rather than per-field pools fused): the
  budget stays one knob with nothing to split over fields, every field takes raw unbounded ids, and the salts
  make collisions between fields random instead of systematic (the same id in two fields shares rows only by
  chance). The paper's pool is likewise one table shared by a whole vocabulary.
* ``K = B`` (no separate option): the importance table grows with the budget at a fixed ``k / D`` share of the
  pool's bytes (12.5% for k=2, D=16), and one ``bucket`` call with one modulus yields all ``k + 1`` rows.
  The paper uses ``K`` near the vocabulary size, which would not compress the large fields at all.
* The pool rows of an id do not depend on ``weights``: with ``weights=False`` only the ``k`` pool seeds are
  stored (``.v1`` derives ``k + 1`` seeds in both modes and drops the importance seed).
* The versions differ in the seeds only (:mod:`embcompress.hashing`). ``.v1``'s depend on ``F`` and ``k``
  (with ``seed > 0``, adding a field re-hashes every field); ``.v2``'s depend on ``(seed, f, i)`` alone, the
  importance row taking the hash number ``-1``, which no pool hash uses, so that pool hash ``i`` is the same
  for every ``k``. ``.v1`` stays as it was for its checkpoints; use ``.v2`` for new models.
"""

from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.fused import check_fused_optimizer
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, check_bool, check_positive_int, check_seed, resolve_init_std,
)
from embcompress.hashing import bucket, field_seeds, keyed_seeds
from embcompress.quantize import check_precision
from embcompress.registry import TABLES

IMPORTANCE_HASH = -1  # the keyed (v2) hash number of the importance row; pool hashes are 0..k-1


@TABLES.register("hash_embedding.v1")
class HashEmbedding(CompressedEmbedding):
    """Importance-weighted sum of ``num_hashes`` rows of one shared pool.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; every field accepts any id in ``[0, 2**63)``.
    Stored: ``pool`` ``[num_buckets, D]`` fp32; ``importance`` ``[num_buckets, k]`` fp32 (with ``weights``);
    ``projection`` ``[D, D + k]`` fp32 (with ``append_weights``); ``seeds`` ``[F, k + 1]`` int64 (``[F, k]``
    without ``weights``).

    Args:
        num_buckets: ``B``, the rows of the pool, and ``K = B`` rows of importance weights.
        num_hashes: ``k``, pool rows summed per id.
        weights: trainable importance weights; ``False`` gives the plain sum of the ``k`` rows (thinc-style).
        append_weights: concatenate the ``k`` importance weights to the vector and map the ``D + k`` values back
            to ``D`` with a bias-free linear layer.
        seed: selects the hash functions; the derived seeds are saved in the state_dict.
        sparse: sparse gradients for ``pool`` and ``importance`` (use with ``torch.optim.SparseAdam``).
        precision: the precision its row tables are served at (:mod:`embcompress.quantize`: fp32, fp16, bf16,
            int8, int4): trained in fp32, returned at that precision in eval mode and by :meth:`export`,
            and counted so in serving bytes and budgets.
        train_quantized: hold the rows at ``precision`` (int8 or int4) while training too, updated by
            row-wise Adagrad with stochastic rounding (:mod:`embcompress.lowp`); no fp32 master is kept.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = HashEmbedding([10**9, 500, 3], 8, num_buckets=1000)
    >>> t(torch.tensor([[2**40 + 7, 499, 2], [0, 0, 0]])).shape
    torch.Size([2, 3, 8])
    >>> t.memory_report().total_bytes == 1000 * (8 + 2) * 4 + 3 * 3 * 8
    True
    """

    accepts_raw_ids = True
    #: How the per-(field, hash) seeds derive from ``seed``: ``"counter"`` (``.v1``) or ``"keyed"`` (``.v2``).
    seed_scheme: ClassVar[str] = "counter"

    row_parameters = ('pool', 'importance')  # stored at `precision` when served

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        num_buckets: int,
        num_hashes: int = 2,
        weights: bool = True,
        append_weights: bool = False,
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
        self.num_hashes = k = check_positive_int("num_hashes", num_hashes, owner=self)
        self.weights = weights = check_bool("weights", weights, owner=self)
        self.append_weights = append_weights = check_bool("append_weights", append_weights, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        if append_weights and not weights:
            raise self._fail("append_weights=True needs weights=True: there are no importance weights to append")
        seed = check_seed(seed, owner=self)
        D = self.embedding_dim
        # Init: importance weights start at 1 and pool rows N(0, s**2 / k), so for distinct rows
        # Var(sum_i p_i E_i) = k * 1 * s**2 / k = s**2 with s = init_std; weights=False gives the same output.
        # The projection starts as [I_D | 0], i.e. the weighted sum unchanged; the zero
        # columns still get gradients (they multiply the non-zero weights).
        pool = torch.empty(self.num_buckets, D)
        with torch.no_grad():
            pool.normal_(0.0, self.init_std / k**0.5)
        self.pool = nn.Parameter(pool)
        self.importance = nn.Parameter(torch.ones(self.num_buckets, k)) if weights else None
        if append_weights:
            self.projection = nn.Parameter(torch.cat([torch.eye(D), torch.zeros(D, k)], dim=1))
        else:
            self.projection = None
        if self.seed_scheme == "keyed":
            seeds = keyed_seeds(seed, self.num_fields, [*range(k), *([IMPORTANCE_HASH] if weights else [])])
        else:
            seeds = field_seeds(int(seed), self.num_fields * (k + 1)).view(self.num_fields, k + 1)
            seeds = seeds if weights else seeds[:, :k].clone()
        self.register_buffer("seeds", seeds)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        k = self.num_hashes
        # All k pool rows and the importance row in one call: they share the modulus since K = B.
        rows = bucket(ids.unsqueeze(-1), self.seeds[fields], self.num_buckets)  # [..., k (+1)]
        p = self.read_rows(self.importance, rows[..., k]) if self.weights else None  # [..., k]
        if (fused := self.kernel_rows(self.pool)) is not None:
            out = fused.pool(rows[..., :k], p)  # gather, weigh and sum in the kernel (bags of k rows)
        else:
            vecs = self.read_rows(self.pool, rows[..., :k])  # [..., k, D]
            out = vecs.sum(-2) if p is None else (p.unsqueeze(-1) * vecs).sum(-2)
        if p is None:
            return out
        if self.append_weights:
            out = F.linear(torch.cat([out, p], dim=-1), self.projection)
        return out

    budget_keys = ("num_buckets",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        """``B``, the pool rows; ``K = B`` importance rows grow with it."""
        return BudgetKnob("num_buckets", 1, None, lambda b: {"num_buckets": int(b)})

    def sparse_parameters(self) -> list[nn.Parameter]:
        if not self.sparse:
            return []
        return [self.pool, self.importance] if self.weights else [self.pool]

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, num_buckets={self.num_buckets}, num_hashes={self.num_hashes}, "
            f"weights={self.weights}, append_weights={self.append_weights}, sparse={self.sparse}"
        )


@TABLES.register("hash_embedding.v2")
class HashEmbeddingV2(HashEmbedding):
    """``hash_embedding.v1`` with keyed seeds: field ``f``'s hash ``i`` is seeded by ``(seed, f, i)`` alone.

    Same options, layout, bytes and forward as :class:`HashEmbedding`; only the seeds differ
    (:func:`~embcompress.hashing.keyed_seeds`, the importance row's hash numbered ``-1``), so adding a field or
    a hash leaves every other (field, hash) seed unchanged.

    >>> import torch
    >>> a = HashEmbeddingV2([10**9, 500], 8, num_buckets=1000, num_hashes=2)
    >>> b = HashEmbeddingV2([10**9, 500, 3], 8, num_buckets=1000, num_hashes=3)
    >>> torch.equal(a.seeds[:, :2], b.seeds[:2, :2]) and torch.equal(a.seeds[:, 2], b.seeds[:2, 3])
    True
    """

    seed_scheme = "keyed"
