"""In-memory CTR data sets and whole-batch iteration.

A data set is three aligned arrays (dense float32 ``[N, n_dense]``, categorical int64 ids ``[N, F]`` ranked by
frequency within each field, labels float32 ``[N]``) and named contiguous splits. Batches are cut by slicing a
permutation, never row by row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

__all__ = ["CTRData", "Batch", "iterate_batches"]


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
