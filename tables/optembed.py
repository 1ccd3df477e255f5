"""``optembed.v1``: OptEmbed — learnable row pruning and per-field dimension search, then a compact export.

Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction", CIKM 2022.

The table trains in three stages, driven by the pipeline :func:`embcompress.optembed.run_optembed` as an
:class:`~embcompress.optembed.OptEmbedSchedule` says (the search, the thresholds' learning rate and regulariser,
the rewind, the retraining epochs); the benchmark runner calls it through :meth:`OptEmbed.fit_staged`. The table
holds only what shapes its rows and outputs (``threshold``, ``oov``, ``init_std``, ``sparse``) and the export's
``budget_bytes``. Import direction: this module imports :mod:`embcompress.optembed` (the schedule type and the
pipeline its hook calls), and the pipeline never imports this module, so there is no cycle.

1. **Supernet** (``stage == "supernet"``). Rows live in one fused fp32 table. Each field ``f`` has a learnable
   threshold ``t_f`` (or one per row, ``threshold="id"``), initialised to 0. A looked-up row ``e_x`` is kept
   when ``u = ||e_x||_1 - t > 0``; the 0/1 mask passes gradient straight through, scaled by ``2 - 4|u|`` for
   ``|u| <= 0.4``, ``0.4`` for ``0.4 < |u| <= 1`` and 0 beyond (:class:`RowMaskSTE`). The loss gains
   ``alpha * sum(exp(-t))`` (:meth:`OptEmbed.regularization_loss`), which pushes thresholds up; thresholds are
   updated by plain SGD at ``threshold_lr`` (:meth:`OptEmbed.sgd_parameter_groups`); both are the schedule's,
   set by :meth:`OptEmbed.set_threshold_training`. In training, every (sample, field) keeps only its first
   ``d ~ Uniform{1..D}`` dimensions, so every width is trained.
2. **Search**: the supernet is evaluated with fixed per-field widths (:meth:`OptEmbed.set_dims`).
3. **Retrain** (``stage == "retrain"``): :meth:`OptEmbed.freeze` fixes the row mask and the widths; only kept
   rows, truncated to their field's width, reach the model. Thresholds no longer train.

Pruned rows output zeros, or with ``oov="learned"`` one learned vector per field (truncated like the rows).
Rows start at ``N(0, init_std**2)``: OptEmbed needs row norms that begin near the thresholds (the paper's code
gets this from Xavier initialisation of a huge table), because the straight-through gradient is zero for
``|u| > 1``.

:meth:`OptEmbed.export` returns :class:`OptEmbedExport`, the deployable table: only kept rows, each at its
field's width, packed into one fp32 vector, and an id-to-row map. The map is a bitmap over all rows (1 bit per
id) with an int32 count of kept rows before every 64-row block (0.5 bit per id), so a lookup is one rank query:
``block count + popcount of the block's 64-bit word below the id``, the popcount done with word-wide bit
arithmetic (on the CPU, 2.4x faster per lookup than the per-byte popcount table it replaced). With ids ranked by frequency the kept set
is close to a prefix of each field, so a prefix length plus exceptions could be smaller still, but the bitmap's
1.5 bits per id is already under 0.3% of one 16-wide fp32 row (512 bits) and needs no assumption about order;
a dense int32 map would cost 32 bits per id.
"""

from __future__ import annotations

import itertools
from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import (
    BudgetError, CompressedEmbedding, as_cardinalities, check_bool, check_choice, check_number,
)
from embcompress.optembed import OptEmbedSchedule, StagedFit, run_optembed
from embcompress.registry import TABLES, check_table_options

__all__ = ["OptEmbed", "OptEmbedExport", "RowMaskSTE", "ste_scale", "THRESHOLD_MODES", "OOV_MODES", "STAGES"]

THRESHOLD_MODES = ("field", "id")
OOV_MODES = ("zero", "learned")
STAGES = ("supernet", "retrain")
BLOCK = 64  # rows per rank-count block of the export's bitmap


def ste_scale(u: torch.Tensor) -> torch.Tensor:
    """OptEmbed's straight-through gradient factor: ``2 - 4|u|`` for ``|u| <= 0.4``, ``0.4`` up to 1, else 0."""
    a = u.abs()
    return torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1, torch.full_like(a, 0.4), torch.zeros_like(a)))


