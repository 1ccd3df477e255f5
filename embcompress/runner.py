"""The benchmark runner: every run of a suite trained, tuned and recorded, resumably.

:func:`run_suite` expands a suite (:mod:`embcompress.suite`) into its runs and trains each one that its results
folder does not hold yet: :func:`run_one` builds the table with ``from_budget`` at ``baseline_bytes / ratio``
(or as given, without a ratio), puts it in the model, trains it with the suite's settings (a table that trains
in stages through its own staged hook) and reports its exact bytes, ratio, test AUC and logloss, and training
samples/s. Bytes are the served table's (``bytes`` = ``serving_bytes``: a staged method's export; the ratio is
the baseline over them), beside ``training_bytes``: the table that trained (a staged method's supernet), stored,
plus the optimizer state held for it (``optimizer_state_bytes``). With a tuning grid every combination is a
trial and the best validation AUC picks the run's result; the one-hot logistic regression reference is fitted
once per data set beside the runs. Every record is one line of the results file (:mod:`embcompress.results`).

A run's key (:func:`run_key`) hashes everything that decides its result, the data included (the synthetic
config, or a prepared folder's manifest checksum, not its path), so a finished run is skipped on a rerun and a
rebuilt data folder is run again. Each run is claimed before it trains (:mod:`embcompress.claims`), so
processes sharing a results folder never train one run twice. An undefined AUC (a split with one class) is a
failed run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import resource
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .contract import CompressedEmbedding
from .data import CTRData
from .evaluation import evaluate_sharded
from .memory import baseline_bytes
from .registry import build_model, build_table
from .results import append_line, finite, locked_results, read_results
from .suite import TABLE_TUNABLE, Run, Suite, check_data_unchanged, load_data, table_spec
from .training import TrainConfig, train

__all__ = ["run_suite", "run_one", "run_key", "trial_key", "reference_key"]


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
    cfg = TrainConfig(**{**suite.train, **run.method.train, **training, "seed": run.seed, "device": device,
                         "progress": progress})
    staged = {}
    start = time.perf_counter()
    if getattr(table, "trains_in_stages", False):
        # One method, several training stages; the table it reports is the one it exports.
        schedule_type = getattr(type(table), "schedule_type", None)
        schedule = schedule_type.from_dict(run.method.schedule, run.method.name) if schedule_type else None
        fit = table.fit_staged(model, data, cfg, schedule)
        result, report = fit.result, fit.table.memory_report()
        staged = {"stage_seconds": fit.stages, "stages": fit.details}
    else:
        result = train(model, data, cfg)
        report = table.memory_report()
        staged = _master_precision_auc(model, table, data, cfg)
    wall = time.perf_counter() - start  # every stage with its evaluations, beside train_seconds (steps only)
    # Training bytes: the table that trained (a staged method's supernet, not its export), stored, plus the state
    # its optimizers held at the end of training (the last stage's); serving bytes: the table that is served.
    # A fused kernel's optimizer state is the table's own: in its memory report with no optimizer given.
    held = table.memory_report()
    optimizer_state = held.optimizer_state_bytes + result.table_optimizer_bytes
    trained = held.total_bytes + optimizer_state
    # A stage that held more than the last one (dedup's full table before it merged blocks) says so.
    trained = max(trained, staged.get("stages", {}).get("peak_training_bytes", 0))
    return {
        **_run_fields(suite, run), "embedding_dim": dim, "device": device, "model_spec": run.model.spec,
        "dense_parameters": dense_parameters,
        "bytes": report.serving_bytes, "serving_bytes": report.serving_bytes,
        "training_bytes": trained, "optimizer_state_bytes": optimizer_state,
        "parameter_bytes": report.parameter_bytes, "buffer_bytes": report.buffer_bytes,
        "baseline_bytes": report.baseline_bytes, "ratio": report.ratio,
        "test_auc": result.test_auc, "test_logloss": result.test_logloss,
        "val_auc": result.val_auc, "best_epoch": result.best_epoch, "epochs_run": len(result.history),
        "train_seconds": result.train_seconds, "samples_per_second": result.samples_per_second,
        "bayes_auc": data.bayes_auc, "wall_seconds": wall, "target_bytes": spec.get("budget_bytes"),
        "tuned": dict(trial or {}), "init_std": getattr(table, "init_std", None), **staged,
    }


def _master_precision_auc(model, table: CompressedEmbedding, data: CTRData, cfg: TrainConfig) -> dict:
    """For a table served at a lower ``precision`` (its test AUC is the served one): the test AUC of its fp32
    masters too, so the report can say what the precision cost."""
    if table.train_quantized:  # no fp32 masters to score: the rows trained at the precision
        return {"precision": table.precision, "train_quantized": True}
    if table.precision == "fp32" or table.serving_bytes() is None:
        return {}
    precision = table.precision
    table.precision = "fp32"  # the eval view reads the masters as they are
    try:
        auc, _ = evaluate_sharded(model, data.split("test"), batch_size=cfg.eval_batch_size, device=cfg.device)
    finally:
        table.precision = precision
    return {"precision": precision, "fp32_test_auc": auc}


def _run_fields(suite: Suite, run: Run) -> dict:
    fields = {"suite": suite.name, "model": run.model.name, "method": run.method.name, "table": run.method.table,
              "target_ratio": run.ratio, "seed": run.seed}
    if run.method.schedule:
        fields["schedule"] = run.method.schedule
    if run.method.train:
        fields["method_train"] = run.method.train
    return fields


def _key_data(suite: Suite) -> dict[str, Any]:
    """The data part of the keys: the synthetic config (as given: so the committed results keep their keys), or
    what a prepared folder holds (its manifest checksum) in place of its path."""
    if "criteo" not in suite.data or suite.data_checksum is None:
        return suite.data
    options = {k: v for k, v in suite.data["criteo"].items() if k != "path"}
    return {"criteo": {**options, "manifest": suite.data_checksum}}


def run_key(suite: Suite, run: Run) -> str:
    """Hash of everything that determines one run's result, so a rerun can tell what is already done.

    A staged method's schedule is hashed inside its table mapping, where those settings were written before they
    became a schedule, so results of earlier runs keep their keys."""
    config = {
        "data": _key_data(suite), "embedding_dim": suite.embedding_dim, "model": run.model.spec,
        "train": {**suite.train, **run.method.train},  # the suite's alone without a method's own: keys unchanged
        "method": run.method.name, "table": {**run.method.table, **run.method.schedule}, "ratio": run.ratio,
        "seed": run.seed,
    }
    if suite.tune:  # absent without a grid, so the keys of suites without one are unchanged
        config["tune"] = [[k, list(v)] for k, v in suite.tune]
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def trial_key(suite: Suite, run: Run, trial: dict[str, Any]) -> str:
    """Key of one trial: the run with the trial's settings in place, and not the grid, so a grid that grows (or
    moves a fixed setting into the grid at the same value) reuses the trials it already has."""
    config = {
        "data": _key_data(suite), "embedding_dim": suite.embedding_dim, "model": run.model.spec,
        "train": {**suite.train, **run.method.train, **{k: v for k, v in trial.items() if k not in TABLE_TUNABLE}},
        "method": run.method.name,
        "table": {**run.method.table, **run.method.schedule,
                  **{k: v for k, v in trial.items() if k in TABLE_TUNABLE}},
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

    check_data_unchanged(suite)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    writer = is_main_process()  # under torchrun / --nproc every rank trains, only rank 0 writes
    if writer:
        with locked_results(results_path):  # cuts a killed run's partial line; another shard may be writing
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
            append_line(results_path, record)
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
        with locked_results(results_path):  # under the lock: no other process is taking a claim just now
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
    with locked_results(results_path):
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
                bad = [k for k in ("val_auc", "test_auc") if not finite(record.get(k))]
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
    best = max(results, key=lambda r: r["val_auc"] if finite(r.get("val_auc")) else -math.inf)
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
