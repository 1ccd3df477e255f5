"""Row tables held by fbgemm's table-batched embedding kernel, the optimizer fused into backward.

A row-based table (full, hashing, QR, Unified, hash embedding, mixed dimension) maps ids to rows and gathers
them; with ``fused_optimizer`` set, each of its fp32 row tables is a :class:`FusedRows`: the rows live in one
``SplitTableBatchedEmbeddingBagsCodegen`` (FBGEMM, as TorchRec's fused collections use it), the gather is its
forward, and its backward applies the update to the rows the batch touched, in place, with no sparse gradient
tensor, no coalescing and no separate optimizer step. The id maps and combines stay the method's own code, so
the table computes the same function; ``tests/test_fused.py`` checks outputs and the parameters after a step
against the reference path (autograd rows, ``torch.optim`` / :func:`~embcompress.lowp.rowwise_adagrad_`).

Optimizers: ``"rowwise_adagrad"`` (one fp32 sum of mean squared gradients per row: FBGEMM's
``EXACT_ROWWISE_ADAGRAD``), ``"adagrad"`` (a sum per number), ``"sgd"`` (no state) on CPU and CUDA; ``"adam"`` on
CUDA only (FBGEMM's CPU kernels do not fuse it): such a table can be built, loaded and served on the CPU, and
trains once moved to a CUDA device. The learning rate is the training loop's embedding rate, set
through the table's ``row_optimizers`` (:class:`FusedLearningRate`).

Bytes: the rows are the table's parameters as before; the optimizer's state (``momentum1``/``momentum2``) is
optimizer state in the memory report (training bytes); the kernel's metadata (offsets, placements, counters:
a few hundred bytes) is counted as buffers of the training table. The export is a plain table.
"""

from __future__ import annotations

import torch
from torch import nn

from .validate import check_choice

__all__ = ["FusedRows", "FusedLearningRate", "FUSED_OPTIMIZERS", "fused_available", "check_fused_optimizer"]

FUSED_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")
_CPU_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")
_STATE = ("momentum1", "momentum2")  # the kernel's optimizer state, by prefix


def fused_available() -> bool:
    """True when fbgemm-gpu (CPU or CUDA build) is importable."""
    try:
        import fbgemm_gpu.split_table_batched_embeddings_ops_training  # noqa: F401
    except Exception:  # noqa: BLE001 - an import error or a broken native library alike
        return False
    return True


def check_fused_optimizer(value, *, owner) -> str | None:
    """``None`` (the reference path: autograd rows) or one of :data:`FUSED_OPTIMIZERS`; fbgemm must import."""
    if value is None:
        return None
    check_choice("fused_optimizer", value, FUSED_OPTIMIZERS, owner=owner)
    if not fused_available():
        raise ImportError(f"{owner}: fused_optimizer={value!r} needs fbgemm-gpu (pip install fbgemm-gpu-cpu on a "
                          "CPU machine, fbgemm-gpu with CUDA); leave it None for the pure-PyTorch path")
    return value


def _kernel(rows: int, width: int, optimizer: str, lr: float, eps: float, device: torch.device) -> nn.Module:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import (
        BoundsCheckMode, EmbeddingLocation, PoolingMode)
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
        ComputeDevice, SplitTableBatchedEmbeddingBagsCodegen)

    cuda = device.type == "cuda"
    kind = {"rowwise_adagrad": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "adagrad": EmbOptimType.EXACT_ADAGRAD,
            "sgd": EmbOptimType.EXACT_SGD, "adam": EmbOptimType.ADAM}[optimizer]
    location = (EmbeddingLocation.DEVICE, ComputeDevice.CUDA) if cuda else (EmbeddingLocation.HOST,
                                                                           ComputeDevice.CPU)
    # No bounds check in the kernel (~8% of a CPU step): the tables validate ids and map them into their rows.
    return SplitTableBatchedEmbeddingBagsCodegen(
        [(rows, width, *location)], optimizer=kind, learning_rate=lr, eps=eps, pooling_mode=PoolingMode.SUM,
        bounds_check_mode=BoundsCheckMode.NONE, device=device)


