"""``qr.v1``: compositional embeddings from complementary partitions (the quotient-remainder trick).

Shi, Mudigere, Naumov & Yang, "Compositional Embeddings Using Complementary Partitions for Memory-Efficient
Recommendation Systems", KDD 2020.

Each id ``x`` of a field with ``n`` ids is split into ``k`` partition indices (a *complementary* set: no two ids
in ``[0, n)`` share all ``k`` of them), each indexes a small table, and the ``k`` rows are combined into one
vector. Partition ``j`` of ``x`` is ``(x // divisor_j) % modulus_j``, in exact int64 arithmetic (never float
division, which returns wrong rows above 2**24). The collision knob ``c`` sets the moduli:

* ``scheme="qr"`` (mixed radix): ``modulus = (c, ..., c, ceil(n / c**(k-1)))`` with ``divisor_j`` the product of
  the earlier moduli. For ``k = 2`` this is the paper's quotient-remainder trick: ``r = x % c`` in a table of
  ``c`` rows and ``q = x // c`` in a table of ``ceil(n / c)`` rows; ``c`` ids share each quotient row.
* ``scheme="crt"`` (Chinese remainder): ``x % m_j`` with pairwise coprime ``m_j``: the ``k - 1`` smallest
  pairwise coprime ints from ``c`` up, then the smallest int coprime to them that makes the product reach ``n``.

Rows combine by ``operation``: ``"mult"`` (elementwise product, the paper's default), ``"add"``, or ``"concat"``
(the ``k`` rows have sub-widths summing to ``D``: ``D // k``, the first ``D % k`` of them one wider). Memory is
about ``k * n**(1/k)`` rows per field at the smallest (``c ~ n**(1/k)``), so very high ratios are out of reach for
small vocabularies. Fields with at most ``threshold`` ids keep a full table.

Layout: every sub-table of every field lives in one fused fp32 weight (for ``concat`` with ``D % k != 0``, two:
one per sub-width), addressed by per-(field, partition) row offsets, so a batch is one integer kernel computing
all ``[..., k]`` rows and one gather. A full field stores its ``n`` rows once: for ``mult``/``add`` in its
partition 0, its other partitions read the same rows and are masked out of the combination; for ``concat`` each
partition holds the field's ``n`` rows of its sub-width, so the concatenation is exactly a full row of ``D``.

Multi-hot bags are composed per id and then pooled (``sum_i q_i * r_i`` for ``mult``), which is what the base
class's ``forward_bags`` does. The public DLRM code pools each sub-table first, which for ``mult`` gives
``(sum_i q_i) * (sum_i r_i)``: a different, cross-multiplied function of the bag.
"""

from __future__ import annotations

import itertools
import math
import numbers
from typing import Sequence

import torch
from torch import nn

from embcompress.fused import FusedRows, check_fused_optimizer
from embcompress.contract import (
    BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_choice, check_int, check_per_field,
    init_rows_, resolve_init_std,
)
from embcompress.validate import owner_name
from embcompress.quantize import check_precision
from embcompress.registry import TABLES

__all__ = ["QREmbedding", "partition_plan", "partition_indices", "sub_dims"]

SCHEMES = ("qr", "crt")
OPERATIONS = ("mult", "add", "concat")


