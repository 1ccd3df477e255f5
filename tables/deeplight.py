"""``deeplight.v1``: DeepLight embedding pruning — magnitude pruning of the table along a sparsity ramp.

Deng et al., "DeepLight: Deep Lightweight Feature Interactions for Accelerating CTR Predictions in Ad Serving",
WSDM 2021 (structural pruning of the embedding weights by magnitude, the sparsity raised gradually towards its
target while training), as the VLDB 2024 embedding-compression benchmark (Hetu's
``tools/EmbeddingMemoryCompression``) applies it to embedding tables: every few steps the table is re-pruned to
the sparsity

    s(t) = target * (1 - 0.99 ** (t / 100))          (t: optimizer steps so far)

and served as a sparse matrix.

Held while training (:class:`DeepLightEmbedding`): every id of every field its own fp32 row, the fields' rows
fused into one ``[N, D]`` weight (``N = sum_f n_f``, row ``offsets[f] + x``, as in ``full.v1``), a bool mask
``[N, D]`` of the kept numbers (one byte a number), int64 field offsets ``[F]`` and an int64 step count::

    stored bytes = 4 N D + N D + 8 F + 8          (plus the optimizer's state of the weight: Adam, 8 N D + 4)

The forward pass returns ``weight * mask`` for the rows a batch reads (a ``torch.where``: exactly +0.0 where
pruned), so a pruned number contributes nothing and gets no gradient.

Served (:meth:`DeepLightEmbedding.export`, :class:`DeepLightExport`): the kept numbers as a
:class:`~embcompress.sparse_rows.SparseRows` in whichever of CSR, COO and bitmap is smallest, and the int64 field
offsets. With ``k`` stored numbers, ``c`` the bytes of the smallest unsigned dtype holding a column (uint8 up to
256 columns), ``r`` those holding a row and ``p`` those of a pointer (int32 up to ``2**31 - 1`` numbers)::

    serving bytes = min( p (N + 1) + (c + 4) k,                      CSR
                         (r + c + 4) k,                              COO
                         p (N + 1) + N ceil(D / 8) + 4 k )  + 8 F    bitmap

(:func:`~embcompress.sparse_rows.smallest_format`). The vector of id ``x`` of field ``f`` is dense row
``offsets[f] + x`` gathered from the sparse rows.

Stages (:meth:`DeepLightEmbedding.fit_staged`, as a :class:`DeepLightSchedule` says):

1. **Train along the ramp.** The table is dense at step 0; every ``prune_every`` optimizer steps it re-prunes to
   keep ``N D - floor((N D - K) (1 - 0.99 ** (t / ramp_steps)))`` numbers (``K``: ``kept_numbers``, the target;
   ``ramp_steps=100`` is the benchmark's ramp).
2. **Prune exactly to the target** (:meth:`DeepLightEmbedding.prune_`): the ramp only approaches ``K``
   (``0.99 ** x`` never reaches 0), so the last prune keeps exactly ``K`` numbers.
3. **Fine-tune** with the mask fixed (the ramp cannot go under ``K``: it has nothing more to prune).

Design choices:

* **The step hook is an optimizer.** The training loop steps the optimizers a table returns from
  :meth:`~embcompress.contract.CompressedEmbedding.row_optimizers` after the model's own
  (:func:`embcompress.training.make_optimizers` appends them last). This table returns one
  :class:`RampPruner`, a ``torch.optim.Optimizer`` with no state whose ``step()`` counts the step, re-applies
  the mask and, every ``prune_every`` steps, re-prunes along the ramp; the loop needs no change and a custom
  loop steps it like any optimizer. Forward passes are not counted: a model may look up twice a step, and an
  evaluation in training mode is no step.
* **Global magnitude, one threshold over the whole table** (not per field): the budget and the served matrix
  are the table's, and one threshold lets a field of a few very frequent ids keep its numbers while the long
  tail of the large fields gives them up; a per-field sparsity would prune a 3-id field as hard as a
  100,000-id one. The benchmark likewise prunes its one fused table by one threshold. Ties at the threshold
  are broken by position (lower rows, the more frequent ids, first), so the kept count is exact and a prune is
  deterministic.
* **No regrowth: the mask only shrinks.** Each re-prune keeps the largest magnitudes among the numbers still
  kept. Pruned numbers are zeroed, masked out of the forward pass (no gradient) and re-zeroed after every
  optimizer step, since the optimizer's momentum would otherwise move them (only the rows a batch touched with
  ``sparse=True``). The benchmark zeroes pruned weights but keeps training them, so they may come back when the
  ramp is re-applied to the dense weights; with a masked forward they get no gradient, and anything that
  regrew would be momentum drift rather than a signal, so none is let back.
* **The budget binds the served table, and the knob is ``kept_numbers``** (``K``):
  :meth:`~DeepLightEmbedding.from_budget` solves the largest ``K`` whose served bytes (the formula above with
  ``k = K``) fit the budget, through the shared solver, before anything trains. The final prune keeps exactly
  ``K`` numbers, so the served bytes are at most the planned ones (less only where a kept number trained to
  exactly 0, which the sparse rows do not store). :meth:`~DeepLightEmbedding.serving_bytes` is planned until
  then and counted off the pruned table after. The benchmark instead chooses CSR or COO by the ratio and
  bisects a magnitude threshold to within 1e-4 of its target, and reaches the target only as its training
  runs long enough for the ramp.
* **Cost.** A re-prune is one selection over the whole table (``torch.kthvalue``), about 6 bytes a number of
  temporaries besides the selection's copy, and two host reads; between re-prunes a step re-zeroes the pruned
  numbers (one masked fill of the table, or of the batch's rows with ``sparse=True``). The forward pass gathers
  the mask's rows beside the weight's, and reads nothing on the host.
* **The minimum budget is one kept number**: ``smallest_format(N, D, 1) + 8 F`` (COO: one row, column and value),
  217 bytes on the default synthetic data (``N = 51,384`` ids in 26 fields, D=16: 9 + 208), about 15,000x.

Initialisation: rows are ``N(0, init_std**2)`` and nothing is pruned at step 0, so the returned vectors are the
rows.
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
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_positive_int,
    init_rows_, resolve_init_std,
)
from embcompress.optembed import StagedFit
from embcompress.registry import TABLES
from embcompress.tables.sparse_export import SparseExport
from embcompress.sparse_rows import smallest_format
from embcompress.schedule import StagedSchedule, check_staged_start, train_compress_retrain

__all__ = ["DeepLightEmbedding", "DeepLightExport", "DeepLightSchedule", "RampPruner", "ramp_kept", "ramp_sparsity",
           "served_bytes"]

RAMP_BASE = 0.99  # the benchmark's ramp: s(t) = target * (1 - 0.99 ** (t / 100))


def ramp_sparsity(step: int, target: float, ramp_steps: int = 100) -> float:
    """``s(t) = target * (1 - 0.99 ** (t / ramp_steps))``: the sparsity the ramp asks for after ``step`` steps.

    >>> ramp_sparsity(0, 0.9), round(ramp_sparsity(100, 0.9), 6), round(ramp_sparsity(10**6, 0.9), 6)
    (0.0, 0.009, 0.9)
    """
    return target * (1.0 - RAMP_BASE ** (step / ramp_steps))


def ramp_kept(total: int, kept: int, step: int, ramp_steps: int = 100) -> int:
    """The numbers kept after ``step`` steps of the ramp from ``total`` towards ``kept``: ``total`` less
    ``floor(s(t) * total)`` pruned, with the target sparsity ``1 - kept / total`` (never under ``kept``).

    >>> ramp_kept(1000, 100, 0), ramp_kept(1000, 100, 100), ramp_kept(1000, 100, 10**6)
    (1000, 991, 100)
    """
    pruned = math.floor((total - kept) * (1.0 - RAMP_BASE ** (step / ramp_steps)))
    return max(kept, total - pruned)


def served_bytes(rows: int, dim: int, num_fields: int, kept: int) -> int:
    """Exact bytes of the served table keeping ``kept`` numbers of ``[rows, dim]``: the smallest sparse format
    (:func:`~embcompress.sparse_rows.smallest_format`) and ``num_fields`` int64 offsets."""
    return smallest_format(rows, dim, kept)[1] + 8 * num_fields


@torch.no_grad()
def largest_magnitudes(weight: torch.Tensor, mask: torch.Tensor, kept: int) -> torch.Tensor:
    """The mask keeping the ``kept`` numbers of largest ``|weight|`` among those ``mask`` keeps (ties: the first
    in row-major order), a bool tensor shaped like ``weight``.

    One selection (``torch.kthvalue``) over the whole table and two reads on the host (the count above the
    threshold, and the positions of the ties when some must go): about 6 bytes a number of temporaries besides
    the selection's own copy.

    >>> w = torch.tensor([[0.5, -2.0], [1.0, -1.0]])
    >>> largest_magnitudes(w, torch.ones(2, 2, dtype=torch.bool), 2).tolist()   # |-2| and the first |1|
    [[False, True], [True, False]]
    """
    if kept <= 0:
        return torch.zeros_like(mask)
    scores = torch.where(mask, weight.abs(), -1.0).flatten()  # pruned numbers rank under every kept one
    if kept >= scores.numel():
        return mask.clone()
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("the table holds non-finite values; they cannot be ranked by magnitude")
    threshold = torch.kthvalue(scores, scores.numel() - kept + 1).values  # the kept-th largest
    keep = scores > threshold
    room = kept - int(keep.sum())  # ties at the threshold to keep: the first ones
    if room > 0:
        keep[(scores == threshold).nonzero().flatten()[:room]] = True
    return keep.view_as(mask)


# -------------------------------------------------------------------------------------------------- the hook
class RampPruner(torch.optim.Optimizer):
    """The step hook of a :class:`DeepLightEmbedding`: an optimizer with no state whose :meth:`step` calls the
    table's :meth:`~DeepLightEmbedding.optimizer_step_` (count the step, re-zero the pruned numbers, re-prune
    along the ramp every ``prune_every`` steps). Step it after the optimizers that update the table's weight;
    the training loop does (it gets it from ``row_optimizers``). Its ``lr`` is unused (kept so that a loop that
    decays every group's learning rate can).
    """

    def __init__(self, table: "DeepLightEmbedding", lr: float = 0.0) -> None:
        super().__init__([table.weight], {"lr": lr})
        self.table = table

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.table.optimizer_step_()
        return loss


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class DeepLightSchedule(StagedSchedule):
    """How :meth:`DeepLightEmbedding.fit_staged` trains a DeepLight table.

    Args:
        train_epochs: epochs along the sparsity ramp (``None``: the run's ``TrainConfig.epochs``).
        finetune_epochs: epochs after the exact prune to the target, the mask fixed (``None``: the run's
            ``TrainConfig.epochs``).

    >>> DeepLightSchedule.from_dict({"train_epochs": 2}).train_epochs
    2
    >>> DeepLightSchedule(finetune_epochs=0)
    Traceback (most recent call last):
        ...
    ValueError: DeepLightSchedule: finetune_epochs must be a positive int or None, got 0
    """

    train_epochs: int | None = None
    finetune_epochs: int | None = None

    def __post_init__(self) -> None:
        owner = "DeepLightSchedule"
        self._store({name: check_positive_int(name, getattr(self, name), optional=True, owner=owner)
                     for name in ("train_epochs", "finetune_epochs")})

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "DeepLightSchedule":
        """See :meth:`~embcompress.schedule.StagedSchedule.from_dict`.

        >>> DeepLightSchedule.from_dict({"finetune_epoch": 3}, "methods[2].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[2].schedule: unknown key 'finetune_epoch'; did you mean 'finetune_epochs', 'train_epochs'? (accepted keys: train_epochs, finetune_epochs)
        """
        return super().from_dict(mapping, where)


# ----------------------------------------------------------------------------------------------------- table
@TABLES.register("deeplight.v1")
class DeepLightEmbedding(CompressedEmbedding):
    """A full table pruned by magnitude along a sparsity ramp, served sparse (see the module docstring).

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored: ``weight`` fp32 ``[N, D]`` (``N = sum_f n_f``), ``mask`` bool ``[N, D]`` (the kept numbers),
    int64 ``offsets`` ``[F]`` and int64 ``steps`` ``[]`` (optimizer steps seen). :meth:`serving_bytes` is the
    export's: planned with ``K = kept_numbers`` until the table is pruned to ``K``, counted off it after.

    Args:
        kept_numbers: ``K``, the numbers the served table keeps (``None``: every number); solved by
            :meth:`from_budget`.
        prune_every: optimizer steps between re-prunes along the ramp (the benchmark: 10).
        ramp_steps: the ramp's time scale, ``s(t) = target * (1 - 0.99 ** (t / ramp_steps))`` (the benchmark:
            100).
        sparse: sparse gradients for ``weight`` (use with ``torch.optim.SparseAdam``).
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = DeepLightEmbedding([10, 6], 4, kept_numbers=20)
    >>> ids = torch.tensor([[9, 5], [0, 1]])
    >>> t(ids).shape
    torch.Size([2, 2, 4])
    >>> t.memory_report().total_bytes == 16 * 4 * 4 + 16 * 4 + 2 * 8 + 8   # weight, bool mask, offsets, steps
    True
    >>> t.serving_bytes() == 20 * (1 + 1 + 4) + 2 * 8   # planned: COO, uint8 row and column, fp32 value
    True
    >>> stats = t.prune_()                               # the final, exact prune (fit_staged's stage 2)
    >>> stats["kept"], int(t.mask.sum()), bool((t.weight[~t.mask] == 0).all())
    (20, 20, True)
    >>> served = t.export()
    >>> served.format, torch.equal(served(ids), t(ids)), served.memory_report().total_bytes == t.serving_bytes()
    ('coo', True, True)
    """

    trains_in_stages: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[DeepLightSchedule]] = DeepLightSchedule
    budget_keys: ClassVar[tuple[str, ...]] = ("kept_numbers",)
    #: The ramp's pace does not change what a saved mask, weight and step count mean.
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "seed", "prune_every", "ramp_steps")
    #: The budget :meth:`from_budget` built the table to (``None`` when built directly); the served table's.
    budget_bytes: int | None = None

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        kept_numbers: int | None = None,
        prune_every: int = 10,
        ramp_steps: int = 100,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        rows = sum(self.cardinalities)
        self.total_numbers = rows * embedding_dim
        kept = check_int("kept_numbers", kept_numbers, lo=1, hi=self.total_numbers, optional=True, owner=self)
        self.kept_numbers = self.total_numbers if kept is None else kept
        self.prune_every = check_positive_int("prune_every", prune_every, owner=self)
        self.ramp_steps = check_positive_int("ramp_steps", ramp_steps, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        self.weight = nn.Parameter(init_rows_(torch.empty(rows, embedding_dim), self.init_std))
        self.register_buffer("mask", torch.ones(rows, embedding_dim, dtype=torch.bool))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        # Host-side copies of the step count and the kept count (read every step and every forward: reading the
        # buffers would wait for the GPU); set by every prune and step, and from the buffers by every load.
        self._steps = 0
        self._kept = self.total_numbers

    # ------------------------------------------------------------------------------------------------ state
    @property
    def kept(self) -> int:
        """Numbers the mask keeps now."""
        return self._kept

    @property
    def at_target(self) -> bool:
        """True once the mask keeps at most ``kept_numbers`` numbers (after :meth:`prune_`): what is served."""
        return self._kept <= self.kept_numbers

    def sparsity(self) -> float:
        """The pruned fraction of the table's numbers now."""
        return 1.0 - self._kept / self.total_numbers

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        out = F.embedding(rows, self.weight, sparse=self.sparse)
        if self._kept == self.total_numbers:  # nothing pruned yet: the rows as they are
            return out
        return torch.where(self.mask[rows], out, 0.0)  # pruned numbers: +0.0 and no gradient

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    # --------------------------------------------------------------------------------------------- pruning
    def row_optimizers(self, lr: float, *, seed: int = 0) -> list[torch.optim.Optimizer]:
        """The step hook: one :class:`RampPruner`, which the training loop steps after the model's optimizers."""
        return [RampPruner(self, lr)]

    @torch.no_grad()
    def optimizer_step_(self) -> None:
        """What :class:`RampPruner` does after each optimizer step: count it, re-zero the pruned numbers the
        step may have moved (the optimizer's momentum: every row, or the rows of a sparse gradient), and every
        ``prune_every`` steps re-prune to :func:`ramp_kept` of the step count."""
        self.steps.add_(1)
        self._steps += 1
        if self._kept < self.total_numbers:
            grad = self.weight.grad
            if grad is not None and grad.is_sparse:
                rows = grad.coalesce().indices()[0]
                self.weight[rows] = self.weight[rows].masked_fill(~self.mask[rows], 0.0)
            else:
                self.weight.masked_fill_(~self.mask, 0.0)
        if self._steps % self.prune_every == 0:
            target = ramp_kept(self.total_numbers, self.kept_numbers, self._steps, self.ramp_steps)
            if target < self._kept:
                self._prune_to(target)

    @torch.no_grad()
    def prune_(self, kept: int | None = None) -> dict:
        """Prune exactly to ``kept`` numbers (default: ``kept_numbers``, the target; fit_staged's stage 2), the
        largest magnitudes among those kept now; pruned numbers are zeroed. Returns ``{"kept", "pruned",
        "sparsity", "steps"}`` (numbers pruned by this call; steps of the ramp before it)."""
        kept = self.kept_numbers if kept is None else check_int("kept", kept, lo=1, hi=self._kept, owner=self)
        before = self._kept
        if kept < before:
            self._prune_to(kept)
        return {"kept": self._kept, "pruned": before - self._kept, "sparsity": self.sparsity(), "steps": self._steps}

    def _prune_to(self, kept: int) -> None:
        if self.weight.device.type == "meta":
            raise ValueError(f"{self._owner_name()}: a table on the meta device holds no values to prune")
        try:
            keep = largest_magnitudes(self.weight, self.mask, kept)
        except ValueError as err:
            raise self._fail(str(err)) from None
        self.mask.copy_(keep)
        self.weight.masked_fill_(~self.mask, 0.0)
        self._kept = kept

    # -------------------------------------------------------------------------------------- serving & budget
    def serving_bytes(self) -> int:
        """Exact bytes of :meth:`export` (the module docstring's formula): with ``k = kept_numbers`` until the table
        is pruned to its target, with the numbers its sparse rows will store (the kept non-zeros) after."""
        rows, dim = self.weight.shape
        if not self.at_target or self.weight.device.type == "meta":
            return served_bytes(rows, dim, self.num_fields, self.kept_numbers)
        stored = int((self.weight != 0).logical_and_(self.mask).sum())
        return served_bytes(rows, dim, self.num_fields, stored)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "DeepLightExport":
        """The frozen serving table: the kept numbers as :class:`~embcompress.sparse_rows.SparseRows` (the smallest
        format) and the offsets; its outputs equal this table's bit for bit. Raises ``ValueError`` before the
        table is pruned to its target (:meth:`prune_`; fit_staged does it)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 numbers, got precision={precision!r}")
        if not self.at_target:
            raise ValueError(f"{self._owner_name()}: export() needs the table pruned to its target: it keeps "
                             f"{self._kept:,} numbers, over kept_numbers={self.kept_numbers:,}; call prune_() "
                             "(fit_staged does) first")
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)
        served = DeepLightExport.of(cards, self.embedding_dim, torch.where(self.mask, self.weight, 0.0))
        return served.to(self.weight.device).set_field_names(self.field_names).eval()

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim: int, **options) -> BudgetKnob:
        """The knob is ``kept_numbers``, from 1 to every number; the served bytes grow with it."""
        cards = as_cardinalities(cardinalities, owner=cls)
        dim = check_positive_int("embedding_dim", embedding_dim, owner=cls)
        return BudgetKnob("kept_numbers", 1, sum(cards) * dim, lambda k: {"kept_numbers": int(k)})

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim: int, *, budget_bytes: int, **options) -> "DeepLightEmbedding":
        """The shared solver's table: the most kept numbers whose served bytes fit ``budget_bytes`` (at most the
        full table's bytes), with that budget recorded as :attr:`budget_bytes`. It trains dense and is pruned to
        exactly that many numbers by the end of :meth:`fit_staged`."""
        table = super().from_budget(cardinalities, embedding_dim, budget_bytes=budget_bytes, **options)
        table.budget_bytes = min(check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return table

    # ------------------------------------------------------------------------------------------------ stages
    def fit_staged(self, model: nn.Module, data, cfg, schedule: DeepLightSchedule | None = None) -> StagedFit:
        """Train along the ramp, prune exactly to ``kept_numbers`` and fine-tune with the mask fixed, as
        ``schedule`` says (``None``: the default :class:`DeepLightSchedule`); returns the model with this
        (pruned) table, which :meth:`export` serves.

        ``details`` hold the ramp's end (``ramp_steps_run``, ``ramp_kept``, ``ramp_sparsity``: after the best
        epoch is restored), the final prune's ``kept`` / ``pruned`` / ``sparsity``, the table's stored bytes,
        the optimizer-state bytes of each training stage, ``peak_training_bytes`` (the larger stage's) and
        ``serving_bytes``.
        """
        schedule = check_staged_start(self, model, schedule, DeepLightSchedule)

        def prune() -> dict:
            # the ramp's end (after the best epoch is restored), then the exact prune
            ramp = {"ramp_steps_run": self._steps, "ramp_kept": self._kept, "ramp_sparsity": self.sparsity()}
            final = self.prune_()
            return {**ramp, "kept": final["kept"], "pruned": final["pruned"], "sparsity": final["sparsity"]}

        run = train_compress_retrain(self, model, data, cfg, first=("train", "ramp", schedule.train_epochs),
                                     compress=("prune", prune),
                                     second=("finetune", "finetune", schedule.finetune_epochs))
        details: dict[str, Any] = {
            "ramp_val_auc": run.first.val_auc, "ramp_test_auc": run.first.test_auc, "table_bytes": run.first_bytes,
            "ramp_optimizer_bytes": run.first.table_optimizer_bytes, **run.compressed,
            "finetune_optimizer_bytes": run.result.table_optimizer_bytes, "serving_bytes": self.serving_bytes(),
            # both stages hold the dense table and the mask (the same bytes); the optimizer state may differ
            "peak_training_bytes": run.peak_training_bytes,
        }
        return StagedFit(model=model, table=self, result=run.result, stages=run.stages, details=details)

    # ------------------------------------------------------------------------------------------ checkpoints
    def loaded_state_(self) -> None:
        """The host-side step and kept counts from the loaded buffers (one read each, at load time)."""
        if self.mask.device.type == "meta":
            self._steps, self._kept = 0, self.total_numbers
            return
        self._steps = int(self.steps)
        self._kept = int(self.mask.sum())
        if self._steps < 0:
            raise ValueError(f"{self._owner_name()}: the loaded step count is negative ({self._steps})")

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, kept_numbers={self.kept_numbers}, kept={self._kept}, "
                f"steps={self._steps}, prune_every={self.prune_every}, ramp_steps={self.ramp_steps}, "
                f"sparse={self.sparse}")


class DeepLightExport(SparseExport):
    """The served DeepLight table: the kept numbers as sparse rows
    (:class:`~embcompress.tables.sparse_export.SparseExport`), nothing else."""

    registry_name: ClassVar[str] = "deeplight.v1 (export)"
