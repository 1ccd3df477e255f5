"""The benchmark suite: its schema, loaded from YAML and checked whole before anything trains.

A suite is one data set, one or more models, training settings, an optional tuning grid, seeds, and methods
(a table spec with compression ratios); :meth:`Suite.runs` expands it into data x model x method x ratio x seed.
:func:`load_suite` reads the YAML and validates every value with its key path, then builds every table and
model once on the meta device (:mod:`embcompress.suite_check`), so a suite that would fail in its fifth run
fails at load. The data identity lives here too: a prepared folder is named in the run keys by what it holds
(:func:`manifest_checksum`), not by its path, and :func:`load_data` gives the suite's data set.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .contract import resolve_init_std
from .data import CTRData
from .memory import baseline_bytes
from .registry import MODELS, TABLES, SpecError, check_kwargs, check_table_options
from .suite_check import (
    build_on_meta, check_known_keys, check_ratios, check_seeds, check_synthetic, check_train, check_train_value,
    check_unique_names, data_shape, is_int, lookup, read_suite_yaml,
)
from .synthetic import SyntheticConfig, make_synthetic
from .training import TrainConfig

__all__ = [
    "Suite", "MethodSpec", "ModelSpec", "Run", "TUNABLE", "TABLE_TUNABLE", "load_suite", "default_suite_path",
    "table_spec", "manifest_checksum", "load_data", "check_data_unchanged",
]

_SUITE_KEYS = (
    "name", "data", "embedding_dim", "model", "models", "train", "tune", "seeds", "methods", "reference",
)
# Training settings a tuning grid may search; seeds, devices and the like are not hyper-parameters.
TUNABLE = (
    "lr", "embedding_lr", "weight_decay", "embedding_weight_decay", "embedding_l2", "batch_size", "optimizer",
    "lr_decay",
)
# Table options every table takes (the contract's), so a grid over them treats every method alike.
TABLE_TUNABLE = ("init_std",)
_METHOD_KEYS = ("name", "table", "compression", "schedule", "train")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    table: dict[str, Any]
    compression: tuple[float, ...] = ()  # empty: built as given, without a budget
    #: the staged training settings of a method that trains in stages, as written (its ``schedule_type`` reads it)
    schedule: dict[str, Any] = field(default_factory=dict)
    #: training settings of this method's runs over the suite's ``train`` (a learning rate of its own)
    train: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    spec: dict[str, Any]


@dataclass(frozen=True)
class Run:
    model: ModelSpec
    method: MethodSpec
    ratio: float | None
    seed: int


@dataclass(frozen=True)
class Suite:
    name: str
    data: dict[str, Any]
    embedding_dim: int
    models: tuple[ModelSpec, ...]
    train: dict[str, Any]
    seeds: tuple[int, ...]
    methods: tuple[MethodSpec, ...]
    source: str = "<memory>"
    #: The tuning grid: training setting -> values. Every run (the full table's too) trains each combination
    #: and keeps the one with the best validation AUC; empty: the train settings as given.
    tune: tuple[tuple[str, tuple], ...] = ()
    #: Fit the scikit-learn one-hot logistic regression reference on the train split (once per data set).
    reference: bool = True
    #: What a prepared data folder holds (:func:`manifest_checksum`), in the run keys; None for synthetic data,
    #: whose generator config is the key's data itself.
    data_checksum: str | None = None

    def trials(self) -> list[dict[str, Any]]:
        """Every combination of the tuning grid (one empty combination without a grid)."""
        names = [k for k, _ in self.tune]
        return [dict(zip(names, values)) for values in itertools.product(*(v for _, v in self.tune))]

    def runs(self) -> list[Run]:
        # Seeds outermost: a suite stopped part-way has every configuration once before it has any twice.
        return [
            Run(model, m, ratio, seed)
            for seed in self.seeds
            for model in self.models
            for m in self.methods
            for ratio in (m.compression or (None,))
        ]


def default_suite_path() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks" / "default.yaml"


def _check_data(data, where: str) -> tuple[dict[str, Any], dict | None]:
    """``{"synthetic": {...SyntheticConfig}}`` or ``{"criteo": {"path": prepared folder}}``, checked up front;
    with the prepared folder's manifest (None for synthetic data)."""
    if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in ("synthetic", "criteo"):
        raise SpecError(f"{where}: data must be {{synthetic: {{...}}}} or {{criteo: {{path: FOLDER}}}}, got {data!r}")
    if "synthetic" in data:
        return {"synthetic": check_synthetic(data["synthetic"], where)}, None
    criteo = data["criteo"]
    if not isinstance(criteo, dict) or "path" not in criteo or not set(criteo) <= {"path", "dense"}:
        raise SpecError(f"{where}: data.criteo must be {{path: FOLDER}} (a folder written by "
                        f"`embcompress data criteo`), optionally with dense: false, got {criteo!r}")
    use_dense = criteo.get("dense", True)
    if not isinstance(use_dense, bool):
        raise SpecError(f"{where}: data.criteo.dense must be true or false, got {use_dense!r}")
    from .criteo import read_manifest

    folder = Path(criteo["path"]).expanduser()
    try:
        manifest = read_manifest(folder)
    except (OSError, ValueError) as err:
        raise SpecError(f"{where}: data.criteo.path {str(folder)!r}: {err}") from None
    if not isinstance(manifest, dict):
        raise SpecError(f"{where}: data.criteo.path {str(folder)!r}: its manifest is not a JSON object")
    if not manifest.get("complete"):
        raise SpecError(f"{where}: data.criteo.path {str(folder)!r} holds an unfinished data set (no complete "
                        "manifest); rerun `embcompress data criteo`")
    if not use_dense and not any(f.endswith("_bucket") for f in manifest.get("schema", {}).get("sparse", [])):
        raise SpecError(f"{where}: data.criteo.dense is false but {str(folder)!r} has no bucketized dense fields: "
                        "the models would see no dense feature at all (prepare with --dense-buckets)")
    return {"criteo": {"path": str(folder), **({} if use_dense else {"dense": False})}}, manifest


