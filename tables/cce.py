"""``cce.v1``: Clustered Compositional Embeddings — hashed chunk sums whose first hash is learned by k-means.

Tsang & Ahle, "Clustering the Sketch: Dynamic Compression for Embedding Tables", NeurIPS 2023.

The ``D``-vector of id ``x`` of field ``f`` is ``c`` chunks of width ``D / c``, concatenated; chunk ``j`` is the
sum of one row of each of two tables of ``m_f`` rows::

    v_j(x) = T0[h0_j(x), j] + T1[h1_j(x), j]
    h0_j(x) = index[f, x, j]                         x < K_f  (a stored index map)
            = bucket(x, s0[f, j], m_f)               x >= K_f (hashed, also every raw id beyond the vocabulary)
    h1_j(x) = bucket(x, s1[f, j], m_f)

with the seeds of :func:`~embcompress.hashing.keyed_seeds` (``s0[f, j]`` hash ``j``, ``s1[f, j]`` hash ``-1 - j``
at construction). It starts as hashing: the index map holds ``bucket(x, s0[f, j], m_f)``. :meth:`CCEEmbedding.
recluster_` is the paper's re-clustering, per field and chunk: the current chunk vectors ``v_j(x)`` of a sample of
the clustered ids are clustered by k-means into ``m_f`` centroids; every clustered id's index becomes its nearest
centroid (over the vectors of *all* clustered ids, not just the sample); ``T0 :=`` the centroids; ``h1`` is
re-drawn (``s1 := mix64(s1)``); ``T1[r] :=`` the mean residual ``v_j(x) - T0[h0_j(x)]`` over the vocabulary ids
``x < n_f`` with ``h1_j(x) = r`` under the *new* ``h1`` (0 for rows no id reaches). The staged pipeline
(:func:`embcompress.cce.run_cce`, reached through :meth:`CCEEmbedding.fit_staged`) trains, re-clusters and trains
again as a :class:`~embcompress.cce.CCESchedule` says.

Design choices (and the reference code's bugs avoided):

* **The index map is counted, and allocated from construction.** It is a buffer ``[sum_f K_f, c]`` of the
  smallest integer type that holds ``max_f m_f`` rows (uint8 up to 256 rows, int16 up to 32,768, else int32), so
  training, serving and the budget all include it, and the bytes never change between stages. The reference's
  headline leaves its int64 index tables out of the count (640 MB for 10M ids and 4 chunks).
* **The budget trades rows against index bytes.** Only the ``K_f = min(n_f, clustered_per_row * m_f)`` lowest
  ids of a field carry a stored index (the most frequent ones, since the data pipeline ranks ids by frequency);
  the others keep a hashed ``h0``. One knob, the total rows ``sum_f m_f`` (water-filled over the fields like
  ``hashing.v1``), then sets both the rows and the index: each row costs ``2 * D * 4`` bytes of tables plus
  ``clustered_per_row * c * itemsize`` bytes of index. ``clustered_per_row=None`` indexes the whole vocabulary
  (the paper's layout), which caps the ratio at ``4 * D / (c * itemsize)`` (16x for D=16, c=4, uint8): beyond that
  the solver raises ``BudgetError`` naming the minimum.
* **Residuals against the new ``h1``.** The reference recomputes ``T1`` with a stale ``h1`` when the vocabulary
  exceeds its k-means sample; here the residual means are taken over every vocabulary id with the re-drawn
  hash, after the assignment of every clustered id.
* Hashes are our hash family (never Python's ``hash()``, and no ``1 << 31 - 1`` precedence slip): every field
  takes raw, unbounded ids.

Initialisation: ``T0`` and ``T1`` rows are ``N(0, init_std**2 / 2)``, so each returned coordinate, a sum of two
independent rows, has std ``init_std``.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import torch
from torch import nn

from embcompress.budget import check_budget
from embcompress.cce import CCESchedule, run_cce
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_per_field, check_positive_int,
    check_seed, resolve_init_std,
)
from embcompress.hashing import bucket, keyed_seeds, mix64
from embcompress.optembed import StagedFit
from embcompress.quantize import check_precision
from embcompress.registry import TABLES
from embcompress.tables.hashing import water_fill
from embcompress.unique import embed_unique

__all__ = ["CCEEmbedding", "index_dtype", "kmeans"]

_BLOCK = 1 << 16  # ids per block when the table builds or re-clusters its index (bounds temporary memory)


def index_dtype(max_rows: int) -> torch.dtype:
    """The smallest integer dtype holding a row number below ``max_rows``: uint8, int16 or int32."""
    if max_rows <= 256:
        return torch.uint8
    return torch.int16 if max_rows <= 32_768 else torch.int32


def _nearest(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``LongTensor[c, S]``: the nearest of ``centroids`` ``[c, k, d]`` to each of ``points`` ``[c, S, d]``."""
    out = torch.empty(points.shape[:2], dtype=torch.long, device=points.device)
    c2 = centroids.pow(2).sum(-1).unsqueeze(1)  # [c, 1, k]
    step = max(1, (1 << 22) // max(centroids.shape[1] * points.shape[0], 1))
    for a in range(0, points.shape[1], step):
        p = points[:, a : a + step]
        d = torch.baddbmm(c2, p, centroids.transpose(1, 2), alpha=-2)  # |c|^2 - 2 p.c  (|p|^2 is constant)
        out[:, a : a + step] = d.argmin(-1)
    return out


def kmeans(points: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """Lloyd's k-means of ``points`` ``[c, S, d]`` (``c`` problems at once, ``S >= k``): centroids ``[c, k, d]``.

    Starts from ``k`` distinct sample points; a centroid left without points is moved to a random point.

    >>> pts = torch.tensor([[[0.0], [0.1], [5.0], [5.1]]])
    >>> kmeans(pts, 2, 5, torch.Generator().manual_seed(0)).sort(dim=1).values.flatten().tolist()
    [0.05000000074505806, 5.050000190734863]
    """
    c, S, d = points.shape
    start = torch.randperm(S, generator=generator)[:k].to(points.device)
    centroids = points[:, start].clone()
    for _ in range(iterations):
        assign = _nearest(points, centroids)
        sums = torch.zeros_like(centroids).scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), points)
        counts = torch.zeros(c, k, device=points.device).scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float))
        empty = counts == 0
        centroids = torch.where(empty.unsqueeze(-1), centroids, sums / counts.clamp(min=1).unsqueeze(-1))
        n_empty = int(empty.sum())
        if n_empty:
            pick = torch.randint(0, S, (n_empty,), generator=generator).to(points.device)
            chunk = empty.nonzero()[:, 0]
            centroids[empty] = points[chunk, pick]
    return centroids


