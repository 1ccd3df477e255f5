"""``mixed_dim.v1``: mixed dimension embeddings.

Ginart, Naumov, Mudigere, Yang & Zou, "Mixed Dimension Embeddings with Application to Memory-Efficient
Recommendation Systems", ISIT 2021 (arXiv:1909.11810).

Popular ids get wide vectors, rare ids narrow ones, and every narrow vector is mapped to the common width ``D``
by a bias-free linear projection. The ids of each field are cut into *blocks* (one per field by default, or
``blocks_per_field`` frequency blocks) and block ``b`` gets the power-law dimension of the paper::

    x_b = clip(scale * p_b ** alpha, 1, D)          # lambda = scale, alpha = temperature

with ``p_b`` the mean query probability of one id of the block, so popular blocks get more dimensions. (The
paper writes the same rule as ``d = lambda * n ** -alpha`` for a field of ``n`` equally popular ids.)

* One block per field: ``p = 1 / n_f``, so small fields get wide vectors and big fields narrow ones.
* Frequency blocks: the data pipeline ranks ids by frequency (id 0 = most frequent), so block ``k`` of a field of
  ``n`` ids is the id range ``[round(n ** (k/K)), round(n ** ((k+1)/K)))``: block sizes grow by the constant
  factor ``n ** (1/K)``, the most popular ids sit in the smallest blocks. With no counts available, ``p_b`` is
  the Zipf (exponent 1) estimate: an id of rank ``r`` (1-based) is queried with probability ``1 / (r * H_n)``,
  so ``p_b = (H_stop - H_start) / (H_n * size_b)``; over a whole field this is ``1 / n_f`` again.
  **This assumes frequency-ranked ids** and nothing checks it: on ids from another encoder (alphabetical or
  first-seen codes) the wide blocks go to arbitrary values. Rank them with :mod:`embcompress.frequency`
  (``frequency_ranks`` to re-encode, or the ``build_frequency_ranked`` wrapper, its remap counted in the budget).

Integer widths. ``x_b`` is real; the stored widths are integers (``round_dims=True``: powers of two, and ``D``)
whose mean realises it. Consecutive blocks of a field whose targets share a bracket ``lo <= x < hi`` of allowed
widths form a run; the run's most popular ``round(sum_b size_b * (x_b - lo) / (hi - lo))`` ids get width ``hi``,
the rest ``lo``. So widths never grow from a popular id to a less popular one, and the bytes are a nearly
continuous function of ``scale``: that is how ``from_budget`` lands within a few percent of a budget even when one
field holds most of the rows (whole-int widths per field move in steps of ``n_f * 4`` bytes). A block's ``lo`` and
``hi`` ids share one projection of ``hi`` rows (the narrower ids use its first ``lo`` rows), so a split costs no
extra projection.

Full width. Ids of width ``D`` are stored as they are, with no projection (the identity is implicit, not stored).
The most popular blocks of a field, up to the last one whose factorised storage ``size_b * x_b + x_b * D`` would
be no smaller than its full storage ``size_b * D``, are stored at full width: cheaper and full rank. This is what
the DLRM code's threshold for small tables is for; here tiny fields (``n = 1, 2, 3``) simply get width ``D``.

Layout and forward. All rows of one width ``d`` are fused in one weight ``[rows_d, d]`` (so at most ``D`` weights,
usually a handful), all block projections are stacked in one ``[sum_b projection_rows_b, D]`` weight. An id finds
its part (a run of one width within one block) from per-field buffers: its field's first part plus the number of
the field's later part starts it reaches (one vectorised compare per boundary slot; one slot per field without
frequency blocks). The ids are sorted by width once, and then the forward loops over the distinct widths only,
never over fields: per width, one gather of rows and one projection that applies every id's own block projection
with dense GEMMs (each row is placed in its part's slot of a zero ``[num_parts_d * d]`` vector and multiplied by
the stacked ``[num_parts_d * d, D]`` projections; with more such parts than ``D``, a batched matmul against
gathered ``[d, D]`` matrices instead). The vectors then return to input order through a permutation whose
backward is a gather, not a scatter-add.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections import Counter
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.fused import check_fused_optimizer
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_number, check_positive_int, init_rows_,
    resolve_init_std,
)
from embcompress.quantize import check_precision
from embcompress.registry import TABLES

__all__ = [
    "MixedDimEmbedding", "MixedDimPlan", "PlanBlock", "PlanPart", "plan_mixed_dims", "block_bounds",
    "zipf_block_popularity",
]

_NAME = "mixed_dim.v1"
_EULER_GAMMA = 0.5772156649015329
_INT64_BYTES = 8
_FP32_BYTES = 4
_NEVER = 2**63 - 1  # a part start no id reaches (pads the per-field part starts)


# --------------------------------------------------------------------------------------------------- planning
def block_bounds(n: int, blocks: int) -> list[int]:
    """Start ids of the frequency blocks of a field of ``n`` ids, then ``n``: ``[0, ..., n]``.

    Geometric boundaries ``round(n ** (k / blocks))``; boundaries that coincide (small fields) are merged, so a
    field has at most ``min(blocks, n)`` non-empty blocks that tile ``[0, n)`` exactly.
    """
    inner = {int(math.floor(n ** (k / blocks) + 0.5)) for k in range(1, blocks)}
    return [0, *sorted(b for b in inner if 0 < b < n), n]


def _harmonic(m: int) -> float:
    if m < 256:
        return math.fsum(1.0 / r for r in range(1, m + 1))
    # Euler-Maclaurin; the error is below 1 / (252 m**6), far under float precision here.
    inv = 1.0 / m
    return math.log(m) + _EULER_GAMMA + 0.5 * inv - inv**2 / 12 + inv**4 / 120


def zipf_block_popularity(n: int, start: int, stop: int) -> float:
    """Mean query probability of the ids ``[start, stop)`` of ``n`` frequency-ranked ids, under Zipf(1)."""
    if start == 0 and stop == n:
        return 1.0 / n  # exact, whatever the distribution within the field
    return (_harmonic(stop) - _harmonic(start)) / (_harmonic(n) * (stop - start))


class PlanBlock(NamedTuple):
    """One frequency block of a field: the ids ``[start, stop)`` and the width the power law gives them."""

    field: int
    start: int
    stop: int
    popularity: float  # p_b, the mean query probability of one id of the block
    target_dim: float  # the real x_b (D for a block stored at full width)
    projection_rows: int  # rows of the block's projection: its widest width below D (0: no projection)


class PlanPart(NamedTuple):
    """The ids ``[start, stop)`` of a field stored at one integer width ``dim``, within block ``block``."""

    field: int
    start: int
    stop: int
    dim: int
    block: int  # index into MixedDimPlan.blocks


@dataclass(frozen=True)
class MixedDimPlan:
    """Where every row goes, and the exact bytes of the table built from it.

    ``blocks``: one :class:`PlanBlock` per block, in field-major id order. ``parts``: the :class:`PlanPart` id
    ranges of one integer width within one block, in field-major id order (neighbouring full-width ranges of a
    field need no projection and are merged into one part, named after its first block). Both are named tuples,
    so they also unpack and compare as plain tuples.
    """

    blocks: tuple[PlanBlock, ...]
    parts: tuple[PlanPart, ...]
    embedding_dim: int
    num_fields: int

    @property
    def dims(self) -> tuple[int, ...]:
        """The distinct widths, ascending."""
        return tuple(sorted({p.dim for p in self.parts}))

    @property
    def row_bytes(self) -> int:
        return sum((p.stop - p.start) * p.dim for p in self.parts) * _FP32_BYTES

    @property
    def projection_bytes(self) -> int:
        return sum(b.projection_rows for b in self.blocks) * self.embedding_dim * _FP32_BYTES

    @property
    def max_parts_per_field(self) -> int:
        return max(Counter(p.field for p in self.parts).values())

    @property
    def buffer_bytes(self) -> int:
        # int64 buffers: per field its first part and the starts of its other parts (padded to the most parts of
        # any field); per part its width group, row shift and projection slot; and the projection row of each of
        # the d rows of every projected part (the per-width projection stacks)
        per_field = 1 + self.max_parts_per_field - 1
        stacked = sum(p.dim for p in self.parts if p.dim < self.embedding_dim)
        return (self.num_fields * per_field + 3 * len(self.parts) + stacked) * _INT64_BYTES

    @property
    def total_bytes(self) -> int:
        return self.row_bytes + self.projection_bytes + self.buffer_bytes


def _allowed_dims(embedding_dim: int, round_dims: bool) -> list[int]:
    if not round_dims:
        return list(range(1, embedding_dim + 1))
    return sorted({1 << k for k in range(embedding_dim.bit_length()) if 1 << k < embedding_dim} | {embedding_dim})


def plan_mixed_dims(
    cardinalities: Sequence[int],
    embedding_dim: int,
    *,
    scale: float,
    alpha: float,
    blocks_per_field: int,
    round_dims: bool,
) -> MixedDimPlan:
    """Blocks, their power-law dimensions and integer parts (see the module docstring). Pure Python: no tensors."""
    D = embedding_dim
    allowed = _allowed_dims(D, round_dims)
    blocks: list[PlanBlock] = []
    parts: list[PlanPart] = []
    for f, n in enumerate(cardinalities):
        bounds = block_bounds(n, blocks_per_field)
        spans = list(zip(bounds, bounds[1:]))
        pops = [zipf_block_popularity(n, a, e) for a, e in spans]
        targets = [min(max(scale * p**alpha, 1.0), float(D)) for p in pops]
        # Later blocks are less popular; a running min keeps float noise from breaking that order.
        targets = list(itertools.accumulate(targets, min))
        # Full width for the most popular blocks up to the last one whose factorised storage (size * x + x * D)
        # would be no smaller than its full storage (size * D).
        full = [x >= D or (e - a) * D <= (e - a) * x + x * D for (a, e), x in zip(spans, targets)]
        promoted = max((k + 1 for k, is_full in enumerate(full) if is_full), default=0)
        first_block = len(blocks)
        widths: list[tuple[int, int, int]] = []  # (start, stop, width) runs of one width, in id order
        if promoted:
            widths.append((0, spans[promoted - 1][1], D))
        # Consecutive blocks whose targets share a bracket lo <= x < hi of allowed widths form one run; its most
        # popular ids get width hi, as many as make the run's mean width its blocks' mean target. Widths thus
        # never grow from a popular id to a less popular one.
        k = promoted
        while k < len(spans):
            above = bisect.bisect_right(allowed, targets[k])  # targets[k] < D, so a wider width exists
            lo, hi = allowed[above - 1], allowed[above]
            end = k
            while end < len(spans) and lo <= targets[end] < hi:
                end += 1
            extra = sum((e - a) * (x - lo) for (a, e), x in zip(spans[k:end], targets[k:end])) / (hi - lo)
            run_start, run_stop = spans[k][0], spans[end - 1][1]
            head = min(run_stop - run_start, int(math.floor(extra + 0.5)))
            widths += [(run_start, run_start + head, hi), (run_start + head, run_stop, lo)]
            k = end
        for (a, e), p, x in zip(spans, pops, targets):
            b = len(blocks)
            # A block's parts: its id range cut by the width runs.
            own = [(max(a, s), min(e, t), d) for s, t, d in widths if max(a, s) < min(e, t)]
            for s, t, d in own:
                if d == D and parts and parts[-1].field == f and parts[-1].dim == D:  # neighbouring full-width ids
                    parts[-1] = parts[-1]._replace(stop=t)
                else:
                    parts.append(PlanPart(f, s, t, d, b))
            blocks.append(PlanBlock(f, a, e, p, float(D) if b - first_block < promoted else x,
                                    max((d for *_, d in own if d < D), default=0)))
    return MixedDimPlan(tuple(blocks), tuple(parts), D, len(cardinalities))


def _check_options(scale, alpha, blocks_per_field, round_dims, sparse, *, owner=_NAME) -> None:
    # scale None: not given (the budget solves it)
    check_number("scale", scale, lo=0, optional=True, owner=owner)  # the power-law lambda
    check_number("alpha", alpha, lo=0, hi=1, owner=owner)  # the temperature; 0 = uniform widths
    check_positive_int("blocks_per_field", blocks_per_field, owner=owner)
    check_bool("round_dims", round_dims, owner=owner)
    check_bool("sparse", sparse, owner=owner)


def _check_dim(embedding_dim) -> None:
    check_positive_int("embedding_dim", embedding_dim, owner=_NAME)


class _Permute(torch.autograd.Function):
    """``out[order[i]] = x[i]`` for a permutation ``order``: a gather both ways.

    Autograd would differentiate ``index_copy`` / indexing with a scatter (``index_add``), several times slower on
    CPU than the gather a permutation's adjoint really is.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(order)
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return x.index_select(0, inverse)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (order,) = ctx.saved_tensors
        return grad.index_select(0, order), None