#: The manifest entries that say what a prepared folder holds: its inputs' checksum, how they were encoded, and
#: the shape that came out. Timings and the folder's own path stay out.
_MANIFEST_IDENTITY = ("format", "version", "source_sha256", "options", "rows", "cardinalities", "splits")


def manifest_checksum(manifest: dict) -> str:
    """A short hash of what a prepared data folder holds, for the run keys: a folder rebuilt from other rows or
    options gets new keys (its old results are not reported as done), a copied or moved one keeps its results.
    A manifest without a source checksum is hashed whole, less its timing."""
    if manifest.get("source_sha256"):
        content = {k: manifest.get(k) for k in _MANIFEST_IDENTITY}
    else:
        content = {k: v for k, v in manifest.items() if k != "seconds"}
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_data(suite: "Suite") -> CTRData:
    """The suite's data set: generated, or a prepared Criteo folder (memory-mapped)."""
    if "criteo" in suite.data:
        from .criteo import load_criteo

        data = load_criteo(suite.data["criteo"]["path"])
        if not suite.data["criteo"].get("dense", True):
            # Dense features enter only through their bucketized fields (the BARS / OptEmbed protocol).
            data = replace(data, dense=np.zeros((len(data.labels), 0), dtype=np.float32))
        return data
    return make_synthetic(SyntheticConfig(**suite.data["synthetic"]))


def check_data_unchanged(suite: "Suite") -> None:
    """The prepared folder still holds the data the suite's run keys were made for (rebuilt meanwhile: refused,
    so no result is recorded under the old data's keys)."""
    if "criteo" not in suite.data or suite.data_checksum is None:
        return
    from .criteo import read_manifest

    folder = suite.data["criteo"]["path"]
    try:
        now = manifest_checksum(read_manifest(folder))
    except (OSError, ValueError, AttributeError) as err:
        raise SpecError(f"{suite.source}: data.criteo.path {folder!r}: {err}") from None
    if now != suite.data_checksum:
        raise SpecError(f"{suite.source}: data.criteo.path {folder!r} changed since the suite was loaded (manifest "
                        f"checksum {now}, was {suite.data_checksum}); load the suite again")


