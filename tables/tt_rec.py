"""``tt_rec.v1``: tensor-train compressed embedding tables (TT-Rec).

Yin, Acun, Liu & Wu, "TT-Rec: Tensor Train Compression for Deep Learning Recommendation Model Embeddings",
MLSys 2021 (tensor-train decomposition: Oseledets, "Tensor-Train Decomposition", SIAM J. Sci. Comput. 2011).

A field's ``[n, D]`` table is never stored. Its ids are padded up to ``n1 * n2 * n3 >= n`` and the width factored
as ``D = d1 * d2 * d3``; the field stores three *cores* ``G1 [1, n1, d1, r]``, ``G2 [r, n2, d2, r]``,
``G3 [r, n3, d3, 1]``, and the row of an id is the chain product of the id's three slices::

    (i1, i2, i3)       = (x // (n2 * n3), (x // n3) % n2, x % n3)            mixed radix, exact int64
    row(x)[a, b, c]    = sum_{k, l} G1[0, i1, a, k] * G2[k, i2, b, l] * G3[l, i3, c, 0]
    row(x) flattened   at a * d2 * d3 + b * d3 + c

computed as two batched matmuls ``[N, d1, r] @ [N, r, d2 r] -> [N, d1 d2, r] @ [N, r, d3] -> [N, D]``. A field
costs ``4 * r * (n1 d1 + n2 d2 r + n3 d3)`` bytes instead of ``4 * n * D``.

Design choices:

* **Factors.** ``n1 = ceil(n**(1/3))``, ``n2 = ceil(sqrt(ceil(n / n1)))``, ``n3 = ceil(n / (n1 n2))``, then the
  smallest of the three moved to the middle (the middle core is the one that grows with ``r**2``); ``D`` is
  split into the most balanced ``d1 * d2 * d3`` with the smallest factor in the middle (``D = 16 -> 4 x 2 x 2``).
  Ids of the padding (``n <= x < n1 n2 n3``) are refused like any id outside the field.
* **Rank and the budget.** ``rank`` is per field; ``0`` stores the field as plain rows. The budget knob is one
  integer rank ``r`` for every field above ``threshold``; a field whose cores at ``r`` would take at least the
  bytes of its plain rows is stored plain instead (so no field ever costs more than uncompressed, and bytes
  grow monotonically with ``r``). What ``r`` leaves of the budget is spent by raising single fields to ``r + 1``,
  largest first, so a budget-built table has at most two ranks.
* **Fused storage, no loop over fields.** The fields of one rank share three fused parameters (their cores
  stacked along the id-slice axis, addressed by per-field row offsets); plain fields share one ``rows`` weight.
  ``forward`` splits the ``F`` columns by group (host-side constant lists, no device sync) and runs one chain
  per rank group, i.e. at most a few batched matmuls for all fields together. Bags (:meth:`forward_bags`), whose
  per-id fields are data, run every group on every id and select, which is exact but costs one chain per group.
* **Cost.** Each lookup gathers a middle slice of ``r * d2 * r`` floats and runs two tiny matmuls; on the CPU this
  is far slower than a row gather (about 11x the full table's training step at 16x, rank ~30, measured once on
  Criteo-like fields, before de-duplication), and it grows with ``r**2``. Each distinct id of a batch is
  composed once and each distinct core row read once (:mod:`embcompress.unique`; a device sync on CUDA).
* **Initialisation.** Every core entry is ``N(0, s**2)`` with ``s = (init_std / r) ** (1/3)``: a row entry is a
  sum of ``r * r`` uncorrelated products of three such entries, so its variance is ``r**2 s**6 = init_std**2``
  whatever the rank. (The reference's plain ``N(0, sigma)`` per core makes rows scale as ``r * sigma**3``, which
  explodes or vanishes with the rank; its "approx-normal" init targets a fixed std rather than ``init_std``.)
* **Exact integer indices.** Slices are computed with int64 floor division and remainders (never float
  division, which merges ids above ``2**24``), and padded ids are rejected rather than clamped.
* **No frequent-row cache.** The paper's optional LFU cache of the hottest rows (uncompressed, refreshed during
  training) is not implemented; every row is composed from the cores.

:func:`tt_decompose` is the TT-SVD of a given ``[n, D]`` matrix into this layout (exact at full rank), and
:meth:`TTRecEmbedding.load_field_` loads cores into a field, e.g. to start from a trained full table.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_per_field, init_rows_,
    resolve_init_std,
)
from embcompress.registry import TABLES
from embcompress.unique import unique_rows

__all__ = ["TTRecEmbedding", "row_factors", "dim_factors", "tt_field_bytes", "tt_decompose"]

BUFFER_BYTES_PER_FIELD = 8 + 3 * 3 * 8  # int64 group [F] and divisors / moduli / offsets [F, 3]


def _icbrt_up(n: int) -> int:
    r = max(1, round(n ** (1.0 / 3.0)))
    while r**3 < n:
        r += 1
    while r > 1 and (r - 1) ** 3 >= n:
        r -= 1
    return r


def row_factors(n: int) -> tuple[int, int, int]:
    """``(n1, n2, n3)`` with ``n1 * n2 * n3 >= n``, near-balanced, the smallest in the middle (exact ints)."""
    n1 = _icbrt_up(n)
    rest = -(-n // n1)
    n2 = math.isqrt(rest - 1) + 1 if rest > 1 else 1  # ceil(sqrt(rest))
    n3 = -(-n // (n1 * n2))
    a, b, c = sorted((n1, n2, n3))
    return (c, a, b)


def dim_factors(embedding_dim: int) -> tuple[int, int, int]:
    """``(d1, d2, d3)`` with ``d1 * d2 * d3 = D``: the most balanced split, the smallest factor in the middle."""
    D = embedding_dim
    best = None
    for a in range(1, D + 1):
        if D % a:
            continue
        for b in range(1, D // a + 1):
            if (D // a) % b:
                continue
            c = D // a // b
            key = (max(a, b, c) - min(a, b, c), max(a, b, c))
            if best is None or key < best[0]:
                best = (key, tuple(sorted((a, b, c))))
    lo, mid, hi = best[1]
    return (hi, lo, mid)


def tt_field_bytes(n: int, embedding_dim: int, rank: int) -> int:
    """fp32 bytes of one field's three cores at ``rank``: ``4 r (n1 d1 + n2 d2 r + n3 d3)``."""
    (n1, n2, n3), (d1, d2, d3) = row_factors(n), dim_factors(embedding_dim)
    return 4 * rank * (n1 * d1 + n2 * d2 * rank + n3 * d3)


