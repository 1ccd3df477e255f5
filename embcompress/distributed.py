"""Multi-process data-parallel training: replicated compressed tables, sharded data, gathered metrics.

Compressed tables are small by design, so every process holds the whole model and
``torch.nn.parallel.DistributedDataParallel`` (DDP) averages the gradients after each backward pass: gloo on CPU,
nccl on GPU. :func:`embcompress.training.train` switches to this mode by itself when it runs inside an initialised
process group of more than one process (``torchrun --nproc-per-node N ...``, ``embcompress bench run --nproc N``,
or :func:`launch`); nothing else changes for the caller. The training step is one function for both modes: it
asks a context (:func:`step_context`) for the module to call, the batches, the loss weighting and the sparse
gradient sync; :class:`LocalContext` answers for one process, :class:`DistContext` for a process group. What the
group's context does:

* **Data.** Every rank draws the same shuffled permutation (same seed) and cuts the same global batches of
  ``batch_size`` rows; rank ``r`` reads only its contiguous slice of each (:func:`shard_batches`), so a global
  batch is split across the ranks and the world sees every row once per epoch.
* **Loss.** Each rank's loss is ``sum of its rows' BCE * world_size / global batch size``; DDP's average of the
  gradients is then exactly the gradient of the mean over the global batch, also for the ragged last batch (its
  slices differ by at most one row) — so N processes follow the single-process run step for step, up to float
  summation order. Table regularisers (OptEmbed) are computed on the unwrapped model and added on every rank,
  so their averaged gradient is their own.
* **Sparse gradients.** Tables built with ``sparse=True`` keep their sparse gradients: DDP all-reduces them with
  gloo (tested here with 2 CPU processes); nccl has no sparse all-reduce, so build those tables with
  ``sparse=False`` on GPUs.
* **Metrics.** Validation and test rows are split into contiguous shards and every rank computes the *same* AUC
  and logloss over the whole split (:func:`embcompress.evaluation.evaluate_sharded`), so early stopping decides
  alike everywhere.
* **Output.** Only rank 0 writes files (checkpoints, benchmark results, reports).

Rank facts and collectives (:func:`world`, :func:`shard_bounds`, :func:`gather_rows`, :func:`all_sum`) live in
:mod:`embcompress.process_group` and are re-exported here.

Sources: PyTorch documentation, "DistributedDataParallel" and "torch.distributed" (collectives, gloo/nccl
backends, ``init_process_group`` with ``env://`` and ``file://`` init methods), and "torchrun (Elastic Launch)",
https://pytorch.org/docs/stable/ .

>>> ctx = step_context(torch.nn.Linear(2, 1), "cpu")  # outside a process group: the single-process hooks
>>> type(ctx).__name__, ctx.world_size, ctx.per_row(torch.tensor(6.0), 3).item()
('LocalContext', 1, 2.0)
"""

from __future__ import annotations

import inspect
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .contract import CompressedEmbedding
from .data import Batch, iterate_batches
from .evaluation import evaluate_sharded
from .process_group import all_sum, gather_rows, is_distributed, is_main_process, shard_bounds, world

__all__ = [
    "DistContext",
    "LocalContext",
    "all_sum",
    "default_backend",
    "evaluate_sharded",
    "free_port",
    "gather_rows",
    "init_from_env",
    "is_distributed",
    "is_main_process",
    "launch",
    "shard_batches",
    "shard_bounds",
    "step_context",
    "world",
]


def default_backend(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def init_from_env(device: str = "cpu") -> bool:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``,
    ``MASTER_PORT``); returns True when this process is now part of a group of several processes."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1 or dist.is_initialized():
        return is_distributed()
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=default_backend(device), init_method="env://")
    return True


def shard_batches(
    data: Batch, batch_size: int, *, rank: int, world_size: int, generator: torch.Generator | None = None,
    shuffle: bool = True,
) -> Iterator[tuple[Batch, int]]:
    """This rank's slice of every global batch, with the global batch's size: ``(Batch[b_r], B)``.

    The permutation is ``torch.randperm(len(data), generator=generator)`` — the one a single process draws with
    the same generator state in :func:`embcompress.data.iterate_batches` — so the union of the ranks' slices is
    exactly the single-process batch.

    >>> data = Batch(torch.zeros(5, 1), torch.arange(5).view(5, 1), torch.zeros(5))
    >>> [(b.sparse.view(-1).tolist(), n) for b, n in shard_batches(data, 3, rank=1, world_size=2, shuffle=False)]
    [([2], 3), ([4], 2)]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(data)
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        rows = order[start : start + batch_size]
        lo, hi = shard_bounds(len(rows), rank, world_size)
        idx = rows[lo:hi]
        yield Batch(data.dense[idx], data.sparse[idx], data.labels[idx]), len(rows)


@dataclass
class LocalContext:
    """The training step's hooks in a single process: the model itself, every row, the mean loss, no sync.

    :class:`DistContext` overrides each hook for a process group; the step calls them the same way in both.
    """

    module: nn.Module  # what the step calls forward on: the model (DistContext: its DDP wrapper)
    rank: int = 0
    world_size: int = 1

    def batches(self, data: Batch, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Batch, int]]:
        """``(rows this process trains on, rows in the whole batch)`` for each shuffled batch of the epoch."""
        return ((b, len(b)) for b in iterate_batches(data, batch_size, shuffle=True, generator=generator))

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, global_size: int) -> torch.Tensor:
        """The mean BCE over the batch."""
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def per_row(self, total: torch.Tensor, global_size: int) -> torch.Tensor:
        """A term summed over this process's rows (the embedding L2), weighted like :meth:`loss`: a batch mean."""
        return total / global_size

    def sync_sparse_grads(self) -> None:
        """Nothing to sync in one process."""


