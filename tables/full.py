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
from torch import nn

from embcompress.fused import check_fused_optimizer
from embcompress.contract import BudgetKnob, CompressedEmbedding, check_bool, init_rows_, resolve_init_std
from embcompress.quantize import check_precision
from embcompress.registry import TABLES


@TABLES.register("full.v1")
class FullEmbedding(CompressedEmbedding):
    """One row per id per field.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Rows start ``N(0, init_std**2)`` (``None``: the library default, see :func:`embcompress.contract.default_init_std`).
    ``precision`` (fp32, fp16, bf16, int8, int4) is the precision the rows are served at: trained in fp32, returned
    at that precision in eval mode and by :meth:`export`, and counted so (int8 at D=16: 20 bytes a row).
    ``train_quantized`` holds the rows at that precision (int8 or int4) while training too, updated by row-wise
    Adagrad with stochastic rounding (:mod:`embcompress.lowp`); no fp32 master is kept.

    >>> import torch
    >>> t = FullEmbedding([10, 3], 4, sparse=True)
    >>> t(torch.tensor([[9, 2], [0, 0]])).shape
    torch.Size([2, 2, 4])
    >>> t.memory_report().parameter_bytes == (10 + 3) * 4 * 4
    True
    """

    row_parameters = ('weight',)  # stored at `precision` when served

    def __init__(
        self, cardinalities: int | Sequence[int], embedding_dim: int, *, sparse: bool = False,
        precision: str = "fp32",
        train_quantized: bool = False,
        fused_optimizer: str | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.weight = nn.Parameter(init_rows_(torch.empty(sum(self.cardinalities), embedding_dim), self.init_std))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return self.read_rows(self.weight, ids + self.per_field(self.offsets, fields))

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        # One size: it is built when the budget holds every row, and cannot compress.
        return BudgetKnob("every row stored: it cannot compress", 1, 1, lambda _: {})

    @classmethod
    def budget_ceiling(cls, cardinalities, embedding_dim) -> None:
        return None  # it is the ceiling of the others

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sparse={self.sparse}"
