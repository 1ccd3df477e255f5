"""The results file of a suite: one strict JSON line per record, appended under a lock, read back checked.

``results.jsonl`` holds every finished run, failed run, tuning trial and reference fit of a results folder.
A line is written whole under an exclusive ``flock`` with ``O_APPEND`` and fsynced (:func:`append_line`), so
shards and other processes sharing the folder append to one file, and a run killed mid-write leaves at most an
unterminated last line, which the next writer cuts and every reader ignores. Lines are strict JSON
(:func:`json_line`: a non-finite float is written as null and listed under ``non_finite``), so any JSON reader
can read them; :func:`read_results` checks each record against its status's keys and names the file and line
of a bad one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from pathlib import Path

from .suite_check import is_int

__all__ = ["RECORD_KEYS", "finite", "json_line", "locked_results", "append_line", "read_results", "results_frame"]


def finite(value) -> bool:
    """A finite int or float, not a bool: a figure a record really has (not NaN, null or missing)."""
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


@contextlib.contextmanager
def locked_results(path: Path):
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


def append_line(path: Path, record: dict) -> None:
    """Append ``record`` to ``path`` as one strict JSON line, written whole under the lock and fsynced."""
    view = memoryview(json_line(record).encode("utf-8"))
    with locked_results(path) as fd:
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)


#: The keys each kind of record needs (what resuming and the report read), by status. A finished run's ``bytes``
#: are its serving bytes; ``serving_bytes``, ``training_bytes`` and ``optimizer_state_bytes`` are optional (records
#: written before they were told apart lack them) and checked when present.
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
                          ("target_ratio", lambda v: v is None or finite(v), "a number or null"),
                          ("bytes", lambda v: v is None or is_int(v), "an int or null"),
                          # optional: records written before training and serving bytes were told apart lack them
                          ("serving_bytes", lambda v: v is None or is_int(v), "an int or null"),
                          ("training_bytes", lambda v: v is None or is_int(v), "an int or null"),
                          ("optimizer_state_bytes", lambda v: v is None or is_int(v), "an int or null"),
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
