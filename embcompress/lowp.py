"""Low-precision training: rows held at int8/int4 while they train, written back with stochastic rounding.

A table built with ``train_quantized=True`` keeps each row table as :class:`TrainedRows`: the integer codes and the
per-row fp16 scale and offset of :mod:`embcompress.quantize`, and nothing else. There is no fp32 master. A lookup
dequantizes the rows it reads; backward hands their output gradient to the rows (a tensor hook, so nothing is held
between a forward and its backward). :class:`QuantizedRowOptimizer` then updates only the rows the batch touched:
it dequantizes them to fp32 (a transient ``[touched, D]`` buffer), applies the update and re-quantizes them with
**stochastic rounding** (Hetu's INT8/INT16 training; Gupta et al., ICML 2015), whose expectation is the updated
value, so updates far below one quantization step still move a row on average.

Held while training, exactly (the memory report's training bytes):

* the stored rows: ``rows * row_bytes(D, precision)`` (int8 at D=16: 20 bytes a row);
* the optimizer state: row-wise Adagrad (the default) keeps one fp32 sum of squared gradients per row (4 bytes a
  row, the update fbgemm fuses as ``EXACT_ROWWISE_ADAGRAD``); ``rule="sgd"`` keeps none. A per-coordinate optimizer
  (Adam) would hold two fp32 numbers per stored code, more than fp32 rows, so it is not offered.

So int8 rows at D=16 train in 24 bytes a row where fp32 rows under SparseAdam hold 192 (weights and two moments).
The update's rounding noise is the price: see the synthetic grid's ``hashing-int8-trained`` rows.

Gradients are applied once per :meth:`QuantizedRowOptimizer.step` from the gradients captured since the last
``zero_grad``; a row read several times in a batch gets the sum of its gradients, as a sparse gradient would.
Such tables train in one process: the captured gradients are not averaged over a process group.

>>> import torch
>>> from embcompress.quantize import QuantizedRows
>>> rows = TrainedRows(torch.randn(10, 4), "int8")
>>> opt = QuantizedRowOptimizer([rows], lr=0.1, seed=0)
>>> before = rows.dequantized()
>>> rows.lookup(torch.tensor([3, 3, 5])).sum().backward()
>>> opt.step()
>>> changed = (rows.dequantized() != before).any(1)
>>> changed.nonzero().flatten().tolist()
[3, 5]
"""

from __future__ import annotations

import warnings
from typing import Iterable, Sequence

import torch

from .quantize import QuantizedRows, quantize_rows
from .validate import check_choice, check_number

__all__ = ["TRAINABLE_PRECISIONS", "CapturesRowGradients", "TrainedRows", "QuantizedRowOptimizer", "RULES", "rowwise_adagrad_"]

#: Precisions rows can train at: integer ones, where stochastic rounding is the write-back.
TRAINABLE_PRECISIONS = ("int8", "int4")
RULES = ("rowwise_adagrad", "sgd")
_UNSTEPPED = 1000  # backward passes captured without a step before a warning


