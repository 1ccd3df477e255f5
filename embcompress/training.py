"""A plain training loop for CTR models: epochs of shuffled batches, AUC/logloss on held-out data, early stop.

Tables that produce sparse gradients (``sparse=True``) get a sparse optimizer for those parameters
(``SparseAdam`` beside Adam, sparse ``Adagrad`` beside Adagrad), so only the rows a batch touched are updated;
everything else gets the dense optimizer.

Inside an initialised ``torch.distributed`` process group of several processes (``torchrun``, ``embcompress
bench run --nproc N``) the same loop trains data-parallel. One step function, :func:`train_step`, serves both: a
context from :func:`embcompress.distributed.step_context` supplies the module to call (the model, or its
``DistributedDataParallel`` wrapper), the batches (all rows, or this rank's slice of every global batch), the loss
weighting by the global batch size and the sparse-gradient sync (nothing, in one process). Metrics are computed
over whole splits by :func:`embcompress.evaluation.evaluate_sharded` (gathered over the ranks in a group).

:func:`predict` and :func:`evaluate` live in :mod:`embcompress.evaluation` and are re-exported here.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .contract import CompressedEmbedding, IdError
from .validate import check_bool, check_choice, check_int, check_number, check_positive_int, check_positive_number
from .data import Batch, CTRData
from .distributed import LocalContext, all_sum, step_context
from .evaluation import auc_logloss, evaluate, evaluate_sharded, predict
from .memory import optimizer_state_bytes

__all__ = ["TrainConfig", "TrainResult", "train", "train_step", "evaluate", "predict", "auc_logloss",
           "make_optimizers", "regularization", "tables_of", "table_optimizer_bytes", "OPTIMIZERS"]

OPTIMIZERS = ("adam", "adagrad", "sgd")


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
    batch_size: int = 4096
    lr: float = 1e-3
    optimizer: str = "adam"
    patience: int = 1  # epochs without a better validation AUC before stopping
    seed: int = 0
    device: str = "cpu"
    eval_batch_size: int = 65536
    progress: bool = True
    embedding_lr: float | None = None  # learning rate of the tables (default: lr)
    weight_decay: float = 0.0  # dense layers
    embedding_weight_decay: float = 0.0  # table parameters with dense gradients
    # L2 on the vectors the tables return for a batch, sum over fields and width, mean over samples: it reaches
    # sparse-gradient tables too (only the rows a batch touched get its gradient) and every method alike.
    embedding_l2: float = 0.0
    lr_decay: float = 0.1  # learning rates are multiplied by this after an epoch without a better val AUC
    checkpoint: str | None = None  # file for the best weights (default: kept in memory)

    def __post_init__(self) -> None:
        check_choice("optimizer", self.optimizer, OPTIMIZERS, owner="TrainConfig")
        for name in ("epochs", "batch_size", "eval_batch_size", "patience"):
            check_positive_int(name, getattr(self, name), owner="TrainConfig")
        check_int("seed", self.seed, lo=0, owner="TrainConfig")
        check_bool("progress", self.progress, owner="TrainConfig")
        for name in ("lr", "embedding_lr"):
            check_positive_number(name, getattr(self, name), optional=name == "embedding_lr", owner="TrainConfig")
        for name in ("weight_decay", "embedding_weight_decay", "embedding_l2"):
            check_number(name, getattr(self, name), lo=0, owner="TrainConfig")
        check_number("lr_decay", self.lr_decay, lo=0, hi=1, lo_open=True, owner="TrainConfig")
        if not isinstance(self.device, str):
            raise ValueError(f"TrainConfig: device must be a string like 'cpu' or 'cuda', got {self.device!r}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} requested but CUDA is not available here")


@dataclass
class TrainResult:
    val_auc: float
    val_logloss: float
    test_auc: float
    test_logloss: float
    best_epoch: int
    train_seconds: float
    samples_per_second: float
    history: list[dict] = field(default_factory=list)
    #: Bytes of the state the optimizers hold for the tables' parameters at the end of training (Adam's two
    #: moments and step, Adagrad's sum and step, ...), read off the optimizers' own state tensors
    #: (:func:`embcompress.memory.optimizer_state_bytes`); in a process group, this rank's (each rank holds the
    #: state of its replica of the tables). A table's training bytes are its stored bytes plus these.
    table_optimizer_bytes: int = 0


def tables_of(model: nn.Module) -> list[CompressedEmbedding]:
    """The outermost tables of ``model``: a table that wraps another (a frequency remap) answers for it, so
    nothing is optimised or regularised twice."""
    inner = {id(sub) for m in model.modules() if isinstance(m, CompressedEmbedding)
             for sub in m.modules() if sub is not m and isinstance(sub, CompressedEmbedding)}
    return [m for m in model.modules() if isinstance(m, CompressedEmbedding) and id(m) not in inner]


def make_optimizers(model: nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Dense layers, table parameters with dense gradients, and sparse-gradient table parameters, each with
    their learning rate and weight decay; sparse ones under an optimizer that takes sparse gradients."""
    tables = tables_of(model)
    sgd_groups = [g for t in tables for g in t.sgd_parameter_groups()]
    own_ids = {id(p) for g in sgd_groups for p in g["params"]}
    # A row table held quantized (train_quantized) is no parameter: its own optimizer trains it (row_optimizers).
    sparse = [p for t in tables for p in t.sparse_parameters()
              if isinstance(p, nn.Parameter) and p.requires_grad and id(p) not in own_ids]
    table_params = {id(p) for t in tables for p in t.parameters()}
    sparse_ids = {id(p) for p in sparse} | own_ids
    dense = [p for p in model.parameters() if p.requires_grad and id(p) not in table_params]
    table_dense = [p for t in tables for p in t.parameters() if p.requires_grad and id(p) not in sparse_ids]
    undecayed = {id(p) for t in tables for p in t.undecayed_parameters()}
    emb_lr = cfg.embedding_lr or cfg.lr
    if cfg.embedding_weight_decay and any(t.trains_rows_itself() for t in tables):
        raise ValueError(f"embedding_weight_decay={cfg.embedding_weight_decay}: rows the table trains "
                         "itself (train_quantized, ALPT, fused_optimizer) get no weight decay from its optimizer")
    if sparse and cfg.embedding_weight_decay:
        raise ValueError(
            f"embedding_weight_decay={cfg.embedding_weight_decay} needs dense table gradients: {cfg.optimizer}'s "
            "sparse update has no weight decay; use embedding_l2 (L2 on the looked-up vectors), or build the table "
            "with sparse=False"
        )
    groups = [
        {"params": dense, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": [p for p in table_dense if id(p) not in undecayed], "lr": emb_lr,
         "weight_decay": cfg.embedding_weight_decay},
        {"params": [p for p in table_dense if id(p) in undecayed], "lr": emb_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    # Parameters a table asks to update with plain SGD at their own rate (OptEmbed's thresholds), and rows it
    # trains itself.
    own = [torch.optim.SGD(sgd_groups)] if sgd_groups else []
    own += [opt for t in tables for opt in t.row_optimizers(emb_lr, seed=cfg.seed)]
    if cfg.optimizer == "adam":
        opts: list[torch.optim.Optimizer] = [torch.optim.Adam(groups)] if groups else []
        if sparse:
            opts.append(torch.optim.SparseAdam(sparse, lr=emb_lr))
        return opts + own
    if sparse:  # Adagrad and plain SGD take sparse gradients themselves
        groups.append({"params": sparse, "lr": emb_lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adagrad if cfg.optimizer == "adagrad" else torch.optim.SGD
    return ([optimizer(groups)] if groups else []) + own


def regularization(model: nn.Module) -> torch.Tensor | None:
    """The sum of the tables' own loss terms (OptEmbed's threshold regulariser); None when no table has one."""
    terms = [t.regularization_loss() for t in tables_of(model)]
    terms = [t for t in terms if t is not None]
    return torch.stack([t.reshape(()) for t in terms]).sum() if terms else None


class _OutputL2:
    """Collects ``sum ||e||^2`` of every vector the tables return in a forward pass (forward hooks), so the loss
    can add ``weight * that / batch``; tables called through ``forward_bags`` directly are not seen."""

    def __init__(self, model: nn.Module, weight: float) -> None:
        self.weight = weight
        self.total: torch.Tensor | None = None
        self.handles = [t.register_forward_hook(self._hook) for t in tables_of(model)]

    def _hook(self, module, inputs, output) -> None:
        if module.training:
            term = output.float().pow(2).sum()
            self.total = term if self.total is None else self.total + term

    def pop(self) -> torch.Tensor:
        """``weight * sum ||e||^2`` over this forward pass (summed over rows, not yet a mean); resets."""
        total, self.total = self.total, None
        if total is None:
            raise RuntimeError("embedding_l2 is set but no table was called in the forward pass")
        return self.weight * total

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def train(model: nn.Module, data: CTRData, cfg: TrainConfig | None = None) -> TrainResult:
    """Train ``model(dense, sparse) -> logits`` on ``data``'s train split; report val/test at the best epoch."""
    cfg = cfg or TrainConfig()
    output_l2 = _OutputL2(model, cfg.embedding_l2) if cfg.embedding_l2 > 0 else None
    try:
        return _train(model, data, cfg, output_l2)
    except IdError as err:
        # The table names a position in a shuffled batch; the data row and field name are what a user can fix.
        tables = tables_of(model)
        # The table's own limits where one table reads every field (hashed fields take any id).
        limits = (list(tables[0].id_limits()) if len(tables) == 1 and tables[0].num_fields == len(data.cardinalities)
                  else None)
        where = next((w for w in (data.bad_id(s, limits) for s in ("train", "val", "test")) if w), None)
        if where is None:
            raise
        raise IdError(f"{where} ({err})") from err
    finally:
        if output_l2 is not None:
            output_l2.close()


def train_step(ctx: LocalContext, model: nn.Module, optimizers: list[torch.optim.Optimizer], batch: Batch,
               global_size: int, *, regularized: bool = False, output_l2: _OutputL2 | None = None) -> float:
    """One optimisation step on ``batch``, this process's rows of a batch of ``global_size`` rows.

    The same body in one process and in a process group: ``ctx`` supplies the module to call (the model or its DDP
    wrapper), the loss (the batch mean, or this rank's share of the global mean) and the weighting of per-row
    terms alike, and the sparse-gradient sync after backward. Table regularisers (``regularized``: OptEmbed's
    threshold term) are computed on the unwrapped ``model``. Returns this process's share of the batch's summed
    BCE (``loss * global_size / world_size``), so the ranks' shares add up to the batch's summed loss.
    """
    loss = ctx.loss(ctx.module(batch.dense, batch.sparse), batch.labels, global_size)
    objective = loss + regularization(model) if regularized else loss
    if output_l2 is not None:  # this process's rows, weighted like its loss
        objective = objective + ctx.per_row(output_l2.pop(), global_size)
    for opt in optimizers:
        opt.zero_grad(set_to_none=True)
    objective.backward()
    ctx.sync_sparse_grads()
    for opt in optimizers:
        opt.step()
    return loss.item() * global_size / ctx.world_size


def _train(model: nn.Module, data: CTRData, cfg: TrainConfig, output_l2: "_OutputL2 | None") -> TrainResult:
    model.to(cfg.device)
    opts = make_optimizers(model, cfg)
    ctx = step_context(model, cfg.device)  # the model itself, or its DDP wrapper inside a process group
    regularized = regularization(model) is not None
    gen = torch.Generator().manual_seed(cfg.seed)
    train_split, val_split = data.split("train"), data.split("val")
    for name, split in (("train", train_split), ("val", val_split)):
        if len(split) == 0:
            raise ValueError(f"{data.name}: the {name} split is empty; training needs rows in train and val")
    collective_device = "cuda" if cfg.device.startswith("cuda") else "cpu"
    # Metrics over whole splits: gathered over the ranks in a process group, this process's own otherwise.
    score = evaluate_sharded
    best_auc, best_epoch, best_state, bad_epochs = -math.inf, 0, None, 0
    history: list[dict] = []
    seconds = 0.0
    samples = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = tqdm(
            ctx.batches(train_split, cfg.batch_size, gen),
            total=math.ceil(len(train_split) / cfg.batch_size),
            desc=f"epoch {epoch}/{cfg.epochs}",
            # None: no bars when not a terminal; none on ranks other than 0
            disable=None if cfg.progress and ctx.rank == 0 else True,
            leave=False,
        )
        running = 0.0
        start = time.perf_counter()
        for batch, size in batches:
            running += train_step(ctx, model, opts, batch.to(cfg.device), size, regularized=regularized,
                                  output_l2=output_l2)
            samples += size
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds += time.perf_counter() - start
        running = all_sum(running, collective_device)  # the epoch's summed loss over the ranks
        val_auc, val_loss = score(model, val_split, batch_size=cfg.eval_batch_size, device=cfg.device)
        history.append({"epoch": epoch, "train_logloss": running / len(train_split), "val_auc": val_auc,
                        "val_logloss": val_loss, "lr": opts[0].param_groups[0]["lr"] if opts else None})
        if val_auc > best_auc:
            best_auc, best_epoch, bad_epochs = val_auc, epoch, 0
            if cfg.checkpoint and ctx.rank == 0:  # only rank 0 writes
                torch.save(model.state_dict(), cfg.checkpoint)
            if not cfg.checkpoint or ctx.world_size > 1:  # other ranks keep theirs in memory
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
            if bad_epochs >= cfg.patience:
                break
            for opt in opts:
                for group in opt.param_groups:
                    group["lr"] *= cfg.lr_decay
    if cfg.checkpoint and best_epoch and ctx.world_size == 1:
        best_state = torch.load(cfg.checkpoint, map_location=cfg.device, weights_only=True)
    if best_state is not None:
        model.load_state_dict(best_state)
    val_auc, val_loss = score(model, val_split, batch_size=cfg.eval_batch_size, device=cfg.device)
    test_auc, test_loss = score(model, data.split("test"), batch_size=cfg.eval_batch_size, device=cfg.device)
    return TrainResult(
        val_auc=val_auc, val_logloss=val_loss, test_auc=test_auc, test_logloss=test_loss,
        best_epoch=best_epoch, train_seconds=seconds,
        samples_per_second=samples / seconds if seconds > 0 else math.nan, history=history,
        table_optimizer_bytes=table_optimizer_bytes(model, opts),
    )


def table_optimizer_bytes(model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> int:
    """Bytes of the state ``optimizers`` hold for the parameters of ``model``'s tables (:func:`tables_of`; a
    parameter two tables share is counted once)."""
    held = {id(p): p for t in tables_of(model) for p in itertools.chain(t.parameters(), t.buffers())}
    return sum(optimizer_state_bytes(optimizers, held.values()).values())
