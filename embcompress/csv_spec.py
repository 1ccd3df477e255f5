"""The spec of a CSV/TSV data set: which columns are the label, categorical and dense fields, how to split.

A spec names the label column and how to binarise it, the categorical and dense columns, the delimiter and
header, and the split; :func:`embcompress.csvdata.prepare_csv` prepares the data set it describes. A YAML spec
(read with ``yaml.safe_load`` by :func:`load_spec`; file paths relative to the spec's folder)::

    name: movielens                # the data set's name (CTRData.name)
    files: [ratings.csv]           # read in this order; plain or .gz; each with the same header
    delimiter: ","                 # one character; "\\t" for TSV
    header: true                   # false: give `columns: [...]`, the names of the fields of a line
    label: {column: rating, positive: ">= 4"}   # no `positive`: the label must be 0 or 1
    categorical: [user_id, movie_id]
    dense: [age]                   # may be empty
    dense_transform: log1p         # log(1 + max(x, 0)) as Criteo, or none; missing (empty) -> 0 either way
    split: {kind: time, column: timestamp}      # or {kind: random, seed: 0}
    min_count: 1                   # values seen fewer times share the reserved id
    max_rows_per_field: null       # or N: the N - 1 most frequent values keep an id
    on_bad_line: error             # or skip (skips are counted in the manifest)

``positive`` is one comparison ``OP VALUE`` with ``OP`` in ``>= > <= < == !=`` and ``VALUE`` a number (the
column is then read as a number) or a quoted string (``== "click"``, only ``==`` and ``!=``). It is parsed by
a regular expression, never evaluated; a number that is not finite (``1e400``) is refused. Every value is
checked when the spec is built (:class:`CSVSpec` and its parts), and an error names the key.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["CSVSpec", "LabelSpec", "SplitSpec", "load_spec", "parse_comparison", "NUMBER"]

_OPS = (">=", "<=", "==", "!=", ">", "<")
#: a number as the spec and the data write it: ``1``, ``-2.5``, ``1e3``, ``.5`` (the reader's check of a value)
NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER_RE = re.compile(rf"^{NUMBER}$")
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(.*?)\s*$")
_SPEC_KEYS = ("name", "files", "delimiter", "header", "columns", "label", "categorical", "dense",
              "dense_transform", "split", "min_count", "max_rows_per_field", "on_bad_line")


def parse_comparison(text: str) -> tuple[str, float | str]:
    """``(op, value)`` of a label rule such as ``">= 4"`` or ``'== "click"'`` (a regex, no evaluation).

    >>> parse_comparison(">= 4"), parse_comparison("!= 'no'"), parse_comparison("<2.5e1")
    (('>=', 4.0), ('!=', 'no'), ('<', 25.0))
    """
    m = _COMPARISON.match(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError(f"label rule {text!r} is not `OP VALUE` with OP one of {' '.join(_OPS)} (e.g. '>= 4')")
    op, raw = m.group(1), m.group(2)
    if _NUMBER_RE.match(raw):
        if not np.isfinite(float(raw)):  # 1e400 -> inf: no row could be positive (or every row would be)
            raise ValueError(f"label rule {text!r}: the value {raw} is not a finite number")
        return op, float(raw)
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"" and raw[0] not in raw[1:-1]:
        if op not in ("==", "!="):
            raise ValueError(f"label rule {text!r}: a string compares only with == or !=")
        return op, raw[1:-1]
    raise ValueError(f"label rule {text!r}: the value {raw!r} is neither a number nor a quoted string")


@dataclass(frozen=True)
class LabelSpec:
    """The label column, and the rule that makes a row positive (``None``: the column must be 0 or 1)."""

    column: str
    positive: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.column, str) or not self.column:
            raise ValueError(f"label.column must be a column name, got {self.column!r}")
        if self.positive is not None:
            parse_comparison(self.positive)


@dataclass(frozen=True)
class SplitSpec:
    """``random`` (seeded 8:1:1) or ``time`` (sorted by ``column``: earliest 80% train, 10% val, last 10% test)."""

    kind: str = "random"
    seed: int = 0
    column: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("random", "time"):
            raise ValueError(f"split.kind must be 'random' or 'time', got {self.kind!r}")
        if self.kind == "time" and not (isinstance(self.column, str) and self.column):
            raise ValueError(f"split kind 'time' needs split.column (the time column), got {self.column!r}")
        if self.kind == "random" and self.column is not None:
            raise ValueError(f"split.column is for kind 'time'; kind 'random' got column {self.column!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"split.seed must be a non-negative int, got {self.seed!r}")


@dataclass(frozen=True)
class CSVSpec:
    """What :func:`prepare_csv` reads and how (see the module docstring for each key)."""

    name: str
    files: tuple[str, ...]
    label: LabelSpec
    categorical: tuple[str, ...]
    dense: tuple[str, ...] = ()
    delimiter: str = ","
    header: bool = True
    columns: tuple[str, ...] | None = None
    dense_transform: str = "log1p"
    split: SplitSpec = field(default_factory=SplitSpec)
    min_count: int = 1
    max_rows_per_field: int | None = None
    on_bad_line: str = "error"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        if not self.files or any(not isinstance(f, (str, os.PathLike)) for f in self.files):
            raise ValueError(f"files must be a non-empty list of paths, got {self.files!r}")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1 or self.delimiter in "\n\r\"":
            raise ValueError(f"delimiter must be one character (not a newline or a quote), got {self.delimiter!r}")
        if not isinstance(self.header, bool):
            raise ValueError(f"header must be true or false, got {self.header!r}")  # noqa: TRY004 (a spec value)
        if not self.header and not self.columns:
            raise ValueError("header: false needs columns: [names of the fields of a line]")
        if self.header and self.columns:
            raise ValueError("give columns only with header: false (the header names the columns)")
        if not self.categorical:
            raise ValueError("categorical must name at least one column")
        used = [self.label.column, *self.categorical, *self.dense]
        if self.split.kind == "time":
            used.append(self.split.column)
        for name in used:
            if not isinstance(name, str) or not name:
                raise ValueError(f"column names must be non-empty strings, got {name!r}")
        roles = [self.label.column, *self.categorical, *self.dense]
        dup = sorted({c for c in roles if roles.count(c) > 1})
        if dup:
            raise ValueError(f"column(s) {dup} named twice among label, categorical and dense")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError(f"columns has duplicate names: {list(self.columns)}")
        if self.dense_transform not in ("log1p", "none"):
            raise ValueError(f"dense_transform must be 'log1p' or 'none', got {self.dense_transform!r}")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {self.min_count!r}")
        cap = self.max_rows_per_field
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ValueError(f"max_rows_per_field must be null or an int >= 1, got {cap!r}")
        if self.on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {self.on_bad_line!r}")

    @property
    def used_columns(self) -> tuple[str, ...]:
        extra = (self.split.column,) if self.split.kind == "time" and self.split.column not in (
            self.label.column, *self.categorical, *self.dense) else ()
        return (self.label.column, *self.categorical, *self.dense, *extra)


def load_spec(path: str | os.PathLike) -> CSVSpec:
    """Read a YAML spec (``yaml.safe_load``); ``files`` are relative to the spec's folder. Errors name the key."""
    import yaml

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"spec {str(path)!r} is a directory; expected a file")
    if not path.is_file():
        raise FileNotFoundError(f"spec file {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a spec is a YAML mapping with keys {list(_SPEC_KEYS)}")  # noqa: TRY004
    extra = sorted(set(raw) - set(_SPEC_KEYS))
    if extra:
        raise ValueError(f"{path}: unknown key(s) {extra}; allowed: {list(_SPEC_KEYS)}")
    for key in ("files", "label", "categorical"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    kw = dict(raw)
    try:
        files = kw["files"] if isinstance(kw["files"], list) else [kw["files"]]
        kw["files"] = tuple(str(path.parent / f) if isinstance(f, str) else f for f in files)
        label = kw["label"]
        kw["label"] = LabelSpec(**label) if isinstance(label, dict) else LabelSpec(label)
        kw["split"] = SplitSpec(**(kw.get("split") or {}))
        for key in ("categorical", "dense", "columns"):
            if kw.get(key) is not None:
                if not isinstance(kw[key], list):
                    raise ValueError(f"{key} must be a list of column names, got {kw[key]!r}")
                kw[key] = tuple(kw[key])
        kw.setdefault("name", path.stem)
        if kw.get("dense") is None:
            kw["dense"] = ()
        return CSVSpec(**kw)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{path}: {err}") from None
