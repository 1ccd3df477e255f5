"""``robe.v1``: ROBE / ROBE-Z, every vector read in blocks from one flat array shared by all fields.

Desai, Chou & Shrivastava, "Random Offset Block Embedding (ROBE) for compressed embedding tables in deep
learning recommendation systems", MLSys 2022. With ``Z = 1`` it is element-wise weight hashing, as in Chen et
al., "Compressing Neural Networks with the Hashing Trick" (HashedNets), ICML 2015.

One trainable fp32 array ``M`` of ``|M| = size`` floats serves every field. The ``D``-vector of id ``x`` of
field ``f`` is cut into ``nb = ceil(D / Z)`` blocks of ``Z = block_size`` consecutive coordinates (the last
one shorter when ``Z`` does not divide ``D``), and block ``j`` is read from ``M`` at a hashed offset::

    s[f, j]   = keyed_seeds(seed, F, nb)[f, j]  = mix64(mix64(mix64(seed) ^ f) ^ j)   (embcompress.hashing)
    h         = hash64(x, s[f, j])                                   a 64-bit word (int64)
    o[f,x,j]  = (h mod 2**63) mod (|M| - Z + 1)                      = bucket(x, s[f, j], |M| - Z + 1)
    g[f,x,j]  = -1 if the top bit of h is set else +1                (only with signed=True; else +1)
    v(x)[jZ + k] = g[f,x,j] * M[o[f,x,j] + k]                        for k < Z, jZ + k < D

Design choices:

* **Offsets modulo ``|M| - Z + 1``, no circular wrap.** Every block is a contiguous slice ``M[o : o + Z]``
  inside the array, so there is no wrap-around branch, and ``|M|`` is the budget exactly. The price is that
  the ``Z - 1`` floats at each end of ``M`` are covered by fewer block positions than the rest (element
  ``i < Z - 1`` by ``i + 1`` of them instead of ``Z``), i.e. they collide less. ``size >= Z`` is required
  (``size == Z`` gives a single block position).
* **Budget knob = ``size``**, the array length: the table stores ``4 * size`` bytes of floats plus
  ``8 * F * nb`` bytes of int64 seeds (one per (field, block)), nothing else.
* **Per-(field, block) keyed seeds** (:func:`~embcompress.hashing.keyed_seeds`), so the same id in two fields
  reads different blocks, and a field's offsets do not depend on how many fields (or blocks) the table has.
* **The sign is the top bit of the same 64-bit hash** that ``bucket`` drops for the offset, so one hash per
  block gives both, and the sign is independent of the offset's bits. A colliding block is shared up to a
  random sign, which makes the collision noise of two ids zero-mean (ROBE's unbiased-sketch view).
  ``signed=True`` by default; ``signed=False`` reads the blocks as they are.
* **Sparse gradients on the 1-D array.** ``nn.Embedding``'s sparse path needs a 2-D weight, and a sparse
  gradient cannot flow back through a view of a 1-D parameter, so the gather is a small autograd function
  whose backward returns a coalesced ``torch.sparse_coo_tensor`` of shape ``[|M|]`` (one entry per touched
  float, summed in linear time: left to the optimizer's ``coalesce()``, the sort of all ``B * F * D`` reads
  cost 8x a hashing step), which ``torch.optim.SparseAdam`` and ``Adagrad`` take. On CUDA that backward
  waits for the device once (the number of touched floats), as ``coalesce()`` would.
* **Initialisation**: ``M ~ N(0, init_std**2)``; a returned coordinate is ``+-`` one element of ``M``, so its
  std is ``init_std``.

Reference-code bugs avoided: the hash is our splitmix64 family on exact int64 words (no float arithmetic on
ids, which merges ids above ``2**24``; no ``1 << 31 - 1``, which Python parses as ``1 << 30``: the 63-bit mask
here is written ``(1 << 63) - 1``); it never uses Python's ``hash()``; offsets are taken modulo
``|M| - Z + 1`` so no block reads past the end of the array; and the seeds are buffers, saved in the
state_dict.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, check_bool, check_int, check_positive_int, check_seed, init_rows_,
    resolve_init_std,
)
from embcompress.hashing import hash64, keyed_seeds
from embcompress.registry import TABLES
from embcompress.unique import embed_unique

LOW63 = (1 << 63) - 1  # the bits bucket() keeps; the top bit, which it drops, is the sign


class _SparseGather(torch.autograd.Function):
    """``weight[idx]`` for a 1-D ``weight``, with a coalesced sparse COO gradient of shape ``weight.shape``.

    The gradient is summed per element here, not left to the optimizer's ``coalesce()`` (a sort of every
    read float, ``B * F * D`` of them): when the array is at most ``DENSE_SCATTER`` times the reads, by a
    scatter into a dense buffer of the array's length and a mask of the touched elements (linear time);
    otherwise by ``torch.unique``, whose memory follows the reads, not the array.
    """

    DENSE_SCATTER = 16

    @staticmethod
    def forward(ctx, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.numel = weight.shape[0]
        return weight.index_select(0, idx.reshape(-1)).view(idx.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        flat, values, n = idx.reshape(-1), grad.reshape(-1), ctx.numel
        if 0 < n <= _SparseGather.DENSE_SCATTER * flat.numel():
            touched = torch.zeros(n, dtype=torch.bool, device=flat.device)
            touched[flat] = True
            rows = touched.nonzero().view(-1)
            summed = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, flat, values)
            summed = summed[rows]
        else:
            rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
            summed = torch.zeros(rows.numel(), dtype=values.dtype, device=values.device)
            summed.index_add_(0, inverse, values)
        grad_weight = torch.sparse_coo_tensor(rows.view(1, -1), summed, (n,), dtype=values.dtype,
                                              device=values.device, is_coalesced=True,
                                              check_invariants=False)
        return grad_weight, None


@TABLES.register("robe.v1")
class RobeEmbedding(CompressedEmbedding):
    """ROBE-Z: vectors read as ``ceil(D / Z)`` blocks of ``Z`` floats at hashed offsets of one shared array.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]`` (``[...] -> [..., D]`` for a single table); every
    field accepts any id in ``[0, 2**63)``. Stored: ``weight`` ``[size]`` fp32 (the array ``M``, shared by all
    fields); ``seeds`` ``[F, ceil(D / Z)]`` int64 (one hash seed per field and block).

    Args:
        size: ``|M|``, the length of the array (the budget knob); at least ``block_size``.
        block_size: ``Z``, consecutive floats per block, ``1 <= Z <= D`` (``None``: ``Z = D``, one block per
            vector, as in the reference Criteo Terabyte run). ``Z = 1`` is element-wise hashing (HashedNets).
        signed: multiply each block by a hashed ``+-1``.
        seed: selects the hash functions; the derived seeds are saved in the state_dict.
        sparse: sparse gradients for ``weight`` (use with ``torch.optim.SparseAdam`` or ``Adagrad``).
        init_std: std of the returned vectors at initialisation (``None``: the library default ``1/sqrt(D)``).

    >>> import torch
    >>> t = RobeEmbedding([10**9, 500, 3], 8, size=1000, block_size=2)
    >>> t(torch.tensor([[2**40 + 7, 499, 2], [0, 0, 0]])).shape
    torch.Size([2, 3, 8])
    >>> t.memory_report().total_bytes == 1000 * 4 + 3 * 4 * 8  # the array, and 3 fields x 4 blocks of seeds
    True
    >>> u = RobeEmbedding(100, 4, size=10, block_size=4, signed=False)  # one block of 4 per vector
    >>> v = u(torch.tensor(7))
    >>> o = int(u.block_offsets(torch.tensor(7), torch.tensor(0)))
    >>> torch.equal(v, u.weight[o : o + 4])
    True
    """

    accepts_raw_ids = True

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        size: int,
        block_size: int | None = None,
        signed: bool = True,
        seed: int = 0,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        D = self.embedding_dim
        self.init_std = resolve_init_std(init_std, D, owner=self)
        Z = check_int("block_size", block_size, lo=1, hi=D, optional=True, owner=self)
        self.block_size = Z = D if Z is None else Z
        self.size = check_positive_int("size", size, owner=self)
        if self.size < Z:
            raise self._fail(f"size must be at least block_size = {Z} (one whole block), got {self.size}")
        self.signed = check_bool("signed", signed, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        seed = check_seed(seed, owner=self)
        self.num_blocks = math.ceil(D / Z)
        self.weight = nn.Parameter(init_rows_(torch.empty(self.size), self.init_std))
        self.register_buffer("seeds", keyed_seeds(seed, self.num_fields, self.num_blocks))

    @property
    def num_offsets(self) -> int:
        """``|M| - Z + 1``: the block start positions, the modulus of the offset hash."""
        return self.size - self.block_size + 1

    def _hashes(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # [..., nb]: one 64-bit word per (id, block), seeded by the id's field.
        return hash64(ids.unsqueeze(-1), self.seeds[fields])

    def block_offsets(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``LongTensor[..., nb]``: where each block of each id starts in ``weight`` (``fields`` broadcasts to
        ``ids``); equal to ``bucket(ids, seeds[fields, j], size - block_size + 1)`` for block ``j``."""
        return (self._hashes(ids, fields) & LOW63) % self.num_offsets

    def block_signs(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """``FloatTensor[..., nb]``: the ``+-1`` of each block (all ``+1`` when ``signed=False``)."""
        h = self._hashes(ids, fields)
        if not self.signed:
            return torch.ones(h.shape, dtype=self.weight.dtype, device=h.device)
        return 1.0 - 2.0 * (h < 0).to(self.weight.dtype)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return embed_unique(self._embed, ids, fields, self.embedding_dim)

    def _embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        D, Z = self.embedding_dim, self.block_size
        h = self._hashes(ids, fields)  # [..., nb]
        within = torch.arange(Z, device=ids.device)
        # Element index of every coordinate: block start + position in the block, the last block cut at D.
        idx = ((h & LOW63) % self.num_offsets).unsqueeze(-1) + within  # [..., nb, Z]
        idx = idx.flatten(-2)[..., :D]
        if self.sparse:
            out = _SparseGather.apply(self.weight, idx)
        else:
            out = self.weight.index_select(0, idx.reshape(-1)).view(idx.shape)
        if self.signed:
            sign = 1.0 - 2.0 * (h < 0).to(out.dtype)  # [..., nb]
            out = out * sign.unsqueeze(-1).expand(*sign.shape, Z).flatten(-2)[..., :D]
        return out

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    budget_keys = ("size",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, *, block_size: int | None = None,
                    **options) -> BudgetKnob:
        """``size``, the array length, from one block (``size = Z``) up; the seeds' bytes are fixed."""
        D = check_positive_int("embedding_dim", embedding_dim, owner=cls)
        Z = check_int("block_size", block_size, lo=1, hi=D, optional=True, owner=cls)
        return BudgetKnob("size", D if Z is None else Z, None, lambda m: {"size": int(m)})

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, size={self.size}, block_size={self.block_size}, "
                f"signed={self.signed}, sparse={self.sparse}")
