"""Speed of the tables themselves: training-step samples/s and inference latency, measured in one run.

Each table is built at a budget over a Criteo-sized vocabulary (Criteo Kaggle cardinalities divided by
``cardinality_divisor``: 3.4M rows at the default 10) and trained on Zipf-distributed ids through a small
linear head, with the optimizers the training loop gives it (``SparseAdam`` for sparse-gradient tables,
``Adam`` otherwise; a method may name ``adagrad`` or ``sgd`` instead). The ratios compare each method with the
fastest ``full.v1`` configuration of the same run, and with the fastest torchrec configuration when torchrec is
installed: ``EmbeddingBagCollection`` with dense gradients under the same ``Adam``, and
``FusedEmbeddingBagCollection``, whose fbgemm kernels apply the optimizer inside the backward pass (fused Adam on
CUDA; fbgemm's CPU kernels have no fused Adam, so fused Adagrad there; the row names the optimizer).
Tables that train in stages (OptEmbed) are timed as the supernet trains and served as their export; for a speed
run the export keeps random rows at full width up to the budget (the lookup does not depend on which rows).
Timings are medians over repeats; nothing here is asserted in tests, the numbers are reported.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .memory import baseline_bytes
from .registry import TABLES, SpecError, build_table, check_table_options
from .suite_check import check_known_keys, lookup, read_suite_yaml
from .synthetic import CRITEO_KAGGLE_CARDINALITIES
from .training import TrainConfig, make_optimizers as _optimizers, regularization as _regularization

__all__ = ["SpeedSuite", "load_speed_suite", "run_speed", "format_speed"]

_KEYS = ("name", "batch_size", "embedding_dim", "cardinality_divisor", "steps", "repeats", "torchrec", "methods")
_OPTIMIZERS = ("adam", "adagrad", "sgd")
TORCHREC_NAME = "torchrec EmbeddingBagCollection"


@dataclass(frozen=True)
class SpeedMethod:
    name: str
    table: dict[str, Any]
    ratio: float | None = None  # compression target; None: the table as specified
    optimizer: str = "adam"


@dataclass(frozen=True)
class SpeedSuite:
    name: str
    methods: tuple[SpeedMethod, ...]
    batch_size: int = 4096
    embedding_dim: int = 16
    cardinality_divisor: int = 10
    steps: int = 30
    repeats: int = 50
    torchrec: bool = True

    @property
    def cardinalities(self) -> tuple[int, ...]:
        return tuple(max(1, n // self.cardinality_divisor) for n in CRITEO_KAGGLE_CARDINALITIES)


def load_speed_suite(path: str | os.PathLike) -> SpeedSuite:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"speed suite file {str(path)!r} does not exist")
    raw = read_suite_yaml(path)  # a syntax error names the file and line
    where = str(path)
    if not isinstance(raw, dict) or not raw.get("methods"):
        raise SpecError(f"{where}: a speed suite is a mapping with a non-empty 'methods' list")
    check_known_keys(raw, _KEYS, where)
    methods = []
    for i, m in enumerate(raw["methods"]):
        mwhere = f"{where}: methods[{i}]"
        if not isinstance(m, dict) or "table" not in m:
            raise SpecError(f"{mwhere}: each method needs a 'table' spec")
        check_known_keys(m, ("name", "table", "compression", "optimizer"), mwhere)
        table = dict(m["table"])
        cls = lookup(TABLES, table.get("type"), f"{mwhere}: table")
        ratio = m.get("compression")
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 0):
            raise SpecError(f"{mwhere}: compression must be a positive number, got {ratio!r}")
        options = {k: v for k, v in table.items() if k != "type"}
        check_table_options(cls, {**options, **({"budget_bytes": 1} if ratio else {})}, mwhere)
        optimizer = m.get("optimizer", "adam")
        if optimizer not in _OPTIMIZERS:
            raise SpecError(f"{mwhere}: optimizer must be one of {', '.join(_OPTIMIZERS)}, got {optimizer!r}")
        methods.append(SpeedMethod(str(m.get("name", table["type"])), table, float(ratio) if ratio else None,
                                   optimizer))
    options = {k: raw[k] for k in _KEYS if k in raw and k not in ("name", "methods")}
    for key, value in options.items():
        if key != "torchrec" and (not isinstance(value, int) or value < 1):
            raise SpecError(f"{where}: {key} must be a positive int, got {value!r}")
    return SpeedSuite(name=str(raw.get("name", path.stem)), methods=tuple(methods), **options)


def zipf_ids(cardinalities, rows: int, *, exponent: float = 1.05, seed: int = 0) -> torch.Tensor:
    """``LongTensor[rows, F]`` of frequency-ranked ids drawn from a Zipf law per field."""
    rng = np.random.default_rng(seed)
    cols = []
    for n in cardinalities:
        cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
        cols.append(np.minimum(np.searchsorted(cdf / cdf[-1], rng.random(rows)), n - 1))
    return torch.from_numpy(np.stack(cols, axis=1).astype(np.int64))


class _Head(nn.Module):
    """The smallest model that makes every output coordinate matter: a linear map of the flattened vectors."""

    def __init__(self, embeddings: nn.Module, width: int) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.linear = nn.Linear(width, 1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embeddings(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.lookup(ids).flatten(1)).squeeze(-1)


class _TorchrecHead(nn.Module):
    def __init__(self, ebc: nn.Module, keys: list[str], width: int, *, fused: bool = False) -> None:
        super().__init__()
        self.ebc, self.keys, self.fused = ebc, keys, fused
        self.linear = nn.Linear(width, 1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        from torchrec import KeyedJaggedTensor

        lengths = torch.ones(ids.numel(), dtype=torch.int32, device=ids.device)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=ids.t().reshape(-1), lengths=lengths)
        return self.ebc(kjt).values()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.linear(self.lookup(ids)).squeeze(-1)


def _fused_optimizer(device: str) -> type[torch.optim.Optimizer]:
    # fbgemm fuses Adam on CUDA only; on the CPU its kernels fuse SGD and Adagrad.
    return torch.optim.Adam if device.startswith("cuda") else torch.optim.Adagrad


def _torchrec_model(kind: str, cards, dim: int, device: str, lr: float) -> _TorchrecHead:
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, PoolingType

    keys = [f"C{i + 1}" for i in range(len(cards))]
    configs = [
        EmbeddingBagConfig(name=f"t_{k}", embedding_dim=dim, num_embeddings=n, feature_names=[k],
                           pooling=PoolingType.SUM)
        for k, n in zip(keys, cards)
    ]
    if kind == "torchrec":
        return _TorchrecHead(EmbeddingBagCollection(tables=configs, device=torch.device(device)), keys,
                             len(cards) * dim)
    from torchrec.modules.fused_embedding_modules import FusedEmbeddingBagCollection

    ebc = FusedEmbeddingBagCollection(tables=configs, optimizer_type=_fused_optimizer(device),
                                      optimizer_kwargs={"lr": lr}, device=torch.device(device))
    return _TorchrecHead(ebc, keys, len(cards) * dim, fused=True).to(device)


# Staged tables whose compression step runs on untrained weights as well: applied before timing, so the training
# step timed is the retraining one and the served table is the compressed export.
_COMPRESS_UNTRAINED = {
    "dedup.v1": lambda t: t.dedup_(),
    "pep.v1": lambda t: t.prune_(),
    "deeplight.v1": lambda t: t.prune_(),
    "autosrh.v1": lambda t: t.prune_(),
}


def _served_table(table, budget: float) -> nn.Module:
    """What ``table`` serves: a staged table's export at the budget (its search is not run here), the export of
    one that serves another table (rows at a lower precision, codes and codebooks), a supernet's table of the
    widths it would choose now (AutoDim), or the table itself."""
    if getattr(table, "registry_name", "") == "optembed.v1":  # its search would pick the rows; not run here
        return _export_at_budget(table, budget)
    if hasattr(table, "served_table"):
        table = table.served_table()
    return table.export() if table.serving_bytes() is not None else table


def _export_at_budget(table, budget: float, seed: int = 0) -> nn.Module:
    """A staged table's deployable form at ``budget``: random rows kept at full width (speed only)."""
    from .tables.optembed import OptEmbedExport

    cards, dim = table.cardinalities, table.embedding_dim
    floor = OptEmbedExport.storage_bytes(cards, dim, [0] * len(cards), [dim] * len(cards))
    rows = sum(cards)
    keep = max(0, min(rows, int((budget - floor) // (4 * dim))))
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[torch.randperm(rows, generator=torch.Generator().manual_seed(seed))[:keep]] = True
    return OptEmbedExport.from_rows(cards, dim, table.weight.detach(), mask, [dim] * len(cards))


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def build_timed_table(m: SpeedMethod, cards: tuple[int, ...], dim: int) -> tuple[nn.Module, float | None]:
    """``(table, budget bytes or None)`` of method ``m`` as the suite times it: built to its budget, and a staged
    table compressed on its untrained weights first, so that the step timed is its retraining one."""
    budget = baseline_bytes(cards, dim) / m.ratio if m.ratio else None
    table = build_table(dict(m.table, **({"budget_bytes": budget} if budget else {})), cards, dim)
    compress = _COMPRESS_UNTRAINED.get(getattr(table, "registry_name", ""))
    if compress is not None:
        compress(table)
    return table, budget


def timing_labels(batch_size: int) -> torch.Tensor:
    """The fixed labels of every timed step (a quarter positive, seeded)."""
    return (torch.rand(batch_size, generator=torch.Generator().manual_seed(1)) < 0.25).float()


def training_step(model: nn.Module, batch: torch.Tensor, labels: torch.Tensor, loss_fn: nn.Module,
                  opts: list[torch.optim.Optimizer]) -> None:
    """The step the suite times: forward, the tables' own loss terms (OptEmbed's thresholds), backward, and
    every optimizer (the tables' own ones included)."""
    loss = loss_fn(model(batch), labels)
    extra = _regularization(model)
    if extra is not None:
        loss = loss + extra
    for opt in opts:
        opt.zero_grad(set_to_none=True)
    loss.backward()
    for opt in opts:
        opt.step()


def _time_training(model: nn.Module, ids: torch.Tensor, suite: SpeedSuite, device: str, optimizer: str) -> float:
    cfg = TrainConfig(optimizer=optimizer, device=device)
    # A fused torchrec table updates itself inside backward: only the head has an optimizer here.
    opts = [torch.optim.Adam(model.linear.parameters(), lr=cfg.lr)] if getattr(model, "fused", False) \
        else _optimizers(model, cfg)
    labels = timing_labels(suite.batch_size).to(device)
    loss_fn = nn.BCEWithLogitsLoss()
    n_batches = ids.shape[0] // suite.batch_size
    warmup = 3
    for step in range(warmup + suite.steps):
        if step == warmup:
            _sync(device)
            start = time.perf_counter()
        batch = ids[(step % n_batches) * suite.batch_size : (step % n_batches + 1) * suite.batch_size]
        training_step(model, batch, labels, loss_fn, opts)
    _sync(device)
    return suite.steps * suite.batch_size / (time.perf_counter() - start)


@torch.no_grad()
def _latency(model: nn.Module, ids: torch.Tensor, batch: int, repeats: int, device: str) -> float:
    """Median seconds of one forward pass of the table at ``batch`` rows."""
    model.eval()
    x = ids[:batch]
    times = []
    for i in range(repeats + 3):
        _sync(device)
        start = time.perf_counter()
        model.lookup(x)
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    model.train()
    return statistics.median(times)


def run_speed(suite: SpeedSuite, *, device: str = "cpu", progress: bool = True) -> list[dict]:
    """Measure every method of ``suite`` (and torchrec's EBCs when asked and installed) in this process."""
    from tqdm.auto import tqdm

    cards, dim = suite.cardinalities, suite.embedding_dim
    base = baseline_bytes(cards, dim)
    n_batches = 4
    ids = zipf_ids(cards, n_batches * suite.batch_size).to(device)
    entries = list(suite.methods)
    torchrec_ok = False
    if suite.torchrec:
        try:
            import torchrec  # noqa: F401

            fused = _fused_optimizer(device).__name__
            entries += [SpeedMethod(f"{TORCHREC_NAME} (dense grads, Adam)", {"type": "torchrec"}),
                        SpeedMethod(f"torchrec FusedEmbeddingBagCollection (fused {fused})", {"type": "torchrec-fused"})]
            torchrec_ok = True
        except ImportError:
            pass
    records = []
    for m in tqdm(entries, desc=f"speed {suite.name}", disable=None if progress else True):
        torch.manual_seed(0)
        try:
            budget = None
            torchrec_kind = m.table["type"].startswith("torchrec")
            if torchrec_kind:
                model = _torchrec_model(m.table["type"], cards, dim, device, TrainConfig().lr)
            else:  # a staged table is timed as it retrains (fine-tunes) and serves
                table, budget = build_timed_table(m, cards, dim)
                model = _Head(table, len(cards) * dim).to(device)
            train_speed = _time_training(model, ids, suite, device, m.optimizer)
            if torchrec_kind:
                served, table_bytes = model, sum(p.numel() * p.element_size() for p in model.ebc.parameters())
            else:  # a table that serves another table (an export) is timed serving that one
                served = _Head(_served_table(table, budget or base), len(cards) * dim).to(device)
                table_bytes = served.embeddings.memory_report().total_bytes
            record = {
                "method": m.name, "table": m.table, "target_ratio": m.ratio, "optimizer": m.optimizer,
                "bytes": table_bytes, "ratio": base / table_bytes, "train_samples_per_second": train_speed,
                "latency_b1_s": _latency(served, ids, 1, suite.repeats, device),
                "latency_b1024_s": _latency(served, ids, 1024, suite.repeats, device),
                "status": "ok",
            }
        except Exception as err:  # one failing method is reported; the others are still measured
            record = {"method": m.name, "table": m.table, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        records.append(record)
        model = served = table = None  # free this one's tables before the next is built
    if suite.torchrec and torchrec_ok and device == "cpu":  # fbgemm's CPU n-bit kernels; serving only
        records += _torchrec_quantized_serving(suite, cards, dim, base, ids, device)
    ok = [r for r in records if r["status"] == "ok"]
    trained = [r for r in ok if r["train_samples_per_second"] is not None]
    fastest_full = max((r["train_samples_per_second"] for r in trained if r["table"]["type"] == "full.v1"),
                       default=None)
    fastest_torchrec = max((r["train_samples_per_second"] for r in trained
                            if r["table"]["type"].startswith("torchrec")), default=None)
    for r in ok:
        speed = r["train_samples_per_second"]
        r["vs_full"] = speed / fastest_full if fastest_full and speed is not None else None
        r["vs_torchrec"] = speed / fastest_torchrec if fastest_torchrec and speed is not None else None
    return records


def _torchrec_quantized_serving(suite: SpeedSuite, cards, dim: int, base: int, ids: torch.Tensor,
                                device: str) -> list[dict]:
    """Lookup latency of torchrec's quantized collections serving a full table's rows (there is no training
    step: they are inference modules), beside our own exports at the same precisions."""
    from .tables.full import FullEmbedding
    from .torchrec import quantized_collection

    keys = [f"C{i + 1}" for i in range(len(cards))]
    table = FullEmbedding(cards, dim).set_field_names(keys)
    records = []
    for precision in ("fp16", "int8", "int4"):
        name = f"torchrec quantized collection, {precision} rows (serving only)"
        try:
            collection = quantized_collection(table, precision)
            served = _TorchrecHead(collection, keys, len(cards) * dim)
            records.append({
                "method": name, "table": {"type": f"torchrec-quant-{precision}"}, "target_ratio": None,
                "optimizer": None, "bytes": collection.stored_bytes(), "ratio": base / collection.stored_bytes(),
                "train_samples_per_second": None,
                "latency_b1_s": _latency(served, ids, 1, suite.repeats, device),
                "latency_b1024_s": _latency(served, ids, 1024, suite.repeats, device), "status": "ok",
            })
        except Exception as err:  # reported like any failing method
            records.append({"method": name, "table": {"type": f"torchrec-quant-{precision}"}, "status": "failed",
                            "error": f"{type(err).__name__}: {err}"})
    return records


def format_speed(records: list[dict], suite: SpeedSuite, device: str) -> str:
    cards = suite.cardinalities
    lines = [
        f"Batch {suite.batch_size}, {len(cards)} fields, D={suite.embedding_dim}, vocabulary {sum(cards):,} rows "
        f"(Criteo Kaggle / {suite.cardinality_divisor}), device {device}; training step = forward + backward + "
        f"optimizer over a linear head, throughput over {suite.steps} timed steps after 3 warm-up steps; latency = median of "
        f"{suite.repeats} forward passes of the served table (OptEmbed: its export, random rows kept at full width "
        "up to the budget).",
        "",
        "| method | target | bytes | ratio | train samples/s | vs fastest full | vs fastest torchrec "
        "| latency b=1 (µs) | latency b=1024 (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | FAILED: {r['error']} |||||||")
            continue
        fmt = lambda v: f"{v:.2f}x" if v is not None else "n/a"  # noqa: E731
        target = f"{r['target_ratio']:g}x" if r["target_ratio"] else "-"
        speed = r["train_samples_per_second"]
        lines.append(
            f"| {r['method']} | {target} | {r['bytes']:,} | {r['ratio']:.1f}x | "
            f"{f'{speed:,.0f}' if speed is not None else 'serving only'} "
            f"| {fmt(r['vs_full'])} | {fmt(r['vs_torchrec'])} | {r['latency_b1_s'] * 1e6:,.0f} "
            f"| {r['latency_b1024_s'] * 1e3:,.2f} |"
        )
    return "\n".join(lines)
