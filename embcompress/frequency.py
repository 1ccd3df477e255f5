"""Frequency ranks for ids that are not ranked yet: count them, rank them, and remap them inside the table.

Some methods read an id's popularity from the id itself and assume that, within each field, id 0 is the most
frequent value, id 1 the next, and so on:

* ``mixed_dim.v1`` with ``blocks_per_field = K > 1`` cuts each field into geometric id ranges
  ``[0, n ** (1/K))``, ... and gives the first (assumed most popular) ranges the widest vectors;
* ``hashing.v1`` with ``frequent=K`` gives the ids ``< K`` dedicated rows and double-hashes the rest.

On ids in any other order these methods still run, but spend their wide vectors and dedicated rows on whatever
values happen to have small ids. (``mixed_dim.v1`` with one block per field reads only the cardinalities and
does not care about the id order.) The data pipeline (``embcompress data criteo|csv``, and the synthetic data)
already assigns ids by descending frequency, so its users need nothing here. Ids from your own encoder
(scikit-learn's ``LabelEncoder``, pandas category codes: alphabetical or first-seen order) need ranking. Two ways:

1. Re-encode the data once: ``ranks = frequency_ranks(train_ids, n)``, then ``ranks[ids]`` everywhere (or
   reorder your encoder's vocabulary by ``ranks``). This stores nothing extra; prefer it when you own the encoder.
2. Wrap the table: :func:`build_frequency_ranked` (or :class:`FrequencyRanked` around a table you built) keeps
   one rank per id as a buffer and maps ``id -> rank`` (one gather) before the inner table's lookup, so encoder
   ids go straight in and the saved model carries its own remap.

Cost of the wrapper: 4 bytes per id (int32; int64 only for a field of more than ``2**31`` ids), plus 8 bytes of
offset per field. An uncompressed fp32 row is ``4 * D`` bytes, so the remap is ``1 / D`` of the full table: at
``D = 16`` it is 6% of the baseline, and at a compression ratio ``r`` it is ``r / D`` times the inner table's
bytes. Built to a budget, the remap is paid out of the budget (the inner table gets the rest), so ratios near
``D`` or beyond leave the inner table nothing: re-encode the ids instead (way 1).

>>> import numpy as np, torch
>>> frequency_ranks([4, 2, 4, 0, 2, 4], 6).tolist()  # id -> rank: 4, then 2, then 0; unseen 1, 3, 5 last
[2, 3, 1, 4, 0, 5]
>>> rng = np.random.default_rng(0)
>>> encoder = rng.permutation(1000)                  # encoder[k]: the id of the value of popularity k (Zipf)
>>> zipf = 1 / np.arange(1, 1001)
>>> train = np.stack([encoder[rng.choice(1000, 10_000, p=zipf / zipf.sum())], rng.integers(0, 3, 10_000)], 1)
>>> counts = count_ids(train, [1000, 3])             # train: [N = 10000, F = 2]; counts: int64 [n_f] per field
>>> spec = {"type": "mixed_dim.v1", "blocks_per_field": 2, "budget_bytes": 16_000}
>>> table = build_frequency_ranked(spec, counts, 16)  # LongTensor[..., 2] -> FloatTensor[..., 2, 16]
>>> table(torch.from_numpy(train[:4])).shape
torch.Size([4, 2, 16])
>>> top = torch.tensor([[int(encoder[0]), 0]])        # field 0's most frequent value gets what rank 0 gets
>>> torch.equal(table(top)[:, 0], table.inner(torch.tensor([[0, 0]]))[:, 0])
True
>>> table.remap_bytes, table.memory_report().total_bytes <= 16_000   # 4 bytes per id, 8 per field
(4028, True)
"""

from __future__ import annotations

import itertools
import numbers
import re
from collections import Counter
from typing import Any, Mapping, Sequence, Union

import numpy as np
import torch
from torch import nn

from .contract import BudgetError, CompressedEmbedding, as_cardinalities, check_positive_int
from .memory import MemoryReport, baseline_bytes, tensor_bytes
from .registry import SpecError, build_table

__all__ = [
    "FrequencyRanked", "build_frequency_ranked", "count_ids", "frequency_ranks", "ranks_from_counts",
    "remap_bytes_for",
]

ArrayLike = Union[torch.Tensor, np.ndarray, Sequence[int]]

_INT32_MAX_IDS = 2**31  # ranks of a field of at most this many ids fit in int32
_OFFSET_BYTES = 8  # one int64 offset per field
_MINIMUM = re.compile(r"minimum budget ([\d,]+) bytes")  # how BudgetError messages name the smallest budget
_COUNT_CHUNK_ROWS = 1 << 20  # count_ids reads [N, F] in row blocks: a memory-mapped array is never loaded whole