def load_suite(path: str | os.PathLike, *, data_path: str | os.PathLike | None = None) -> Suite:
    """Read and validate a suite; every error names the file and the key path, before anything trains.

    ``data_path`` replaces the suite's data with ``{criteo: {path: data_path}}`` (a prepared folder).
    Every table and model of the suite is built once on the meta device (:mod:`embcompress.suite_check`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"suite file {str(path)!r} does not exist")
    raw = read_suite_yaml(path)
    where = str(path)
    if not isinstance(raw, dict):
        raise SpecError(f"{where}: a suite must be a YAML mapping with keys {list(_SUITE_KEYS)}")
    check_known_keys(raw, _SUITE_KEYS, where)
    if "methods" not in raw:
        raise SpecError(f"{where}: missing key 'methods'")
    if ("model" in raw) == ("models" in raw):
        raise SpecError(f"{where}: give either 'model' (one mapping) or 'models' (a list), not both or neither")
    data = raw.get("data") or {"synthetic": {}}
    if data_path is not None:  # the suite's data options (dense: false) still apply to the given folder
        data = {"criteo": {**(data.get("criteo") or {} if isinstance(data, dict) else {}), "path": str(data_path)}}
    data, manifest = _check_data(data, where)
    dim = raw.get("embedding_dim", 16)
    if not is_int(dim) or dim < 1:
        raise SpecError(f"{where}: embedding_dim: expected a positive int, got {dim!r}")
    train_opts = check_train(raw.get("train"), where)
    tune = _check_tune(raw.get("tune"), train_opts, where)
    reference = raw.get("reference", True)
    if not isinstance(reference, bool):
        raise SpecError(f"{where}: reference must be true or false, got {reference!r}")
    seeds = check_seeds(raw.get("seeds"), where)
    model_list = [raw["model"]] if "model" in raw else raw["models"]
    if not isinstance(model_list, list) or not model_list:
        raise SpecError(f"{where}: models must be a non-empty list of model specs")
    models, model_paths = [], []
    for i, entry in enumerate(model_list):
        model_paths.append("model" if "model" in raw else f"models[{i}]")
        mwhere = f"{where}: {model_paths[-1]}"
        if not isinstance(entry, dict):
            raise SpecError(f"{mwhere}: a model spec is a mapping with a 'type' key, got {entry!r}")
        spec = {k: v for k, v in entry.items() if k != "name"}
        model_cls = lookup(MODELS, spec.get("type"), mwhere)
        check_kwargs(model_cls, {k: v for k, v in spec.items() if k != "type"}, mwhere,
                     provided=("embeddings", "num_dense"))
        models.append(ModelSpec(name=str(entry.get("name", spec["type"])), spec=spec))
    check_unique_names([m.name for m in models], "models", where)
    methods = []
    if not isinstance(raw["methods"], list) or not raw["methods"]:
        raise SpecError(f"{where}: methods must be a non-empty list")
    for i, m in enumerate(raw["methods"]):
        mwhere = f"{where}: methods[{i}]"
        if not isinstance(m, dict) or "table" not in m:
            raise SpecError(f"{mwhere}: each method needs a 'table' spec")
        check_known_keys(m, _METHOD_KEYS, mwhere)
        if not isinstance(m["table"], dict):
            raise SpecError(f'{mwhere}.table: expected a mapping with a "type" key, got {m["table"]!r}')
        table = dict(m["table"])
        cls = lookup(TABLES, table.get("type"), f"{mwhere}.table")
        options = {k: v for k, v in table.items() if k != "type"}
        ratios = check_ratios(m.get("compression"), mwhere)
        if ratios and "budget_bytes" in options:  # the ratio's budget would silently replace the given one
            raise SpecError(f"{mwhere}: table.budget_bytes and compression both set the size; give one of them")
        check_table_options(cls, {**options, **({"budget_bytes": 1} if ratios else {})}, f"{mwhere}.table")
        schedule = m.get("schedule") or {}
        if schedule:
            schedule_type = getattr(cls, "schedule_type", None)
            if schedule_type is None:
                raise SpecError(f"{mwhere}.schedule: {cls.registry_name} trains in one stage and takes no schedule")
            if not isinstance(schedule, dict):
                raise SpecError(f"{mwhere}.schedule: expected a mapping of staged-training settings, got {schedule!r}")
            schedule_type.from_dict(schedule, f"{mwhere}.schedule")
        method_train = check_train(m.get("train"), f"{mwhere}:") if "train" in m else {}
        try:
            TrainConfig(**{**train_opts, **method_train})
        except (TypeError, ValueError) as err:
            raise SpecError(f"{mwhere}: train over the suite's train: {err}") from None
        methods.append(MethodSpec(name=str(m.get("name", table["type"])), table=table, compression=ratios,
                                  schedule=dict(schedule), train=method_train))
    check_unique_names([m.name for m in methods], "methods", where)
    for i, m in enumerate(methods):
        fixed = sorted(k for k, _ in tune if k in m.table or k in m.train)
        if fixed:
            raise SpecError(f"{where}: methods[{i}] ({m.name}) sets {fixed}, which the tuning grid searches")
    suite = Suite(
        name=str(raw.get("name", path.stem)), data=data, embedding_dim=dim, models=tuple(models), train=train_opts,
        seeds=seeds, methods=tuple(methods), source=str(path), tune=tune, reference=reference,
        data_checksum=manifest_checksum(manifest) if manifest is not None else None,
    )
    shape = data_shape(data, manifest, where)
    base = baseline_bytes(shape.cardinalities, dim)
    first = suite.trials()[0]  # every value of the grid is checked in _check_tune; one build per table suffices
    build_on_meta(suite.methods, suite.models, shape, dim, where,
                  [f"methods[{i}]" for i in range(len(methods))], model_paths,
                  lambda method, ratio: table_spec(method, ratio, base, first))
    return suite


def table_spec(method: MethodSpec, ratio: float | None, base: int, trial: dict[str, Any] | None = None) -> dict:
    """The spec a run builds: the method's table, the trial's table options, and the ratio's budget."""
    spec = dict(method.table)
    spec.update({k: v for k, v in (trial or {}).items() if k in TABLE_TUNABLE})
    if ratio is not None:
        spec["budget_bytes"] = base / ratio
    return spec