# ------------------------------------------------------------------------------------------------------ table
@TABLES.register(_NAME)
class MixedDimEmbedding(CompressedEmbedding):
    """Power-law widths per field (or per frequency block), projected to ``D``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)`` and are
    frequency ranked (id 0 = most frequent). Stored: ``weights[g]`` ``[rows_g, dims[g]]`` per distinct width (the
    rows of ``plan.parts`` of that width, in order), ``projection`` ``[sum_b projection_rows_b, D]`` (the blocks'
    projections in order; absent if every id is full width), and int64 buffers ``field_first_part`` ``[F]``,
    ``field_part_starts`` ``[F, max_parts_per_field - 1]``, ``part_group``, ``part_shift``, ``part_slot``
    ``[num_parts]`` and ``stack_rows``.

    Args:
        scale: the power-law ``lambda`` (``x_b = clip(scale * p_b ** alpha, 1, D)``); ``from_budget`` solves it.
        alpha: temperature in ``[0, 1]``; 0 gives every block width ``clip(scale, 1, D)``.
        blocks_per_field: frequency blocks per field (geometric id ranges, Zipf-estimated popularity).
        round_dims: only widths that are powers of two (or ``D``).
        sparse: sparse gradients for the row weights (use ``torch.optim.SparseAdam``); projections stay dense.
        precision: the precision the row tables of each width are served at (:mod:`embcompress.quantize`; a
            width too narrow to shrink, such as 1 at int8, stays fp32); the projections stay fp32.
        train_quantized: hold those row tables at ``precision`` (int8 or int4) while training too
            (:mod:`embcompress.lowp`).
        init_std: std of the returned (projected) vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = MixedDimEmbedding([1000, 10], 8, scale=40.0, alpha=0.5)
    >>> t.plan.dims  # field 1: 40 * 0.1 ** 0.5 = 12.6 -> 8 (full); field 0: 40 * 0.001 ** 0.5 = 1.26 -> 1 and 2
    (1, 2, 8)
    >>> t(torch.tensor([[999, 9], [0, 0]])).shape
    torch.Size([2, 2, 8])
    >>> t.memory_report().total_bytes == (735 * 1 + 265 * 2 + 10 * 8 + 2 * 8) * 4 + (2 * 2 + 3 * 3 + 2 + 1) * 8
    True
    """

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        scale: float,
        alpha: float = 0.3,
        blocks_per_field: int = 1,
        round_dims: bool = False,
        sparse: bool = False,
        precision: str = "fp32",
        train_quantized: bool = False,
        fused_optimizer: str | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        check_number("scale", scale, lo=0, owner=self)  # required here (from_budget solves it)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        _check_options(scale, alpha, blocks_per_field, round_dims, sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.scale, self.alpha = float(scale), float(alpha)
        self.blocks_per_field, self.round_dims, self.sparse = int(blocks_per_field), bool(round_dims), bool(sparse)
        D = self.embedding_dim
        self.plan = plan = plan_mixed_dims(
            self.cardinalities, D, scale=self.scale, alpha=self.alpha,
            blocks_per_field=self.blocks_per_field, round_dims=round_dims,
        )
        self.dims = plan.dims
        group_of = {d: g for g, d in enumerate(self.dims)}
        proj_base = list(itertools.accumulate((b.projection_rows for b in plan.blocks), initial=0))
        group_rows = [0] * len(self.dims)
        stacks: list[list[int]] = [[] for _ in self.dims]  # per width d: the projection rows of its parts
        first_part = [0] * self.num_fields
        # Later part starts of each field, padded with a start no id reaches.
        part_starts = [[_NEVER] * (plan.max_parts_per_field - 1) for _ in range(self.num_fields)]
        groups, shifts, slots = [], [], []
        for k, (f, start, stop, d, b) in enumerate(plan.parts):
            if start == 0:
                first_part[f] = k
            else:
                part_starts[f][k - first_part[f] - 1] = start
            g = group_of[d]
            groups.append(g)
            shifts.append(group_rows[g] - start)  # row in weights[g] = id + shift
            group_rows[g] += stop - start
            if d < D:  # a head of width hi uses all hi rows of its block's projection, a tail the first lo
                slots.append(len(stacks[g]) // d)
                stacks[g].extend(range(proj_base[b], proj_base[b] + d))
            else:
                slots.append(-1)
        self._stack_offsets = list(itertools.accumulate(map(len, stacks), initial=0))
        # Projection entries start N(0, 1/D) and rows of width d < D N(0, s**2 D / d): an output coordinate
        # sum_{j<d} row_j * P_jk then has variance d * (s**2 D / d) * (1/D) = s**2 with s = init_std, and
        # full-width rows (no projection) start at s itself.
        s = self.init_std
        self.weights = nn.ParameterList(
            nn.Parameter(init_rows_(torch.empty(r, d), s if d == D else s * (D / d) ** 0.5))
            for r, d in zip(group_rows, self.dims)
        )
        if proj_base[-1]:
            self.projection = nn.Parameter(torch.empty(proj_base[-1], D).normal_(0.0, D**-0.5))
        else:
            self.register_parameter("projection", None)
        self.register_buffer("field_first_part", torch.tensor(first_part, dtype=torch.int64))
        self.register_buffer(
            "field_part_starts",
            torch.tensor(part_starts, dtype=torch.int64).reshape(self.num_fields, plan.max_parts_per_field - 1),
        )
        self.register_buffer("part_group", torch.tensor(groups, dtype=torch.int64))
        self.register_buffer("part_shift", torch.tensor(shifts, dtype=torch.int64))
        self.register_buffer("part_slot", torch.tensor(slots, dtype=torch.int64))
        self.register_buffer("stack_rows", torch.tensor([r for st in stacks for r in st], dtype=torch.int64))

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # An id's part: its field's first part plus the number of the field's later part starts it reaches (a
        # compare per boundary slot, at most a few: two parts per field unless there are frequency blocks).
        shape = ids.shape
        starts = self.field_part_starts[fields]
        part = self.field_first_part[fields].expand(shape)
        for k in range(starts.shape[-1]):
            part = part + (ids >= starts[..., k])
        part, ids = part.reshape(-1), ids.reshape(-1)
        rows = ids + self.part_shift.index_select(0, part)
        # All projections the forward needs, one gather; each width takes its slice.
        stacks = None if self.projection is None else self.projection.index_select(0, self.stack_rows)
        G = len(self.dims)
        if G == 1:  # one width: no regrouping
            out = self._project(0, rows, part, stacks)
        else:
            # Sort the ids by width once (small keys sort several times faster; there are at most D widths),
            # then one gather + one projection per distinct width: a loop over widths, never over fields.
            group = self.part_group.index_select(0, part).to(torch.uint8 if G <= 256 else torch.int32)
            sorted_group, order = torch.sort(group, stable=True)
            bounds = torch.searchsorted(sorted_group, torch.arange(G + 1, device=ids.device, dtype=group.dtype))
            counts = bounds.diff().tolist()
            chunks = zip(rows.index_select(0, order).split(counts), part.index_select(0, order).split(counts))
            vectors = torch.cat([self._project(g, r, p, stacks) for g, (r, p) in enumerate(chunks)])
            out = _Permute.apply(vectors, order)  # back to input order
        return out.view(*shape, self.embedding_dim)

    def _project(self, g: int, rows: torch.Tensor, part: torch.Tensor, stacks: torch.Tensor | None):
        vectors = self.read_rows(self.weights[g], rows)
        d = self.dims[g]
        if d == self.embedding_dim:
            return vectors
        # The projections of this width's parts, stacked: [num_parts_g * d, D].
        stack = stacks[self._stack_offsets[g] : self._stack_offsets[g + 1]]
        num = stack.shape[0] // d
        if num == 1:
            return vectors @ stack
        slot = self.part_slot.index_select(0, part)
        if num <= self.embedding_dim:
            # Place each id's row in its part's slot of a zero [num * d] vector, so that one dense GEMM against the
            # stack applies every id's own projection; backward is GEMMs too (cost ~ num * d * D per id).
            cols = slot.unsqueeze(1) * d + torch.arange(d, device=rows.device)
            spread = vectors.new_zeros(vectors.shape[0], num * d).scatter(1, cols, vectors)
            return spread @ stack
        # Many parts of one width: gather each id's [d, D] projection instead (cost ~ d * D per id).
        return torch.bmm(vectors.unsqueeze(1), stack.view(num, d, -1)[slot]).squeeze(1)

    @property
    def row_parameters(self) -> tuple[str, ...]:  # one row table per width, served at `precision`
        return tuple(f"weights.{g}" for g in range(len(self.weights)))

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.weights) if self.sparse else []

    budget_keys = ("scale",)

    @classmethod
    def planned_bytes(cls, cardinalities, embedding_dim, *, scale: float, alpha: float = 0.3,
                      blocks_per_field: int = 1, round_dims: bool = False, **options) -> int:
        # The plan's byte count is exact (the hand counts test it against built tables) and needs no module.
        return plan_mixed_dims(as_cardinalities(cardinalities), embedding_dim, scale=scale, alpha=alpha,
                               blocks_per_field=blocks_per_field, round_dims=round_dims).total_bytes

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, *, alpha: float = 0.3, blocks_per_field: int = 1,
                    round_dims: bool = False, **options) -> BudgetKnob:
        """The power-law ``scale``, a real knob. Bytes grow with it, up to small dips (a block's split head
        vanishing at an integer width, a tiny block switching to full width), so the bisection ends on an upward
        step no larger than one row plus one projection row set. Every width is at least 1: budgets under the
        width-1 table (about ``D``x compression) raise :class:`BudgetError` naming that table's bytes."""
        cards = as_cardinalities(cardinalities)
        _check_dim(embedding_dim)
        _check_options(None, alpha, blocks_per_field, round_dims, False)
        plan = plan_mixed_dims(cards, embedding_dim, scale=0.0, alpha=alpha, blocks_per_field=blocks_per_field,
                               round_dims=round_dims)
        # Above this scale every block is at full width D: the largest table.
        least_popular = min(b.popularity for b in plan.blocks)
        return BudgetKnob("scale", 0.0, 2.0 * embedding_dim / least_popular**alpha, lambda x: {"scale": float(x)},
                          integer=False)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, scale={self.scale:.6g}, alpha={self.alpha}, "
            f"blocks_per_field={self.blocks_per_field}, round_dims={self.round_dims}, dims={list(self.dims)}, "
            f"sparse={self.sparse}"
        )