def _budget_ranks(cards: Sequence[int], embedding_dim: int, rank: int, threshold: int) -> list[int]:
    """Per-field ranks for the knob value ``rank``: 0 (plain rows) at or under ``threshold``, or where the cores
    would not be smaller than the rows."""
    return [0 if n <= threshold or tt_field_bytes(n, embedding_dim, rank) >= 4 * n * embedding_dim else rank
            for n in cards]


def _planned(cards: Sequence[int], embedding_dim: int, ranks: Sequence[int], threshold: int) -> int:
    """Exact bytes of a table with these per-field ranks (what ``memory_report`` counts)."""
    total = BUFFER_BYTES_PER_FIELD * len(cards)
    for n, r in zip(cards, ranks):
        total += tt_field_bytes(n, embedding_dim, r) if (r > 0 and n > threshold) else 4 * n * embedding_dim
    return total


def tt_decompose(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TT-SVD of ``matrix`` ``[n, D]`` into the three cores of this layout, zero-padded to ``rank``.

    Returns ``(G1 [n1, d1 * r], G2 [n2, r * d2 * r], G3 [n3, r * d3])`` (the shapes :meth:`load_field_` takes; rows
    beyond ``n`` count as zeros). Exact when ``rank`` reaches the TT ranks of the matrix (at most
    ``min(n1 d1, n2 d2 n3 d3)`` and ``min(n1 d1 n2 d2, n3 d3)``); below them, the sequential truncated SVD.
    """
    n, D = matrix.shape
    (n1, n2, n3), (d1, d2, d3) = row_factors(n), dim_factors(D)
    r = int(rank)
    full = matrix.new_zeros(n1 * n2 * n3, D)
    full[:n] = matrix
    t = full.reshape(n1, n2, n3, d1, d2, d3).permute(0, 3, 1, 4, 2, 5)  # [n1, d1, n2, d2, n3, d3]
    u, s, vh = torch.linalg.svd(t.reshape(n1 * d1, -1), full_matrices=False)
    k1 = min(r, s.numel())
    g1 = u[:, :k1]  # [n1 d1, k1]
    rest = (s[:k1, None] * vh[:k1]).reshape(k1 * n2 * d2, n3 * d3)
    u, s, vh = torch.linalg.svd(rest, full_matrices=False)
    k2 = min(r, s.numel())
    g2 = u[:, :k2]  # [k1 n2 d2, k2]
    g3 = s[:k2, None] * vh[:k2]  # [k2, n3 d3]
    G1 = matrix.new_zeros(n1, d1, r)
    G1[:, :, :k1] = g1.reshape(n1, d1, k1)
    G2 = matrix.new_zeros(n2, r, d2, r)
    G2[:, :k1, :, :k2] = g2.reshape(k1, n2, d2, k2).permute(1, 0, 2, 3)
    G3 = matrix.new_zeros(n3, r, d3)
    G3[:, :k2] = g3.reshape(k2, n3, d3).permute(1, 0, 2)
    return G1.reshape(n1, -1), G2.reshape(n2, -1), G3.reshape(n3, -1)


@TABLES.register("tt_rec.v1")
class TTRecEmbedding(CompressedEmbedding):
    """Tensor-train embedding tables: three small cores per field, a row is their chain product.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored, per rank group ``g`` of rank ``r`` (fields with the same positive rank), three fp32 parameters in
    ``cores``: ``[sum n1_f, d1 * r]``, ``[sum n2_f, r * d2 * r]``, ``[sum n3_f, r * d3]`` (field ``f``'s slice
    ``i`` of core ``j`` is row ``offsets[f, j] + i``); ``rows`` ``[sum n_f, D]`` fp32 for the plain fields (absent
    when there are none); int64 buffers ``group`` ``[F]`` (-1 for plain fields), ``divisors``, ``moduli`` and
    ``offsets`` ``[F, 3]`` (slice ``j`` of an id is ``(x // divisors[f, j]) % moduli[f, j]``).

    Args:
        rank: the TT rank ``r`` (one int, or one per field); 0 stores a field as plain rows.
        threshold: fields with at most this many ids are stored as plain rows (default 200).
        sparse: sparse gradients for the cores and rows (use with ``torch.optim.SparseAdam``).
        init_std: std of the returned vectors at initialisation (``None``: the library default); the cores
            start at ``(init_std / r) ** (1/3)`` (see the module docstring).

    >>> import torch
    >>> t = TTRecEmbedding([10**6, 50], 16, rank=8)  # field 0: cores 100 x 4 x 8, 8 x 100 x 2 x 8, 8 x 100 x 2
    >>> t(torch.tensor([[999_999, 49], [0, 0]])).shape
    torch.Size([2, 2, 16])
    >>> [tuple(c.shape) for c in t.cores], tuple(t.rows.shape)
    ([(100, 32), (100, 128), (100, 16)], (50, 16))
    >>> round(t.memory_report().ratio)
    868
    """

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        rank: int | Sequence[int] = 16,
        threshold: int = 200,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        ranks = check_per_field("rank", rank, self.num_fields, lo=0, owner=self)
        self.threshold = check_int("threshold", threshold, lo=0, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = s = resolve_init_std(init_std, embedding_dim, owner=self)
        self.dims = dim_factors(embedding_dim)
        # 0 = plain rows; the rank of each compressed field otherwise.
        self.ranks = tuple(r if n > self.threshold else 0 for n, r in zip(self.cardinalities, ranks))
        self.group_ranks = tuple(sorted({r for r in self.ranks if r > 0}))
        group, divisors, moduli, offsets = [], [], [], []
        counts = {r: [0, 0, 0] for r in self.group_ranks}
        plain_rows = 0
        for n, r in zip(self.cardinalities, self.ranks):
            if r == 0:
                group.append(-1)
                divisors.append((1, 1, 1))
                moduli.append((n, 1, 1))
                offsets.append((plain_rows, 0, 0))
                plain_rows += n
                continue
            n1, n2, n3 = row_factors(n)
            group.append(self.group_ranks.index(r))
            divisors.append((n2 * n3, n3, 1))
            moduli.append((n1, n2, n3))
            offsets.append(tuple(counts[r]))
            counts[r] = [counts[r][0] + n1, counts[r][1] + n2, counts[r][2] + n3]
        d1, d2, d3 = self.dims
        self.cores = nn.ParameterList()
        for r in self.group_ranks:
            core_std = (s / r) ** (1.0 / 3.0)
            for rows, width in zip(counts[r], (d1 * r, r * d2 * r, r * d3)):
                self.cores.append(nn.Parameter(init_rows_(torch.empty(rows, width), core_std)))
        self.register_parameter(
            "rows", nn.Parameter(init_rows_(torch.empty(plain_rows, embedding_dim), s)) if plain_rows else None)
        self.register_buffer("group", torch.tensor(group, dtype=torch.int64))
        self.register_buffer("divisors", torch.tensor(divisors, dtype=torch.int64))
        self.register_buffer("moduli", torch.tensor(moduli, dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        # Columns of each group (plain first, then the rank groups), host-side constants of the layout.
        groups = [-1, *range(len(self.group_ranks))]
        self._columns = [[f for f, g in enumerate(group) if g == j] for j in groups]
        self._columns = [(j, cols) for j, cols in zip(groups, self._columns) if cols]
        order = [f for _, cols in self._columns for f in cols]
        self._inverse = [order.index(f) for f in range(self.num_fields)]
        self._col_cache: dict[torch.device, list[torch.Tensor]] = {}

    # ---------------------------------------------------------------------------------------------- forward
    def _slices(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``LongTensor[..., 3]``: row of each id in each core (plain fields: its row of ``rows`` at 0)."""
        x = torch.div(ids.unsqueeze(-1), self.divisors[fields], rounding_mode="floor")
        return x % self.moduli[fields] + self.offsets[fields]

    def _chain(self, g: int, idx: torch.Tensor) -> torch.Tensor:
        """Rows of rank group ``g`` from valid core rows ``idx`` ``[..., 3]`` -> ``[..., D]``.

        Each distinct ``(i1, i2, i3)`` is composed once, and each distinct core row gathered once, so the
        matmuls and the sparse gradients scale with the batch's distinct ids, not its lookups.
        """
        r = self.group_ranks[g]
        d1, d2, d3 = self.dims
        c1, c2, c3 = self.cores[3 * g: 3 * g + 3]
        flat = idx.reshape(-1, 3)
        n2, n3 = c2.shape[0], c3.shape[0]
        keys, inverse = unique_rows((flat[:, 0] * n2 + flat[:, 1]) * n3 + flat[:, 2])
        i12 = torch.div(keys, n3, rounding_mode="floor")
        a = self._core_rows(c1, torch.div(i12, n2, rounding_mode="floor")).view(-1, d1, r)
        b = self._core_rows(c2, i12 % n2).view(-1, r, d2 * r)
        c = self._core_rows(c3, keys % n3).view(-1, r, d3)
        ab = torch.bmm(a, b).view(-1, d1 * d2, r)
        rows = torch.bmm(ab, c).view(-1, self.embedding_dim)
        return rows.index_select(0, inverse).view(*idx.shape[:-1], self.embedding_dim)

    def _core_rows(self, core: nn.Parameter, rows: torch.Tensor) -> torch.Tensor:
        unique, inverse = unique_rows(rows)
        return F.embedding(unique, core, sparse=self.sparse).index_select(0, inverse)

    def _plain(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx[..., 0], self.rows, sparse=self.sparse)

    def _group(self, j: int, idx: torch.Tensor) -> torch.Tensor:
        return self._plain(idx) if j < 0 else self._chain(j, idx)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        positions, _ = self._consts(ids.device)
        if not self.single and fields is positions and len(self._columns) > 1:
            # forward(): the fields are the columns, so each group computes only its own columns.
            cols = self._device_columns(ids.device)
            parts = [self._group(j, self._slices(ids.index_select(-1, c), c))
                     for (j, _), c in zip(self._columns, cols[:-1])]
            return torch.cat(parts, dim=-2).index_select(-2, cols[-1])
        idx = self._slices(ids, fields)
        if len(self._columns) == 1:
            return self._group(self._columns[0][0], idx)
        # Bags: per-id fields are data; every group runs on every id (others read row 0) and selects its own.
        gid = torch.broadcast_to(self.group[fields], ids.shape)
        out = None
        for j, _ in self._columns:
            mine = (gid == j).unsqueeze(-1)
            vec = self._group(j, torch.where(mine, idx, torch.zeros_like(idx)))
            out = vec if out is None else torch.where(mine, vec, out)
        return out

    def _device_columns(self, device: torch.device) -> list[torch.Tensor]:
        if device not in self._col_cache:
            self._col_cache[device] = [torch.tensor(cols, dtype=torch.int64, device=device)
                                       for _, cols in self._columns] + [
                torch.tensor(self._inverse, dtype=torch.int64, device=device)]
        return self._col_cache[device]

    def sparse_parameters(self) -> list[nn.Parameter]:
        if not self.sparse:
            return []
        return list(self.cores) + ([self.rows] if self.rows is not None else [])

    # ---------------------------------------------------------------------------------------------- cores
    def field_cores(self, field: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views ``(G1 [n1, d1 r], G2 [n2, r d2 r], G3 [n3, r d3])`` of a compressed field's cores."""
        g = int(self.group[field])
        if g < 0:
            raise self._fail(f"field {field} is stored as plain rows, it has no cores")
        return tuple(core[int(o): int(o) + int(m)] for core, o, m in
                     zip(self.cores[3 * g: 3 * g + 3], self.offsets[field], self.moduli[field]))

    @torch.no_grad()
    def load_field_(self, field: int, cores: Sequence[torch.Tensor]) -> "TTRecEmbedding":
        """Copy three cores (the shapes of :meth:`field_cores`, e.g. from :func:`tt_decompose`) into a field."""
        for mine, given in zip(self.field_cores(field), cores):
            if tuple(given.shape) != tuple(mine.shape):
                raise self._fail(f"field {field}: a core of shape {list(mine.shape)} got {list(given.shape)}")
            mine.copy_(given)
        return self

    # ---------------------------------------------------------------------------------------------- budget
    budget_keys = ("rank",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, *, threshold: int = 200, **options) -> BudgetKnob:
        """The knob is one TT rank ``r`` for every field above ``threshold`` (a field whose cores at ``r`` would
        not be smaller than its rows stays plain); what ``r`` leaves of the budget raises single fields to
        ``r + 1``, largest first."""
        threshold = check_int("threshold", threshold, lo=0, owner=cls)
        cards = list(as_cardinalities(cardinalities))
        D = int(embedding_dim)
        big = [n for n in cards if n > threshold]
        # Past the largest rank at which some field is still compressed, every field is plain.
        hi = 1
        for n in big:
            while tt_field_bytes(n, D, hi) < 4 * n * D:
                hi += 1

        def kwargs(r) -> dict:
            return {"rank": _budget_ranks(cards, D, int(r), threshold)}

        def refine(r, budget: int) -> dict:
            ranks = _budget_ranks(cards, D, int(r), threshold)
            for f in sorted(range(len(cards)), key=lambda i: -cards[i]):
                if ranks[f] == 0:
                    continue
                trial = list(ranks)
                trial[f] = _budget_ranks([cards[f]], D, int(r) + 1, threshold)[0]
                if _planned(cards, D, trial, threshold) <= budget:
                    ranks = trial
            if cls.planned_bytes(cardinalities, embedding_dim, rank=ranks, threshold=threshold, **options) > budget:
                return kwargs(r)
            return {"rank": ranks}

        return BudgetKnob("rank", 1, hi, kwargs, refine=refine)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, ranks={list(self.ranks)}, dims={self.dims}, threshold={self.threshold}, "
                f"sparse={self.sparse}")
