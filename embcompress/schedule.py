"""What staged methods' schedules share: a frozen dataclass read from a suite's flat ``schedule:`` mapping.

A schedule (:class:`~embcompress.cce.CCESchedule`, dedup's, PEP's, ...) is a frozen dataclass whose
``__post_init__`` checks its fields with :mod:`embcompress.validate` and stores the checked values with
:meth:`StagedSchedule._store`; :meth:`StagedSchedule.from_dict` builds one from the mapping a suite gives, naming
the suite's key path in every error. :func:`train_compress_retrain` runs the train / compress / retrain stages
that dedup, PEP, DeepLight and AutoSrh share.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, TypeVar

from .specs import SpecError, check_mapping_keys

__all__ = ["StagedSchedule", "check_staged_start", "stage_config", "CompressStages", "train_compress_retrain"]

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


def check_staged_start(table, model, schedule, schedule_type: type):
    """``schedule`` (``None``: the default ``schedule_type()``) once checked, with ``table`` inside ``model``."""
    schedule = schedule_type() if schedule is None else schedule
    if not isinstance(schedule, schedule_type):
        name = schedule_type.__name__
        article = "an" if name[0] in "AEIOU" else "a"
        raise ValueError(f"{table._owner_name()}: schedule must be {article} {name} or None, got {schedule!r}")
    if not any(m is table for m in model.modules()):
        raise ValueError(f"{table._owner_name()}: fit_staged: the table is not a submodule of the model")
    return schedule


def stage_config(cfg, epochs: int | None, suffix: str):
    """``cfg`` for one stage: its ``epochs`` (``None``: the run's) and its own checkpoint file."""
    return dataclasses.replace(cfg, epochs=epochs or cfg.epochs,
                               checkpoint=None if cfg.checkpoint is None else f"{cfg.checkpoint}.{suffix}")


@dataclasses.dataclass
class CompressStages:
    """What :func:`train_compress_retrain` ran: each training stage's result and the table's stored bytes after
    it, what the compression step returned, and the seconds of every stage."""

    first: Any
    first_bytes: int
    compressed: dict
    result: Any
    second_bytes: int
    stages: dict[str, float]

    @property
    def peak_training_bytes(self) -> int:
        """What training held at most: the larger stage's stored bytes plus its optimizer state."""
        return max(self.first_bytes + self.first.table_optimizer_bytes,
                   self.second_bytes + self.result.table_optimizer_bytes)


def train_compress_retrain(table, model, data, cfg, *, first: tuple[str, str, int | None],
                           compress: tuple[str, Callable[[], dict]],
                           second: tuple[str, str, int | None]) -> CompressStages:
    """The shape of the pruning and merging methods' staged training (dedup, PEP, DeepLight, AutoSrh): train
    ``model`` for a stage, compress ``table``, train again. ``first`` and ``second`` are ``(stage name, checkpoint
    suffix, epochs)``; ``compress`` is ``(stage name, step)``, the step returning its statistics."""
    from .training import train  # the loop (and scikit-learn) only when a staged run starts

    stages: dict[str, float] = {}
    start = time.perf_counter()
    first_result = train(model, data, stage_config(cfg, first[2], first[1]))
    stages[first[0]] = time.perf_counter() - start
    first_bytes = table.memory_report().total_bytes
    start = time.perf_counter()
    compressed = compress[1]()
    stages[compress[0]] = time.perf_counter() - start
    start = time.perf_counter()
    result = train(model, data, stage_config(cfg, second[2], second[1]))
    stages[second[0]] = time.perf_counter() - start
    return CompressStages(first=first_result, first_bytes=first_bytes, compressed=compressed, result=result,
                          second_bytes=table.memory_report().total_bytes, stages=stages)
