"""Sparse served tables: a pruned ``[rows, width]`` table stored in the smallest of three formats, counted exactly.

A pruned table (PEP, DeepLight) keeps ``nnz`` of its ``rows * width`` numbers. It serves them as one of:

==========  ======================================================================  ===========================
format      stored                                                                  bytes
==========  ======================================================================  ===========================
``csr``     row pointers ``[rows + 1]``, column of each value, the values            ``p (rows + 1) + c nnz + 4 nnz``
``coo``     row and column of each value, the values                                 ``r nnz + c nnz + 4 nnz``
``bitmap``  row pointers ``[rows + 1]``, a bit per number (``ceil(width / 8)`` bytes  ``p (rows + 1) + rows ceil(width / 8) + 4 nnz``
            a row), the values
==========  ======================================================================  ===========================

with ``c`` the bytes of the smallest unsigned dtype that holds a column (uint8 up to 256 columns), ``p`` those of the
smallest that holds ``nnz`` (int32 up to 2**31 - 1, else int64: pointers) and ``r`` those that hold a row. Values
are fp32. :func:`smallest_format` picks the smallest for ``(rows, width, nnz)``, so a budget solver knows the served
bytes of a kept count before anything is pruned. The VLDB 2024 benchmark stores CSR when the kept fraction makes it
smaller than COO; the bitmap also wins over CSR when rows keep more numbers on average than the bitmap's bytes a row
over a column's (at D=16 with uint8 columns: more than 2 a row). COO wins when most rows keep nothing.

:class:`SparseRows` holds one and gathers dense rows from it: ``lookup(idx)`` is bitwise the dense table's rows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["FORMATS", "format_bytes", "smallest_format", "SparseRows"]

FORMATS = ("csr", "coo", "bitmap")
_UNSIGNED = ((1 << 8, torch.uint8), (1 << 15, torch.int16), (1 << 31, torch.int32))


def _index_dtype(count: int) -> torch.dtype:
    """The smallest dtype whose non-negative range holds ``count`` distinct values ``0 .. count - 1``."""
    for limit, dtype in _UNSIGNED:
        if count <= limit:
            return dtype
    return torch.int64


def _pointer_dtype(nnz: int) -> torch.dtype:
    return torch.int32 if nnz < (1 << 31) else torch.int64


def format_bytes(fmt: str, rows: int, width: int, nnz: int) -> int:
    """Exact stored bytes of a ``[rows, width]`` table keeping ``nnz`` fp32 values in format ``fmt``."""
    col = _index_dtype(width).itemsize
    ptr = _pointer_dtype(nnz).itemsize * (rows + 1)
    if fmt == "csr":
        return ptr + nnz * (col + 4)
    if fmt == "coo":
        return nnz * (_index_dtype(rows).itemsize + col + 4)
    if fmt == "bitmap":
        return ptr + rows * math.ceil(width / 8) + nnz * 4
    raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")


def smallest_format(rows: int, width: int, nnz: int) -> tuple[str, int]:
    """``(format, bytes)`` of the smallest of :data:`FORMATS` for ``nnz`` kept values (ties: the first listed)."""
    sizes = [(format_bytes(f, rows, width, nnz), i, f) for i, f in enumerate(FORMATS)]
    size, _, fmt = min(sizes)
    return fmt, size


class SparseRows(nn.Module):
    """A frozen pruned ``[rows, width]`` table, in the smallest format of :data:`FORMATS` (or the one asked).

    >>> import torch
    >>> w = torch.zeros(1000, 16)
    >>> w[::10, :4] = 1.5          # 100 rows keep 4 numbers: 400 values
    >>> s = SparseRows(w)          # COO: int16 row and uint8 column of each value, fp32 values
    >>> s.format, s.stored_bytes() == 400 * (2 + 1 + 4) == format_bytes("coo", 1000, 16, 400)
    ('coo', True)
    >>> torch.equal(s.lookup(torch.tensor([0, 1, 10])), w[[0, 1, 10]])
    True
    """

    def __init__(self, weight: torch.Tensor, fmt: str | None = None) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"SparseRows: expected a [rows, width] table, got shape {list(weight.shape)}")
        weight = weight.detach().float()
        self.num_rows, self.width = weight.shape
        mask = weight != 0
        nnz = int(mask.sum())
        self.format = smallest_format(self.num_rows, self.width, nnz)[0] if fmt is None else fmt
        if self.format not in FORMATS:
            raise ValueError(f"SparseRows: format must be one of {list(FORMATS)}, got {fmt!r}")
        row, col = mask.nonzero(as_tuple=True)  # row-major: each row's values in column order
        self.register_buffer("values", weight[row, col].contiguous())
        if self.format in ("csr", "bitmap"):
            counts = mask.sum(1)
            pointers = torch.zeros(self.num_rows + 1, dtype=torch.int64, device=weight.device)
            pointers[1:] = counts.cumsum(0)
            self.register_buffer("pointers", pointers.to(_pointer_dtype(nnz)))
        if self.format == "csr":
            self.register_buffer("columns", col.to(_index_dtype(self.width)))
        elif self.format == "coo":
            self.register_buffer("row_index", row.to(_index_dtype(self.num_rows)))
            self.register_buffer("columns", col.to(_index_dtype(self.width)))
        else:
            padded = torch.zeros(self.num_rows, math.ceil(self.width / 8) * 8, dtype=torch.uint8, device=weight.device)
            padded[:, : self.width] = mask.to(torch.uint8)
            bits = padded.view(self.num_rows, -1, 8) << torch.arange(8, dtype=torch.uint8, device=weight.device)
            self.register_buffer("bitmap", bits.sum(-1, dtype=torch.uint8))

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.num_rows, self.width])

    @property
    def nnz(self) -> int:
        return self.values.numel()

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def _mask_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The kept-number mask ``[len(rows), width]`` of ``rows``."""
        if self.format == "bitmap":
            bits = self.bitmap.index_select(0, rows)
            shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
            return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, : self.width].bool()
        if self.format == "coo":
            raise AssertionError("coo rows are gathered by search, not by mask")
        start, stop = self.pointers[rows].long(), self.pointers[rows + 1].long()
        counts = stop - start
        idx = torch.repeat_interleave(start, counts) + _ranks(counts)
        mask = torch.zeros(rows.shape[0], self.width, dtype=torch.bool, device=rows.device)
        mask[torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), counts),
             self.columns.index_select(0, idx).long()] = True
        return mask

    @torch.no_grad()
    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """Dense fp32 rows ``[*idx.shape, width]`` of int64 row indices ``idx``."""
        rows = idx.reshape(-1)
        out = torch.zeros(rows.shape[0], self.width, device=self.values.device)
        if self.format == "coo":
            # Each requested row's values lie in one run of the row-sorted row_index.
            key = rows.clamp(max=torch.iinfo(self.row_index.dtype).max).to(self.row_index.dtype)
            start = torch.searchsorted(self.row_index, key)
            stop = torch.searchsorted(self.row_index, key, right=True)
            counts = stop - start
            pos = torch.repeat_interleave(start, counts) + _ranks(counts)
            which = torch.repeat_interleave(torch.arange(rows.shape[0], device=rows.device), counts)
            out[which, self.columns.index_select(0, pos).long()] = self.values.index_select(0, pos)
            return out.view(*idx.shape, self.width)
        start, stop = self.pointers[rows].long(), self.pointers[rows + 1].long()
        counts = stop - start
        pos = torch.repeat_interleave(start, counts) + _ranks(counts)
        out[self._mask_of(rows)] = self.values.index_select(0, pos)  # row-major order on both sides
        return out.view(*idx.shape, self.width)

    def dense(self) -> torch.Tensor:
        return self.lookup(torch.arange(self.num_rows, device=self.values.device))

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, width={self.width}, nnz={self.nnz}, format={self.format}"


def _ranks(counts: torch.Tensor) -> torch.Tensor:
    """``0 .. c - 1`` for each ``c`` of ``counts``, concatenated."""
    total = int(counts.sum())
    if total == 0:
        return counts.new_zeros(0)
    starts = torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    return torch.arange(total, device=counts.device) - starts
