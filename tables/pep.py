"""``pep.v1``: Plug-in Embedding Pruning — learn soft thresholds, prune, retrain the winning ticket.

Liu et al., "Learnable Embedding Sizes for Recommender Systems" (PEP), ICLR 2021.

Every id of every field has its own fp32 row; the fields' rows are fused into one ``[N, D]`` weight
(``N = sum_f n_f``, row ``offsets[f] + x``), as in ``full.v1``. Stages (:meth:`PEPEmbedding.fit_staged`, as a
:class:`PEPSchedule` says):

1. **Train with learnable soft thresholds.** A looked-up row ``v`` is returned as
   ``v' = sign(v) * relu(|v| - sigmoid(s))``, with ``s`` a trainable threshold per field (``[F, 1]``), per
   dimension (``[1, D]``) or per field and dimension (``[F, D]``, the default), trained by the model's optimizer
   with the rows. The threshold is applied to the rows a batch reads only (the reference thresholds the whole
   table at every step).
2. **Prune** (:meth:`PEPEmbedding.prune_`). The mask is the set of numbers the learned thresholds keep
   (``v' != 0`` over the whole table). If it keeps more than ``kept_numbers`` (the budget's count), only the
   ``kept_numbers`` largest-magnitude thresholded values are kept (ties by position in the fused table), so the
   served table meets its budget whatever the thresholds learned.
3. **Retrain the ticket** (the lottery-ticket step of the paper). The kept numbers are reset to their values at
   initialisation, the others are set to exactly 0, and the table retrains with the mask fixed and no threshold:
   the output is ``v * mask``, so a pruned number gets a zero gradient and stays exactly 0. The model's other
   layers keep their stage-1 weights; the optimizers are new (``train`` builds them).

Held while training: ``weight`` fp32 ``[N, D]``, the thresholds fp32 (``[F, 1]``, ``[1, D]`` or ``[F, D]``),
int64 ``offsets`` ``[F]``, and, to reset from, not a copy of the initial table but how to draw it again: an int64
``init_seed`` and the fp32 ``init_scale`` of the ``N(0, init_scale**2)`` draw (a CPU generator, so the same
numbers on every device): ``4 N D + 4 |s| + 8 F + 12`` bytes, plus the optimizer state. After pruning it also
holds the mask, one bit a number (uint8 ``[N, ceil(D / 8)]``, bit ``j`` of byte ``b`` is column ``8 b + j``); the
thresholds are kept, frozen, for the record.

Served (:meth:`PEPEmbedding.export`, :class:`PEPExport`): the retrained table as a
:class:`~embcompress.sparse_rows.SparseRows` of its ``nnz`` kept non-zero numbers, in the smallest of CSR, COO and
bitmap (:func:`~embcompress.sparse_rows.smallest_format`), and the int64 field offsets::

    serving bytes = min(csr, coo, bitmap) + 8 F
        csr    = p (N + 1) + (c + 4) nnz
        coo    = (r + c + 4) nnz
        bitmap = p (N + 1) + N ceil(D / 8) + 4 nnz

with ``c`` the itemsize of the smallest index dtype of ``D`` columns (uint8 up to 256), ``r`` that of ``N`` rows
(uint8 up to 256, int16 up to 32,768, int32 up to 2**31, else int64) and ``p`` the pointers' (int32 while
``nnz < 2**31``, else int64). Before pruning :meth:`~PEPEmbedding.serving_bytes` plans it with
``nnz = kept_numbers``; after, it is the export's exact count (at most that).

Design choices:

* **Per field and dimension thresholds by default** (``threshold="field_dimension"``): the paper's best
  granularity, and its ``F D`` numbers are nothing beside the table.
* **Thresholds that learn** (``threshold_init=-10``). The reference starts at ``s = -150``, where
  ``sigmoid(-150)`` is exactly 0 in fp32 and so is its gradient: the thresholds never move, and PEP degenerates
  to no pruning (the reference) or to plain magnitude pruning at the budget (here). At ``-15`` the gradient
  (``sigmoid'(-15) = 3e-7`` times the rows' gradients, about 5e-10 on the synthetic data) sits under Adam's
  ``eps = 1e-8`` and the thresholds crawl (a tenth of the learning rate a step); at ``-10`` (``sigmoid'`` 4.5e-5)
  Adam moves them by about its learning rate a step from the first batch, while ``sigmoid(-10) = 4.5e-5``
  prunes nothing at initialisation (a number under it has probability ``1e-4`` at the default ``init_std``).
  At about the learning rate a step, the thresholds reach the rows' scale (``s ~ -1`` for ``|v| ~ 0.25``) only
  after thousands of steps: in short runs the budget's magnitude cut decides most of the mask (on 20,000
  synthetic rows, 2 epochs at 8x, the thresholds kept 99.98% of the numbers).
* **The budget binds the served table and the knob is the kept count** ``K`` (``kept_numbers``):
  :meth:`~PEPEmbedding.from_budget` solves, through the shared solver, the largest ``K`` whose served bytes (the
  formula above with ``nnz = K``) fit the budget; pruning keeps at most ``K`` numbers, and the bytes never grow
  as ``nnz`` falls. The minimum budget is one kept number: on the default synthetic data (N = 51,384 ids in 26
  fields at D=16) a COO value of int32 row, uint8 column and fp32 value, 9 bytes, and 208 bytes of offsets:
  217 bytes, so every ratio from 2x past 1000x builds (1000x keeps 342 numbers). Budgets under the minimum
  raise :class:`~embcompress.contract.BudgetError` naming it.
* **init_std is the std of what stage 1 returns.** The soft threshold shrinks every number by
  ``t = sigmoid(threshold_init)``; the rows are drawn with the ``init_scale`` whose soft-thresholded normal has
  std ``init_std`` exactly (that std in closed form, :func:`soft_threshold_std`, bisected on the scale;
  ``init_scale ~ init_std`` when ``t << init_std``). The retrain starts from those draws, masked, without the threshold.
* **Cost.** Pruning runs once, on the table's device: the thresholded table (one ``[N, D]`` copy), a
  ``kthvalue`` over its magnitudes when the learned mask is over the budget, and the initial rows drawn again on
  the CPU (one ``[N, D]`` fp32 draw).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.budget import check_budget
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_choice, check_int,
    check_number, check_positive_int, resolve_init_std,
)
from embcompress.optembed import StagedFit
from embcompress.registry import TABLES
from embcompress.tables.sparse_export import SparseExport
from embcompress.sparse_rows import smallest_format
from embcompress.schedule import StagedSchedule, check_staged_start, train_compress_retrain

__all__ = ["PEPEmbedding", "PEPExport", "PEPSchedule", "THRESHOLDS", "soft_threshold", "soft_threshold_std"]

#: Threshold granularities: one per field ``[F, 1]``, per dimension ``[1, D]``, per field and dimension ``[F, D]``.
THRESHOLDS = ("field", "dimension", "field_dimension")


def soft_threshold(v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """PEP's pruned value ``sign(v) * relu(|v| - sigmoid(s))`` (``s`` broadcast to ``v``).

    >>> soft_threshold(torch.tensor([0.5, -0.5, 0.1]), torch.tensor(0.0))   # sigmoid(0) = 0.5: all pruned
    tensor([0., -0., 0.])
    """
    return torch.sign(v) * torch.relu(v.abs() - torch.sigmoid(s))


def soft_threshold_std(scale: float, t: float) -> float:
    """Std of ``sign(v) * relu(|v| - t)`` for ``v ~ N(0, scale**2)``:
    ``sqrt(2 ((scale^2 + t^2) Q(a) - t scale phi(a)))`` with ``a = t / scale``, ``Q`` the normal upper tail and
    ``phi`` its density.

    >>> round(soft_threshold_std(1.0, 0.0), 12), round(soft_threshold_std(1.0, 1.0), 4)
    (1.0, 0.3882)
    """
    if t <= 0:
        return scale
    a = t / scale
    tail = 0.5 * math.erfc(a / math.sqrt(2))
    density = math.exp(-0.5 * a * a) / math.sqrt(2 * math.pi)
    return math.sqrt(max(2 * ((scale * scale + t * t) * tail - t * scale * density), 0.0))


def _init_scale(init_std: float, t: float) -> float:
    """The ``scale`` whose soft-thresholded normal (threshold ``t``) has std ``init_std`` (bisection: the std grows
    with the scale, and is at most it)."""
    lo, hi = init_std, init_std + t
    while soft_threshold_std(hi, t) < init_std:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if soft_threshold_std(mid, t) < init_std:
            lo = mid
        else:
            hi = mid
    return hi


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _served_bytes(rows: int, num_fields: int, dim: int, nnz: int) -> int:
    return smallest_format(rows, dim, nnz)[1] + 8 * num_fields


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """``[N, D]`` bool -> uint8 ``[N, ceil(D / 8)]``, bit ``j`` of byte ``b`` is column ``8 b + j``."""
    rows, dim = mask.shape
    padded = torch.zeros(rows, -(-dim // 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :dim] = mask.to(torch.uint8)
    bits = padded.view(rows, -1, 8) << torch.arange(8, dtype=torch.uint8, device=mask.device)
    return bits.sum(-1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 ``[..., ceil(D / 8)]`` -> bool ``[..., D]`` (inverse of :func:`_pack_bits`)."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :dim].bool()


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class PEPSchedule(StagedSchedule):
    """How :meth:`PEPEmbedding.fit_staged` trains a PEP table.

    Args:
        train_epochs: epochs with the learnable soft thresholds (``None``: the run's ``TrainConfig.epochs``).
        retrain_epochs: epochs of the pruned ticket, reset to its initial values (``None``: the run's epochs).

    >>> PEPSchedule.from_dict({"retrain_epochs": 2}).retrain_epochs
    2
    >>> PEPSchedule(train_epochs=0)
    Traceback (most recent call last):
        ...
    ValueError: PEPSchedule: train_epochs must be a positive int or None, got 0
    """

    train_epochs: int | None = None
    retrain_epochs: int | None = None

    def __post_init__(self) -> None:
        owner = "PEPSchedule"
        self._store({name: check_positive_int(name, getattr(self, name), optional=True, owner=owner)
                     for name in ("train_epochs", "retrain_epochs")})


    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "PEPSchedule":
        """A schedule from a suite's plain mapping; absent keys keep their defaults (``None`` or ``{}``: the
        default schedule). An unknown key or a bad value raises :class:`~embcompress.specs.SpecError` naming
        ``where``, the key and the value.

        >>> PEPSchedule.from_dict({"retrain_epoch": 3}, "methods[2].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[2].schedule: unknown key 'retrain_epoch'; did you mean 'retrain_epochs', 'train_epochs'? (accepted keys: train_epochs, retrain_epochs)
        """
        return super().from_dict(mapping, where)


# ----------------------------------------------------------------------------------------------------- table
@TABLES.register("pep.v1")
class PEPEmbedding(CompressedEmbedding):
    """A full table with learnable soft thresholds, pruned to a fixed mask and retrained (see the module docstring).

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored: ``weight`` fp32 ``[N, D]`` (``N = sum_f n_f``); ``threshold`` fp32 ``[F, 1]``, ``[1, D]`` or ``[F, D]``;
    int64 ``offsets`` ``[F]``; int64 ``init_seed`` and fp32 ``init_scale`` (how to draw the initial rows
    again); ``mask`` uint8, empty before :meth:`prune_` and ``[N, ceil(D / 8)]`` (a bit a number) after.
    Before pruning the output is ``sign(v) * relu(|v| - sigmoid(s))`` of the row ``v``; after it, ``v * mask``.
    :meth:`serving_bytes` is the export's: planned with ``nnz = kept_numbers`` before, exact after.

    Args:
        kept_numbers: ``K``, the most numbers the served table keeps (``None``: all ``N D``); solved by
            :meth:`from_budget`.
        threshold: the thresholds' granularity, one of :data:`THRESHOLDS`.
        threshold_init: the initial ``s`` of every threshold (``sigmoid(s)`` is the threshold).
        sparse: sparse gradients for ``weight`` (use with ``torch.optim.SparseAdam``), in both stages.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = PEPEmbedding([10, 6], 4, kept_numbers=12)
    >>> ids = torch.tensor([[9, 5], [0, 1]])
    >>> t(ids).shape, t.threshold.shape
    (torch.Size([2, 2, 4]), torch.Size([2, 4]))
    >>> t.serving_bytes() == 12 * (1 + 1 + 4) + 2 * 8   # COO: uint8 row and column, fp32 value; offsets
    True
    >>> stats = t.prune_()   # the learned mask keeps all 64 numbers: the 12 largest are kept
    >>> stats["learned_kept"], stats["kept"], t.mask.shape
    (64, 12, torch.Size([16, 1]))
    >>> served = t.export()
    >>> torch.equal(served(ids), t.eval()(ids)), served.memory_report().total_bytes == t.serving_bytes()
    (True, True)
    """

    trains_in_stages: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[PEPSchedule]] = PEPSchedule
    budget_keys: ClassVar[tuple[str, ...]] = ("kept_numbers",)
    #: ``threshold_init`` only sets the initial ``s`` and the initial rows' scale, which are saved tensors.
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "seed", "threshold_init")
    #: The budget :meth:`from_budget` built the table to (``None`` when built directly); the served table's.
    budget_bytes: int | None = None

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        kept_numbers: int | None = None,
        threshold: str = "field_dimension",
        threshold_init: float = -10.0,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.threshold_type = check_choice("threshold", threshold, THRESHOLDS, owner=self)
        self.threshold_init = check_number("threshold_init", threshold_init, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        rows, dim = sum(self.cardinalities), embedding_dim
        kept = check_int("kept_numbers", kept_numbers, lo=1, hi=rows * dim, optional=True, owner=self)
        self.kept_numbers = rows * dim if kept is None else kept
        shape = {"field": (self.num_fields, 1), "dimension": (1, dim), "field_dimension": (self.num_fields, dim)}
        self.threshold = nn.Parameter(torch.full(shape[self.threshold_type], self.threshold_init))
        self.weight = nn.Parameter(torch.empty(rows, dim))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        # Empty until prune_: the stage is read off its shape, never off values (no device sync, works on meta).
        self.register_buffer("mask", torch.empty(0, -(-dim // 8), dtype=torch.uint8))
        scale = _init_scale(self.init_std, _sigmoid(self.threshold_init))
        meta = self.weight.device.type == "meta"
        # One draw from the global generator (so torch.manual_seed decides the table, as for every table); on meta
        # (the budget solver's planning) nothing is drawn.
        seed = 0 if meta else int(torch.randint(0, 2**62, (), device="cpu"))
        self.register_buffer("init_seed", torch.tensor(seed, dtype=torch.int64))
        self.register_buffer("init_scale", torch.tensor(scale, dtype=torch.float32))
        if not meta:
            with torch.no_grad():  # on the CPU drawn in place (no second copy), as initial_rows draws it again
                if self.weight.device.type == "cpu":
                    self._draw_(self.weight)
                else:
                    self.weight.copy_(self.initial_rows())

    # ------------------------------------------------------------------------------------------------ layout
    @property
    def pruned(self) -> bool:
        return self.mask.shape[0] > 0

    @torch.no_grad()
    def initial_rows(self) -> torch.Tensor:
        """The ``[N, D]`` rows this table was initialised with: ``N(0, init_scale**2)`` from a CPU generator seeded
        with ``init_seed`` (the same numbers on every device), on the weight's device."""
        return self._draw_(torch.empty(self.weight.shape, dtype=torch.float32, device="cpu")).to(self.weight.device)

    def _draw_(self, rows: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator().manual_seed(int(self.init_seed))
        return rows.normal_(0.0, float(self.init_scale), generator=gen)

    def _thresholds_for(self, fields: torch.Tensor) -> torch.Tensor:
        """The thresholds ``s`` of ids of ``fields``: ``[*fields.shape, 1 or D]`` (``[D]`` per dimension)."""
        return self.threshold[0] if self.threshold_type == "dimension" else self.threshold[fields]

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        v = F.embedding(rows, self.weight, sparse=self.sparse)
        if self.pruned:  # a pruned number is 0 and gets no gradient: it stays exactly 0
            out = v * _unpack_bits(self.mask[rows], self.embedding_dim).to(v.dtype)
        else:
            out = soft_threshold(v, self._thresholds_for(fields))
        return out if self.training else out + 0.0  # eval: -0.0 reads +0.0, as the sparse rows return it

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    def undecayed_parameters(self) -> list[nn.Parameter]:
        return [self.threshold]

    # ------------------------------------------------------------------------------------------------ pruning
    @torch.no_grad()
    def thresholded(self) -> torch.Tensor:
        """The whole table as stage 1 returns it, ``[N, D]`` (``sign(v) * relu(|v| - sigmoid(s))``)."""
        if self.threshold_type == "dimension":
            return soft_threshold(self.weight, self.threshold)
        field = torch.repeat_interleave(torch.arange(self.num_fields, device=self.weight.device),
                                        torch.tensor(self.cardinalities, device=self.weight.device))
        return soft_threshold(self.weight, self.threshold[field])

    @torch.no_grad()
    def prune_(self) -> dict:
        """Fix the mask from the learned thresholds and reset the kept numbers to their initial values (stage 2).

        The mask keeps the numbers the thresholds leave non-zero; when they are more than ``kept_numbers``, only
        the ``kept_numbers`` of largest thresholded magnitude (ties: the first in the fused table). Kept numbers
        are reset to :meth:`initial_rows`, the others set to 0; the thresholds are frozen. Returns ``{"values",
        "learned_kept", "kept", "kept_numbers", "threshold_mean", "format", "serving_bytes"}``.
        """
        if self.pruned:
            raise ValueError(f"{self._owner_name()}: the table is pruned already")
        if not bool(torch.isfinite(self.weight).all()):
            raise ValueError(f"{self._owner_name()}: the table holds non-finite values; nothing to prune")
        pruned = self.thresholded()
        keep = pruned != 0
        learned = int(keep.sum())
        if learned > self.kept_numbers:
            magnitude = pruned.abs().flatten()
            k = self.kept_numbers
            cut = torch.kthvalue(magnitude, magnitude.numel() - k + 1).values  # the k-th largest, > 0
            flat = magnitude > cut
            ties = (magnitude == cut).nonzero().flatten()[: k - int(flat.sum())]
            flat[ties] = True
            keep = flat.view_as(keep)
        self.weight.copy_(torch.where(keep, self.initial_rows(), torch.zeros((), device=self.weight.device)))
        self.mask = _pack_bits(keep)
        self.threshold.requires_grad_(False)
        nnz = int((self.weight != 0).sum())
        return {"values": self.weight.numel(), "learned_kept": learned, "kept": nnz, "kept_numbers": self.kept_numbers,
                "threshold_mean": float(torch.sigmoid(self.threshold).mean()),
                "format": smallest_format(self.weight.shape[0], self.embedding_dim, nnz)[0],
                "serving_bytes": self.serving_bytes()}

    @torch.no_grad()
    def masked_weight(self) -> torch.Tensor:
        """The retrained ``[N, D]`` table as it serves: the weight where the mask keeps a number, 0 elsewhere."""
        if not self.pruned:
            raise ValueError(f"{self._owner_name()}: the table is not pruned yet; call prune_() (fit_staged does)")
        keep = _unpack_bits(self.mask, self.embedding_dim)
        return torch.where(keep, self.weight, torch.zeros((), device=self.weight.device))

    # -------------------------------------------------------------------------------------- serving & budget
    def serving_bytes(self) -> int:
        """Exact bytes of :meth:`export` (the module docstring's formula): with ``nnz`` the kept non-zero numbers
        after :meth:`prune_`, ``nnz = kept_numbers`` (the most it may keep) before."""
        nnz = int((self.masked_weight() != 0).sum()) if self.pruned else self.kept_numbers
        return _served_bytes(sum(self.cardinalities), self.num_fields, self.embedding_dim, nnz)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "PEPExport":
        """The frozen serving table: a :class:`~embcompress.sparse_rows.SparseRows` of the retrained table, in its
        smallest format, and the field offsets; its outputs equal this pruned table's bit for bit. Raises
        ``ValueError`` before :meth:`prune_`."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 values, got precision={precision!r}")
        weight = self.masked_weight()
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)
        nnz = int((weight != 0).sum())
        fmt = smallest_format(weight.shape[0], self.embedding_dim, nnz)[0]
        served = PEPExport(cards, self.embedding_dim, kept=nnz, fmt=fmt, weight=weight)
        return served.set_field_names(self.field_names).eval()

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim: int, **options) -> BudgetKnob:
        """The knob is ``kept_numbers``, from 1 to every number; served bytes grow with it."""
        cards = as_cardinalities(cardinalities, owner=cls)
        dim = check_positive_int("embedding_dim", embedding_dim, owner=cls)
        return BudgetKnob("kept_numbers", 1, sum(cards) * dim, lambda k: {"kept_numbers": int(k)})

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim: int, *, budget_bytes: int, **options) -> "PEPEmbedding":
        """The shared solver's table: the most kept numbers whose served bytes fit ``budget_bytes`` (at most the
        full table's bytes), with that budget recorded as :attr:`budget_bytes`. It trains as a full table;
        :meth:`prune_` then keeps at most that many numbers."""
        table = super().from_budget(cardinalities, embedding_dim, budget_bytes=budget_bytes, **options)
        table.budget_bytes = min(check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return table

    # ------------------------------------------------------------------------------------------------ stages
    def fit_staged(self, model: nn.Module, data, cfg, schedule: PEPSchedule | None = None) -> StagedFit:
        """Train with the soft thresholds, prune, and retrain the ticket, as ``schedule`` says (``None``: the
        default :class:`PEPSchedule`); returns the model with this (pruned, retrained) table, which
        :meth:`export` serves.

        ``details`` hold :meth:`prune_`'s statistics, stage 1's validation/test AUC, the table's stored and
        optimizer-state bytes in each stage, ``peak_training_bytes`` (the larger of the two: what training
        held at most) and the served bytes.
        """
        schedule = check_staged_start(self, model, schedule, PEPSchedule)
        if self.pruned:
            raise ValueError(f"{self._owner_name()}: fit_staged starts from the unpruned table; this one is "
                             "pruned already")
        run = train_compress_retrain(self, model, data, cfg, first=("train", "train", schedule.train_epochs),
                                     compress=("prune", self.prune_),
                                     second=("retrain", "retrain", schedule.retrain_epochs))
        details: dict[str, Any] = {
            "train_val_auc": run.first.val_auc, "train_test_auc": run.first.test_auc,
            "train_table_bytes": run.first_bytes, "train_optimizer_bytes": run.first.table_optimizer_bytes,
            **run.compressed,
            "retrain_table_bytes": run.second_bytes, "retrain_optimizer_bytes": run.result.table_optimizer_bytes,
            "serving_bytes": self.serving_bytes(),
            # the larger stage: stage 1 holds the thresholds' optimizer state, the retrain the mask
            "peak_training_bytes": run.peak_training_bytes,
        }
        return StagedFit(model=model, table=self, result=run.result, stages=run.stages, details=details)

    # ------------------------------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:  # refuse a checkpoint of other options before changing any shape
            self.set_extra_state(state_dict[key])
        mask = state_dict.get(prefix + "mask")
        if torch.is_tensor(mask) and mask.dim() == 2 and mask.shape[1] == self.mask.shape[1] \
                and mask.shape[0] in (0, self.weight.shape[0]) and mask.shape != self.mask.shape:
            self.mask = torch.empty(mask.shape, dtype=torch.uint8, device=self.mask.device)  # the checkpoint's stage
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def loaded_state_(self) -> None:
        self.threshold.requires_grad_(not self.pruned)  # the thresholds train in stage 1 only

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kept_numbers={self.kept_numbers}, threshold={self.threshold_type!r}, "
                f"stage={'pruned' if self.pruned else 'thresholds'}, sparse={self.sparse}")


class PEPExport(SparseExport):
    """The served PEP table: the retrained ticket's kept numbers as sparse rows
    (:class:`~embcompress.tables.sparse_export.SparseExport`), nothing else."""

    registry_name: ClassVar[str] = "pep.v1 (export)"
