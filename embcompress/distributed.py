"""Multi-process data-parallel training: replicated compressed tables, sharded data, gathered metrics.

Compressed tables are small by design, so every process holds the whole model and
``torch.nn.parallel.DistributedDataParallel`` (DDP) averages the gradients after each backward pass: gloo on CPU,
nccl on GPU. :func:`embcompress.training.train` switches to this mode by itself when it runs inside an initialised
process group of more than one process (``torchrun --nproc-per-node N ...``, ``embcompress bench run --nproc N``,
or :func:`launch`); nothing else changes for the caller. What it does:

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
* **Metrics.** Validation and test rows are split into contiguous shards; each rank predicts its own, the
  predictions and labels are all-gathered (padded to the longest shard, then trimmed by the gathered sizes,
  :func:`gather_rows`) and every rank computes the *same* AUC and logloss over the whole split — not an average
  of per-rank AUCs — so early stopping decides alike everywhere.
* **Output.** Only rank 0 writes files (checkpoints, benchmark results, reports).

Sources: PyTorch documentation, "DistributedDataParallel" and "torch.distributed" (collectives, gloo/nccl
backends, ``init_process_group`` with ``env://`` and ``file://`` init methods), and "torchrun (Elastic Launch)",
https://pytorch.org/docs/stable/ .

>>> shard_bounds(10, rank=0, world_size=3), shard_bounds(10, rank=2, world_size=3)
((0, 4), (7, 10))
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

from .data import Batch

__all__ = [
    "DistContext",
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
    "world",
]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` outside an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return world()[1] > 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes files."""
    return world()[0] == 0


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


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` of ``world_size`` takes: contiguous, sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


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


def gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` (``[n_r, ...]``, ``n_r`` may differ) along dim 0, in rank order.

    Each rank pads to the longest, all-gathers, and trims by the gathered sizes. Outside a process group the
    tensor is returned as is.
    """
    size = world()[1]
    if size == 1:
        return tensor
    n = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


def all_sum(value: float, device: str = "cpu") -> float:
    """The sum of a float over all ranks (the float itself in a single process)."""
    if not is_distributed():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def evaluate_sharded(model: nn.Module, data: Batch, *, batch_size: int = 65536, device: str = "cpu"
                     ) -> tuple[float, float]:
    """(AUC, logloss) over the whole of ``data``: each rank predicts its shard, all ranks get the same numbers."""
    from .training import auc_logloss, predict

    rank, size = world()
    lo, hi = shard_bounds(len(data), rank, size)
    local = Batch(data.dense[lo:hi], data.sparse[lo:hi], data.labels[lo:hi])
    backend_device = "cuda" if dist.is_initialized() and dist.get_backend() == "nccl" else "cpu"
    p = torch.from_numpy(predict(model, local, batch_size=batch_size, device=device)).to(backend_device)
    return auc_logloss(gather_rows(local.labels.to(backend_device)).cpu().numpy(), gather_rows(p).cpu().numpy())


@dataclass
class DistContext:
    """What the training loop needs in a process group: this rank, the DDP-wrapped model, and its helpers."""

    rank: int
    world_size: int
    module: nn.Module  # the DistributedDataParallel wrapper of the model
    sparse: tuple[nn.Parameter, ...] = ()  # sparse-gradient table parameters, synced by sync_sparse_grads

    @classmethod
    def wrap(cls, model: nn.Module, device: str) -> DistContext:
        from .contract import CompressedEmbedding

        rank, size = world()
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
        return cls(rank=rank, world_size=size, module=ddp, sparse=params)

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
        return shard_batches(data, batch_size, rank=self.rank, world_size=self.world_size, generator=generator)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, global_size: int) -> torch.Tensor:
        """BCE summed over this rank's rows, times ``world_size / global_size``: DDP's gradient average of it is
        the gradient of the mean over the global batch."""
        total = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
        return total * (self.world_size / global_size)


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
