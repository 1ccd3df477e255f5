"""``dpq.v1``: Differentiable Product Quantization — every id is a few codes into small per-part codebooks.

Chen, Li & Sun, "Differentiable Product Quantization for End-to-End Embedding Compression", ICML 2020; the
straight-through vector-quantisation variant (DPQ-VQ).

The ``D``-vector of id ``x`` of field ``f`` is ``p`` parts of width ``d = D / p``. During training each id holds a
*query* ``q(x)`` (a full fp32 table of queries ``[sum_f n_f, D]``); part ``j`` of its output is the centroid of
codebook ``C[j]`` (``K`` centroids of width ``d``) nearest to the query's part ``j``::

    code_j(x) = argmin_k ||q_j(x) - C[j, k]||^2          out_j(x) = C[j, code_j(x)]

Served, only the codes ``[sum_f n_f, p]`` and the codebooks are kept (:meth:`DPQEmbedding.export`): ``p`` small
integers per id instead of ``D`` floats.

Design choices:

* **Straight-through, exactly the centroid.** In training the output is ``c + (q - sg(q))``: its value is the
  centroid ``c`` bit for bit (``q - q`` is exactly 0), so the trained table, its eval mode and its export agree
  exactly; the task gradient reaches the query (the straight-through estimator) and the chosen centroid. The
  reference writes ``q + sg(c - q)``, whose value is ``c`` only up to rounding, and trains the centroids by the
  regulariser alone; here both are trained by it too: :meth:`DPQEmbedding.regularization_loss` is
  ``mean ||sg(q) - c||^2 + beta * mean ||q - sg(c)||^2`` (the codebook loss and the commitment loss, means over
  the coordinates of every lookup of the batch, computed once per distinct lookup and weighted by its count),
  which the training loop adds to its loss.
* **One codebook per part, shared by every field** (``[p, K, d]``): the codebooks cost ``K * D * 4`` bytes
  whatever the number of fields, a field of three ids costs three codes and no codebook of its own, and each
  field still has ``K ** p`` distinct vectors to use. The reference shares one codebook set per embedding table.
* **Distances coordinate by coordinate.** ``sum_i (q_i - c_i)^2`` is accumulated over ``i`` with plain
  elementwise operations (no matrix product, whose blocking and rounding depend on the batch's shape), so an id's
  code is the same bit-exact argmin in any batch, in :meth:`~DPQEmbedding.export` and on any device.
* **Codes in the smallest integer type** (:func:`~embcompress.tables.cce.index_dtype` of ``K``: uint8 up to 256
  centroids, int16 up to 32,768, else int32).
* **The budget binds the served table, and the knob is ``parts``.** Serving bytes are
  ``sum_f n_f * p * itemsize + K * D * 4 + 8 F``, so the ratio is just under ``4 D / (p * itemsize)``: at D=16
  with ``K <= 256``, ``p = 16, 8, 4, 2, 1`` serve about 4x, 8x, 16x, 32x, 64x less than the fp32 table, a little
  less for the codebook. ``parts`` is solved from the budget (the largest divisor of ``D`` that fits, so a budget
  lands under it by up to a factor of two: at exactly ``4 D / p`` times the codebook no longer fits and the
  next smaller ``p`` is built); 64x and more at D=16 (codes alone cost one byte an id) raise ``BudgetError``
  naming the minimum.

Initialisation: queries are ``N(0, init_std**2)``; each codebook starts as the matching part of ``K`` random
query rows; the nearest of ``K`` random points leans to the short ones (0.8 of the std with one part of 16), so
queries and codebook are then scaled together (every code kept) until the vectors returned for a sample of rows
have std ``init_std`` (:meth:`DPQEmbedding.reset_codebook_`).

Regularisation: the terms of every training-mode forward since the last :meth:`~DPQEmbedding.
regularization_loss` add up (a model may look up twice a step); an optimizer step, which bumps the parameters'
version counters, starts a new sum, so a loop that never asks for the term keeps no old graph alive.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import (
    BudgetError, BudgetKnob, CompressedEmbedding, check_bool, check_number, check_positive_int, init_rows_,
    resolve_init_std,
)
from embcompress.registry import TABLES
from embcompress.tables.cce import index_dtype
from embcompress.unique import unique_pairs

__all__ = ["DPQEmbedding", "DPQExport", "nearest_codes"]

_BLOCK = 1 << 22  # distance entries (rows x parts x K) computed at once: bounds the temporary memory


def nearest_codes(queries: torch.Tensor, codebook: torch.Tensor, limit: torch.Tensor | None = None) -> torch.Tensor:
    """``LongTensor[M, p]``: the nearest of ``codebook`` ``[p, K, d]`` to each part of ``queries`` ``[M, p, d]``.

    ``limit`` ``LongTensor[M]``: row ``m`` may only use the first ``limit[m]`` centroids (``None``: all). The
    squared distance is summed coordinate by coordinate with elementwise operations, so a row's code does not
    depend on the other rows it is computed with; ties go to the lowest code.

    >>> cb = torch.tensor([[[0.0], [1.0], [3.0]]])
    >>> nearest_codes(torch.tensor([[[0.9]], [[2.9]], [[2.9]]]), cb, torch.tensor([3, 3, 2])).flatten().tolist()
    [1, 2, 1]
    """
    M, p, d = queries.shape
    K = codebook.shape[1]
    out = torch.empty(M, p, dtype=torch.long, device=queries.device)
    step = max(1, _BLOCK // max(p * K, 1))
    with torch.no_grad():
        for a in range(0, M, step):
            q = queries[a : a + step]
            dist = None
            for i in range(d):
                diff = q[:, :, i : i + 1] - codebook[:, :, i]  # [m, p, 1] - [p, K] -> [m, p, K]
                sq = diff * diff
                dist = sq if dist is None else dist.add_(sq)
            if limit is not None:
                allowed = torch.arange(K, device=q.device) < limit[a : a + step, None, None]
                dist = dist.masked_fill(~allowed, float("inf"))
            out[a : a + step] = dist.argmin(-1)
    return out


def _divisor_at_most(n: int, value: int) -> int:
    return max(k for k in range(1, min(n, int(value)) + 1) if n % k == 0)


@TABLES.register("dpq.v1")
class DPQEmbedding(CompressedEmbedding):
    """Product-quantised embeddings: trained queries, served as ``p`` codes per id into per-part codebooks.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored while training: ``queries`` fp32 ``[sum_f n_f, D]``; ``codebook`` fp32 ``[p, K, D / p]``; int64
    ``offsets`` ``[F]``. Served (:meth:`export`, :class:`DPQExport`): the codes ``[sum_f n_f, p]`` of
    :func:`~embcompress.tables.cce.index_dtype` of ``K``, the codebook and the offsets.

    Args:
        parts: ``p``, the sub-vectors (codes) per id; must divide ``D``. Solved by :meth:`from_budget`.
        codebook_size: ``K``, the centroids of each part's codebook.
        beta: weight of the commitment loss ``||q - sg(c)||^2`` in :meth:`regularization_loss` (the codebook
            loss ``||sg(q) - c||^2`` has weight 1).
        sparse: sparse gradients for ``queries`` (use with ``torch.optim.SparseAdam``).
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = DPQEmbedding([1000, 40], 8, parts=4, codebook_size=16)
    >>> ids = torch.tensor([[3, 39], [999, 0]])
    >>> t(ids).shape
    torch.Size([2, 2, 8])
    >>> t.memory_report().serving_bytes == 1040 * 4 * 1 + 16 * 8 * 4 + 2 * 8   # uint8 codes, codebook, offsets
    True
    >>> served = t.export()
    >>> served.codes.dtype, torch.equal(served(ids), t.eval()(ids))
    (torch.uint8, True)
    """

    budget_keys: ClassVar[tuple[str, ...]] = ("parts",)
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "seed", "beta")

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        parts: int = 4,
        codebook_size: int = 256,
        beta: float = 0.25,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.parts = p = check_positive_int("parts", parts, owner=self)
        if embedding_dim % p:
            raise self._fail(f"parts={p} must divide embedding_dim={embedding_dim}")
        self.codebook_size = check_positive_int("codebook_size", codebook_size, owner=self)
        self.beta = check_number("beta", beta, lo=0, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        rows, K, d = sum(self.cardinalities), self.codebook_size, embedding_dim // p
        self.queries = nn.Parameter(init_rows_(torch.empty(rows, embedding_dim), self.init_std))
        self.codebook = nn.Parameter(torch.empty(p, K, d))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self._pending: torch.Tensor | None = None  # regulariser of the training forwards since the last step
        self._pending_version: tuple | None = None
        self.reset_codebook_()

    @torch.no_grad()
    def reset_codebook_(self, sample: int = 8192) -> None:
        """Start each codebook as the matching part of ``K`` random query rows, then scale queries and codebook
        together so that the vectors returned for ``sample`` random rows have std ``init_std``: the nearest of
        ``K`` random centroids leans to the short ones (the more, the wider a part: 0.8 of the std at one part of
        16), and a common scale keeps every code."""
        if self.queries.device.type == "meta":
            return
        rows, p, d, dev = self.queries.shape[0], self.parts, self.embedding_dim // self.parts, self.queries.device
        pick = torch.randint(0, rows, (p, self.codebook_size), device=dev)
        self.codebook.copy_(self.queries.view(rows, p, d)[pick, torch.arange(p, device=dev)[:, None]])
        r = torch.randint(0, rows, (min(rows, sample),), device=dev)
        fields = torch.searchsorted(self.offsets, r, right=True) - 1
        out = self._centroids(self.codes_of(r - self.offsets[fields], fields))
        std = out.std() if out.numel() > 1 else out.new_zeros(())
        if bool(torch.isfinite(std)) and float(std) > 0:
            self.queries.mul_(self.init_std / float(std))
            self.codebook.mul_(self.init_std / float(std))

    def _centroids(self, codes: torch.Tensor) -> torch.Tensor:
        """``[..., D]``: the centroids of ``codes`` ``[..., p]``, parts concatenated (what every output is)."""
        flat = codes + torch.arange(self.parts, device=codes.device) * self.codebook_size
        out = F.embedding(flat, self.codebook.view(-1, self.embedding_dim // self.parts))
        return out.reshape(*codes.shape[:-1], self.embedding_dim)

    # ------------------------------------------------------------------------------------------------ forward
    def code_limits(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor | None:
        """Centroids each lookup may use (``LongTensor`` like ``ids``), or ``None``: all ``K`` (DPQ)."""
        return None

    def codes_of(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``LongTensor[*ids.shape, p]``: the codes the table serves for ``ids`` now (the export stores these)."""
        shape = ids.shape
        ids, fields = ids.reshape(-1), torch.broadcast_to(fields, shape).reshape(-1)
        q = self.queries.detach()[ids + self.offsets[fields]].view(-1, self.parts, self.embedding_dim // self.parts)
        limit = self.code_limits(ids, fields)
        return nearest_codes(q, self.codebook.detach(), limit).view(*shape, self.parts)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        if ids.device.type == "meta" or ids.numel() == 0:
            return self._embed(ids, fields)
        unique_ids, unique_fields, inverse = unique_pairs(ids, fields)
        # Each distinct lookup's share of the batch, so the regulariser is the mean over every lookup (as the
        # reference's), which data-parallel ranks of equal shards average to the mean of the whole batch.
        share = torch.bincount(inverse, minlength=unique_ids.numel()).to(self.queries.dtype) / inverse.numel()
        vectors = self._embed(unique_ids, unique_fields, share).reshape(-1, self.embedding_dim)
        return vectors.index_select(0, inverse).view(*ids.shape, self.embedding_dim)

    def _embed(self, ids: torch.Tensor, fields: torch.Tensor, share: torch.Tensor | None = None) -> torch.Tensor:
        shape, p, d = ids.shape, self.parts, self.embedding_dim // self.parts
        ids, fields = ids.reshape(-1), torch.broadcast_to(fields, shape).reshape(-1)
        q = F.embedding(ids + self.offsets[fields], self.queries, sparse=self.sparse).view(-1, p, d)
        codes = nearest_codes(q.detach(), self.codebook.detach(), self.code_limits(ids, fields))
        c = self._centroids(codes).view(-1, p, d)
        if not (self.training and torch.is_grad_enabled()):
            return c.reshape(*shape, self.embedding_dim)
        if ids.numel():
            per_lookup = (c - q.detach()).pow(2).mean((1, 2)) + self.beta * (q - c.detach()).pow(2).mean((1, 2))
            self._add_pending(per_lookup.mean() if share is None else (per_lookup * share).sum())
        return (c + (q - q.detach())).reshape(*shape, self.embedding_dim)  # value: c exactly; gradient: q and c

    def _add_pending(self, term: torch.Tensor) -> None:
        # Terms of the forwards of one step add up; an optimizer step (it bumps the parameters' version counters)
        # starts a new sum, so a loop that never asks for the term does not keep old graphs alive.
        version = (self.queries._version, self.codebook._version, self.queries.device)
        if self._pending is None or self._pending_version != version:
            self._pending = term
        else:
            self._pending = self._pending + term
        self._pending_version = version

    def regularization_loss(self) -> torch.Tensor:
        """The codebook + ``beta`` * commitment loss of the training-mode forwards since the last call (see the
        module docstring; it resets): 0 when there were none, so a training loop asking before its first step
        learns that this table has a term."""
        pending, self._pending, self._pending_version = self._pending, None, None
        return self.codebook.new_zeros(()) if pending is None else pending

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.queries] if self.sparse else []

    def __getstate__(self) -> dict:
        # A pending term is a graph node, which deepcopy and pickle refuse; it belongs to one step only.
        return {**super().__getstate__(), "_pending": None, "_pending_version": None}

    # -------------------------------------------------------------------------------------- serving & budget
    def serving_bytes(self) -> int:
        """Exact bytes of :meth:`export` (the codes, the codebook and the offsets), from the shapes alone."""
        return DPQExport.storage_bytes(self.cardinalities, self.embedding_dim, self.parts, self.codebook_size)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "DPQExport":
        """The frozen serving table: the codes of every id and the codebook, no queries; it outputs exactly what
        this table outputs in eval mode (and, by value, in training mode). The codebook is served in fp32."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 codebooks, got precision={precision!r}")
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)  # a single table stays one
        served = DPQExport(cards, self.embedding_dim, parts=self.parts,
                           codebook_size=self.codebook_size).to(self.queries.device)
        dev = self.queries.device
        for f, n in enumerate(self.cardinalities):
            off, field = int(self.offsets[f]), torch.tensor(f, device=dev)
            for a in range(0, n, 1 << 16):
                ids = torch.arange(a, min(n, a + (1 << 16)), device=dev)
                served.codes[off + a : off + a + len(ids)] = self.codes_of(ids, field).to(served.codes.dtype)
        served.codebook.copy_(self.codebook)
        served.offsets.copy_(self.offsets)
        return served.set_field_names(self.field_names).eval()

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim: int, **options) -> BudgetKnob:
        # Searched over 1..D, built at the largest divisor of D not above the value: bytes are a step function.
        return BudgetKnob("parts", 1, embedding_dim, lambda v: {"parts": _divisor_at_most(embedding_dim, v)})

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, parts={self.parts}, codebook_size={self.codebook_size}, "
                f"beta={self.beta}, sparse={self.sparse}")


class DPQExport(CompressedEmbedding):
    """The served DPQ / MGQE table: codes and codebooks only.

    Stored: ``codes`` ``[sum_f n_f, p]`` of :func:`~embcompress.tables.cce.index_dtype` of ``K``; ``codebook``
    fp32 ``[p, K, D / p]``; int64 ``offsets`` ``[F]``. Output part ``j`` of id ``x`` of field ``f`` is
    ``codebook[j, codes[offsets[f] + x, j]]``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``.
    """

    registry_name: ClassVar[str] = "dpq.v1 (export)"

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int, *, parts: int,
                 codebook_size: int) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.parts = check_positive_int("parts", parts, owner=self)
        self.codebook_size = check_positive_int("codebook_size", codebook_size, owner=self)
        if embedding_dim % self.parts:
            raise self._fail(f"parts={self.parts} must divide embedding_dim={embedding_dim}")
        rows, d = sum(self.cardinalities), embedding_dim // self.parts
        self.register_buffer("codes", torch.zeros(rows, self.parts, dtype=index_dtype(self.codebook_size)))
        self.register_buffer("codebook", torch.zeros(self.parts, self.codebook_size, d))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))

    @staticmethod
    def storage_bytes(cardinalities: Sequence[int], embedding_dim: int, parts: int, codebook_size: int) -> int:
        """Bytes of an export with this layout (the class docstring's tensors)."""
        itemsize = torch.empty((), dtype=index_dtype(codebook_size)).element_size()
        return sum(cardinalities) * parts * itemsize + codebook_size * embedding_dim * 4 + 8 * len(cardinalities)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        codes = self.codes[ids + self.offsets[fields]].long()  # [..., p]
        flat = codes + torch.arange(self.parts, device=codes.device) * self.codebook_size
        out = F.embedding(flat, self.codebook.view(-1, self.embedding_dim // self.parts))
        return out.reshape(*ids.shape, self.embedding_dim)

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int):
        raise BudgetError("a DPQ export is made by DPQEmbedding.export and cannot compress on its own")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, parts={self.parts}, codebook_size={self.codebook_size}"
