"""Criteo TSV lines -> validated, decoded blocks: the Criteo schema and the codes of its values.

A line is ``label \\t I1..I13 \\t C1..C26`` (no header, empty = missing). :func:`blocks` reads a file through
:mod:`embcompress.textreader` (newline-cut blocks parsed by pyarrow as strings, the next block read and parsed in
a background thread while this one is decoded; a block whose parse is not clean is split line by line for the
exact 1-based line numbers) and decodes each block into a :class:`Block`:

* labels ``"0"``/``"1"`` and dense values (``^-?[0-9]{1,18}$`` or empty) are checked vectorised, by byte checks
  on the string buffers; the exact regex runs only on a column that fails them;
* categorical values are 8 lowercase hex digits, decoded 8 bytes at a time as one 64-bit word to their integer
  (``"0000000a"`` -> 10); the empty string (missing) is :data:`MISSING` (``-1``). Integer order equals string
  order (same-length hex, ``""`` first), so ties between counts can be broken on the integers;
* dense values become ``log(1 + max(x, 0))`` (float32, missing -> 0) and, with ``buckets``, bucket codes
  (:func:`dense_bucket_codes`: ``floor(ln(x) ** 2)`` for ``x >= 1``, :data:`BELOW_1` for ``x < 1``, ``-1`` missing);
* a bad line (wrong number of fields, a ``\\r``, bytes that are not UTF-8, a label not 0/1, a dense value not an
  integer of at most 18 digits, a categorical value not 8 lowercase hex digits nor empty) is dropped from the
  block and listed in ``Block.bad`` with its first reason (lowest column).

:func:`spill` and :func:`unspill` write a decoded block to pass 1's temporary file and read it back in pass 2
(about 160 bytes a row), so that the text is parsed once.

:mod:`embcompress.criteo` prepares a data set from these blocks; :mod:`embcompress.dataformat` decodes raw values
of a prepared data set with the same codes (:func:`hex_codes_exact`, :func:`bucket_value_codes`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .textreader import clean_table, parse_lines, prefetch, raw_blocks, split_lines, utf8_error

__all__ = ["DENSE_FIELDS", "SPARSE_FIELDS", "BUCKET_FIELDS", "COLUMNS", "MISSING", "BELOW_1", "U32_MAX", "Block",
           "blocks", "pool", "spill", "unspill", "dense_bucket_codes", "bucket_value_codes", "hex_codes_exact",
           "code_strings"]

DENSE_FIELDS = tuple(f"I{i}" for i in range(1, 14))
SPARSE_FIELDS = tuple(f"C{i}" for i in range(1, 27))
BUCKET_FIELDS = tuple(f"{name}_bucket" for name in DENSE_FIELDS)  # with dense_buckets=True, after C26
COLUMNS = ("label",) + DENSE_FIELDS + SPARSE_FIELDS
MISSING = -1  # integer code of the empty (missing) categorical value, and bucket code of a missing dense value
BELOW_1 = -2  # bucket code of a dense value below 1 (0 and negatives)
U32_MAX = 0xFFFFFFFF
_N_COLS = len(COLUMNS)
_DENSE_RE = r"^-?[0-9]{1,18}$"
_HEX = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
_HEX8 = _HEX.astype(np.int8)
_THREADS = min(4, os.cpu_count() or 1)  # numpy releases the GIL in sort/searchsorted/ufuncs
_POOL = None


def pool():
    """The small thread pool that per-field work (decoding, counting, lookups) runs in."""
    global _POOL
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(_THREADS, thread_name_prefix="criteo")
    return _POOL


# --------------------------------------------------------------------------------------------- blocks
class Block:
    """One validated block: accepted rows decoded (labels, dense, codes), their 1-based line numbers, bad lines."""

    def __init__(self, labels: np.ndarray, dense: np.ndarray, codes: np.ndarray, lines: np.ndarray,
                 bad: list[tuple[int, str, str]], buckets: np.ndarray | None = None):
        self.labels = labels  # float32 [n] (0/1)
        self.dense = dense  # float32 [n, 13]: log(1 + max(x, 0)), missing -> 0
        self.codes = codes  # int64 [26, n] categorical codes ("" -> -1), field-major
        self.lines = lines
        self.bad = bad  # (line, reason, detail), sorted by line
        self.buckets = buckets  # int16 [13, n] dense bucket codes (see dense_bucket_codes), or None

    def __len__(self) -> int:
        return len(self.lines)


def _parsed_blocks(path: Path, block_bytes: int, digest) -> Iterator[tuple]:
    """(raw block, its line count, its pyarrow table or None when the parse is not clean)."""
    for buf in raw_blocks(path, block_bytes, digest):
        n_lines = buf.count(b"\n")
        table = clean_table(buf, COLUMNS, delimiter="\t", quote_char=False, reject_cr=True, n_lines=n_lines)
        yield buf, n_lines, table


def _line_problem(line: bytes) -> tuple[str, str] | None:
    """Why a line is not a Criteo line by its shape (``\\r``, field count, encoding), or None."""
    n_fields = line.count(b"\t") + 1
    if b"\r" in line:
        return "carriage return", "line contains \\r"
    if n_fields != _N_COLS:
        return "field count", f"{n_fields} fields, expected {_N_COLS}"
    if (err := utf8_error(line)) is not None:
        field = COLUMNS[line.count(b"\t", 0, err.start)]
        return "encoding", (f"invalid UTF-8 in field {field} (byte 0x{line[err.start]:02x} at byte {err.start + 1} "
                            "of the line)")
    return None


def blocks(path: Path, block_bytes: int, digest=None, buckets: bool = False) -> Iterator[Block]:
    """The decoded :class:`Block` s of a Criteo TSV file (plain or gzip), hashing its raw bytes into ``digest``."""
    first_line = 1
    for buf, n_lines, table in prefetch(_parsed_blocks(path, block_bytes, digest), "criteo-read"):
        bad: list[tuple[int, str, str]] = []
        if table is not None:
            lines = np.arange(first_line, first_line + n_lines, dtype=np.int64)
        else:  # slow, exact path: find the lines with the wrong number of fields in Python
            good, good_lines, bad = split_lines(buf, first_line, _line_problem)
            lines = np.asarray(good_lines, dtype=np.int64)
            table, rejected = parse_lines(good, COLUMNS, delimiter="\t", quote_char=False)
            assert not rejected and table.num_rows == len(good), "pyarrow disagrees with the field count"
        first_line += n_lines
        yield _decode(table, lines, bad, buckets)


def _decode(table, lines: np.ndarray, bad: list[tuple[int, str, str]], buckets: bool) -> Block:
    """Check the values of a parsed block (vectorised), drop the bad rows, decode the rest."""
    import pyarrow as pa
    import pyarrow.compute as pc

    cols = [table.column(i) for i in range(_N_COLS)]  # chunked (pyarrow parsed in several threads)
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
    for j, (c, valid) in enumerate(pool().map(_hex_chunked, cols[14:])):
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
    bk = np.full((len(DENSE_FIELDS), n), MISSING, dtype=np.int16) if buckets else None
    for j in range(len(DENSE_FIELDS)):
        col = cols[1 + j]
        present = pc.greater(pc.binary_length(col), 0).to_numpy(zero_copy_only=False)
        if present.all():
            x = pc.cast(col, "int64").to_numpy()
            den[:, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
            if bk is not None:
                bk[j] = dense_bucket_codes(x)
        elif present.any():
            x = pc.cast(pc.filter(col, present), "int64").to_numpy()
            den[present, j] = np.log1p(np.maximum(x, 0).astype(np.float64))
            if bk is not None:
                bk[j, present] = dense_bucket_codes(x)
    return Block(lab, den, np.ascontiguousarray(codes), lines, sorted(seen.values()), bk)


# --------------------------------------------------------------------------------------------- spill
def spill(block: Block, put: Callable[[memoryview], None], buckets: bool) -> list[int]:
    """Write a decoded block through ``put`` (pass 1's temporary file, read back by :func:`unspill`).

    Categorical codes as uint32 ``[26, n]`` (``""`` -> ``0xffffffff``), then as int64 each field that holds the
    value ``"ffffffff"`` too (returned: the caller keeps them with ``n`` for :func:`unspill`), dense float32
    ``[n, 13]``, labels float32 ``[n]``, and with ``buckets`` the bucket codes int16 ``[13, n]``.
    """
    wide = [f for f in range(len(SPARSE_FIELDS)) if (block.codes[f] == U32_MAX).any()]
    put(block.codes.astype(np.uint32).data)
    for f in wide:
        put(block.codes[f].data)
    put(block.dense.data)
    put(block.labels.data)
    if buckets:
        put(block.buckets.data)
    return wide


def unspill(fh, block_sizes: list[tuple[int, list[int]]], buckets: bool) -> Iterator[tuple]:
    """The blocks :func:`spill` wrote to ``fh``, given ``(n, wide fields)`` of each, as ``(n, codes32 [26, n]
    uint32, {field: int64 codes} of the wide fields, dense [n, 13], labels [n], buckets [13, n] or None)``.

    The arrays are views of buffers reused from one block to the next.
    """
    max_n = max(n for n, _ in block_sizes) if block_sizes else 0
    buf32 = np.empty(max_n * len(SPARSE_FIELDS), np.uint32)
    buf_den = np.empty(max_n * len(DENSE_FIELDS), np.float32)
    buf_lab = np.empty(max_n, np.float32)
    buf_bk = np.empty(max_n * len(BUCKET_FIELDS), np.int16)

    def read(arr: np.ndarray) -> np.ndarray:
        if fh.readinto(memoryview(arr).cast("B")) != arr.nbytes:
            raise ValueError("temporary file truncated between the two passes")
        return arr

    for n, wide in block_sizes:
        codes32 = read(buf32[:n * len(SPARSE_FIELDS)]).reshape(-1, n)
        exact = {f: read(np.empty(n, np.int64)) for f in wide}
        den = read(buf_den[:n * len(DENSE_FIELDS)]).reshape(n, -1)
        lab = read(buf_lab[:n])
        bk = read(buf_bk[:n * len(BUCKET_FIELDS)]).reshape(-1, n) if buckets else None
        yield n, codes32, exact, den, lab, bk


# --------------------------------------------------------------------------------------------- dense values
def dense_bucket_codes(x: np.ndarray) -> np.ndarray:
    """Bucket codes of integer dense values: ``floor(ln(x) ** 2)`` (float64) for ``x >= 1``, -2 for ``x < 1``.

    >>> dense_bucket_codes(np.array([-3, 0, 1, 2, 3, 7, 8, 100])).tolist()
    [-2, -2, 0, 0, 1, 3, 4, 21]
    """
    out = np.full(len(x), BELOW_1, dtype=np.int16)
    pos = x >= 1
    out[pos] = np.floor(np.log(x[pos].astype(np.float64)) ** 2).astype(np.int16)  # <= 1717 for x < 10**18
    return out


def bucket_value_codes(values: list[str]) -> np.ndarray:
    """Bucket codes of raw dense values (integer strings of at most 18 digits, or ``""`` = missing)."""
    codes = np.full(len(values), MISSING, dtype=np.int64)
    for i, v in enumerate(values):
        if v != "":
            if not isinstance(v, str) or not re.fullmatch(_DENSE_RE, v):
                raise ValueError(f"malformed dense value {v!r} (expected an integer of at most 18 digits or '')")
            codes[i] = dense_bucket_codes(np.array([int(v)], dtype=np.int64))[0]
    return codes


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


# --------------------------------------------------------------------------------------------- categorical values
_M0F = np.uint64(0x0F0F0F0F0F0F0F0F)
_M01 = np.uint64(0x0101010101010101)
_M00FF = np.uint64(0x00FF00FF00FF00FF)
_M0000FFFF = np.uint64(0x0000FFFF0000FFFF)
_M32 = np.uint64(0xFFFFFFFF)


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
                codes = np.full(n, MISSING, dtype=np.int64)
                codes[is8] = v.astype(np.int64)
                return codes, None
    codes, valid = hex_codes_exact(arr)
    return codes, (None if valid.all() else valid)


def hex_codes_exact(arr) -> tuple[np.ndarray, np.ndarray]:
    """int64 codes of a string array of 8-hex-digit values ("" -> -1), and the mask of well-formed values."""
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    codes = np.full(n, MISSING, dtype=np.int64)
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


def code_strings(codes: np.ndarray) -> list[str]:
    """The hex strings of categorical codes (``-1`` -> ``""``)."""
    return ["" if c == MISSING else f"{int(c):08x}" for c in codes]
