"""The served form of a pruned table (PEP, DeepLight, AutoSrh): its kept numbers as sparse rows, nothing else.

Not a method of its own (it is registered by none): each pruning method's ``export()`` makes one, and a subclass
per method names it in reports.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import torch

from embcompress.contract import BudgetError, CompressedEmbedding, check_choice, check_int
from embcompress.sparse_rows import FORMATS, SparseRows, smallest_format

__all__ = ["SparseExport"]


class SparseExport(CompressedEmbedding):
    """A pruned ``[N, D]`` table (the fields' rows fused, ``N = sum(n_f)``) served as a
    :class:`~embcompress.sparse_rows.SparseRows`, with the int64 field offsets ``[F]``.

    ``kept`` (the stored numbers) and ``fmt`` (CSR, COO or bitmap) fix the layout, so a table built from them alone
    (``weight=None``: a placeholder) loads a saved export's state. :meth:`of` picks the smallest format for a
    weight. The vector of id ``x`` of field ``f`` is row ``offsets[f] + x``, zeros where nothing is kept.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``.

    >>> w = torch.zeros(13, 4)
    >>> w[3, 1], w[12, 0] = 2.0, -1.0
    >>> e = SparseExport.of([10, 3], 4, w)
    >>> e.format, e(torch.tensor([[3, 2]])).tolist(), e.memory_report().total_bytes == 2 * (1 + 1 + 4) + 2 * 8
    ('coo', [[[0.0, 2.0, 0.0, 0.0], [-1.0, 0.0, 0.0, 0.0]]], True)
    """

    registry_name: ClassVar[str] = "pruned table (export)"

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int, *, kept: int, fmt: str,
                 weight: torch.Tensor | None = None) -> None:
        super().__init__(cardinalities, embedding_dim)
        rows = sum(self.cardinalities)
        self.kept = check_int("kept", kept, lo=0, hi=rows * embedding_dim, owner=self)
        self.fmt = check_choice("fmt", fmt, FORMATS, owner=self)
        if weight is None:  # a placeholder of the right layout, for load_state_dict
            weight = torch.zeros(rows, embedding_dim)
            weight.view(-1)[: self.kept] = 1.0
        elif tuple(weight.shape) != (rows, embedding_dim) or int((weight != 0).sum()) != self.kept:
            raise ValueError(f"{self._owner_name()}: weight must be [{rows}, {embedding_dim}] with {self.kept} "
                             f"non-zero numbers, got shape {list(weight.shape)}")
        self.rows = SparseRows(weight, self.fmt)
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64, device=weight.device))

    @classmethod
    def of(cls, cardinalities: int | Sequence[int], embedding_dim: int, weight: torch.Tensor,
           fmt: str | None = None) -> "SparseExport":
        """The export of ``weight`` ``[N, D]`` (its non-zeros kept), in ``fmt`` or else the smallest format."""
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            raise ValueError(f"{cls.registry_name}: weight must be a [rows, width] tensor, got "
                             f"{list(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}")
        nnz = int((weight != 0).sum())
        fmt = smallest_format(weight.shape[0], weight.shape[1], nnz)[0] if fmt is None else fmt
        return cls(cardinalities, embedding_dim, kept=nnz, fmt=fmt, weight=weight)

    @property
    def format(self) -> str:
        return self.rows.format

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids + self.offsets[fields])

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int):
        raise BudgetError(f"{cls.registry_name} is made by its pruned table's export() and cannot compress on its own")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept={self.kept}, fmt={self.fmt}"