def _as_numpy(values: ArrayLike, what: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    arr = np.asarray(values)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must hold integers, got dtype {arr.dtype}")
    return arr


def _check_in_domain(ids: np.ndarray, n: int, where: str, offset: int = 0) -> None:
    # One min/max pass; only a failing array is searched for its first bad entry, for the message.
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
        flat = ids.reshape(-1)
        pos = int(np.flatnonzero((flat < 0) | (flat >= n))[0])
        raise ValueError(
            f"{where} got id {int(flat[pos])} at position {offset + pos}, outside its domain [0, {n})"
        )


def ranks_from_counts(counts: ArrayLike) -> torch.Tensor:
    """``LongTensor[n]``: the rank of each id of one field by descending count (rank 0 = most frequent).

    Ties go to the smaller id, so ids never seen (count 0) come after every seen id, in id order.
    """
    arr = _as_numpy(counts, "counts")
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array (one count per id), got shape {list(arr.shape)}")
    _check_counts(arr, "counts")
    # A stable sort of the negated counts keeps equal counts in id order.
    order = np.argsort(-arr.astype(np.int64), kind="stable")  # order[rank] = id
    ranks = np.empty(arr.size, dtype=np.int64)
    ranks[order] = np.arange(arr.size, dtype=np.int64)
    return torch.from_numpy(ranks)


def frequency_ranks(ids: ArrayLike, cardinality: int) -> torch.Tensor:
    """``LongTensor[cardinality]``: id -> rank by descending count among the observed ``ids`` of one field.

    ``ids`` (any shape) are the field's ids in the training data, each in ``[0, cardinality)``. Rank 0 is the
    most frequent id; ties go to the smaller id; unseen ids rank after all seen ones, in id order.

    >>> frequency_ranks([4, 2, 4, 0, 2, 4], 6).tolist()  # 4 is the most frequent, then 2, 0; unseen 1, 3, 5
    [2, 3, 1, 4, 0, 5]
    """
    n = check_positive_int("cardinality", cardinality)
    arr = _as_numpy(ids, "ids")
    _check_in_domain(arr, n, "frequency_ranks")
    return ranks_from_counts(np.bincount(arr.reshape(-1).astype(np.int64), minlength=n))


def count_ids(sparse: ArrayLike, cardinalities: Sequence[int]) -> list[np.ndarray]:
    """Per-field id counts of ``sparse`` ``[N, F]`` (one id per field per row): ``F`` int64 arrays ``[n_f]``.

    Reads ``sparse`` in blocks of rows, so a memory-mapped ``.npy`` is counted without loading it whole. Every id
    of field ``f`` must lie in ``[0, n_f)``.
    """
    cards = as_cardinalities(cardinalities)
    if isinstance(sparse, torch.Tensor):
        sparse = sparse.detach().cpu().numpy()
    if not isinstance(sparse, np.ndarray):
        sparse = np.asarray(sparse)
    if sparse.ndim != 2 or sparse.shape[1] != len(cards):
        raise ValueError(f"sparse must have shape [N, {len(cards)}] (one id per field), got {list(sparse.shape)}")
    if sparse.dtype == np.bool_ or not np.issubdtype(sparse.dtype, np.integer):
        raise ValueError(f"sparse must hold integer ids, got dtype {sparse.dtype}")
    counts = [np.zeros(n, dtype=np.int64) for n in cards]
    for lo in range(0, sparse.shape[0], _COUNT_CHUNK_ROWS):
        block = np.asarray(sparse[lo : lo + _COUNT_CHUNK_ROWS])
        for f, n in enumerate(cards):
            column = block[:, f]
            _check_in_domain(column, n, f"count_ids: field {f}", offset=lo)
            counts[f] += np.bincount(column.astype(np.int64), minlength=n)
    return counts


def _check_counts(arr: np.ndarray, what: str) -> None:
    if int(arr.min()) < 0:
        i = int(np.argmin(arr))
        raise ValueError(f"{what} must be non-negative, got {int(arr[i])} for id {i}")


def _as_count_list(counts) -> tuple[list[np.ndarray], bool]:
    """The per-field count arrays, and whether they describe a single table (one bare 1-D array)."""
    single = isinstance(counts, (torch.Tensor, np.ndarray))
    if single:
        fields = [counts]
    elif isinstance(counts, (str, bytes, Mapping)) or not isinstance(counts, Sequence):
        raise ValueError(f"counts must be a sequence of per-field count arrays, got {type(counts).__name__}")
    else:
        fields = list(counts)
    if not fields:
        raise ValueError("counts is empty: expected one count array per field")
    out = []
    for f, c in enumerate(fields):
        what = "counts" if single else f"counts of field {f}"
        if isinstance(c, numbers.Number):
            raise ValueError(f"{what} must be an array of per-id counts, got the number {c!r}")
        arr = _as_numpy(c, what)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(
                f"{what} must be a non-empty 1-D array (one count per id), got shape {list(arr.shape)}"
            )
        _check_counts(arr, what)
        out.append(arr)
    return out, single


def remap_bytes_for(cardinalities: int | Sequence[int]) -> int:
    """Bytes of the remap :class:`FrequencyRanked` stores for these cardinalities (ranks plus field offsets)."""
    cards = as_cardinalities(cardinalities)
    itemsize = 4 if max(cards) <= _INT32_MAX_IDS else 8
    return sum(cards) * itemsize + len(cards) * _OFFSET_BYTES


class FrequencyRanked(CompressedEmbedding):
    """Any table behind a per-field ``id -> frequency rank`` remap, for ids that are not frequency ranked.

    Shapes: ``LongTensor[..., F] -> FloatTensor[..., F, D]`` (``[...] -> [..., D]`` around a single table); ids
    of field ``f`` must lie in ``[0, n_f)`` (raw unbounded ids cannot be remapped). ``wrapper(ids)`` equals
    ``wrapper.inner(ranks[ids])`` per field. Stored on top of the inner table: ``remap`` ``[sum(n_f)]`` (every
    field's ranks, fused; int32 when every ``n_f <= 2**31``, else int64) and int64 ``remap_offsets`` ``[F]``.

    Training hooks (``sparse_parameters``, ``sgd_parameter_groups``, ``regularization_loss``) are the inner
    table's. Not in the table registry: it wraps a table rather than being a method; build it with
    :func:`build_frequency_ranked`.

    Args:
        inner: the table that receives ranks (built for the same cardinalities).
        ranks: one permutation of ``range(n_f)`` per field (e.g. :func:`frequency_ranks`): ``ranks[f][id]`` is
            the rank the inner table sees.

    >>> from embcompress.tables import MixedDimEmbedding
    >>> inner = MixedDimEmbedding([1000, 10], 8, scale=40.0, blocks_per_field=2)
    >>> ranks = [torch.arange(1000).flip(0), torch.arange(10)]   # field 0: id 999 is the most frequent
    >>> t = FrequencyRanked(inner, ranks)
    >>> torch.equal(t(torch.tensor([[999, 3]])), inner(torch.tensor([[0, 3]])))
    True
    >>> t.memory_report().total_bytes - inner.memory_report().total_bytes   # int32 ranks + int64 offsets
    4056
    """

    def __init__(self, inner: CompressedEmbedding, ranks: Sequence[ArrayLike]) -> None:
        if not isinstance(inner, CompressedEmbedding):
            raise ValueError(f"inner must be a CompressedEmbedding table, got {type(inner).__name__}")
        if isinstance(inner, FrequencyRanked):
            raise ValueError("inner is already a FrequencyRanked table; compose the two rank maps instead")
        if inner.trains_in_stages:
            # The staged fit swaps its exported table into the model in place of the table it trained.
            raise ValueError(
                f"{inner.registry_name} trains in stages and exports another table; it cannot be wrapped (and "
                "does not read popularity from the id)"
            )
        cards = inner.cardinalities
        super().__init__(cards[0] if inner.single else cards, inner.embedding_dim)
        if isinstance(ranks, (torch.Tensor, np.ndarray)) or not isinstance(ranks, Sequence):
            raise ValueError(f"ranks must be a sequence of one rank array per field, got {type(ranks).__name__}")
        if len(ranks) != self.num_fields:
            raise ValueError(f"got {len(ranks)} rank arrays for the inner table's {self.num_fields} fields")
        dtype = torch.int32 if max(cards) <= _INT32_MAX_IDS else torch.int64
        fused = []
        for f, (r, n) in enumerate(zip(ranks, cards)):
            arr = _as_numpy(r, f"ranks of field {f}")
            if arr.shape != (n,):
                raise ValueError(
                    f"ranks of field {f} must have shape [{n}] (one rank per id), got {list(arr.shape)}"
                )
            _check_in_domain(arr, n, f"ranks of field {f}")
            # In range and each rank once: a permutation, so the inner table only ever sees in-domain ranks.
            seen = np.bincount(arr.astype(np.int64), minlength=n)
            bad = np.flatnonzero(seen != 1)
            if bad.size:
                r = int(bad[0])
                raise ValueError(f"ranks of field {f} must be a permutation of range({n}); rank {r} appears "
                                 f"{int(seen[r])} times")
            fused.append(torch.from_numpy(arr.astype(np.int64)).to(dtype))
        self.inner = inner
        self.stochastic_training = inner.stochastic_training
        self.register_buffer("remap", torch.cat(fused))
        self.register_buffer(
            "remap_offsets", torch.tensor(list(itertools.accumulate(cards, initial=0))[:-1], dtype=torch.int64)
        )
        self.field_names = inner.field_names

    @property
    def remap_bytes(self) -> int:
        """Bytes this wrapper adds to the inner table: the fused ranks and their per-field offsets."""
        return tensor_bytes(self.remap) + tensor_bytes(self.remap_offsets)

    def set_field_names(self, names: Sequence[str]) -> "FrequencyRanked":
        super().set_field_names(names)
        self.inner.set_field_names(names)
        return self

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # ids were checked against [0, n_f) by the caller; their ranks are in-domain by construction.
        ranked = torch.take(self.remap, ids + self.remap_offsets[fields]).long()
        return self.inner.embed(ranked, fields)

    def rank_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """The ranks the inner table sees for ``ids`` ``LongTensor[..., F]``, validated like ``forward``'s ids."""
        ids, fields = self.checked_ids(ids)
        return torch.take(self.remap, ids + self.remap_offsets[fields]).long()

    def sparse_parameters(self) -> list[nn.Parameter]:
        return self.inner.sparse_parameters()

    def sgd_parameter_groups(self) -> list[dict]:
        return self.inner.sgd_parameter_groups()

    def row_optimizers(self, lr: float, *, seed: int = 0) -> list[torch.optim.Optimizer]:
        return self.inner.row_optimizers(lr, seed=seed)

    def regularization_loss(self) -> torch.Tensor | None:
        return self.inner.regularization_loss()

    def memory_report(self, optimizers: Sequence[torch.optim.Optimizer] = ()) -> MemoryReport:
        """The inner table's report plus the remap's buffers (same baseline: the wrapper adds no rows)."""
        report = self.inner.memory_report(optimizers)
        buffers = Counter(report.buffers)
        remap = 0
        for t in (self.remap, self.remap_offsets):
            buffers[str(t.dtype).removeprefix("torch.")] += tensor_bytes(t)
            remap += tensor_bytes(t)
        return MemoryReport(parameters=dict(report.parameters), buffers=dict(buffers),
                            baseline_bytes=baseline_bytes(self.cardinalities, self.embedding_dim),
                            optimizer_state=dict(report.optimizer_state),
                            serving=None if report.serving is None else report.serving + remap)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, remap={str(self.remap.dtype).removeprefix('torch.')}"


def build_frequency_ranked(
    spec: Mapping[str, Any],
    counts: Sequence[ArrayLike] | ArrayLike,
    embedding_dim: int,
    *,
    field_names: Sequence[str] | None = None,
) -> FrequencyRanked:
    """The table ``spec`` (built as :func:`embcompress.build_table` builds it) behind the ranks of ``counts``.

    ``counts`` holds one array of per-id counts per field (e.g. :func:`count_ids` of the training ids), so
    ``n_f = len(counts[f])``; one bare 1-D array builds around a single table. With ``budget_bytes`` in the spec,
    the remap is part of the budget: the inner table is built to ``budget_bytes - remap_bytes``, so the whole
    table stores at most ``budget_bytes``; :class:`BudgetError` when what is left cannot hold the inner table.
    """
    if not isinstance(spec, Mapping):
        raise SpecError(f"a table spec must be a mapping with a 'type' key, got {spec!r}")
    fields, single = _as_count_list(counts)
    cards = [int(c.size) for c in fields]
    cardinalities: int | list[int] = cards[0] if single else cards
    inner_spec = dict(spec)
    if "budget_bytes" in inner_spec:
        budget = CompressedEmbedding._check_budget(inner_spec["budget_bytes"])
        remap = remap_bytes_for(cardinalities)
        if remap >= budget:
            raise BudgetError(
                f"frequency-ranked {spec.get('type')!r}: the id remap alone takes {remap:,} bytes (4 per id, 8 "
                f"per field), over the budget of {budget:,} bytes; minimum budget {remap:,} bytes plus the inner "
                "table"
            )
        inner_spec["budget_bytes"] = budget - remap
        try:
            inner = build_table(inner_spec, cardinalities, embedding_dim, field_names=field_names)
        except BudgetError as e:
            # Name the whole table's minimum when the inner message states its own (the methods' messages do).
            found = _MINIMUM.search(str(e))
            total = (f"minimum budget {int(found.group(1).replace(',', '')) + remap:,} bytes with the remap"
                     if found else f"the minimum is the inner table's plus {remap:,} bytes")
            raise BudgetError(
                f"frequency-ranked {spec.get('type')!r}: after the id remap's {remap:,} bytes, {budget - remap:,} "
                f"of the {budget:,}-byte budget are left for the inner table, too few ({total}): {e}"
            ) from e
    else:
        inner = build_table(inner_spec, cardinalities, embedding_dim, field_names=field_names)
    return FrequencyRanked(inner, [ranks_from_counts(c) for c in fields])
