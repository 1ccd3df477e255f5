"""Criteo TSV -> memory-mapped ``.npy`` data set (two streaming passes) and :func:`load_criteo`.

Input layout (Kaggle ``train.txt``, 1TB ``day_N``): ``label \\t I1..I13 \\t C1..C26``, no header, empty = missing.

Pipeline (:func:`prepare_criteo`)
---------------------------------
* The inputs (plain or ``.gz``, concatenated in the given order) are read in blocks of about ``block_rows``
  lines; each block is cut at a newline, parsed by ``pyarrow.csv.read_csv`` (tab delimiter, no quoting,
  explicit column names, every column read as a string, several threads) and validated vectorised (dense
  values and labels by byte checks on the string buffers, the exact regex only for a column that fails them;
  categorical values decoded 8 bytes at a time as one 64-bit word). The next block is read and parsed in a
  background thread while the current one is decoded. Nothing but two blocks is held in memory. Blocks are cut by us rather than by ``pyarrow.csv.open_csv`` because pyarrow's streaming
  reader does not report the line number of a row it rejects (``InvalidRow.number`` is ``None``), so a block
  whose parse is not clean (a rejected row, an empty line, a ``\\r``) is re-split in Python to find the exact
  1-based line numbers. The raw input bytes are hashed (sha256) while pass 1 reads them.
* Pass 1 validates every line and counts the values of each categorical field. Categorical values are
  8 lowercase hex digits; they are decoded to integers (``"0000000a"`` -> 10) and the empty string (missing)
  to ``-1``, so counting is a sort of integer arrays (partial counts merged geometrically), not a Python
  dict of strings. Integer order equals string order (same length hex, ``""`` first), so ties are broken by
  the value string.
* Ids per field: descending count, ties by ascending value string; id 0 = most frequent. A missing value is
  the value ``""`` and gets an id like any other value. Values seen fewer than ``min_count`` times, and
  values unseen at preparation (:func:`encode_values`), map to the reserved id ``n_f - 1`` (the last id).
  The reserved id always exists, so ``n_f = (#values with count >= min_count) + 1``.
* Optional cap ``max_rows_per_field=N`` (``--max-rows-per-field``; the MLPerf 1TB setup caps tables at 40M
  rows): of the values kept by ``min_count``, only the ``N - 1`` first in id order (the most frequent, ties by
  value string) keep an id; the rest join the reserved id, so ``n_f <= N``. (The facebookresearch/dlrm
  reference instead folds raw ids modulo ``--max-ind-range``, which mixes frequent and rare values; the cap
  keeps frequency ranking intact.)
* Optional dense bucketization ``dense_buckets=True`` (``--dense-buckets``): 13 extra categorical fields
  ``I1_bucket .. I13_bucket`` after ``C26`` (``sparse.npy`` is then ``[N, 39]``; the manifest's
  ``schema.sparse``, ``cardinalities`` and :func:`load_criteo`'s ``field_names`` list them). The bucket code of
  an integer dense value ``x`` is ``floor(ln(x) ** 2)`` (float64) for ``x >= 1`` (so 1 and 2 share bucket 0,
  3 -> 1, 8 -> 4, 100 -> 21), ``-2`` for every ``x < 1`` (0 and negatives: one bucket, as
  ``log(1 + max(x, 0))`` treats them alike), and ``-1`` for a missing value: codes, like hex values, get ids
  by descending frequency with ``min_count``, the cap and the reserved id applied the same way;
  ``vocab/I<k>_bucket.npy`` holds the codes in id order. ``dense.npy`` is unchanged.
* Pass 1 also spills each accepted block, decoded (categorical codes as uint32, dense already transformed,
  labels, bucket codes as int16), to the temporary folder ``.<out name>.embcompress-spill`` next to
  ``out_dir`` (about 160 bytes a row, deleted at the end), so the text is parsed once. A lock file beside it
  (``.<out name>.embcompress-spill.lock``, ``flock``) is held while the run lasts: a folder left by a killed
  run (nobody holds its lock) is removed by the next run of the same ``out_dir``, and a second run while one
  is going is refused. Vocabulary lookups of fields with many values go through a bucket index of the sorted
  values; per-field counting and lookups run in a small thread pool.
* Pass 2 reads the spill back, encodes, and writes with ``numpy.lib.format.open_memmap``:
  ``labels.npy`` float32 ``[N]``, ``dense.npy`` float32 ``[N, 13]`` (``log(1 + max(x, 0))``, missing -> 0),
  ``sparse.npy`` ``[N, 26]`` (``[N, 39]`` with ``dense_buckets``) in the smallest unsigned dtype holding every
  id of every field, and ``vocab/C1.npy .. C26.npy`` (int64 codes of the kept values in id order; ``-1`` =
  ``""``).
* ``manifest.json`` is written first with ``complete: false`` (so a killed run is recognisable as this data
  set) and rewritten last, atomically (temp file + ``os.replace``), with ``complete: true``, the positives of
  each split (``split_positives``) and ``warnings`` (a split with no positives, no negatives or no rows).
* The output folder follows :mod:`embcompress.prepared`: the lock above is shared with CSV preparation; a
  rerun over a complete data set of the same inputs (sha256) and options does nothing (``already_prepared``)
  unless ``force=True`` (``--force``), which rebuilds it aside and swaps it in at the end; free disk space is
  checked before pass 1 (the spill) and before pass 2 (the arrays), the arrays are allocated before they are
  mapped, and an ``OSError`` (disk full, read-only folder) is one :class:`~embcompress.prepared.OutputError`.

Splits: ``dlrm`` = rows in file order cut into 7 equal "days" (``np.array_split``, the first days get the
remainder rows); days 0-5 train; day 6 halved by ``np.array_split``: first half ``test``, second half ``val``
(as in facebookresearch/dlrm). ``random`` = seeded 8:1:1: a permutation from ``numpy.random.default_rng(seed)``
decides the order in which rows are written, so the splits stay contiguous ranges (train, val, test);
``row_order.npy`` gives, for each written row, its 0-based index among the accepted input rows.
``day`` = Criteo 1TB: exactly 24 inputs, ``day_0 .. day_23`` in day order (an error otherwise, also when the
names are ``day_<k>`` out of order, as a shell glob sorts them); the rows of days 0-22 train, day 23 is
halved like ``dlrm``'s last day (first half ``test``, second half ``val``).

Bad lines (wrong number of fields, non-integer dense value, label not 0/1, categorical not 8 lowercase hex
digits nor empty, a ``\\r`` in the line, bytes that are not UTF-8): ``on_bad_line="error"`` raises
``ValueError`` naming the file and 1-based line; ``"skip"`` drops the line and the manifest counts them
(total, per reason, first 10 as ``file:line``). Dense values must fit in 18 digits.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import re
import shutil
import time
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from . import prepared
from .prepared import FORMATS, MANIFEST, check_input_files, read_manifest, utf8_error
from .prepared import write_json_atomic as _write_json_atomic

try:  # pandas' khash tables (a dependency already): O(1) counting and lookups; numpy sort/search otherwise
    from pandas._libs.hashtable import Int64HashTable as _Int64HashTable
    from pandas._libs.hashtable import value_count as _value_count
except Exception:  # pragma: no cover - other pandas versions
    _Int64HashTable = _value_count = None

__all__ = [
    "DENSE_FIELDS", "SPARSE_FIELDS", "BUCKET_FIELDS", "SPLITS", "COLUMNS", "prepare_criteo", "load_criteo",
    "encode_values", "decode_ids", "load_vocab", "read_manifest",
]

DENSE_FIELDS = tuple(f"I{i}" for i in range(1, 14))
SPARSE_FIELDS = tuple(f"C{i}" for i in range(1, 27))
BUCKET_FIELDS = tuple(f"{name}_bucket" for name in DENSE_FIELDS)  # with dense_buckets=True, after C26
COLUMNS = ("label",) + DENSE_FIELDS + SPARSE_FIELDS
FORMAT_VERSION = 1
_N_COLS = len(COLUMNS)
_DENSE_RE = r"^-?[0-9]{1,18}$"
_HEX = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
_HEX8 = _HEX.astype(np.int8)
_PA_BLOCK = 1 << 22  # pyarrow's parse block: a block of ours is parsed by several threads
_THREADS = min(4, os.cpu_count() or 1)  # numpy releases the GIL in sort/searchsorted/ufuncs
_U32_MAX = 0xFFFFFFFF
_MISSING = -1  # integer code of the empty (missing) categorical value


# --------------------------------------------------------------------------------------------- reading
class _HashingReader(io.RawIOBase):
    """A raw binary file that feeds every byte it reads into a sha256."""

    def __init__(self, path: Path, digest):
        self._fh = open(path, "rb")
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._fh.readinto(b)
        if n:
            self._digest.update(memoryview(b)[:n])
        return n

    def close(self) -> None:
        self._fh.close()
        super().close()


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _raw_blocks(path: Path, block_bytes: int, digest=None) -> Iterator[bytes]:
    """Decompressed bytes of ``path`` in blocks that end with a newline (one is added at EOF if missing)."""
    raw = _HashingReader(path, digest if digest is not None else hashlib.sha256())
    stream = gzip.GzipFile(fileobj=io.BufferedReader(raw, 1 << 20)) if _is_gzip(path) else io.BufferedReader(raw, 1 << 20)
    rest = b""
    try:
        while True:
            try:
                chunk = stream.read(block_bytes)
            except (EOFError, OSError, zlib.error) as err:
                raise ValueError(f"{path}: cannot decompress (truncated or corrupt gzip?): {err}") from err
            if not chunk:
                break
            buf = rest + chunk
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                rest = buf
                continue
            rest = buf[cut:]
            yield buf[:cut]
        if rest:
            yield rest + b"\n"
    finally:
        stream.close()
        raw.close()


def _parse_block(buf: bytes):
    """A Criteo block as string columns, and the number of rows pyarrow rejected (see ``_read_strings``)."""
    return _read_strings(buf, COLUMNS, delimiter="\t", quote_char=False)


def _read_strings(buf: bytes, names: Sequence[str], *, delimiter: str, quote_char: str | bool):
    """(pyarrow table with every column as non-null strings, count of rows pyarrow could not split and skipped).

    Empty lines are kept as rows so that row i is still line i of ``buf`` for the caller's line numbers. The
    table is None when a value is not valid UTF-8: pyarrow's error names neither the line nor the row, so the
    caller re-splits the block line by line to find (and report or skip) the lines at fault.
    """
    import pyarrow as pa
    from pyarrow import csv

    rejected = [0]

    def on_invalid(_row) -> str:
        rejected[0] += 1
        return "skip"

    try:
        table = csv.read_csv(
            pa.py_buffer(buf),
            read_options=csv.ReadOptions(column_names=list(names), block_size=_PA_BLOCK, use_threads=True),
            parse_options=csv.ParseOptions(delimiter=delimiter, quote_char=quote_char, escape_char=False,
                                           newlines_in_values=False, ignore_empty_lines=False,
                                           invalid_row_handler=on_invalid),
            convert_options=csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string()),
                                               strings_can_be_null=False, quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        if "invalid UTF8" not in str(err):
            raise
        return None, 0
    return table, rejected[0]


class _Block:
    """One validated block: accepted rows decoded (labels, dense, codes), their 1-based line numbers, bad lines."""

    def __init__(self, labels: np.ndarray, dense: np.ndarray, codes: np.ndarray, lines: np.ndarray,
                 bad: list[tuple[int, str, str]], buckets: np.ndarray | None = None):
        self.labels = labels  # float32 [n] (0/1)
        self.dense = dense  # float32 [n, 13]: log(1 + max(x, 0)), missing -> 0
        self.codes = codes  # int64 [26, n] categorical codes ("" -> -1), field-major
        self.lines = lines
        self.bad = bad  # (line, reason, detail), sorted by line
        self.buckets = buckets  # int16 [13, n] dense bucket codes (see _dense_bucket_codes), or None

    def __len__(self) -> int:
        return len(self.lines)


def _parsed_blocks(path: Path, block_bytes: int, digest) -> Iterator[tuple]:
    """(raw block, its line count, its pyarrow table or None when the parse is not clean)."""
    for buf in _raw_blocks(path, block_bytes, digest):
        n_lines = buf.count(b"\n")
        table = None
        if b"\r" not in buf and b"\n\n" not in buf and not buf.startswith(b"\n"):
            table, rejected = _parse_block(buf)
            if table is None or rejected or table.num_rows != n_lines:
                table = None
        yield buf, n_lines, table


def _prefetch(it: Iterator) -> Iterator:
    """Items of ``it``, the next one produced in a background thread while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix="criteo-read") as ex:
        fut = ex.submit(next, it, done)
        try:
            while True:
                item = fut.result()
                if item is done:
                    return
                fut = ex.submit(next, it, done)
                yield item
        finally:
            fut.cancel()
            try:
                fut.result()
            except BaseException:
                pass
            it.close() if hasattr(it, "close") else None


