"""Training samples/s of one process vs data-parallel processes (DDP, gloo on CPU) on the synthetic data.

Each configuration trains the same DLRM for one epoch with :func:`embcompress.training.train` and reports its
``samples_per_second`` (global rows per second of training steps, evaluation excluded) and the validation AUC
(gathered over the whole split in the data-parallel runs). Configurations: 1 process with 1 thread, 1 process with
``--threads`` threads, and ``--nproc`` processes with 1 thread each.

    nice .venv/bin/python benchmarks/ddp_speed.py --out benchmarks/results/ddp-cpu.md
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from embcompress import build_model, build_table
from embcompress.distributed import launch
from embcompress.memory import baseline_bytes
from embcompress.synthetic import SyntheticConfig, make_synthetic
from embcompress.training import TrainConfig, train

METHODS = {
    "full.v1 (sparse)": ({"type": "full.v1", "sparse": True}, None),
    "qr.v1 4x": ({"type": "qr.v1"}, 4.0),
    "hashing.v1 16x (sparse)": ({"type": "hashing.v1", "sparse": True}, 16.0),
}


def run_one(method: str, rows: int, batch_size: int, dim: int) -> dict:
    """Train one epoch; in a process group this is data-parallel. Returns rank-local results."""
    data = make_synthetic(SyntheticConfig(rows=rows))
    spec, ratio = METHODS[method]
    spec = dict(spec)
    if ratio:
        spec["budget_bytes"] = baseline_bytes(data.cardinalities, dim) / ratio
    torch.manual_seed(0)
    table = build_table(spec, data.cardinalities, dim)
    model = build_model({"type": "dlrm.v1", "bottom_mlp": [64], "top_mlp": [128, 64]}, table, data.num_dense)
    result = train(model, data, TrainConfig(epochs=1, batch_size=batch_size, lr=0.002, progress=False))
    return {"samples_per_second": result.samples_per_second, "train_seconds": result.train_seconds,
            "val_auc": result.val_auc, "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000, help="synthetic rows (80%% train)")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="threads of the multi-threaded single process")
    parser.add_argument("--repeats", type=int, default=2, help="runs per configuration; the best is reported")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", help="markdown report to write")
    args = parser.parse_args()

    configs = [("1 process x 1 thread", 1, 1), (f"1 process x {args.threads} threads", 1, args.threads),
               (f"{args.nproc} processes x 1 thread (DDP gloo)", args.nproc, 1)]
    rows = []
    for method in args.methods:
        for label, nproc, threads in configs:
            best = None
            for _ in range(args.repeats):
                start = time.perf_counter()
                if nproc == 1:
                    torch.set_num_threads(threads)
                    result = run_one(method, args.rows, args.batch_size, args.dim)
                else:
                    result = launch(run_one, nproc, method, args.rows, args.batch_size, args.dim, threads=threads)[0]
                result["wall_seconds"] = time.perf_counter() - start
                if best is None or result["samples_per_second"] > best["samples_per_second"]:
                    best = result
            rows.append((method, label, best))
            print(f"{method:<24} {label:<32} {best['samples_per_second']:>10,.0f} samples/s  "
                  f"val AUC {best['val_auc']:.4f}  (train {best['train_seconds']:.1f} s, "
                  f"wall {best['wall_seconds']:.1f} s)",
                  flush=True)

    lines = [
        "| method | configuration | train samples/s | vs 1 process x 1 thread | val AUC | train s | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, label, r in rows:
        base = next(b for m, lab, b in rows if m == method and lab == configs[0][0])
        lines.append(f"| {method} | {label} | {r['samples_per_second']:,.0f} | "
                     f"{r['samples_per_second'] / base['samples_per_second']:.2f}x | {r['val_auc']:.4f} | "
                     f"{r['train_seconds']:.1f} | {r['wall_seconds']:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        header = (
            f"# Data-parallel training on CPU: 1 vs {args.nproc} processes\n\n"
            f"Command: `nice .venv/bin/python benchmarks/ddp_speed.py "
            f"--rows {args.rows} --batch-size {args.batch_size} --repeats {args.repeats} --out {args.out}`\n\n"
            f"Machine: {os.cpu_count()} CPU cores (shared with other jobs, so the numbers are noisy), "
            f"torch {torch.__version__}, Python {platform.python_version()}. Synthetic data, {args.rows:,} rows "
            f"({int(args.rows * 0.8):,} train), DLRM (bottom 64, top 128-64), D={args.dim}, global batch "
            f"{args.batch_size}, Adam (SparseAdam for sparse tables), one epoch; best of {args.repeats} runs. "
            "Train samples/s counts global rows over the training steps only (evaluation excluded); wall s includes "
            "data generation, process start-up and evaluation.\n\n"
        )
        Path(args.out).write_text(header + table + "\n")


if __name__ == "__main__":
    main()
