"""The on-disk format of a prepared data set (Criteo or CSV), and reading one back.

A prepared folder holds memory-mappable ``.npy`` arrays and a JSON manifest:

* ``labels.npy`` float32 ``[N]`` (0/1), ``dense.npy`` float32 ``[N, D]``, ``sparse.npy`` ``[N, F]`` in the
  smallest unsigned dtype holding every id of every field (:func:`uint_dtype`), ``row_order.npy`` (Criteo's
  random split and every CSV data set: for each written row, its 0-based index among the accepted input rows, in
  the smallest unsigned dtype holding ``N``); the splits are contiguous row ranges.
* ``vocab/``: the kept values of each categorical field in id order; ``<field>.npy`` (int64 codes) for Criteo,
  ``field_<k>.json`` for a CSV data set (see :mod:`embcompress.vocab`). The reserved id ``n_f - 1`` (the last)
  stands for every value not in the vocabulary.
* ``manifest.json`` (:data:`MANIFEST`): ``format`` (one of :data:`FORMATS`) and ``version``, ``complete``,
  ``name``, ``sources`` (path, name, bytes, sha256, rows of each input) and ``source_sha256``
  (:func:`combined_sha256`), ``options``, ``schema`` (label, dense and sparse field names, file layout),
  ``rows``, ``positives``, ``cardinalities``, ``sparse_dtype``, ``splits``, ``skipped`` (bad lines), and, once
  complete, ``split_positives`` and ``warnings`` (:class:`SplitLabels`) and ``seconds``. A folder is usable only
  with ``complete: true``: the manifest is written first with ``complete: false`` and last with ``true``.

:func:`load_criteo` reads either format as :class:`~embcompress.data.CTRData` over memory maps;
:func:`load_vocab`, :func:`encode_values` and :func:`decode_ids` map raw values to ids and back.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .criteo_rows import (BELOW_1, BUCKET_FIELDS, MISSING, SPARSE_FIELDS, bucket_value_codes, code_strings,
                         hex_codes_exact)
from .vocab import lookup, read_vocab

__all__ = ["MANIFEST", "FORMATS", "DataWarning", "SplitLabels", "read_manifest", "combined_sha256", "uint_dtype",
           "load_criteo", "load_vocab", "encode_values", "decode_ids"]

MANIFEST = "manifest.json"
#: on-disk formats of a prepared data set: Criteo TSV, and any CSV through a spec (embcompress.csvdata)
FORMATS = ("embcompress-criteo", "embcompress-csv")


class DataWarning(UserWarning):
    """A prepared data set that is valid but likely not what was meant (e.g. a split without positives)."""


# --------------------------------------------------------------------------------------------- manifest
def read_manifest(out_dir: str | os.PathLike) -> dict:
    """The manifest of a data set folder; errors name the file (missing, not JSON, not a JSON object)."""
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {MANIFEST}; prepare the data set with `embcompress data criteo`")
    try:
        with open(path, encoding="utf-8") as fh:
            m = json.load(fh)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); a prepared data set's manifest is a JSON object") from None
    if not isinstance(m, dict):
        raise ValueError(f"{path}: expected a JSON object (the manifest of a prepared data set), got a JSON "
                         f"{type(m).__name__}")
    return m


def combined_sha256(file_digests: Sequence[str]) -> str:
    """The manifest's ``source_sha256``: the sha256 of the inputs' sha256 hex digests, concatenated in order."""
    return hashlib.sha256("".join(file_digests).encode()).hexdigest()


def uint_dtype(max_id: int) -> np.dtype:
    """The smallest unsigned dtype holding ``max_id`` (``sparse.npy``, ``row_order.npy``).

    >>> uint_dtype(255), uint_dtype(256), uint_dtype(2**32)
    (dtype('uint8'), dtype('uint16'), dtype('uint64'))
    """
    for dt in (np.uint8, np.uint16, np.uint32, np.uint64):
        if max_id <= np.iinfo(dt).max:
            return np.dtype(dt)
    raise ValueError(f"id {max_id} does not fit in 64 bits")


class SplitLabels:
    """Rows and positives of each split, counted as rows are written (a split is a contiguous range of rows).

    A split with no positives, no negatives or no rows gets a warning (:class:`DataWarning`), also listed in the
    manifest's ``warnings``.
    """

    def __init__(self, splits: dict):
        self.names = sorted(splits, key=lambda k: tuple(splits[k]))
        self.starts = np.array([splits[k][0] for k in self.names], dtype=np.int64)
        self.rows = {k: int(splits[k][1]) - int(splits[k][0]) for k in self.names}
        self.positives = np.zeros(len(self.names), dtype=np.int64)

    def add(self, at: np.ndarray, labels: np.ndarray) -> None:
        """``at``: the written positions of rows whose labels (0/1) are ``labels``."""
        idx = np.searchsorted(self.starts, np.asarray(at)[np.asarray(labels) != 0], side="right") - 1
        self.positives += np.bincount(idx, minlength=len(self.names))

    def counts(self) -> dict[str, int]:
        return {k: int(p) for k, p in zip(self.names, self.positives)}

    def warnings(self) -> list[str]:
        out = []
        for k, pos in self.counts().items():
            rows = self.rows[k]
            n = f"{rows:,} row{'s' if rows != 1 else ''}"
            if rows == 0:
                out.append(f"split {k!r} is empty (0 rows)")
            elif pos == 0:
                out.append(f"split {k!r} has no positive rows ({n}, all labels 0): its AUC is undefined")
            elif pos == rows:
                out.append(f"split {k!r} has no negative rows ({n}, all labels 1): its AUC is undefined")
        return out

    def record(self, manifest: dict) -> None:
        """Put the counts and warnings into the manifest, and emit each warning as a :class:`DataWarning`."""
        manifest["split_positives"] = self.counts()
        manifest["warnings"] = self.warnings()
        for w in manifest["warnings"]:
            # the caller of prepare_criteo / prepare_csv (through prepare_into, the build function and _prepare)
            warnings.warn(w, DataWarning, stacklevel=6)


# --------------------------------------------------------------------------------------------- reading back
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
        return np.array(read_vocab(out_dir, m, f), dtype=object)
    if name not in SPARSE_FIELDS + BUCKET_FIELDS:  # the file name comes from the manifest: only known names
        raise ValueError(f"{Path(out_dir) / MANIFEST}: field name {name!r} is not a Criteo field "
                         f"(C1..C26, I1_bucket..I13_bucket)")
    return np.load(Path(out_dir) / "vocab" / f"{name}.npy")


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
        codes = bucket_value_codes(values)
    else:
        arr = pa.array(values, pa.string())
        codes, valid = hex_codes_exact(arr)
        if not valid.all():
            bad = arr[int(np.flatnonzero(~valid)[0])].as_py()
            raise ValueError(f"malformed categorical value {bad!r} (expected 8 lowercase hex digits or '')")
    by_value = np.argsort(v, kind="stable")
    return lookup(codes, v[by_value], by_value.astype(np.int64), reserved).astype(np.int64)


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
            out.append("" if c == MISSING else "<1" if c == BELOW_1 else str(c))
        else:
            out.append(code_strings(v[i:i + 1])[0])
    return out


def load_criteo(out_dir: str | os.PathLike, *, sparse_int64: bool = True):
    """A prepared data set as :class:`~embcompress.data.CTRData` over memory-mapped arrays.

    Reads any folder written by :func:`~embcompress.criteo.prepare_criteo` or by
    :func:`~embcompress.csvdata.prepare_csv` (field names, name and splits come from its manifest). ``labels``
    and ``dense`` are copy-on-write memory maps (no copy, no load). ``sparse`` is stored in the smallest unsigned
    dtype; CTRData expects int64, so by default it is converted in memory: ``N * F * 8`` bytes (9.5 GB for
    Kaggle's 45.8M rows and 26 fields). ``sparse_int64=False`` keeps the memory map of the stored dtype.
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