def _blocks(path: Path, block_bytes: int, digest=None, buckets: bool = False) -> Iterator[_Block]:
    import pyarrow as pa
    import pyarrow.compute as pc

    first_line = 1
    for buf, n_lines, table in _prefetch(_parsed_blocks(path, block_bytes, digest)):
        bad: list[tuple[int, str, str]] = []
        if table is not None:
            lines = np.arange(first_line, first_line + n_lines, dtype=np.int64)
        else:  # slow, exact path: find the lines with the wrong number of fields in Python
            good, good_lines = [], []
            for k, line in enumerate(buf[:-1].split(b"\n")):
                n_fields = line.count(b"\t") + 1
                if b"\r" in line:
                    bad.append((first_line + k, "carriage return", "line contains \\r"))
                elif n_fields != _N_COLS:
                    bad.append((first_line + k, "field count", f"{n_fields} fields, expected {_N_COLS}"))
                elif (err := utf8_error(line)) is not None:
                    field = COLUMNS[line.count(b"\t", 0, err.start)]
                    bad.append((first_line + k, "encoding", f"invalid UTF-8 in field {field} (byte "
                                f"0x{line[err.start]:02x} at byte {err.start + 1} of the line)"))
                else:
                    good.append(line)
                    good_lines.append(first_line + k)
            lines = np.asarray(good_lines, dtype=np.int64)
            if good:
                table, rejected = _parse_block(b"\n".join(good) + b"\n")
                assert not rejected and table.num_rows == len(good), "pyarrow disagrees with the field count"
            else:
                table = pa.table({c: pa.array([], pa.string()) for c in COLUMNS})
        first_line += n_lines
        cols = [table.column(i) for i in range(_N_COLS)]  # chunked (pyarrow parsed in several threads)
        # value checks, vectorised
        ok = np.ones(len(lines), dtype=bool)
        reasons: list[tuple[np.ndarray, str, int]] = []
        lab = _labels(cols[0])
        if lab is None:
            label_ok = pc.or_(pc.equal(cols[0], "0"), pc.equal(cols[0], "1")).to_numpy(zero_copy_only=False)
            reasons.append((~label_ok, "label", 0))
        for j in range(1, 14):
            if not all(_dense_clean(c) for c in cols[j].chunks):  # the exact (slow) check only when the fast one finds a problem
                m = pc.or_(pc.equal(pc.binary_length(cols[j]), 0), pc.match_substring_regex(cols[j], _DENSE_RE))
                reasons.append((~m.to_numpy(zero_copy_only=False), "dense", j))
        codes = np.empty((len(SPARSE_FIELDS), len(lines)), dtype=np.int64)  # field-major
        for j, (c, valid) in enumerate(_pool().map(_hex_chunked, cols[14:])):
            codes[j] = c
            if valid is not None:
                reasons.append((~valid, "categorical", 14 + j))
        for mask, kind, j in reasons:
            if mask.any():
                ok &= ~mask
                for r in np.flatnonzero(mask)[:10]:
                    value = cols[j][int(r)].as_py()
                    what = "label" if kind == "label" else f"{kind} field {COLUMNS[j]}"
                    bad.append((int(lines[r]), kind, f"{what} = {value!r}"))
                for r in np.flatnonzero(mask)[10:]:
                    bad.append((int(lines[r]), kind, ""))
        if not ok.all():
            keep = pa.array(ok)
            cols = [pc.filter(c, keep) if i < 14 else c for i, c in enumerate(cols)]
            lines = lines[ok]
            codes = codes[:, ok]
            lab = None
        # several reasons on one line: keep the first (lowest column) one
        seen: dict[int, tuple[int, str, str]] = {}
        for b in bad:
            seen.setdefault(b[0], b)
        n = len(lines)
        if lab is None:
            lab = pc.equal(cols[0], "1").to_numpy(zero_copy_only=False).astype(np.float32)
        den = np.zeros((n, len(DENSE_FIELDS)), dtype=np.float32)
        bk = np.full((len(DENSE_FIELDS), n), _MISSING, dtype=np.int16) if buckets else None
        for j in range(len(DENSE_FIELDS)):
            col = cols[1 + j]
            present = pc.greater(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
            if present.all():
                x = pc.cast(col, "int64").to_numpy()
                den[:, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
                if bk is not None:
                    bk[j] = _dense_bucket_codes(x)
            elif present.any():
                x = pc.cast(pc.filter(col, present), "int64").to_numpy()
                den[present, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
                if bk is not None:
                    bk[j, present] = _dense_bucket_codes(x)
        yield _Block(lab, den, np.ascontiguousarray(codes), lines, sorted(seen.values()), bk)


_BELOW_1 = -2  # bucket code of a dense value below 1 (0 and negatives); a missing value has the code -1


def _dense_bucket_codes(x: np.ndarray) -> np.ndarray:
    """Bucket codes of integer dense values: ``floor(ln(x) ** 2)`` (float64) for ``x >= 1``, -2 for ``x < 1``.

    >>> _dense_bucket_codes(np.array([-3, 0, 1, 2, 3, 7, 8, 100])).tolist()
    [-2, -2, 0, 0, 1, 3, 4, 21]
    """
    out = np.full(len(x), _BELOW_1, dtype=np.int16)
    pos = x >= 1
    out[pos] = np.floor(np.log(x[pos].astype(np.float64)) ** 2).astype(np.int16)  # <= 1717 for x < 10**18
    return out


_POOL = None


def _pool():
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="criteo")
    return _POOL


def _str_buffers(arr) -> tuple[np.ndarray, np.ndarray]:
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return offsets, data


def _dense_clean(arr) -> bool:
    """True when every value of a string array matches ``^-?[0-9]{1,18}$`` or is empty (vectorised, exact)."""
    if arr.null_count:
        return False
    offsets, data = _str_buffers(arr)
    region = data[offsets[0]:offsets[-1]]
    lengths = np.diff(offsets)
    nondigit = len(region) - int(np.count_nonzero((region - np.uint8(48)) < 10))
    if nondigit == 0:
        return bool(len(lengths) == 0 or lengths.max() <= 18)
    minus = np.flatnonzero(region == 45)
    if len(minus) != nondigit:
        return False
    starts = offsets[:-1] - offsets[0]
    at = np.searchsorted(starts, minus, side="right") - 1
    if not (np.all(starts[at] == minus) and np.all(lengths[at] >= 2)):
        return False
    signed = np.zeros(len(lengths), dtype=bool)
    signed[at] = True
    return bool(np.all(lengths - signed <= 18))


_M0F = np.uint64(0x0F0F0F0F0F0F0F0F)
_M01 = np.uint64(0x0101010101010101)
_M00FF = np.uint64(0x00FF00FF00FF00FF)
_M0000FFFF = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0xFFFFFFFF)


def _labels(col) -> np.ndarray | None:
    """float32 labels when every value of the chunked string array is "0" or "1", else None."""
    parts = []
    for arr in col.chunks:
        if arr.null_count:
            return None
        offsets, data = _str_buffers(arr)
        if offsets[-1] - offsets[0] != len(arr):
            return None
        raw = data[offsets[0]:offsets[-1]]
        if len(raw) and not (bool(np.all(np.diff(offsets) == 1)) and bool(np.all((raw - np.uint8(48)) < 2))):
            return None
        parts.append((raw - np.uint8(48)).astype(np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def _hex_chunked(col) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`_hex_codes` of a chunked array, chunk by chunk (no combine copy)."""
    parts = [_hex_codes(c) for c in col.chunks]
    if not parts:
        return np.zeros(0, np.int64), None
    if len(parts) == 1:
        return parts[0]
    codes = np.concatenate([p[0] for p in parts])
    if all(p[1] is None for p in parts):
        return codes, None
    return codes, np.concatenate([np.ones(len(p[0]), bool) if p[1] is None else p[1] for p in parts])


def _hex_codes(arr) -> tuple[np.ndarray, np.ndarray | None]:
    """int64 codes of a string array of 8-hex-digit values ("" -> -1), and the mask of well-formed values
    (``None`` when all are). Fast path (SWAR on 8-byte words) when every value is "" or 8 bytes long."""
    n = len(arr)
    offsets, data = _str_buffers(arr)
    if arr.null_count == 0 and n and (offsets[-1] - offsets[0]) % 8 == 0:
        lengths = np.diff(offsets)
        is8 = lengths == 8
        n8 = int(np.count_nonzero(is8))
        if n8 * 8 == offsets[-1] - offsets[0] and n8 + int(np.count_nonzero(lengths == 0)) == n:
            raw = data[offsets[0]:offsets[-1]]
            ok = ((raw - np.uint8(48)) < 10) | ((raw - np.uint8(97)) < 6)
            if n8 == 0 or bool(ok.all()):
                w = raw.view("<u8") if raw.ctypes.data % 8 == 0 else raw.copy().view("<u8")
                v = (w & _M0F) + np.uint64(9) * ((w >> np.uint64(6)) & _M01)
                v = ((v & _M00FF) << np.uint64(4)) | ((v >> np.uint64(8)) & _M00FF)
                v = ((v & _M0000FFFF) << np.uint64(8)) | ((v >> np.uint64(16)) & _M0000FFFF)
                v = ((v & _M32) << np.uint64(16)) | (v >> np.uint64(32))
                if n8 == n:
                    return v.astype(np.int64), None
                codes = np.full(n, _MISSING, dtype=np.int64)
                codes[is8] = v.astype(np.int64)
                return codes, None
    codes, valid = _hex_codes_exact(arr)
    return codes, (None if valid.all() else valid)


def _hex_codes_exact(arr) -> tuple[np.ndarray, np.ndarray]:
    """int64 codes of a string array of 8-hex-digit values ("" -> -1), and the mask of well-formed values."""
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    codes = np.full(n, _MISSING, dtype=np.int64)
    is8 = lengths == 8
    valid = lengths == 0
    full = np.flatnonzero(is8)
    if len(full):
        if len(full) + np.count_nonzero(valid) == n:  # only "" and 8-byte values: the bytes are contiguous
            raw = data[offsets[0]:offsets[-1]].reshape(-1, 8)
        else:
            raw = data[offsets[full][:, None] + np.arange(8)]
        nib = _HEX8[raw]
        good = nib.min(axis=1) >= 0
        packed = (nib[:, 0::2].astype(np.uint8) << 4) | nib[:, 1::2].astype(np.uint8)
        values = np.ascontiguousarray(packed).view(">u4").ravel().astype(np.int64)
        codes[full[good]] = values[good]
        valid[full[good]] = True
    return codes, valid


def _code_strings(codes: np.ndarray) -> list[str]:
    return ["" if c == _MISSING else f"{int(c):08x}" for c in codes]


# --------------------------------------------------------------------------------------------- counting
def _unique_counts(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted distinct values of an int64 array and their counts (int64)."""
    if _value_count is not None:
        try:
            res = _value_count(np.ascontiguousarray(codes, dtype=np.int64), False)
            keys, counts = np.asarray(res[0]), np.asarray(res[1])
            if keys.dtype == np.int64 and len(keys) == len(counts) and int(counts.sum()) == len(codes):
                order = np.argsort(keys)
                return keys[order], counts[order].astype(np.int64)
        except Exception:  # pragma: no cover - a pandas whose private signature differs
            pass
    u, c = np.unique(codes, return_counts=True)
    return u, c.astype(np.int64)


class _Counter:
    """Counts int64 codes with sorted (unique, count) runs merged geometrically (amortised O(n log n))."""

    def __init__(self):
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []

    @staticmethod
    def _merge(a, b):
        u, inv = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
        return u, np.bincount(inv, weights=np.concatenate([a[1], b[1]])).astype(np.int64)

    def add(self, codes: np.ndarray) -> None:
        u, c = _unique_counts(codes)
        self.runs.append((u, c))
        while len(self.runs) > 1 and len(self.runs[-2][0]) <= 2 * len(self.runs[-1][0]):
            b = self.runs.pop()
            self.runs.append(self._merge(self.runs.pop(), b))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.runs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        while len(self.runs) > 1:
            b = self.runs.pop()
            self.runs.append(self._merge(self.runs.pop(), b))
        return self.runs[0]


# --------------------------------------------------------------------------------------------- helpers
def _uint_dtype(max_id: int) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"id {max_id} does not fit in 64 bits")


def _splits(n: int, split: str, file_rows: Sequence[int] = ()) -> dict[str, tuple[int, int]]:
    """Contiguous (start, stop) of each split; ``file_rows`` = accepted rows per input (``day`` split)."""
    if split in ("dlrm", "day"):
        if split == "dlrm":
            days = np.array_split(np.arange(n), 7)
            lo6 = sum(len(d) for d in days[:6])
        else:  # Criteo 1TB: the last of the 24 day files is held out
            lo6 = int(sum(file_rows[:-1]))
        test, val = np.array_split(np.arange(lo6, n), 2)
        return {"train": (0, lo6), "test": (lo6, lo6 + len(test)), "val": (lo6 + len(test), n)}
    n_train, n_val = int(n * 0.8), int(n * 0.1)
    return {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}


# --------------------------------------------------------------------------------------------- prepare
SPLITS = ("dlrm", "random", "day")
DAYS_1TB = 24  # Criteo 1TB: day_0 .. day_23
_DAY_NAME = re.compile(r"^day_(\d+)(\..*)?$")
#: options of a data set prepared before the option existed (so such a folder can be rebuilt in place)
_OPTION_DEFAULTS = {"max_rows_per_field": None, "dense_buckets": False}


def _check_day_inputs(paths: Sequence[Path]) -> None:
    if len(paths) != DAYS_1TB:
        raise ValueError(f"split='day' needs the {DAYS_1TB} Criteo 1TB day files day_0 .. day_23 in day order "
                         f"(days 0-22 train, day 23 halved into test and val); got {len(paths)} input(s)")
    days = [_DAY_NAME.match(p.name) for p in paths]
    if all(days) and [int(d.group(1)) for d in days] != list(range(DAYS_1TB)):
        got = " ".join(p.name for p in paths)
        raise ValueError(f"split='day' reads the inputs in the order given: they must be day_0 .. day_23 in day "
                         f"order (a shell glob puts day_10 before day_2), got: {got}")


def prepare_criteo(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    min_count: int = 1,
    max_rows_per_field: int | None = None,
    dense_buckets: bool = False,
    split: str = "dlrm",
    seed: int = 0,
    on_bad_line: str = "error",
    block_rows: int = 500_000,
    progress: bool = False,
    force: bool = False,
) -> dict:
    """Preprocess Criteo TSV file(s) into ``out_dir``; returns the manifest (see the module docstring).

    ``max_rows_per_field=N`` caps every field's vocabulary at ``N`` ids: the ``N - 1`` most frequent values
    (after ``min_count``) keep their own id, all others share the reserved id ``N - 1``. ``dense_buckets``
    adds the 13 categorical fields ``I1_bucket .. I13_bucket`` (``floor(ln(x) ** 2)``, see the module
    docstring). ``split`` is ``"dlrm"``, ``"random"`` or ``"day"`` (exactly the 24 Criteo 1TB day files).

    >>> import tempfile, pathlib
    >>> tmp = pathlib.Path(tempfile.mkdtemp())
    >>> row = "\\t".join(["1", "7", "", "0"] + ["1"] * 10 + ["0000000a"] * 26)
    >>> _ = (tmp / "t.tsv").write_text(row + "\\n")
    >>> m = prepare_criteo(tmp / "t.tsv", tmp / "out", dense_buckets=True, max_rows_per_field=10)
    >>> m["schema"]["sparse"][25:28], m["cardinalities"][:2]
    (['C26', 'I1_bucket', 'I2_bucket'], [2, 2])
    >>> [decode_ids(tmp / "out", f, [0]) for f in ("I1_bucket", "I2_bucket", "I3_bucket", "C1")]
    [['3'], [''], ['<1'], ['0000000a']]
    >>> import shutil; shutil.rmtree(tmp)
    """
    t0 = time.perf_counter()
    paths = [Path(inputs)] if isinstance(inputs, (str, os.PathLike)) else [Path(p) for p in inputs]
    if not paths:
        raise ValueError("no input files")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    if on_bad_line not in ("error", "skip"):
        raise ValueError(f"on_bad_line must be 'error' or 'skip', got {on_bad_line!r}")
    if isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer)) or min_count < 1:
        raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
    if max_rows_per_field is not None and (isinstance(max_rows_per_field, bool) or not isinstance(
            max_rows_per_field, (int, np.integer)) or max_rows_per_field < 1):
        raise ValueError(f"max_rows_per_field must be None or an int >= 1 (ids per field, the reserved id "
                         f"included), got {max_rows_per_field!r}")
    if not isinstance(dense_buckets, bool):
        raise TypeError(f"dense_buckets must be True or False, got {dense_buckets!r}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if split == "day":
        _check_day_inputs(paths)
    check_input_files(paths)
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}")
    out = Path(out_dir)
    options = {"min_count": int(min_count), "split": split, "seed": seed if split == "random" else None,
               "on_bad_line": on_bad_line, "dense_buckets": dense_buckets,
               "max_rows_per_field": None if max_rows_per_field is None else int(max_rows_per_field)}
    sources = [{"path": str(p.resolve()), "name": p.name, "bytes": p.stat().st_size} for p in paths]

    block_bytes = max(1, block_rows * 200)  # ~200 bytes per Criteo line; blocks end at a newline
    bad_lines = prepared.BadLines(on_bad_line, "use on_bad_line='skip' (--on-bad-line skip) to drop such lines")

    def accept(block: _Block, path: Path) -> None:
        for line, reason, detail in block.bad:
            bad_lines.add(path, line, reason, f"bad line ({reason}: {detail})")

    # pass 1: validate, decode, count, hash; the decoded rows are spilled to a temporary file for pass 2
    fields = SPARSE_FIELDS + (BUCKET_FIELDS if dense_buckets else ())

    def build(target: prepared.Target) -> dict:
        with _spill_folder(out) as spill_dir:
            if on_bad_line == "error":  # every line valid, each at most 496 bytes, is >= 160 spilled bytes
                prepared.check_free_space(spill_dir, sum(s["bytes"] for s in sources) * 160 // 496,
                                          "the temporary decoded rows of pass 1 (160 bytes a row)")
            return _prepare(paths, target, sources, options, bad_lines.skipped, accept,
                            [_Counter() for _ in fields], spill_dir, block_bytes, fields, progress, t0)

    # the output folder: reuse an identical data set, refuse another one, or pick where to write
    return prepared.prepare_into(out, "embcompress-criteo", options, sources, paths, build, force=force,
                                 option_defaults=_OPTION_DEFAULTS, progress=progress)


