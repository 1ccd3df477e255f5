"""The OptEmbed pipeline: supernet training, budgeted evolutionary search of field widths, retraining, export.

Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction", CIKM 2022. The
table and its stages are in ``tables/optembed.py``; this module drives them, as :class:`OptEmbedSchedule` says.

Import direction: ``embcompress.tables.optembed`` imports this module (for :class:`OptEmbedSchedule`, its
``schedule_type``, and :func:`run_optembed`, which its ``fit_staged`` hook calls); this module never imports the
table module. It drives the table through the table's stage methods (``set_threshold_training``,
``current_row_mask``, ``kept_per_field``, ``set_dims``, ``export_bytes``, ``freeze``, ``export``), so there is
no cycle and no import inside the table's hook. The training loop (and scikit-learn with it) is imported when
:func:`run_optembed` runs, so that importing the tables does not load it.

The search (:func:`evolutionary_search`) goes beyond the paper: it takes a memory budget and admits only
candidates whose export fits it. A candidate over budget is *repaired* (widths lowered one step at a time, each
step on a random field chosen in proportion to its kept rows) rather than dropped, so the population stays full
at high compression, where almost no uniformly drawn candidate fits. Unlike the reference code, mutation and
crossover build new tuples (the population is never aliased and mutated in place), and the crossover point is
drawn over the fields, not over the width range.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .budget import BudgetError
from .data import Batch
from .specs import SpecError, check_mapping_keys
from .validate import check_bool, check_choice, check_int, check_number, check_positive_int

if TYPE_CHECKING:
    from .data import CTRData
    from .training import TrainConfig, TrainResult

__all__ = [
    "SearchConfig", "OptEmbedSchedule", "SearchResult", "StagedFit", "evolutionary_search", "run_optembed",
    "replace_table", "rewind_",
]

Candidate = tuple[int, ...]
PRUNE_MODES = ("thresholds", "budget")


@dataclass(frozen=True)
class SearchConfig:
    """Evolution settings (the OptEmbed README's: 10 mutations, 10 crossovers, 30 generations, p = 0.1).

    ``search_rows``: validation rows each fitness evaluation predicts (a fixed random sample; ``None``: all).
    ``seed``: the search's random seed; ``None`` is the run's seed (``TrainConfig.seed``) in
    :func:`run_optembed`, and 0 when :func:`evolutionary_search` is called on its own.
    """

    population: int = 20
    keep: int = 10
    mutations: int = 10
    crossovers: int = 10
    generations: int = 30
    mutate_prob: float = 0.1
    seed: int | None = None
    search_rows: int | None = 50_000

    def __post_init__(self) -> None:
        # Typed (no coercion of 2.7 or "5"), stored as plain Python values (numpy scalars accepted).
        checked = {name: check_int(name, getattr(self, name), lo=lo, owner="SearchConfig")
                   for name, lo in (("population", 1), ("keep", 1), ("mutations", 0), ("crossovers", 0),
                                    ("generations", 0))}
        checked["mutate_prob"] = check_number("mutate_prob", self.mutate_prob, lo=0, hi=1, owner="SearchConfig")
        checked["seed"] = check_int("seed", self.seed, optional=True, owner="SearchConfig")
        checked["search_rows"] = check_positive_int("search_rows", self.search_rows, optional=True,
                                                    owner="SearchConfig")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen dataclass


@dataclass(frozen=True)
class OptEmbedSchedule:
    """How :func:`run_optembed` trains an OptEmbed table: everything but the table itself.

    Args:
        search: the evolutionary width search (:class:`SearchConfig`).
        threshold_lr: plain-SGD learning rate of the pruning thresholds in supernet training.
        alpha: weight of the threshold regulariser ``alpha * sum(exp(-t))`` in supernet training.
        rewind: retrain from the weights at the start of supernet training (the trained thresholds kept).
        retrain_epochs: epochs of retraining (``None``: the run's ``TrainConfig.epochs``).
        prune: which rows the export keeps. ``"thresholds"`` (the paper): the rows the learned thresholds keep
            (``||e||_1 > t``), so how much is pruned follows ``threshold_lr`` and ``alpha``, and the search only
            narrows widths within the budget. ``"budget"``: rows ranked by the same importance ``||e||_1 - t``,
            and for each candidate widths the search scores, as many of the most important rows as the budget
            holds at those widths: the export lands at the budget, and the search trades rows for width.

    Every field is checked here, before any training: a bad value raises ``ValueError`` naming the field and
    the value. A suite gives the schedule as a flat mapping (:meth:`from_dict`).

    >>> OptEmbedSchedule.from_dict({"threshold_lr": 0.3, "generations": 10, "search_rows": 20000}).search.generations
    10
    >>> OptEmbedSchedule(rewind="no")
    Traceback (most recent call last):
        ...
    ValueError: OptEmbedSchedule: rewind must be a bool (True or False), got 'no'
    """

    search: SearchConfig = SearchConfig()
    threshold_lr: float = 1e-2
    alpha: float = 1e-2
    rewind: bool = True
    retrain_epochs: int | None = None
    prune: str = "thresholds"

    def __post_init__(self) -> None:
        if not isinstance(self.search, SearchConfig):
            raise ValueError(f"OptEmbedSchedule: search must be a SearchConfig, got {self.search!r}")
        owner = "OptEmbedSchedule"
        checked = {
            "threshold_lr": check_number("threshold_lr", self.threshold_lr, positive=True, owner=owner),
            "alpha": check_number("alpha", self.alpha, lo=0, owner=owner),
            "rewind": check_bool("rewind", self.rewind, owner=owner),
            "retrain_epochs": check_positive_int("retrain_epochs", self.retrain_epochs, optional=True, owner=owner),
            "prune": check_choice("prune", self.prune, PRUNE_MODES, owner=owner),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen dataclass

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys of the flat mapping :meth:`from_dict` reads: the search's, then the schedule's own."""
        own = tuple(f.name for f in dataclasses.fields(cls) if f.name != "search")
        return tuple(f.name for f in dataclasses.fields(SearchConfig)) + own

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "OptEmbedSchedule":
        """A schedule from a suite's plain mapping (what ``yaml.safe_load`` gives), flat: the
        :class:`SearchConfig` fields (``population``, ``keep``, ``mutations``, ``crossovers``, ``generations``,
        ``mutate_prob``, ``seed``, ``search_rows``) beside ``threshold_lr``, ``alpha``, ``rewind``,
        ``retrain_epochs`` and ``prune``; absent keys keep their defaults (``None`` or ``{}``: the default schedule).

        Flat, not a nested ``search:`` mapping, so a suite's ``schedule:`` holds exactly the keys its ``table:``
        held when they were table options. An unknown key raises :class:`~embcompress.specs.SpecError` naming
        close matches; a bad value, ``SpecError`` naming ``where``, the field and the value.

        >>> OptEmbedSchedule.from_dict({"generation": 3}, "methods[2].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[2].schedule: unknown key 'generation'; did you mean 'generations'? (accepted keys: population, keep, mutations, crossovers, generations, mutate_prob, seed, search_rows, threshold_lr, alpha, rewind, retrain_epochs, prune)
        """
        mapping = check_mapping_keys(mapping, cls.keys(), where)
        search_keys = {f.name for f in dataclasses.fields(SearchConfig)}
        try:
            search = SearchConfig(**{k: v for k, v in mapping.items() if k in search_keys})
            return cls(search=search, **{k: v for k, v in mapping.items() if k not in search_keys})
        except ValueError as err:
            raise SpecError(f"{where}: {err}") from None


@dataclass
class SearchResult:
    best: Candidate
    fitness: float
    bytes: int
    evaluations: int
    history: list[dict] = field(default_factory=list)  # per generation: best fitness and bytes


def evolutionary_search(
    num_fields: int,
    max_dim: int,
    fitness: Callable[[Candidate], float],
    size: Callable[[Candidate], int],
    *,
    budget_bytes: int | None = None,
    weights: Sequence[float] | None = None,
    cfg: SearchConfig = SearchConfig(),
) -> SearchResult:
    """Search per-field widths in ``[1, max_dim]`` maximising ``fitness`` among candidates with
    ``size(c) <= budget_bytes``.

    ``weights`` (e.g. kept rows per field) bias the repair of over-budget candidates towards the fields that
    cost most. Deterministic for a given ``cfg.seed`` and deterministic ``fitness``.

    >>> res = evolutionary_search(3, 4, fitness=lambda c: sum(c), size=lambda c: 10 * sum(c), budget_bytes=60,
    ...                           cfg=SearchConfig(generations=5))
    >>> res.bytes <= 60, sum(res.best)
    (True, 6)
    """
    rng = random.Random(0 if cfg.seed is None else cfg.seed)
    weights = [1.0] * num_fields if weights is None else [max(float(w), 0.0) for w in weights]
    if not any(weights):
        weights = [1.0] * num_fields
    floor = tuple([1] * num_fields)
    if budget_bytes is not None and size(floor) > budget_bytes:
        raise BudgetError(f"optembed.v1: the kept rows need {size(floor):,} bytes at width 1 in every field, "
                          f"over the budget of {budget_bytes:,} bytes (minimum budget {size(floor):,}); prune more "
                          "rows (a larger threshold_lr or alpha) or allow more bytes")

    def repair(c: list[int]) -> Candidate:
        while budget_bytes is not None and size(tuple(c)) > budget_bytes:
            open_fields = [f for f in range(num_fields) if c[f] > 1]
            w = [weights[f] for f in open_fields]
            f = rng.choices(open_fields, weights=w if any(w) else None)[0]
            c[f] -= 1
        return tuple(c)

    scores: dict[Candidate, float] = {}

    def score(c: Candidate) -> float:
        if c not in scores:
            scores[c] = float(fitness(c))
        return scores[c]

    def rank(pool) -> list[Candidate]:
        # Ties broken by size then by the tuple itself, so the order never depends on evaluation order.
        unique = list(dict.fromkeys(pool))
        return sorted(unique, key=lambda c: (-_finite(score(c)), size(c), c))

    pool = [repair([rng.randint(1, max_dim) for _ in range(num_fields)]) for _ in range(cfg.population)]
    top = rank(pool)[: cfg.keep]
    history = [{"generation": 0, "fitness": score(top[0]), "bytes": size(top[0])}]
    for gen in range(1, cfg.generations + 1):
        children = []
        for _ in range(cfg.mutations):
            parent = rng.choice(top)
            children.append(repair([rng.randint(1, max_dim) if rng.random() < cfg.mutate_prob else d for d in parent]))
        for _ in range(cfg.crossovers if len(top) > 1 and num_fields > 1 else 0):
            a, b = rng.sample(top, 2)
            point = rng.randint(1, num_fields - 1)
            children.append(repair(list(a[:point] + b[point:])))
        top = rank(top + children)[: cfg.keep]
        history.append({"generation": gen, "fitness": score(top[0]), "bytes": size(top[0])})
    best = top[0]
    return SearchResult(best=best, fitness=score(best), bytes=size(best), evaluations=len(scores), history=history)


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def replace_table(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Swap the submodule ``old`` of ``model`` for ``new`` (wherever it is registered); returns ``model``."""
    found = False
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if child is old:
                setattr(parent, name, new)
                found = True
    if not found:
        raise ValueError("the table is not a submodule of the model")
    return model


@torch.no_grad()
def rewind_(model: nn.Module, initial: Mapping[str, torch.Tensor], keep: Sequence[nn.Parameter]) -> nn.Module:
    """Load ``initial`` (a ``model.state_dict()`` copy) into ``model``, except the parameters in ``keep``.

    ``keep`` holds parameter objects (OptEmbed's thresholds): they are told apart by identity, not by name, and
    keep the values they have now. ``load_state_dict`` copies into the existing tensors, so every parameter
    object (and an optimizer holding one) stays the same. Returns ``model``.

    >>> net = nn.Linear(2, 1)
    >>> start = {k: v.clone() for k, v in net.state_dict().items()}
    >>> _ = net.weight.data.fill_(5.0), net.bias.data.fill_(7.0)
    >>> _ = rewind_(net, start, keep=[net.bias])
    >>> torch.equal(net.weight, start["weight"]), net.bias.item()
    (True, 7.0)
    """
    kept = [(p, p.detach().clone()) for p in keep]
    model.load_state_dict(initial)
    for p, value in kept:
        p.copy_(value)
    return model


@dataclass
class StagedFit:
    """What the OptEmbed pipeline returns: the model with the exported table, its final result, and per stage
    wall seconds and details."""

    model: nn.Module
    table: nn.Module
    result: "TrainResult"
    stages: dict[str, float]
    details: dict


class _RowsByImportance:
    """``prune="budget"``: rows in order of OptEmbed's importance ``||e||_1 - t`` (ties: the lower row), and for
    given widths the longest prefix of that order whose export fits the table's budget."""

    def __init__(self, table) -> None:
        with torch.no_grad():
            importance = table.weight.abs().sum(-1) - table._row_thresholds()
        self.order = torch.argsort(-importance, stable=True)
        cards = torch.tensor(table.cardinalities, device=self.order.device)
        fields = torch.repeat_interleave(torch.arange(len(table.cardinalities), device=cards.device), cards)
        self.fields = fields[self.order]
        self.table = table
        self._rows: dict[Candidate, int] = {}

    def _kept(self, k: int) -> list[int]:
        return torch.bincount(self.fields[:k], minlength=self.table.num_fields).tolist()

    def rows(self, dims: Candidate) -> int:
        """The most rows (a prefix of the order) whose export at widths ``dims`` fits the budget (0 if none)."""
        dims = tuple(int(d) for d in dims)
        if dims not in self._rows:
            lo, hi = 0, self.order.numel()  # bytes grow with the prefix: bisect the largest that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                if self.table.export_bytes(dims, self._kept(mid)) <= self.table.budget_bytes:
                    lo = mid
                else:
                    hi = mid - 1
            self._rows[dims] = lo
        return self._rows[dims]

    def kept(self, dims: Candidate) -> list[int]:
        return self._kept(self.rows(dims))

    def mask(self, dims: Candidate) -> torch.Tensor:
        mask = torch.zeros(self.order.numel(), dtype=torch.bool, device=self.order.device)
        mask[self.order[: self.rows(dims)]] = True
        return mask


def _subset(split: Batch, rows: int | None, seed: int) -> Batch:
    if rows is None or rows >= len(split):
        return split
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(split), rows, replace=False)))
    return Batch(split.dense[idx], split.sparse[idx], split.labels[idx])


def run_optembed(model: nn.Module, table, data: "CTRData", cfg: "TrainConfig",
                 schedule: OptEmbedSchedule | None = None) -> StagedFit:
    """Train ``model`` (holding the OptEmbed ``table``, in its supernet stage) through all stages as ``schedule``
    says (``None``: the default :class:`OptEmbedSchedule`), and return it with the export swapped in.

    1. supernet training with ``cfg`` (thresholds trained by plain SGD at ``schedule.threshold_lr`` under the
       regulariser of weight ``schedule.alpha``, random widths per sample);
    2. the row mask is fixed from the thresholds, and widths are searched (``schedule.search``) on a sample of
       the validation split, within ``table.budget_bytes``;
    3. retraining with the mask and widths fixed for ``schedule.retrain_epochs`` (default ``cfg.epochs``), from
       the initial weights with the trained thresholds when ``schedule.rewind``;
    4. export; the exported model's outputs are checked against the retrained model's on validation rows.
    """
    from sklearn.metrics import roc_auc_score

    from .training import evaluate, predict, train

    schedule = OptEmbedSchedule() if schedule is None else schedule
    if not isinstance(schedule, OptEmbedSchedule):
        raise ValueError(f"run_optembed: schedule must be an OptEmbedSchedule or None, got {schedule!r}")
    if not any(m is table for m in model.modules()):
        raise ValueError("run_optembed: the table is not a submodule of the model")
    if table.stage != "supernet":
        raise ValueError(f"run_optembed: the table must be in its supernet stage, not {table.stage!r}")
    stages: dict[str, float] = {}
    initial = copy.deepcopy(model.state_dict()) if schedule.rewind else None

    start = time.perf_counter()
    table.set_threshold_training(lr=schedule.threshold_lr, alpha=schedule.alpha)
    supernet = train(model, data, cfg)
    stages["supernet"] = time.perf_counter() - start

    start = time.perf_counter()
    mask = table.current_row_mask()
    kept = table.kept_per_field(mask)
    by_budget = _RowsByImportance(table) if schedule.prune == "budget" else None
    search_cfg = schedule.search if schedule.search.seed is not None else replace(schedule.search, seed=cfg.seed)
    val = _subset(data.split("val"), search_cfg.search_rows, search_cfg.seed)
    labels = val.labels.numpy()
    model.eval()

    def fitness(dims) -> float:
        table.set_dims(dims)
        if by_budget is not None:
            table.set_search_mask(by_budget.mask(dims))
        p = predict(model, val, batch_size=cfg.eval_batch_size, device=cfg.device)
        return float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else math.nan

    if by_budget is None:
        size = lambda c: table.export_bytes(c, kept)  # noqa: E731
    else:
        size = lambda c: table.export_bytes(c, by_budget.kept(c))  # noqa: E731
    search = evolutionary_search(
        table.num_fields, table.embedding_dim, fitness, size,
        budget_bytes=table.budget_bytes, weights=kept, cfg=search_cfg,
    )
    if by_budget is not None:
        table.set_search_mask(None)
        mask = by_budget.mask(search.best)
        kept = table.kept_per_field(mask)
    stages["search"] = time.perf_counter() - start

    start = time.perf_counter()
    if initial is not None:
        rewind_(model, initial, keep=[table.threshold])
    table.freeze(search.best, mask)
    retrain_cfg = replace(cfg, epochs=schedule.retrain_epochs or cfg.epochs,
                          checkpoint=None if cfg.checkpoint is None else f"{cfg.checkpoint}.retrain")
    result = train(model, data, retrain_cfg)
    stages["retrain"] = time.perf_counter() - start

    start = time.perf_counter()
    model.eval()
    check = _subset(data.split("val"), 4096, cfg.seed)
    before = predict(model, check, device=cfg.device)
    exported = table.export().to(cfg.device)
    replace_table(model, table, exported)
    after = predict(model, check, device=cfg.device)
    if not np.array_equal(before, after):
        raise RuntimeError(f"OptEmbed export differs from the retrained model by up to "
                           f"{float(np.abs(before - after).max()):.3g} on validation rows")
    stages["export"] = time.perf_counter() - start
    auc, _ = evaluate(model, data.split("test"), batch_size=cfg.eval_batch_size, device=cfg.device)
    if not (auc == result.test_auc or (math.isnan(auc) and math.isnan(result.test_auc))):
        raise RuntimeError(f"exported model's test AUC {auc} differs from the retrained model's {result.test_auc}")
    details = {
        "prune": schedule.prune, "kept_rows": sum(kept), "total_rows": sum(table.cardinalities),
        "kept_per_field": kept,
        "dims": list(search.best), "search_val_auc": search.fitness, "search_evaluations": search.evaluations,
        "supernet_val_auc": supernet.val_auc, "supernet_test_auc": supernet.test_auc,
        "thresholds": table.threshold.detach().cpu().tolist() if table.threshold_mode == "field" else None,
        "search_history": search.history,
    }
    return StagedFit(model=model, table=exported, result=result, stages=stages, details=details)