@dataclass
class DistContext(LocalContext):
    """The training step's hooks in a process group: this rank, the DDP-wrapped model, its share of each batch."""

    sparse: tuple[nn.Parameter, ...] = ()  # sparse-gradient table parameters, synced by sync_sparse_grads

    @classmethod
    def wrap(cls, model: nn.Module, device: str) -> DistContext:
        rank, size = world()
        own = [t._owner_name() for t in model.modules()
               if isinstance(t, CompressedEmbedding) and t.trains_rows_itself()]
        if own:  # their captured row gradients are not averaged over the ranks
            raise ValueError(f"{own[0]}: its rows train outside autograd (train_quantized=True, ALPT, or "
                             "fused_optimizer) in one process; train it without a process group")
        # DDP expects sparse gradients only from nn.Embedding(sparse=True) modules; a table's own sparse
        # gradients would be copied into a dense bucket and fail. DDP ignores those parameters and
        # sync_sparse_grads averages them by all-gathering their (indices, values), which gloo and nccl both do.
        sparse = {id(p) for t in model.modules() if isinstance(t, CompressedEmbedding) for p in t.sparse_parameters()}
        names = [n for n, p in model.named_parameters() if id(p) in sparse]
        params = tuple(p for p in model.parameters() if id(p) in sparse)
        if names:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
            with torch.no_grad():
                for p in params:  # DDP broadcasts rank 0's other parameters itself
                    dist.broadcast(p.data, src=0)
        # Tables' buffers (hash seeds, offsets, index maps) are constants, synced once when DDP starts; only
        # batch-norm statistics change in training, so buffers are re-broadcast every step only for them.
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        sig = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
        sync_key = "forward_sync_buffers" if "forward_sync_buffers" in sig else "broadcast_buffers"  # torch >= 2.13
        options: dict[str, Any] = {sync_key: has_bn}
        if str(device).startswith("cuda"):
            index = torch.device(device).index
            index = torch.cuda.current_device() if index is None else index
            options["device_ids"] = [index]
        ddp = nn.parallel.DistributedDataParallel(model, **options)
        return cls(module=ddp, rank=rank, world_size=size, sparse=params)

    def sync_sparse_grads(self) -> None:
        """Average the sparse gradients of the tables' sparse parameters over the ranks (after backward)."""
        for p in self.sparse:
            g = p.grad
            if g is None:
                g = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.int64, device=p.device),
                                            p.new_zeros((0, *p.shape[1:])), p.shape, check_invariants=False)
            g = g.coalesce()
            indices = gather_rows(g.indices().t().contiguous()).t()
            values = gather_rows(g.values())
            mean = torch.sparse_coo_tensor(indices, values / self.world_size, p.shape, check_invariants=False)
            p.grad = mean.coalesce()

    def batches(self, data: Batch, batch_size: int, generator: torch.Generator) -> Iterator[tuple[Batch, int]]:
        """This rank's slice of each global batch, with the global batch's size (:func:`shard_batches`)."""
        return shard_batches(data, batch_size, rank=self.rank, world_size=self.world_size, generator=generator)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, global_size: int) -> torch.Tensor:
        """BCE summed over this rank's rows, times ``world_size / global_size``: DDP's gradient average of it is
        the gradient of the mean over the global batch."""
        total = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        return self.per_row(total, global_size)

    def per_row(self, total: torch.Tensor, global_size: int) -> torch.Tensor:
        """A term summed over this rank's rows, times ``world_size / global_size``, like :meth:`loss`."""
        return total * (self.world_size / global_size)


def step_context(model: nn.Module, device: str) -> LocalContext:
    """The hooks the training step runs with: :class:`DistContext` (the model wrapped in DDP) inside a process
    group of several processes, else :class:`LocalContext` (the model itself)."""
    return DistContext.wrap(model, device) if is_distributed() else LocalContext(model)


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _launch_entry(rank: int, fn: Callable, args: tuple, nproc: int, init_method: str, backend: str,
                  threads: int | None, out_dir: str) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_RANK=str(rank))
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=nproc)
    try:
        result = fn(*args)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args: Any, backend: str = "gloo", threads: int | None = 1) -> list:
    """Run ``fn(*args)`` in ``nproc`` fresh processes joined in one process group; their return values by rank.

    ``fn`` must be importable (a module-level function). The group meets through a file store in a temporary
    folder; each process uses ``threads`` intra-op threads (``None``: torch's default). Return values travel
    through ``torch.save`` files, so keep them to tensors, numbers and plain containers.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="embcompress-ddp-") as tmp:
        init_method = f"file://{Path(tmp) / 'store'}"
        mp.spawn(_launch_entry, args=(fn, args, nproc, init_method, backend, threads, tmp), nprocs=nproc, join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(nproc)]