@contextlib.contextmanager
def _spill_folder(out: Path) -> Iterator[Path]:
    """The temporary folder beside ``out`` for pass 1's decoded blocks, removed on exit.

    Its name is fixed per output folder; it is made under the lock of :func:`embcompress.prepared.locked`,
    whose recovery has removed a folder left by a killed run (nobody held the lock).
    """
    spill = prepared.side_paths(out)["spill"]
    spill.mkdir()
    try:
        yield spill
    finally:
        shutil.rmtree(spill, ignore_errors=True)


def _prepare(paths, target, sources, options, skipped, accept, counters, spill_dir, block_bytes,
             fields, progress, t0) -> dict:
    min_count, cap, split, seed = (options[k] for k in ("min_count", "max_rows_per_field", "split", "seed"))
    buckets = options["dense_buckets"]
    n_cat = len(SPARSE_FIELDS)
    n_rows, n_pos = 0, 0
    spill_path = Path(spill_dir) / "rows.bin"
    block_sizes: list[int] = []

    def count(block: _Block, f: int) -> None:
        counters[f].add(block.codes[f] if f < n_cat else block.buckets[f - n_cat].astype(np.int64))

    with open(spill_path, "wb") as spill:
        def put(data) -> None:
            with prepared.naming(spill_path):  # a full disk: the message names the temporary file
                spill.write(data)

        for src, p in zip(sources, paths):
            digest = hashlib.sha256()
            n_file = 0
            for block in _blocks(p, block_bytes, digest, buckets):
                accept(block, p)
                if not len(block):
                    continue
                list(_pool().map(lambda f: count(block, f), range(len(fields))))
                n_pos += int(np.count_nonzero(block.labels))
                # codes as uint32 ("" -> 0xffffffff); a field holding the value "ffffffff" too is spilled as int64
                wide = [f for f in range(n_cat) if (block.codes[f] == _U32_MAX).any()]
                put(block.codes.astype(np.uint32).data)
                for f in wide:
                    put(block.codes[f].data)
                put(block.dense.data)
                put(block.labels.data)
                if buckets:
                    put(block.buckets.data)
                block_sizes.append((len(block), wide))
                n_file += len(block)
                if progress:
                    print(f"pass 1 {p.name}: {n_rows + n_file:,} rows", flush=True)
            src["sha256"] = digest.hexdigest()
            src["rows"] = n_file
            n_rows += n_file
    if n_rows == 0:
        raise ValueError(f"no data rows in {', '.join(str(p) for p in paths)} (empty input"
                         + (f", {skipped['total']} bad lines skipped)" if skipped["total"] else ")"))
    checksum = prepared.combined_sha256([s["sha256"] for s in sources])
    target.check_checksum(checksum)
    out = target.build  # out_dir itself, or the folder beside it that replaces it at the end

    # vocabularies
    vocabs, cards = [], []
    for f, (u, c) in enumerate(_pool().map(lambda cnt: cnt.result(), counters)):
        order = np.lexsort((u, -c))
        kept = order[c[order] >= min_count]
        if cap is not None:
            kept = kept[:cap - 1]  # the N - 1 most frequent values; id N - 1 is the reserved id
        vocabs.append(u[kept])
        cards.append(len(kept) + 1)  # + the reserved id (rare / unseen values)
    counters = None
    sparse_dtype = _uint_dtype(max(cards) - 1)
    splits = _splits(n_rows, split, [s["rows"] for s in sources])
    if split == "day" and splits["val"][1] - splits["test"][0] < 2:
        raise ValueError(f"{paths[-1]}: day 23 has {splits['val'][1] - splits['test'][0]} row(s); the day split "
                         "halves it into test and val")

    manifest = {
        "format": "embcompress-criteo", "version": FORMAT_VERSION, "complete": False,
        "name": "criteo", "sources": sources, "source_sha256": checksum, "options": options,
        "schema": {"label": "label", "dense": list(DENSE_FIELDS), "sparse": list(fields),
                   "files": {"labels": "labels.npy (float32 [N])", "dense": "dense.npy (float32 [N, 13])",
                             "sparse": f"sparse.npy ({sparse_dtype.name} [N, {len(fields)}])",
                             "vocab": "vocab/<field>.npy (int64 codes in id order; -1 = empty)",
                             "row_order": "row_order.npy (random split only)"},
                   "dense_transform": "log(1 + max(x, 0)), missing -> 0",
                   "reserved_id": "n_f - 1 (values with count < min_count, values beyond max_rows_per_field - 1 "
                                  "most frequent, unseen values)",
                   "missing_categorical": "the value '' with its own id",
                   **({"dense_buckets": "I<k>_bucket = floor(ln(x) ** 2) of I<k> for x >= 1 (code >= 0); x < 1 "
                                        "-> code -2; missing -> code -1; ids by frequency like C1..C26"}
                      if buckets else {})},
        "rows": n_rows, "positives": n_pos, "cardinalities": cards, "sparse_dtype": sparse_dtype.name,
        "splits": {k: list(v) for k, v in splits.items()}, "skipped": skipped,
    }
    row_bytes = 4 + 4 * len(DENSE_FIELDS) + sparse_dtype.itemsize * len(fields)
    row_bytes += _uint_dtype(n_rows).itemsize if split == "random" else 0
    vocab_bytes = 8 * sum(len(v) for v in vocabs) + 128 * len(fields)
    # over a run killed in pass 2, its arrays and vocabularies are truncated or removed before ours are written
    prepared.check_free_space(out, n_rows * row_bytes + vocab_bytes + 128 * 4,
                              f"the arrays of {n_rows:,} rows ({row_bytes} bytes a row) and the vocabularies",
                              replaces=[out / f for f in ("labels.npy", "dense.npy", "sparse.npy", "row_order.npy",
                                                          "vocab")])
    target.begin()
    _write_json_atomic(out / MANIFEST, manifest)  # complete: false until every array is written
    (out / "vocab").mkdir(exist_ok=True)
    for name, v in zip(fields, vocabs):
        with prepared.naming(out / "vocab" / f"{name}.npy"):
            np.save(out / "vocab" / f"{name}.npy", v)

    # pass 2: encode and write
    from numpy.lib.format import open_memmap

    # the outputs are created here and mapped again for each block (then unmapped), so the pages written stay
    # in the page cache but not in this process's resident set: peak RSS does not grow with the file
    out_files = [out / "labels.npy", out / "dense.npy", out / "sparse.npy"]
    for path, dt, shape in zip(out_files, (np.float32, np.float32, sparse_dtype),
                               ((n_rows,), (n_rows, len(DENSE_FIELDS)), (n_rows, len(fields)))):
        del_ = open_memmap(path, mode="w+", dtype=dt, shape=shape)
        del del_
        prepared.allocate(path)  # a full disk fails here, not with SIGBUS at a page written below
    dest = None
    if split == "random":
        dest = np.random.default_rng(seed).permutation(n_rows)  # input row k is written at dest[k]
        row_order = open_memmap(out / "row_order.npy", mode="w+", dtype=_uint_dtype(n_rows), shape=(n_rows,))
        prepared.allocate(out / "row_order.npy")
        row_order[dest] = np.arange(n_rows, dtype=row_order.dtype)
        row_order.flush()
        del row_order
    elif (out / "row_order.npy").exists():
        (out / "row_order.npy").unlink()
    lookups = []
    for v in vocabs:
        by_value = np.argsort(v, kind="stable")
        lookups.append((v[by_value], by_value.astype(sparse_dtype), _lookup_index(v[by_value])))
    row = 0
    balance = prepared.SplitLabels(splits)
    with open(spill_path, "rb") as spill:
        max_n = max(n for n, _ in block_sizes) if block_sizes else 0
        buf32 = np.empty(max_n * len(SPARSE_FIELDS), np.uint32)
        buf_den = np.empty(max_n * len(DENSE_FIELDS), np.float32)
        buf_lab = np.empty(max_n, np.float32)
        buf_spa = np.empty(max_n * len(fields), sparse_dtype)
        buf_bk = np.empty(max_n * len(BUCKET_FIELDS), np.int16)

        def read(arr: np.ndarray) -> np.ndarray:
            if spill.readinto(memoryview(arr).cast("B")) != arr.nbytes:
                raise ValueError("temporary file truncated between the two passes")
            return arr

        for n, wide in block_sizes:
            codes32 = read(buf32[:n * len(SPARSE_FIELDS)]).reshape(-1, n)
            exact = {f: read(np.empty(n, np.int64)) for f in wide}
            den = read(buf_den[:n * len(DENSE_FIELDS)]).reshape(n, -1)
            lab = read(buf_lab[:n])
            bk = read(buf_bk[:n * len(BUCKET_FIELDS)]).reshape(-1, n) if buckets else None
            spa = buf_spa[:n * len(fields)].reshape(n, -1)

            def encode(f):
                vals, ids, index = lookups[f]
                if f >= n_cat:
                    codes = bk[f - n_cat].astype(np.int64)
                elif f in exact:
                    codes = exact[f]
                else:
                    codes = codes32[f].astype(np.int64)
                    codes[codes == _U32_MAX] = _MISSING
                spa[:, f] = _lookup(codes, vals, ids, cards[f] - 1, index)

            list(_pool().map(encode, range(len(fields))))
            labels, dense, sparse = (np.load(path, mmap_mode="r+") for path in out_files)
            if dest is None:
                labels[row:row + n], dense[row:row + n], sparse[row:row + n] = lab, den, spa
                balance.add(np.arange(row, row + n), lab)
            else:
                at = dest[row:row + n]
                labels[at], dense[at], sparse[at] = lab, den, spa
                balance.add(at, lab)
            del labels, dense, sparse
            row += n
            if progress:
                print(f"pass 2: {row:,}/{n_rows:,} rows", flush=True)
    if row != n_rows:
        raise ValueError(f"inputs changed between the two passes ({n_rows} then {row} rows)")
    for path in out_files:  # what flushing the memory maps did: the data on disk before complete: true
        with prepared.naming(path), open(path, "rb+") as fh:
            os.fsync(fh.fileno())
    balance.record(manifest)
    manifest["complete"] = True
    manifest["seconds"] = round(time.perf_counter() - t0, 3)
    _write_json_atomic(out / MANIFEST, manifest)
    target.commit()
    return manifest


