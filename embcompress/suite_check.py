"""Checks of a benchmark suite made before anything trains: values with their key paths, and a dry build of
every table and model on the ``meta`` device.

:func:`embcompress.suite.load_suite` reads the YAML with :func:`read_suite_yaml` and calls these checks, so a
suite that would fail in its fifth run fails at load instead, naming the suite file and the key path of the bad
entry, e.g. ``suite.yaml: methods[2].table: expected a mapping with a "type" key, got 'hashing.v1'``.

The dry build (:func:`build_on_meta`) makes every (method, compression ratio) of the suite with the same
``build_table`` the runner uses, on the data set's real cardinalities (known without loading the data: from the
synthetic config, or the prepared folder's manifest), and every model around each of those tables, all under
``torch.device("meta")``: options and shapes are checked, no memory is allocated. A budget the method cannot
reach at a compression ratio (a ``BudgetError``) is not a suite error: the run is recorded as failed and the
report shows it as not reachable; a table given without a ratio must build. A build that fails only because the
meta device cannot run it (``NotImplementedError``, or an error about meta tensors) is a warning: that spec is
checked when its run starts. Every registered table and model builds on meta today.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import yaml

from .budget import BudgetError
from .registry import RegistryError, SpecError, build_model, build_table, check_kwargs
from .synthetic import NUM_DENSE, SyntheticConfig, scaled_cardinalities
from .training import TrainConfig

__all__ = ["read_suite_yaml", "check_known_keys", "lookup", "check_seeds", "check_ratios", "check_unique_names",
           "check_synthetic", "check_train", "check_train_value", "DataShape", "data_shape", "build_on_meta"]

#: Training settings the runner sets for each run itself; in a suite's ``train`` they would be ignored.
RUNNER_SET = {"seed": "seeds come from the suite's 'seeds' list", "device": "the device comes from --device",
              "progress": "progress bars follow --quiet"}


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite real number that is not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_known_keys(keys, allowed: Sequence[str], where: str) -> None:
    """Refuse keys outside ``allowed`` (a typo in a suite is an error, never ignored), naming them and ``where``."""
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise SpecError(f"{where}: unknown key(s) {extra}; allowed: {list(allowed)}")


def lookup(registry, name, where: str):
    """``registry.get(name)``, its error (close matches included) as a :class:`SpecError` naming ``where``."""
    try:
        return registry.get(name)
    except RegistryError as err:
        raise SpecError(f"{where}: {err}") from None


def read_suite_yaml(path: Path) -> Any:
    """The suite file parsed with ``yaml.safe_load``; a syntax error names the file, line and column."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{path}: {at}not valid YAML ({problem})") from None
    except UnicodeDecodeError as err:
        raise SpecError(f"{path}: not UTF-8 text ({err})") from None


def check_seeds(value, where: str) -> tuple[int, ...]:
    """A non-empty list of distinct non-negative ints (absent: ``(0,)``); a repeated seed would train twice."""
    if value is None:
        return (0,)
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: seeds: expected a non-empty list of non-negative ints such as [0, 1, 2], "
                        f"got {value!r}")
    seen: dict[int, int] = {}
    for i, seed in enumerate(value):
        # torch.manual_seed and numpy take seeds below 2**63 alike
        if not is_int(seed) or not 0 <= seed < 2 ** 63:
            raise SpecError(f"{where}: seeds[{i}]: expected a non-negative int, got {seed!r}")
        if seed in seen:
            raise SpecError(f"{where}: seeds[{i}]: seed {seed} is already seeds[{seen[seed]}]; each seed runs once")
        seen[seed] = i
    return tuple(int(s) for s in value)


def check_ratios(value, where: str) -> tuple[float, ...]:
    """A method's ``compression``: one ratio or a list of distinct positive finite ratios (absent: none)."""
    if value is None:
        return ()
    ratios = [value] if not isinstance(value, list) else value
    seen: dict[float, int] = {}
    for i, r in enumerate(ratios):
        at = f"{where}.compression" + (f"[{i}]" if isinstance(value, list) else "")
        if not is_number(r) or not r > 0:
            raise SpecError(f"{at}: expected a positive finite number, got {r!r}")
        if float(r) in seen:
            raise SpecError(f"{at}: ratio {r!r} is already compression[{seen[float(r)]}]; each ratio runs once")
        seen[float(r)] = i
    return tuple(float(r) for r in ratios)


def check_unique_names(names: Sequence[str], key: str, where: str) -> None:
    """Method (or model) names are the report's rows: two alike would merge into one row."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise SpecError(f"{where}: {key}[{i}].name: {name!r} is already the name of {key}[{seen[name]}]; give "
                            "each its own name (the report groups runs by name)")
        seen[name] = i


def _check_field(at: str, name: str, value, fields: dict[str, tuple[Any, str]], where: str) -> None:
    """An option of an int field must be an int and one of a number field a number: a bool or a string would
    pass a range check (``True >= 1``) or fail later with a TypeError. ``fields``: name -> (default, annotation);
    ``at``: the option's key path, for the message."""
    if name not in fields:
        return
    default, annotation = fields[name]
    if isinstance(default, bool):
        return
    if isinstance(default, int) and not is_int(value):
        raise SpecError(f"{where}: {at}: expected an int, got {value!r}")
    numeric = isinstance(default, float) or default is None and "float" in annotation
    if numeric and value is not None and not is_number(value):
        raise SpecError(f"{where}: {at}: expected a finite number, got {value!r}")


