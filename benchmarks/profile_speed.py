"""Where a training step of each speed-suite table spends its time, op by op (torch.profiler, CPU).

Each method is built as ``embcompress bench speed`` builds it (budget, compress step of staged tables,
head, optimizers), run for 3 warm-up steps, timed for N plain steps, then profiled for N steps. The report
gives per method the self-CPU time a step, its split into op categories (``RULES``) and its top ops.
torchrec rows are not profiled; a method that fails to build is reported as failed.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_speed.py [benchmarks/speed.yaml] [--steps 5]
        [--out benchmarks/results/speed-profile-cpu.md] [--methods SUBSTR ...] [--cardinality-divisor N]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import re
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from embcompress.speed import (
    SpeedMethod, SpeedSuite, _Head, build_timed_table, load_speed_suite, timing_labels, training_step, zipf_ids)
from embcompress.training import TrainConfig, make_optimizers

WARMUP = 3
STEP = "train_step"  # record_function around each step: its self time is Python outside any op
# (category, scope, regex, meaning), first match wins. "path": the op or any op enclosing it matches (all
# inside SparseAdam.step or _coalesce counts there); "op": its own name only (a mul counts as element-wise
# only when no enclosing op claimed it). Coalescing comes first: an optimizer's coalesce counts there.
RULES: list[tuple[str, str, str, str]] = [
    ("coalesce", "path", r"coalesce|aten::sort|aten::unique|aten::argsort",
     "sparse-gradient coalescing, id dedup"),
    ("optimizer", "path", r"Optimizer\.", "all inside an optimizer's step / zero_grad, its Python included"),
    ("fused bwd+opt", "path", r"split_embedding_backward", "fbgemm's backward with the row update fused in"),
    ("zero-fill", "op", r"aten::(fill_|zero_)$", "zeroing new tensors (dense gradients, select backward)"),
    ("dense/loss", "path", r"aten::linear|aten::addmm|AddmmBackward|binary_cross_entropy|BinaryCrossEntropy",
     "head and loss, forward and backward (and a table's own linear layers: DHE's MLP)"),
    ("matmul", "op", r"aten::(mm|bmm|matmul|baddbmm|einsum)$", "a table's own matrix products"),
    ("emb bwd", "path", r"EmbeddingBackward|embedding_backward|IndexSelectBackward|aten::(index_add|scatter|"
                        r"index_put)", "embedding backward and scatter-adds"),
    ("gather", "op", r"aten::(embedding|index_select|gather|take|index$)|split_embedding_codegen_forward",
     "row lookups"),
    ("id checks", "op", r"aten::(lt|le|gt|ge|eq|ne|any|all|_assert\w*|is_nonzero|item|_local_scalar_dense|"
                        r"aminmax|min|max)$|bounds_check_indices", "id range checks, comparisons"),
    ("hash ops", "op", r"aten::(remainder|fmod|bitwise_\w+|__\w+__|floor_divide)_?$", "integer hashing ops"),
    ("elementwise", "op", r"aten::(mul|add|sub|rsub|div|where|neg|pow|clamp|addcmul|addcdiv|lerp|sqrt)_?$",
     "element-wise arithmetic no rule above claimed (id offsets, hash multiplies, distances, scaling rows)"),
    ("python", "op", re.escape(STEP) + "$", "the step's own self time: Python between ops"),
]
CATEGORIES = [c for c, *_ in RULES] + ["other"]


def categorize(path: list[str]) -> str:
    """The category of the op at the end of ``path`` (names from the outermost enclosing op down to it)."""
    for cat, scope, pattern, _ in RULES:
        if any(re.search(pattern, n) for n in (path if scope == "path" else path[-1:])):
            return cat
    return "other"


def profile_method(m: SpeedMethod, ids: torch.Tensor, suite: SpeedSuite, steps: int) -> dict:
    """Build ``m`` as ``run_speed`` does, then time and profile the step it times (``speed.training_step``)."""
    cards, dim = suite.cardinalities, suite.embedding_dim
    torch.manual_seed(0)
    table, _ = build_timed_table(m, cards, dim)
    model = _Head(table, len(cards) * dim)
    opts = make_optimizers(model, TrainConfig(optimizer=m.optimizer, device="cpu"))
    labels = timing_labels(suite.batch_size)
    loss_fn, bs, n_batches = nn.BCEWithLogitsLoss(), suite.batch_size, ids.shape[0] // suite.batch_size

    def run(first: int, n: int) -> float:
        start = time.perf_counter()
        for i in range(first, first + n):
            with record_function(STEP):
                training_step(model, ids[(i % n_batches) * bs : (i % n_batches + 1) * bs], labels, loss_fn, opts)
        return (time.perf_counter() - start) / n

    run(0, WARMUP)
    plain = run(WARMUP, steps)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        profiled = run(WARMUP + steps, steps)
    per_op = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in per_op)
    # key_averages() loses the enclosing ops, which tell a hashing mul from an Adam mul: walk the events.
    split: dict[tuple[str, str, str, str], float] = defaultdict(float)  # (op, category, phase, where) -> µs
    for ev in prof.events():
        path, p = [ev.name], ev.cpu_parent
        while p is not None:
            path.insert(0, p.name)
            p = p.cpu_parent
        node = next((n.rpartition(": ")[2] for n in path if n.startswith("autograd::engine")), None)
        ph = "opt" if any(n.startswith("Optimizer.") for n in path) else "bwd" if node else "fwd"
        split[ev.name, categorize(path), ph, node or ph] += ev.self_cpu_time_total
    share = lambda i, v: sum(t for k, t in split.items() if k[i] == v) / total  # noqa: E731
    top = [(e.key, e.self_cpu_time_total, {f"{c} in {w}": t for (n, c, _, w), t in split.items()
                                           if n == e.key}) for e in per_op[:8]]
    return {"plain_ms": plain * 1e3, "profiled_ms": profiled * 1e3, "self_ms": total / steps / 1e3,
            "total": total, "top": top, "shares": {c: share(1, c) for c in CATEGORIES},
            "phases": {p: share(2, p) for p in ("fwd", "bwd", "opt")}}


def report(results: dict[str, dict | str], suite: SpeedSuite, steps: int, load: tuple[float, ...]) -> str:
    cards, cmd = suite.cardinalities, " ".join(shlex.quote(a) for a in sys.argv)
    busy = "running (compare op shares, not absolute ms)" if load[0] > 0.5 else "mostly idle"
    lines = [
        f"# Training-step profile, speed suite ({suite.name}), CPU", "",
        f"Produced by `OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')} python {cmd}` on "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch thread(s), on a shared {os.cpu_count()}-core CPU; load average at "
        f"start (1/5/15 min) {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}: other processes were {busy}.",
        f"Batch {suite.batch_size}, {len(cards)} fields, D={suite.embedding_dim}, {sum(cards):,} rows "
        f"(Criteo Kaggle / {suite.cardinality_divisor}), each table built as `embcompress bench speed` "
        f"builds it (torchrec rows not profiled). {WARMUP} warm-up steps, {steps} plain timed steps, then "
        f"{steps} steps under torch.profiler (CPU, record_shapes=False). Shares are of the profiled steps' "
        "self-CPU time (`key_averages()`, `self_cpu_time_total`), with `python` the whole step.", "",
        "Categories (first matching rule wins; *enclosing*: the op or one it runs inside matches):", ""]
    lines += [f"- **{c}** ({'enclosing' if sc == 'path' else 'op'}): {doc}; `{r}`" for c, sc, r, doc in RULES]
    lines += ["- **other**: everything else (allocation, views, copies, cat, autograd nodes of other ops)",
              "", "| method | step ms (plain) | step ms (profiled) | " + " | ".join(CATEGORIES) + " |",
              "|---|" + "---:|" * (2 + len(CATEGORIES))]
    for name, r in results.items():
        if isinstance(r, str):
            lines.append(f"| {name} | FAILED: {r} |" + " |" * (1 + len(CATEGORIES)))
            continue
        cells = " | ".join(f"{100 * v:.0f}%" if v >= 0.005 else "-" for v in r["shares"].values())
        lines.append(f"| {name} | {r['plain_ms']:.1f} | {r['profiled_ms']:.1f} | {cells} |")
    lines += ["", "## Top ops by self CPU time", "",
              "Each op's share of the step, ms a step, and where its time went (category in fwd, in opt = "
              "inside an optimizer's step / zero_grad, or in the backward's autograd node that ran it); the "
              "step's split into forward / backward / optimizer follows the method's name.", ""]
    for name, r in results.items():
        if isinstance(r, str):  # failed: in the table above
            continue
        phases = ", ".join(f"{p} {100 * v:.0f}%" for p, v in r["phases"].items())
        lines.append(f"**{name}** ({r['self_ms']:.1f} ms self-CPU a step; {phases}):")
        for key, t, where in r["top"]:
            parts = sorted(where.items(), key=lambda kv: -kv[1])
            split = ", ".join(f"{c} {100 * v / t:.0f}%" for c, v in parts if v >= 0.05 * t) if t else ""
            lines.append(f"- `{key}` {100 * t / r['total']:.1f}% ({t / steps / 1e3:.2f} ms; {split})")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite", nargs="?", default="benchmarks/speed.yaml")
    ap.add_argument("--out", default="benchmarks/results/speed-profile-cpu.md")
    ap.add_argument("--methods", nargs="*", default=None, help="keep the methods whose name has one")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--cardinality-divisor", type=int, default=None, help="override the suite's")
    args = ap.parse_args()
    load = os.getloadavg()  # before our own work raises it
    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    suite = load_speed_suite(args.suite)
    if args.cardinality_divisor:
        suite = dataclasses.replace(suite, cardinality_divisor=args.cardinality_divisor)
    methods = [m for m in suite.methods if not m.table["type"].startswith("torchrec")
               and (not args.methods or any(s in m.name for s in args.methods))]
    ids = zipf_ids(suite.cardinalities, 4 * suite.batch_size)  # the 4 batches run_speed cycles through
    results: dict[str, dict | str] = {}
    for m in methods:
        t0 = time.perf_counter()
        try:
            r = results[m.name] = profile_method(m, ids, suite, args.steps)
            print(f"{m.name}: {r['profiled_ms']:.1f} ms a profiled step, {time.perf_counter() - t0:.0f} s "
                  "in all", flush=True)
        except Exception as err:  # reported as run_speed reports it; the others are still profiled
            results[m.name] = f"{type(err).__name__}: {err}"
            print(f"{m.name}: FAILED {results[m.name]}", flush=True)
    Path(args.out).write_text(report(results, suite, args.steps, load) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