_BUCKET_MIN = 1 << 18  # vocabularies at least this large are searched through a bucket index


def _bucket_index(vals: np.ndarray):
    """(shift, starts, steps) for :func:`_lookup`: ``vals[starts[b]:starts[b + 1]]`` are the values whose
    ``(value + 1) >> shift`` is ``b``, and ``steps`` bisections resolve the largest bucket. None if small."""
    if len(vals) < _BUCKET_MIN:
        return None
    shift = max(0, 33 - int(np.log2(len(vals))))
    edges = np.arange(((1 << 33) >> shift) + 2, dtype=np.int64) << shift
    starts = np.searchsorted(vals + 1, edges, side="left")
    width = int(np.diff(starts).max())
    return shift, starts, max(1, int(np.ceil(np.log2(width + 1))))


def _lookup_index(vals: np.ndarray):
    """What :func:`_lookup` searches ``vals`` (sorted) with: a khash table for a small vocabulary (fast and
    small), a bucket index for a large one (a hash table of millions of values would cost ~32 bytes each)."""
    if len(vals) < _BUCKET_MIN:
        if _Int64HashTable is None or not len(vals):
            return None
        table = _Int64HashTable(len(vals))
        table.map_locations(np.ascontiguousarray(vals, dtype=np.int64))
        return table
    return _bucket_index(vals)


