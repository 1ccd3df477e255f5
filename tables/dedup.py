"""``dedup.v1``: block deduplication — train a full table, merge near-duplicate blocks of rows, fine-tune.

Zhou et al., "Serving Deep Learning Models with Deduplication from Relational Databases", VLDB 2022, as the VLDB
2024 embedding-compression benchmark applies it to embedding tables.

Stages (:meth:`DedupEmbedding.fit_staged`, as a :class:`DedupSchedule` says):

1. **Train the full table.** Every id of every field has its own fp32 row; the fields' rows are fused into one
   ``[N, D]`` weight (``N = sum_f n_f``, row ``offsets[f] + x``), as in ``full.v1``. Held while training: the full
   table, ``4 N D + 8 F`` bytes, plus its optimizer state (Adam: two more ``[N, D]`` moments).
2. **Deduplicate** (:meth:`DedupEmbedding.dedup_`). The fused table is cut into ``B = ceil(N / block_rows)``
   contiguous blocks of ``block_rows`` rows (the last one padded with zero rows that no id reads). Near-duplicate
   blocks are found with L2-LSH (:func:`lsh_groups`); each group keeps one block, the mean of its members row
   by row (over the rows that exist), and a remap sends every block to its kept copy.
3. **Fine-tune** the deduplicated table: the kept blocks are the parameter, a block shared by several groups'
   ids gets all their gradients (sparse ones with ``sparse=True``).

Served (:meth:`DedupEmbedding.export`, :class:`DedupExport`; the deduplicated table stores the same): the kept
blocks fp32 ``[k * block_rows, D]``, the remap ``[B]`` in :func:`~embcompress.tables.cce.index_dtype` of ``k``
(uint8 up to 256 kept blocks, int16 up to 32,768, else int32) and int64 field offsets ``[F]``::

    serving bytes = 4 * k * block_rows * D + itemsize(k) * ceil(N / block_rows) + 8 * F

A lookup is ``r = offsets[f] + x``, ``row = remap[r // block_rows] * block_rows + r % block_rows``, one gather.

Design choices:

* **Blocks of whole rows, contiguous in the fused table** (not row parts). One remap entry serves
  ``block_rows`` whole rows, so a lookup is one remap read and one contiguous row gather, and the remap costs
  ``itemsize / block_rows`` bytes per row; row-part blocks would need one remap entry and one gather per part.
  Ids are ranked by frequency, so a block holds neighbours of similar popularity (and training), the blocks
  most likely to look alike. Blocks straddle field boundaries (at most ``F - 1`` of them), as in the reference's
  single fused table.
* **The training table keeps the remap as its bytes.** Its ``remap`` buffer is the uint8 view of the
  ``index_dtype(k)`` remap (:attr:`DedupEmbedding.remap_index` is the typed view, the export stores it typed):
  DistributedDataParallel broadcasts every buffer when it wraps a model, and neither gloo nor NCCL broadcasts
  int16, so a typed int16 remap (256 < k <= 32,768) could not fine-tune in a process group. The bytes are the same.
* **The budget binds the served table and the knob is the number of kept blocks** ``K`` (``kept_blocks``):
  :meth:`~DedupEmbedding.from_budget` solves the largest ``K`` whose served bytes (the formula above with
  ``k = K``) are within the budget, through the shared solver, before anything trains. Deduplication then keeps
  at most ``K`` blocks: the LSH is widened until it does (see :func:`lsh_groups`), so the served bytes are at
  most the planned ones (fewer when the natural duplicates already leave fewer groups, or a smaller remap dtype).
  The reference stops merging when it reaches its target or runs out of duplicates, so it can miss its budget.
* **The minimum budget is the remap.** ``K = 1``: ``4 * block_rows * D + ceil(N / block_rows) + 8 F`` bytes, so
  the ratio is capped just under ``4 D * block_rows`` (256x at D=16 with the default ``block_rows=4``; on the
  default synthetic data, N = 51,384 ids in 26 fields at D=16: 13,310 bytes, 247x). Budgets under it raise
  :class:`~embcompress.contract.BudgetError` naming it; a larger ``block_rows`` reaches further at a coarser
  deduplication.
* **Deterministic.** Projections and offsets are drawn from a CPU ``torch.Generator`` seeded with ``seed`` (saved
  with the options in the state_dict's ``_extra_state``; a reloaded table takes the checkpoint's), hashes are
  computed in float64 on the CPU, groups are numbered by their first block and ties are broken by block index,
  so the same weights deduplicate the same way on every run and device. A deduplicated table's outputs depend on
  its stored blocks and remap only.
* **Cost.** Deduplication runs once, on the CPU, in float64 (about three float64 copies of the table), with a
  Python union-find: a few seconds per 100,000 blocks (``B = 200,000`` blocks of 64 numbers, 8 widenings: 5 s on
  one core).

Initialisation: rows are ``N(0, init_std**2)`` (the returned vectors of stage 1 are the rows).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embcompress.budget import check_budget
from embcompress.contract import (
    BudgetError, BudgetKnob, CompressedEmbedding, as_cardinalities, check_bool, check_int, check_number,
    check_positive_int, check_seed, init_rows_, resolve_init_std,
)
from embcompress.optembed import StagedFit
from embcompress.registry import TABLES
from embcompress.schedule import StagedSchedule, check_staged_start, train_compress_retrain
from embcompress.tables.cce import index_dtype

__all__ = ["DedupEmbedding", "DedupExport", "DedupSchedule", "lsh_groups"]

_MAX_WIDENINGS = 60  # bucket doublings before every remaining group shares one bucket (2**60: far past any spread)


def _blocks(rows: int, block_rows: int) -> int:
    return -(-rows // block_rows)


def _storage_bytes(rows: int, num_fields: int, dim: int, block_rows: int, kept: int) -> int:
    itemsize = torch.empty((), dtype=index_dtype(kept)).element_size()
    return 4 * kept * block_rows * dim + itemsize * _blocks(rows, block_rows) + 8 * num_fields


# -------------------------------------------------------------------------------------------------- grouping
def lsh_groups(blocks: torch.Tensor, max_groups: int, *, seed: int = 0, bucket_width: float = 0.05,
               hashes: int = 16) -> tuple[torch.Tensor, dict]:
    """Group near-duplicate rows of ``blocks`` ``[B, d]`` with L2-LSH into at most ``max_groups`` groups.

    Hash ``j`` of a block ``x`` is ``floor(a_j . x / w + u_j)`` (``a_j ~ N(0, I)``, ``u_j ~ U[0, 1)``, drawn
    from ``seed``); blocks agreeing on all ``hashes`` hashes share a bucket. ``w`` starts at ``bucket_width``
    times the root-mean-square block norm, so the natural grouping merges only blocks much closer than typical
    ones, and all of it is applied. While more than ``max_groups`` groups remain, ``w`` doubles and the groups
    now sharing a bucket are merged, closest group means first (ties by block index), stopping at exactly
    ``max_groups``; every widening only merges, so the grouping is nested. Returns ``(labels, info)``: labels
    ``LongTensor[B]`` in ``[0, k)``, groups numbered by their first block, and ``{"natural_groups", "widenings",
    "bucket_width"}`` (the relative width of the last level).

    >>> x = torch.tensor([[0.0, 1.0], [50.0, 50.0], [0.0, 1.0], [0.5, 1.0]])
    >>> lsh_groups(x, 4)[0].tolist()   # only the two identical blocks merge
    [0, 1, 0, 2]
    >>> labels, info = lsh_groups(x, 2)   # one more merge is needed: buckets widen until it happens
    >>> labels.tolist(), info["widenings"]
    ([0, 1, 0, 0], 2)
    """
    max_groups = check_positive_int("max_groups", max_groups, owner="lsh_groups")
    bucket_width = check_number("bucket_width", bucket_width, positive=True, owner="lsh_groups")
    hashes = check_positive_int("hashes", hashes, owner="lsh_groups")
    seed = check_seed(seed, owner="lsh_groups")
    x = blocks.detach().to("cpu", torch.float64)
    B, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, hashes, generator=gen, dtype=torch.float64)
    u = torch.rand(hashes, generator=gen, dtype=torch.float64)
    projected = x @ a  # every width divides the same projections
    scale = float(x.pow(2).sum(1).mean().sqrt()) if B else 0.0
    scale = scale if scale > 0 and math.isfinite(scale) else 1.0

    parent = list(range(B))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    count, level, natural = B, 0, B
    while True:
        if level > _MAX_WIDENINGS:
            bucket = torch.zeros(B, dtype=torch.long)  # the fallback: one bucket for all
        else:
            signature = torch.floor(projected / (bucket_width * scale * 2.0**level) + u).long()
            bucket = torch.unique(signature, dim=0, return_inverse=True)[1]
        roots = torch.tensor([find(i) for i in range(B)], dtype=torch.long)
        # Star edges: every group present in a bucket to the bucket's lowest root.
        pairs = torch.unique(bucket * B + roots)
        pb, pr = pairs // B, pairs % B
        center = torch.full((int(pb.max()) + 1 if B else 0,), B, dtype=torch.long).scatter_reduce(
            0, pb, pr, "amin")[pb]
        linked = pr != center
        src, dst = pr[linked], center[linked]
        if src.numel():
            sizes = torch.zeros(B, dtype=torch.float64).index_add_(0, roots, torch.ones(B, dtype=torch.float64))
            means = torch.zeros(B, d, dtype=torch.float64).index_add_(0, roots, x).div_(sizes.clamp(min=1)[:, None])
            dist = (means[src] - means[dst]).pow(2).sum(1)
            order = np.lexsort((src.numpy(), dist.numpy()))  # closest first, ties by block index
            src_list, dst_list = src.tolist(), dst.tolist()
            for e in order.tolist():
                if level and count <= max_groups:
                    break
                i, j = find(src_list[e]), find(dst_list[e])
                if i != j:
                    parent[max(i, j)] = min(i, j)  # the root stays a group's first block
                    count -= 1
        if level == 0:
            natural = count
        if count <= max_groups:
            break
        level += 1
    roots = torch.tensor([find(i) for i in range(B)], dtype=torch.long)
    labels = torch.unique(roots, return_inverse=True)[1]  # roots are first blocks: numbered in block order
    width = bucket_width * 2.0 ** min(level, _MAX_WIDENINGS)
    info = {"natural_groups": natural, "widenings": level, "bucket_width": width}
    return labels, info


# -------------------------------------------------------------------------------------------------- schedule
@dataclass(frozen=True)
class DedupSchedule(StagedSchedule):
    """How :meth:`DedupEmbedding.fit_staged` trains a dedup table.

    Args:
        train_epochs: epochs of the full table before deduplication (``None``: the run's ``TrainConfig.epochs``).
        finetune_epochs: epochs of the deduplicated table (``None``: the run's ``TrainConfig.epochs``).
        bucket_width: the LSH bucket width relative to the root-mean-square block norm (:func:`lsh_groups`):
            smaller merges only closer blocks before the budget forces more.
        hashes: LSH hashes per block; blocks must agree on all of them to share a bucket.

    >>> DedupSchedule.from_dict({"finetune_epochs": 2, "hashes": 8}).hashes
    8
    >>> DedupSchedule(bucket_width=0)
    Traceback (most recent call last):
        ...
    ValueError: DedupSchedule: bucket_width must be a positive finite number, got 0
    """

    train_epochs: int | None = None
    finetune_epochs: int | None = None
    bucket_width: float = 0.05
    hashes: int = 16

    def __post_init__(self) -> None:
        owner = "DedupSchedule"
        checked = {
            "train_epochs": check_positive_int("train_epochs", self.train_epochs, optional=True, owner=owner),
            "finetune_epochs": check_positive_int("finetune_epochs", self.finetune_epochs, optional=True, owner=owner),
            "bucket_width": check_number("bucket_width", self.bucket_width, positive=True, owner=owner),
            "hashes": check_positive_int("hashes", self.hashes, owner=owner),
        }
        self._store(checked)

    @classmethod
    def from_dict(cls, mapping: Mapping[str, Any] | None, where: str = "schedule") -> "DedupSchedule":
        """See :meth:`~embcompress.schedule.StagedSchedule.from_dict`.

        >>> DedupSchedule.from_dict({"finetune_epoch": 3}, "methods[1].schedule")
        Traceback (most recent call last):
            ...
        embcompress.specs.SpecError: methods[1].schedule: unknown key 'finetune_epoch'; did you mean 'finetune_epochs', 'train_epochs'? (accepted keys: train_epochs, finetune_epochs, bucket_width, hashes)
        """
        return super().from_dict(mapping, where)


# ----------------------------------------------------------------------------------------------------- table
@TABLES.register("dedup.v1")
class DedupEmbedding(CompressedEmbedding):
    """A full table that is deduplicated into shared blocks of rows after training (see the module docstring).

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``; ids of field ``f`` must lie in ``[0, n_f)``.
    Stored before :meth:`dedup_`: ``weight`` fp32 ``[N, D]`` (``N = sum_f n_f``), int64 ``offsets`` ``[F]`` and an
    empty ``remap``; after it: ``weight`` fp32 ``[k * block_rows, D]`` (the ``k <= kept_blocks`` kept blocks),
    ``remap`` uint8 ``[ceil(N / block_rows) * itemsize]``, the bytes of the remap in
    :func:`~embcompress.tables.cce.index_dtype` of ``k`` (typed: :attr:`remap_index`), and ``offsets``.
    :meth:`serving_bytes` is the served table's either way: planned with ``k = kept_blocks`` before, exact after.

    Args:
        kept_blocks: ``K``, the most blocks the deduplicated table keeps (``None``: every block); solved by
            :meth:`from_budget`.
        block_rows: rows per block.
        seed: selects the LSH projections of :meth:`dedup_`.
        sparse: sparse gradients for ``weight`` (use with ``torch.optim.SparseAdam``), in both stages.
        init_std: std of the returned vectors at initialisation (``None``: the library default).

    >>> import torch
    >>> t = DedupEmbedding([10, 6], 4, kept_blocks=3, block_rows=4)
    >>> ids = torch.tensor([[9, 5], [0, 1]])
    >>> t(ids).shape
    torch.Size([2, 2, 4])
    >>> t.serving_bytes() == 3 * 4 * 4 * 4 + 4 * 1 + 2 * 8   # 3 kept blocks, 4 uint8 remap entries, offsets
    True
    >>> stats = t.dedup_()
    >>> t.weight.shape, t.remap_index.dtype, t.remap_index.unique().numel(), stats["kept"]  # 4 blocks: 3 kept
    (torch.Size([12, 4]), torch.uint8, 3, 3)
    >>> served = t.export()
    >>> torch.equal(served(ids), t.eval()(ids)), served.memory_report().total_bytes == t.serving_bytes()
    (True, True)
    """

    trains_in_stages: ClassVar[bool] = True
    #: What :meth:`fit_staged` takes as ``schedule``; a runner builds it with ``schedule_type.from_dict(mapping)``.
    schedule_type: ClassVar[type[DedupSchedule]] = DedupSchedule
    budget_keys: ClassVar[tuple[str, ...]] = ("kept_blocks",)
    #: The budget :meth:`from_budget` built the table to (``None`` when built directly); the served table's.
    budget_bytes: int | None = None

    def __init__(
        self,
        cardinalities: int | Sequence[int],
        embedding_dim: int,
        *,
        kept_blocks: int | None = None,
        block_rows: int = 4,
        seed: int = 0,
        sparse: bool = False,
        init_std: float | None = None,
    ) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.block_rows = check_positive_int("block_rows", block_rows, owner=self)
        self.seed = check_seed(seed, owner=self)
        self.sparse = check_bool("sparse", sparse, owner=self)
        self.init_std = resolve_init_std(init_std, embedding_dim, owner=self)
        rows = sum(self.cardinalities)
        self.num_blocks = _blocks(rows, self.block_rows)
        kept = check_int("kept_blocks", kept_blocks, lo=1, hi=self.num_blocks, optional=True, owner=self)
        self.kept_blocks = self.num_blocks if kept is None else kept
        self.weight = nn.Parameter(init_rows_(torch.empty(rows, embedding_dim), self.init_std))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))
        # Empty until dedup_: the stage is read off its shape, never off values (no device sync, works on meta).
        self.register_buffer("remap", torch.empty(0, dtype=torch.uint8))

    @property
    def deduplicated(self) -> bool:
        return self.remap.numel() > 0

    @property
    def remap_index(self) -> torch.Tensor:
        """``[ceil(N / block_rows)]``: the kept block of every block, in :func:`~embcompress.tables.cce.index_dtype`
        of the kept count (a view of the ``remap`` bytes; empty before :meth:`dedup_`)."""
        if not self.deduplicated:
            return self.remap
        return self.remap.view(index_dtype(self.weight.shape[0] // self.block_rows))

    # ------------------------------------------------------------------------------------------------ forward
    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        if self.deduplicated:
            br = self.block_rows
            rows = self.remap_index[rows // br].long() * br + rows % br
        return F.embedding(rows, self.weight, sparse=self.sparse)

    def sparse_parameters(self) -> list[nn.Parameter]:
        return [self.weight] if self.sparse else []

    # ---------------------------------------------------------------------------------------- deduplication
    @torch.no_grad()
    def dedup_(self, *, bucket_width: float = 0.05, hashes: int = 16) -> dict:
        """Deduplicate the trained full table in place (stage 2): at most ``kept_blocks`` blocks are kept, each
        the row-by-row mean of its group (:func:`lsh_groups` with this table's ``seed``), and ``remap`` sends
        every block to its copy. Returns ``{"blocks", "kept", "natural_groups", "widenings", "bucket_width",
        "mean_square_change"}`` (the last: mean squared change of a row's vector, over the ``N`` rows)."""
        if self.deduplicated:
            raise ValueError(f"{self._owner_name()}: the table is deduplicated already")
        bucket_width = check_number("bucket_width", bucket_width, positive=True, owner=self)
        hashes = check_positive_int("hashes", hashes, owner=self)
        br, dim, B = self.block_rows, self.embedding_dim, self.num_blocks
        rows = self.weight.shape[0]
        if not bool(torch.isfinite(self.weight).all()):
            raise ValueError(f"{self._owner_name()}: the table holds non-finite values; nothing to deduplicate")
        padded = torch.zeros(B * br, dim, dtype=torch.float64)
        padded[:rows] = self.weight.detach().to("cpu", torch.float64)
        exists = (torch.arange(B * br) < rows).to(torch.float64).view(B, br)
        labels, info = lsh_groups(padded.view(B, br * dim), self.kept_blocks, seed=self.seed,
                                  bucket_width=bucket_width, hashes=hashes)
        k = int(labels.max()) + 1
        # Row by row over the rows that exist (the zero padding of the last block must not dilute its group).
        sums = torch.zeros(k, br, dim, dtype=torch.float64).index_add_(0, labels, padded.view(B, br, dim))
        counts = torch.zeros(k, br, dtype=torch.float64).index_add_(0, labels, exists)
        kept = (sums / counts.clamp(min=1).unsqueeze(-1)).to(self.weight.dtype)  # one member: itself, exactly
        change = (kept[labels].view(B * br, dim)[:rows].double() - padded[:rows]).pow(2).sum(1).mean()
        device, grad = self.weight.device, self.weight.requires_grad
        self.weight = nn.Parameter(kept.view(k * br, dim).to(device), requires_grad=grad)
        self.remap = labels.to(index_dtype(k)).view(torch.uint8).to(device)  # its bytes: see the module docstring
        return {"blocks": B, "kept": k, **info, "mean_square_change": float(change)}

    # -------------------------------------------------------------------------------------- serving & budget
    def serving_bytes(self) -> int:
        """Exact bytes of :meth:`export`: the kept blocks, the remap and the offsets (the module docstring's
        formula); before :meth:`dedup_`, with ``k = kept_blocks`` (what it may keep at most)."""
        kept = self.weight.shape[0] // self.block_rows if self.deduplicated else self.kept_blocks
        return _storage_bytes(sum(self.cardinalities), self.num_fields, self.embedding_dim, self.block_rows, kept)

    @torch.no_grad()
    def export(self, precision: str | None = None) -> "DedupExport":
        """The frozen serving table: the kept blocks, the remap and the offsets; its outputs equal this
        deduplicated table's bit for bit. Raises ``ValueError`` before :meth:`dedup_` (there is nothing to
        serve yet but the full table)."""
        if precision not in (None, "fp32"):
            raise ValueError(f"{self._owner_name()}: the export serves fp32 blocks, got precision={precision!r}")
        if not self.deduplicated:
            raise ValueError(f"{self._owner_name()}: export() needs the deduplicated table; call dedup_() "
                             "(fit_staged does) first")
        cards = self.cardinalities[0] if self.single else list(self.cardinalities)
        served = DedupExport(cards, self.embedding_dim, kept_blocks=self.weight.shape[0] // self.block_rows,
                             block_rows=self.block_rows).to(self.weight.device)
        served.blocks.copy_(self.weight)
        served.remap.copy_(self.remap_index)
        served.offsets.copy_(self.offsets)
        return served.set_field_names(self.field_names).eval()

    @classmethod
    def budget_knob(cls, cardinalities, embedding_dim: int, **options) -> BudgetKnob:
        """The knob is ``kept_blocks``, from 1 to every block; bytes grow with it (the remap dtype in steps)."""
        cards = as_cardinalities(cardinalities, owner=cls)
        block_rows = check_positive_int("block_rows", options.get("block_rows", 4), owner=cls)
        return BudgetKnob("kept_blocks", 1, _blocks(sum(cards), block_rows), lambda k: {"kept_blocks": int(k)})

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim: int, *, budget_bytes: int, **options) -> "DedupEmbedding":
        """The shared solver's table: the most kept blocks whose served bytes fit ``budget_bytes`` (at most the
        full table's bytes), with that budget recorded as :attr:`budget_bytes`. It trains as a full table;
        :meth:`dedup_` then keeps at most that many blocks."""
        table = super().from_budget(cardinalities, embedding_dim, budget_bytes=budget_bytes, **options)
        table.budget_bytes = min(check_budget(budget_bytes), cls.budget_ceiling(cardinalities, embedding_dim))
        return table

    # ------------------------------------------------------------------------------------------------ stages
    def fit_staged(self, model: nn.Module, data, cfg, schedule: DedupSchedule | None = None) -> StagedFit:
        """Train the full table, deduplicate it and fine-tune, as ``schedule`` says (``None``: the default
        :class:`DedupSchedule`); returns the model with this (deduplicated) table, which serves as it is.

        ``details`` hold :meth:`dedup_`'s statistics, the full table's stored and optimizer-state bytes (what
        stage 1 held: the peak of training) and the served bytes.
        """
        schedule = check_staged_start(self, model, schedule, DedupSchedule)
        if self.deduplicated:
            raise ValueError(f"{self._owner_name()}: fit_staged starts from the full table; this one is "
                             "deduplicated already")
        run = train_compress_retrain(
            self, model, data, cfg, first=("train", "full", schedule.train_epochs),
            compress=("dedup", lambda: self.dedup_(bucket_width=schedule.bucket_width, hashes=schedule.hashes)),
            second=("finetune", "finetune", schedule.finetune_epochs))
        details: dict[str, Any] = {"full_val_auc": run.first.val_auc, "full_test_auc": run.first.test_auc,
                                   "full_table_bytes": run.first_bytes,
                                   "full_optimizer_bytes": run.first.table_optimizer_bytes,
                                   **run.compressed, "serving_bytes": self.serving_bytes(),
                                   # the runner's training bytes: stage 1 held the full table
                                   "peak_training_bytes": run.peak_training_bytes}
        return StagedFit(model=model, table=self, result=run.result, stages=run.stages, details=details)

    # ------------------------------------------------------------------------------------------ checkpoints
    def set_extra_state(self, state: dict) -> None:
        super().set_extra_state(state)
        seed = state["options"].get("seed")
        if isinstance(seed, int) and not isinstance(seed, bool):  # a reload deduplicates as the saved table would
            self.seed = check_seed(seed, owner=self)
            self._saved_options = {**self._saved_options, "seed": self.seed}

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:  # refuse a checkpoint of other options before changing any shape
            self.set_extra_state(state_dict[key])
        weight, remap = state_dict.get(prefix + "weight"), state_dict.get(prefix + "remap")
        if torch.is_tensor(weight) and torch.is_tensor(remap):
            self._take_layout_(weight.shape[0], remap.numel())
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _take_layout_(self, rows: int, remap_entries: int) -> None:
        """Reshape ``weight`` and ``remap`` to a checkpoint's stage (full, or deduplicated to ``rows /
        block_rows`` blocks) so that it loads; a layout no table of these options has is left for the load to
        refuse. The parameter is replaced only when its shape changes (an optimizer may hold it)."""
        full = remap_entries == 0 and rows == sum(self.cardinalities)
        kept, rest = divmod(rows, self.block_rows)
        deduped = (not rest and 1 <= kept <= self.kept_blocks
                   and remap_entries == self.num_blocks * torch.empty((), dtype=index_dtype(kept)).element_size())
        if not (full or deduped):
            return
        device, grad = self.weight.device, self.weight.requires_grad
        if self.weight.shape[0] != rows:
            self.weight = nn.Parameter(torch.empty(rows, self.embedding_dim, device=device), requires_grad=grad)
        if self.remap.numel() != remap_entries:
            self.remap = torch.empty(remap_entries, dtype=torch.uint8, device=self.remap.device)

    def loaded_state_(self) -> None:
        if self.deduplicated and self.remap.device.type != "meta":  # a remap past the kept blocks: refuse it
            kept = self.weight.shape[0] // self.block_rows
            index = self.remap_index.long()
            if int(index.max()) >= kept or int(index.min()) < 0:
                raise ValueError(f"{self._owner_name()}: the loaded remap points outside its {kept} kept blocks")

    def extra_repr(self) -> str:
        stage = f"kept={self.weight.shape[0] // self.block_rows}" if self.deduplicated else "full"
        return (f"{super().extra_repr()}, kept_blocks={self.kept_blocks}, block_rows={self.block_rows}, "
                f"blocks={self.num_blocks}, stage={stage}, sparse={self.sparse}")


class DedupExport(CompressedEmbedding):
    """The served dedup table: the kept blocks and the remap only.

    Stored: ``blocks`` fp32 ``[k * block_rows, D]``; ``remap`` ``[ceil(N / block_rows)]`` of
    :func:`~embcompress.tables.cce.index_dtype` of ``k``; int64 ``offsets`` ``[F]``. The vector of id ``x`` of
    field ``f`` is ``blocks[remap[r // block_rows] * block_rows + r % block_rows]`` with ``r = offsets[f] + x``.

    Shapes: ``LongTensor[B, F] -> FloatTensor[B, F, D]``.
    """

    registry_name: ClassVar[str] = "dedup.v1 (export)"

    def __init__(self, cardinalities: int | Sequence[int], embedding_dim: int, *, kept_blocks: int,
                 block_rows: int) -> None:
        super().__init__(cardinalities, embedding_dim)
        self.block_rows = check_positive_int("block_rows", block_rows, owner=self)
        blocks = _blocks(sum(self.cardinalities), self.block_rows)
        self.kept_blocks = check_int("kept_blocks", kept_blocks, lo=1, hi=blocks, owner=self)
        self.register_buffer("blocks", torch.zeros(self.kept_blocks * self.block_rows, embedding_dim))
        self.register_buffer("remap", torch.zeros(blocks, dtype=index_dtype(self.kept_blocks)))
        offsets = list(itertools.accumulate(self.cardinalities, initial=0))[:-1]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64))

    def embed(self, ids: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        rows = ids + self.offsets[fields]
        br = self.block_rows
        return F.embedding(self.remap[rows // br].long() * br + rows % br, self.blocks)

    @classmethod
    def from_budget(cls, cardinalities, embedding_dim, *, budget_bytes: int):
        raise BudgetError("a dedup export is made by DedupEmbedding.export and cannot compress on its own")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kept_blocks={self.kept_blocks}, block_rows={self.block_rows}"