def _fields(cls) -> dict[str, tuple[Any, str]]:
    return {f.name: (f.default, str(f.type)) for f in dataclasses.fields(cls)}


def check_synthetic(options, where: str) -> dict[str, Any]:
    """``data.synthetic``: the options of :class:`~embcompress.synthetic.SyntheticConfig`, typed and in range."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise SpecError(f"{where}: data.synthetic: expected a mapping of generator options, got {options!r}")
    fields = _fields(SyntheticConfig)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise SpecError(f"{where}: data.synthetic: unknown key(s) {unknown}; allowed: {list(fields)}")
    for name, value in options.items():
        _check_field(f"data.synthetic.{name}", name, value, fields, where)
    try:
        SyntheticConfig(**options)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: data.synthetic: {err}") from None
    return dict(options)


def check_train(options, where: str) -> dict[str, Any]:
    """``train``: :class:`~embcompress.training.TrainConfig` settings, without those the runner sets per run."""
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise SpecError(f"{where}: train: expected a mapping of training settings, got {options!r}")
    for key, why in RUNNER_SET.items():
        if key in options:
            raise SpecError(f"{where}: train.{key}: set by the runner for each run ({why}); remove it")
    check_kwargs(TrainConfig, options, f"{where}: train", provided=tuple(RUNNER_SET))  # typos: close matches
    for name, value in options.items():
        check_train_value(f"train.{name}", name, value, where)
    try:
        TrainConfig(**options)
    except (TypeError, ValueError) as err:
        raise SpecError(f"{where}: train: {err}") from None
    return dict(options)


def check_train_value(at: str, name: str, value, where: str) -> None:
    """The type of one training setting ``name`` found at key path ``at`` (``train.lr``, ``tune.lr[1]``)."""
    _check_field(at, name, value, _fields(TrainConfig), where)


@dataclass(frozen=True)
class DataShape:
    """What the tables and models of a suite are built for: known without loading the data."""

    cardinalities: tuple[int, ...]
    num_dense: int
    field_names: tuple[str, ...]


def data_shape(data: dict[str, Any], manifest: dict | None, where: str) -> DataShape:
    """The shape of a checked suite ``data`` entry: the synthetic config's, or the prepared folder's manifest's."""
    if "synthetic" in data:
        cards = scaled_cardinalities(SyntheticConfig(**data["synthetic"]).cardinality_exponent)
        return DataShape(cards, NUM_DENSE, tuple(f"C{i + 1}" for i in range(len(cards))))
    manifest = manifest or {}
    cards = manifest.get("cardinalities")
    schema = manifest.get("schema") if isinstance(manifest.get("schema"), dict) else {}
    names, dense = schema.get("sparse"), schema.get("dense")
    folder = data["criteo"]["path"]
    if not (isinstance(cards, list) and cards and all(is_int(c) and c > 0 for c in cards)
            and isinstance(names, list) and len(names) == len(cards) and isinstance(dense, list)):
        raise SpecError(f"{where}: data.criteo.path {folder!r}: its manifest lacks the cardinalities or the "
                        "schema (sparse and dense field names); prepare the folder again")
    num_dense = len(dense) if data["criteo"].get("dense", True) else 0
    return DataShape(tuple(int(c) for c in cards), num_dense, tuple(str(n) for n in names))


def _fail(what: str, err: Exception) -> None:
    """A dry-build error as a suite error; one the meta device alone causes as a warning."""
    if isinstance(err, NotImplementedError) or "meta" in str(err).lower():
        warnings.warn(f"{what}: could not be built on the meta device to check it before training "
                      f"({type(err).__name__}: {err}); it is checked when its run starts", stacklevel=4)
        return
    detail = str(err) if isinstance(err, ValueError) else f"{type(err).__name__}: {err}"
    raise SpecError(f"{what}: {detail}") from None


def build_on_meta(methods: Sequence, models: Sequence, shape: DataShape, embedding_dim: int, where: str,
                  method_paths: Sequence[str], model_paths: Sequence[str],
                  table_spec: Callable[[Any, float | None], dict]) -> int:
    """Build every table (each method at each ratio) and every model around each table on the meta device.

    ``table_spec(method, ratio)`` is the spec the runner builds (budget and tuned table options in place).
    Returns the number of tables built; raises :class:`SpecError` naming the file, the key path and the ratio.
    """
    tables = []
    with torch.device("meta"):
        for method, path in zip(methods, method_paths):
            for ratio in method.compression or (None,):
                what = f"{path}.table" + (f" at {ratio:g}x" if ratio is not None else "")
                try:
                    table = build_table(table_spec(method, ratio), shape.cardinalities, embedding_dim,
                                        field_names=shape.field_names)
                except BudgetError as err:
                    if ratio is not None:
                        # the ratio and the data set the budget, and this one is out of the method's reach: a
                        # failed run, which the report shows as not reachable
                        continue
                    _fail(f"{where}: {what}", err)
                    continue
                except Exception as err:  # noqa: BLE001 - whatever the constructor raises, named here
                    _fail(f"{where}: {what}", err)
                    continue
                tables.append((what, table))
        for model, path in zip(models, model_paths):
            for what, table in tables:
                try:
                    build_model(model.spec, table, shape.num_dense)
                except Exception as err:  # noqa: BLE001
                    _fail(f"{where}: {path} ({model.name}) with {what}", err)
    return len(tables)