def _lookup(codes: np.ndarray, vals: np.ndarray, ids: np.ndarray, reserved: int, index=None) -> np.ndarray:
    if index is not None and not isinstance(index, tuple) and len(codes):
        pos = np.asarray(index.lookup(np.ascontiguousarray(codes, dtype=np.int64)))
        return np.where(pos >= 0, ids[pos], reserved)
    if index is not None and len(codes):
        shift, starts, steps = index
        b = (codes + 1) >> shift
        lo, hi = starts[b], starts[b + 1]
        last = len(vals) - 1
        for _ in range(steps):
            active = lo < hi
            mid = (lo + hi) >> 1
            go = vals[np.minimum(mid, last)] < codes
            lo = np.where(active & go, mid + 1, lo)
            hi = np.where(active & ~go, mid, hi)
        pos = np.minimum(lo, last)
        return np.where(vals[pos] == codes, ids[pos], reserved)
    if len(vals) == 0:
        return np.full(len(codes), reserved, dtype=ids.dtype if len(ids) else np.int64)
    pos = np.minimum(np.searchsorted(vals, codes), len(vals) - 1)
    return np.where(vals[pos] == codes, ids[pos], reserved)


# --------------------------------------------------------------------------------------------- load / vocab
def _complete_manifest(out_dir) -> dict:
    m = read_manifest(out_dir)
    if m.get("format") not in FORMATS:
        raise ValueError(f"{out_dir}: not an embcompress data set (format {m.get('format')!r})")
    if m.get("complete") is not True:
        what = "csv SPEC" if m.get("format") == "embcompress-csv" else "criteo"
        raise ValueError(f"{out_dir}: the data set is incomplete (preparation was interrupted or is running); "
                         f"run `embcompress data {what}` again")
    return m