def partition_plan(n: int, collisions: int, scheme: str = "qr", partitions: int = 2) -> tuple[tuple[int, ...], ...]:
    """``(divisors, moduli)`` of the ``partitions`` partitions of ``[0, n)`` for the collision knob ``c``.

    Partition ``j`` of an id ``x`` is ``(x // divisors[j]) % moduli[j]``; the product of the moduli is at least
    ``n`` and (for ``crt``) they are pairwise coprime, so every id keeps a unique combination. ``c`` is capped
    at ``n ** (1 / (k - 1))`` (``n`` for ``k = 2``): beyond it a partition would hold rows that no id reads.
    Pure Python on ints: usable without any table or device.
    """
    for name, value, least in (("n", n, 1), ("collisions", collisions, 1), ("partitions", partitions, 2)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    k = int(partitions)
    c = min(int(collisions), _iroot(int(n), k - 1))
    if scheme == "qr":
        moduli = [c] * (k - 1)
        moduli.append(max(1, -(-n // c ** (k - 1))))
        divisors = list(itertools.accumulate(moduli[:-1], lambda a, b: a * b, initial=1))
        return tuple(divisors), tuple(moduli)
    if scheme == "crt":
        moduli = []
        m = c
        while len(moduli) < k - 1:
            if all(math.gcd(m, p) == 1 for p in moduli):
                moduli.append(m)
            m += 1
        m = max(1, -(-n // math.prod(moduli)))
        while not all(math.gcd(m, p) == 1 for p in moduli):
            m += 1
        moduli.append(m)
        return (1,) * k, tuple(moduli)
    raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")


def _iroot(n: int, k: int) -> int:
    """The largest ``r >= 1`` with ``r ** k <= n``, exactly (floats only for the first guess)."""
    r = max(1, int(round(n ** (1.0 / k))))
    while r > 1 and r**k > n:
        r -= 1
    while (r + 1) ** k <= n:
        r += 1
    return r


def partition_indices(ids: torch.Tensor, divisors: torch.Tensor, moduli: torch.Tensor) -> torch.Tensor:
    """``LongTensor[...]`` ids -> ``LongTensor[..., k]`` partition indices ``(ids // divisors) % moduli``.

    ``divisors`` and ``moduli`` are int64 ``[..., k]`` broadcastable against ``ids[..., None]``. Integer
    arithmetic throughout, exact for every int64 id.
    """
    return torch.div(ids.unsqueeze(-1), divisors, rounding_mode="floor") % moduli


def sub_dims(embedding_dim: int, partitions: int, operation: str) -> tuple[int, ...]:
    """Width of the rows of each partition: ``D`` for ``mult``/``add``; for ``concat`` ``D // k``, the first
    ``D % k`` partitions one wider, summing to ``D``."""
    if operation != "concat":
        return (embedding_dim,) * partitions
    d, r = divmod(embedding_dim, partitions)
    return (d + 1,) * r + (d,) * (partitions - r)


def _check_options(embedding_dim, scheme, partitions, operation, threshold, *, owner="qr.v1") -> None:
    check_choice("scheme", scheme, SCHEMES, owner=owner)
    check_int("partitions", partitions, lo=2, hi=16, owner=owner)
    check_choice("operation", operation, OPERATIONS, owner=owner)
    if operation == "concat" and isinstance(embedding_dim, numbers.Integral) and embedding_dim < partitions:
        raise ValueError(
            f"{owner_name(owner)}: operation='concat' splits embedding_dim={embedding_dim} over "
            f"partitions={partitions}; it needs embedding_dim >= partitions"
        )
    check_int("threshold", threshold, lo=0, owner=owner)


@TABLES.register("qr.v1")
class QREmbedding(CompressedEmbedding):
    """Compositional embeddings: ``k`` small tables per field, one row of each combined per id.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored: ``weight`` ``[R, D]`` fp32 (``[R, D // k]`` for ``concat``, plus ``weight_wide``
    ``[R', D // k + 1]`` holding the first ``D % k`` partitions when ``D % k != 0``), and int64 ``[F, k]``
    buffers ``divisors``, ``moduli``, ``offsets`` (partition ``j`` of field ``f`` reads row
    ``offsets[f, j] + (id // divisors[f, j]) % moduli[f, j]``), plus a bool ``[F]`` ``full`` flag. ``plans``
    holds the same ``(divisors, moduli)`` per field as Python ints (also on the ``meta`` device), and
    :meth:`partition_rows` returns the ``[..., k]`` rows of a batch.

    Args:
        collisions: the knob ``c`` (one int, or one per field; default 4 as in DLRM): for ``k = 2`` with
            ``scheme="qr"``, the quotient divisor, i.e. the number of ids sharing each quotient row. Memory falls as
            ``c`` grows up to about ``n**(1/k)``; it is capped at ``n_f ** (1 / (k - 1))``.
        scheme: ``"qr"`` (mixed radix; the quotient-remainder trick for ``k = 2``) or ``"crt"`` (Chinese
            remainder, pairwise coprime moduli).
        partitions: ``k``, the number of complementary partitions (tables) per field, 2 to 16.
        operation: ``"mult"`` (elementwise product), ``"add"`` or ``"concat"`` (needs ``D >= k``).
        threshold: fields with at most this many ids keep a full table (default 200, as in the paper).
        sparse: sparse gradients for the weights (use with ``torch.optim.SparseAdam``).
        precision: the precision its row tables are served at (:mod:`embcompress.quantize`: fp32, fp16, bf16,
            int8, int4): trained in fp32, returned at that precision in eval mode and by :meth:`export`,
            and counted so in serving bytes and budgets.
        train_quantized: hold the rows at ``precision`` (int8 or int4) while training too, updated by
            row-wise Adagrad with stochastic rounding (:mod:`embcompress.lowp`); no fp32 master is kept.
        init_std: std of the composed vectors at initialisation (``None``: the library default); the sub-table
            rows start at the scale that gives it (see the comment in ``__init__``).

    >>> import torch
    >>> t = QREmbedding([10**6, 50], 8, collisions=1000)  # field 0: 1000 + 1000 rows; field 1: full
    >>> t(torch.tensor([[999_999, 49], [0, 0]])).shape
    torch.Size([2, 2, 8])
    >>> t.weight.shape
    torch.Size([2050, 8])
    """

    row_parameters = ('weight', 'weight_wide')  # stored at `precision` when served

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        collisions: int | Sequence[int] = 4,
        scheme: str = "qr",
        partitions: int = 2,
        operation: str = "mult",
        threshold: int = 200,
        sparse: bool = False,
        precision: str = "fp32",
        train_quantized: bool = False,
        fused_optimizer: str | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        _check_options(embedding_dim, scheme, partitions, operation, threshold, owner=self)
        self.init_std = s = resolve_init_std(init_std, embedding_dim, owner=self)
        c_per_field = check_per_field("collisions", collisions, self.num_fields, owner=self)
        k = int(partitions)
        self.scheme, self.partitions, self.operation = scheme, k, operation
        self.threshold, self.sparse = int(threshold), check_bool("sparse", sparse, owner=self)
        self.precision = check_precision(precision, owner=self)
        self.train_quantized = check_bool("train_quantized", train_quantized, owner=self)
        self.fused_optimizer = check_fused_optimizer(fused_optimizer, owner=self)
        dims = sub_dims(embedding_dim, k, operation)
        wide = embedding_dim % k if operation == "concat" else 0  # partitions 0..wide-1 live in weight_wide
        self.num_wide = wide

        full = [n <= self.threshold for n in self.cardinalities]
        plans = []  # per field: (divisors, moduli), Python ints, also for meta-device tables
        for n, c, is_full in zip(self.cardinalities, c_per_field, full):
            plans.append(((1,) * k, (n,) * k) if is_full else partition_plan(n, c, scheme, k))
        self.plans: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = tuple(plans)

        # Row offsets: a running count per fused weight (0: weight, 1: weight_wide). A full field's mult/add
        # partitions 1..k-1 point at its partition-0 rows and are masked out in embed(): no extra storage.
        count = [0, 0]
        offsets, full_ranges = [], []
        for n, is_full, (_, moduli) in zip(self.cardinalities, full, plans):
            row = []
            for j, m in enumerate(moduli):
                w = 1 if j < wide else 0
                if is_full and operation != "concat" and j > 0:
                    row.append(row[0])
                    continue
                row.append(count[w])
                if is_full:
                    full_ranges.append((w, count[w], n))
                count[w] += m
            offsets.append(row)

        # Init so composed vectors have std s = init_std: a product of k independent zero-mean factors of std t
        # has std t**k, so mult uses t = s**(1/k); a sum of k has std sqrt(k) t, so add uses t = s / sqrt(k);
        # concat parts are entries of the output, so t = s. Full fields' rows are used alone and get s.
        std = {"mult": s ** (1.0 / k), "add": s / k**0.5, "concat": s}[operation]
        weights = [torch.empty(count[0], dims[-1]), torch.empty(count[1], dims[0]) if wide else None]
        with torch.no_grad():
            for w in weights:
                if w is not None:
                    init_rows_(w, std)
            for w, start, n in full_ranges:
                init_rows_(weights[w][start : start + n], s)
        self.weight = nn.Parameter(weights[0])
        self.register_parameter("weight_wide", nn.Parameter(weights[1]) if wide else None)

        self.register_buffer("divisors", torch.tensor([p[0] for p in plans], dtype=torch.int64))
        self.register_buffer("moduli", torch.tensor([p[1] for p in plans], dtype=torch.int64))
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        self.register_buffer("full", torch.tensor(full, dtype=torch.bool))
        self._divide = any(d != 1 for p in plans for d in p[0])  # crt and all-full tables skip the division
        self._mask_full = operation != "concat" and any(full) and not all(full)
        self._all_full = all(full)

    # ---------------------------------------------------------------------------------------------- forward
    def partition_rows(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """Rows of the fused weight(s) read by each id: ``LongTensor[..., k]`` (partition offsets included)."""
        x = ids.unsqueeze(-1)
        if self._divide:
            x = torch.div(x, self.divisors[fields], rounding_mode="floor")
        return x % self.moduli[fields] + self.offsets[fields]

    def _rows_partition_first(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        # partition_rows laid out [k, ...]: the k gathered slices are then contiguous, which makes the
        # product/sum and the full-field select several times faster than on strided [..., j, :] views.
        shape = (self.partitions,) + (1,) * (ids.dim() - fields.dim()) + tuple(fields.shape)
        x = ids.unsqueeze(0)
        if self._divide:
            x = torch.div(x, self.divisors.t()[:, fields].view(shape), rounding_mode="floor")
        return x % self.moduli.t()[:, fields].view(shape) + self.offsets.t()[:, fields].view(shape)

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        if self.operation == "concat":
            rows = self.partition_rows(ids, fields)
            parts = self.read_rows(self.weight, rows[..., self.num_wide :]).flatten(-2)
            if self.num_wide:
                wide = self.read_rows(self.weight_wide, rows[..., : self.num_wide]).flatten(-2)
                parts = torch.cat([wide, parts], dim=-1)
            return parts
        if self._all_full:
            return self.read_rows(self.weight, self.partition_rows(ids, fields)[..., 0])
        # unbind, not g[j]: each select's backward would write a zero-filled copy of the whole [k, ..., D] block.
        rows = self._rows_partition_first(ids, fields)
        if isinstance(self.weight, FusedRows):  # a kernel call per partition (disjoint rows): no stacked gradient
            first, *rest = (self.read_rows(self.weight, r) for r in rows.unbind(0))
        else:
            first, *rest = self.read_rows(self.weight, rows).unbind(0)
        add = self.operation == "add"
        if self._mask_full:
            # Full fields take their partition-0 row alone: the other partitions' rows are replaced by the
            # operation's exact identity (x * 1.0 and x + -0.0 are x bit for bit, -0.0 and overflow included), so
            # they get no gradient; masking these [..., D] factors is cheaper than selecting the result.
            full = self.full[fields].unsqueeze(-1)
            rest = [torch.where(full, -0.0 if add else 1.0, g) for g in rest]
        out = first
        for g in rest:  # explicit products: torch.prod's backward takes a slower zero-safe path
            out = out + g if add else out * g
        return out

    def sparse_parameters(self) -> list[nn.Parameter]:
        if not self.sparse:
            return []
        return [self.weight] + ([self.weight_wide] if self.weight_wide is not None else [])

    # ---------------------------------------------------------------------------------------------- budget
    budget_keys = ("collisions",)

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim, *, scheme: str = "qr", partitions: int = 2,
                    operation: str = "mult", threshold: int = 200, **options) -> BudgetKnob:
        """The knob is one collision level ``c`` for every compressed field, each capped at its
        memory-minimising value; what the solved level leaves of the budget is then spent field by field on
        fewer collisions (largest fields first for big steps, then smallest first for fine ones; the closest
        to the budget of a few such fills is kept)."""
        _check_options(embedding_dim, scheme, partitions, operation, threshold)
        cards = list(as_cardinalities(cardinalities))
        dims = sub_dims(embedding_dim, partitions, operation)

        def cost(n: int, c: int) -> int:  # bytes of a compressed field's sub-tables
            return 4 * sum(m * d for m, d in zip(partition_plan(n, c, scheme, partitions)[1], dims))

        qr = [f for f, n in enumerate(cards) if n > threshold]
        best = {f: _cheapest(lambda c, n=cards[f]: cost(n, c), cards[f], partitions) for f in qr}

        def level(c) -> dict[int, int]:
            return {f: min(int(c), best[f]) for f in qr}

        def kwargs(cs: dict[int, int]) -> dict:
            return {"collisions": [cs.get(f, 1) for f in range(len(cards))]}

        def refine(c, budget: int) -> dict:
            # Bytes outside the compressed fields' sub-tables (full fields, buffers), measured once.
            fixed = cls.planned_bytes(cardinalities, embedding_dim, scheme=scheme, partitions=partitions,
                                      operation=operation, threshold=threshold, **options, **kwargs(level(c)))
            fixed -= sum(cost(cards[f], cf) for f, cf in level(c).items())

            def total(cs: dict[int, int]) -> int:
                return fixed + sum(cost(cards[f], cf) for f, cf in cs.items())

            def fill(cs: dict[int, int], order: list[int]) -> dict[int, int]:
                cs = dict(cs)
                for f in order:
                    slack = budget - total(cs)
                    if slack < 0:
                        break
                    cs[f] = _fewest_collisions(lambda x, n=cards[f]: cost(n, x), cs[f], cost(cards[f], cs[f]) + slack)
                return cs

            by_size = sorted(qr, key=lambda f: -cards[f])
            tries = [fill(level(x), order) for x in range(int(c), int(c) + 4)
                     for order in (by_size, by_size[::-1] + by_size)]
            tries = [cs for cs in tries if total(cs) <= budget] or [level(c)]
            return kwargs(max(tries, key=total))

        return BudgetKnob("collisions", 1, max(best.values(), default=1), lambda c: kwargs(level(c)),
                          grows=False, refine=refine)

    def extra_repr(self) -> str:
        rows = self.weight.shape[0] + (self.weight_wide.shape[0] if self.weight_wide is not None else 0)
        return (
            f"{super().extra_repr()}, scheme={self.scheme!r}, partitions={self.partitions}, "
            f"operation={self.operation!r}, threshold={self.threshold}, rows={rows}, sparse={self.sparse}"
        )


def _cheapest(cost, n: int, k: int) -> int:
    """The collision knob with the smallest footprint (fewest collisions among ties), searched around
    ``n**(1/k)``: a coarse geometric scan over [root/4, 4 root], then every c near the best."""
    root = n ** (1.0 / k)
    grid = {max(1, min(n, int(root * 1.02**i))) for i in range(-70, 71)}
    c0 = min(sorted(grid), key=cost)
    span = max(8, c0 // 40)
    near = range(max(1, c0 - span), min(n, c0 + span) + 1)
    return min(near, key=lambda c: (cost(c), c))


def _fewest_collisions(cost, c_max: int, limit: int) -> int:
    """The smallest ``c`` in ``[1, c_max]`` whose cost is at most ``limit`` (``cost(c_max) <= limit``), by
    bisection on a cost that falls with ``c`` over this range (up to rounding wiggles, which it tolerates)."""
    if cost(1) <= limit:
        return 1
    lo, hi = 1, c_max  # cost(lo) > limit >= cost(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if cost(mid) <= limit:
            hi = mid
        else:
            lo = mid
    return hi
