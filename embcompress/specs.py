"""Spec checking: the keys of a plain-mapping spec against the constructor they will be passed to.

Specs come from YAML (``yaml.safe_load``) or from callers' dicts; checking their keys against the signature
before anything is built turns a typo into an error that names the key, close matches and the accepted keys.
Below the registry and the contract (it imports neither), so both use it.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, Callable, Mapping, Sequence

__all__ = ["SpecError", "check_kwargs", "check_table_options", "check_mapping_keys"]


class SpecError(ValueError):
    """A spec with a missing, unknown or invalid key."""


def check_kwargs(target: Callable, kwargs: Mapping[str, Any], what: str, provided: tuple[str, ...] = ()) -> None:
    """Raise :class:`SpecError` if ``kwargs`` holds keys that ``target`` does not accept, or lacks required ones.

    ``provided`` names arguments the caller passes itself (for example the field cardinalities).
    """
    sig = inspect.signature(target)
    accepted = {
        n: p for n, p in sig.parameters.items()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"
    }
    for key in kwargs:
        if key in provided:
            raise SpecError(f"{what}: key {key!r} is set by the caller and cannot appear in the spec")
        if key not in accepted:
            close = difflib.get_close_matches(key, list(accepted), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            options = ", ".join(n for n in accepted if n not in provided)
            raise SpecError(f"{what}: unknown key {key!r}{hint} (accepted keys: {options})")
    missing = [
        n for n, p in accepted.items()
        if p.default is p.empty and n not in kwargs and n not in provided
    ]
    if missing:
        raise SpecError(f"{what}: missing required key(s) {', '.join(map(repr, missing))}")


def check_table_options(cls, options: Mapping[str, Any], what: str) -> None:
    """Check a table spec's options (``type`` removed) against ``cls``: its constructor's keys, and with a
    ``budget_bytes`` key the constructor's keys less those the budget decides (``cls.budget_keys``)."""
    if "budget_bytes" not in options:
        check_kwargs(cls, options, what, provided=("cardinalities", "embedding_dim"))
        return
    solved = tuple(getattr(cls, "budget_keys", ()))
    for key in solved:
        if key in options:
            raise SpecError(f"{what}: key {key!r} is solved from budget_bytes; give one or the other")
    rest = {k: v for k, v in options.items() if k != "budget_bytes"}
    check_kwargs(cls, rest, what, provided=("cardinalities", "embedding_dim", *solved))


def check_mapping_keys(mapping: Any, accepted: Sequence[str], where: str, what: str = "a schedule") -> dict:
    """``mapping`` (``None``: empty) as a dict whose keys are all in ``accepted``, or :class:`SpecError` naming
    ``where``, the unknown key, close matches and the accepted keys (for settings read into a dataclass)."""
    if mapping is None:
        return {}
    if not isinstance(mapping, Mapping):
        raise SpecError(f"{where}: {what} is a mapping of {list(accepted)}, got {mapping!r}")
    for key in mapping:
        if key not in accepted:
            close = difflib.get_close_matches(str(key), list(accepted), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise SpecError(f"{where}: unknown key {key!r}{hint} (accepted keys: {', '.join(accepted)})")
    return dict(mapping)
