"""Exact memory accounting of embedding tables.

A report counts the bytes of every tensor a module holds: trainable parameters and buffers (hash seeds, row
offsets, index maps, masks), split by dtype. It is read off the tensors themselves, never estimated from
parameter names. The baseline is the uncompressed fp32 table, ``sum(n_f) * D * 4`` bytes, and the compression
ratio is always ``baseline_bytes / total_bytes``.
"""

from __future__ import annotations

import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

__all__ = ["MemoryReport", "measure", "baseline_bytes", "tensor_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def baseline_bytes(cardinalities: int | Sequence[int], embedding_dim: int) -> int:
    """Bytes of the uncompressed fp32 tables: ``sum(n_f) * D * 4``."""
    cards = [cardinalities] if isinstance(cardinalities, numbers.Integral) else cardinalities
    return int(sum(cards)) * int(embedding_dim) * 4


@dataclass(frozen=True)
class MemoryReport:
    """Bytes a table stores, by kind and dtype, beside the uncompressed baseline."""

    parameters: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes of trainable parameters
    buffers: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes of buffers
    baseline_bytes: int = 0

    @property
    def parameter_bytes(self) -> int:
        return sum(self.parameters.values())

    @property
    def buffer_bytes(self) -> int:
        return sum(self.buffers.values())

    @property
    def total_bytes(self) -> int:
        return self.parameter_bytes + self.buffer_bytes

    @property
    def ratio(self) -> float:
        """Compression ratio: baseline bytes / stored bytes."""
        return self.baseline_bytes / self.total_bytes if self.total_bytes else float("inf")

    def as_dict(self) -> dict:
        return {
            "parameter_bytes": self.parameter_bytes,
            "buffer_bytes": self.buffer_bytes,
            "total_bytes": self.total_bytes,
            "baseline_bytes": self.baseline_bytes,
            "ratio": self.ratio,
            "parameters_by_dtype": dict(self.parameters),
            "buffers_by_dtype": dict(self.buffers),
        }

    def __str__(self) -> str:
        return (
            f"{self.total_bytes:,} bytes (parameters {self.parameter_bytes:,}, buffers {self.buffer_bytes:,}); "
            f"baseline {self.baseline_bytes:,}; ratio {self.ratio:.2f}x"
        )


def measure(module: nn.Module, baseline: int) -> MemoryReport:
    """Count every parameter and buffer of ``module`` by dtype (``parameters()``/``buffers()`` skip shared ones).

    Works on modules built on the ``meta`` device too, so a size can be known before memory is allocated.
    """
    params: Counter[str] = Counter()
    buffers: Counter[str] = Counter()
    for counter, tensors in ((params, module.parameters()), (buffers, module.buffers())):
        for t in tensors:
            counter[str(t.dtype).removeprefix("torch.")] += tensor_bytes(t)
    return MemoryReport(parameters=dict(params), buffers=dict(buffers), baseline_bytes=baseline)