class FusedRows(nn.Module):
    """A ``[rows, width]`` fp32 row table trained by fbgemm's fused kernel.

    Args:
        weight: the initial rows ``[rows, width]`` (copied).
        optimizer: one of :data:`FUSED_OPTIMIZERS`.
        lr: the learning rate until :meth:`set_learning_rate` (the training loop's, via
            :class:`FusedLearningRate`).
        eps: the Adagrad / Adam denominator floor.

    :meth:`lookup` reads rows ``LongTensor[*shape] -> FloatTensor[*shape, width]``; in training mode with
    gradients enabled its backward updates those rows in place (the gradient never reaches ``weight.grad``).
    Moving the module to another device rebuilds the kernel there, rows and optimizer state copied.

    >>> import torch
    >>> rows = FusedRows(torch.zeros(10, 4), optimizer="sgd", lr=0.5)
    >>> rows.lookup(torch.tensor([[1, 1], [2, 9]])).sum().backward()
    >>> rows.weight[1].tolist(), rows.weight[2].tolist()   # row 1 read twice: two steps' worth
    ([-1.0, -1.0, -1.0, -1.0], [-0.5, -0.5, -0.5, -0.5])
    """

    def __init__(self, weight: torch.Tensor, *, optimizer: str = "rowwise_adagrad", lr: float = 0.01,
                 eps: float = 1e-8) -> None:
        super().__init__()
        check_choice("optimizer", optimizer, FUSED_OPTIMIZERS, owner="FusedRows")
        if weight.dim() != 2:
            raise ValueError(f"FusedRows: weight must be [rows, width], got shape {list(weight.shape)}")
        self.optimizer, self.lr, self.eps = optimizer, float(lr), float(eps)
        self.num_rows, self.width = weight.shape
        self._build(weight.device)
        with torch.no_grad():
            self.weight.copy_(weight.float())

    def _build(self, device: torch.device) -> None:
        # A CUDA-only optimizer (Adam) on the CPU: the rows wait in an SGD kernel that refuses to train, so a
        # table built on the CPU and then moved (model.cuda()) gets its Adam kernel there.
        self._waiting = device.type != "cuda" and self.optimizer not in _CPU_OPTIMIZERS
        self._set_kernel(_kernel(self.num_rows, self.width, "sgd" if self._waiting else self.optimizer, self.lr,
                                 self.eps, device))

    def _check_trains_here(self) -> None:
        if self._waiting and self.training and torch.is_grad_enabled():
            raise ValueError(f"FusedRows: fused_optimizer={self.optimizer!r} runs on CUDA only (fbgemm's CPU kernels "
                             f"fuse {', '.join(_CPU_OPTIMIZERS)}); move the table to a CUDA device to train it")

    def _set_kernel(self, kernel: nn.Module) -> None:
        # Not a submodule: its tensors are counted, saved and moved by this class (stored_tensors, the state
        # dict's "weight" and optimizer state, _apply), never handed to a torch optimizer as parameters.
        object.__setattr__(self, "_kernel", kernel)
        # A view of the kernel's storage, which it never reallocates: built once (its builder loops in Python).
        object.__setattr__(self, "_weight", kernel.split_embedding_weights()[0])

    @property
    def kernel(self) -> nn.Module:
        """The fbgemm ``SplitTableBatchedEmbeddingBagsCodegen`` holding the rows."""
        return self._kernel

    # -------------------------------------------------------------------------------------------- reading
    @property
    def weight(self) -> torch.Tensor:
        """The rows ``[rows, width]``: a view of the kernel's storage (writes reach the kernel)."""
        return self._weight

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.num_rows, self.width))

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        if not (self.training and torch.is_grad_enabled()):  # no kernel call, no update: a plain gather
            return self.weight.index_select(0, flat).view(*idx.shape, self.width)
        self._check_trains_here()
        offsets = torch.arange(flat.numel() + 1, device=flat.device, dtype=flat.dtype)  # bags of one id
        return self.kernel(flat, offsets).view(*idx.shape, self.width)

    def pool(self, idx: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``sum_j weights[..., j] * rows[idx[..., j]]``: ``LongTensor[..., k]`` (and ``FloatTensor[..., k]``)
        -> ``[..., width]``, one kernel call (bags of ``k`` ids, per-sample weights), whose backward updates the
        rows and gives ``weights`` their gradient."""
        self._check_trains_here()
        k = idx.shape[-1]
        flat = idx.reshape(-1)
        offsets = torch.arange(0, flat.numel() + 1, k, device=flat.device, dtype=flat.dtype)
        out = self.kernel(flat, offsets, per_sample_weights=None if weights is None else weights.reshape(-1))
        return out.view(*idx.shape[:-1], self.width)

    def bags(self, idx: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``sum_j rows[idx[..., j]]`` over the ``j`` where ``keep[..., j]``: ``[..., k]`` ids and a bool mask of
        the same shape -> ``[..., width]``, one kernel call over bags of the kept ids (no gather of the others)."""
        self._check_trains_here()
        lengths = keep.sum(-1).reshape(-1)
        offsets = torch.zeros(lengths.numel() + 1, dtype=idx.dtype, device=idx.device)
        torch.cumsum(lengths, 0, out=offsets[1:])
        out = self.kernel(idx[keep], offsets)
        return out.view(*idx.shape[:-1], self.width)

    # ------------------------------------------------------------------------------------------ optimizer
    def set_learning_rate(self, lr: float) -> None:
        self.lr = float(lr)
        self.kernel.set_learning_rate(self.lr)

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        """The kernel's optimizer state tensors that hold numbers (empty for SGD), by name."""
        # Named without the placement suffix (momentum1_host on CPU, momentum1_dev on CUDA): one checkpoint key.
        return {n.rsplit("_", 1)[0]: t for n, t in self.kernel.named_parameters()
                if n.startswith(_STATE) and t.numel() and t.dtype.is_floating_point}

    def stored_tensors(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """``(rows, buffers, optimizer state)``: every tensor the kernel holds, each once, split for the memory
        report (the rows are the trained parameters; the metadata is buffers)."""
        state = list(self.optimizer_state().values())
        rows = [t for t in self.kernel.parameters() if t.numel() and all(t is not s for s in state)]
        held = {id(t) for t in rows + state}
        others = [t for t in list(self.kernel.parameters()) + list(self.kernel.buffers()) if id(t) not in held]
        return rows, others, state

    # ------------------------------------------------------------------------------------ state and device
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # The rows and the optimizer state, not the kernel's layout: a checkpoint loads into any device's kernel.
        destination[prefix + "weight"] = self.weight if keep_vars else self.weight.detach().clone()
        for name, t in self.optimizer_state().items():
            destination[prefix + name] = t if keep_vars else t.detach().clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = ["weight", *self.optimizer_state()]
        for name in names:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            target = self.weight if name == "weight" else self.optimizer_state()[name]
            value = state_dict[key]
            if value.numel() != target.numel():
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {list(value.shape)}, the "
                                  f"shape in the current model is {list(target.shape)}")
                continue
            with torch.no_grad():
                target.copy_(value.reshape(target.shape))
        for key in state_dict:
            if key.startswith(prefix) and "." not in key[len(prefix):] and key[len(prefix):] not in names:
                unexpected_keys.append(key)

    def _apply(self, fn, recurse=True):
        # The kernel is built for one device: a move rebuilds it there (rows and state copied), rather than
        # moving its tensors under a CPU (or CUDA) kernel that cannot read them.
        target = fn(torch.empty(0, device=self.weight.device))
        if target.dtype != torch.float32:
            raise ValueError(f"FusedRows: the fused kernel holds fp32 rows; cannot convert them to {target.dtype}")
        if target.device == self.weight.device:
            return self
        state = {n: t.detach().to(target.device) for n, t in self.optimizer_state().items()}
        rows = self.weight.detach().to(target.device)
        self._build(target.device)
        with torch.no_grad():
            self.weight.copy_(rows)
            for name, t in self.optimizer_state().items():
                if name in state:  # (none when it leaves or reaches a waiting kernel)
                    t.copy_(state[name].reshape(t.shape))
        return self

    def extra_repr(self) -> str:
        return f"rows={self.num_rows}, width={self.width}, optimizer={self.optimizer!r}, lr={self.lr:g}"


class FusedLearningRate(torch.optim.Optimizer):
    """Sets the learning rate of :class:`FusedRows`, whose updates happen in backward: a training loop that
    steps it (as it steps every optimizer of ``row_optimizers``) does nothing more. Its ``lr`` param group
    follows schedulers: :meth:`step` passes the group's current ``lr`` to the kernels."""

    def __init__(self, stores: list[FusedRows], *, lr: float) -> None:
        # An optimizer needs a parameter: the kernels' autograd placeholders (empty), never updated here.
        super().__init__([s.kernel.placeholder_autograd_tensor for s in stores], {"lr": float(lr)})
        self._stores = list(stores)
        self._apply_lr()

    def _apply_lr(self) -> None:
        lr = self.param_groups[0]["lr"]
        for s in self._stores:
            if s.lr != lr:
                s.set_learning_rate(lr)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the update already ran in backward
        self._apply_lr()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: D102 - there are no gradients to clear
        return None
