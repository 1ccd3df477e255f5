"""``alpt.v1``: Adaptive Low-Precision Training (Li, Zhang, Guo, Wang, Tang & He, "Adaptive Low-Precision Training
for Embeddings in Click-Through Rate Prediction", AAAI 2023).

Every id keeps its own row, stored only as ``bits``-bit signed integer codes ``q`` and a learned step size
``delta``: the row is ``delta * q``, ``q`` in ``[-2**(b-1), 2**(b-1) - 1]``. Nothing is held in fp32 but the step
sizes (one per row, or one per field) and the optimizer's per-row sums, so the table trains and serves in about
``b / 32`` of the full table's bytes. Each step (:class:`ALPTOptimizer`):

1. the rows a batch read get their summed gradient ``g`` (captured, :class:`~embcompress.lowp.CapturesRowGradients`)
   and a row-wise Adagrad update ``w = delta * q - lr * g / sqrt(s)``, in fp32 for those rows only;
2. the step sizes learn by LSQ's estimator (Esser et al., ICLR 2020), as the paper does: with ``v = w / delta``,
   ``d(delta * round(clip(v))) / d delta`` is ``round(v) - v`` inside the range and the clipping bound outside it,
   times the output gradient, scaled by the paper's ``1 / sqrt(B * D * (2**(b-1) - 1))`` (``B`` the batch size);
   then an update of ``log(delta)`` by ``step_lr`` times that gradient over its running RMS (RMSprop, decay 0.99),
   so each step moves ``delta`` by a factor of about ``exp(+-step_lr)`` whatever its scale;
3. ``w`` is written back as codes at the new step size with **stochastic rounding**, unbiased.

With a step per field, a step-size update rescales every row of the field, the ones the batch did not read too:
there is no fp32 copy to re-encode them from, as in the paper. ``B`` is the number of lookups over the number of
fields, the batch size for one-hot input (for bags it counts values).

One departure, for cost: the paper and the VLDB 2024 benchmark's reference compute the step-size gradient in a
second forward and backward pass through the model at the updated rows; here it uses the first pass's output
gradient ``g`` at those rows (a first-order approximation of the same quantity, exact as ``lr -> 0``), so a step
costs one forward and one backward like every other table. And the step sizes learn in log space (the paper updates
them with the model's optimizer): a table dropped into a model that initialises rows at std 1e-4 (DeepCTR's
convention) must let them grow a hundredfold within an epoch, which an additive step of any fixed size does not.

Bytes, exactly (``N = sum(n_f)`` rows, ``D`` wide): codes ``N * ceil(D * b / 8)`` (uint8, ``8 / b`` codes a byte),
step sizes ``4 N`` (per row) or ``4 F`` (per field, with the rows' int64 field starts, ``8 F``), plus the int64
field offsets. Served as stored; training adds
the row-wise Adagrad sums (``4 N``) and the step sizes' mean squares (``4 N`` or ``4 F``). At ``D = 16`` per row:
int8 20 bytes (3.2x), int4 12 (5.3x), int2 8 (8x): ``bits`` is the budget knob, and budgets past 8x raise
``BudgetError``.
"""

from __future__ import annotations

import itertools
import math
from typing import ClassVar, Sequence

import torch
from torch import nn

from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, check_choice, check_int, check_positive_number, resolve_init_std,
)
from embcompress.lowp import CapturesRowGradients, rowwise_adagrad_
from embcompress.quantize import stochastic_round
from embcompress.registry import TABLES

