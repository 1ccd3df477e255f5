"""Small registries of table methods and CTR models, keyed by versioned names such as ``hashing.v1``.

A method is one file in ``tables/`` whose class carries ``@TABLES.register("name.v1")``; the registry then puts
it in the test matrix, in ``embcompress list`` and in the benchmark runner. Specs are plain mappings (from YAML
loaded with ``yaml.safe_load``); their keys are checked against the constructor's signature before anything
is built, so a typo is an error that names the key and what was expected.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Callable, Generic, Iterator, Mapping, TypeVar

from .specs import SpecError, check_kwargs, check_table_options

__all__ = ["Registry", "RegistryError", "SpecError", "check_kwargs", "check_table_options"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*\.v[0-9]+$")


class RegistryError(LookupError, ValueError):
    """An unknown or duplicate registry name."""


class Registry(Generic[T]):
    """Name -> class map with versioned names, duplicate detection and close-match suggestions."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise RegistryError(f"{self.kind} name {name!r} must look like 'method.v1' (lowercase, versioned)")

        def add(obj: T) -> T:
            if name in self._entries:
                raise RegistryError(
                    f"duplicate {self.kind} name {name!r}: already registered by {self._entries[name]!r}"
                )
            # One name per class: a second would overwrite `registry_name`, which errors and reports print.
            # (Compared by identity: a subclass inherits `registry_name` but is a class of its own.)
            old = next((n for n, o in self._entries.items() if o is obj), None)
            if old is not None:
                raise RegistryError(
                    f"{obj!r} is already registered as {self.kind} {old!r}; it cannot also be {name!r} "
                    f"(register a subclass under the new name instead)"
                )
            self._entries[name] = obj
            setattr(obj, "registry_name", name)
            return obj

        return add

    def get(self, name: str) -> T:
        if not isinstance(name, str):
            raise RegistryError(f"{self.kind} type must be a string like 'hashing.v1', got {name!r}")
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.4)
            hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
            raise RegistryError(
                f"unknown {self.kind} {name!r}.{hint} Registered: {', '.join(sorted(self._entries))}"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)


TABLES: Registry = Registry("table")
MODELS: Registry = Registry("model")


def list_tables() -> list[str]:
    """Registered table methods, e.g. ``['full.v1', 'hashing.v1']``."""
    return TABLES.names()


def list_models() -> list[str]:
    """Registered CTR models, e.g. ``['dlrm.v1']``."""
    return MODELS.names()


def _split_spec(spec: Mapping[str, Any], registry: Registry) -> tuple[Any, dict[str, Any]]:
    if not isinstance(spec, Mapping):
        raise SpecError(f"a {registry.kind} spec must be a mapping with a 'type' key, got {spec!r}")
    if "type" not in spec:
        raise SpecError(f"{registry.kind} spec {dict(spec)!r} has no 'type' key (one of {registry.names()})")
    options = dict(spec)
    return registry.get(options.pop("type")), options


def build_table(spec: Mapping[str, Any], cardinalities, embedding_dim: int, *, field_names=None):
    """Build a table from ``{"type": "hashing.v1", ...options}``.

    With a ``budget_bytes`` key the method's ``from_budget`` builds the largest table of at most that many bytes;
    the other keys are checked against the constructor's signature first.

    >>> t = build_table({"type": "hashing.v1", "budget_bytes": 4096}, [1000, 50], 8)
    >>> t.memory_report().total_bytes <= 4096
    True
    """
    cls, options = _split_spec(spec, TABLES)
    what = f"table spec {cls.registry_name!r}"
    check_table_options(cls, options, what)
    if "budget_bytes" in options:
        table = cls.from_budget(cardinalities, embedding_dim, **options)
    else:
        table = cls(cardinalities, embedding_dim, **options)
    if field_names is not None:
        table.set_field_names(field_names)
    return table


def build_model(spec: Mapping[str, Any], embeddings, num_dense: int):
    """Build a CTR model from ``{"type": "dlrm.v1", ...options}`` around an embedding table."""
    cls, options = _split_spec(spec, MODELS)
    check_kwargs(cls, options, f"model spec {cls.registry_name!r}", provided=("embeddings", "num_dense"))
    return cls(embeddings, num_dense, **options)
