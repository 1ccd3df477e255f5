"""Criteo TSV -> a prepared data set of memory-mapped ``.npy`` arrays, in two streaming passes.

Input layout (Kaggle ``train.txt``, 1TB ``day_N``): ``label \\t I1..I13 \\t C1..C26``, no header, empty = missing.
The folder written is :mod:`embcompress.dataformat`'s (``format: embcompress-criteo``); :func:`load_criteo`,
:func:`encode_values`, :func:`decode_ids` and :func:`load_vocab` read it back.

Pipeline (:func:`prepare_criteo`)
---------------------------------
* The inputs (plain or ``.gz``, concatenated in the given order) are read in blocks of about ``block_rows``
  lines, parsed by pyarrow and validated vectorised (:mod:`embcompress.criteo_rows`, through
  :mod:`embcompress.textreader`); the next block is read and parsed in a background thread while the current one
  is decoded, so nothing but two blocks is held in memory. The raw input bytes are hashed (sha256) while pass 1
  reads them.
* Pass 1 validates every line and counts the values of each categorical field. Categorical values are
  8 lowercase hex digits; they are decoded to integers (``"0000000a"`` -> 10) and the empty string (missing)
  to ``-1``, so counting is a sort of integer arrays (partial counts merged geometrically), not a Python
  dict of strings. Integer order equals string order (same length hex, ``""`` first), so ties are broken by
  the value string.
* Ids per field (:mod:`embcompress.vocab`): descending count, ties by ascending value string; id 0 = most
  frequent. A missing value is the value ``""`` and gets an id like any other value. Values seen fewer than
  ``min_count`` times, and values unseen at preparation (:func:`encode_values`), map to the reserved id
  ``n_f - 1`` (the last id). The reserved id always exists, so ``n_f = (#values with count >= min_count) + 1``.
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
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import prepared
from .criteo_rows import (BUCKET_FIELDS, COLUMNS, DENSE_FIELDS, MISSING, SPARSE_FIELDS, U32_MAX, blocks, pool,
                          spill, unspill)
from .dataformat import (MANIFEST, SplitLabels, combined_sha256, decode_ids, encode_values, load_criteo, load_vocab,
                         read_manifest, uint_dtype)
from .prepared import write_json_atomic
from .textreader import BadLines, check_input_files
from .vocab import CodeCounter, lookup, lookup_index, rank_codes

__all__ = [
    "DENSE_FIELDS", "SPARSE_FIELDS", "BUCKET_FIELDS", "SPLITS", "COLUMNS", "CriteoOptions", "prepare_criteo",
    "load_criteo", "encode_values", "decode_ids", "load_vocab", "read_manifest",
]

FORMAT = "embcompress-criteo"
FORMAT_VERSION = 1
SPLITS = ("dlrm", "random", "day")
DAYS_1TB = 24  # Criteo 1TB: day_0 .. day_23
_DAY_NAME = re.compile(r"^day_(\d+)(\..*)?$")
#: options of a data set prepared before the option existed (so such a folder can be rebuilt in place)
_OPTION_DEFAULTS = {"max_rows_per_field": None, "dense_buckets": False}


@dataclass(frozen=True)
class CriteoOptions:
    """What a Criteo data set is prepared with (the manifest's ``options``), each checked when built."""

    min_count: int = 1
    max_rows_per_field: int | None = None
    dense_buckets: bool = False
    split: str = "dlrm"
    seed: int = 0
    on_bad_line: str = "error"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {self.split!r}")
        if self.on_bad_line not in ("error", "skip"):
            raise ValueError(f"on_bad_line must be 'error' or 'skip', got {self.on_bad_line!r}")
        m, cap = self.min_count, self.max_rows_per_field
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 1:
            raise ValueError(f"min_count must be an int >= 1, got {m!r}")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1):
            raise ValueError(f"max_rows_per_field must be None or an int >= 1 (ids per field, the reserved id "
                             f"included), got {cap!r}")
        if not isinstance(self.dense_buckets, bool):
            raise TypeError(f"dense_buckets must be True or False, got {self.dense_buckets!r}")
        object.__setattr__(self, "min_count", int(m))
        object.__setattr__(self, "max_rows_per_field", None if cap is None else int(cap))

    @property
    def fields(self) -> tuple[str, ...]:
        """The categorical fields written: ``C1..C26``, then ``I1_bucket..I13_bucket`` with ``dense_buckets``."""
        return SPARSE_FIELDS + (BUCKET_FIELDS if self.dense_buckets else ())

    def manifest(self) -> dict:
        """The manifest's ``options`` (``seed`` only for the random split)."""
        return {"min_count": self.min_count, "split": self.split,
                "seed": self.seed if self.split == "random" else None, "on_bad_line": self.on_bad_line,
                "dense_buckets": self.dense_buckets, "max_rows_per_field": self.max_rows_per_field}


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
    opts = CriteoOptions(min_count=min_count, max_rows_per_field=max_rows_per_field, dense_buckets=dense_buckets,
                         split=split, seed=seed, on_bad_line=on_bad_line)
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    if split == "day":
        _check_day_inputs(paths)
    check_input_files(paths)
    if not isinstance(force, bool):
        raise TypeError(f"force must be True or False, got {force!r}")
    out = Path(out_dir)
    options = opts.manifest()
    sources = [{"path": str(p.resolve()), "name": p.name, "bytes": p.stat().st_size} for p in paths]
    block_bytes = max(1, block_rows * 200)  # ~200 bytes per Criteo line; blocks end at a newline

    def build(target: prepared.Target) -> dict:
        with _spill_folder(out) as spill_dir:
            if on_bad_line == "error":  # every line valid, each at most 496 bytes, is >= 160 spilled bytes
                prepared.check_free_space(spill_dir, sum(s["bytes"] for s in sources) * 160 // 496,
                                          "the temporary decoded rows of pass 1 (160 bytes a row)")
            return _prepare(opts, target, spill_dir, paths=paths, sources=sources, block_bytes=block_bytes,
                            progress=progress, t0=t0)

    # the output folder: reuse an identical data set, refuse another one, or pick where to write
    return prepared.prepare_into(out, FORMAT, options, sources, paths, build, force=force,
                                 option_defaults=_OPTION_DEFAULTS, progress=progress)


