"""Typed option validators shared by every table, model and config (re-exported by :mod:`embcompress.contract`).

Options reach constructors from YAML and JSON as often as from Python, so nothing is coerced: ``"no"`` is not a
bool, ``2.7`` and ``"5"`` are not ints, ``True`` is neither an int nor a number. Numpy scalars are accepted
where their Python kind is (``np.int64`` is an int, ``np.float64`` a number, ``np.bool_`` a bool), since they
come out of arrays and grids. Every check returns the value as a plain Python ``bool`` / ``int`` / ``float``, or
raises ``ValueError`` naming the owner (a registry name such as ``hashing.v1``), the option, what was expected
and the bad value, e.g. ``hashing.v1: shared must be a bool (True or False), got 'no'``.

``owner`` is a string, or any object with a ``registry_name`` (a registered class or its instance), or ``None``.

>>> check_int("chunks", 4, lo=1)
4
>>> check_bool("shared", "no", owner="hashing.v1")
Traceback (most recent call last):
    ...
ValueError: hashing.v1: shared must be a bool (True or False), got 'no'
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

__all__ = [
    "check_bool", "check_int", "check_positive_int", "check_number", "check_positive_number", "check_float",
    "check_choice", "check_int_list", "check_per_field", "owner_name",
]


def owner_name(owner: Any) -> str | None:
    """The name errors are prefixed with: a string itself, else the object's ``registry_name`` or class name."""
    if owner is None or isinstance(owner, str):
        return owner
    name = getattr(owner, "registry_name", None)
    if isinstance(name, str):
        return name
    return owner.__name__ if isinstance(owner, type) else type(owner).__name__


def _error(name: str, expected: str, value: Any, owner: Any) -> ValueError:
    prefix = owner_name(owner)
    return ValueError(f"{prefix + ': ' if prefix else ''}{name} must be {expected}, got {value!r}")


def _is_int(value: Any) -> bool:
    # numbers.Integral covers numpy ints; bool (and np.bool_, which numpy does not register) are excluded.
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _range(lo, hi, lo_open: bool = False, hi_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" {'<' if hi_open else '<='} {hi}"
    return ""


def _finite(value: numbers.Real) -> bool:
    try:  # an int too large for a float (10**400) is not a usable number either
        return math.isfinite(float(value))
    except OverflowError:
        return False


def check_bool(name: str, value: Any, *, owner: Any = None) -> bool:
    """``value`` if it is ``True``/``False`` (or a numpy ``bool_``); strings and ints such as ``"no"`` or 1
    are refused, since ``bool("no")`` is True."""
    if not isinstance(value, (bool, np.bool_)):
        raise _error(name, "a bool (True or False)", value, owner)
    return bool(value)


def _int_expected(lo, hi) -> str:
    if hi is None and lo == 1:
        return "a positive int"
    if hi is None and lo == 0:
        return "a non-negative int"
    return "an int" + _range(lo, hi)


def check_int(
    name: str, value: Any, *, lo: int | None = None, hi: int | None = None, optional: bool = False,
    owner: Any = None,
) -> int | None:
    """An integral, non-bool ``value`` (Python or numpy int) in ``[lo, hi]`` (either bound optional); with
    ``optional``, ``None`` too."""
    if optional and value is None:
        return None
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise _error(name, _int_expected(lo, hi) + (" or None" if optional else ""), value, owner)
    return int(value)


def check_positive_int(name: str, value: Any, *, optional: bool = False, owner: Any = None) -> int | None:
    """An int >= 1 (see :func:`check_int`)."""
    return check_int(name, value, lo=1, optional=optional, owner=owner)


def check_number(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    positive: bool = False,
    optional: bool = False,
    owner: Any = None,
) -> float | None:
    """A finite real, non-bool ``value`` (int or float, Python or numpy) within the bounds, as a float.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``; ``positive=True`` means ``> 0``; with
    ``optional``, ``None`` is accepted too.
    """
    if optional and value is None:
        return None
    if positive:
        lo, lo_open = 0, True
    ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)) and _finite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        expected = "a positive finite number" if positive and hi is None else (
            "a finite number" + _range(lo, hi, lo_open, hi_open))
        raise _error(name, expected + (" or None" if optional else ""), value, owner)
    return float(value)


def check_positive_number(name: str, value: Any, *, optional: bool = False, owner: Any = None) -> float | None:
    """A finite number > 0 (see :func:`check_number`)."""
    return check_number(name, value, positive=True, optional=optional, owner=owner)


check_float = check_number


def check_choice(name: str, value: Any, choices: Sequence[str], *, owner: Any = None) -> str:
    """``value`` if it is one of the string ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise _error(name, f"one of {list(choices)}", value, owner)
    return value


def _is_sequence(value: Any) -> bool:
    return isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes))


def check_int_list(
    name: str, value: Any, *, lo: int | None = 1, allow_empty: bool = False, optional: bool = False,
    owner: Any = None,
) -> tuple[int, ...] | None:
    """A list (or tuple) of ints each ``>= lo``, e.g. hidden layer widths, as a tuple of Python ints; with
    ``optional``, ``None`` too."""
    if optional and value is None:
        return None
    kind = {1: "positive ints", 0: "non-negative ints", None: "ints"}.get(lo, f"ints >= {lo}")
    expected = f"a {'' if allow_empty else 'non-empty '}list of {kind}" + (" or None" if optional else "")
    if not _is_sequence(value) or (len(value) == 0 and not allow_empty):
        raise _error(name, expected, value, owner)
    for i, v in enumerate(value):
        if not _is_int(v) or (lo is not None and v < lo):
            raise _error(f"{name}[{i}]", _int_expected(lo, None), v, owner)
    return tuple(int(v) for v in value)


def check_per_field(
    name: str, value: Any, num_fields: int, *, lo: int | None = 1, owner: Any = None,
) -> list[int]:
    """One int for every field, or a list of one int per field (each ``>= lo``), as a list of ``num_fields``."""
    if _is_int(value):
        return [check_int(name, value, lo=lo, owner=owner)] * num_fields
    if not _is_sequence(value):
        raise _error(name, f"{_int_expected(lo, None)} or a list of one per field", value, owner)
    if len(value) != num_fields:
        prefix = owner_name(owner)
        raise ValueError(
            f"{prefix + ': ' if prefix else ''}{name} has {len(value)} entries for {num_fields} fields")
    return [check_int(f"{name} of field {f}", v, lo=lo, owner=owner) for f, v in enumerate(value)]
