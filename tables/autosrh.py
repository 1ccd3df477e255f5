"""``autosrh.v1``: AutoSrh — learn a soft selection weight per (value, dimension group), prune the weakest, retrain.

Kong et al., "AutoSrh: An Embedding Dimensionality Search Framework for Tabular Data Prediction", IEEE TKDE 2022,
as the VLDB 2024 embedding-compression benchmark (Hetu's ``tools/EmbeddingMemoryCompression``) runs it: ``nsplit
= 6`` groups and an L1 weight ``alpha_l1 = 1e-5`` on the selection weights.

The table. Every id of every field has its own fp32 row of width ``D``; the fields' rows are fused into one
``[N, D]`` weight (``N = sum_f n_f``, row ``offsets[f] + x``), as in ``full.v1``. The ``D`` dimensions are cut
into ``G = groups`` contiguous dimension groups (default ``min(6, D)``, the benchmark's 6): when ``G`` does not
divide ``D`` the first ``D mod G`` groups are one dimension wider, ``ceil(D / G)`` against ``floor(D / G)`` (at
D=16, G=6: widths 3, 3, 3, 3, 2, 2). Each (value, group) pair has a learnable selection weight, ``alpha [N, G]``,
and a value's vector is its row scaled group by group::

    e(x)[d] = weight[r, d] * alpha[r, group(d)]          (r = offsets[f] + x)

Stages (:meth:`AutoSrhEmbedding.fit_staged`, as an :class:`AutoSrhSchedule` says):

1. **Search.** Rows and alphas train jointly; the table adds ``alpha_l1 * sum |alpha[r, g]|`` over the rows ``r``
   the batch touched (each once, every group) to the loss (:meth:`~AutoSrhEmbedding.regularization_loss`), so a
   pair whose group does not pay for itself shrinks. Touched rows only, never the whole table each step, so the
   cost follows the batch (and ``sparse=True`` keeps sparse gradients for both tensors).
2. **Prune** (:meth:`~AutoSrhEmbedding.prune_`). All ``N G`` pairs are ranked by ``|alpha|`` (ties: the lower
   row, then the lower group, first); the most important are kept as long as the served budget of ``K =
   kept_numbers`` numbers allows (a pair costs its group's width). The alphas are **folded into the weights**
   (``weight *= alpha`` per group, the product the search stage returned, bit for bit) and dropped, and the
   pruned groups are zeroed; a uint8 ``keep [N, G]`` mask remembers which pairs stay.
3. **Retrain** the kept numbers with the mask fixed: the forward pass returns ``weight`` where ``keep`` holds and
   ``+0.0`` elsewhere, so a pruned group contributes nothing and gets no gradient.

Held while training. Search: ``weight`` fp32 ``[N, D]``, ``alpha`` fp32 ``[N, G]``, int64 ``offsets [F]`` and an
empty ``keep``::

    search bytes  = 4 N D + 4 N G + 8 F            (Adam adds two moments of each: 8 N D + 8 N G, and its steps)
    retrain bytes = 4 N D + N G + 8 F              (the alphas folded away, the uint8 mask kept; Adam: 8 N D)

Served (:meth:`~AutoSrhEmbedding.export`, :class:`AutoSrhExport`): the kept numbers as a
:class:`~embcompress.sparse_rows.SparseRows` of ``[N, D]`` in whichever of CSR, COO and bitmap is smallest, and the
int64 field offsets. With ``k`` stored numbers, ``c`` the bytes of the smallest unsigned dtype holding a column
(uint8 up to 256 columns), ``r`` those holding a row and ``p`` those of a pointer (int32 up to ``2**31 - 1``
numbers)::

    serving bytes = min( p (N + 1) + (c + 4) k,                      CSR
                         (r + c + 4) k,                              COO
                         p (N + 1) + N ceil(D / 8) + 4 k )  + 8 F    bitmap

(:func:`~embcompress.sparse_rows.smallest_format`). A value keeps whole dimension groups, so most rows keep several
numbers and the bitmap (or CSR) usually wins. A lookup is ``r = offsets[f] + x`` and one dense row gathered from
the sparse rows.

Design choices:

* **The knob is the kept numbers, not the kept pairs.** Bytes follow numbers, and with unequal group widths (the
  default D=16, G=6) a count of pairs does not fix them: ``K`` pairs hold between ``2K`` and ``3K`` numbers.
  :meth:`~AutoSrhEmbedding.from_budget` solves the largest ``K = kept_numbers`` whose served bytes (the formula
  with ``k = K``) fit the budget, through the shared solver, before anything trains. The prune then walks the
  pairs in ``|alpha|`` order, keeping each that still fits in what is left of ``K`` (a wide pair that does not fit
  lets the next narrower one in), so it keeps exactly ``K`` numbers, or ``K - 1`` when only a 1-number gap is
  left that no pair fills. With equal widths ``w`` it keeps exactly the ``floor(K / w)`` largest pairs.
  :meth:`~AutoSrhEmbedding.serving_bytes` is planned (``k = K``) until the prune and counted off the pruned table
  after: at most the planned bytes (less where a kept number trained to exactly 0, which sparse rows do not store).
* **The minimum budget is one pair of the narrowest group**: ``smallest_format(N, D, w_min) + 8 F`` (COO). On the
  default synthetic data (``N = 51,384`` ids in 26 fields, D=16, G=6, ``w_min = 2``): ``2 * (4 + 1 + 4) + 208 =
  226`` bytes, about 14,550x; budgets from 2x to 1000x all build, and under 226 bytes
  :class:`~embcompress.contract.BudgetError` names the minimum.
* **Alphas are folded, not frozen.** After the prune the table holds only what it serves (plus the mask), its
  outputs at the start of retraining are those of the search stage for every kept group, bit for bit, and the
  retrained weights are the served values: :meth:`~AutoSrhEmbedding.export`'s outputs equal the retrained table's
  eval-mode outputs bit for bit (eval mode adds ``+0.0``, so a kept weight that trained to ``-0.0`` reads ``+0.0``,
  as the sparse rows, which store no zero, return it).
* **The L1 term in a process group** is computed over the union of every rank's touched rows (gathered once a
  step), so each rank adds the same term and DDP's average of its gradient is the single-process gradient.
* **Differences from the reference.** The benchmark's code learns one alpha per (frequency group of values,
  dimension): ``nsplit = 6`` there splits the *values* by frequency, and every dimension has its own weight, with
  the alphas clipped to ``[0, 1]`` and updated on their own step by normalised-gradient SGD at ``alpha_lr``; after
  retraining it zeroes single numbers by magnitude of ``weight * alpha`` to a target sparsity. Here, as the
  paper's per-value search and its budget ask, every value has its own alpha per dimension *group*, the alphas
  train with the rows under the run's optimizer (the L1 term is their only pull), and the prune is decided before
  retraining, by the budget, in whole groups, so retraining adapts to the mask that is served.

Initialisation: rows are ``N(0, init_std**2)`` and alphas start at 1, so the returned vectors are the rows: their
std is ``init_std``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.budget import check_budget
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_number,
    check_positive_int, init_rows_, resolve_init_std,
)
from embcompress.optembed import StagedFit
from embcompress.process_group import gather_rows, is_distributed
from embcompress.registry import TABLES
from embcompress.tables.sparse_export import SparseExport
from embcompress.sparse_rows import smallest_format
from embcompress.schedule import StagedSchedule, check_staged_start, train_compress_retrain

__all__ = ["AutoSrhEmbedding", "AutoSrhExport", "AutoSrhSchedule", "group_widths", "select_pairs", "served_bytes",
           "DEFAULT_GROUPS", "ALPHA_L1"]

DEFAULT_GROUPS = 6  # the benchmark's nsplit
ALPHA_L1 = 1e-5  # the benchmark's alpha_l1
_COMPACT_AFTER = 16  # touched-row batches kept before they are merged (a training loop that never reads them)


def group_widths(dim: int, groups: int) -> tuple[int, ...]:
    """Widths of ``groups`` contiguous dimension groups of ``dim``: the first ``dim mod groups`` are one wider.

    >>> group_widths(16, 6), group_widths(16, 4), group_widths(5, 5)
    ((3, 3, 3, 3, 2, 2), (4, 4, 4, 4), (1, 1, 1, 1, 1))
    """
    dim = check_positive_int("embedding_dim", dim, owner="group_widths")
    groups = check_int("groups", groups, lo=1, hi=dim, owner="group_widths")
    base, extra = divmod(dim, groups)
    return tuple(base + 1 if g < extra else base for g in range(groups))


def served_bytes(rows: int, dim: int, num_fields: int, kept: int) -> int:
    """Exact bytes of the served table keeping ``kept`` numbers of ``[rows, dim]``: the smallest sparse format
    (:func:`~embcompress.sparse_rows.smallest_format`) and ``num_fields`` int64 offsets."""
    return smallest_format(rows, dim, kept)[1] + 8 * num_fields


@torch.no_grad()
def select_pairs(alpha: torch.Tensor, widths: Sequence[int], kept_numbers: int) -> tuple[torch.Tensor, int]:
    """``(keep, numbers)``: the (row, group) pairs of ``alpha [N, G]`` kept within ``kept_numbers`` numbers.

    Pairs are taken in decreasing ``|alpha|`` (ties: row-major order, the lower row first); each pair that still
    fits in what is left of the budget (its group's width, ``widths[g]``) is kept, one that does not is skipped,
    so a narrower pair further down may fill the rest. ``keep`` is a bool ``[N, G]``; ``numbers`` the numbers kept
    (at most ``kept_numbers``).

    >>> a = torch.tensor([[0.9, 0.1], [0.5, 0.7]])
    >>> keep, n = select_pairs(a, (2, 1), 4)   # 0.9 (2 numbers) fits, 0.7 (1) fits, 0.5 (2) does not, 0.1 (1) does
    >>> keep.tolist(), n
    ([[True, True], [False, True]], 4)
    """
    rows, groups = alpha.shape
    if len(widths) != groups:
        raise ValueError(f"select_pairs: {len(widths)} widths for {groups} groups")
    keep = torch.zeros(rows * groups, dtype=torch.bool, device=alpha.device)
    if kept_numbers <= 0 or keep.numel() == 0:
        return keep.view(rows, groups), 0
    order = torch.sort(alpha.detach().abs().flatten(), descending=True, stable=True).indices
    width = torch.tensor(list(widths), dtype=torch.int64, device=alpha.device)[order % groups]
    cum = torch.cumsum(width, 0)
    prefix = int(torch.searchsorted(cum, torch.tensor([kept_numbers], device=cum.device), right=True)[0])
    taken = [order[:prefix]]
    left = kept_numbers - (int(cum[prefix - 1]) if prefix else 0)
    start, narrowest = prefix, min(widths)
    while left >= narrowest and start < order.numel():  # fill the rest with the next pairs that fit
        fits = (width[start:] <= left).nonzero()
        if fits.numel() == 0:
            break
        j = start + int(fits[0, 0])
        taken.append(order[j:j + 1])
        left -= int(width[j])
        start = j + 1
    keep[torch.cat(taken)] = True
    return keep.view(rows, groups), kept_numbers - left


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class AutoSrhSchedule(StagedSchedule):
    """How :meth:`AutoSrhEmbedding.fit_staged` trains an AutoSrh table.

    Args:
        search_epochs: epochs of rows and alphas with the L1 term (``None``: the run's ``TrainConfig.epochs``).
        retrain_epochs: epochs of the pruned table, the mask fixed (``None``: the run's ``TrainConfig.epochs``).
        alpha_l1: the L1 weight on the touched alphas in the search stage (the benchmark's ``1e-5``); 0 turns it off.

    >>> AutoSrhSchedule.from_dict({"search_epochs": 2, "alpha_l1": 1e-4}).alpha_l1
    0.0001
    >>> AutoSrhSchedule(alpha_l1=-1)
    Traceback (most recent call last):
        ...
    ValueError: AutoSrhSchedule: alpha_l1 must be a finite number >= 0, got -1
    """

    search_epochs: int | None = None
    retrain_epochs: int | None = None
    alpha_l1: float = ALPHA_L1

    def __post_init__(self) -> None:
        owner = "AutoSrhSchedule"
        checked = {
            "search_epochs": check_positive_int("search_epochs", self.search_epochs, optional=True, owner=owner),
            "retrain_epochs": check_positive_int("retrain_epochs", self.retrain_epochs, optional=True, owner=owner),
            "alpha_l1": check_number("alpha_l1", self.alpha_l1, lo=0, owner=owner),
        }
        self._store(checked)


    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "AutoSrhSchedule":
        """A schedule from a suite's plain mapping; absent keys keep their defaults (``None`` or ``{}``: the
        default schedule). An unknown key or a bad value raises :class:`~embcompress.specs.SpecError` naming
        ``where``, the key and the value.

        >>> AutoSrhSchedule.from_dict({"retrain_epoch": 3}, "methods[3].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[3].schedule: unknown key 'retrain_epoch'; did you mean 'retrain_epochs', 'search_epochs'? (accepted keys: search_epochs, retrain_epochs, alpha_l1)
        """
        return super().from_dict(mapping, where)


# ----------------------------------------------------------------------------------------------------- table
@TABLES.register("autosrh.v1")
class AutoSrhEmbedding(CompressedEmbedding):
    """Rows scaled by a learnable weight per (value, dimension group), pruned to whole groups (module docstring).

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored while searching: ``weight`` fp32 ``[N, D]`` (``N = sum_f n_f``), ``alpha`` fp32 ``[N, G]``, int64
    ``offsets [F]`` and an empty uint8 ``keep [0, G]``; after :meth:`prune_`: ``weight`` (the alphas folded in,
    pruned groups zero), an empty ``alpha [0, G]``, ``keep`` uint8 ``[N, G]`` (1: the pair is kept) and
    ``offsets``. :meth:`serving_bytes` is the export's: planned with ``k = kept_numbers`` before the prune,
    counted off the pruned table after.

    Args:
        kept_numbers: ``K``, the most numbers the served table keeps (``None``: every number); solved by
            :meth:`from_budget`. At least the narrowest group's width.
        groups: ``G``, dimension groups per row, ``1 <= G <= D`` (``None``: ``min(6, D)``, the benchmark's 6).
        sparse: sparse gradients for ``weight`` and ``alpha`` (use with ``torch.optim.SparseAdam``).
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = AutoSrhEmbedding([10, 6], 4, kept_numbers=20, groups=2)     # 16 rows, groups of 2 dimensions
    >>> ids = torch.tensor([[9, 5], [0, 1]])
    >>> t(ids).shape, t.alpha.shape
    (torch.Size([2, 2, 4]), torch.Size([16, 2]))
    >>> t.memory_report().total_bytes == 16 * 4 * 4 + 16 * 2 * 4 + 2 * 8   # weight, alpha, offsets
    True
    >>> t.serving_bytes() == 20 * (1 + 1 + 4) + 2 * 8   # planned: COO, uint8 row and column, fp32 value
    True
    >>> stats = t.prune_()                               # the 10 pairs of largest |alpha| (all 1 here: the first)
    >>> stats["kept_pairs"], stats["kept_numbers"], int(t.keep.sum())
    (10, 20, 10)
    >>> served = t.export()
    >>> served.format, torch.equal(served(ids), t.eval()(ids)), served.memory_report().total_bytes == t.serving_bytes()
    ('coo', True, True)
    """

    trains_in_stages: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[AutoSrhSchedule]] = AutoSrhSchedule
    budget_keys: ClassVar[tuple[str, ...]] = ("kept_numbers",)
    #: The budget :meth:`from_budget` built the table to (``None`` when built directly); the served table's.
    budget_bytes: int | None = None

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        kept_numbers: int | None = None,
        groups: int | None = None,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        groups = check_int("groups", groups, lo=1, hi=embedding_dim, optional=True, owner=self)
        self.groups = min(DEFAULT_GROUPS, embedding_dim) if groups is None else groups
        self.widths = group_widths(embedding_dim, self.groups)
        rows = sum(self.cardinalities)
        self.total_numbers = rows * embedding_dim
        kept = check_int("kept_numbers", kept_numbers, lo=min(self.widths), hi=self.total_numbers, optional=True,
                         owner=self)
        self.kept_numbers = self.total_numbers if kept is None else kept
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.alpha_l1 = ALPHA_L1
        self.weight = nn.Parameter(init_rows_(torch.empty(rows, embedding_dim), self.init_std))
        self.alpha = nn.Parameter(torch.ones(rows, self.groups))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        # Empty until prune_: the stage is read off its shape, never off values (no device sync, works on meta).
        # uint8, not bool: DDP broadcasts buffers, and uint8 is a dtype every backend takes.
        self.register_buffer("keep", torch.empty(0, self.groups, dtype=torch.uint8))
        self._kept = self.total_numbers  # numbers the table keeps now (host-side: set by the prune and by loads)
        self._touched: list[torch.Tensor] = []  # rows the training forward passes read since the L1 term was taken
        self._group_of_dim: dict[torch.device, torch.Tensor] = {}

    # ------------------------------------------------------------------------------------------------ state
    @property
    def pruned(self) -> bool:
        """True after :meth:`prune_` (or a load of a pruned checkpoint): the table serves what it holds."""
        return self.keep.shape[0] > 0

    @property
    def kept(self) -> int:
        """Numbers the table keeps now (every number before the prune)."""
        return self._kept

    def set_alpha_l1(self, alpha_l1: float) -> "AutoSrhEmbedding":
        """The L1 weight of the search stage's term (:data:`ALPHA_L1` until set; fit_staged sets the schedule's)."""
        self.alpha_l1 = check_number("alpha_l1", alpha_l1, lo=0, owner=self)
        return self

    def _groups_index(self, device: torch.device) -> torch.Tensor:
        # The group of each dimension, cached per device (configuration, not stored state: not a buffer).
        if device not in self._group_of_dim:
            self._group_of_dim[device] = torch.repeat_interleave(
                torch.arange(self.groups), torch.tensor(self.widths)).to(device)
        return self._group_of_dim[device]

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        out = F.embedding(rows, self.weight, sparse=self.sparse)
        group = self._groups_index(out.device)
        if not self.pruned:
            if self.training and torch.is_grad_enabled() and self.alpha_l1 > 0:
                self._record(rows)
            alpha = F.embedding(rows, self.alpha, sparse=self.sparse)
            return out * alpha.index_select(-1, group)
        keep = self.keep[rows].index_select(-1, group).bool()
        out = torch.where(keep, out, 0.0)  # pruned groups: +0.0 and no gradient
        return out if self.training else out + 0.0  # eval: -0.0 reads +0.0, as the sparse rows return it

    def _record(self, rows: torch.Tensor) -> None:
        self._touched.append(rows.detach().reshape(-1))
        if len(self._touched) > _COMPACT_AFTER:  # bounded by the table's rows, whoever reads the term
            self._touched = [torch.unique(torch.cat(self._touched))]

    def regularization_loss(self) -> torch.Tensor | None:
        """The search stage's ``alpha_l1 * sum |alpha[r, g]|`` over the rows ``r`` read by the training forward
        passes since the last call (each row once, all its groups), then forgotten; ``None`` once pruned or with
        ``alpha_l1 = 0``. In a process group the rows of every rank are gathered first (a collective: every rank
        calls it, as the training loop does), so every rank adds the same term."""
        touched, self._touched = self._touched, []
        if self.pruned or self.alpha_l1 == 0:
            return None
        rows = torch.cat(touched) if touched else self.offsets.new_zeros(0)
        if is_distributed():
            rows = gather_rows(rows)
        rows = torch.unique(rows)
        return self.alpha_l1 * F.embedding(rows, self.alpha, sparse=self.sparse).abs().sum()

    def sparse_parameters(self) -> list[nn.Parameter]:
        if not self.sparse:
            return []
        return [self.weight] if self.pruned else [self.weight, self.alpha]

    def undecayed_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]  # its L1 is the search's own term (alpha_l1)

    # --------------------------------------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune_(self) -> dict:
        """Keep the (value, group) pairs of largest ``|alpha|`` within ``kept_numbers`` numbers
        (:func:`select_pairs`), fold the alphas into the weights, zero the pruned groups and drop the alphas
        (stage 2). Returns ``{"pairs", "kept_pairs", "kept_numbers", "sparsity", "field_mean_width",
        "group_kept_fraction", "alpha_abs_mean", "alpha_moved"}``: the last two over all pairs before the prune
        (mean ``|alpha|``, and the fraction no longer at its initial 1)."""
        if self.pruned:
            raise ValueError(f"{self._owner_name()}: the table is pruned already")
        if self.weight.device.type == "meta":
            raise ValueError(f"{self._owner_name()}: a table on the meta device holds no values to prune")
        alpha = self.alpha.detach()
        if not bool(torch.isfinite(alpha).all()):
            raise ValueError(f"{self._owner_name()}: the alphas hold non-finite values; nothing to rank")
        keep, numbers = select_pairs(alpha, self.widths, self.kept_numbers)
        group = self._groups_index(alpha.device)
        stats = {"pairs": alpha.numel(), "alpha_abs_mean": float(alpha.abs().mean()),
                 "alpha_moved": float((alpha != 1).float().mean())}
        self.weight.mul_(alpha.index_select(-1, group))  # the search stage's vectors, bit for bit
        self.weight.masked_fill_(~keep.index_select(-1, group), 0.0)
        self.alpha = nn.Parameter(alpha.new_empty(0, self.groups), requires_grad=False)
        self.keep = keep.to(torch.uint8)
        self._touched = []
        self._kept = numbers
        per_row = (keep.to(torch.float64) * torch.tensor(self.widths, dtype=torch.float64, device=keep.device)).sum(1)
        cards = torch.tensor(self.cardinalities, device=keep.device)
        field = torch.repeat_interleave(torch.arange(self.num_fields, device=keep.device), cards)
        per_field = torch.zeros(self.num_fields, dtype=torch.float64, device=keep.device).index_add_(0, field, per_row)
        stats.update({
            "kept_pairs": int(keep.sum()), "kept_numbers": numbers, "sparsity": 1.0 - numbers / self.total_numbers,
            "field_mean_width": [round(v, 4) for v in (per_field / cards).tolist()],
            "group_kept_fraction": [round(v, 4) for v in keep.float().mean(0).tolist()],
        })
        return stats

    # -------------------------------------------------------------------------------------- serving & budget
    def serving_bytes(self) -> int:
        """Exact bytes of :meth:`export` (the module docstring's formula): with ``k = kept_numbers`` before the
        prune, with the numbers its sparse rows will store (the kept non-zeros) after."""
        rows, dim = self.weight.shape
        if not self.pruned:
            return served_bytes(rows, dim, self.num_fields, self.kept_numbers)
        if self.weight.device.type == "meta":
            return served_bytes(rows, dim, self.num_fields, self._kept)
        stored = int(torch.count_nonzero(self._served_weight()))
        return served_bytes(rows, dim, self.num_fields, stored)

    def _served_weight(self) -> torch.Tensor:
        keep = self.keep.index_select(-1, self._groups_index(self.keep.device)).bool()
        return torch.where(keep, self.weight.detach(), 0.0)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "AutoSrhExport":
        """The frozen serving table: the kept numbers as :class:`~embcompress.sparse_rows.SparseRows` (the smallest
        format) and the offsets; its outputs equal this pruned table's eval-mode outputs bit for bit. Raises
        ``ValueError`` before :meth:`prune_` (fit_staged prunes)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 numbers, got precision={precision!r}")
        if not self.pruned:
            raise ValueError(f"{self._owner_name()}: export() needs the pruned table; call prune_() (fit_staged "
                             "does) first")
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)
        served = AutoSrhExport.of(cards, self.embedding_dim, self._served_weight())
        return served.to(self.weight.device).set_field_names(self.field_names).eval()

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim: int, **options) -> BudgetKnob:
        """The knob is ``kept_numbers``, from the narrowest group's width (one pair) to every number; the served
        bytes grow with it."""
        cards = as_cardinalities(cardinalities, owner=cls)
        dim = check_positive_int("embedding_dim", embedding_dim, owner=cls)
        groups = check_int("groups", options.get("groups"), lo=1, hi=dim, optional=True, owner=cls)
        widths = group_widths(dim, min(DEFAULT_GROUPS, dim) if groups is None else groups)
        return BudgetKnob("kept_numbers", min(widths), sum(cards) * dim, lambda k: {"kept_numbers": int(k)})

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim: int, *, budget_bytes: int, **options) -> "AutoSrhEmbedding":
        """The shared solver's table: the most kept numbers whose served bytes fit ``budget_bytes`` (at most the
        full table's bytes), with that budget recorded as :attr:`budget_bytes`. It searches with every pair and
        is pruned to at most that many numbers by :meth:`prune_`."""
        table = super().from_budget(cardinalities, embedding_dim, budget_bytes=budget_bytes, **options)
        table.budget_bytes = min(check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return table

    # ------------------------------------------------------------------------------------------------ stages
    def fit_staged(self, model: nn.Module, data, cfg, schedule: AutoSrhSchedule | None = None) -> StagedFit:
        """Search (rows and alphas with the L1 term), prune to ``kept_numbers`` and retrain with the mask fixed,
        as ``schedule`` says (``None``: the default :class:`AutoSrhSchedule`); returns the model with this
        (pruned) table, which :meth:`export` serves.

        ``details`` hold the search stage's AUCs, stored bytes and optimizer-state bytes, :meth:`prune_`'s
        statistics (kept pairs and numbers, per-field mean kept width, ...), the retrained table's stored and
        optimizer-state bytes, ``peak_training_bytes`` (the larger stage's: the search, which holds the alphas
        and their optimizer state) and ``serving_bytes``.
        """
        schedule = check_staged_start(self, model, schedule, AutoSrhSchedule)
        if self.pruned:
            raise ValueError(f"{self._owner_name()}: fit_staged starts from the search stage; this table is "
                             "pruned already")
        self.set_alpha_l1(schedule.alpha_l1)
        run = train_compress_retrain(self, model, data, cfg, first=("search", "search", schedule.search_epochs),
                                     compress=("prune", self.prune_),
                                     second=("retrain", "retrain", schedule.retrain_epochs))
        details: dict[str, Any] = {
            "search_val_auc": run.first.val_auc, "search_test_auc": run.first.test_auc,
            "alpha_l1": schedule.alpha_l1,
            "search_table_bytes": run.first_bytes, "search_optimizer_bytes": run.first.table_optimizer_bytes,
            **run.compressed,
            "retrain_table_bytes": run.second_bytes, "retrain_optimizer_bytes": run.result.table_optimizer_bytes,
            "serving_bytes": self.serving_bytes(),
            # the search held the alphas and their optimizer state, more than the retrain
            "peak_training_bytes": run.peak_training_bytes,
        }
        return StagedFit(model=model, table=self, result=run.result, stages=run.stages, details=details)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:  # refuse a checkpoint of other options before changing any shape
            self.set_extra_state(state_dict[key])
        alpha, keep = state_dict.get(prefix + "alpha"), state_dict.get(prefix + "keep")
        if torch.is_tensor(alpha) and torch.is_tensor(keep):
            self._take_layout_(tuple(alpha.shape), tuple(keep.shape))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _take_layout_(self, alpha_shape: tuple, keep_shape: tuple) -> None:
        """Reshape ``alpha`` and ``keep`` to a checkpoint's stage (search, or pruned) so that it loads; a layout no
        table of these options has is left for the load to refuse. A tensor is replaced only when its shape
        changes (an optimizer may hold the parameter)."""
        rows, groups = self.weight.shape[0], self.groups
        search = alpha_shape == (rows, groups) and keep_shape == (0, groups)
        pruned = alpha_shape == (0, groups) and keep_shape == (rows, groups)
        if not (search or pruned):
            return
        if tuple(self.alpha.shape) != alpha_shape:
            self.alpha = nn.Parameter(torch.empty(alpha_shape, device=self.alpha.device), requires_grad=search)
        if tuple(self.keep.shape) != keep_shape:
            self.keep = torch.empty(keep_shape, dtype=torch.uint8, device=self.keep.device)
        self._touched = []

    def loaded_state_(self) -> None:
        """The host-side kept count from the loaded mask (one read, at load time); a mask of other values than 0
        and 1, or one keeping more than ``kept_numbers`` numbers, is refused."""
        self._group_of_dim.clear()
        if not self.pruned or self.keep.device.type == "meta":
            self._kept = self.total_numbers if not self.pruned else self.kept_numbers
            return
        if int(self.keep.max()) > 1:
            raise ValueError(f"{self._owner_name()}: the loaded keep mask holds values other than 0 and 1")
        widths = torch.tensor(self.widths, dtype=torch.int64, device=self.keep.device)
        self._kept = int((self.keep.long() * widths).sum())
        if self._kept > self.kept_numbers:
            raise ValueError(f"{self._owner_name()}: the loaded mask keeps {self._kept:,} numbers, over "
                             f"kept_numbers={self.kept_numbers:,}")

    def extra_repr(self) -> str:
        stage = f"pruned, kept={self._kept}" if self.pruned else "search"
        return (f"{super().extra_repr()}, kept_numbers={self.kept_numbers}, groups={self.groups}, "
                f"widths={list(self.widths)}, stage={stage}, sparse={self.sparse}")


class AutoSrhExport(SparseExport):
    """The served AutoSrh table: the kept dimension groups' numbers as sparse rows
    (:class:`~embcompress.tables.sparse_export.SparseExport`), nothing else."""

    registry_name: ClassVar[str] = "autosrh.v1 (export)"