class CapturesRowGradients:
    """Mixin of a module whose rows train outside autograd: :meth:`capture` makes looked-up rows require grad
    and keeps the gradient backward gives them (in training mode, with gradients enabled)."""

    width: int
    _captured: list

    def capture(self, out: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``out [*idx.shape, width]``, the rows ``idx`` read, made a leaf whose gradient is kept."""
        if not (self.training and torch.is_grad_enabled()):
            return out
        flat = idx.reshape(-1)
        out = out.detach().requires_grad_()
        out.register_hook(lambda g: self._keep(flat, g))
        return out

    def _keep(self, flat: torch.Tensor, grad: torch.Tensor) -> None:
        self._captured.append((flat, grad.reshape(-1, self.width)))
        if len(self._captured) == _UNSTEPPED:  # a loop that never steps the table's own optimizer
            warnings.warn(f"{type(self).__name__}: gradients of {_UNSTEPPED} backward passes are held with no "
                          "optimizer step: these rows train only through the table's row_optimizers() (which "
                          "embcompress.training.make_optimizers includes); step them, or they never change",
                          RuntimeWarning, stacklevel=2)

    def captured_lookups(self) -> int:
        return sum(i.numel() for i, _ in self._captured)

    def take_gradient(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(rows, summed gradients)`` of the distinct rows read since the last call, or None; clears them."""
        if not self._captured:
            return None
        idx = torch.cat([i for i, _ in self._captured])
        grads = torch.cat([g for _, g in self._captured]).float()
        self._captured.clear()
        rows, inverse = torch.unique(idx, return_inverse=True)
        summed = grads.new_zeros(rows.shape[0], self.width).index_add_(0, inverse, grads)
        return rows, summed

    def clear_gradient(self) -> None:
        self._captured.clear()


class TrainedRows(CapturesRowGradients, QuantizedRows):
    """A ``[rows, width]`` table stored at ``precision`` (int8 or int4) that trains.

    In training mode with gradients enabled, :meth:`lookup` returns a tensor that requires grad, and its gradient
    is captured for :class:`QuantizedRowOptimizer`; otherwise it reads like :class:`QuantizedRows`.
    """

    def __init__(self, weight: torch.Tensor, precision: str) -> None:
        check_choice("precision", precision, TRAINABLE_PRECISIONS, owner="TrainedRows")
        super().__init__(weight, precision)
        self._captured = []

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        return self.capture(super().lookup(idx), idx)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, values: torch.Tensor, generator: torch.Generator | None) -> None:
        """Store fp32 ``values [len(rows), width]`` as rows ``rows``, stochastically rounded."""
        for name, tensor in zip(self._names, quantize_rows(values, self.precision, stochastic=True,
                                                            generator=generator)):
            getattr(self, name).index_copy_(0, rows, tensor)

    def frozen(self) -> QuantizedRows:
        """A :class:`QuantizedRows` holding these codes as they are (no re-quantization)."""
        return QuantizedRows.from_stored(tuple(getattr(self, n).detach().clone() for n in self._names),
                                         self.precision, self.width)


class QuantizedRowOptimizer(torch.optim.Optimizer):
    """Updates :class:`TrainedRows` from their captured gradients, writing back with stochastic rounding.

    Args:
        stores: the row tables to train.
        lr: the learning rate.
        rule: ``"rowwise_adagrad"`` (one fp32 sum of mean squared gradients per row: ``s += mean(g**2)``,
            ``x -= lr * g / (sqrt(s) + eps)``) or ``"sgd"`` (``x -= lr * g``, no state).
        eps: Adagrad's denominator floor.
        seed: seeds the rounding noise, so a run is reproducible.
    """

    def __init__(self, stores: Sequence[TrainedRows], *, lr: float, rule: str = "rowwise_adagrad",
                 eps: float = 1e-8, seed: int = 0) -> None:
        lr = check_number("lr", lr, lo=0.0, owner="QuantizedRowOptimizer")
        self.rule = check_choice("rule", rule, RULES, owner="QuantizedRowOptimizer")
        self.stores = list(stores)
        # The codes buffers stand for the stores: the optimizer's state is keyed by them, so the memory report
        # finds it among the table's buffers.
        super().__init__([s._buffers[s._names[0]] for s in self.stores], {"lr": lr, "eps": eps})
        self.seed = int(seed)
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[device]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for s in self.stores:
            s.clear_gradient()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        group = self.param_groups[0]
        for store, key in zip(self.stores, group["params"]):
            got = store.take_gradient()
            if got is None:
                continue
            rows, grad = got
            values = QuantizedRows.lookup(store, rows)
            if self.rule == "rowwise_adagrad":
                values -= rowwise_adagrad_(self.state[key], store.num_rows, rows, grad, group["lr"], group["eps"])
            else:
                values -= group["lr"] * grad
            store.write(rows, values, self._generator(rows.device))
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generators": {str(d): g.get_state() for d, g in self._generators.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        for device, g_state in generators.items():
            self._generator(torch.device(device)).set_state(g_state)


def rowwise_adagrad_(state: dict, num_rows: int, rows: torch.Tensor, grad: torch.Tensor, lr: float, eps: float
                     ) -> torch.Tensor:
    """Row-wise Adagrad's step for rows ``rows`` of gradient ``grad [len(rows), width]`` (a width-1 gradient is
    plain Adagrad), with the per-row sum of mean squared gradients kept in ``state["sum"]`` (created here)."""
    if "sum" not in state:
        state["sum"] = torch.zeros(num_rows, device=grad.device, dtype=torch.float32)
    acc = state["sum"].index_add_(0, rows, grad.pow(2).mean(1))[rows]
    return lr * grad / (acc.sqrt() + eps).unsqueeze(1)


def trained_stores(modules: Iterable[torch.nn.Module]) -> list[TrainedRows]:
    """The :class:`TrainedRows` inside ``modules``, each once."""
    seen: dict[int, TrainedRows] = {}
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, TrainedRows):
                seen.setdefault(id(sub), sub)
    return list(seen.values())
