"""Scoring a CTR model: click probabilities, and AUC and logloss over a split, in one process or over a group.

:func:`evaluate` scores ``data`` in this process alone. :func:`evaluate_sharded` scores the same split across an
initialised process group: each rank predicts its contiguous shard, predictions and labels are all-gathered
(:func:`embcompress.process_group.gather_rows`) and every rank computes the *same* AUC and logloss over the whole
split, not an average of per-rank AUCs; outside a group of several processes it is :func:`evaluate`. Both run
one body, so the numbers come from one metric, :func:`auc_logloss`.

>>> import numpy as np
>>> auc_logloss(np.array([0.0, 1.0, 1.0]), np.array([0.2, 0.9, 0.6]))[0]
1.0
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import log_loss, roc_auc_score
from torch import nn

from .data import Batch, iterate_batches
from .process_group import gather_rows, shard_bounds, world

__all__ = ["auc_logloss", "evaluate", "evaluate_sharded", "predict"]


@torch.no_grad()
def predict(model: nn.Module, data: Batch, *, batch_size: int = 65536, device: str = "cpu") -> np.ndarray:
    """Click probabilities of every row of ``data``."""
    model.eval()
    out = [
        torch.sigmoid(model(b.dense.to(device), b.sparse.to(device))).float().cpu()
        for b in iterate_batches(data, batch_size)
    ]
    return torch.cat(out).numpy() if out else np.empty(0, dtype=np.float32)


def auc_logloss(labels: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(AUC, logloss) of click probabilities; the AUC is NaN when the labels hold a single class."""
    if not np.isfinite(probs).all():
        # A diverged model (NaN weights) would otherwise surface as scikit-learn's "Input contains NaN".
        raise FloatingPointError(
            f"the model predicted {int((~np.isfinite(probs)).sum())} non-finite probabilities of {len(probs)}: "
            "training diverged (try a lower learning rate)"
        )
    p = np.clip(probs.astype(np.float64), 1e-7, 1 - 1e-7)
    auc = float(roc_auc_score(labels, p)) if 0 < labels.sum() < len(labels) else math.nan
    return auc, float(log_loss(labels, p, labels=[0.0, 1.0]))


def evaluate(model: nn.Module, data: Batch, *, batch_size: int = 65536, device: str = "cpu") -> tuple[float, float]:
    """(AUC, logloss) of ``model`` on ``data``, computed by this process alone (no collective is called)."""
    return _score(model, data, batch_size, device, rank=0, world_size=1)


def evaluate_sharded(model: nn.Module, data: Batch, *, batch_size: int = 65536, device: str = "cpu"
                     ) -> tuple[float, float]:
    """(AUC, logloss) over the whole of ``data``: each rank predicts its shard, all ranks get the same numbers.

    Every rank of the group must call it (it all-gathers); in a single process it is :func:`evaluate`.
    """
    rank, size = world()
    return _score(model, data, batch_size, device, rank=rank, world_size=size)


def _score(model: nn.Module, data: Batch, batch_size: int, device: str, *, rank: int, world_size: int
           ) -> tuple[float, float]:
    """Predict rows ``shard_bounds(len(data), rank, world_size)`` here, gather when ``world_size > 1``, score."""
    if world_size == 1:
        return auc_logloss(data.labels.numpy(), predict(model, data, batch_size=batch_size, device=device))
    lo, hi = shard_bounds(len(data), rank, world_size)
    local = Batch(data.dense[lo:hi], data.sparse[lo:hi], data.labels[lo:hi])
    # The collectives run where the backend lives: nccl gathers CUDA tensors, gloo CPU ones.
    backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    probs = torch.from_numpy(predict(model, local, batch_size=batch_size, device=device)).to(backend_device)
    labels = local.labels.to(backend_device)
    return auc_logloss(gather_rows(labels).cpu().numpy(), gather_rows(probs).cpu().numpy())
