"""``mgqe.v1``: Multi-Granular Quantized Embeddings — DPQ whose frequent ids use a larger codebook than the tail.

Kang, Cheng, Chen, Yi, Hong & Chi, "Learning Multi-granular Quantized Embeddings for Large-Vocab Categorical
Features in Recommender Systems", WWW 2020 (companion).

It is :mod:`dpq.v1 <embcompress.tables.dpq>` (queries trained with the straight-through estimator, served as
``p`` codes per id into per-part codebooks), with the paper's nested codebooks: the frequent ids of a field may
use all ``K`` centroids of a part's codebook, the others only its first ``K_tail``. The data pipeline ranks ids by
frequency (id 0 is the most frequent of its field), so the frequent ids of field ``f`` are its first
``F_f = ceil(frequent_fraction * n_f)`` ids, read from the id itself.

Design choices:

* **Nested, not separate, codebooks.** The tail's ``K_tail`` centroids are the first ``K_tail`` of the same
  codebook (the paper's variant that shares them), so the codebook bytes are DPQ's and the popular ids refine
  the centroids the tail uses.
* **Storage kept simple and exact.** Every code is stored at the width of the largest code,
  :func:`~embcompress.tables.cce.index_dtype` of ``K`` (uint8 for both groups when ``K <= 256``), so the served
  bytes equal DPQ's with the same ``K``. Tail codes need only ``ceil(log2 K_tail)`` bits (6 for 64): packing
  them would save up to ``(1 - frequent_fraction) * (1 - bits / 8)`` of the code bytes, not done here. What
  MGQE buys at equal bytes is capacity where the data is, not fewer bytes.
* The split is a stored int64 buffer ``frequent`` ``[F]`` (``F_f`` per field) of the trained table; the export
  needs none (the tail's codes are already below ``K_tail``), so it is :class:`~embcompress.tables.dpq.DPQExport`.
* The budget knob is DPQ's (``parts``), with the same reachable ratios.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from embcompress.contract import check_int, check_number
from embcompress.registry import TABLES
from embcompress.tables.dpq import DPQEmbedding

__all__ = ["MGQEEmbedding"]


@TABLES.register("mgqe.v1")
class MGQEEmbedding(DPQEmbedding):
    """DPQ with two granularities: frequent ids choose among ``K`` centroids per part, the tail among ``K_tail``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored while training: ``queries`` fp32 ``[sum_f n_f, D]``; ``codebook`` fp32 ``[p, K, D / p]``; int64
    ``offsets`` and ``frequent`` ``[F]``. Served (:meth:`export`): :class:`~embcompress.tables.dpq.DPQExport`,
    codes of ids ``x >= frequent[f]`` all below ``K_tail``.

    Args:
        parts: ``p``, the codes per id; must divide ``D``. Solved by :meth:`from_budget`.
        codebook_size: ``K``, the centroids of each part's codebook (what frequent ids may use).
        tail_codebook_size: ``K_tail <= K``, the leading centroids the other ids may use.
        frequent_fraction: in ``[0, 1]``; field ``f``'s first ``ceil(frequent_fraction * n_f)`` ids are frequent.
        beta: weight of the commitment loss (see :class:`~embcompress.tables.dpq.DPQEmbedding`).
        sparse: sparse gradients for ``queries``.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = MGQEEmbedding([1000, 40], 8, parts=2, codebook_size=32, tail_codebook_size=4)
    >>> t.frequent.tolist()
    [100, 4]
    >>> int(t.export().codes[100:1000].max()) < 4
    True
    """

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        parts: int = 4,
        codebook_size: int = 256,
        tail_codebook_size: int = 64,
        frequent_fraction: float = 0.1,
        beta: float = 0.25,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim, parts=parts, codebook_size=codebook_size, beta=beta,
                         sparse=sparse, init_std=init_std)
        self.tail_codebook_size = check_int("tail_codebook_size", tail_codebook_size, lo=1,
                                            hi=self.codebook_size, owner=self)
        self.frequent_fraction = check_number("frequent_fraction", frequent_fraction, lo=0, hi=1, owner=self)
        # The 1e-9 keeps 0.1 * 1000 (100.00000000000001 in floats) at 100.
        frequent = [min(n, math.ceil(self.frequent_fraction * n - 1e-9)) for n in self.cardinalities]
        self.register_buffer("frequent", torch.tensor(frequent, dtype=torch.int64))
        self.reset_codebook_()  # again, now that the tail's centroids are limited: its init_std calibration

    def code_limits(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor | None:
        frequent = self._buffers.get("frequent")
        if frequent is None:  # inside DPQ's constructor, before the split exists
            return None
        head = torch.full_like(ids, self.codebook_size)
        return torch.where(ids < frequent[fields], head, head.new_full((), self.tail_codebook_size))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, tail_codebook_size={self.tail_codebook_size}, "
                f"frequent_fraction={self.frequent_fraction}")
