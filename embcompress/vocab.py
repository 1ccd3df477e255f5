"""Vocabularies of categorical fields: counting values, frequency-ranked ids, value -> id lookups, vocab files.

The id rule both preparations share: per field, values by descending count, ties by ascending value (integer
codes for Criteo, whose order equals the hex strings' order; byte order of the strings for a CSV); id 0 is the
most frequent. Values seen fewer than ``min_count`` times share the reserved id ``n_f - 1`` (the last id), as
do values unseen at preparation; with a cap ``max_rows_per_field=N`` only the ``N - 1`` first values in id order
keep an id, so ``n_f <= N``. The reserved id always exists: ``n_f = (#values kept) + 1``.

* Integer codes (Criteo): :class:`CodeCounter` counts them with sorted (value, count) runs merged geometrically
  (pandas' khash ``value_count`` per block when available, ``numpy.unique`` otherwise); :func:`rank_codes` gives
  the kept values in id order; :func:`lookup_index` and :func:`lookup` encode codes with a vocabulary (a khash
  table for a small one, a bucket index of the sorted values for one of millions, a binary search otherwise).
* Strings (CSV): :func:`merge_counts` counts a pyarrow column block by block; :func:`rank_strings` ranks.
* Files: a Criteo field's vocabulary is ``vocab/<field>.npy`` (int64 codes in id order); a CSV field's is
  ``vocab/field_<k>.json`` by its position ``k`` (:func:`vocab_file`, never a name from the data), read back by
  :func:`read_vocab` (also version 1's ``vocab/<column>.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

try:  # pandas' khash tables (a dependency already): O(1) counting and lookups; numpy sort/search otherwise
    from pandas._libs.hashtable import Int64HashTable as _Int64HashTable
    from pandas._libs.hashtable import value_count as _value_count
except Exception:  # pragma: no cover - other pandas versions
    _Int64HashTable = _value_count = None

__all__ = ["CodeCounter", "rank_codes", "lookup_index", "lookup", "merge_counts", "rank_strings", "vocab_file",
           "read_vocab", "write_strings"]


# --------------------------------------------------------------------------------------------- integer codes
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


class CodeCounter:
    """Counts int64 codes with sorted (unique, count) runs merged geometrically (amortised O(n log n)).

    >>> c = CodeCounter(); c.add(np.array([3, -1, 3])); c.add(np.array([7, 3]))
    >>> [a.tolist() for a in c.result()]
    [[-1, 3, 7], [1, 3, 1]]
    """

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
        """(sorted distinct values, their counts)."""
        if not self.runs:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        while len(self.runs) > 1:
            b = self.runs.pop()
            self.runs.append(self._merge(self.runs.pop(), b))
        return self.runs[0]


def rank_codes(values: np.ndarray, counts: np.ndarray, min_count: int, cap: int | None) -> np.ndarray:
    """The kept values in id order (descending count, ties by ascending value; ``min_count``, then the cap).

    >>> rank_codes(np.array([1, 2, 5, 9]), np.array([2, 4, 2, 1]), min_count=2, cap=None).tolist()
    [2, 1, 5]
    """
    order = np.lexsort((values, -counts))
    kept = order[counts[order] >= min_count]
    if cap is not None:
        kept = kept[:cap - 1]  # the N - 1 most frequent values; id N - 1 is the reserved id
    return values[kept]


_BUCKET_MIN = 1 << 18  # vocabularies at least this large are searched through a bucket index


def _bucket_index(vals: np.ndarray):
    """(shift, starts, steps) for :func:`lookup`: ``vals[starts[b]:starts[b + 1]]`` are the values whose
    ``(value + 1) >> shift`` is ``b``, and ``steps`` bisections resolve the largest bucket. None if small."""
    if len(vals) < _BUCKET_MIN:
        return None
    shift = max(0, 33 - int(np.log2(len(vals))))
    edges = np.arange(((1 << 33) >> shift) + 2, dtype=np.int64) << shift
    starts = np.searchsorted(vals + 1, edges, side="left")
    width = int(np.diff(starts).max())
    return shift, starts, max(1, int(np.ceil(np.log2(width + 1))))


def lookup_index(vals: np.ndarray):
    """What :func:`lookup` searches ``vals`` (sorted) with: a khash table for a small vocabulary (fast and
    small), a bucket index for a large one (a hash table of millions of values would cost ~32 bytes each)."""
    if len(vals) < _BUCKET_MIN:
        if _Int64HashTable is None or not len(vals):
            return None
        table = _Int64HashTable(len(vals))
        table.map_locations(np.ascontiguousarray(vals, dtype=np.int64))
        return table
    return _bucket_index(vals)


def lookup(codes: np.ndarray, vals: np.ndarray, ids: np.ndarray, reserved: int, index=None) -> np.ndarray:
    """Ids of ``codes``: ``ids[i]`` where ``codes == vals[i]`` (``vals`` sorted), ``reserved`` where absent.

    >>> lookup(np.array([5, 1, 4]), np.array([1, 5]), np.array([1, 0]), reserved=2).tolist()
    [0, 1, 2]
    """
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


# --------------------------------------------------------------------------------------------- strings
def merge_counts(acc, col):
    """Running (value, count) table of a column, merged with a block's value counts."""
    import pyarrow as pa
    import pyarrow.compute as pc

    vc = pc.value_counts(col)
    part = pa.table({"value": vc.field("values"), "count": pc.cast(vc.field("counts"), pa.int64())})
    if acc is None:
        return part
    merged = pa.concat_tables([acc, part]).group_by("value").aggregate([("count", "sum")])
    return merged.select(["value", "count_sum"]).rename_columns(["value", "count"])


def rank_strings(counts, min_count: int, cap: int | None):
    """The kept values (a pyarrow array) in id order of a :func:`merge_counts` table."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = counts.sort_by([("count", "descending"), ("value", "ascending")])
    kept = t.filter(pc.greater_equal(t.column("count"), min_count)).column("value")
    if cap is not None:
        kept = kept.slice(0, cap - 1)
    return kept.combine_chunks() if isinstance(kept, pa.ChunkedArray) else kept


# --------------------------------------------------------------------------------------------- files
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


def write_strings(path: Path, field: str, values: list[str]) -> None:
    """Write a CSV field's vocabulary: ``{"field": field, "values": [value strings in id order]}``."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump({"field": field, "values": values}, fh, ensure_ascii=False)


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
