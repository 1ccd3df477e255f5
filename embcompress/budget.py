"""The one budget solver every table shares: the largest table a method can build within a byte budget.

A method describes how its size follows one number, its *knob* (:class:`BudgetKnob`): hashed rows, pool rows,
a collision count, a power-law scale. :func:`solve_budget` measures the exact bytes of candidate tables on the
``meta`` device (nothing is allocated) and bisects the knob to the largest table whose memory report is at most
the budget. A budget is a ceiling, never a target to land near: when the method's sizes move in coarse steps
the table may land well under it, and the report says so; :class:`BudgetError` is raised only when not even the
method's smallest table fits, and it names that smallest reachable budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from .validate import check_number

__all__ = ["BudgetError", "BudgetKnob", "solve_knob", "solve_budget", "check_budget"]


class BudgetError(ValueError):
    """A memory budget the method cannot meet, or a method that cannot be built to a budget at all."""


@dataclass(frozen=True)
class BudgetKnob:
    """How a method's bytes follow one number.

    Args:
        name: the constructor argument (or concept) the knob sets, for messages.
        lo, hi: the range searched; ``hi=None`` means unbounded above (searched by doubling).
        kwargs: constructor arguments for a knob value.
        grows: True when bytes grow with the knob (rows), False when they fall (collisions).
        integer: an integer knob (bisected to the exact step), else a real one (bisected to ``1e-12`` relative).
        refine: optional ``(value, budget) -> kwargs``: a method-specific way to spend what the solved value
            leaves of the budget (QR spends it field by field); must stay within the budget.
    """

    name: str
    lo: float
    hi: float | None
    kwargs: Callable[[Any], dict]
    grows: bool = True
    integer: bool = True
    refine: Callable[[Any, int], dict] | None = None


def check_budget(budget_bytes) -> int:
    """A positive finite budget (int or float, numpy scalars included) as whole bytes, or :class:`BudgetError`
    naming the bad value."""
    try:
        check_number("budget_bytes", budget_bytes, positive=True)
    except ValueError as e:  # a BudgetError, so callers catching budget problems see this one too
        raise BudgetError(str(e)) from None
    return int(budget_bytes)


def solve_knob(cls, cardinalities, embedding_dim: int, budget_bytes, options: Mapping[str, Any]):
    """``(knob, value)``: the knob value of the largest ``cls`` table whose exact bytes are at most the budget.

    ``cls.budget_knob(cardinalities, embedding_dim, **options)`` describes the knob; ``options`` are the other
    constructor arguments. Bytes are assumed monotone in the knob; small dips are tolerated (the value always
    fits, and is the largest at the step where the bisection crosses the budget).
    """
    budget = check_budget(budget_bytes)
    name = getattr(cls, "registry_name", cls.__name__)
    knob: BudgetKnob = cls.budget_knob(cardinalities, embedding_dim, **options)

    def size(value) -> int:
        return cls.planned_bytes(cardinalities, embedding_dim, **options, **knob.kwargs(value))

    hi = knob.hi
    if hi is None:  # unbounded: double until the table is over the budget
        hi = max(knob.lo, 1) * 2
        while size(hi) <= budget:
            hi *= 2
    small, large = (knob.lo, hi) if knob.grows else (hi, knob.lo)
    smallest = size(small)
    if smallest > budget:
        what = knob.name if knob.lo == knob.hi else f"{knob.name}={small:g}"
        raise BudgetError(
            f"{name}: a budget of {budget:,} bytes is under the smallest table it can build ({what}): "
            f"minimum budget {smallest:,} bytes"
        )
    if size(large) <= budget:
        return knob, large
    fits, over = small, large  # size(fits) <= budget < size(over)
    while (abs(over - fits) > 1) if knob.integer else (abs(over - fits) > 1e-12 * max(abs(over), 1e-300)):
        mid = (fits + over) // 2 if knob.integer else 0.5 * (fits + over)
        if size(mid) <= budget:
            fits = mid
        else:
            over = mid
    return knob, fits


def solve_budget(cls, cardinalities, embedding_dim: int, budget_bytes, options: Mapping[str, Any]):
    """Build the largest ``cls`` table whose exact serving bytes are at most ``budget_bytes`` (see
    :func:`solve_knob`): what it stores, or what it serves when that is less (rows at a lower ``precision``)."""
    budget = check_budget(budget_bytes)
    knob, value = solve_knob(cls, cardinalities, embedding_dim, budget_bytes, options)
    kwargs = knob.refine(value, budget) if knob.refine is not None else knob.kwargs(value)
    table = cls(cardinalities, embedding_dim, **options, **kwargs)
    built = table.memory_report().serving_bytes
    if built > budget:  # the planned size must be the real one
        name = getattr(cls, "registry_name", cls.__name__)
        raise RuntimeError(f"{name}: built {built:,} bytes for a budget of {budget:,} ({knob.name}={value})")
    return table
