"""In-memory CTR data sets and whole-batch iteration.

A data set is three aligned arrays (dense float32 ``[N, n_dense]``, categorical int64 ids ``[N, F]`` ranked by
frequency within each field, labels float32 ``[N]``) and named contiguous splits. Batches are cut by slicing a
permutation, never row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

__all__ = ["CTRData", "Batch", "iterate_batches"]

_CHECK_ROWS = 1 << 20  # rows per chunk when scanning the arrays for bad values


@dataclass(frozen=True)
class Batch:
    dense: torch.Tensor  # FloatTensor[B, n_dense]
    sparse: torch.Tensor  # LongTensor[B, F]
    labels: torch.Tensor  # FloatTensor[B]

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.dense.to(device), self.sparse.to(device), self.labels.to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class CTRData:
    """A CTR data set held in memory, with contiguous ``train``/``val``/``test`` splits."""

    name: str
    dense: np.ndarray
    sparse: np.ndarray
    labels: np.ndarray
    cardinalities: tuple[int, ...]
    field_names: tuple[str, ...]
    splits: dict[str, tuple[int, int]]
    #: AUC of the true click probabilities on the test split (synthetic data only): the ceiling of any model.
    bayes_auc: float | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        if self.dense.shape[0] != n or self.sparse.shape[0] != n:
            raise ValueError(f"dense {self.dense.shape}, sparse {self.sparse.shape} and labels {self.labels.shape} "
                             "must have the same number of rows")
        if self.sparse.shape[1] != len(self.cardinalities):
            raise ValueError(f"sparse has {self.sparse.shape[1]} fields, cardinalities {len(self.cardinalities)}")
        for name, (lo, hi) in self.splits.items():
            if not 0 <= lo <= hi <= n:
                raise ValueError(f"split {name!r} = [{lo}, {hi}) is outside [0, {n}]")
        self._check_values()

    def _where(self, row: int) -> str:
        """``row`` of the arrays as the split and the row within it that a user can look up."""
        for name, (lo, hi) in sorted(self.splits.items(), key=lambda kv: kv[1]):
            if lo <= row < hi:
                return f"split {name!r} row {row - lo} (data row {row})"
        return f"data row {row}"

    def _check_values(self) -> None:
        # One NaN dense value poisons every weight it reaches and a label of 2 only fails later inside
        # scikit-learn, so both are refused here. Chunked: the arrays may be memory maps of 45M rows.
        for lo in range(0, self.labels.shape[0], _CHECK_ROWS):
            labels = np.asarray(self.labels[lo:lo + _CHECK_ROWS])
            bad = np.flatnonzero((labels != 0) & (labels != 1))
            if bad.size:
                row = lo + int(bad[0])
                raise ValueError(f"{self.name}: {self._where(row)} has label {float(labels[bad[0]])!r}; labels must be 0 or 1")
            dense = np.asarray(self.dense[lo:lo + _CHECK_ROWS])
            bad_rows, bad_cols = np.nonzero(~np.isfinite(dense))
            if bad_rows.size:
                row, col = lo + int(bad_rows[0]), int(bad_cols[0])
                raise ValueError(f"{self.name}: {self._where(row)} has dense value {float(dense[bad_rows[0], col])!r} "
                                 f"in {self._dense_name(col)}; dense values must be finite")

    def _dense_name(self, col: int) -> str:
        names = self.meta.get("manifest", {}).get("schema", {}).get("dense") if isinstance(self.meta, dict) else None
        if isinstance(names, (list, tuple)) and col < len(names):
            return f"dense column {names[col]!r} (index {col})"
        return f"dense column {col}"

    def bad_id(self, split: str, limits: Sequence[int] | None = None) -> str | None:
        """The first id of ``split`` outside its field's ``[0, limit)``, described, or None.

        ``limits``: one per field, ``-1`` for a field that takes any non-negative id (a table's ``id_limits()``);
        default: the cardinalities. Not checked at construction: hashing tables accept raw, unbounded ids whatever
        ``cardinalities`` says; training calls it when a table refuses an id, to name the data row instead of a
        shuffled batch position.
        """
        lo, hi = self.splits[split]
        card = np.asarray(self.cardinalities if limits is None else limits, dtype=np.int64)
        bounded = card >= 0
        for start in range(lo, hi, _CHECK_ROWS):
            ids = np.asarray(self.sparse[start:min(hi, start + _CHECK_ROWS)])
            rows, cols = np.nonzero((ids < 0) | (bounded & (ids >= card)))
            if rows.size:
                row, col = start + int(rows[0]), int(cols[0])
                return (f"{self.name}: {self._where(row)} has id {int(ids[rows[0], col])} in field "
                        f"{self.field_names[col]!r} (index {col}), outside [0, {int(card[col])})")
        return None

    @property
    def num_dense(self) -> int:
        return self.dense.shape[1]

    def split(self, name: str) -> Batch:
        """The whole split as CPU tensors (views of the arrays, no copy)."""
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; splits are {sorted(self.splits)}")
        lo, hi = self.splits[name]
        return Batch(
            torch.from_numpy(self.dense[lo:hi]),
            torch.from_numpy(self.sparse[lo:hi]),
            torch.from_numpy(self.labels[lo:hi]),
        )


def iterate_batches(
    data: Batch, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
) -> Iterator[Batch]:
    """Yield batches of ``batch_size`` rows (the last one smaller), in order or in a random permutation."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            idx = slice(start, start + batch_size)
            yield Batch(data.dense[idx], data.sparse[idx], data.labels[idx])
        else:
            idx = order[start : start + batch_size]
            yield Batch(data.dense[idx], data.sparse[idx], data.labels[idx])
