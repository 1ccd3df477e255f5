"""Row precision: embedding rows stored in fewer bits, row-wise, counted exactly.

A row of ``D`` floats is stored at one of :data:`PRECISIONS`:

========  =====================================================  ============================
name      stored per row                                         bytes per row
========  =====================================================  ============================
fp32      ``D`` float32                                          ``4 D``
fp16      ``D`` float16                                          ``2 D``
bf16      ``D`` bfloat16                                         ``2 D``
int8      ``D`` uint8 codes, float16 scale and offset            ``D + 4``
int4      ``ceil(D / 2)`` bytes of packed 4-bit codes, float16   ``ceil(D / 2) + 4``
          scale and offset
========  =====================================================  ============================

Integer rows are affine per row (asymmetric, as fbgemm's row-wise formats): ``lo = min(row)``,
``scale = (max(row) - lo) / (2**b - 1)``, ``code = clamp(round((x - lo) / scale), 0, 2**b - 1)`` and back
``x' = code * scale + lo``. The scale and offset are stored in fp16, rounded outwards (the offset down, the scale
up, so no value of the row falls outside the codes' range) *before* the codes are made, so the codes are the best
ones for the stored scale. A constant row (or one whose range is below fp16's
resolution) gets scale 1 and codes 0 (``x' = lo`` in fp16). The layout is that of fbgemm's n-bit table-batched
inference kernels, which torchrec's quantized collections run (``D`` or ``D / 2`` code bytes and an fp16 scale and
bias per row), so they serve the same bytes up to their row alignment (16 bytes by default: an int8 row of D=16
takes 32 bytes there, 20 here; see :func:`embcompress.torchrec.quantized_collection`).

Rounding is to nearest (ties to even, ``torch.round``) for serving, or stochastic for training write-back
(Gupta, Agrawal, Gopalakrishnan & Narayanan, "Deep Learning with Limited Numerical Precision", ICML 2015; the
INT8/INT16 training of Hetu's compression benchmark): ``floor(v + u)`` with ``u ~ U[0, 1)``, whose expectation
is ``v`` (unbiased) and which is reproducible under a ``torch.Generator`` seed.

:func:`fake_quantize_rows` is the served value of rows computed from their fp32 masters; :class:`QuantizedRows`
stores them. Because quantization is per row, gathering rows and then quantizing them gives bitwise the same
values as quantizing the whole table and then gathering, which is what makes a table's quantized eval view and
its export equal.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .validate import check_choice

__all__ = [
    "PRECISIONS", "check_precision", "row_bytes", "quantized_bytes", "stochastic_round", "quantize_rows",
    "dequantize_rows", "fake_quantize_rows", "QuantizedRows",
]

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
_FLOAT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_BITS = {"int8": 8, "int4": 4}
_AFFINE_DTYPE = {"int8": torch.float16, "int4": torch.float16}  # of the scale and the offset


def check_precision(precision, *, owner=None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else a ``ValueError`` naming the owner and the value."""
    return check_choice("precision", precision, PRECISIONS, owner=owner)


def row_bytes(width: int, precision: str) -> int:
    """Bytes one stored row of ``width`` numbers takes at ``precision``."""
    check_precision(precision)
    if precision in _FLOAT:
        return width * _FLOAT[precision].itemsize
    bits = _BITS[precision]
    return math.ceil(width * bits / 8) + 2 * _AFFINE_DTYPE[precision].itemsize


def quantized_bytes(rows: int, width: int, precision: str) -> int:
    """Bytes of a ``[rows, width]`` table stored at ``precision``."""
    return rows * row_bytes(width, precision)


