"""The CCE pipeline: train, re-cluster, train again, as a :class:`CCESchedule` says.

Tsang & Ahle, "Clustering the Sketch: Dynamic Compression for Embedding Tables", NeurIPS 2023. The table is
``tables/cce.py`` (``cce.v1``); this module drives its stages. Import direction as for OptEmbed: the table module
imports this one (for :class:`CCESchedule`, its ``schedule_type``, and :func:`run_cce`, which its ``fit_staged``
hook calls), this module never imports the table module, and the training loop is imported when :func:`run_cce`
runs. The table is driven through its :meth:`recluster_` method alone.

Stages: ``reclusterings`` times (train ``epochs_between`` epochs, then re-cluster every field with k-means of
``kmeans_iterations`` Lloyd steps on a sample of ``sample`` ids per field), then a final training of
``final_epochs`` epochs (``None``: the run's ``TrainConfig.epochs``). The table that trained is the table served:
the index map is allocated from construction, so its bytes never change between stages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from torch import nn

from .optembed import StagedFit
from .schedule import StagedSchedule
from .validate import check_int, check_positive_int

if TYPE_CHECKING:
    from .data import CTRData
    from .training import TrainConfig

__all__ = ["CCESchedule", "run_cce"]


@dataclass(frozen=True)
class CCESchedule(StagedSchedule):
    """How :func:`run_cce` trains a CCE table.

    Args:
        reclusterings: how many times the table is re-clustered (0: plain training of the hashed start).
        epochs_between: training epochs before each re-clustering.
        final_epochs: training epochs after the last re-clustering (``None``: the run's ``TrainConfig.epochs``).
        kmeans_iterations: Lloyd iterations of each k-means.
        sample: ids per field that k-means is fitted on (at least the field's rows, at most its clustered ids);
            every clustered id is then assigned to its nearest centroid.
        seed: the k-means seed (``None``: the run's ``TrainConfig.seed``); re-clustering ``i`` uses ``seed + i``.

    >>> CCESchedule.from_dict({"reclusterings": 2, "kmeans_iterations": 5}).reclusterings
    2
    >>> CCESchedule(sample=0)
    Traceback (most recent call last):
        ...
    ValueError: CCESchedule: sample must be a positive int, got 0
    """

    reclusterings: int = 1
    epochs_between: int = 1
    final_epochs: int | None = None
    kmeans_iterations: int = 10
    sample: int = 65_536
    seed: int | None = None

    def __post_init__(self) -> None:
        owner = "CCESchedule"
        checked = {
            "reclusterings": check_int("reclusterings", self.reclusterings, lo=0, owner=owner),
            "epochs_between": check_positive_int("epochs_between", self.epochs_between, owner=owner),
            "final_epochs": check_positive_int("final_epochs", self.final_epochs, optional=True, owner=owner),
            "kmeans_iterations": check_int("kmeans_iterations", self.kmeans_iterations, lo=0, owner=owner),
            "sample": check_positive_int("sample", self.sample, owner=owner),
            "seed": check_int("seed", self.seed, lo=0, optional=True, owner=owner),
        }
        self._store(checked)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "CCESchedule":
        """See :meth:`~embcompress.schedule.StagedSchedule.from_dict`.

        >>> CCESchedule.from_dict({"recluster": 3}, "methods[4].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[4].schedule: unknown key 'recluster'; did you mean 'reclusterings'? (accepted keys: reclusterings, epochs_between, final_epochs, kmeans_iterations, sample, seed)
        """
        return super().from_dict(mapping, where)


def run_cce(model: nn.Module, table, data: "CTRData", cfg: "TrainConfig",
            schedule: CCESchedule | None = None) -> StagedFit:
    """Train ``model`` (holding the CCE ``table``) through the stages of ``schedule`` (``None``: the default
    :class:`CCESchedule`); returns the model with the same table (it serves what it trained)."""
    from .training import train

    schedule = CCESchedule() if schedule is None else schedule
    if not isinstance(schedule, CCESchedule):
        raise ValueError(f"run_cce: schedule must be a CCESchedule or None, got {schedule!r}")
    if not any(m is table for m in model.modules()):
        raise ValueError("run_cce: the table is not a submodule of the model")
    seed = cfg.seed if schedule.seed is None else schedule.seed
    stages: dict[str, float] = {}
    details: dict[str, Any] = {"reclusterings": []}
    for i in range(schedule.reclusterings):
        start = time.perf_counter()
        stage_cfg = replace(cfg, epochs=schedule.epochs_between,
                            checkpoint=None if cfg.checkpoint is None else f"{cfg.checkpoint}.stage{i}")
        result = train(model, data, stage_cfg)
        stages[f"train{i}"] = time.perf_counter() - start
        start = time.perf_counter()
        stats = table.recluster_(iterations=schedule.kmeans_iterations, sample=schedule.sample, seed=seed + i)
        stages[f"recluster{i}"] = time.perf_counter() - start
        details["reclusterings"].append({"val_auc_before": result.val_auc, **stats})
    start = time.perf_counter()
    final_cfg = replace(cfg, epochs=schedule.final_epochs or cfg.epochs,
                        checkpoint=None if cfg.checkpoint is None else f"{cfg.checkpoint}.final")
    result = train(model, data, final_cfg)
    stages["final"] = time.perf_counter() - start
    details["index_bytes"] = table.index_bytes()
    return StagedFit(model=model, table=table, result=result, stages=stages, details=details)
