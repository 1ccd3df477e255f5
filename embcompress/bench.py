"""The memory-vs-AUC benchmark: a YAML suite of methods x compression ratios x seeds on one data set and model.

Each method is built with ``from_budget`` at ``baseline_bytes / ratio`` (or as given, without a ratio), trained
with the same model and settings, and reported with its exact bytes, ratio, test AUC and logloss, AUC change
against the full table, and training samples/s. Every finished run is appended as one JSON line (flushed and
fsynced) to ``results.jsonl``; the markdown table and the AUC-vs-bytes plot are made from those lines.

Integrity: a suite is checked whole at load, every table and model built once on the meta device
(:mod:`embcompress.suite_check`). A run's key hashes everything that decides its result, the data included: the
synthetic config, or a prepared folder's manifest checksum (not its path), so a rebuilt folder is run again.
Each run is claimed before it trains (:mod:`embcompress.claims`), so processes sharing a results folder never
train one run twice. Results are strict JSON; an undefined AUC (a split with one class) is a failed run.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import math
import os
import platform
import re
import resource
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from . import __version__
from .contract import CompressedEmbedding, resolve_init_std
from .data import CTRData
from .memory import baseline_bytes
from .registry import (
    MODELS, TABLES, RegistryError, SpecError, _load_builtins, build_model, build_table, check_kwargs,
    check_table_options,
)
from .suite_check import (
    build_on_meta, check_ratios, check_seeds, check_synthetic, check_train, check_train_value, check_unique_names,
    data_shape, is_int, read_suite_yaml,
)
from .synthetic import SyntheticConfig, make_synthetic
from .training import TrainConfig, train

__all__ = [
    "Suite", "MethodSpec", "load_suite", "default_suite_path", "run_suite", "read_results", "results_frame",
    "format_table", "best_per_budget", "plot_results", "reference_of",
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
_METHOD_KEYS = ("name", "table", "compression")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    table: dict[str, Any]
    compression: tuple[float, ...] = ()  # empty: built as given, without a budget


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


def _unknown(keys, allowed: Sequence[str], where: str) -> None:
    extra = sorted(set(keys) - set(allowed))
    if extra:
        raise SpecError(f"{where}: unknown key(s) {extra}; allowed: {list(allowed)}")


def _lookup(registry, name, where: str):
    try:
        return registry.get(name)
    except RegistryError as err:
        raise SpecError(f"{where}: {err}") from None


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


def _check_data_unchanged(suite: "Suite") -> None:
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
    _unknown(raw, _SUITE_KEYS, where)
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
    _load_builtins()
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
        model_cls = _lookup(MODELS, spec.get("type"), mwhere)
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
        _unknown(m, _METHOD_KEYS, mwhere)
        if not isinstance(m["table"], dict):
            raise SpecError(f'{mwhere}.table: expected a mapping with a "type" key, got {m["table"]!r}')
        table = dict(m["table"])
        cls = _lookup(TABLES, table.get("type"), f"{mwhere}.table")
        options = {k: v for k, v in table.items() if k != "type"}
        ratios = check_ratios(m.get("compression"), mwhere)
        if ratios and "budget_bytes" in options:  # the ratio's budget would silently replace the given one
            raise SpecError(f"{mwhere}: table.budget_bytes and compression both set the size; give one of them")
        check_table_options(cls, {**options, **({"budget_bytes": 1} if ratios else {})}, f"{mwhere}.table")
        methods.append(MethodSpec(name=str(m.get("name", table["type"])), table=table, compression=ratios))
    check_unique_names([m.name for m in methods], "methods", where)
    for i, m in enumerate(methods):
        fixed = sorted(k for k, _ in tune if k in m.table)
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


@contextlib.contextmanager
def _locked_results(path: Path):
    """An O_APPEND descriptor of ``path`` under an exclusive ``flock``: shards of a suite share the file.

    Under the lock an unterminated last line can only be a dead writer's, so it is cut first.
    """
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _drop_partial_tail(path)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def json_line(record: dict) -> str:
    """``record`` as one line of strict JSON (``allow_nan=False``): a non-finite float becomes null and its key
    path is listed under ``non_finite``, so that any JSON reader, not only Python's, can read the results."""
    paths: list[str] = []

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            paths.append(path)
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}[{i}]") for i, v in enumerate(value)]
        return value

    record = clean(record, "")
    if paths:
        record["non_finite"] = sorted(paths)
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def _append_line(path: Path, record: dict) -> None:
    view = memoryview(json_line(record).encode("utf-8"))
    with _locked_results(path) as fd:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)


