"""``full.v1``: the uncompressed baseline, every field's rows fused into one fp32 table.

All fields share one weight of ``sum(n_f)`` rows, addressed through per-field row offsets, so a batch of
``[B, F]`` ids is one gather. With ``sparse=True`` the gradient is a sparse tensor over the rows the batch
touched, so ``torch.optim.SparseAdam`` / sparse Adagrad update those rows only: the fastest honest way to train
a big full table on CPU (a dense optimizer step over every row dominates the step time otherwise).
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import BudgetError, CompressedEmbedding, init_rows_
from embcompress.memory import baseline_bytes
from embcompress.registry import TABLES


@TABLES.register("full.v1")
class FullEmbedding(CompressedEmbedding):
    """One row per id per field.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.

    >>> import torch
    >>> t = FullEmbedding([10, 3], 4, sparse=True)
    >>> t(torch.tensor([[9, 2], [0, 0]])).shape
    torch.Size([2, 2, 4])
    >>> t.memory_report().parameter_bytes == (10 + 3) * 4 * 4
    True
    """

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int, *, sparse: bool = False) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.sparse = bool(sparse)
        self.weight = nn.Parameter(init_rows_(torch.empty(sum(self.cardinalities), embedding_dim)))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids + self.offsets[fields], self.weight, sparse=self.sparse)

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int, sparse: bool = False):
        """A full table has one size; it is built only when it fits the budget."""
        budget = cls._check_budget(budget_bytes)
        need = cls.planned_bytes(cardinalities, embedding_dim, sparse=sparse)
        if need > budget:
            raise BudgetError(
                f"full.v1 stores every row and needs {need:,} bytes, over the budget of {budget:,} bytes "
                f"(baseline {baseline_bytes(cardinalities, embedding_dim):,}); it cannot compress"
            )
        return cls(cardinalities, embedding_dim, sparse=sparse)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse}"
