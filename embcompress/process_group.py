"""Where this process stands in a ``torch.distributed`` process group, and the collectives the package uses.

The bottom layer of data-parallel work: :mod:`embcompress.evaluation` gathers metrics with it and
:mod:`embcompress.distributed` builds the training context on it. Outside an initialised process group every
function here is the single-process answer (rank 0 of 1, nothing to gather or sum), so callers need no branch.

>>> world(), is_distributed(), is_main_process()
((0, 1), False, True)
>>> shard_bounds(10, rank=0, world_size=3), shard_bounds(10, rank=2, world_size=3)
((0, 4), (7, 10))
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_sum", "gather_rows", "is_distributed", "is_main_process", "shard_bounds", "world"]


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


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that ``rank`` of ``world_size`` takes: contiguous, sizes differ by at most one."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


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
