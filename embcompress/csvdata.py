"""Any CSV/TSV file -> the on-disk format of a prepared Criteo data set, through a small YAML spec.

A spec names the label column and how to binarise it, the categorical and dense columns, the delimiter and
header, and the split. :func:`prepare_csv` writes what :func:`embcompress.criteo.prepare_criteo` writes
(``labels.npy``, ``dense.npy``, ``sparse.npy``, ``row_order.npy``, ``manifest.json`` with ``complete``), with
``format: embcompress-csv`` and the vocabularies as ``vocab/field_000.json``, ``vocab/field_001.json``, ... by
position in ``schema.sparse`` (``{"field": column, "values": [value strings in id order]}``; a column name is
never part of a path), so :func:`embcompress.criteo.load_criteo` (alias :func:`load_csv`) loads it and a bench
suite trains on it with ``data: {criteo: {path: OUT}}`` or ``embcompress bench run SUITE --data-path OUT``.
The output folder follows :mod:`embcompress.prepared` as Criteo preparation does (the same lock, input sha256
check, ``already_prepared`` / ``force``, rebuild aside, free-space checks, one-line errors on a full disk).

Spec (YAML, read with ``yaml.safe_load``; file paths relative to the spec's folder)::

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
a regular expression, never evaluated; a number that is not finite (``1e400``) is refused.

Ids: per categorical column, by descending count, ties by ascending value (byte order); the empty string is
a value like any other; the reserved id ``n_f - 1`` takes values below ``min_count``, beyond the cap, and
unseen ones. Dense values: finite numbers (``1``, ``-2.5``, ``1e3``; ``1e400`` is a bad value, as is a value
beyond float32 with ``dense_transform: none``) or empty. Splits: ``random`` = a permutation
from ``numpy.random.default_rng(seed)`` decides where each row is written, then the first 80% train, next 10%
val, last 10% test; ``time`` = rows sorted by the numeric ``column`` (stable: ties keep file order), earliest
80% train, next 10% val, last 10% test. ``row_order.npy`` gives, for each written row, its 0-based index among
the accepted input rows.

Reading: the files are read in blocks cut at newlines (one record per line: quoted fields may hold the
delimiter but not a newline) and parsed by ``pyarrow.csv.read_csv``; values are checked vectorised. A bad
line (wrong field count, a label or dense or time value that is not a finite number, a label that is not 0/1
when ``positive`` is not given, bytes that are not UTF-8) raises ``ValueError`` naming the file, the 1-based
line and the column, or with ``on_bad_line: skip`` is dropped and counted. Two passes: the first validates
and counts values (and keeps the time column), the second parses again, encodes and writes memory-mapped
arrays.

>>> import tempfile, pathlib
>>> tmp = pathlib.Path(tempfile.mkdtemp())
>>> _ = (tmp / "r.csv").write_text("user,item,rating,t\\nu1,i1,5,3\\nu2,i1,2,1\\nu1,i2,4,2\\n")
>>> spec = CSVSpec(name="toy", files=(str(tmp / "r.csv"),), label=LabelSpec("rating", ">= 4"),
...                categorical=("user", "item"), split=SplitSpec(kind="time", column="t"))
>>> m = prepare_csv(spec, tmp / "out")
>>> data = load_csv(tmp / "out")
>>> data.labels.tolist(), data.sparse.tolist(), data.cardinalities   # rows sorted by t: 2, 3, 1
([0.0, 1.0, 1.0], [[1, 0], [0, 1], [0, 0]], (3, 3))
>>> import shutil; shutil.rmtree(tmp)
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import prepared
from .criteo import _raw_blocks, _read_strings, _uint_dtype, load_criteo
from .prepared import check_input_files, utf8_error, write_json_atomic

__all__ = ["CSVSpec", "LabelSpec", "SplitSpec", "load_csv", "load_spec", "parse_comparison", "prepare_csv"]

FORMAT = "embcompress-csv"
FORMAT_VERSION = 2  # 2: vocab/field_<k>.json by position (1: vocab/<column>.json, a path built from data)
MANIFEST = prepared.MANIFEST
_OPS = (">=", "<=", "==", "!=", ">", "<")
_NUMBER = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?"
_NUMBER_RE = re.compile(rf"^{_NUMBER}$")
_COMPARISON = re.compile(r"^\s*(>=|<=|==|!=|>|<)\s*(.*?)\s*$")
_SPEC_KEYS = ("name", "files", "delimiter", "header", "columns", "label", "categorical", "dense",
              "dense_transform", "split", "min_count", "max_rows_per_field", "on_bad_line")

#: ``load_csv(out_dir)``: a prepared CSV data set as CTRData (the Criteo loader reads both formats)
load_csv = load_criteo


# --------------------------------------------------------------------------------------------- spec
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


# --------------------------------------------------------------------------------------------- reading
@dataclass
class _Rows:
    """Accepted rows of one block: columns as pyarrow string arrays, and their 1-based line numbers."""

    cols: dict
    lines: np.ndarray
    labels: np.ndarray
    dense: np.ndarray
    times: np.ndarray | None


def _split_fields(line: bytes, delimiter: str) -> list[str]:
    return next(csv.reader([line.decode("utf-8", errors="replace").rstrip("\r")], delimiter=delimiter))


class _Reader:
    """Blocks of validated rows of the spec's files, and the bad lines met (raised or counted)."""

    def __init__(self, spec: CSVSpec, paths: Sequence[Path], block_rows: int, report: bool = True):
        self.spec, self.paths, self.block_bytes = spec, paths, max(1, block_rows * 64)
        self.report = report  # False in pass 2: the bad lines were raised or counted in pass 1
        self.bad_lines = prepared.BadLines(spec.on_bad_line, "use on_bad_line: skip to drop such lines")
        self.skipped = self.bad_lines.skipped
        self.names: tuple[str, ...] | None = tuple(spec.columns) if spec.columns else None
        self.rule = parse_comparison(spec.label.positive) if spec.label.positive is not None else None

    def bad(self, path: Path, line: int, reason: str, detail: str) -> None:
        if self.report:
            self.bad_lines.add(path, line, reason, detail)

    def _header(self, path: Path, buf: bytes) -> tuple[bytes, int]:
        """The block without its header line (checked), and the number of the first line after it."""
        cut = buf.index(b"\n") + 1
        err = utf8_error(buf[:cut - 1])
        if err is not None:
            raise ValueError(f"{path}: line 1: the header is not valid UTF-8 (byte 0x{buf[err.start]:02x} at byte "
                             f"{err.start + 1})")
        names = tuple(_split_fields(buf[:cut - 1], self.spec.delimiter))
        if self.names is None:
            if len(set(names)) != len(names):
                raise ValueError(f"{path}: line 1: the header has duplicate column names: {list(names)}")
            missing = [c for c in self.spec.used_columns if c not in names]
            if missing:
                raise ValueError(f"{path}: line 1: the header has no column(s) {missing}; it has {list(names)}")
            self.names = names
        elif names != self.names:
            raise ValueError(f"{path}: line 1: the header {list(names)} differs from the first file's "
                             f"{list(self.names)}")
        return buf[cut:], 2

    def rows(self, path: Path, digest) -> Iterator[_Rows]:
        import pyarrow as pa

        if self.names is not None and not self.spec.header:
            missing = [c for c in self.spec.used_columns if c not in self.names]
            if missing:
                raise ValueError(f"columns {list(self.names)} lack the spec's column(s) {missing}")
        first_line = 1
        for i, buf in enumerate(_raw_blocks(path, self.block_bytes, digest)):
            if i == 0 and self.spec.header:
                buf, first_line = self._header(path, buf)
                if not buf:
                    continue
            names = self.names
            n_lines = buf.count(b"\n")
            table = None
            if b"\n\n" not in buf and not buf.startswith(b"\n"):
                table, rejected = _read_strings(buf, names, delimiter=self.spec.delimiter, quote_char='"')
                if table is None or rejected or table.num_rows != n_lines:  # None: not UTF-8
                    table = None
            lines = np.arange(first_line, first_line + n_lines, dtype=np.int64)
            if table is None:  # exact path: find the lines with the wrong number of fields
                good, good_lines = [], []
                for k, line in enumerate(buf[:-1].split(b"\n")):
                    n_fields = len(_split_fields(line, self.spec.delimiter)) if line.strip(b"\r") else 0
                    if n_fields == 0:
                        self.bad(path, first_line + k, "empty line", "empty line")
                    elif n_fields != len(names):
                        self.bad(path, first_line + k, "field count",
                                 f"{n_fields} fields, expected {len(names)} ({self.spec.delimiter!r}-separated)")
                    elif (err := utf8_error(line)) is not None:
                        self.bad(path, first_line + k, "encoding", self._utf8_detail(line, err))
                    else:
                        good.append(line)
                        good_lines.append(first_line + k)
                lines = np.asarray(good_lines, dtype=np.int64)
                if good:
                    table, rejected = _read_strings(b"\n".join(good) + b"\n", names, delimiter=self.spec.delimiter,
                                                     quote_char='"')
                    if rejected or table.num_rows != len(good):
                        raise ValueError(f"{path}: lines {good_lines[0]}-{good_lines[-1]}: pyarrow and Python's "
                                         "csv module disagree on the fields (a quoted newline?)")
                else:
                    table = pa.table({c: pa.array([], pa.string()) for c in names})
            first_line += n_lines
            yield self._values(path, {c: table.column(c) for c in self.spec.used_columns}, lines)

    def _utf8_detail(self, line: bytes, err: UnicodeDecodeError) -> str:
        """Which column holds the bytes that are not UTF-8 (they decode to lone surrogates with surrogateescape)."""
        fields = next(csv.reader([line.decode("utf-8", "surrogateescape").rstrip("\r")],
                                 delimiter=self.spec.delimiter))
        j = next((j for j, v in enumerate(fields) if re.search("[\udc80-\udcff]", v)), None)
        where = f" in column {self.names[j]!r}" if j is not None and j < len(self.names) else ""
        return f"invalid UTF-8{where} (byte 0x{line[err.start]:02x} at byte {err.start + 1} of the line)"

    def _values(self, path: Path, cols: dict, lines: np.ndarray) -> _Rows:
        import pyarrow as pa
        import pyarrow.compute as pc

        spec = self.spec
        n = len(lines)
        ok = np.ones(n, dtype=bool)
        problems: list[tuple[np.ndarray, str, str, str]] = []  # (mask of bad rows, reason, column, expected)

        def number(column: str, allow_empty: bool, reason: str, float32: bool = False) -> np.ndarray:
            col = cols[column]
            good = pc.match_substring_regex(col, f"^{_NUMBER}$").to_numpy(zero_copy_only=False)
            empty = pc.equal(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
            if allow_empty:
                good = good | empty
            if not good.all():
                problems.append((~good, reason, column, "a number" + (" or empty" if allow_empty else "")))
            safe = pc.if_else(pa.array(good & ~empty), col, "0")
            x = pc.cast(safe, pa.float64()).to_numpy(zero_copy_only=False)
            # 1e400 parses as inf (and 1e39 is inf once stored as float32): a bad value, not a silent inf
            with np.errstate(over="ignore"):
                infinite = ~np.isfinite(x.astype(np.float32) if float32 else x)
            if infinite.any():
                problems.append((infinite, reason, column, "a finite number"
                                 + (" (float32: |x| < 3.4e38)" if float32 else "")))
                x = np.where(infinite, 0.0, x)
            return x

        label_col = cols[spec.label.column]
        if self.rule is None:
            n_problems = len(problems)
            x = number(spec.label.column, False, "label")
            bad01 = (x != 0) & (x != 1)
            for mask, *_ in problems[n_problems:]:  # reported already as not a (finite) number
                bad01 &= ~mask
            if bad01.any():
                problems.append((bad01, "label", spec.label.column, "0 or 1 (or give label.positive)"))
            labels = (x == 1).astype(np.float32)
        else:
            op, value = self.rule
            if isinstance(value, str):
                hit = pc.equal(label_col, value).to_numpy(zero_copy_only=False)
                labels = (hit if op == "==" else ~hit).astype(np.float32)
            else:
                x = number(spec.label.column, False, "label")
                cmp = {">=": np.greater_equal, ">": np.greater, "<=": np.less_equal, "<": np.less,
                       "==": np.equal, "!=": np.not_equal}[op]
                labels = cmp(x, value).astype(np.float32)
        dense = np.zeros((n, len(spec.dense)), dtype=np.float32)
        for j, c in enumerate(spec.dense):
            x = number(c, True, "dense", float32=spec.dense_transform == "none")
            dense[:, j] = np.log1p(np.maximum(x, 0)) if spec.dense_transform == "log1p" else x
        times = number(spec.split.column, False, "time") if spec.split.kind == "time" else None
        found: dict[int, tuple[str, str]] = {}  # row -> its first problem (label, then dense, then time)
        for mask, reason, column, expected in problems:
            ok &= ~mask
            for r in np.flatnonzero(mask):
                value = cols[column][int(r)].as_py()
                found.setdefault(int(r), (reason, f"column {column!r} = {value!r}, expected {expected}"))
        for r in sorted(found):
            self.bad(path, int(lines[r]), *found[r])
        if not ok.all():
            keep = pa.array(ok)
            cols = {c: pc.filter(a, keep) for c, a in cols.items()}
            lines, labels, dense = lines[ok], labels[ok], dense[ok]
            times = times[ok] if times is not None else None
        return _Rows(cols, lines, labels, dense, times)


# --------------------------------------------------------------------------------------------- prepare
def _merge_counts(acc, col):
    """Running (value, count) table of a column, merged with a block's value counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vc = pc.value_counts(col)
    part = pa.table({"value": vc.field("values"), "count": pc.cast(vc.field("counts"), pa.int64())})
    if acc is None:
        return part
    merged = pa.concat_tables([acc, part]).group_by("value").aggregate([("count", "sum")])
    return merged.select(["value", "count_sum"]).rename_columns(["value", "count"])


def prepare_csv(spec: CSVSpec | str | os.PathLike, out_dir: str | os.PathLike, *, block_rows: int = 500_000,
                progress: bool = False, force: bool = False) -> dict:
    """Prepare the data set a spec describes into ``out_dir``; returns the manifest (see the module docstring).

    ``out_dir`` holding this data set already (same spec and inputs, by sha256): nothing is done and the manifest
    is returned with ``already_prepared: True``; ``force=True`` rebuilds it (aside, swapped in at the end).
    """
    t0 = time.perf_counter()
    if not isinstance(spec, CSVSpec):
        spec = load_spec(spec)
    if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
        raise ValueError(f"block_rows must be an int >= 1, got {block_rows!r}")
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}")
    paths = [Path(f) for f in spec.files]
    check_input_files(paths)
    out = Path(out_dir)
    options = {**_jsonable(asdict(spec)), "files": [str(p.resolve()) for p in paths]}
    sources = [{"path": str(p.resolve()), "name": p.name, "bytes": p.stat().st_size} for p in paths]
    # the same lock, reuse and swap rules as Criteo preparation
    return prepared.prepare_into(
        out, FORMAT, options, sources, paths, force=force, progress=progress,
        build=lambda target: _prepare(spec, paths, options, sources, target, block_rows, progress, t0))


def vocab_file(position: int) -> str:
    """The vocabulary file of the categorical field at ``position`` (never a name from the data)."""
    return f"field_{position:03d}.json"


def _plain_file_name(name) -> bool:
    """A name that stays one file in its folder: no separator of this OS (``a\\b`` is a legal POSIX name, which
    version 1 wrote), no NUL, not absolute, not empty, ``.`` or ``..``."""
    if not isinstance(name, str) or name in ("", ".", "..") or "\x00" in name:
        return False
    seps = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return not any(sep in name for sep in seps) and not os.path.isabs(name) and not os.path.splitdrive(name)[0]


def read_vocab(out_dir: str | os.PathLike, manifest: dict, position: int) -> list[str]:
    """The value strings, in id order, of the categorical field at ``position`` of a prepared CSV data set."""
    name = manifest["schema"]["sparse"][position]
    if manifest.get("version", 1) < 2:  # written before vocabularies were stored by position
        if not _plain_file_name(name):
            raise ValueError(f"{out_dir}: a version-1 data set whose column name {name!r} is not a plain file name "
                             "(its vocabulary file is not opened); rebuild it with --force "
                             "(`embcompress data csv SPEC --out DIR --force`, or prepare_csv(..., force=True))")
        path = Path(out_dir) / "vocab" / f"{name}.json"
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    path = Path(out_dir) / "vocab" / vocab_file(position)
    with open(path, encoding="utf-8") as fh:
        v = json.load(fh)
    if not isinstance(v, dict) or v.get("field") != name or not isinstance(v.get("values"), list):
        raise ValueError(f"{path}: expected {{field: {name!r}, values: [...]}} (the manifest's field {position})")
    return v["values"]


def _prepare(spec: CSVSpec, paths: list[Path], options: dict, sources: list[dict], target, block_rows: int,
             progress: bool, t0: float) -> dict:
    import pyarrow as pa
    import pyarrow.compute as pc
    from numpy.lib.format import open_memmap

    # pass 1: validate, count values, keep the time column; hash the inputs
    reader = _Reader(spec, paths, block_rows)
    counts = dict.fromkeys(spec.categorical)
    times: list[np.ndarray] = []
    n_rows = n_pos = 0
    for src, p in zip(sources, paths):
        digest = hashlib.sha256()
        n_file = 0
        for rows in reader.rows(p, digest):
            for c in spec.categorical:
                counts[c] = _merge_counts(counts[c], rows.cols[c])
            if rows.times is not None:
                times.append(rows.times)
            n_pos += int(np.count_nonzero(rows.labels))
            n_file += len(rows.lines)
            if progress:
                print(f"pass 1 {p.name}: {n_rows + n_file:,} rows", flush=True)
        src["sha256"], src["rows"] = digest.hexdigest(), n_file
        n_rows += n_file
    if n_rows == 0:
        raise ValueError(f"no data rows in {', '.join(str(p) for p in paths)}"
                         + (f" ({reader.skipped['total']} bad lines skipped)" if reader.skipped["total"] else ""))
    checksum = prepared.combined_sha256([s["sha256"] for s in sources])
    target.check_checksum(checksum)
    out = target.build  # out_dir itself, or the folder beside it that replaces it at the end

    # vocabularies: descending count, ties by ascending value
    vocabs, cards = [], []
    for c in spec.categorical:
        t = counts[c].sort_by([("count", "descending"), ("value", "ascending")])
        kept = t.filter(pc.greater_equal(t.column("count"), spec.min_count)).column("value")
        if spec.max_rows_per_field is not None:
            kept = kept.slice(0, spec.max_rows_per_field - 1)
        vocabs.append(kept.combine_chunks() if isinstance(kept, pa.ChunkedArray) else kept)
        cards.append(len(kept) + 1)
    counts = None
    sparse_dtype = _uint_dtype(max(cards) - 1)
    n_train, n_val = int(n_rows * 0.8), int(n_rows * 0.1)
    splits = {"train": [0, n_train], "val": [n_train, n_train + n_val], "test": [n_train + n_val, n_rows]}
    if spec.split.kind == "random":
        dest = np.random.default_rng(spec.split.seed).permutation(n_rows)
    else:
        order = np.argsort(np.concatenate(times), kind="stable")
        dest = np.empty(n_rows, dtype=np.int64)
        dest[order] = np.arange(n_rows)
    times = None
    rule = (f"{spec.label.column} {spec.label.positive}" if spec.label.positive is not None
            else f"{spec.label.column} (0 or 1)")
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False, "name": spec.name,
        "sources": sources, "source_sha256": checksum, "options": options,
        "schema": {"label": rule, "dense": list(spec.dense), "sparse": list(spec.categorical),
                   "files": {"labels": "labels.npy (float32 [N])",
                             "dense": f"dense.npy (float32 [N, {len(spec.dense)}])",
                             "sparse": f"sparse.npy ({sparse_dtype.name} [N, {len(spec.categorical)}])",
                             "vocab": "vocab/field_<k>.json (k = 000, 001, ...: the position in schema.sparse; "
                                      "{field: name, values: value strings in id order})",
                             "row_order": "row_order.npy (index among accepted input rows of each written row)"},
                   "dense_transform": ("log(1 + max(x, 0)), missing -> 0" if spec.dense_transform == "log1p"
                                       else "none (x as read), missing -> 0"),
                   "reserved_id": "n_f - 1 (values with count < min_count, beyond max_rows_per_field - 1, unseen)",
                   "missing_categorical": "the value '' with its own id"},
        "rows": n_rows, "positives": n_pos, "cardinalities": cards, "sparse_dtype": sparse_dtype.name,
        "splits": splits, "skipped": reader.skipped,
    }
    files = {"labels": ((n_rows,), np.float32), "dense": ((n_rows, len(spec.dense)), np.float32),
             "sparse": ((n_rows, len(spec.categorical)), sparse_dtype),
             "row_order": ((n_rows,), _uint_dtype(n_rows))}
    row_bytes = sum(int(np.prod(shape[1:])) * np.dtype(dt).itemsize for shape, dt in files.values())
    vocab_bytes = sum(v.nbytes + 4 * len(v) for v in vocabs)  # about: the strings, quoted, comma-separated
    # over a run killed in pass 2, its arrays and vocabularies are truncated or removed before ours are written
    prepared.check_free_space(out, n_rows * row_bytes + vocab_bytes + 128 * len(files),
                              f"the arrays of {n_rows:,} rows ({row_bytes} bytes a row) and the vocabularies",
                              replaces=[out / f"{k}.npy" for k in files] + [out / "vocab"])
    target.begin()
    write_json_atomic(out / MANIFEST, manifest)  # complete: false until every array is written
    (out / "vocab").mkdir(exist_ok=True)
    for f, (c, v) in enumerate(zip(spec.categorical, vocabs)):
        path = out / "vocab" / vocab_file(f)
        with prepared.naming(path), open(path, "w", encoding="utf-8") as fh:
            json.dump({"field": c, "values": v.to_pylist()}, fh, ensure_ascii=False)
    arrays = {}
    for k, (shape, dt) in files.items():
        arrays[k] = open_memmap(out / f"{k}.npy", mode="w+", dtype=dt, shape=shape)
        prepared.allocate(out / f"{k}.npy")  # a full disk fails here, not with SIGBUS at a page written below
    arrays["row_order"][dest] = np.arange(n_rows, dtype=arrays["row_order"].dtype)

    # pass 2: parse again (same rows accepted), encode, write at each row's place
    quiet = _Reader(spec, paths, block_rows, report=False)
    balance = prepared.SplitLabels(splits)
    row = 0
    for p in paths:
        for rows in quiet.rows(p, hashlib.sha256()):
            n = len(rows.lines)
            at = dest[row:row + n]
            arrays["labels"][at] = rows.labels
            arrays["dense"][at] = rows.dense
            balance.add(at, rows.labels)
            ids = np.empty((n, len(spec.categorical)), dtype=sparse_dtype)
            for f, c in enumerate(spec.categorical):
                idx = pc.index_in(rows.cols[c], value_set=vocabs[f])
                ids[:, f] = pc.fill_null(idx, cards[f] - 1).to_numpy(zero_copy_only=False)
            arrays["sparse"][at] = ids
            row += n
            if progress:
                print(f"pass 2: {row:,}/{n_rows:,} rows", flush=True)
    if row != n_rows:
        raise ValueError(f"inputs changed between the two passes ({n_rows} then {row} rows)")
    for a in arrays.values():
        a.flush()
    del arrays
    for k in files:
        with prepared.naming(out / f"{k}.npy"), open(out / f"{k}.npy", "rb+") as fh:
            os.fsync(fh.fileno())
    balance.record(manifest)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    write_json_atomic(out / MANIFEST, manifest)
    target.commit()
    return manifest


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return str(obj)
    return obj