BITS = (2, 4, 8)
_BETA = 0.99  # decay of the step sizes' running mean square gradient
STEPS = ("row", "field")


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``[..., D]`` in ``[0, 2**bits)`` packed ``8 / bits`` to a byte (the first in the low bits)."""
    per = 8 // bits
    if per == 1:
        return q
    pad = (-q.shape[-1]) % per
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], -1)
    q = q.view(*q.shape[:-1], -1, per)
    out = q[..., 0].clone()
    for k in range(1, per):
        out |= q[..., k] << (k * bits)
    return out


def _unpack(packed: torch.Tensor, bits: int, width: int) -> torch.Tensor:
    per = 8 // bits
    if per == 1:
        return packed
    mask = (1 << bits) - 1
    parts = [(packed >> (k * bits)) & mask for k in range(per)]
    return torch.stack(parts, -1).flatten(-2)[..., :width]


class ALPTRows(CapturesRowGradients, nn.Module):
    """``[rows, width]`` signed ``bits``-bit codes with a step size per row or per field (``field_starts``)."""

    def __init__(self, weight: torch.Tensor, bits: int, field_starts: torch.Tensor | None, init_std: float) -> None:
        super().__init__()
        self.num_rows, self.width = weight.shape
        self.bits = bits
        self.q_min, self.q_max = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        self._captured = []
        self.register_buffer("field_starts", field_starts)
        steps = self.num_rows if field_starts is None else field_starts.numel()
        # LSQ's initial step, 2 E|w| / sqrt(q_max), for rows drawn N(0, init_std**2) (known without reading them,
        # so the table builds on the meta device): int8 spans about +-18 std, int4 +-4, int2 codes -2..1 x 1.6 std.
        self.initial_step = 2.0 * math.sqrt(2.0 / math.pi) * init_std / math.sqrt(self.q_max)
        self.register_buffer("step", torch.full((steps,), self.initial_step, device=weight.device))
        self.register_buffer("codes", _pack(self._encode(weight, self.step_of(torch.arange(
            self.num_rows, device=weight.device)), None), bits))

    def step_of(self, rows: torch.Tensor) -> torch.Tensor:
        """The step size of each row in ``rows``."""
        if self.field_starts is None:
            return self.step[rows]
        return self.step[torch.bucketize(rows, self.field_starts, right=True) - 1]

    def step_index(self, rows: torch.Tensor) -> torch.Tensor:
        if self.field_starts is None:
            return rows
        return torch.bucketize(rows, self.field_starts, right=True) - 1

    def _encode(self, w: torch.Tensor, step: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        v = w / step.unsqueeze(-1)
        v = stochastic_round(v, generator) if generator is not None else torch.round(v)
        return (v.clamp_(self.q_min, self.q_max) - self.q_min).to(torch.uint8)

    def read(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 rows ``[*rows.shape, width]``."""
        flat = rows.reshape(-1)
        q = _unpack(self.codes.index_select(0, flat), self.bits, self.width).float() + self.q_min
        return (q * self.step_of(flat).unsqueeze(-1)).view(*rows.shape, self.width)

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        return self.capture(self.read(rows), rows)

    @torch.no_grad()
    def write(self, rows: torch.Tensor, w: torch.Tensor, generator: torch.Generator) -> None:
        self.codes.index_copy_(0, rows, _pack(self._encode(w, self.step_of(rows), generator), self.bits))

    def extra_repr(self) -> str:
        return (f"rows={self.num_rows}, width={self.width}, bits={self.bits}, "
                f"step={'row' if self.field_starts is None else 'field'}")