def run_one(suite: Suite, data: CTRData, run: Run, *, device: str, progress: bool,
            trial: dict[str, Any] | None = None) -> dict:
    dim = suite.embedding_dim
    base = baseline_bytes(data.cardinalities, dim)
    spec = table_spec(run.method, run.ratio, base, trial)
    torch.manual_seed(run.seed)
    table: CompressedEmbedding = build_table(spec, data.cardinalities, dim, field_names=data.field_names)
    model = build_model(run.model.spec, table, data.num_dense)
    dense_parameters = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in table.parameters())
    training = {k: v for k, v in (trial or {}).items() if k not in TABLE_TUNABLE}
    cfg = TrainConfig(**{**suite.train, **training, "seed": run.seed, "device": device, "progress": progress})
    staged = {}
    start = time.perf_counter()
    if getattr(table, "trains_in_stages", False):
        # One method, several training stages; the table it reports is the one it exports.
        fit = table.fit_staged(model, data, cfg)
        result, report = fit.result, fit.table.memory_report()
        staged = {"stage_seconds": fit.stages, "stages": fit.details}
    else:
        result = train(model, data, cfg)
        report = table.memory_report()
    wall = time.perf_counter() - start  # every stage with its evaluations, beside train_seconds (steps only)
    return {
        **_run_fields(suite, run), "embedding_dim": dim, "device": device, "model_spec": run.model.spec,
        "dense_parameters": dense_parameters,
        "bytes": report.total_bytes, "parameter_bytes": report.parameter_bytes, "buffer_bytes": report.buffer_bytes,
        "baseline_bytes": report.baseline_bytes, "ratio": report.ratio,
        "test_auc": result.test_auc, "test_logloss": result.test_logloss,
        "val_auc": result.val_auc, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_seconds": result.train_seconds, "samples_per_second": result.samples_per_second,
        "bayes_auc": data.bayes_auc, "wall_seconds": wall, "target_bytes": spec.get("budget_bytes"),
        "tuned": dict(trial or {}), "init_std": getattr(table, "init_std", None), **staged,
    }


def _run_fields(suite: Suite, run: Run) -> dict:
    return {"suite": suite.name, "model": run.model.name, "method": run.method.name, "table": run.method.table,
            "target_ratio": run.ratio, "seed": run.seed}


def _key_data(suite: Suite) -> dict[str, Any]:
    """The data part of the keys: the synthetic config (as given: so the committed results keep their keys), or
    what a prepared folder holds (its manifest checksum) in place of its path."""
    if "criteo" not in suite.data or suite.data_checksum is None:
        return suite.data
    options = {k: v for k, v in suite.data["criteo"].items() if k != "path"}
    return {"criteo": {**options, "manifest": suite.data_checksum}}


def run_key(suite: Suite, run: Run) -> str:
    """Hash of everything that determines one run's result, so a rerun can tell what is already done."""
    config = {
        "data": _key_data(suite), "embedding_dim": suite.embedding_dim, "model": run.model.spec, "train": suite.train,
        "method": run.method.name, "table": run.method.table, "ratio": run.ratio, "seed": run.seed,
    }
    if suite.tune:  # absent without a grid, so the keys of suites without one are unchanged
        config["tune"] = [[k, list(v)] for k, v in suite.tune]
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def trial_key(suite: Suite, run: Run, trial: dict[str, Any]) -> str:
    """Key of one trial: the run with the trial's settings in place, and not the grid, so a grid that grows (or
    moves a fixed setting into the grid at the same value) reuses the trials it already has."""
    config = {
        "data": _key_data(suite), "embedding_dim": suite.embedding_dim, "model": run.model.spec,
        "train": {**suite.train, **{k: v for k, v in trial.items() if k not in TABLE_TUNABLE}},
        "method": run.method.name,
        "table": {**run.method.table, **{k: v for k, v in trial.items() if k in TABLE_TUNABLE}},
        "ratio": run.ratio, "seed": run.seed, "trial": True,
    }
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux: the peak of this process so far, so it only grows along a suite.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _drop_partial_tail(path: Path) -> int:
    """Cut an unterminated last line (a run killed mid-write); returns the bytes removed."""
    if not path.exists() or path.stat().st_size == 0:
        return 0
    with open(path, "rb+") as fh:
        data = fh.read()
        if data.endswith(b"\n"):
            return 0
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
        return len(data) - keep


