"""What staged methods' schedules share: a frozen dataclass read from a suite's flat ``schedule:`` mapping.

A schedule (:class:`~embcompress.cce.CCESchedule`, dedup's, PEP's, ...) is a frozen dataclass whose
``__post_init__`` checks its fields with :mod:`embcompress.validate` and stores the checked values with
:meth:`StagedSchedule._store`; :meth:`StagedSchedule.from_dict` builds one from the mapping a suite gives, naming
the suite's key path in every error.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

from .specs import SpecError, check_mapping_keys

__all__ = ["StagedSchedule"]

S = TypeVar("S", bound="StagedSchedule")


class StagedSchedule:
    """Mixin of a frozen dataclass of staged-training settings."""

    def _store(self, checked: Mapping[str, Any]) -> None:
        """Keep the checked (typed, plain) values of the fields in ``checked``: the dataclass is frozen."""
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        """The keys :meth:`from_dict` accepts: the dataclass's fields."""
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[S], mapping: Mapping[str, Any] | None, where: str = "schedule") -> S:
        """A schedule from a suite's plain mapping; absent keys keep their defaults (``None`` or ``{}``: the
        default schedule). An unknown key or a bad value raises :class:`~embcompress.specs.SpecError` naming
        ``where``, the key and the value."""
        mapping = check_mapping_keys(mapping, cls.keys(), where)
        try:
            return cls(**mapping)
        except ValueError as err:
            raise SpecError(f"{where}: {err}") from None
