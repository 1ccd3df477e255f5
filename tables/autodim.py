"""``autodim.v1``: AutoDim — a differentiable search of one embedding width per field, then a retrained table.

Zhao, Liu, Guo, Tang, Liu, Yin & Liu, "AutoDim: Field-aware Embedding Dimension Search in Recommender Systems",
WWW 2021, as the VLDB 2024 embedding-compression benchmark (Hetu's ``tools/EmbeddingMemoryCompression``) runs it.

Stages (:meth:`AutoDimEmbedding.fit_staged`, as an :class:`AutoDimSchedule` says):

1. **Search: the supernet** (:class:`AutoDimEmbedding`). Every field ``f`` has the same candidate widths
   ``d_1 < ... < d_C <= D`` (``candidates``; default the powers of two below ``D``, and ``D``: ``(1, 2, 4, 8, 16)``
   at D=16). Candidate ``c`` has its own fp32 rows for every id of every field, fused over the fields
   (``tables[c]`` ``[N, d_c]``, ``N = sum_f n_f``, row ``offsets[f] + x``), and a bias-free linear map per
   (field, candidate) to the common width (``projections[c]`` ``[F, d_c, D]``; the candidate ``d_c = D`` is used
   as it is). The vector of id ``x`` of field ``f`` is the mix ``sum_c p_fc * P_fc(e_c(x))`` with per-field
   architecture weights ``p_f = softmax((log_softmax(alpha_f) + g_f) / tau)``: Gumbel noise ``g_f`` (one draw per
   field and forward) in training, none in eval (``softmax(alpha_f / tau)``). The temperature follows the
   benchmark's schedule, ``tau_t = max(min_temperature, 1 - decay * t)`` after ``t`` optimisation steps, with
   ``decay = temperature_decay * batch_size`` (the benchmark's ``0.00005 / 2000`` per sample: ``tau`` reaches its
   floor 0.01 after 39.6M samples, about one epoch of Criteo Kaggle).
2. **Choose** (:func:`choose_dims`): per field the candidate of the largest architecture weight
   ``softmax(alpha_f)`` (ties: the narrower), unless the served table would then be over the budget: then,
   until it fits, the field whose one step down (to its next cheaper candidate) saves the most bytes per unit of
   architecture weight given up steps down (a step that gives up no weight first).
3. **Retrain** (:class:`AutoDimServed`): a fresh table with the chosen width per field, from a new random
   initialisation as in the paper (the benchmark does the same), replaces the supernet in the model and trains.

Held while training (stage 1, the peak, ``details["peak_training_bytes"]``): every candidate's rows and
projections, ``4 * (N * sum_c d_c + F * D * sum_{d_c < D} d_c)`` bytes, the architecture logits ``alpha``
fp32 ``[F, C]``, int64 ``offsets`` ``[F]`` and the int64 step count ``steps`` of the temperature, plus the
optimizer's state of them (Adam: two moments of each): at D=16 with the default candidates 31 numbers a row,
1.94 times the full table. Served (the retrained table and its :meth:`AutoDimServed.export`), exactly::

    serving bytes = 4 * sum_f n_f * d_f + 4 * D * sum_{f: d_f < D} d_f + 3 * 8 * F

(rows at the chosen widths, fused per distinct width; one ``[d_f, D]`` projection per field narrower than ``D``;
three int64 ``[F]`` index buffers: each field's width group, first row and projection slot).

Design choices:

* **No batch norm.** The paper normalises each projected candidate with batch norm so that the architecture
  weights compare candidates of equal magnitude. In training mode batch norm makes an id's vector depend on the
  other ids of the batch, which the contract rules out (a bag pools per-id vectors, a served table must not
  depend on what it is batched with). Instead every candidate starts at the same output scale (below) and its
  projection is trainable, so it can keep its own scale; the reference's projection bias is dropped too (the
  batch norm it fed removed it, and the model's layers have their own).
* **First-order search on the training batches.** The paper alternates updates of the architecture weights on
  validation batches (DARTS, first order). Here ``alpha`` is a parameter of the table, updated by the run's
  optimizer with every other parameter on the training batches: one training loop, no held-out batches inside
  it. Training loss favours wider candidates more than validation loss would; the budget step bounds the cost.
* **The temperature advances per optimisation step**, not per forward call: the table hands the training loop
  a parameter-free clock (:meth:`AutoDimEmbedding.row_optimizers`, :class:`TemperatureClock`) that the loop steps
  with its optimizers, so forward passes never change the table (two calls under the same random state agree)
  and every rank of a process group counts the same steps. Outside :func:`embcompress.training.train`, step the
  clock yourself (or call :meth:`AutoDimEmbedding.advance_temperature_`).
* **The budget binds the served table** and is met by the choice, never by the supernet (which holds every
  candidate). The smallest reachable budget is every field at its cheapest candidate (the narrowest, or ``D``
  for a field of one id): just under ``D / d_1`` times compression (``d_1`` the narrowest candidate: 15.8x on the
  default synthetic data at D=16, 207,824 bytes); budgets under it raise :class:`~embcompress.contract.BudgetError`
  naming it. Budgets above the full table's bytes are capped there.

Initialisation (``init_std``, the std of the returned vectors): ``alpha`` starts at 0 (no preference), so the
supernet returns the mean of its ``C`` candidates and each candidate is scaled to return ``init_std * sqrt(C)``:
rows ``N(0, init_std**2 * C * D / d_c)`` and each field's projection Gaussian scaled to a Frobenius norm of
``sqrt(d_c)`` (so an output coordinate has variance ``init_std**2 * C`` on average over coordinates); the
candidate ``D`` has rows ``N(0, init_std**2 * C)``. The retrained table starts the same way with ``C = 1``.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from embcompress.contract import (
    BudgetError, CompressedEmbedding, check_bool, check_int_list, check_number, check_per_field,
    check_positive_int, resolve_init_std,
)
from embcompress.optembed import StagedFit, replace_table
from embcompress.registry import TABLES, check_table_options
from embcompress.schedule import StagedSchedule, stage_config

__all__ = [
    "AutoDimEmbedding", "AutoDimServed", "AutoDimSchedule", "TemperatureClock", "choose_dims", "served_bytes",
    "default_candidates",
]

_NAME = "autodim.v1"
_FP32 = 4
_INT64 = 8
_INDEX_BUFFERS = 3  # per field: width group, first row in its group, projection slot
_DEFAULT_BATCH = 4096  # TrainConfig's default batch size: the per-step decay of a table outside fit_staged


# -------------------------------------------------------------------------------------------------- sizes
def default_candidates(embedding_dim: int) -> tuple[int, ...]:
    """The powers of two below ``D``, and ``D``: ``(1, 2, 4, 8, 16)`` at D=16.

    >>> default_candidates(16), default_candidates(12), default_candidates(1)
    ((1, 2, 4, 8, 16), (1, 2, 4, 8, 12), (1,))
    """
    return tuple(sorted({1 << k for k in range(embedding_dim.bit_length()) if 1 << k < embedding_dim}
                        | {embedding_dim}))


def _field_bytes(n: int, d: int, dim: int) -> int:
    return _FP32 * n * d + (_FP32 * d * dim if d < dim else 0)


def served_bytes(cardinalities: Sequence[int], embedding_dim: int, dims: Sequence[int]) -> int:
    """Exact bytes of an :class:`AutoDimServed` table with width ``dims[f]`` for field ``f`` (the module
    docstring's formula).

    >>> served_bytes([1000, 10], 8, [2, 8]) == 4 * (1000 * 2 + 10 * 8) + 4 * 8 * 2 + 3 * 8 * 2
    True
    """
    return (sum(_field_bytes(n, d, embedding_dim) for n, d in zip(cardinalities, dims))
            + _INDEX_BUFFERS * _INT64 * len(cardinalities))


def _minimum_bytes(cardinalities: Sequence[int], embedding_dim: int, candidates: Sequence[int]) -> int:
    return (sum(min(_field_bytes(n, d, embedding_dim) for d in candidates) for n in cardinalities)
            + _INDEX_BUFFERS * _INT64 * len(cardinalities))


def choose_dims(
    weights: Sequence[Sequence[float]],
    cardinalities: Sequence[int],
    embedding_dim: int,
    candidates: Sequence[int],
    budget_bytes: int | None = None,
) -> tuple[list[int], int]:
    """``(dims, moves)``: the width of every field, and how many budget moves it took.

    ``weights[f][c]`` is the architecture weight of candidate ``candidates[c]`` in field ``f``. Each field starts
    at its largest weight (ties: the narrower candidate). While the served bytes (:func:`served_bytes`) are over
    ``budget_bytes``, one field moves one step down in bytes (to the dearest of its cheaper candidates, usually the
    next narrower width): the field whose step saves the most bytes per unit of weight given up
    (``saved / (w_now - w_new)``; a step that gives up no weight comes first, the largest saving among those; ties
    go to the lower field). Every step saves bytes and every field can step down to its cheapest candidate, so it
    ends, within the budget whenever every field's cheapest candidate is; :class:`BudgetError` otherwise.

    >>> w = [[0.1, 0.2, 0.7], [0.6, 0.3, 0.1]]
    >>> choose_dims(w, [1000, 1000], 4, (1, 2, 4))   # no budget: the argmax of each field
    ([4, 1], 0)
    >>> choose_dims(w, [1000, 1000], 4, (1, 2, 4), budget_bytes=served_bytes([1000, 1000], 4, [2, 1]))
    ([2, 1], 1)
    """
    dim = embedding_dim
    now = [max(range(len(candidates)), key=lambda c, w=w: (w[c], -c)) for w in weights]
    cost = [[_field_bytes(n, d, dim) for d in candidates] for n in cardinalities]
    moves = 0
    if budget_bytes is None:
        return [candidates[c] for c in now], moves
    total = served_bytes(cardinalities, dim, [candidates[c] for c in now])
    while total > budget_bytes:
        best, best_key = None, None
        for f, (w, b) in enumerate(zip(weights, cost)):
            k = now[f]
            cheaper = [c for c in range(len(candidates)) if b[c] < b[k]]
            if not cheaper:
                continue
            # One step down: the dearest candidate cheaper than the current one (of those, the larger weight).
            c = max(cheaper, key=lambda c, w=w, b=b: (b[c], w[c], -c))
            saved, lost = b[k] - b[c], w[k] - w[c]
            key = (lost <= 0, saved if lost <= 0 else saved / lost, -f)
            if best_key is None or key > best_key:
                best, best_key = (f, c), key
        if best is None:
            raise BudgetError(
                f"{_NAME}: the served table needs at least {total:,} bytes (every field at its cheapest candidate "
                f"width), over the budget of {budget_bytes:,} bytes (minimum budget {total:,} bytes)")
        f, c = best
        total -= cost[f][now[f]] - cost[f][c]
        now[f] = c
        moves += 1
    return [candidates[c] for c in now], moves


def _projection_(weight: torch.Tensor, width: int) -> torch.Tensor:
    """Fill ``[..., width, D]`` projections with Gaussians scaled to a Frobenius norm of ``sqrt(width)`` each."""
    with torch.no_grad():
        weight.normal_()
        if weight.device.type != "meta" and weight.numel():
            norms = weight.flatten(-2).norm(dim=-1).clamp(min=1e-12)
            weight.mul_((width**0.5 / norms)[..., None, None])
    return weight


def _rows_(weight: torch.Tensor, std: float) -> torch.Tensor:
    with torch.no_grad():
        return weight.normal_(0.0, std)


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class AutoDimSchedule(StagedSchedule):
    """How :meth:`AutoDimEmbedding.fit_staged` trains: the search, the temperature, the retraining.

    Args:
        search_epochs: epochs of the supernet (``None``: the run's ``TrainConfig.epochs``).
        retrain_epochs: epochs of the retrained table (``None``: the run's ``TrainConfig.epochs``).
        temperature_decay: how fast the temperature falls, per training sample: after ``t`` steps of batches of
            ``B`` rows, ``tau = max(min_temperature, 1 - temperature_decay * B * t)``; 0 keeps ``tau = 1``. The
            default is the benchmark's, ``0.00005 / 2000``.
        min_temperature: the floor of ``tau``, in ``(0, 1]``.

    >>> AutoDimSchedule.from_dict({"search_epochs": 2, "min_temperature": 0.1}).min_temperature
    0.1
    >>> AutoDimSchedule(temperature_decay=-1)
    Traceback (most recent call last):
        ...
    ValueError: AutoDimSchedule: temperature_decay must be a finite number >= 0, got -1
    """

    search_epochs: int | None = None
    retrain_epochs: int | None = None
    temperature_decay: float = 0.00005 / 2000
    min_temperature: float = 0.01

    def __post_init__(self) -> None:
        owner = "AutoDimSchedule"
        checked = {
            "search_epochs": check_positive_int("search_epochs", self.search_epochs, optional=True, owner=owner),
            "retrain_epochs": check_positive_int("retrain_epochs", self.retrain_epochs, optional=True, owner=owner),
            "temperature_decay": check_number("temperature_decay", self.temperature_decay, lo=0, owner=owner),
            "min_temperature": check_number("min_temperature", self.min_temperature, lo=0, hi=1, lo_open=True,
                                            owner=owner),
        }
        self._store(checked)


    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "AutoDimSchedule":
        """A schedule from a suite's plain mapping; absent keys keep their defaults (``None`` or ``{}``: the
        default schedule). An unknown key or a bad value raises :class:`~embcompress.specs.SpecError` naming
        ``where``, the key and the value.

        >>> AutoDimSchedule.from_dict({"search_epoch": 3}, "methods[4].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[4].schedule: unknown key 'search_epoch'; did you mean 'search_epochs'? (accepted keys: search_epochs, retrain_epochs, temperature_decay, min_temperature)
        """
        return super().from_dict(mapping, where)


class TemperatureClock(torch.optim.Optimizer):
    """Advances an :class:`AutoDimEmbedding`'s temperature by one step per ``step()``: no parameters, no state.

    The training loop steps it with the model's optimizers (:meth:`AutoDimEmbedding.row_optimizers`), so the
    temperature follows optimisation steps. It holds the table's int64 ``steps`` buffer as its only "parameter"
    (an optimizer needs one), which it never treats as one.
    """

    def __init__(self, table: "AutoDimEmbedding") -> None:
        super().__init__([table.steps], {"lr": 0.0})
        self._table = table

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the clock's tick
        self._table.advance_temperature_()
        return None


# ----------------------------------------------------------------------------------------------- supernet
@TABLES.register(_NAME)
class AutoDimEmbedding(CompressedEmbedding):
    """The AutoDim supernet: every candidate width of every field, mixed by per-field architecture weights.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]`` (or ``[...] -> [..., D]`` for a single table); ids of
    field ``f`` in ``[0, n_f)``. Stored: ``tables[c]`` fp32 ``[N, d_c]`` per candidate, ``projections[c]`` fp32
    ``[F, d_c, D]`` per candidate narrower than ``D``, ``alpha`` fp32 ``[F, C]`` (the architecture logits),
    int64 ``offsets`` ``[F]`` and ``steps`` ``[]`` (optimisation steps so far: the temperature's clock).
    :meth:`serving_bytes` is the served table's, with the widths :meth:`chosen_dims` picks now (before the search:
    every field at its narrowest candidate, the architecture weights being tied).

    Args:
        candidates: the candidate widths, strictly increasing, each in ``[1, D]`` (``None``:
            :func:`default_candidates`).
        sparse: sparse gradients for the candidates' rows (``torch.optim.SparseAdam``), and for the retrained
            table's rows.
        init_std: std of the returned vectors at initialisation (``None``: the library default).
        budget_bytes: the most bytes the served table may take (``None``: no budget); :meth:`from_budget` sets it.

    >>> import torch
    >>> t = AutoDimEmbedding([1000, 10], 8, candidates=[2, 4, 8], budget_bytes=10_000)
    >>> t(torch.tensor([[999, 9], [0, 0]])).shape
    torch.Size([2, 2, 8])
    >>> [tuple(w.shape) for w in t.tables], [tuple(p.shape) for p in t.projections]
    ([(1010, 2), (1010, 4), (1010, 8)], [(2, 2, 8), (2, 4, 8)])
    >>> t.chosen_dims()   # tied weights: the narrowest candidate of every field
    [2, 2]
    >>> t.serving_bytes() == 4 * (1000 * 2 + 10 * 2) + 4 * 8 * (2 + 2) + 3 * 8 * 2
    True
    >>> with torch.no_grad():
    ...     _ = t.alpha.copy_(torch.tensor([[0.0, 0.0, 5.0], [0.0, 5.0, 0.0]]))
    >>> t.chosen_dims()   # the argmax would be [8, 4]: 8 * 4 * 1000 bytes in field 0 alone are over budget
    [2, 4]
    """

    trains_in_stages: ClassVar[bool] = True
    #: Gumbel noise on the architecture weights in training mode.
    stochastic_training: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[AutoDimSchedule]] = AutoDimSchedule
    # The budget shapes the choice, not what the saved rows, projections and logits mean.
    checkpoint_ignores: ClassVar[tuple[str, ...]] = ("init_std", "sparse", "seed", "budget_bytes")

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        candidates: Sequence[int] | None = None,
        sparse: bool = False,
        init_std: float | None = None,
        budget_bytes: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        D = self.embedding_dim
        cands = check_int_list("candidates", candidates, lo=1, optional=True, owner=self)
        cands = default_candidates(D) if cands is None else cands
        if any(c > D for c in cands):
            raise self._fail(f"candidates must be widths in [1, {D}] (at most embedding_dim), got {list(cands)}")
        if any(a >= b for a, b in zip(cands, cands[1:])):
            raise self._fail(f"candidates must be strictly increasing, got {list(cands)}")
        self.candidates = cands
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, D, owner=self)
        check_number("budget_bytes", budget_bytes, positive=True, optional=True, owner=self)
        self.budget_bytes = None if budget_bytes is None else self._check_budget(budget_bytes)
        floor = _minimum_bytes(self.cardinalities, D, cands)
        if self.budget_bytes is not None and floor > self.budget_bytes:  # refused now, not at the first choice
            raise BudgetError(
                f"{_NAME}: a budget of {self.budget_bytes:,} bytes is under the smallest table it serves (every "
                f"field at its cheapest candidate width of {list(cands)}): minimum budget {floor:,} bytes")
        self.set_temperature_schedule(decay=AutoDimSchedule().temperature_decay * _DEFAULT_BATCH,
                                      min_temperature=AutoDimSchedule().min_temperature)

        C, rows = len(cands), sum(self.cardinalities)
        scale = self.init_std * C**0.5  # each candidate's output std: their mean at tied weights has init_std
        self.tables = nn.ParameterList(
            nn.Parameter(_rows_(torch.empty(rows, d), scale * (D / d) ** 0.5)) for d in cands)
        self.projections = nn.ParameterList(
            nn.Parameter(_projection_(torch.empty(self.num_fields, d, D), d)) for d in cands if d < D)
        self.alpha = nn.Parameter(torch.zeros(self.num_fields, C))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))

    # ------------------------------------------------------------------------------------------- temperature
    def set_temperature_schedule(self, *, decay: float, min_temperature: float) -> "AutoDimEmbedding":
        """``tau_t = max(min_temperature, 1 - decay * t)`` after ``t`` optimisation steps (``decay`` per step;
        :meth:`fit_staged` sets it to the schedule's per-sample decay times the batch size)."""
        self.temperature_decay = check_number("decay", decay, lo=0, owner=self)
        self.min_temperature = check_number("min_temperature", min_temperature, lo=0, hi=1, lo_open=True,
                                            owner=self)
        return self

    def _temperature(self) -> torch.Tensor:
        t = self.steps.to(self.alpha.dtype)
        return (1.0 - self.temperature_decay * t).clamp(min=self.min_temperature)

    def temperature(self) -> float:
        """The temperature ``tau`` now (a host read of the step count)."""
        return float(self._temperature())

    @torch.no_grad()
    def advance_temperature_(self, steps: int = 1) -> "AutoDimEmbedding":
        """Count ``steps`` more optimisation steps (what :class:`TemperatureClock` does once per step)."""
        self.steps.add_(steps)
        return self

    def row_optimizers(self, lr: float, *, seed: int = 0) -> list[torch.optim.Optimizer]:
        """The temperature's clock (:class:`TemperatureClock`): the training loop steps it once per step."""
        return [TemperatureClock(self)]

    def mixing_weights(self) -> torch.Tensor:
        """``[F, C]``: the weights the forward mixes candidates with now: ``softmax((log_softmax(alpha) + g) /
        tau)`` with fresh Gumbel noise ``g`` in training mode, ``softmax(alpha / tau)`` in eval mode."""
        logits = torch.log_softmax(self.alpha, dim=-1)
        if self.training:
            u = torch.rand_like(logits).clamp(1e-10, 1.0 - 1e-7)
            logits = logits - torch.log(-torch.log(u))
        return torch.softmax(logits / self._temperature(), dim=-1)

    def architecture_weights(self) -> torch.Tensor:
        """``[F, C]``: ``softmax(alpha)`` per field, the weights :meth:`chosen_dims` reads (no noise, no
        temperature: the same argmax as the eval-mode mix)."""
        return torch.softmax(self.alpha.detach(), dim=-1)

    # ----------------------------------------------------------------------------------------------- forward
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, _ = self.checked_ids(ids)
        F_ = self.num_fields
        shape = ids.shape if self.single else ids.shape[:-1]
        rows = ids.reshape(-1, F_) + self.offsets  # [P, F]: one column per field, no gather of projections
        weights = self.mixing_weights()
        out = None
        for c, d in enumerate(self.candidates):
            v = F.embedding(rows, self.tables[c], sparse=self.sparse)  # [P, F, d]
            if d < self.embedding_dim:
                v = torch.einsum("pfd,fde->pfe", v, self.projections[c])
            term = v * weights[:, c, None]
            out = term if out is None else out + term
        return out.reshape(*shape, *(() if self.single else (F_,)), self.embedding_dim)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # Any layout (bags): each id gathers its field's projections.
        fields = fields.expand_as(ids)
        rows = ids + self.offsets[fields]
        weights = self.mixing_weights()[fields]  # [..., C]
        out = None
        for c, d in enumerate(self.candidates):
            v = F.embedding(rows, self.tables[c], sparse=self.sparse)
            if d < self.embedding_dim:
                v = torch.matmul(v.unsqueeze(-2), self.projections[c][fields]).squeeze(-2)
            term = v * weights[..., c, None]
            out = term if out is None else out + term
        return out

    def sparse_parameters(self) -> list[nn.Parameter]:
        return list(self.tables) if self.sparse else []

    def undecayed_parameters(self) -> list[nn.Parameter]:
        return [self.alpha]

    # ------------------------------------------------------------------------------------ choice & budget
    def chosen_dims(self) -> list[int]:
        """The width of every field the served table gets now (:func:`choose_dims` on
        :meth:`architecture_weights`, within :attr:`budget_bytes`). On ``meta`` (no values): the tied weights of a
        fresh table."""
        if self.alpha.device.type == "meta":
            weights = [[0.0] * len(self.candidates)] * self.num_fields
        else:
            weights = self.architecture_weights().cpu().tolist()
        return choose_dims(weights, self.cardinalities, self.embedding_dim, self.candidates, self.budget_bytes)[0]

    def serving_bytes(self) -> int:
        """Exact bytes of the table that would be served with the widths chosen now (:meth:`chosen_dims`): before
        the search every field's narrowest candidate (or a cheaper one the budget needs), after it the search's
        choice. Always at most :attr:`budget_bytes`."""
        return served_bytes(self.cardinalities, self.embedding_dim, self.chosen_dims())

    def minimum_serving_bytes(self) -> int:
        """The smallest served table: every field at its cheapest candidate (the smallest reachable budget)."""
        return _minimum_bytes(self.cardinalities, self.embedding_dim, self.candidates)

    @classmethod
    def from_budget(cls, cardinalities: int | Sequence[int], embedding_dim: int, *, budget_bytes: int,
                    **options) -> "AutoDimEmbedding":
        """The supernet holds every candidate; the budget (at most the full table's bytes, recorded as
        :attr:`budget_bytes`) binds the served table through the choice. Raises :class:`BudgetError` naming the
        minimum when even every field at its cheapest candidate is over it."""
        check_table_options(cls, {**options, "budget_bytes": budget_bytes}, f"{_NAME}.from_budget")
        budget = min(cls._check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return cls(cardinalities, embedding_dim, budget_bytes=budget, **options)

    def export(self, precision: str | None = None) -> "AutoDimServed":
        """The supernet is not what is served: :meth:`fit_staged` retrains the chosen widths, and its
        ``StagedFit.table`` (an :class:`AutoDimServed`) exports."""
        raise ValueError(f"{_NAME}: the supernet serves the retrained table of the chosen widths; run fit_staged "
                         "(search, choice, retraining) and export its StagedFit.table")

    def served_table(self) -> "AutoDimServed":
        """A fresh :class:`AutoDimServed` at :meth:`chosen_dims`, on this table's device, with its field names,
        ``sparse`` and ``init_std`` (the retraining starts from it)."""
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)
        served = AutoDimServed(cards, self.embedding_dim, dims=self.chosen_dims(), sparse=self.sparse,
                               init_std=self.init_std)
        return served.to(self.alpha.device).set_field_names(self.field_names)

    # ------------------------------------------------------------------------------------------------ stages
    def fit_staged(self, model: nn.Module, data, cfg, schedule: AutoDimSchedule | None = None) -> StagedFit:
        """Search (train the supernet), choose the widths within the budget, swap in a fresh table of those
        widths and retrain it, as ``schedule`` says (``None``: the default :class:`AutoDimSchedule`).

        Returns the model with the served table (``StagedFit.table``, an :class:`AutoDimServed`). ``details``:
        ``dims`` (chosen), ``argmax_dims`` (before the budget), ``budget_moves``, ``architecture_weights``
        (``softmax(alpha)`` per field), ``temperature`` (at the end of the search), ``search_val_auc`` /
        ``search_test_auc``, ``supernet_bytes`` / ``supernet_optimizer_bytes`` and their sum
        ``peak_training_bytes`` (the search holds every candidate: the peak), ``serving_bytes``, ``budget_bytes``.
        """
        from embcompress.training import train  # the loop (and scikit-learn) only when a staged run starts

        schedule = AutoDimSchedule() if schedule is None else schedule
        if not isinstance(schedule, AutoDimSchedule):
            raise ValueError(f"{_NAME}: schedule must be an AutoDimSchedule or None, got {schedule!r}")
        if not any(m is self for m in model.modules()):
            raise ValueError(f"{_NAME}: fit_staged: the table is not a submodule of the model")

        def stage_cfg(epochs: int | None, suffix: str):
            return stage_config(cfg, epochs, suffix)

        self.set_temperature_schedule(decay=schedule.temperature_decay * cfg.batch_size,
                                      min_temperature=schedule.min_temperature)
        stages: dict[str, float] = {}
        start = time.perf_counter()
        search = train(model, data, stage_cfg(schedule.search_epochs, "search"))
        stages["search"] = time.perf_counter() - start
        weights = self.architecture_weights().cpu().tolist()
        argmax, _ = choose_dims(weights, self.cardinalities, self.embedding_dim, self.candidates)
        dims, moves = choose_dims(weights, self.cardinalities, self.embedding_dim, self.candidates,
                                  self.budget_bytes)
        supernet_bytes = self.memory_report().total_bytes
        details: dict[str, Any] = {
            "candidates": list(self.candidates), "dims": dims, "argmax_dims": argmax, "budget_moves": moves,
            "architecture_weights": weights, "temperature": self.temperature(), "search_steps": int(self.steps),
            "search_val_auc": search.val_auc, "search_test_auc": search.test_auc,
            "supernet_bytes": supernet_bytes, "supernet_optimizer_bytes": search.table_optimizer_bytes,
            # The runner's training bytes: the search held every candidate, more than the retrained table holds.
            "peak_training_bytes": supernet_bytes + search.table_optimizer_bytes,
            "budget_bytes": self.budget_bytes,
        }

        start = time.perf_counter()
        served = self.served_table()
        if served.dims != tuple(dims):  # chosen_dims reads the same weights: the same choice
            raise RuntimeError(f"{_NAME}: the served widths {served.dims} differ from the choice {dims}")
        replace_table(model, self, served)
        result = train(model, data, stage_cfg(schedule.retrain_epochs, "retrain"))
        stages["retrain"] = time.perf_counter() - start
        details["serving_bytes"] = served.memory_report().serving_bytes
        if self.budget_bytes is not None and details["serving_bytes"] > self.budget_bytes:
            raise RuntimeError(f"{_NAME}: served {details['serving_bytes']:,} bytes for a budget of "
                               f"{self.budget_bytes:,}")
        return StagedFit(model=model, table=served, result=result, stages=stages, details=details)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, candidates={list(self.candidates)}, budget_bytes={self.budget_bytes}, "
                f"sparse={self.sparse}")


# ------------------------------------------------------------------------------------------- served table
class AutoDimServed(CompressedEmbedding):
    """The retrained (and served) AutoDim table: one width per field, projected to ``D``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``. Fields are grouped by width: group ``g`` of width
    ``w_g`` (ascending) stores ``weights[g]`` fp32 ``[sum of its fields' n_f, w_g]`` (its fields' rows in field
    order) and, when ``w_g < D``, ``projections[g]`` fp32 ``[fields in the group, w_g, D]``; int64 ``[F]``
    buffers ``field_group``, ``field_shift`` (row of id 0 in its group) and ``field_slot`` (its projection). The
    vector of id ``x`` of field ``f`` is ``weights[g][x + shift_f] @ projections[g][slot_f]`` (no projection at
    width ``D``). :meth:`export` is a frozen copy of the same layout, bytes and outputs.

    Args:
        dims: the width of each field (one int for all, or one per field), each in ``[1, D]``.
        sparse: sparse gradients for the rows (``torch.optim.SparseAdam``); projections stay dense.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = AutoDimServed([1000, 3, 50], 8, dims=[2, 8, 2])
    >>> [tuple(w.shape) for w in t.weights], [tuple(p.shape) for p in t.projections]
    ([(1050, 2), (3, 8)], [(2, 2, 8)])
    >>> ids = torch.tensor([[999, 2, 49], [0, 0, 0]])
    >>> t(ids).shape
    torch.Size([2, 3, 8])
    >>> t.memory_report().total_bytes == 4 * (1050 * 2 + 3 * 8) + 4 * 8 * (2 + 2) + 3 * 8 * 3
    True
    >>> served = t.export()
    >>> torch.equal(served(ids), t.eval()(ids)), served.memory_report().total_bytes == t.serving_bytes()
    (True, True)
    """

    registry_name: ClassVar[str] = "autodim.v1 (served)"

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        dims: int | Sequence[int],
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        D = self.embedding_dim
        dims = check_per_field("dims", dims, self.num_fields, lo=1, owner=self)
        if any(d > D for d in dims):
            raise self._fail(f"dims must be widths in [1, {D}] (at most embedding_dim), got {dims}")
        self.dims = tuple(dims)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, D, owner=self)
        self.widths = tuple(sorted(set(self.dims)))
        self._group_fields = [[f for f, d in enumerate(self.dims) if d == w] for w in self.widths]
        group, shift, slot = [0] * self.num_fields, [0] * self.num_fields, [0] * self.num_fields
        rows = []
        for g, fields in enumerate(self._group_fields):
            total = 0
            for k, f in enumerate(fields):
                group[f], shift[f], slot[f] = g, total, k
                total += self.cardinalities[f]
            rows.append(total)
        s = self.init_std
        self.weights = nn.ParameterList(
            nn.Parameter(_rows_(torch.empty(r, w), s * (D / w) ** 0.5)) for r, w in zip(rows, self.widths))
        self.projections = nn.ParameterList(
            nn.Parameter(_projection_(torch.empty(len(fields), w, D), w))
            for w, fields in zip(self.widths, self._group_fields) if w < D)
        self.register_buffer("field_group", torch.tensor(group, dtype=torch.int64))
        self.register_buffer("field_shift", torch.tensor(shift, dtype=torch.int64))
        self.register_buffer("field_slot", torch.tensor(slot, dtype=torch.int64))
        order = [f for fields in self._group_fields for f in fields]
        self._in_order = order == list(range(self.num_fields))
        self._inverse = [order.index(f) for f in range(self.num_fields)]
        self._columns: dict[torch.device, tuple[list[torch.Tensor], torch.Tensor]] = {}

    def _cols(self, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
        # The fields of each width group and the inverse of their concatenated order: configuration (from dims),
        # cached per device like the base class's field positions.
        if device not in self._columns:
            self._columns[device] = ([torch.tensor(f, dtype=torch.int64, device=device) for f in self._group_fields],
                                     torch.tensor(self._inverse, dtype=torch.int64, device=device))
        return self._columns[device]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        ids, _ = self.checked_ids(ids)
        F_, D = self.num_fields, self.embedding_dim
        shape = ids.shape if self.single else ids.shape[:-1]
        ids = ids.reshape(-1, F_)
        cols, inverse = self._cols(ids.device)
        parts = []
        for g, w in enumerate(self.widths):  # a loop over the distinct widths, never over fields
            own = cols[g]
            rows = ids.index_select(1, own) + self.field_shift.index_select(0, own)  # [P, S_g]
            v = F.embedding(rows, self.weights[g], sparse=self.sparse)  # [P, S_g, w]
            if w < D:
                v = torch.einsum("psd,sde->pse", v, self.projections[g])
            parts.append(v)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
        if not self._in_order:
            out = out.index_select(1, inverse)
        return out.reshape(*shape, *(() if self.single else (F_,)), D)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # Any layout (bags): every width group computes its ids (the others' read row 0 and are discarded).
        fields = fields.expand_as(ids)
        group, rows, slot = self.field_group[fields], ids + self.field_shift[fields], self.field_slot[fields]
        out = None
        for g, w in enumerate(self.widths):
            mine = group == g
            v = F.embedding(torch.where(mine, rows, 0), self.weights[g], sparse=self.sparse)
            if w < self.embedding_dim:
                v = torch.matmul(v.unsqueeze(-2), self.projections[g][torch.where(mine, slot, 0)]).squeeze(-2)
            out = v if out is None else torch.where(mine.unsqueeze(-1), v, out)
        return out

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [w for w in self.weights if w.requires_grad] if self.sparse else []

    def serving_bytes(self) -> int:
        """Exact bytes it stores and serves (the module docstring's formula; :meth:`export` stores the same)."""
        return served_bytes(self.cardinalities, self.embedding_dim, self.dims)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "AutoDimServed":
        """A frozen copy (no parameter trains) in eval mode; it outputs this table's eval outputs bit for bit
        (the same tensors through the same code)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 rows, got precision={precision!r}")
        served = copy.deepcopy(self)
        for p in served.parameters():
            p.requires_grad_(False)
        return served.eval()

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "AutoDimServed":
        """Rebuild a saved served table from its state_dict alone (the widths are in its saved options)."""
        options = state["_extra_state"]["options"]
        table = cls(options["cardinalities"], options["embedding_dim"], dims=options["dims"],
                    sparse=options.get("sparse", False))
        table.load_state_dict(state)
        return table

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int, **options):
        raise BudgetError(f"{cls.registry_name}: a served AutoDim table is made by AutoDimEmbedding.fit_staged "
                          "and cannot compress on its own")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dims={list(self.dims)}, sparse={self.sparse}"
