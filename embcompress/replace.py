"""Swap the ``nn.Embedding`` / ``nn.EmbeddingBag`` tables of an existing model for compressed ones, in one call.

What: :func:`replace_embeddings` walks a model, finds every ``nn.Embedding`` and ``nn.EmbeddingBag`` with more
than ``min_rows`` rows, and puts in its place (on its parent module, also inside ``ModuleDict``, ``ModuleList``
and ``Sequential``) a compressed table of the same width built to a byte budget with
:func:`embcompress.build_table`. Smaller tables are kept as they are. It returns a :class:`ReplaceReport` with
the exact bytes before and after of every table.

Why: most CTR and recommender models are written against ``torch.nn`` (DeepCTR-style ``ModuleDict`` of
embeddings, DLRM-style ``EmbeddingBag`` lists); their embedding tables are almost all of their memory. This
turns such a model into a compressed one without touching its code, so a method can be tried on the model as
it is.

The replacement is a drop-in for what it replaces:

* ``nn.Embedding`` -> the table itself (built with one cardinality): ``LongTensor[...] -> FloatTensor[..., D]``.
* ``nn.EmbeddingBag`` -> :class:`CompressedEmbeddingBag`, with ``nn.EmbeddingBag.forward(input, offsets=None,
  per_sample_weights=None)``: 2-D ``input`` ``[B, L]`` (fixed-length bags) or 1-D ``input`` with ``offsets``
  (``include_last_offset`` too), ``mode`` ``"sum"``, ``"mean"`` or ``"max"``, ``per_sample_weights`` in sum mode
  (as torch allows) -> ``FloatTensor[B, D]``.

What carries over from the host table: its width, dtype (the new table is cast with ``.to(dtype)`` and checked to
run in it), device, train/eval mode, and its initialisation scale: the new table is built with
``init_std = host.weight.std()`` (over all rows), so the vectors it returns start at the scale the model was
written for (DeepCTR's ``1e-4``, torch's default ``1``). ``sparse=True`` on the host maps to the method's
``sparse`` option where it has one (the host's optimizer is then presumably a sparse one already; note that
some methods, such as ``mixed_dim.v1``'s projections, also hold dense parameters). What it cannot honour it
refuses before changing anything, naming the module and the option: ``padding_idx``, ``max_norm``,
``scale_grad_by_freq``, a frozen weight (``requires_grad=False``: a pretrained table, which the fresh
compressed table would silently forget), a weight shared with another module (tied weights), a non-float dtype
the method cannot run in. The new tables are freshly initialised: trained rows are not transferred, so call
this before training. Subclasses of ``nn.Embedding`` / ``nn.EmbeddingBag`` are kept (listed in the report), since
they usually exist to change ``forward``. One difference remains: hashing-based tables (``hashing.v1``,
``unified.v1``, ``hash_embedding.v1``) accept ids at or above ``num_embeddings`` (raw ids) where
``nn.Embedding`` raises; negative ids raise in every table.

Budgets. Give exactly one of ``ratio`` or ``budget_bytes``. Bytes are the bytes the tables store in the host's
dtype (``rows * D * element_size`` before; ``memory_report().total_bytes`` of the cast table after, every
parameter and buffer counted). ``ratio=r`` builds each table within its own bytes / ``r``; ``budget_bytes=N``
splits ``N`` over the swapped tables in proportion to their bytes, so the built tables hold at most ``N`` bytes
in all. Budgets mean "at most": each table is the largest its method builds within its share
(``BudgetError`` naming the module and the minimum when not even the smallest one fits).

Frequency-ranked ids. Some methods read popularity from the id itself and assume id 0 is a table's most
frequent value: ``mixed_dim.v1`` with ``blocks_per_field > 1`` and ``hashing.v1`` with ``frequent=K``. If your
model's ids are not ranked by frequency (a ``LabelEncoder``'s alphabetical codes), rank them first with
:mod:`embcompress.frequency` (``frequency_ranks``), or these methods spend their wide rows on arbitrary ids.

>>> import torch
>>> from embcompress.replace import replace_embeddings
>>> _ = torch.manual_seed(0)
>>> model = torch.nn.ModuleDict({"user": torch.nn.Embedding(100_000, 16), "item": torch.nn.Embedding(20_000, 16),
...                              "country": torch.nn.Embedding(50, 16)})
>>> report = replace_embeddings(model, method="hashing.v1", ratio=10)
>>> print(report.summary())
hashing.v1: replaced 2 tables, 7,680,000 -> 767,922 bytes (10.00x); kept 1 (3,200 bytes)
>>> model["user"](torch.tensor([[3, 99_999]])).shape      # LongTensor[B, L] -> FloatTensor[B, L, 16]
torch.Size([1, 2, 16])
>>> print(report)
path     kind       rows     dim  dtype    bytes before  bytes after  ratio   init std
user     Embedding  100,000  16   float32  6,400,000     639,961      10.00x  1
item     Embedding  20,000   16   float32  1,280,000     127,961      10.00x  1
country  Embedding  50       16   float32  3,200         kept: 50 rows <= min_rows 200
total                                      7,683,200     771,122      9.96x

An ``nn.EmbeddingBag`` becomes a :class:`CompressedEmbeddingBag` with the same call:

>>> bags = torch.nn.ModuleList([torch.nn.EmbeddingBag(5_000, 8, mode="mean")])
>>> print(replace_embeddings(bags, method={"type": "qr.v1", "operation": "add"}, budget_bytes=40_000).summary())
qr.v1: replaced 1 table, 160,000 -> 32,209 bytes (4.97x)
>>> bags[0](torch.tensor([1, 2, 4_999, 7]), torch.tensor([0, 3])).shape   # 1-D ids + offsets -> [B, D]
torch.Size([2, 8])
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .budget import BudgetError
from .contract import check_seed, resolve_init_std
from .registry import TABLES, SpecError, build_table, list_tables

__all__ = ["replace_embeddings", "ReplaceReport", "ReplacedTable", "KeptTable", "CompressedEmbeddingBag",
           "BAG_MODES"]

#: Pooling modes :class:`CompressedEmbeddingBag` supports (all of ``nn.EmbeddingBag``'s).
BAG_MODES = ("sum", "mean", "max")

_MINIMUM = re.compile(r"minimum budget ([\d,]+) bytes")  # how BudgetError messages name the smallest budget
_SEED_LIMIT = 2**31


# ------------------------------------------------------------------------------------------------ bag adapter
class CompressedEmbeddingBag(nn.Module):
    """An ``nn.EmbeddingBag`` look-alike over a compressed single table (built with one cardinality).

    ``forward(input, offsets=None, per_sample_weights=None) -> FloatTensor[B, D]``, as ``nn.EmbeddingBag``:

    * ``input`` ``LongTensor[B, L]``: ``B`` bags of ``L`` ids each (``offsets`` must be None);
    * ``input`` ``LongTensor[N]`` with ``offsets`` ``LongTensor[B]`` (bag ``b`` is ``input[offsets[b]:
      offsets[b+1]]``, the last one runs to ``N``), or ``[B + 1]`` with ``include_last_offset=True`` (bag ``b`` ends
      at ``offsets[b + 1]``; ids after ``offsets[-1]`` are ignored, as torch does);
    * ``per_sample_weights``: one weight per id, ``input``'s shape, ``mode="sum"`` only.

    ``"sum"`` and ``"mean"`` pool through the table's ``forward_bags`` (empty bags give zeros); ``"max"`` takes the
    coordinate-wise maximum of the bag's vectors (``scatter_reduce`` ``amax``; empty bags give zeros; tied
    maxima share the gradient, where torch gives it to one of them).

    Args:
        table: a :class:`~embcompress.CompressedEmbedding` built with one int cardinality.
        mode: ``"sum"``, ``"mean"`` or ``"max"``.
        include_last_offset: ``offsets`` has ``B + 1`` entries, the last one the end of the last bag.
    """

    def __init__(self, table: nn.Module, *, mode: str = "mean", include_last_offset: bool = False) -> None:
        super().__init__()
        if mode not in BAG_MODES:
            raise ValueError(f"mode must be one of {BAG_MODES}, got {mode!r}")
        if not getattr(table, "single", False) or getattr(table, "num_fields", 1) != 1:
            raise ValueError("CompressedEmbeddingBag needs a table built with one int cardinality (a single table)")
        self.table = table
        self.mode = mode
        self.include_last_offset = bool(include_last_offset)
        self.num_embeddings = int(table.cardinalities[0])
        self.embedding_dim = int(table.embedding_dim)

    def memory_report(self):
        """The wrapped table's exact bytes (the adapter stores nothing)."""
        return self.table.memory_report()

    def _bags(self, input: torch.Tensor, offsets: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(values, lengths [B], used)``: the ids that are pooled, the bag lengths and how many ids are read."""
        if input.dim() == 2:
            if offsets is not None:
                raise ValueError("if input is 2-D [B, L] (fixed-length bags), offsets must be None, got a tensor")
            batch, length = input.shape
            lengths = torch.full((batch,), length, dtype=torch.int64, device=input.device)
            return input.reshape(-1), lengths, input.numel()
        if input.dim() != 1:
            raise ValueError(f"input must be 1-D (with offsets) or 2-D [B, L], got shape {list(input.shape)}")
        if offsets is None:
            raise ValueError("a 1-D input needs offsets (the start of each bag), got None")
        if not isinstance(offsets, torch.Tensor) or offsets.dim() != 1:
            raise ValueError(f"offsets must be a 1-D tensor, got {offsets!r}")
        if offsets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"offsets must be int64 (or int32), got dtype {offsets.dtype}")
        offsets = offsets.long()
        n = input.numel()
        if self.include_last_offset:
            if offsets.numel() == 0:
                raise ValueError("include_last_offset=True needs at least one offset (the end of the last bag)")
            starts, ends = offsets[:-1], offsets[1:]
        else:
            starts, ends = offsets, torch.cat([offsets[1:], offsets.new_full((1,), n)])
        if offsets.numel():
            first, last = int(offsets[0]), int(offsets[-1])
            if first != 0:
                raise ValueError(f"offsets[0] must be 0 (the first bag starts at position 0), got {first}")
            if last > n:
                raise ValueError(f"offsets[-1] = {last} is beyond the input's length {n}")
            if bool((offsets[1:] < offsets[:-1]).any()):
                raise ValueError(f"offsets must be non-decreasing, got {offsets.tolist()[:20]}")
        used = int(ends[-1]) if ends.numel() else 0
        return input[:used], ends - starts, used

    def forward(self, input: torch.Tensor, offsets: torch.Tensor | None = None,
                per_sample_weights: torch.Tensor | None = None) -> torch.Tensor:
        if not isinstance(input, torch.Tensor):
            raise ValueError(f"input must be a LongTensor, got {type(input).__name__}")
        values, lengths, used = self._bags(input, offsets)
        weights = None
        if per_sample_weights is not None:
            if self.mode != "sum":
                raise ValueError(f"per_sample_weights is only supported for mode='sum' (as in nn.EmbeddingBag), "
                                 f"this bag pools with mode={self.mode!r}")
            if per_sample_weights.shape != input.shape:
                raise ValueError(f"per_sample_weights must have the input's shape {list(input.shape)}, "
                                 f"got {list(per_sample_weights.shape)}")
            weights = per_sample_weights.reshape(-1)[:used]
        batch = lengths.shape[0]
        if self.mode != "max":
            return self.table.forward_bags(values, lengths.view(1, batch), mode=self.mode, weights=weights)[:, 0]
        vectors = self.table(values)  # [N, D]
        bag = torch.repeat_interleave(torch.arange(batch, device=values.device), lengths)
        index = bag.unsqueeze(-1).expand(-1, self.embedding_dim)
        out = vectors.new_zeros(batch, self.embedding_dim)
        return out.scatter_reduce(0, index, vectors, reduce="amax", include_self=False)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, mode={self.mode!r}, "
                f"include_last_offset={self.include_last_offset}")


# ---------------------------------------------------------------------------------------------------- report
@dataclass
class ReplacedTable:
    """One swapped module: where it was, what it held, and the exact bytes of what replaced it."""

    path: str
    kind: str  # "Embedding" or "EmbeddingBag"
    rows: int
    dim: int
    dtype: str
    bytes_before: int  # rows * dim * element_size of the host weight
    bytes_after: int  # memory_report().serving_bytes of the new (cast) table
    budget_bytes: int  # this table's share of the budget
    init_std: float  # the host weight's std, the new table's init_std
    method: str
    sparse: bool = False  # the new table has sparse gradients
    aliases: tuple[str, ...] = ()  # other paths of the same module instance (replaced by the same table)
    module: nn.Module | None = field(default=None, repr=False, compare=False)

    @property
    def ratio(self) -> float:
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")


@dataclass
class KeptTable:
    """One embedding module left as it was, and why."""

    path: str
    kind: str
    rows: int
    dim: int
    dtype: str
    bytes: int
    reason: str


@dataclass
class ReplaceReport:
    """What :func:`replace_embeddings` did: the swapped tables (exact bytes) and the ones it kept."""

    method: str
    replaced: list[ReplacedTable]
    kept: list[KeptTable]
    ratio_target: float | None = None
    budget_bytes: int | None = None

    @property
    def bytes_before(self) -> int:
        """Bytes the swapped tables held."""
        return sum(r.bytes_before for r in self.replaced)

    @property
    def bytes_after(self) -> int:
        """Exact bytes of the tables that replaced them."""
        return sum(r.bytes_after for r in self.replaced)

    @property
    def kept_bytes(self) -> int:
        return sum(k.bytes for k in self.kept)

    @property
    def ratio(self) -> float:
        """Compression ratio of the swapped tables: bytes before / bytes after."""
        return self.bytes_before / self.bytes_after if self.bytes_after else float("inf")

    @property
    def total_ratio(self) -> float:
        """Ratio over every embedding module found, kept ones included."""
        after = self.bytes_after + self.kept_bytes
        return (self.bytes_before + self.kept_bytes) / after if after else float("inf")

    def __getitem__(self, path: str) -> ReplacedTable:
        for r in self.replaced:
            if r.path == path or path in r.aliases:
                return r
        raise KeyError(f"no replaced module at {path!r}; replaced: {[r.path for r in self.replaced]}")

    def summary(self) -> str:
        """One line: the method, the tables replaced, bytes before -> after and the ratio, the tables kept."""
        n = len(self.replaced)
        kept = f"; kept {len(self.kept)} ({self.kept_bytes:,} bytes)" if self.kept else ""
        return (f"{self.method}: replaced {n} table{'s' if n != 1 else ''}, {self.bytes_before:,} -> "
                f"{self.bytes_after:,} bytes ({self.ratio:.2f}x){kept}")

    def __str__(self) -> str:
        header = ["path", "kind", "rows", "dim", "dtype", "bytes before", "bytes after", "ratio", "init std"]
        rows = [[r.path, r.kind, f"{r.rows:,}", str(r.dim), r.dtype, f"{r.bytes_before:,}", f"{r.bytes_after:,}",
                 f"{r.ratio:.2f}x", f"{r.init_std:.3g}"] for r in self.replaced]
        # A kept row's last cell is a note that runs over the remaining columns.
        kept = [[k.path, k.kind, f"{k.rows:,}", str(k.dim), k.dtype, f"{k.bytes:,}", f"kept: {k.reason}"]
                for k in self.kept]
        total = ["total", "", "", "", "", f"{self.bytes_before + self.kept_bytes:,}",
                 f"{self.bytes_after + self.kept_bytes:,}", f"{self.total_ratio:.2f}x"]
        sized = [header, *rows, total, *(k[:-1] for k in kept)]
        widths = [max(len(r[i]) for r in sized if i < len(r)) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
                         for cells in [header, *rows, *kept, total])


# ------------------------------------------------------------------------------------------------ the swap
def _kind(module: nn.Module) -> str:
    return "EmbeddingBag" if isinstance(module, nn.EmbeddingBag) else "Embedding"


def _refusals(path: str, module: nn.Module) -> list[str]:
    where = f"{_kind(module)} at {path!r}"
    problems = []
    if module.padding_idx is not None:
        problems.append(f"{where} has padding_idx={module.padding_idx}: compressed tables have no fixed zero row "
                        f"(padding ids would share hashed rows with other ids); mask the padding ids in the model "
                        f"or pass min_rows above {module.num_embeddings} to keep this table")
    if module.max_norm is not None:
        problems.append(f"{where} has max_norm={module.max_norm}: compressed tables do not renormalise rows "
                        f"(a returned vector is not one stored row)")
    if module.scale_grad_by_freq:
        problems.append(f"{where} has scale_grad_by_freq=True, which compressed tables do not support")
    if not module.weight.requires_grad:
        problems.append(f"{where} has a frozen weight (requires_grad=False, e.g. from_pretrained): the compressed "
                        f"table would start from random rows and lose the pretrained ones")
    if not module.weight.dtype.is_floating_point:
        problems.append(f"{where} has a {module.weight.dtype} weight; only floating-point tables can be replaced")
    return problems


def _host_std(path: str, module: nn.Module) -> float:
    weight = module.weight.detach()
    if weight.device.type == "meta":
        raise ValueError(f"{_kind(module)} at {path!r} is on the meta device: its init std cannot be measured; "
                         f"pass {{'init_std': ...}} in the method spec")
    std = float(weight.to(torch.float64).std()) if weight.numel() > 1 else float("nan")
    if not (math.isfinite(std) and std > 0):
        raise ValueError(f"{_kind(module)} at {path!r}: the std of its weight is {std!r}, not a usable init_std; "
                         f"pass {{'init_std': ...}} in the method spec")
    return std


def _minimum(message: str) -> int | None:
    m = _MINIMUM.search(message)
    return int(m.group(1).replace(",", "")) if m else None


def _cast_bytes(spec: dict, rows: int, dim: int, budget: int, dtype: torch.dtype) -> int:
    """Exact bytes of the table ``spec`` builds within ``budget`` fp32 bytes once cast to ``dtype`` (on meta)."""
    with torch.device("meta"):
        table = build_table({**spec, "budget_bytes": budget}, rows, dim)
    return table.to(dtype).memory_report().total_bytes


def _fp32_budget(spec: dict, rows: int, dim: int, target: int, dtype: torch.dtype) -> int:
    """The fp32 budget whose table, cast to ``dtype``, is the largest found within ``target`` bytes.

    The methods' solver works in the bytes of their fp32 tables; float parameters and buffers scale by the
    element size when cast and integer buffers do not, so the first guess is corrected from the measured size.
    Raises :class:`BudgetError` (with the method's own message) when even the smallest table is too big.
    """
    scale = 4 / torch.empty((), dtype=dtype).element_size()
    if scale == 1:
        return target
    budget = max(1, int(target * scale))
    for _ in range(40):
        size = _cast_bytes(spec, rows, dim, budget, dtype)
        if size <= target:
            return budget
        budget = max(1, budget - max(1, math.ceil((size - target) * scale)))
    raise BudgetError(f"{spec['type']}: found no table within {target:,} bytes in {dtype}")


def _build(spec: dict, path: str, module: nn.Module, target: int, dtype: torch.dtype, device: torch.device,
           how: str) -> nn.Module:
    rows, dim = module.num_embeddings, module.embedding_dim
    name = str(dtype).removeprefix("torch.")
    try:
        table = build_table({**spec, "budget_bytes": _fp32_budget(spec, rows, dim, target, dtype)}, rows, dim)
    except BudgetError as exc:
        minimum = _minimum(str(exc))
        if minimum is not None and dtype != torch.float32:
            minimum = _cast_bytes(spec, rows, dim, minimum, dtype)
        before = module.weight.numel() * module.weight.element_size()
        need = (f": minimum budget {minimum:,} bytes for this module ({name}), a ratio of at most "
                f"{before / minimum:.3g}" if minimum is not None else "")
        raise BudgetError(f"{_kind(module)} at {path!r} ({rows:,} x {dim}) gets {target:,} bytes ({how}), under "
                          f"the smallest table {spec['type']} builds for it{need} [{exc}]") from None
    try:
        table = table.to(device=device, dtype=dtype)
        with torch.no_grad():
            probe = torch.tensor([0, rows - 1], device=device)
            out = table(probe)
            bags = table.forward_bags(probe, torch.tensor([[2]], device=device), mode="sum")
        if out.dtype != dtype or bags.dtype != dtype or out.shape != (2, dim):
            raise TypeError(f"it returns {out.dtype} vectors of shape {list(out.shape)}")
    except Exception as exc:  # the method does not run in this dtype / on this device
        raise TypeError(f"{spec['type']} does not work in {name} on {device} (the dtype and device of the "
                        f"{_kind(module)} at {path!r}): {type(exc).__name__}: {exc}") from exc
    built = table.memory_report().serving_bytes  # budgets bind the served bytes
    if built > target:  # the sizing must be the real one
        raise RuntimeError(f"{path!r}: built {built:,} bytes for a budget of {target:,} bytes in {name}")
    return table


def _split_method(method: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(method, str):
        name, options = method, {}
    elif isinstance(method, Mapping):
        if "type" not in method:
            raise SpecError(f"a method spec must have a 'type' key (one of {list_tables()}), got {dict(method)!r}")
        options = dict(method)
        name = options.pop("type")
    else:
        raise SpecError(f"method must be a registered name such as 'hashing.v1' or a spec mapping, got {method!r}")
    if "budget_bytes" in options:
        raise SpecError("the method spec cannot set budget_bytes: pass ratio= or budget_bytes= to replace_embeddings")
    list_tables()  # load the built-in methods
    cls = TABLES.get(name)  # unknown names: the registry's error, with close matches
    if getattr(cls, "trains_in_stages", False):
        raise SpecError(f"{name} trains in stages and meets its budget with the table it exports; it cannot be "
                        f"swapped in by replace_embeddings (use its staged training, e.g. embcompress.optembed)")
    return name, options


def replace_embeddings(
    model: nn.Module,
    *,
    method: str | Mapping[str, Any] = "hashing.v1",
    ratio: float | None = None,
    budget_bytes: int | None = None,
    min_rows: int = 200,
    seed: int | None = None,
) -> ReplaceReport:
    """Replace every ``nn.Embedding`` / ``nn.EmbeddingBag`` of ``model`` with more than ``min_rows`` rows, in place.

    Args:
        model: any module; its embedding modules are found with ``named_modules`` and replaced on their parent.
        method: a registered table method (``"hashing.v1"``) or a spec with options (``{"type": "qr.v1",
            "operation": "add"}``); ``budget_bytes`` and the keys the budget solves cannot appear in it. An
            ``init_std`` in the spec overrides the measured one; a ``seed`` is the base of the tables' hash seeds.
        ratio: build each table within its own bytes / ``ratio`` (``ratio > 0``).
        budget_bytes: a total in bytes, split over the swapped tables in proportion to their bytes.
        min_rows: tables with at most this many rows are kept as they are.
        seed: makes the replacement reproducible: the new tables are initialised from ``torch.manual_seed(seed)``
            (inside ``torch.random.fork_rng``, so the global generator is left alone), and it is the base of the
            hash seeds. Methods with a ``seed`` option always get a different one per table (base + index, base 0
            by default), so no two tables share hash functions.

    Returns:
        a :class:`ReplaceReport` (``print(report)`` for the table, ``report.summary()`` for one line).

    Raises:
        ValueError: invalid arguments, an option the new tables cannot honour (naming the module and the option),
            or no embedding with more than ``min_rows`` rows.
        BudgetError: a table's share is under the smallest table the method builds (naming the module and the
            minimum).
        TypeError: the method does not run in the host's dtype.
        RegistryError / SpecError: an unknown method or option.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    if (ratio is None) == (budget_bytes is None):
        raise ValueError(f"give exactly one of ratio and budget_bytes, got ratio={ratio!r}, "
                         f"budget_bytes={budget_bytes!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, numbers.Real)
                              or not (math.isfinite(ratio) and ratio > 0)):
        raise ValueError(f"ratio must be a positive finite number (bytes before / bytes after), got {ratio!r}")
    if budget_bytes is not None and (isinstance(budget_bytes, bool) or not isinstance(budget_bytes, numbers.Real)
                                     or not (math.isfinite(budget_bytes) and budget_bytes > 0)):
        raise BudgetError(f"budget_bytes must be a positive finite number of bytes, got {budget_bytes!r}")
    if isinstance(min_rows, bool) or not isinstance(min_rows, numbers.Integral) or min_rows < 0:
        raise ValueError(f"min_rows must be a non-negative int, got {min_rows!r}")
    if seed is not None:
        check_seed(seed)
    name, options = _split_method(method)
    accepted = inspect.signature(TABLES.get(name)).parameters

    # Every embedding module, with all the paths it is registered at (a shared instance is replaced once).
    paths: dict[int, list[str]] = {}
    modules: dict[int, nn.Module] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            paths.setdefault(id(module), []).append(path)
            modules[id(module)] = module
    if not modules:
        raise ValueError(f"{type(model).__name__} holds no nn.Embedding or nn.EmbeddingBag to replace")
    swap, kept = [], []
    for key, module in modules.items():
        path = paths[key][0]
        row = (path, _kind(module), module.num_embeddings, module.embedding_dim,
               str(module.weight.dtype).removeprefix("torch."))
        nbytes = module.weight.numel() * module.weight.element_size()
        if type(module) not in (nn.Embedding, nn.EmbeddingBag):
            # A subclass usually exists to change forward(); swapping it would silently drop that.
            kept.append(KeptTable(*row, bytes=nbytes, reason=f"a subclass ({type(module).__name__}), not swapped"))
        elif module.num_embeddings > min_rows:
            swap.append(key)
        else:
            kept.append(KeptTable(*row, bytes=nbytes, reason=f"{module.num_embeddings:,} rows <= min_rows {min_rows}"))
    if not swap:
        plain = [m for m in modules.values() if type(m) in (nn.Embedding, nn.EmbeddingBag)]
        if not plain:
            raise ValueError(f"{type(model).__name__} holds only subclasses of nn.Embedding / nn.EmbeddingBag "
                             f"({sorted({type(m).__name__ for m in modules.values()})}), which are not swapped")
        largest = max(plain, key=lambda m: m.num_embeddings)
        raise ValueError(f"no embedding has more than min_rows={min_rows} rows: the largest is the "
                         f"{_kind(largest)} at {paths[id(largest)][0]!r} with {largest.num_embeddings:,} rows; "
                         f"lower min_rows to replace it")

    # Refuse what cannot be honoured before anything is built or changed.
    problems = []
    owners: dict[int, list[str]] = {}
    for pname, param in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(param), []).append(pname)
    for key in swap:
        module, where = modules[key], paths[key]
        if "" in where:
            problems.append(f"the model itself is an {_kind(module)}: there is no parent to swap it on; build a "
                            f"table directly with embcompress.build_table")
        problems.extend(_refusals(where[0], module))
        mine = {f"{p}.weight" if p else "weight" for p in where}
        others = [p for p in owners.get(id(module.weight), []) if p not in mine]
        if others:
            problems.append(f"{_kind(module)} at {where[0]!r} shares its weight with {others} (tied weights): "
                            f"replacing it would untie them")
        if isinstance(module, nn.EmbeddingBag) and module.mode not in BAG_MODES:
            problems.append(f"EmbeddingBag at {where[0]!r} has mode={module.mode!r}, not one of {BAG_MODES}")
    if problems:
        raise ValueError("cannot replace the embeddings: " + "; ".join(problems))

    # Budgets: each table's bytes / ratio, or the total split in proportion to the tables' bytes.
    before = {k: modules[k].weight.numel() * modules[k].weight.element_size() for k in swap}
    if ratio is not None:
        targets = {k: int(before[k] / ratio) for k in swap}
        how = {k: f"its {before[k]:,} bytes / ratio {ratio:g}" for k in swap}
    else:
        total = sum(before.values())
        targets = {k: int(int(budget_bytes) * before[k] // total) for k in swap}
        how = {k: f"its share {before[k]:,} / {total:,} of budget_bytes={int(budget_bytes):,}" for k in swap}

    built: dict[int, tuple[nn.Module, ReplacedTable]] = {}
    base_seed = int(options.get("seed", 0 if seed is None else seed))
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        for index, key in enumerate(swap):
            module, path = modules[key], paths[key][0]
            if "init_std" in options:  # the spec's own choice (None: the library default)
                std = resolve_init_std(options["init_std"], module.embedding_dim)
            else:
                std = _host_std(path, module)
            spec = {"type": name, **options, "init_std": std}
            if "seed" in accepted:
                spec["seed"] = (base_seed + index) % _SEED_LIMIT
            sparse = bool(options.get("sparse", getattr(module, "sparse", False) and "sparse" in accepted))
            if "sparse" in accepted:
                spec["sparse"] = sparse
            weight = module.weight
            table = _build(spec, path, module, targets[key], weight.dtype, weight.device, how[key])
            new: nn.Module = table
            if isinstance(module, nn.EmbeddingBag):
                new = CompressedEmbeddingBag(table, mode=module.mode, include_last_offset=module.include_last_offset)
            new.train(module.training)
            record = ReplacedTable(
                path=path, kind=_kind(module), rows=module.num_embeddings, dim=module.embedding_dim,
                dtype=str(weight.dtype).removeprefix("torch."), bytes_before=before[key],
                bytes_after=table.memory_report().serving_bytes, budget_bytes=targets[key], init_std=std,
                method=name, sparse=sparse and "sparse" in accepted, aliases=tuple(paths[key][1:]), module=new,
            )
            built[key] = (new, record)

    # Everything fits and runs: swap, on every path the module is registered at.
    for key in swap:
        new = built[key][0]
        for path in paths[key]:
            parent_path, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent_path), attr, new)
    return ReplaceReport(
        method=name, replaced=[built[k][1] for k in swap], kept=kept, ratio_target=ratio,
        budget_bytes=None if budget_bytes is None else int(budget_bytes),
    )