@TABLES.register("cce.v1")
class CCEEmbedding(CompressedEmbedding):
    """Clustered Compositional Embeddings: ``c`` chunks, each the sum of a clustered and a hashed row.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; every field accepts any id in ``[0, 2**63)``.
    Stored: ``table0``, ``table1`` fp32 ``[R * c, D / c]`` (``R = sum_f m_f``; row ``r``'s chunk ``j`` at
    ``r * c + j``); ``index`` ``[sum_f K_f, c]`` uint8 / int16 / int32 (:func:`index_dtype` of ``max_f m_f``);
    int64 ``seeds0``, ``seeds1`` ``[F, c]``; int64 ``rows``, ``clustered``, ``row_offsets``, ``index_offsets``
    ``[F]``; int64 ``generation`` ``[]`` (re-clusterings done).

    Args:
        num_buckets: ``m_f``, the rows of each of the two tables of a field (an int for every field, or one per
            field), at most ``n_f``; the k-means centroids of a field.
        chunks: ``c``, chunks per vector; must divide ``D``.
        clustered_per_row: ids with a stored index per row: ``K_f = min(n_f, clustered_per_row * m_f)``, the
            lowest (most frequent) ids of the field; ``None``: every id of the vocabulary (the paper's layout).
        seed: selects the hash functions; the derived seeds are saved in the state_dict.
        sparse: sparse gradients for ``table0`` and ``table1`` (use with ``torch.optim.SparseAdam``).
        precision: the precision its row tables are served at (:mod:`embcompress.quantize`: fp32, fp16, bf16,
            int8, int4): trained in fp32, returned at that precision in eval mode and by :meth:`export`,
            and counted so in serving bytes and budgets.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    It trains in stages (:attr:`schedule_type`, :meth:`fit_staged`); :meth:`recluster_` is the re-clustering.

    >>> import torch
    >>> t = CCEEmbedding([1000, 40], 8, num_buckets=16, chunks=2, clustered_per_row=4)
    >>> ids = torch.tensor([[3, 39], [2**40 + 7, 0]])
    >>> t(ids).shape
    torch.Size([2, 2, 8])
    >>> t.memory_report().total_bytes == 2 * 32 * 8 * 4 + (64 + 40) * 2 + 2 * 2 * 2 * 8 + 4 * 2 * 8 + 8
    True
    >>> stats = t.recluster_(iterations=3, sample=100)
    >>> int(t.generation), t(ids).shape
    (1, torch.Size([2, 2, 8]))
    """

    accepts_raw_ids = True
    trains_in_stages: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[CCESchedule]] = CCESchedule
    #: The budget :meth:`from_budget` built the table to (``None`` when built directly); it is the table served.
    budget_bytes: int | None = None

    row_parameters = ('table0', 'table1')  # stored at `precision` when served

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        num_buckets: int | Sequence[int],
        chunks: int = 4,
        clustered_per_row: int | None = 8,
        seed: int = 0,
        sparse: bool = False,
        precision: str = "fp32",
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        seed = check_seed(seed, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.chunks = c = check_positive_int("chunks", chunks, owner=self)
        if embedding_dim % c:
            raise self._fail(f"chunks={c} must divide embedding_dim={embedding_dim}")
        self.clustered_per_row = check_positive_int("clustered_per_row", clustered_per_row, optional=True, owner=self)
        values = check_per_field("num_buckets", num_buckets, self.num_fields, owner=self)
        rows = [min(m, n) for m, n in zip(values, self.cardinalities)]
        per_row = self.clustered_per_row
        clustered = [n if per_row is None else min(n, per_row * m) for n, m in zip(self.cardinalities, rows)]
        R, K, dc = sum(rows), sum(clustered), embedding_dim // c
        std = self.init_std / 2**0.5  # two independent rows per coordinate
        self.table0 = nn.Parameter(torch.empty(R * c, dc))
        self.table1 = nn.Parameter(torch.empty(R * c, dc))
        with torch.no_grad():
            self.table0.normal_(0.0, std)
            self.table1.normal_(0.0, std)
        self.register_buffer("seeds0", keyed_seeds(seed, self.num_fields, c))
        self.register_buffer("seeds1", keyed_seeds(seed, self.num_fields, [-1 - j for j in range(c)]))
        self.register_buffer("rows", torch.tensor(rows, dtype=torch.int64))
        self.register_buffer("clustered", torch.tensor(clustered, dtype=torch.int64))
        self.register_buffer("row_offsets", torch.tensor(list(itertools.accumulate(rows, initial=0))[:-1]))
        self.register_buffer("index_offsets", torch.tensor(list(itertools.accumulate(clustered, initial=0))[:-1]))
        self.register_buffer("generation", torch.zeros((), dtype=torch.int64))
        self.register_buffer("index", torch.empty(K, c, dtype=index_dtype(max(rows))))
        if self.index.device.type != "meta":  # the hashed start: index[f, x, j] = bucket(x, s0[f, j], m_f)
            with torch.no_grad():
                for f, (k, m) in enumerate(zip(clustered, rows)):
                    off = int(self.index_offsets[f])
                    for a in range(0, k, _BLOCK):
                        ids = torch.arange(a, min(a + _BLOCK, k), device=self.index.device)
                        h = bucket(ids.unsqueeze(-1), self.seeds0[f], m)
                        self.index[off + a : off + a + len(ids)] = h.to(self.index.dtype)

    # ------------------------------------------------------------------------------------------------ forward
    def _rows_of(self, ids: torch.Tensor, fields: torch.Tensor, seeds1: torch.Tensor | None = None,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat rows of ``table0`` / ``table1`` ``[..., c]`` of each id's chunks (default: the stored hashes)."""
        seeds1 = self.seeds1 if seeds1 is None else seeds1
        index = self.index if index is None else index
        m = self.rows[fields].unsqueeze(-1)
        x = ids.unsqueeze(-1)
        h0 = bucket(x, self.seeds0[fields], m)
        k = self.clustered[fields]
        inside = ids < k
        pos = torch.where(inside, ids, torch.zeros_like(ids)) + self.index_offsets[fields]
        h0 = torch.where(inside.unsqueeze(-1), index[pos].long(), h0)
        h1 = bucket(x, seeds1[fields], m)
        base = self.row_offsets[fields].unsqueeze(-1)
        chunk = torch.arange(self.chunks, device=ids.device)
        return (h0 + base) * self.chunks + chunk, (h1 + base) * self.chunks + chunk

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return embed_unique(self._embed, ids, fields, self.embedding_dim)

    def _embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        r0, r1 = self._rows_of(ids, fields)
        return self.read_rows(self.table0, r0) + self.read_rows(self.table1, r1)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.table0, self.table1] if self.sparse else []

    def index_bytes(self) -> int:
        """Bytes of the stored index map (part of every byte count of the table)."""
        return self.index.numel() * self.index.element_size()

    # ------------------------------------------------------------------------------------------ re-clustering
    @torch.no_grad()
    def recluster_(self, *, iterations: int = 10, sample: int = 65_536, seed: int = 0) -> dict:
        """Re-cluster every field (see the module docstring); returns reconstruction statistics.

        ``sample``: ids per field k-means is fitted on (raised to the field's rows, capped at its clustered ids);
        ``seed``: the k-means seed. Returns ``{"generation", "mean_square", "change"}``: the mean squared norm of
        the vocabulary's vectors before, and the mean squared change of a vector, over every field's ids.
        """
        iterations = check_int("iterations", iterations, lo=0, owner=self)
        sample = check_positive_int("sample", sample, owner=self)
        gen = torch.Generator().manual_seed(check_int("seed", seed, lo=0, owner=self))
        c, dc, dev = self.chunks, self.embedding_dim // self.chunks, self.table0.device
        old0, old1, old_index, old_seeds1 = self.table0.clone(), self.table1.clone(), self.index.clone(), self.seeds1.clone()
        new_seeds1 = mix64(old_seeds1)
        new_index = self.index.clone()
        new0, new1 = self.table0.view(-1, c, dc), self.table1.view(-1, c, dc)

        def old_vectors(ids: torch.Tensor, f: int) -> torch.Tensor:  # [B, c, dc] before this re-clustering
            r0, r1 = self._rows_of(ids, torch.tensor(f, device=dev), old_seeds1, old_index)
            return old0[r0] + old1[r1]

        def blocks(n: int):
            for a in range(0, n, _BLOCK):
                yield torch.arange(a, min(a + _BLOCK, n), device=dev)

        for f in range(self.num_fields):
            n, m, k = self.cardinalities[f], int(self.rows[f]), int(self.clustered[f])
            base, off = int(self.row_offsets[f]), int(self.index_offsets[f])
            size = min(k, max(sample, m))
            chosen = torch.randperm(k, generator=gen)[:size].sort().values.to(dev)
            centroids = kmeans(old_vectors(chosen, f).transpose(0, 1).contiguous(), m, iterations, gen)  # [c, m, dc]
            for ids in blocks(k):  # every clustered id to its nearest centroid
                nearest = _nearest(old_vectors(ids, f).transpose(0, 1).contiguous(), centroids)  # [c, B]
                new_index[off + ids] = nearest.t().to(new_index.dtype)
            sums = torch.zeros(m * c, dc, device=dev)
            counts = torch.zeros(m * c, device=dev)
            chunk = torch.arange(c, device=dev)
            flat_centroids = centroids.transpose(0, 1).reshape(m * c, dc)  # row r chunk j at r * c + j
            for ids in blocks(n):  # residuals of every vocabulary id against the NEW h0 and the NEW h1
                r0, r1 = self._rows_of(ids, torch.tensor(f, device=dev), new_seeds1, new_index)
                residual = old_vectors(ids, f) - flat_centroids[r0 - base * c]
                sums.index_add_(0, (r1 - base * c).reshape(-1), residual.reshape(-1, dc))
                counts.index_add_(0, (r1 - base * c).reshape(-1), torch.ones(r1.numel(), device=dev))
            new0[base : base + m] = centroids.transpose(0, 1)
            new1[base : base + m] = (sums / counts.clamp(min=1).unsqueeze(-1)).view(m, c, dc)
        self.index.copy_(new_index)
        self.seeds1.copy_(new_seeds1)
        self.generation += 1
        square = change = 0.0
        total = sum(self.cardinalities)
        for f in range(self.num_fields):
            for ids in blocks(self.cardinalities[f]):
                before = old_vectors(ids, f)
                r0, r1 = self._rows_of(ids, torch.tensor(f, device=dev))
                after = self.table0[r0] + self.table1[r1]
                square += float(before.pow(2).sum())
                change += float((after - before).pow(2).sum())
        return {"generation": int(self.generation), "mean_square": square / total, "change": change / total}

    def fit_staged(self, model: nn.Module, data, cfg, schedule: CCESchedule | None = None) -> StagedFit:
        """Train, re-cluster and train again as ``schedule`` says (``None``: the default
        :class:`~embcompress.cce.CCESchedule`): the staged hook, :func:`embcompress.cce.run_cce` with this table."""
        return run_cce(model, self, data, cfg, schedule)

    # ------------------------------------------------------------------------------------------------- budget
    budget_keys = ("num_buckets",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        """The knob is the total rows ``sum_f m_f`` per table, water-filled over the fields (``m_f = min(n_f,
        cap)``); the clustered ids, and so the index bytes, follow the rows."""
        cards = as_cardinalities(cardinalities)
        return BudgetKnob("rows", len(cards), sum(cards), lambda r: {"num_buckets": water_fill(cards, int(r))})

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim: int, *, budget_bytes: int, **options) -> "CCEEmbedding":
        """The shared solver's table (it is the table that trains and the table served), with the budget it
        was built to recorded as :attr:`budget_bytes` (at most the full table's bytes)."""
        table = super().from_budget(cardinalities, embedding_dim, budget_bytes=budget_bytes, **options)
        table.budget_bytes = min(check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return table

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, rows={self.table0.shape[0] // self.chunks}, chunks={self.chunks}, "
                f"clustered_per_row={self.clustered_per_row}, index={self.index.dtype}, sparse={self.sparse}")