def _field(out_dir, field: str | int) -> tuple[dict, int, str]:
    """(manifest, index, name) of a categorical field given by name or index."""
    m = _complete_manifest(out_dir)
    names = m["schema"]["sparse"]
    if isinstance(field, (int, np.integer)) and not isinstance(field, bool):
        if not 0 <= field < len(names):
            raise KeyError(f"no categorical field {field}; there are {len(names)} ({names[0]}..{names[-1]})")
        return m, int(field), names[field]
    if field not in names:
        raise KeyError(f"no categorical field {field!r}; fields are {', '.join(names)}")
    return m, names.index(field), field


def load_vocab(out_dir: str | os.PathLike, field: str | int) -> np.ndarray:
    """Codes of the kept values of one field in id order.

    Criteo ``C1..C26``: int64 codes of the hex values (``-1`` = the empty value). ``I<k>_bucket``: bucket codes
    (``floor(ln(x) ** 2)``, ``-2`` = below 1, ``-1`` = missing). A CSV data set: the value strings.
    """
    m, f, name = _field(out_dir, field)
    if m["format"] == "embcompress-csv":
        from .csvdata import read_vocab

        return np.array(read_vocab(out_dir, m, f), dtype=object)
    if name not in SPARSE_FIELDS + BUCKET_FIELDS:  # the file name comes from the manifest: only known names
        raise ValueError(f"{Path(out_dir) / MANIFEST}: field name {name!r} is not a Criteo field "
                         f"(C1..C26, I1_bucket..I13_bucket)")
    return np.load(Path(out_dir) / "vocab" / f"{name}.npy")