def run_suite(suite: Suite, out_dir: str | os.PathLike, *, device: str = "cpu", progress: bool = True,
              shard: tuple[int, int] = (0, 1)) -> list[dict]:
    """Run every (model, method, ratio, seed) of ``suite``; append each finished run to ``out_dir/results.jsonl``.

    Runs already recorded as finished (same run key) are skipped, so a killed suite resumes where it stopped.
    A failing run is recorded with its error, the suite goes on, and a rerun tries it again; so is a data set
    that fails to load, or whose validation or test split has a single class (its AUC is undefined).
    ``shard=(i, n)`` runs only the runs whose position in ``suite.runs()`` is ``i`` modulo ``n``: n processes
    (or machines sharing the folder) split a suite and append to one file. Each run is claimed before it trains
    (:mod:`embcompress.claims`), so processes sharing the folder, sharded or not, never run one run twice.
    Returns the records of the whole suite found in the file at the end, the ones run now included, and the
    reference fit (``status == "reference"``, or ``"reference_failed"``) when the suite has one.
    """
    from tqdm.auto import tqdm

    from .claims import Claims
    from .distributed import is_main_process

    _check_data_unchanged(suite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    writer = is_main_process()  # under torchrun / --nproc every rank trains, only rank 0 writes
    if writer:
        with _locked_results(results_path):  # cuts a killed run's partial line; another shard may be writing
            pass
    existing = read_results(results_path) if results_path.exists() else []
    done = {r["run_key"]: r for r in existing if r.get("status") == "ok" and "run_key" in r}
    trials_done = {r["run_key"]: r for r in existing if r.get("status") == "trial" and "run_key" in r}
    index, count = _check_shard(shard)
    runs = [(run, run_key(suite, run)) for run in suite.runs()]
    mine = runs[index::count]
    todo = [(run, key) for run, key in mine if key not in done]
    if len(todo) < len(mine) and progress:
        print(f"{len(mine) - len(todo)} of {len(mine)} runs already in {results_path}; running the other {len(todo)}")
    claims = Claims(out) if writer else None
    since = len(existing)  # records from here on were written while this call ran
    data, unusable = None, None  # unusable: why no run of this data can give an AUC (recorded for each)
    meta = {"torch": torch.__version__, "python": platform.python_version(), "embcompress": __version__,
            "git_commit": _git_commit()}

    def record_line(record: dict, key: str) -> dict:
        record.update(meta, run_key=key, peak_rss_mb=_peak_rss_mb())
        if writer:
            _append_line(results_path, record)
        return record

    elsewhere = []
    for run, key in tqdm(todo, desc=f"suite {suite.name}", disable=None if progress else True):
        skip, fresh = _take(results_path, claims, key, since) if claims is not None else (None, None)
        skip = _from_rank0(skip)  # every rank of a data-parallel run trains the same runs
        if skip:
            elsewhere.append(f"{run.method.name} {f'{run.ratio:g}x ' if run.ratio else ''}seed {run.seed}: {skip}")
            continue
        try:
            # trials another process finished before it died are kept, not trained again
            trials_done.update({r["run_key"]: r for r in fresh or () if r.get("status") == "trial"})
            if data is None and unusable is None:
                try:
                    data = load_data(suite)
                except Exception as err:  # noqa: BLE001 - e.g. an empty split: every run fails alike, recorded
                    unusable = f"data: {type(err).__name__}: {err}"
                    print(f"suite {suite.name}: {unusable}", flush=True)
                else:
                    unusable = _undefined_auc(data)
                    if suite.reference and index == 0 and writer:
                        _reference(suite, data, existing, record_line, progress, results_path, claims, since)
            if unusable:
                record = {**_run_fields(suite, run), "status": "failed", "error": unusable}
            else:
                record = _tuned_run(suite, data, run, key, trials_done, record_line, device, progress)
            done[key] = record_line(record, key)
        finally:
            if claims is not None:
                claims.release(key)
    if claims is not None:
        with _locked_results(results_path):  # under the lock: no other process is taking a claim just now
            claims.tidy()
    if elsewhere:
        print(f"{len(elsewhere)} run(s) left to other processes sharing {out}:\n  " + "\n  ".join(elsewhere),
              flush=True)
    records = read_results(results_path) if results_path.exists() else []
    for n, r in enumerate(records):  # what the other processes (shards, or unsharded ones) recorded meanwhile
        key = r.get("run_key")
        if key and (r.get("status") == "ok" or key not in done and (count > 1 or n >= since)):
            done[key] = r
    references = [r for r in records if r.get("status") == "reference"] if writer else []
    if writer and not references and suite.reference:
        references = [r for r in records[since:] if r.get("status") == "reference_failed"]
    return [done[key] for _, key in runs if key in done] + references[-1:]


def _take(results_path: Path, claims, key: str, since: int) -> tuple[str | None, list[dict]]:
    """Claim run ``key`` under the results file's lock: ``(None, records)`` when this process now holds it, or
    ``(why it is skipped, records)`` when another process recorded it since ``since`` (or finished it at any
    time), or holds a live claim on it. ``records``: the file as read under the lock."""
    with _locked_results(results_path):
        records = read_results(results_path)
        for n, r in enumerate(records):
            if r.get("run_key") == key and (r.get("status") in ("ok", "reference") or n >= since and
                                            r.get("status") in ("failed", "reference_failed")):
                return "recorded by another process meanwhile", records
        holder = claims.holder(key)
        if holder is not None:
            return f"being run by process {holder.get('pid')} on {holder.get('host')}", records
        claims.take(key)
    return None, records


def _from_rank0(value):
    """Rank 0's ``value`` on every rank of a data-parallel run (only rank 0 reads the claims); as is otherwise."""
    from .distributed import is_distributed

    if not is_distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _undefined_auc(data: CTRData) -> str | None:
    """Why the AUC of ``data``'s validation or test split is undefined (an empty or single-class split), or
    None. Early stopping and tuning need the validation AUC, the report the test AUC."""
    for split in ("val", "test"):
        lo, hi = data.splits.get(split, (0, 0))
        positives = int(np.asarray(data.labels[lo:hi], dtype=np.float64).sum())
        if hi == lo:
            return f"{data.name}: the {split} split is empty: AUC undefined"
        if positives in (0, hi - lo):
            which = "positives" if positives == 0 else "negatives"
            return f"{data.name}: the {split} split has no {which} (0 of {hi - lo} rows): AUC undefined"
    return None


def _tuned_run(suite: Suite, data: CTRData, run: Run, key: str, trials_done: dict[str, dict], record_line,
               device: str, progress: bool) -> dict:
    """One run: trained once, or once per combination of the suite's tuning grid, keeping the combination with
    the best validation AUC (its test AUC is the run's). Each finished trial is its own line, so a killed
    tuning resumes; a failing trial fails the run (a budget error fails every combination alike)."""
    results = []
    for trial in suite.trials():
        tkey = trial_key(suite, run, trial) if suite.tune else key
        record = trials_done.get(tkey)
        if record is None:
            try:
                record = run_one(suite, data, run, device=device, progress=progress, trial=trial)
                bad = [k for k in ("val_auc", "test_auc") if not _finite(record.get(k))]
                if bad:  # a single-class split is caught before training; this guards the results' JSON
                    raise FloatingPointError(f"{' and '.join(bad)} not finite ({record.get(bad[0])!r})")
            except Exception as err:  # recorded, and the suite goes on
                return {**_run_fields(suite, run), "status": "failed", "error": f"{type(err).__name__}: {err}",
                        **({"tuned": trial} if suite.tune else {})}
            if suite.tune:
                record = record_line({**record, "status": "trial", "parent_key": key}, tkey)
        results.append(record)
    if not suite.tune:
        return {**results[0], "status": "ok"}
    best = max(results, key=lambda r: r["val_auc"] if _finite(r.get("val_auc")) else -math.inf)
    trials = [{"tuned": r["tuned"], "val_auc": r["val_auc"], "test_auc": r["test_auc"], "best_epoch": r["best_epoch"]}
              for r in results]
    record = {k: v for k, v in best.items() if k not in ("parent_key", "run_key", "peak_rss_mb")}
    return {**record, "status": "ok", "trials": trials,
            "tuning_seconds": sum(r.get("wall_seconds") or 0.0 for r in results)}


def reference_key(suite: Suite) -> str:
    """Key of the reference fit: it depends on the data alone."""
    return hashlib.sha256(json.dumps(["reference", _key_data(suite)], sort_keys=True).encode()).hexdigest()[:16]


def _reference(suite: Suite, data: CTRData, existing: list[dict], record_line, progress: bool,
               results_path: Path, claims, since: int) -> None:
    """The one-hot logistic regression reference of the suite's data, fitted once and kept as a line; a fit that
    fails (a split with one class) is kept as a ``reference_failed`` line, and the runs go on."""
    from .reference import logistic_regression_reference

    key = reference_key(suite)
    if any(r.get("run_key") == key for r in existing if r.get("status") == "reference"):
        return
    if claims is not None and _take(results_path, claims, key, since)[0]:
        return  # fitted, or being fitted, by another process
    try:
        if progress:
            print("fitting the scikit-learn one-hot logistic regression reference", flush=True)
        try:
            result = logistic_regression_reference(data)
        except Exception as err:  # noqa: BLE001 - the runs do not need it
            print(f"suite {suite.name}: the reference fit failed: {type(err).__name__}: {err}", flush=True)
            record_line({"suite": suite.name, "status": "reference_failed", "error": f"{type(err).__name__}: {err}"},
                        key)
            return
        record_line({"suite": suite.name, "status": "reference", **result.as_dict(), "bayes_auc": data.bayes_auc},
                    key)
    finally:
        if claims is not None:
            claims.release(key)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    index, count = shard
    if not (isinstance(count, int) and isinstance(index, int) and count >= 1 and 0 <= index < count):
        raise ValueError(f"shard must be (i, n) with n >= 1 and 0 <= i < n, got {shard!r}")
    return index, count


#: The keys each kind of record needs (what resuming and the report read), by status.
RECORD_KEYS = {
    "ok": ("method", "seed", "target_ratio", "test_auc", "bytes", "ratio"),
    "failed": ("method", "seed", "error"),
    "trial": ("run_key", "parent_key", "tuned", "val_auc", "test_auc", "best_epoch"),
    "reference": ("name", "C", "test_auc", "test_logloss"),
    "reference_failed": ("error",),
}


def _check_record(record, where: str) -> None:
    """A results line: a JSON object with a known status, the keys of that status, and the common keys typed."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object (one record), got {record!r:.80}")
    status = record.get("status")
    if status is None:
        raise ValueError(f"{where}: a record without a 'status' (one of {', '.join(RECORD_KEYS)})")
    if status not in RECORD_KEYS:
        raise ValueError(f"{where}: unknown status {status!r} (one of {', '.join(RECORD_KEYS)})")
    missing = [k for k in RECORD_KEYS[status] if k not in record]
    if missing:
        raise ValueError(f"{where}: a record with status {status!r} lacks {', '.join(map(repr, missing))}")
    for key, ok, what in (("method", lambda v: isinstance(v, str), "a string"),
                          ("run_key", lambda v: isinstance(v, str), "a string"),
                          ("error", lambda v: isinstance(v, str), "a string"),
                          ("seed", is_int, "an int"),
                          ("target_ratio", lambda v: v is None or _finite(v), "a number or null"),
                          ("bytes", lambda v: v is None or is_int(v), "an int or null"),
                          ("test_auc", lambda v: v is None or isinstance(v, (int, float)) and not isinstance(v, bool),
                           "a number or null")):
        if key in record and not ok(record[key]):
            raise ValueError(f"{where}: {key!r} must be {what}, got {record[key]!r:.80}")


def read_results(path: str | os.PathLike) -> list[dict]:
    """Records of a results.jsonl; an unterminated last line (a run killed mid-write) is ignored.

    A line that is not JSON, or not a record of a known kind with its keys, is an error naming the file and line.
    A bare ``NaN`` (written by versions before strict JSON) is read as NaN; the report leaves such runs out.
    """
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    lines = text.split("\n")
    complete = lines[:-1]  # the text after the last newline is empty, or a partial line
    records = []
    for number, line in enumerate(complete, start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: line {number} is not valid JSON ({err.msg})") from None
            _check_record(record, f"{path}: line {number}")
            records.append(record)
    return records


def results_frame(results: str | os.PathLike | list[dict]):
    """The runs of a results.jsonl (or its records) as a pandas DataFrame, one row per run, for notebooks.

    >>> results_frame([{"method": "full", "test_auc": 0.8, "status": "ok"}])["test_auc"].tolist()
    [0.8]
    """
    import pandas as pd

    records = results if isinstance(results, list) else read_results(results)
    return pd.DataFrame.from_records(records)


def _mean(records: list[dict], key: str) -> float:
    """Mean of the finite values of ``key`` (NaN when none has one: a missing or null figure is not a zero)."""
    values = [r.get(key) for r in records if _finite(r.get(key))]
    return float(np.mean(values)) if values else math.nan


def _runs(records: list[dict]) -> list[dict]:
    """The run records (finished or failed): not the tuning trials, nor the reference fit."""
    return [r for r in records if r.get("status") in ("ok", "failed")]


def reference_of(records: list[dict]) -> dict | None:
    """The scikit-learn logistic regression reference recorded beside the runs (the last one), if any."""
    refs = [r for r in records if r.get("status") == "reference" and _finite(r.get("test_auc"))]
    return refs[-1] if refs else None


def _tuned_text(rs: list[dict]) -> str:
    """The tuned settings the seeds chose, e.g. ``lr=0.002, embedding_l2=1e-05`` (``a/b`` where seeds differ)."""
    keys = list(dict.fromkeys(k for r in rs for k in (r.get("tuned") or {})))
    parts = []
    for k in keys:
        values = list(dict.fromkeys(f"{r['tuned'][k]:g}" if isinstance((r.get("tuned") or {}).get(k), float)
                                    else str((r.get("tuned") or {}).get(k)) for r in rs))
        parts.append(f"{k}={'/'.join(values)}")
    return ", ".join(parts)


#: A table this far under its budget is marked in the report: "at most" was met with room to spare.
UNDER_TARGET = 0.95


def _no_auc(records: list[dict]) -> list[dict]:
    """Runs recorded as finished without a finite test AUC (a NaN of an older version, a null, a missing key)."""
    return [r for r in records if r.get("status") == "ok" and not _finite(r.get("test_auc"))]


def _group(records: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (model, method, target ratio), over the runs with a test AUC."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and _finite(r.get("test_auc")):
            groups.setdefault((r.get("model", ""), r.get("method"), r.get("target_ratio")), []).append(r)
    rows = []
    for (model, method, target), rs in groups.items():
        auc = np.array([r["test_auc"] for r in rs])
        size = _mean(rs, "bytes")
        rows.append({
            "model": model, "method": method, "target_ratio": target, "seeds": len(rs),
            "bytes": int(size) if math.isfinite(size) else 0, "ratio": _mean(rs, "ratio"),
            "auc": float(auc.mean()), "auc_std": float(auc.std()) if len(rs) > 1 else 0.0,
            "logloss": _mean(rs, "test_logloss"), "samples_per_second": _mean(rs, "samples_per_second"),
            "best_epoch": _mean(rs, "best_epoch"), "epochs_run": _mean(rs, "epochs_run"),
            "dense_parameters": _mean(rs, "dense_parameters"),
            "under_target": any(_finite(r.get("target_bytes")) and _finite(r.get("bytes"))
                                and r["bytes"] < UNDER_TARGET * r["target_bytes"] for r in rs),
            "tuned": _tuned_text(rs),
        })
    return sorted(rows, key=lambda g: (str(g["model"]), -g["bytes"], str(g["method"])))


def _full_auc(rows: list[dict], model: str) -> float | None:
    full = [g["auc"] for g in rows if g["model"] == model and g["ratio"] <= 1.001 and g["target_ratio"] is None]
    return max(full) if full else None


def _bayes(records: list[dict]) -> float | None:
    return next((r.get("bayes_auc") for r in records if _finite(r.get("bayes_auc"))), None)


def format_table(records: list[dict]) -> str:
    """Markdown table of the runs (mean +- std over seeds), with the Bayes AUC as the ceiling."""
    rows = _group(records)
    several_models = len({g["model"] for g in rows}) > 1
    bayes = _bayes(records)
    reference = reference_of(records)
    tuned = any(g["tuned"] for g in rows)
    lines = []
    if bayes is not None:
        lines.append(f"Bayes-optimal test AUC of the data (the ceiling): **{bayes:.4f}**\n")
    if reference is not None:
        c = f"C={reference['C']:g}" if _finite(reference.get("C")) else "C"
        logloss = reference.get("test_logloss")
        lines.append(f"Reference, {reference.get('name', 'one-hot LR')} on the same train split ({c} chosen on "
                     f"validation): test AUC **{reference['test_auc']:.4f}**, logloss "
                     f"{f'{logloss:.4f}' if _finite(logloss) else 'n/a'}\n")
    model_head = "| model | dense params " if several_models else ""
    bayes_head = "| vs Bayes " if bayes is not None else ""
    tuned_head = "| tuned on validation | best epoch / run " if tuned else ""
    lines.append(f"{model_head}| method | target | bytes | ratio | test AUC | ΔAUC vs full {bayes_head}| logloss "
                 f"| train samples/s | seeds {tuned_head}|")
    lines.append("|---" * (9 + (bayes is not None) + 2 * several_models + 2 * tuned) + "|")
    for g in rows:
        full = _full_auc(rows, g["model"])
        target = f"{g['target_ratio']:g}x" if g["target_ratio"] else "-"
        auc = _auc_cell(g)
        delta = f"{g['auc'] - full:+.4f}" if full is not None else "n/a"
        gap = f"| {g['auc'] - bayes:+.4f} " if bayes is not None else ""
        model_cells = f"| {g['model']} | {g['dense_parameters']:,.0f} " if several_models else ""
        under = " †" if g["under_target"] else ""
        tuned_cell = f"| {g['tuned']} | {g['best_epoch']:.2g} / {g['epochs_run']:.2g} " if tuned else ""
        lines.append(
            f"{model_cells}| {g['method']} | {target} | {g['bytes']:,}{under} | {g['ratio']:.2f}x | {auc} | {delta} "
            f"{gap}| {g['logloss']:.4f} | {g['samples_per_second']:,.0f} | {g['seeds']} {tuned_cell}|"
        )
    if any(g["under_target"] for g in rows):
        lines.append(f"\n† more than {1 - UNDER_TARGET:.0%} under its budget: the method's sizes step coarsely "
                     "there, and a budget is a ceiling")
    best = best_per_budget(records)
    if best:
        lines += ["", "Best method per budget (highest mean test AUC):", ""]
        lines += [f"{model_head}| target | best method | bytes | test AUC | ΔAUC vs full |",
                  "|---" * (5 + 2 * several_models) + "|"]
        for g in best:
            model_cells = f"| {g['model']} | {g['dense_parameters']:,.0f} " if several_models else ""
            delta = f"{g['delta']:+.4f}" if g["delta"] is not None else "n/a"
            lines.append(f"{model_cells}| {g['target_ratio']:g}x | {g['method']} | {g['bytes']:,} "
                         f"| {_auc_cell(g)} | {delta} |")
    lines += _coverage(records, rows)
    lines += _failures(records)
    missing = _no_auc(records)
    if missing:
        which = ", ".join(f"{r.get('method')} at {r['target_ratio']:g}x" if _finite(r.get("target_ratio"))
                          else str(r.get("method")) for r in missing[:10])
        lines.append(f"\n{len(missing)} run(s) recorded as finished have no test AUC (nan, null or missing) and are "
                     f"left out above: {which}{' ...' if len(missing) > 10 else ''}")
    return "\n".join(lines)


def _failures(records: list[dict]) -> list[str]:
    """Failed runs, one line per method and cause: a budget error names the minimum budget, which is the same
    at every target below it, for every model and seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "failed":
            minimum = re.search(r"minimum budget ([\d,]+)", r.get("error") or "")
            groups.setdefault((r.get("method"), minimum.group(1) if minimum else r.get("error")), []).append(r)
    lines = []
    for (method, cause), rs in groups.items():
        targets = ", ".join(f"{t:g}x" if t else "no budget" for t in sorted({r.get("target_ratio") or 0 for r in rs}))
        models = ", ".join(dict.fromkeys(str(r.get("model")) for r in rs))
        seeds = sorted({r.get("seed") for r in rs}, key=str)
        lines.append(f"\nFAILED: {method} at {targets} ({models}; seed{'s' * (len(seeds) > 1)} "
                     f"{', '.join(map(str, seeds))}): {rs[0].get('error')}")
    failed_refs = [r for r in records if r.get("status") == "reference_failed"]
    if failed_refs and reference_of(records) is None:
        lines.append(f"\nFAILED: the one-hot LR reference: {failed_refs[-1].get('error')}")
    return lines


def _auc_cell(g: dict) -> str:
    return f"{g['auc']:.4f}" + (f" ± {g['auc_std']:.4f}" if g["seeds"] > 1 else "")


def best_per_budget(records: list[dict]) -> list[dict]:
    """For each (model, target ratio), the method with the highest mean test AUC over seeds: the report row's
    fields (``auc``, ``auc_std``, ``bytes``, ...) and ``delta``, its AUC less the full table's (None without one)."""
    rows = _group(records)
    best: dict[tuple, dict] = {}
    for g in rows:
        key = (g["model"], g["target_ratio"])
        if g["target_ratio"] is not None and (key not in best or g["auc"] > best[key]["auc"]):
            best[key] = g
    out = []
    for (model, _), g in sorted(best.items()):
        full = _full_auc(rows, model)
        out.append({**g, "delta": g["auc"] - full if full is not None else None})
    return out


def _coverage(records: list[dict], rows: list[dict]) -> list[str]:
    """Method x budget grid of mean AUCs, per model; a budget a method could not reach shows as 'no'."""
    records = _runs(records)
    targets = sorted({r["target_ratio"] for r in records if _finite(r.get("target_ratio"))})
    if len(targets) < 2:
        return []
    auc = {(g["model"], g["method"], g["target_ratio"]): g["auc"] for g in rows}
    tried = {(r.get("model", ""), r.get("method"), r.get("target_ratio")) for r in records}
    lines = []
    for model in dict.fromkeys(r.get("model", "") for r in records):
        methods = [m for m in dict.fromkeys(r.get("method") for r in records if r.get("model", "") == model)
                   if any((model, m, t) in tried for t in targets)]
        lines += ["", f"Test AUC by method and budget{f' ({model})' if model else ''}; 'no': not reachable "
                      "(see FAILED below):", ""]
        lines += ["| method | " + " | ".join(f"{t:g}x" for t in targets) + " |", "|---" * (len(targets) + 1) + "|"]
        for m in methods:
            cells = [f"{auc[(model, m, t)]:.4f}" if (model, m, t) in auc else "no" if (model, m, t) in tried else ""
                     for t in targets]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (bytes, auc) that no other point beats on both (fewer or equal bytes and higher AUC)."""
    front, best = [], -math.inf
    for b, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((b, a))
            best = a
    return front


def plot_results(records: list[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """AUC vs bytes (log x), one line per method, the Pareto frontier, full-table and Bayes references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in _group(records) if g["bytes"] > 0]  # a log axis has no place for 0 or unknown bytes
    models = list(dict.fromkeys(g["model"] for g in rows)) or [""]
    # One panel per model: a frontier or a full-table line across models would compare unlike things.
    fig, axes = plt.subplots(1, len(models), figsize=(8.5 * len(models), 5.5), squeeze=False, sharey=True)
    bayes = _bayes(records)
    reference = reference_of(records)
    methods = list(dict.fromkeys(g["method"] for g in rows))
    # A method keeps its colour and marker in every panel; tab20 and 7 markers tell a dozen methods apart.
    style = {m: (plt.get_cmap("tab20").colors[(2 * i) % 20 + (i // 10) % 2], "osD^vPX"[i % 7])
             for i, m in enumerate(methods)}
    for ax, model in zip(axes[0], models):
        mine = [g for g in rows if g["model"] == model]
        for method in dict.fromkeys(g["method"] for g in mine):
            pts = sorted((g["bytes"], g["auc"], g["auc_std"]) for g in mine if g["method"] == method)
            xs, ys, es = zip(*pts)
            color, marker = style[method]
            ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, markersize=4, capsize=3, label=method)
        front = pareto_front([(g["bytes"], g["auc"]) for g in mine])
        if front:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="black", alpha=0.35, linewidth=3, label="Pareto frontier", zorder=0)
        full = _full_auc(rows, model)
        if full is not None:
            ax.axhline(full, color="gray", linestyle="--", linewidth=1, label=f"full table ({full:.4f})")
        if bayes is not None:
            ax.axhline(bayes, color="green", linestyle=":", linewidth=1.5, label=f"Bayes AUC ({bayes:.4f})")
        if reference is not None:
            ax.axhline(reference["test_auc"], color="tab:red", linestyle="-.", linewidth=1,
                       label=f"one-hot LR ({reference['test_auc']:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("embedding bytes (log scale)")
        ax.set_title(f"{title or 'memory vs AUC'}{f' — {model}' if len(models) > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:  # every run failed, or none has a test AUC: an empty plane, said so
            ax.text(0.5, 0.5, "no run with a test AUC", transform=ax.transAxes, ha="center", va="center")
    axes[0][0].set_ylabel("test AUC")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