def _check_tune(tune, train_opts: dict, where: str) -> tuple[tuple[str, tuple], ...]:
    """``{setting: [values, ...]}`` over :data:`TUNABLE` training settings not fixed in ``train`` and the
    :data:`TABLE_TUNABLE` table options; every value checked."""
    if tune is None:
        return ()
    if not isinstance(tune, dict) or not tune:
        raise SpecError(f"{where}: tune must be a mapping of training settings to lists of values, got {tune!r}")
    grid = []
    for key, values in tune.items():
        if key not in TUNABLE + TABLE_TUNABLE:
            raise SpecError(f"{where}: tune.{key}: not a tunable setting (one of {list(TUNABLE + TABLE_TUNABLE)})")
        if key in train_opts:
            raise SpecError(f"{where}: tune.{key} is also fixed in train; give it in one place")
        if not isinstance(values, list) or not values:
            raise SpecError(f"{where}: tune.{key} must be a non-empty list of values, got {values!r}")
        for j, v in enumerate(values):
            if v in values[:j]:  # the same combination would train twice
                raise SpecError(f"{where}: tune.{key}[{j}]: {v!r} is already tune.{key}[{values.index(v)}]")
            try:
                if key in TABLE_TUNABLE:
                    resolve_init_std(v, 1)
                else:
                    check_train_value(f"tune.{key}[{j}]", key, v, where)
                    TrainConfig(**{**train_opts, key: v})
            except (TypeError, ValueError) as err:
                if isinstance(err, SpecError):
                    raise
                raise SpecError(f"{where}: tune.{key}: {err}") from None
        grid.append((key, tuple(values)))
    return tuple(grid)
