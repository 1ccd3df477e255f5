"""Any CSV/TSV file -> the on-disk format of a prepared data set, through a small spec (:mod:`embcompress.csv_spec`).

:func:`prepare_csv` writes what :func:`embcompress.criteo.prepare_criteo` writes (``labels.npy``, ``dense.npy``,
``sparse.npy``, ``row_order.npy``, ``manifest.json`` with ``complete``; see :mod:`embcompress.dataformat`), with
``format: embcompress-csv`` and the vocabularies as ``vocab/field_000.json``, ``vocab/field_001.json``, ... by
position in ``schema.sparse`` (``{"field": column, "values": [value strings in id order]}``; a column name is
never part of a path), so :func:`load_csv` (the loader of both formats) loads it and a bench suite trains on it
with ``data: {criteo: {path: OUT}}`` or ``embcompress bench run SUITE --data-path OUT``. The output folder
follows :mod:`embcompress.prepared` as Criteo preparation does (the same lock, input sha256 check,
``already_prepared`` / ``force``, rebuild aside, free-space checks, one-line errors on a full disk).

Ids: per categorical column, by descending count, ties by ascending value (byte order); the empty string is
a value like any other; the reserved id ``n_f - 1`` takes values below ``min_count``, beyond the cap, and
unseen ones (:mod:`embcompress.vocab`). Dense values: finite numbers (``1``, ``-2.5``, ``1e3``; ``1e400`` is a
bad value, as is a value beyond float32 with ``dense_transform: none``) or empty. Splits: ``random`` = a
permutation from ``numpy.random.default_rng(seed)`` decides where each row is written, then the first 80%
train, next 10% val, last 10% test; ``time`` = rows sorted by the numeric ``column`` (stable: ties keep file
order), earliest 80% train, next 10% val, last 10% test. ``row_order.npy`` gives, for each written row, its
0-based index among the accepted input rows.

Reading (:mod:`embcompress.textreader`): the files are read in blocks cut at newlines (one record per line:
quoted fields may hold the delimiter but not a newline) and parsed by ``pyarrow.csv.read_csv``; values are
checked vectorised. A bad line (wrong field count, a label or dense or time value that is not a finite number, a
label that is not 0/1 when ``positive`` is not given, bytes that are not UTF-8) raises ``ValueError`` naming the
file, the 1-based line and the column, or with ``on_bad_line: skip`` is dropped and counted. Two passes: the
first validates and counts values (and keeps the time column), the second parses again, encodes and writes
memory-mapped arrays.

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
import os
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import prepared
from .csv_spec import NUMBER, CSVSpec, LabelSpec, SplitSpec, load_spec, parse_comparison
from .dataformat import MANIFEST, SplitLabels, combined_sha256, load_criteo, uint_dtype
from .prepared import write_json_atomic
from .textreader import BadLines, check_input_files, clean_table, parse_lines, raw_blocks, split_lines, utf8_error
from .vocab import merge_counts, rank_strings, read_vocab, vocab_file, write_strings

__all__ = ["CSVSpec", "LabelSpec", "SplitSpec", "load_csv", "load_spec", "parse_comparison", "prepare_csv",
           "read_vocab", "vocab_file"]

FORMAT = "embcompress-csv"
FORMAT_VERSION = 2  # 2: vocab/field_<k>.json by position (1: vocab/<column>.json, a path built from data)

#: ``load_csv(out_dir)``: a prepared CSV data set as CTRData (the Criteo loader reads both formats)
load_csv = load_criteo


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
        self.bad_lines = BadLines(spec.on_bad_line, "use on_bad_line: skip to drop such lines")
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

    def _line_problem(self, line: bytes) -> tuple[str, str] | None:
        """Why a line is not a record of the spec's columns by its shape (empty, field count, encoding), or None."""
        n_fields = len(_split_fields(line, self.spec.delimiter)) if line.strip(b"\r") else 0
        if n_fields == 0:
            return "empty line", "empty line"
        if n_fields != len(self.names):
            return "field count", f"{n_fields} fields, expected {len(self.names)} ({self.spec.delimiter!r}-separated)"
        if (err := utf8_error(line)) is not None:
            return "encoding", self._utf8_detail(line, err)
        return None

    def rows(self, path: Path, digest) -> Iterator[_Rows]:
        if self.names is not None and not self.spec.header:
            missing = [c for c in self.spec.used_columns if c not in self.names]
            if missing:
                raise ValueError(f"columns {list(self.names)} lack the spec's column(s) {missing}")
        first_line = 1
        for i, buf in enumerate(raw_blocks(path, self.block_bytes, digest)):
            if i == 0 and self.spec.header:
                buf, first_line = self._header(path, buf)
                if not buf:
                    continue
            names = self.names
            n_lines = buf.count(b"\n")
            table = clean_table(buf, names, delimiter=self.spec.delimiter, quote_char='"', n_lines=n_lines)
            lines = np.arange(first_line, first_line + n_lines, dtype=np.int64)
            if table is None:  # exact path: find the lines with the wrong number of fields
                good, good_lines, bad = split_lines(buf, first_line, self._line_problem)
                for line, reason, detail in bad:
                    self.bad(path, line, reason, detail)
                lines = np.asarray(good_lines, dtype=np.int64)
                table, rejected = parse_lines(good, names, delimiter=self.spec.delimiter, quote_char='"')
                if rejected or table.num_rows != len(good):
                    raise ValueError(f"{path}: lines {good_lines[0]}-{good_lines[-1]}: pyarrow and Python's "
                                     "csv module disagree on the fields (a quoted newline?)")
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
            good = pc.match_substring_regex(col, f"^{NUMBER}$").to_numpy(zero_copy_only=False)
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
        build=lambda target: _prepare(spec, target, paths=paths, options=options, sources=sources,
                                      block_rows=block_rows, progress=progress, t0=t0))


def _prepare(spec: CSVSpec, target: prepared.Target, *, paths: list[Path], options: dict, sources: list[dict],
             block_rows: int, progress: bool, t0: float) -> dict:
    """Both passes into ``target.build``: ``sources`` (the manifest's) get each input's sha256 and rows."""
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
                counts[c] = merge_counts(counts[c], rows.cols[c])
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
    checksum = combined_sha256([s["sha256"] for s in sources])
    target.check_checksum(checksum)
    out = target.build  # out_dir itself, or the folder beside it that replaces it at the end

    # vocabularies: descending count, ties by ascending value
    vocabs, cards = [], []
    for c in spec.categorical:
        vocabs.append(rank_strings(counts[c], spec.min_count, spec.max_rows_per_field))
        cards.append(len(vocabs[-1]) + 1)
    counts = None
    sparse_dtype = uint_dtype(max(cards) - 1)
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
             "row_order": ((n_rows,), uint_dtype(n_rows))}
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
        with prepared.naming(path):
            write_strings(path, c, v.to_pylist())
    arrays = {}
    for k, (shape, dt) in files.items():
        arrays[k] = open_memmap(out / f"{k}.npy", mode="w+", dtype=dt, shape=shape)
        prepared.allocate(out / f"{k}.npy")  # a full disk fails here, not with SIGBUS at a page written below
    arrays["row_order"][dest] = np.arange(n_rows, dtype=arrays["row_order"].dtype)

    # pass 2: parse again (same rows accepted), encode, write at each row's place
    quiet = _Reader(spec, paths, block_rows, report=False)
    balance = SplitLabels(splits)
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