class ALPTOptimizer(torch.optim.Optimizer):
    """One ALPT step for :class:`ALPTRows` (see the module docstring); ``num_fields`` gives the batch size
    ``B = lookups / num_fields`` of the step-size gradient's scale."""

    def __init__(self, rows: ALPTRows, *, lr: float, step_lr: float, num_fields: int, seed: int = 0,
                 eps: float = 1e-8) -> None:
        super().__init__([rows.codes, rows.step], {"lr": lr, "step_lr": step_lr, "eps": eps})
        self.rows, self.num_fields = rows, num_fields
        self.generator = torch.Generator(device=rows.codes.device).manual_seed(seed)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.rows.clear_gradient()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        t, group = self.rows, self.param_groups[0]
        batch = max(1, t.captured_lookups() // self.num_fields)
        got = t.take_gradient()
        if got is None:
            return loss
        rows, g = got
        w = t.read(rows) - rowwise_adagrad_(self.state[t.codes], t.num_rows, rows, g, group["lr"], group["eps"])
        step = t.step_of(rows)
        v = w / step.unsqueeze(1)
        grad_v = torch.where(v <= t.q_min, float(t.q_min), torch.where(v >= t.q_max, float(t.q_max), v.round() - v))
        scale = 1.0 / math.sqrt(batch * t.width * t.q_max)
        g_step = (g * grad_v).sum(1) * scale
        index = t.step_index(rows)
        if t.field_starts is not None:
            index, inverse = torch.unique(index, return_inverse=True)
            g_step = g_step.new_zeros(index.shape[0]).index_add_(0, inverse, g_step)
        # In log space, normalised by a running RMS of its gradients: the step can grow or shrink by orders of
        # magnitude within a run (rows of a model initialised at std 1e-4 grow 100x), and stays positive.
        g_log = g_step * t.step[index]
        state = self.state[t.step]
        if "sq" not in state:
            state["sq"] = torch.zeros_like(t.step)
        sq = state["sq"][index]
        sq = torch.where(sq > 0, _BETA * sq + (1 - _BETA) * g_log.square(), g_log.square())
        state["sq"][index] = sq
        update = torch.where(sq > 0, g_log / sq.sqrt(), torch.zeros_like(g_log)) * group["step_lr"]
        t.step[index] = t.step[index] * torch.exp(-update.clamp_(-1.0, 1.0))
        t.write(rows, w, self.generator)
        return loss

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        generator = state_dict.pop("generator", None)
        super().load_state_dict(state_dict)
        if generator is not None:
            self.generator.set_state(generator)


@TABLES.register("alpt.v1")
class ALPTEmbedding(CompressedEmbedding):
    """One row per id per field, held as ``bits``-bit codes with learned step sizes, trained at that precision.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` lie in ``[0, n_f)``.

    Args:
        bits: code width, 8, 4 or 2 (the budget knob).
        step: ``"row"`` (a step size per row, the paper's default) or ``"field"`` (one per field).
        step_lr: the step sizes' learning rate in log space (each update moves one by about ``exp(+-step_lr)``).
        seed: seeds the stochastic rounding of the write-back.
        init_std: std of the initial rows (before they are rounded to the codes); ``None``: the library default.

    The training loop gets its optimizer from :meth:`row_optimizers` (the rows' learning rate is the training's
    embedding learning rate); it trains in one process.

    >>> import torch
    >>> t = ALPTEmbedding([10, 3], 16, bits=4)
    >>> t(torch.tensor([[9, 2], [0, 0]])).shape
    torch.Size([2, 2, 16])
    >>> t.memory_report().total_bytes == 13 * (8 + 4) + 2 * 8  # packed codes and a step per row; offsets
    True
    """

    budget_keys: ClassVar[tuple[str, ...]] = ("bits",)
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "seed", "step_lr")

    def __init__(
        self, cardinalities: int | Sequence[int], embedding_dim: int, *, bits: int = 8, step: str = "row",
        step_lr: float = 0.05, seed: int = 0, init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.bits = check_int("bits", bits, owner=self)
        if self.bits not in BITS:
            raise self._fail(f"bits must be one of {list(BITS)}, got {bits!r}")
        self.step_mode = check_choice("step", step, STEPS, owner=self)
        self.step_lr = check_positive_number("step_lr", step_lr, owner=self)
        self.seed = check_int("seed", seed, lo=0, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        weight = torch.empty(sum(self.cardinalities), embedding_dim).normal_(0.0, self.init_std)
        starts = self.offsets.clone() if self.step_mode == "field" else None
        self.rows = ALPTRows(weight, self.bits, starts, self.init_std)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        return self.rows.lookup(ids + self.offsets[fields])

    def row_optimizers(self, lr: float, *, seed: int = 0) -> list[torch.optim.Optimizer]:
        return [ALPTOptimizer(self.rows, lr=lr, step_lr=self.step_lr, num_fields=self.num_fields,
                              seed=self.seed + seed)]

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, **options) -> BudgetKnob:
        # Searched over 2..8, built at the widest of BITS not above the value: bytes are a step function.
        return BudgetKnob("bits", BITS[0], BITS[-1], lambda v: {"bits": max(b for b in BITS if b <= v)})

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, step={self.step_mode!r}"