@contextlib.contextmanager
def _spill_folder(out: Path) -> Iterator[Path]:
    """The temporary folder beside ``out`` for pass 1's decoded blocks, removed on exit.

    Its name is fixed per output folder; it is made under the lock of :func:`embcompress.prepared.locked`,
    whose recovery has removed a folder left by a killed run (nobody held the lock).
    """
    spill_dir = prepared.side_paths(out)["spill"]
    spill_dir.mkdir()
    try:
        yield spill_dir
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)


def _pass_1(opts: CriteoOptions, spill_path: Path, *, paths: list[Path], sources: list[dict], block_bytes: int,
            progress: bool) -> tuple[list[CodeCounter], int, list, dict]:
    """Validate, decode, count and hash the inputs; spill the decoded rows to ``spill_path``.

    Returns the counters of the fields, the positives, ``(rows, wide fields)`` of each spilled block, and the
    bad lines skipped; ``sources`` get each input's sha256 and rows.
    """
    fields, n_cat = opts.fields, len(SPARSE_FIELDS)
    counters = [CodeCounter() for _ in fields]
    bad_lines = BadLines(opts.on_bad_line, "use on_bad_line='skip' (--on-bad-line skip) to drop such lines")
    n_rows = n_pos = 0
    block_sizes: list[tuple[int, list[int]]] = []

    def count(block, f: int) -> None:
        counters[f].add(block.codes[f] if f < n_cat else block.buckets[f - n_cat].astype(np.int64))

    with open(spill_path, "wb") as fh:
        def put(data) -> None:
            with prepared.naming(spill_path):  # a full disk: the message names the temporary file
                fh.write(data)

        for src, p in zip(sources, paths):
            digest = hashlib.sha256()
            n_file = 0
            for block in blocks(p, block_bytes, digest, opts.dense_buckets):
                for line, reason, detail in block.bad:
                    bad_lines.add(p, line, reason, f"bad line ({reason}: {detail})")
                if not len(block):
                    continue
                list(pool().map(lambda f: count(block, f), range(len(fields))))
                n_pos += int(np.count_nonzero(block.labels))
                block_sizes.append((len(block), spill(block, put, opts.dense_buckets)))
                n_file += len(block)
                if progress:
                    print(f"pass 1 {p.name}: {n_rows + n_file:,} rows", flush=True)
            src["sha256"] = digest.hexdigest()
            src["rows"] = n_file
            n_rows += n_file
    return counters, n_pos, block_sizes, bad_lines.skipped


def _schema(fields: tuple[str, ...], sparse_dtype: np.dtype, buckets: bool) -> dict:
    """The manifest's ``schema`` of a Criteo data set."""
    return {"label": "label", "dense": list(DENSE_FIELDS), "sparse": list(fields),
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
               if buckets else {})}


