"""Exact memory accounting of embedding tables: what a table holds to train and what it stores to serve.

A report counts the bytes of every tensor a module holds: trainable parameters and buffers (hash seeds, row
offsets, index maps, masks), split by dtype. It is read off the tensors themselves, never estimated from
parameter names. Three figures:

* **stored bytes** (``total_bytes``): the parameters and buffers the module holds now;
* **training bytes**: stored bytes plus the optimizer state held for the module's parameters (Adam's two
  moments, Adagrad's sum, ... counted off the optimizer's own state tensors, so only when an optimizer is given);
* **serving bytes**: what the exported, frozen table stores. They equal the stored bytes for most tables; a
  staged method (OptEmbed's supernet, pruning, codebooks, low precision) serves a smaller table than it trains.

The baseline is the uncompressed fp32 table, ``sum(n_f) * D * 4`` bytes, and the compression ratio is always
``baseline_bytes / serving_bytes``.
"""

from __future__ import annotations

import itertools
import numbers
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

__all__ = ["MemoryReport", "measure", "baseline_bytes", "full_table_bytes", "tensor_bytes", "optimizer_state_bytes"]


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def baseline_bytes(cardinalities: int | Sequence[int], embedding_dim: int) -> int:
    """Bytes of the uncompressed fp32 tables: ``sum(n_f) * D * 4``."""
    cards = [cardinalities] if isinstance(cardinalities, numbers.Integral) else cardinalities
    return int(sum(cards)) * int(embedding_dim) * 4


def full_table_bytes(cardinalities: int | Sequence[int], embedding_dim: int) -> int:
    """Exact bytes of ``full.v1`` (the budget ceiling of every method): the fp32 rows and one int64 row offset per
    field (a test holds this to the table's own memory report)."""
    cards = [cardinalities] if isinstance(cardinalities, numbers.Integral) else list(cardinalities)
    return baseline_bytes(cards, embedding_dim) + 8 * len(cards)


@dataclass(frozen=True)
class MemoryReport:
    """Bytes a table stores, by kind and dtype, beside the uncompressed baseline."""

    parameters: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes of trainable parameters
    buffers: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes of buffers
    baseline_bytes: int = 0
    #: dtype name -> bytes of optimizer state held for the parameters (empty when no optimizer was given)
    optimizer_state: dict[str, int] = field(default_factory=dict)
    #: bytes of the table as served, when it is not the module itself (``None``: the module is what is served)
    serving: int | None = None

    @property
    def parameter_bytes(self) -> int:
        return sum(self.parameters.values())

    @property
    def buffer_bytes(self) -> int:
        return sum(self.buffers.values())

    @property
    def total_bytes(self) -> int:
        """Stored bytes: the parameters and buffers the module holds now."""
        return self.parameter_bytes + self.buffer_bytes

    @property
    def optimizer_state_bytes(self) -> int:
        return sum(self.optimizer_state.values())

    @property
    def training_bytes(self) -> int:
        """Stored bytes plus the optimizer state held for the parameters."""
        return self.total_bytes + self.optimizer_state_bytes

    @property
    def serving_bytes(self) -> int:
        """Bytes of the exported, frozen table."""
        return self.total_bytes if self.serving is None else self.serving

    @property
    def ratio(self) -> float:
        """Compression ratio: baseline bytes / serving bytes."""
        return self.baseline_bytes / self.serving_bytes if self.serving_bytes else float("inf")

    def as_dict(self) -> dict:
        return {
            "parameter_bytes": self.parameter_bytes,
            "buffer_bytes": self.buffer_bytes,
            "total_bytes": self.total_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
            "training_bytes": self.training_bytes,
            "serving_bytes": self.serving_bytes,
            "baseline_bytes": self.baseline_bytes,
            "ratio": self.ratio,
            "parameters_by_dtype": dict(self.parameters),
            "buffers_by_dtype": dict(self.buffers),
            "optimizer_state_by_dtype": dict(self.optimizer_state),
        }

    def __str__(self) -> str:
        held = f"{self.total_bytes:,} bytes (parameters {self.parameter_bytes:,}, buffers {self.buffer_bytes:,})"
        if self.optimizer_state:
            held += f", training {self.training_bytes:,} with optimizer state"
        if self.serving is not None:
            held += f", serving {self.serving_bytes:,}"
        return f"{held}; baseline {self.baseline_bytes:,}; ratio {self.ratio:.2f}x"


def _by_dtype(tensors: Iterable[torch.Tensor]) -> dict[str, int]:
    counter: Counter[str] = Counter()
    for t in tensors:
        counter[str(t.dtype).removeprefix("torch.")] += tensor_bytes(t)
    return dict(counter)


def optimizer_state_bytes(optimizers: Iterable[torch.optim.Optimizer], params: Iterable[nn.Parameter]
                          ) -> dict[str, int]:
    """Bytes by dtype of the state tensors ``optimizers`` hold for ``params`` (moments, sums, step counters).

    Read off the optimizers' own state, so it is exact for whatever optimizer is configured; state is created at
    the first step, so count after training (or after one step).
    """
    wanted = {id(p) for p in params}
    return _by_dtype(
        t for opt in optimizers for p, state in opt.state.items() if id(p) in wanted
        for t in state.values() if torch.is_tensor(t)
    )


def measure(module: nn.Module, baseline: int, *, optimizers: Iterable[torch.optim.Optimizer] = (),
            serving: int | None = None) -> MemoryReport:
    """Count every parameter and buffer of ``module`` by dtype (``parameters()``/``buffers()`` skip shared ones),
    and the state ``optimizers`` hold for its parameters.

    Works on modules built on the ``meta`` device too, so a size can be known before memory is allocated.
    """
    # Rows held by a fused kernel (embcompress.fused.FusedRows) are not the module's parameters: each such
    # module lists what it holds, its optimizer state apart.
    rows, held, state = [], [], []
    for m in module.modules():
        if hasattr(m, "stored_tensors"):
            r, b, s = m.stored_tensors()
            rows, held, state = rows + r, held + b, state + s
    optimizer_state = Counter(optimizer_state_bytes(optimizers, itertools.chain(module.parameters(),
                                                                              module.buffers())))
    optimizer_state.update(_by_dtype(state))
    return MemoryReport(
        parameters=_by_dtype(itertools.chain(module.parameters(), rows)),
        buffers=_by_dtype(itertools.chain(module.buffers(), held)), baseline_bytes=baseline,
        # Buffers too: rows held quantized are buffers, their optimizer's state keyed by them (embcompress.lowp).
        optimizer_state=dict(optimizer_state), serving=serving,
    )