def _bucket_value_codes(values: list[str]) -> np.ndarray:
    codes = np.full(len(values), _MISSING, dtype=np.int64)
    for i, v in enumerate(values):
        if v != "":
            if not isinstance(v, str) or not re.fullmatch(_DENSE_RE, v):
                raise ValueError(f"malformed dense value {v!r} (expected an integer of at most 18 digits or '')")
            codes[i] = _dense_bucket_codes(np.array([int(v)], dtype=np.int64))[0]
    return codes


def encode_values(out_dir: str | os.PathLike, field: str | int, values: Iterable[str]) -> np.ndarray:
    """Ids of raw values with a prepared data set's vocabulary.

    ``C1..C26``: 8-hex-digit strings or ``""``. ``I<k>_bucket``: raw dense values (integer strings or ``""``),
    bucketed as at preparation. A CSV data set: the value strings. Values not in the vocabulary (rare at
    preparation, beyond the cap, or unseen) get the reserved id ``n_f - 1``.
    """
    import pyarrow as pa

    m, f, name = _field(out_dir, field)
    values = list(values)
    v = load_vocab(out_dir, f)
    reserved = m["cardinalities"][f] - 1
    if m["format"] == "embcompress-csv":
        index = {value: i for i, value in enumerate(v.tolist())}
        return np.array([index.get(x, reserved) for x in values], dtype=np.int64)
    if name in BUCKET_FIELDS:
        codes = _bucket_value_codes(values)
    else:
        arr = pa.array(values, pa.string())
        codes, valid = _hex_codes_exact(arr)
        if not valid.all():
            bad = arr[int(np.flatnonzero(~valid)[0])].as_py()
            raise ValueError(f"malformed categorical value {bad!r} (expected 8 lowercase hex digits or '')")
    by_value = np.argsort(v, kind="stable")
    return _lookup(codes, v[by_value], by_value.astype(np.int64), reserved).astype(np.int64)


