"""Streaming reader of delimited text (Criteo TSV, any CSV): newline-cut blocks, pyarrow parsing, exact fallback.

Both preparations (:mod:`embcompress.criteo`, :mod:`embcompress.csvdata`) read their inputs through this module,
so that an input is never loaded whole and a bad line is always reported with its file and 1-based line:

* :func:`raw_blocks` yields the decompressed bytes of a file (plain, or gzip recognised by its magic bytes) in
  blocks of about ``block_bytes`` that end with a newline (one is added at EOF if missing), and feeds every raw
  byte it reads into a sha256 (the manifest's checksum of the inputs costs no second read).
* :func:`read_strings` parses a block with ``pyarrow.csv.read_csv`` (explicit column names, every column a
  non-null string, no quoting or a quote character, several threads) and counts the rows pyarrow could not
  split. Blocks are cut here rather than by ``pyarrow.csv.open_csv`` because pyarrow's streaming reader does not
  report the line number of a row it rejects (``InvalidRow.number`` is ``None``).
* :func:`clean_table` is the fast path: the parse of a block only when it is clean (no rejected row, no empty
  line, one row per line, valid UTF-8, optionally no ``\\r``). Otherwise the caller splits the block line by
  line with :func:`split_lines` (its own check per line: field count, encoding, ...), which gives the exact
  line numbers of the lines at fault, and parses the good lines with :func:`parse_lines`.
* :func:`prefetch` produces the next block in a background thread while the caller decodes the current one.
* :class:`BadLines` raises the first bad line (``on_bad_line="error"``) or counts them for the manifest
  (``"skip"``); :func:`check_input_files` and :func:`utf8_error` are the input checks both preparations make.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

__all__ = ["BadLines", "check_input_files", "utf8_error", "raw_blocks", "read_strings", "clean_table",
           "split_lines", "parse_lines", "prefetch"]

_PA_BLOCK = 1 << 22  # pyarrow's parse block: a block of ours is parsed by several threads


# --------------------------------------------------------------------------------------------- inputs, bad lines
def check_input_files(paths: Sequence[Path]) -> None:
    """Each input must be an existing regular file (a folder is named as such, not as missing)."""
    for p in paths:
        if p.is_dir():
            raise ValueError(f"input {str(p)!r} is a directory; expected a file")
        if not p.is_file():
            raise FileNotFoundError(f"input file {str(p)!r} does not exist")


def utf8_error(line: bytes) -> UnicodeDecodeError | None:
    """The decoding error of a line that is not valid UTF-8, else None."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as err:
        return err
    return None


class BadLines:
    """Bad input lines: ``on_bad_line="error"`` raises the first (file, 1-based line, ``detail``, then ``hint``);
    ``"skip"`` counts them in ``skipped`` (the manifest's: total, per reason, the first 10 as ``file:line``)."""

    def __init__(self, on_bad_line: str, hint: str):
        self.on_bad_line, self.hint = on_bad_line, hint
        self.skipped = {"total": 0, "by_reason": {}, "first": []}

    def add(self, path: Path, line: int, reason: str, detail: str) -> None:
        if self.on_bad_line == "error":
            raise ValueError(f"{path}: line {line}: {detail}; {self.hint}")
        self.skipped["total"] += 1
        self.skipped["by_reason"][reason] = self.skipped["by_reason"].get(reason, 0) + 1
        if len(self.skipped["first"]) < 10:
            self.skipped["first"].append(f"{path.name}:{line}")


# --------------------------------------------------------------------------------------------- bytes
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


def raw_blocks(path: Path, block_bytes: int, digest=None) -> Iterator[bytes]:
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


# --------------------------------------------------------------------------------------------- parsing
def read_strings(buf: bytes, names: Sequence[str], *, delimiter: str, quote_char: str | bool):
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


def clean_table(buf: bytes, names: Sequence[str], *, delimiter: str, quote_char: str | bool,
                reject_cr: bool = False, n_lines: int | None = None):
    """The block parsed by :func:`read_strings` when the parse is clean (one row per line, nothing rejected,
    valid UTF-8, no empty line, and no ``\\r`` with ``reject_cr``), else None: split it with :func:`split_lines`.
    ``n_lines``: the block's count of newlines, if the caller has it."""
    if (reject_cr and b"\r" in buf) or b"\n\n" in buf or buf.startswith(b"\n"):
        return None
    table, rejected = read_strings(buf, names, delimiter=delimiter, quote_char=quote_char)
    if table is None or rejected or table.num_rows != (buf.count(b"\n") if n_lines is None else n_lines):
        return None
    return table


def split_lines(buf: bytes, first_line: int, problem: Callable[[bytes], tuple[str, str] | None]):
    """(good lines, their 1-based numbers, bad lines as ``(number, reason, detail)``) of a block.

    ``problem(line)`` is the caller's check of one line (without its newline): ``(reason, detail)`` or None.
    """
    good: list[bytes] = []
    numbers: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for k, line in enumerate(buf[:-1].split(b"\n")):
        found = problem(line)
        if found is None:
            good.append(line)
            numbers.append(first_line + k)
        else:
            bad.append((first_line + k, *found))
    return good, numbers, bad


def parse_lines(lines: list[bytes], names: Sequence[str], *, delimiter: str, quote_char: str | bool):
    """:func:`read_strings` of the good lines :func:`split_lines` kept (an empty table of ``names`` for none)."""
    import pyarrow as pa

    if not lines:
        return pa.table({c: pa.array([], pa.string()) for c in names}), 0
    return read_strings(b"\n".join(lines) + b"\n", names, delimiter=delimiter, quote_char=quote_char)


def prefetch(it: Iterator, thread_name: str = "read") -> Iterator:
    """Items of ``it``, the next one produced in a background thread while the caller works on this one."""
    from concurrent.futures import ThreadPoolExecutor

    done = object()
    with ThreadPoolExecutor(1, thread_name_prefix=thread_name) as ex:
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
