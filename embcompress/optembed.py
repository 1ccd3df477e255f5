"""The OptEmbed pipeline: supernet training, budgeted evolutionary search of field widths, retraining, export.

Lyu et al., "OptEmbed: Learning Optimal Embedding Table for Click-through Rate Prediction", CIKM 2022. The
table and its stages are in ``tables/optembed.py``; this module drives them.

The search (:func:`evolutionary_search`) goes beyond the paper: it takes a memory budget and admits only
candidates whose export fits it. A candidate over budget is *repaired* (widths lowered one step at a time, each
step on a random field chosen in proportion to its kept rows) rather than dropped, so the population stays full
at high compression, where almost no uniformly drawn candidate fits. Unlike the reference code, mutation and
crossover build new tuples (the population is never aliased and mutated in place), and the crossover point is
drawn over the fields, not over the width range.
"""

from __future__ import annotations

import copy
import math
import random
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from .contract import BudgetError
from .validate import check_int, check_number
from .data import Batch, CTRData
from .training import TrainConfig, TrainResult, evaluate, predict, train

__all__ = ["SearchConfig", "SearchResult", "StagedFit", "evolutionary_search", "run_optembed", "replace_table"]

Candidate = tuple[int, ...]


@dataclass(frozen=True)
class SearchConfig:
    """Evolution settings (the OptEmbed README's: 10 mutations, 10 crossovers, 30 generations, p = 0.1)."""

    population: int = 20
    keep: int = 10
    mutations: int = 10
    crossovers: int = 10
    generations: int = 30
    mutate_prob: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        # Typed (no coercion of 2.7 or "5"), stored as plain Python values (numpy scalars accepted).
        checked = {name: check_int(name, getattr(self, name), lo=lo, owner="SearchConfig")
                   for name, lo in (("population", 1), ("keep", 1), ("mutations", 0), ("crossovers", 0),
                                    ("generations", 0), ("seed", None))}
        checked["mutate_prob"] = check_number("mutate_prob", self.mutate_prob, lo=0, hi=1, owner="SearchConfig")
        for name, value in checked.items():
            object.__setattr__(self, name, value)  # frozen dataclass


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
    rng = random.Random(cfg.seed)
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


@dataclass
class StagedFit:
    """What the OptEmbed pipeline returns: the model with the exported table, its final result, and per stage
    wall seconds and details."""

    model: nn.Module
    table: nn.Module
    result: TrainResult
    stages: dict[str, float]
    details: dict


def _subset(split: Batch, rows: int | None, seed: int) -> Batch:
    if rows is None or rows >= len(split):
        return split
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(split), rows, replace=False)))
    return Batch(split.dense[idx], split.sparse[idx], split.labels[idx])


def run_optembed(model: nn.Module, table, data: CTRData, cfg: TrainConfig) -> StagedFit:
    """Train ``model`` (holding the OptEmbed ``table``) through all stages and return it with the export.

    1. supernet training with ``cfg`` (thresholds and the regulariser active, random widths per sample);
    2. the row mask is fixed from the thresholds, and widths are searched on (a sample of) the validation split,
       within ``table.budget_bytes``;
    3. retraining with the mask and widths fixed, from the initial weights when ``table.rewind``;
    4. export; the exported model's outputs are checked against the retrained model's on validation rows.
    """
    stages: dict[str, float] = {}
    initial = copy.deepcopy(model.state_dict()) if table.rewind else None

    start = time.perf_counter()
    supernet = train(model, data, cfg)
    stages["supernet"] = time.perf_counter() - start

    start = time.perf_counter()
    mask = table.current_row_mask()
    kept = table.kept_per_field(mask)
    opts = table.search
    val = _subset(data.split("val"), opts["search_rows"], cfg.seed)
    labels = val.labels.numpy()
    model.eval()

    def fitness(dims) -> float:
        table.set_dims(dims)
        p = predict(model, val, batch_size=cfg.eval_batch_size, device=cfg.device)
        return float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else math.nan

    search_cfg = SearchConfig(**{k: v for k, v in opts.items() if k != "search_rows"}, seed=cfg.seed)
    search = evolutionary_search(
        table.num_fields, table.embedding_dim, fitness, lambda c: table.export_bytes(c, kept),
        budget_bytes=table.budget_bytes, weights=kept, cfg=search_cfg,
    )
    stages["search"] = time.perf_counter() - start

    start = time.perf_counter()
    if initial is not None:
        keep = {k: v for k, v in model.state_dict().items() if k.endswith(("threshold",))}
        model.load_state_dict({**initial, **keep})
    table.freeze(search.best, mask)
    retrain_cfg = replace(cfg, epochs=table.retrain_epochs or cfg.epochs,
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
        "kept_rows": sum(kept), "total_rows": sum(table.cardinalities), "kept_per_field": kept,
        "dims": list(search.best), "search_val_auc": search.fitness, "search_evaluations": search.evaluations,
        "supernet_val_auc": supernet.val_auc, "supernet_test_auc": supernet.test_auc,
        "thresholds": table.threshold.detach().cpu().tolist() if table.threshold_mode == "field" else None,
        "search_history": search.history,
    }
    return StagedFit(model=model, table=exported, result=result, stages=stages, details=details)