def decode_ids(out_dir: str | os.PathLike, field: str | int, ids: Iterable[int]) -> list[str | None]:
    """Raw values of ids (``None`` for the reserved id: a rare, capped or unseen value).

    Bucket fields decode to the bucket number as a string, ``"<1"`` (a value below 1) or ``""`` (missing).
    """
    m, f, name = _field(out_dir, field)
    v = load_vocab(out_dir, f)
    out: list[str | None] = []
    for i in np.asarray(list(ids), dtype=np.int64):
        if not 0 <= i < len(v):
            out.append(None)
        elif m["format"] == "embcompress-csv":
            out.append(str(v[i]))
        elif name in BUCKET_FIELDS:
            c = int(v[i])
            out.append("" if c == _MISSING else "<1" if c == _BELOW_1 else str(c))
        else:
            out.append(_code_strings(v[i:i + 1])[0])
    return out


def load_criteo(out_dir: str | os.PathLike, *, sparse_int64: bool = True):
    """A prepared data set as :class:`~embcompress.data.CTRData` over memory-mapped arrays.

    Reads any folder written by :func:`prepare_criteo` or by :func:`embcompress.csvdata.prepare_csv` (field
    names, name and splits come from its manifest). ``labels`` and ``dense`` are copy-on-write memory maps
    (no copy, no load). ``sparse`` is stored in the smallest unsigned dtype; CTRData expects int64, so by
    default it is converted in memory: ``N * F * 8`` bytes (9.5 GB for Kaggle's 45.8M rows and 26 fields).
    ``sparse_int64=False`` keeps the memory map of the stored dtype.
    """
    from .data import CTRData

    out = Path(out_dir)
    m = _complete_manifest(out)
    labels = np.load(out / "labels.npy", mmap_mode="c")
    dense = np.load(out / "dense.npy", mmap_mode="c")
    sparse = np.load(out / "sparse.npy", mmap_mode="c")
    if sparse_int64:
        sparse = sparse.astype(np.int64)
    return CTRData(
        name=str(m.get("name", "criteo")), dense=dense, sparse=sparse, labels=labels,
        cardinalities=tuple(int(c) for c in m["cardinalities"]),
        field_names=tuple(m["schema"]["sparse"]),
        splits={k: (int(v[0]), int(v[1])) for k, v in m["splits"].items()}, bayes_auc=None,
        meta={"manifest": m, "path": str(out)},
    )