def _prepare(opts: CriteoOptions, target: prepared.Target, spill_dir: Path, *, paths: list[Path],
             sources: list[dict], block_bytes: int, progress: bool, t0: float) -> dict:
    """Both passes into ``target.build``, with pass 1's temporary rows in ``spill_dir``."""
    fields, buckets, n_cat = opts.fields, opts.dense_buckets, len(SPARSE_FIELDS)
    spill_path = Path(spill_dir) / "rows.bin"
    counters, n_pos, block_sizes, skipped = _pass_1(opts, spill_path, paths=paths, sources=sources,
                                                    block_bytes=block_bytes, progress=progress)
    n_rows = sum(s["rows"] for s in sources)
    if n_rows == 0:
        raise ValueError(f"no data rows in {', '.join(str(p) for p in paths)} (empty input"
                         + (f", {skipped['total']} bad lines skipped)" if skipped["total"] else ")"))
    checksum = combined_sha256([s["sha256"] for s in sources])
    target.check_checksum(checksum)
    out = target.build  # out_dir itself, or the folder beside it that replaces it at the end

    # vocabularies
    vocabs = [rank_codes(u, c, opts.min_count, opts.max_rows_per_field)
              for u, c in pool().map(lambda cnt: cnt.result(), counters)]
    cards = [len(v) + 1 for v in vocabs]  # + the reserved id (rare / unseen values)
    counters = None
    sparse_dtype = uint_dtype(max(cards) - 1)
    splits = _splits(n_rows, opts.split, [s["rows"] for s in sources])
    if opts.split == "day" and splits["val"][1] - splits["test"][0] < 2:
        raise ValueError(f"{paths[-1]}: day 23 has {splits['val'][1] - splits['test'][0]} row(s); the day split "
                         "halves it into test and val")

    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "complete": False,
        "name": "criteo", "sources": sources, "source_sha256": checksum, "options": opts.manifest(),
        "schema": _schema(fields, sparse_dtype, buckets),
        "rows": n_rows, "positives": n_pos, "cardinalities": cards, "sparse_dtype": sparse_dtype.name,
        "splits": {k: list(v) for k, v in splits.items()}, "skipped": skipped,
    }
    row_bytes = 4 + 4 * len(DENSE_FIELDS) + sparse_dtype.itemsize * len(fields)
    row_bytes += uint_dtype(n_rows).itemsize if opts.split == "random" else 0
    vocab_bytes = 8 * sum(len(v) for v in vocabs) + 128 * len(fields)
    # over a run killed in pass 2, its arrays and vocabularies are truncated or removed before ours are written
    prepared.check_free_space(out, n_rows * row_bytes + vocab_bytes + 128 * 4,
                              f"the arrays of {n_rows:,} rows ({row_bytes} bytes a row) and the vocabularies",
                              replaces=[out / f for f in ("labels.npy", "dense.npy", "sparse.npy", "row_order.npy",
                                                          "vocab")])
    target.begin()
    write_json_atomic(out / MANIFEST, manifest)  # complete: false until every array is written
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
    if opts.split == "random":
        dest = np.random.default_rng(opts.seed).permutation(n_rows)  # input row k is written at dest[k]
        row_order = open_memmap(out / "row_order.npy", mode="w+", dtype=uint_dtype(n_rows), shape=(n_rows,))
        prepared.allocate(out / "row_order.npy")
        row_order[dest] = np.arange(n_rows, dtype=row_order.dtype)
        row_order.flush()
        del row_order
    elif (out / "row_order.npy").exists():
        (out / "row_order.npy").unlink()
    lookups = []
    for v in vocabs:
        by_value = np.argsort(v, kind="stable")
        lookups.append((v[by_value], by_value.astype(sparse_dtype), lookup_index(v[by_value])))
    row = 0
    balance = SplitLabels(splits)
    with open(spill_path, "rb") as fh:
        buf_spa = np.empty(max((n for n, _ in block_sizes), default=0) * len(fields), sparse_dtype)
        for n, codes32, exact, den, lab, bk in unspill(fh, block_sizes, buckets):
            spa = buf_spa[:n * len(fields)].reshape(n, -1)

            def encode(f):
                vals, ids, index = lookups[f]
                if f >= n_cat:
                    codes = bk[f - n_cat].astype(np.int64)
                elif f in exact:
                    codes = exact[f]
                else:
                    codes = codes32[f].astype(np.int64)
                    codes[codes == U32_MAX] = MISSING
                spa[:, f] = lookup(codes, vals, ids, cards[f] - 1, index)

            list(pool().map(encode, range(len(fields))))
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
    write_json_atomic(out / MANIFEST, manifest)
    target.commit()
    return manifest