def stochastic_round(values: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``floor(values + u)``, ``u ~ U[0, 1)`` drawn per element: unbiased, ``E[result] = values``."""
    noise = torch.rand(values.shape, generator=generator, device=values.device, dtype=values.dtype)
    return torch.floor(values + noise)


def _affine(rows: torch.Tensor, precision: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, offset)`` in their stored dtype, for fp32 ``rows [..., D]``."""
    levels = (1 << _BITS[precision]) - 1
    lo, hi = rows.amin(-1), rows.amax(-1)
    dtype = _AFFINE_DTYPE[precision]
    # Rounded outwards (offset down, scale up), so [offset, offset + levels * scale] holds the whole row: no value
    # is clipped, which would bias stochastic rounding at the row's extremes.
    offset = _round_to(lo, dtype, down=True)
    scale = _round_to((hi - offset.float()) / levels, dtype, down=False)
    # A constant row, or a range below the dtype's resolution: any scale reproduces lo; 1 keeps the codes 0.
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, offset


def _round_to(x: torch.Tensor, dtype: torch.dtype, *, down: bool) -> torch.Tensor:
    """fp32 ``x`` in ``dtype``, rounded towards -inf (``down``) or +inf rather than to nearest."""
    y = x.to(dtype)
    off = y.float() > x if down else y.float() < x
    step = torch.full_like(y, float("-inf") if down else float("inf"))
    return torch.where(off, torch.nextafter(y, step), y)


def quantize_rows(rows: torch.Tensor, precision: str, *, stochastic: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, ...]:
    """Stored tensors of fp32 ``rows [..., D]``: ``(values,)`` for a float precision, else
    ``(codes, scale, offset)`` with uint8 ``codes [..., D]`` (int8) or ``[..., ceil(D / 2)]`` (int4, the even
    coordinate in the low nibble)."""
    check_precision(precision)
    rows = rows.detach().float()
    if precision in _FLOAT:
        return (rows.to(_FLOAT[precision]),)
    scale, offset = _affine(rows, precision)
    levels = (1 << _BITS[precision]) - 1
    v = (rows - offset.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)
    v = stochastic_round(v, generator) if stochastic else torch.round(v)
    codes = v.clamp_(0, levels).to(torch.uint8)
    if precision == "int4":
        if codes.shape[-1] % 2:
            codes = torch.cat([codes, codes.new_zeros(*codes.shape[:-1], 1)], -1)
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes, scale, offset


def dequantize_rows(stored: tuple[torch.Tensor, ...], precision: str, width: int) -> torch.Tensor:
    """fp32 rows ``[..., width]`` from :func:`quantize_rows`' tensors (or rows of them gathered alike)."""
    if precision in _FLOAT:
        return stored[0].float()
    codes, scale, offset = stored
    if precision == "int4":
        codes = torch.stack([codes & 0xF, codes >> 4], -1).flatten(-2)[..., :width]
    return torch.addcmul(offset.float().unsqueeze(-1), codes.float(), scale.float().unsqueeze(-1))


def fake_quantize_rows(rows: torch.Tensor, precision: str) -> torch.Tensor:
    """The values fp32 ``rows [..., D]`` take once stored at ``precision`` (rounded to nearest), as fp32."""
    if precision == "fp32":
        return rows
    return dequantize_rows(quantize_rows(rows, precision), precision, rows.shape[-1])


class QuantizedRows(nn.Module):
    """A frozen ``[rows, width]`` table stored at ``precision``: buffers only, gathered with :meth:`lookup`.

    >>> import torch
    >>> w = torch.randn(100, 16)
    >>> q = QuantizedRows(w, "int8")
    >>> [tuple(b.shape) for b in q.buffers()], q.stored_bytes() == 100 * (16 + 4)
    ([(100, 16), (100,), (100,)], True)
    >>> torch.equal(q.lookup(torch.tensor([3, 7])), fake_quantize_rows(w[[3, 7]], "int8"))
    True
    """

    def __init__(self, weight: torch.Tensor, precision: str) -> None:
        super().__init__()
        self.precision = check_precision(precision, owner="QuantizedRows")
        if weight.dim() != 2:
            raise ValueError(f"QuantizedRows: expected a [rows, width] table, got shape {list(weight.shape)}")
        self.num_rows, self.width = weight.shape
        names = ("values",) if precision in _FLOAT else ("codes", "scale", "offset")
        for name, tensor in zip(names, quantize_rows(weight, precision)):
            self.register_buffer(name, tensor)
        self._names = names

    @property
    def shape(self) -> torch.Size:
        return torch.Size([self.num_rows, self.width])

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """fp32 rows ``[*idx.shape, width]`` of int64 row indices ``idx``."""
        flat = idx.reshape(-1)
        stored = tuple(getattr(self, n).index_select(0, flat) for n in self._names)
        return dequantize_rows(stored, self.precision, self.width).view(*idx.shape, self.width)

    @classmethod
    def from_stored(cls, stored: tuple[torch.Tensor, ...], precision: str, width: int) -> "QuantizedRows":
        """A table holding :func:`quantize_rows`' tensors ``stored`` as they are (codes kept, not re-made)."""
        first = stored[0]
        rows = cls(first.new_zeros((first.shape[0], width), dtype=torch.float32), precision)
        for name, tensor in zip(rows._names, stored):
            if rows._buffers[name].shape != tensor.shape:
                raise ValueError(f"QuantizedRows: stored {name} has shape {list(tensor.shape)}, expected "
                                 f"{list(rows._buffers[name].shape)}")
            rows._buffers[name] = tensor
        return rows

    @torch.no_grad()
    def dequantized(self) -> torch.Tensor:
        """Every row as fp32, ``[rows, width]``."""
        first = getattr(self, self._names[0])
        return QuantizedRows.lookup(self, torch.arange(self.num_rows, device=first.device))

    def stored_bytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def get_extra_state(self) -> dict:
        return {"precision": self.precision, "shape": [self.num_rows, self.width]}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise ValueError(f"QuantizedRows: the checkpoint holds rows {state}, this table holds {mine}")

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, width={self.width}, precision={self.precision}"