class RowMaskSTE(torch.autograd.Function):
    """``1[u > 0]`` forward; backward multiplies the incoming gradient by :func:`ste_scale` of ``u``."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        return grad * ste_scale(u)


def _field_bounds(cardinalities: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of each field's rows in the fused row space."""
    ends = list(itertools.accumulate(cardinalities, initial=0))
    return list(zip(ends[:-1], ends[1:]))


def _kept_per_field(mask: torch.Tensor, cardinalities: Sequence[int]) -> list[int]:
    return [int(mask[a:b].sum()) for a, b in _field_bounds(cardinalities)]


_M1, _M2, _M4 = 0x5555555555555555, 0x3333333333333333, 0x0F0F0F0F0F0F0F0F


def _popcount64(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 (SWAR); the masks clear what arithmetic right shifts drag in from the sign bit."""
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def _dim_mask(widths: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """``[..., D]`` 0/1 mask of ``dtype`` (the rows' dtype) keeping the first ``widths[...]`` dimensions."""
    return (torch.arange(dim, device=widths.device) < widths.unsqueeze(-1)).to(dtype)


_DEFAULT_SCHEDULE = OptEmbedSchedule()
# Options of OptEmbed tables saved before the schedule left the constructor (their checkpoints still load):
# they shaped training only, never what the saved rows, thresholds and masks mean.
_OLD_SCHEDULE_OPTIONS = ("threshold_lr", "alpha", "population", "keep", "mutations", "crossovers", "generations",
                         "mutate_prob", "search_rows", "rewind", "retrain_epochs")


@TABLES.register("optembed.v1")
class OptEmbed(CompressedEmbedding):
    """The OptEmbed supernet (and, after :meth:`freeze`, the retraining table).

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` in ``[0, n_f)``.

    Args:
        threshold: ``"field"`` (one threshold per field, as in the paper) or ``"id"`` (one per row).
        oov: what a pruned row outputs: ``"zero"`` or a ``"learned"`` vector per field.
        init_std: standard deviation of the initial rows.
        sparse: sparse row gradients (SparseAdam / sparse Adagrad update only the rows a batch touched).
        budget_bytes: the export's memory budget, used by the dimension search (``None``: no budget).

    How it trains (the search, the thresholds' learning rate and regulariser, the rewind, the retraining
    epochs) is an :class:`~embcompress.optembed.OptEmbedSchedule` (:attr:`schedule_type`), given to
    :meth:`fit_staged`; a suite gives it as the method's ``schedule:`` mapping.

    >>> import torch
    >>> t = OptEmbed([10, 3], 4)
    >>> t(torch.tensor([[9, 2], [0, 0]])).shape
    torch.Size([2, 2, 4])
    >>> _ = t.eval().set_dims([2, 4])   # the supernet evaluated with widths 2 and 4
    >>> bool(t(torch.tensor([[9, 2]]))[0, 0, 2:].eq(0).all())
    True
    >>> t.schedule_type.from_dict({"threshold_lr": 0.3, "generations": 10}).threshold_lr
    0.3
    """

    trains_in_stages: ClassVar[bool] = True
    stochastic_training: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[OptEmbedSchedule]] = OptEmbedSchedule
    # The init, the gradient layout and the search's budget shape training, not what the saved rows,
    # thresholds and masks mean; nor did the schedule options older checkpoints carry.
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "budget_bytes", *_OLD_SCHEDULE_OPTIONS)

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        threshold: str = "field",
        oov: str = "zero",
        init_std: float = 1e-2,
        sparse: bool = False,
        budget_bytes: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.threshold_mode = check_choice("threshold", threshold, THRESHOLD_MODES, owner=self)
        self.oov_mode = check_choice("oov", oov, OOV_MODES, owner=self)
        self.init_std = check_number("init_std", init_std, positive=True, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        # The export's budget: typed here like every option, then whole bytes as the solver's budgets are.
        check_number("budget_bytes", budget_bytes, positive=True, optional=True, owner=self)
        self.budget_bytes = None if budget_bytes is None else self._check_budget(budget_bytes)
        # The thresholds' training (the schedule's; run_optembed sets them): the default schedule's until then.
        self.set_threshold_training(lr=_DEFAULT_SCHEDULE.threshold_lr, alpha=_DEFAULT_SCHEDULE.alpha)

        rows = sum(self.cardinalities)
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim).normal_(0.0, self.init_std))
        self.threshold = nn.Parameter(torch.zeros(self.num_fields if threshold == "field" else rows))
        self.oov = nn.Parameter(torch.zeros(self.num_fields, embedding_dim)) if oov == "learned" else None
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        # Stage state, in the state_dict: 0 = supernet, 1 = retrain; the fixed row mask and per-field widths.
        self.register_buffer("stage_code", torch.zeros((), dtype=torch.int64))
        self.register_buffer("row_mask", torch.ones(rows, dtype=torch.bool))
        self.register_buffer("dims", torch.full((self.num_fields,), embedding_dim, dtype=torch.int64))
        self._stage = STAGES[0]
        self._search_mask: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------ stages
    @property
    def stage(self) -> str:
        # A Python copy of stage_code: reading the buffer every forward would wait for the GPU (and fail on meta).
        return self._stage

    def loaded_state_(self) -> None:
        if self.stage_code.device.type != "meta":  # the stage follows the loaded stage_code, read once per load
            self._stage = STAGES[int(self.stage_code)]

    def set_dims(self, dims: Sequence[int] | torch.Tensor) -> "OptEmbed":
        """Fix the width of each field for evaluation (and for retraining once frozen)."""
        dims = torch.as_tensor(list(dims) if not isinstance(dims, torch.Tensor) else dims, dtype=torch.int64)
        if dims.shape != (self.num_fields,):
            raise ValueError(f"dims must hold one width per field ({self.num_fields}), got shape {list(dims.shape)}")
        if bool(((dims < 1) | (dims > self.embedding_dim)).any()):
            raise ValueError(f"dims must lie in [1, {self.embedding_dim}], got {dims.tolist()}")
        self.dims.copy_(dims.to(self.dims.device))
        return self

    def set_search_mask(self, mask: torch.Tensor | None) -> "OptEmbed":
        """Evaluate the supernet with these rows kept instead of the thresholds' (``None``: the thresholds'
        again); the search of ``prune="budget"`` sets it. Training ignores it."""
        if mask is not None and mask.shape != self.row_mask.shape:
            raise ValueError(f"mask must have shape {list(self.row_mask.shape)}, got {list(mask.shape)}")
        self._search_mask = None if mask is None else mask.to(device=self.row_mask.device, dtype=torch.bool)
        return self

    @torch.no_grad()
    def current_row_mask(self) -> torch.Tensor:
        """``BoolTensor[sum(n_f)]``: the rows the thresholds keep now (``||e||_1 > t``)."""
        if self.stage == "retrain":
            return self.row_mask.clone()
        return self.weight.abs().sum(-1) - self._row_thresholds() > 0

    def _row_thresholds(self) -> torch.Tensor:
        if self.threshold_mode == "id":
            return self.threshold
        return torch.repeat_interleave(self.threshold, torch.tensor(self.cardinalities, device=self.weight.device))

    @torch.no_grad()
    def freeze(self, dims: Sequence[int] | torch.Tensor, row_mask: torch.Tensor | None = None) -> "OptEmbed":
        """Enter the retrain stage: fix the row mask (default: the thresholds' current one) and the widths."""
        mask = self.current_row_mask() if row_mask is None else row_mask.to(torch.bool)
        if mask.shape != self.row_mask.shape:
            raise ValueError(f"row_mask must have shape {list(self.row_mask.shape)}, got {list(mask.shape)}")
        self.set_dims(dims)
        self.row_mask.copy_(mask)
        self.stage_code.fill_(1)
        self._stage = STAGES[1]
        self.threshold.requires_grad_(False)
        return self

    def kept_per_field(self, row_mask: torch.Tensor | None = None) -> list[int]:
        """Kept rows of each field under ``row_mask`` (default: :meth:`current_row_mask`)."""
        return _kept_per_field(self.current_row_mask() if row_mask is None else row_mask, self.cardinalities)

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        e = F.embedding(rows, self.weight, sparse=self.sparse)
        if self.stage == "supernet" and not self.training and self._search_mask is not None:
            keep = self._search_mask[rows].to(e.dtype)  # a search scoring the rows a budget keeps
            widths = self.dims[fields].expand_as(rows)
        elif self.stage == "supernet":
            t = self.threshold[rows] if self.threshold_mode == "id" else self.threshold[fields].expand_as(rows)
            keep = RowMaskSTE.apply(e.abs().sum(-1) - t)
            if self.training:
                widths = torch.randint(1, self.embedding_dim + 1, rows.shape, device=rows.device)
            else:
                widths = self.dims[fields].expand_as(rows)
        else:
            keep = self.row_mask[rows].to(e.dtype)
            widths = self.dims[fields].expand_as(rows)
        out = e * keep.unsqueeze(-1)
        if self.oov is not None:
            out = out + (1 - keep).unsqueeze(-1) * self.oov[fields].expand(*rows.shape, -1)
        return out * _dim_mask(widths, self.embedding_dim, e.dtype)

    # ------------------------------------------------------------------------------------------ training hooks
    def set_threshold_training(self, *, lr: float, alpha: float) -> "OptEmbed":
        """Train the thresholds by plain SGD at ``lr`` under the regulariser ``alpha * sum(exp(-t))`` (in the
        supernet stage; :func:`~embcompress.optembed.run_optembed` sets the schedule's ``threshold_lr`` and
        ``alpha`` here)."""
        self.threshold_lr = check_number("threshold_lr", lr, positive=True, owner=self)
        self.alpha = check_number("alpha", alpha, lo=0, owner=self)
        return self

    def regularization_loss(self) -> torch.Tensor | None:
        if self.stage != "supernet" or self.alpha == 0:
            return None
        return self.alpha * torch.exp(-self.threshold).sum()

    def sgd_parameter_groups(self) -> list[dict]:
        return [{"params": [self.threshold], "lr": self.threshold_lr}] if self.stage == "supernet" else []

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    # -------------------------------------------------------------------------------------------- budget/export
    @classmethod
    def from_budget(cls, cardinalities: int | Sequence[int], embedding_dim: int, *, budget_bytes: int,
                    **options) -> "OptEmbed":
        """The supernet stores every row; the budget is met by the export, through the dimension search.

        ``options`` are the constructor's other options, checked against its signature. Raises
        :class:`BudgetError` when even an export that keeps no row (the id map alone) is over budget. The
        export's budget is at most the full table's bytes (:meth:`budget_ceiling`).
        """
        check_table_options(cls, {**options, "budget_bytes": budget_bytes}, f"{cls.registry_name}.from_budget")
        budget = min(cls._check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        cards = as_cardinalities(cardinalities, owner=cls)
        floor = OptEmbedExport.storage_bytes(cards, embedding_dim, [0] * len(cards), [1] * len(cards),
                                             learned_oov=options.get("oov") == "learned")
        if floor > budget:
            raise BudgetError(f"{cls.registry_name}: the export's id map alone needs {floor:,} bytes, over the "
                              f"budget of {budget:,} bytes (minimum budget {floor:,})")
        return cls(cardinalities, embedding_dim, budget_bytes=budget, **options)

    def export_bytes(self, dims: Sequence[int], kept: Sequence[int] | None = None) -> int:
        """Exact bytes :meth:`export` stores with these widths and kept rows per field (see :class:`OptEmbedExport`)."""
        kept = self.kept_per_field() if kept is None else kept
        return OptEmbedExport.storage_bytes(self.cardinalities, self.embedding_dim, kept, dims,
                                            learned_oov=self.oov is not None)

    def serving_bytes(self) -> int:
        """Exact bytes of the export :meth:`export` would make now: the rows the thresholds keep now (in the
        retrain stage, the frozen mask), each field at its width in ``dims``.

        Before a search has set the widths, ``dims`` is the full width ``D`` of every field, so a supernet serves
        its kept rows at full width (what :meth:`export` makes of it then); the search only lowers this. On the
        ``meta`` device there are no values to read a mask or widths from: a fresh table's export, every row at
        full width (thresholds start at 0, so a fresh supernet keeps every row whose norm is not exactly 0).
        """
        if self.weight.device.type == "meta":
            return self.export_bytes([self.embedding_dim] * self.num_fields, list(self.cardinalities))
        return self.export_bytes(self.dims.tolist())

    def min_export_bytes(self, kept: Sequence[int] | None = None) -> int:
        return self.export_bytes([1] * self.num_fields, kept)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "OptEmbedExport":
        """The compact inference table; it outputs exactly what this table outputs in eval mode (fp32 rows only)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 rows, got precision={precision!r}")
        mask = self.current_row_mask()
        return OptEmbedExport.from_rows(
            self.cardinalities, self.embedding_dim, self.weight.detach(), mask, self.dims.tolist(),
            oov=None if self.oov is None else self.oov.detach(), field_names=self.field_names,
        )

    def fit_staged(self, model: nn.Module, data, cfg, schedule: OptEmbedSchedule | None = None) -> StagedFit:
        """Run supernet training, search, retraining and export on ``model`` (which holds this table), as
        ``schedule`` says (``None``: the default :class:`~embcompress.optembed.OptEmbedSchedule`): the staged
        hook of the contract, :func:`embcompress.optembed.run_optembed` with this table."""
        return run_optembed(model, self, data, cfg, schedule)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, stage={self.stage}, threshold={self.threshold_mode!r}, "
                f"oov={self.oov_mode!r}, budget_bytes={self.budget_bytes}")


class OptEmbedExport(CompressedEmbedding):
    """Deployable OptEmbed table: kept rows only, each at its field's width, and a bitmap id-to-row map.

    Stored tensors: ``values`` fp32 ``[sum_f kept_f * d_f]``; ``bitmap`` uint8 ``[8 * ceil(N / 64)]`` (bit ``r`` of
    the fused row space ``id + offset_f`` set when the row is kept); ``block_rank`` int32 ``[ceil(N / 64)]``
    (kept rows before each 64-row block); int64 ``[F]`` ``offsets``, ``dims`` and
    ``base`` (where field ``f``'s rows start in ``values``, less ``rank_start_f * d_f``); with a learned OOV
    vector, ``oov`` fp32 ``[F, D]``. Output widths beyond ``d_f`` are zeros.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``.
    """

    registry_name: ClassVar[str] = "optembed.v1 (export)"

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int, *, kept: Sequence[int] | None = None,
                 dims: Sequence[int] | None = None, learned_oov: bool = False) -> None:
        super().__init__(cardinalities, embedding_dim)
        kept = list(self.cardinalities) if kept is None else [int(k) for k in kept]
        dims = [embedding_dim] * self.num_fields if dims is None else [int(d) for d in dims]
        rows = sum(self.cardinalities)
        blocks = -(-rows // BLOCK)
        self.register_buffer("values", torch.zeros(sum(k * d for k, d in zip(kept, dims)) + embedding_dim))
        self.register_buffer("bitmap", torch.zeros(blocks * BLOCK // 8, dtype=torch.uint8))
        self.register_buffer("block_rank", torch.zeros(blocks, dtype=torch.int32))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("dims", torch.tensor(dims, dtype=torch.int64))
        starts = list(itertools.accumulate((k * d for k, d in zip(kept, dims)), initial=0))[:-1]
        rank_starts = list(itertools.accumulate(kept, initial=0))[:-1]
        self.register_buffer("base", torch.tensor([s - r * d for s, r, d in zip(starts, rank_starts, dims)],
                                                  dtype=torch.int64))
        self.register_buffer("oov", torch.zeros(self.num_fields, embedding_dim) if learned_oov else None)

    @staticmethod
    def storage_bytes(cardinalities: Sequence[int], embedding_dim: int, kept: Sequence[int], dims: Sequence[int],
                      *, learned_oov: bool = False) -> int:
        """Bytes of an export with these kept rows and widths, from the layout in the class docstring."""
        blocks = -(-sum(cardinalities) // BLOCK)
        num_fields = len(cardinalities)
        packed = sum(int(k) * int(d) for k, d in zip(kept, dims)) + embedding_dim
        return (4 * packed + blocks * BLOCK // 8 + 4 * blocks
                + 3 * 8 * num_fields + (4 * num_fields * embedding_dim if learned_oov else 0))

    @classmethod
    @torch.no_grad()
    def from_rows(cls, cardinalities, embedding_dim: int, weight: torch.Tensor, row_mask: torch.Tensor,
                  dims: Sequence[int], *, oov: torch.Tensor | None = None, field_names=None) -> "OptEmbedExport":
        """Pack the kept rows of a fused ``[sum(n_f), D]`` table, field ``f`` truncated to ``dims[f]``."""
        cards = as_cardinalities(cardinalities, owner=cls)
        mask = row_mask.to(torch.bool).cpu()
        kept = _kept_per_field(mask, cards)
        table = cls(cardinalities, embedding_dim, kept=kept, dims=dims, learned_oov=oov is not None)
        weight = weight.detach().cpu()
        packed = torch.cat([weight[a:b][mask[a:b], :d].reshape(-1) for (a, b), d in zip(_field_bounds(cards), dims)])
        table.values[: packed.numel()] = packed
        padded = torch.zeros(table.block_rank.numel() * BLOCK, dtype=torch.bool)
        padded[: mask.numel()] = mask
        bits = padded.view(-1, 8).to(torch.uint8) << torch.arange(8, dtype=torch.uint8)
        table.bitmap.copy_(bits.sum(-1).to(torch.uint8))
        per_block = padded.view(-1, BLOCK).sum(-1)
        table.block_rank.copy_((torch.cumsum(per_block, 0) - per_block).to(torch.int32))
        if oov is not None:
            table.oov.copy_(oov)
        if field_names is not None:
            table.set_field_names(field_names)
        return table

    def _rank(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept flag, number of kept rows before ``rows``) from the bitmap."""
        # Each 64-row block is 8 bitmap bytes = one little-endian int64 word whose bit r is row 64 * block + r.
        block, pos = rows // BLOCK, rows % BLOCK
        word = self.bitmap.view(torch.int64)[block]
        below = _popcount64(word & ((1 << pos) - 1))  # pos = 63: 1 << 63 wraps to int64 min, minus 1 = low 63 bits
        return ((word >> pos) & 1).bool(), self.block_rank[block].long() + below

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        fields = fields.expand_as(ids)
        rows = ids + self.offsets[fields]
        kept, rank = self._rank(rows)
        width = self.dims[fields]
        cols = torch.arange(self.embedding_dim, device=ids.device)
        valid = (cols < width.unsqueeze(-1)) & kept.unsqueeze(-1)
        # Row i of this overlapping view is values[i : i + D]: one row gather reads every id's run of floats
        # (on the CPU 9x faster than gathering D scattered floats per id); columns past the field's width are masked.
        runs = self.values.as_strided((self.values.numel() - self.embedding_dim + 1, self.embedding_dim), (1, 1))
        start = self.base[fields] + rank * width
        out = runs.index_select(0, start.reshape(-1)).view(*start.shape, self.embedding_dim) * valid
        if self.oov is not None:
            fill = self.oov[fields] * (cols < width.unsqueeze(-1))
            out = out + (~kept).unsqueeze(-1) * fill
        return out

    @classmethod
    def from_state_dict(cls, state: dict, cardinalities, embedding_dim: int) -> "OptEmbedExport":
        """Rebuild a saved export (its sizes are read from the saved widths and bitmap)."""
        # Exports saved before 2026-11-28 carry a popcount table and no trailing zeros.
        state = {k: v for k, v in state.items() if k != "popcount"}
        cards = as_cardinalities(cardinalities, owner=cls)
        bits = ((state["bitmap"].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1).bool()
        kept = _kept_per_field(bits, cards)
        table = cls(cardinalities, embedding_dim, kept=kept, dims=state["dims"].tolist(),
                    learned_oov=state.get("oov") is not None)
        short = table.values.numel() - state["values"].numel()
        if short == embedding_dim:
            state["values"] = torch.cat([state["values"], state["values"].new_zeros(short)])
        table.load_state_dict(state)
        return table

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int):
        raise BudgetError("an OptEmbed export is made by the OptEmbed pipeline and cannot compress on its own")
