"""Criteo TSV pipeline benchmark: generate a Kaggle-profile file, then time prepare_criteo against readers.

    .venv/bin/python benchmarks/criteo_pipeline.py --rows 5000000 --out /tmp/x

Measures, on one generated ``train.txt``-format file (label, I1..I13, C1..C26, tab separated):

* ``prepare_criteo`` end to end (both passes, all outputs) in a subprocess: rows/s and peak RSS
  (``resource.getrusage(RUSAGE_CHILDREN).ru_maxrss``);
* pandas ``read_csv`` (C engine, ``sep='\\t'``, ``header=None``, default dtypes, streamed in chunks) rows/s;
* ``pyarrow.csv.read_csv`` of the whole file rows/s (default threads);
* ``embcompress.data.iterate_batches`` over ``load_criteo(...).split("train")`` (batch 4096, shuffled) samples/s.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embcompress.synthetic import CRITEO_KAGGLE_CARDINALITIES  # noqa: E402

_HEXDIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_DENSE_W = 7  # max rendered width of a dense value (sign + 6 digits)


def _render_ints(x: np.ndarray, missing: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Right-aligned ASCII of ints in [-99999, 999999] as (n, _DENSE_W) bytes and the keep mask."""
    n = len(x)
    mag = np.abs(x)
    digits = np.empty((n, _DENSE_W), dtype=np.uint8)
    ndig = np.ones(n, dtype=np.int64)
    v = mag.copy()
    for k in range(_DENSE_W - 1, -1, -1):
        digits[:, k] = 48 + v % 10
        v //= 10
    for k in range(1, _DENSE_W):
        ndig += mag >= 10 ** k
    neg = x < 0
    width = ndig + neg
    keep = np.arange(_DENSE_W)[None, :] >= (_DENSE_W - width)[:, None]
    sign_pos = _DENSE_W - width
    rows = np.flatnonzero(neg)
    digits[rows, sign_pos[rows]] = ord("-")
    keep &= ~missing[:, None]
    return digits, keep


def generate_chunk(rng: np.random.Generator, n: int) -> bytes:
    """``n`` Criteo-format lines (vectorised: a fixed-width byte matrix, then the kept bytes)."""
    cards = np.asarray(CRITEO_KAGGLE_CARDINALITIES, dtype=np.float64)
    parts, masks = [], []

    def field(mat, keep):
        parts.append(mat)
        masks.append(keep)

    def tab():
        parts.append(np.full((n, 1), 9, np.uint8))
        masks.append(np.ones((n, 1), bool))

    label = (rng.random(n) < 0.256).astype(np.uint8) + 48
    field(label[:, None], np.ones((n, 1), bool))
    for j in range(13):
        # heavy-tailed counts, a few -1/-2 like Criteo's I2, 0-45% missing depending on the column
        # capped before the cast: expm1 overflows to inf about once in 10M draws of the heaviest columns
        x = np.floor(np.minimum(np.expm1(rng.exponential(1.0 + 0.4 * (j % 5), n)), 999_999)).astype(np.int64)
        if j in (1, 5):
            neg = rng.random(n) < 0.05
            x[neg] = -rng.integers(1, 4, neg.sum())
        missing = rng.random(n) < (0.45 * ((j * 7) % 13) / 12)
        tab()
        field(*_render_ints(x, missing))
    for f, card in enumerate(cards):
        # Zipf-like ranks (log-uniform over [1, card]), hashed to a 32-bit value, rendered as 8 hex digits
        rank = np.floor(np.exp(rng.random(n) ** 1.3 * np.log(card + 1))).astype(np.uint64) - 1
        rank = np.minimum(rank, np.uint64(card - 1))
        code = (rank * np.uint64(2654435761) + np.uint64(0x9E3779B9 * (f + 1))) & np.uint64(0xFFFFFFFF)
        shifts = np.arange(28, -1, -4, dtype=np.uint64)
        hexm = _HEXDIGITS[((code[:, None] >> shifts[None, :]) & np.uint64(15)).astype(np.intp)]
        missing = rng.random(n) < (0.4 if f % 6 == 5 else 0.02)
        tab()
        field(hexm, np.repeat(~missing[:, None], 8, axis=1))
    parts.append(np.full((n, 1), 10, np.uint8))
    masks.append(np.ones((n, 1), bool))
    mat = np.concatenate(parts, axis=1)
    keep = np.concatenate(masks, axis=1)
    return mat[keep].tobytes()


def generate(path: Path, rows: int, seed: int = 0, chunk: int = 250_000) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        for start in range(0, rows, chunk):
            fh.write(generate_chunk(rng, min(chunk, rows - start)))


_CHILD = """
import sys, time, json
sys.path.insert(0, {root!r})
from embcompress.criteo import prepare_criteo
t = time.perf_counter()
m = prepare_criteo({src!r}, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t, "rows": m["rows"]}}))
"""


def bench_prepare(src: Path, out: Path) -> tuple[float, int, float]:
    import json
    import shutil

    if out.exists():
        shutil.rmtree(out)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    res = subprocess.run([sys.executable, "-c", _CHILD.format(root=str(ROOT), src=str(src), out=str(out))],
                         check=True, capture_output=True, text=True)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if peak_kb < before:  # cannot happen; max over children so far
        peak_kb = before
    return info["seconds"], info["rows"], peak_kb / 1024


def bench_pandas(src: Path) -> tuple[float, int]:
    import pandas as pd

    t = time.perf_counter()
    n = 0
    for df in pd.read_csv(src, sep="\t", header=None, engine="c", chunksize=500_000):
        n += len(df)
    return time.perf_counter() - t, n


def bench_pyarrow(src: Path) -> tuple[float, int]:
    from pyarrow import csv

    t = time.perf_counter()
    table = csv.read_csv(src, read_options=csv.ReadOptions(autogenerate_column_names=True),
                         parse_options=csv.ParseOptions(delimiter="\t"))
    n = table.num_rows
    del table
    return time.perf_counter() - t, n


def bench_loader(out: Path, batch: int = 4096) -> tuple[float, float, int]:
    import torch

    from embcompress.criteo import load_criteo
    from embcompress.data import iterate_batches

    t = time.perf_counter()
    train = load_criteo(out).split("train")
    t_load = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    t = time.perf_counter()
    n = 0
    for b in iterate_batches(train, batch, shuffle=True, generator=g):
        n += len(b.labels)
    return t_load, time.perf_counter() - t, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--out", type=Path, required=True, help="work folder (the TSV and the prepared data set)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the generated file and the prepared data set")
    ap.add_argument("--reuse", action="store_true", help="reuse train.txt in --out if it has --rows lines")
    ap.add_argument("--prepare-only", action="store_true",
                    help="time prepare_criteo alone (the full-size case: the whole-file pyarrow reference and the "
                         "int64 loader need more memory than a 24 GB machine has to spare at 45.8M rows)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    src = args.out / "train.txt"
    t = time.perf_counter()
    if not (args.reuse and src.exists()):
        generate(src, args.rows, args.seed)
    t_gen = time.perf_counter() - t
    size = src.stat().st_size
    print(f"generated {args.rows:,} rows, {size / 2**20:.0f} MiB in {t_gen:.1f}s ({src})", flush=True)

    prep_out = args.out / "prepared"
    t_prep, rows, rss = bench_prepare(src, prep_out)
    print(f"prepare_criteo: {t_prep:.1f}s", flush=True)
    if args.prepare_only:
        print(f"\n{rows:,} rows, {size / 2**20:.0f} MiB TSV, {os.cpu_count()} CPU cores: prepare_criteo (2 passes, "
              f"end to end) {t_prep:.1f} s, {rows / t_prep:,.0f} rows/s, peak RSS {rss:,.0f} MiB")
        if not args.keep:
            import shutil

            shutil.rmtree(prep_out, ignore_errors=True)
            src.unlink()
        return
    t_pd, n_pd = bench_pandas(src)
    print(f"pandas: {t_pd:.1f}s", flush=True)
    t_pa, n_pa = bench_pyarrow(src)
    print(f"pyarrow: {t_pa:.1f}s", flush=True)
    t_load, t_iter, n_it = bench_loader(prep_out)
    assert rows == n_pd == n_pa == args.rows, (rows, n_pd, n_pa, args.rows)

    r_prep, r_pd, r_pa = rows / t_prep, n_pd / t_pd, n_pa / t_pa
    print()
    print(f"{args.rows:,} rows, {size / 2**20:.0f} MiB TSV, {os.cpu_count()} CPU cores\n")
    print("| step | seconds | rows/s | vs pandas | vs pyarrow | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| prepare_criteo (2 passes, end to end) | {t_prep:.1f} | {r_prep:,.0f} | {r_prep / r_pd:.2f}x "
          f"| {r_prep / r_pa:.2f}x | {rss:,.0f} MiB |")
    print(f"| pandas read_csv (C engine, chunks of 500k) | {t_pd:.1f} | {r_pd:,.0f} | 1.00x | {r_pd / r_pa:.2f}x | |")
    print(f"| pyarrow.csv.read_csv | {t_pa:.1f} | {r_pa:,.0f} | {r_pa / r_pd:.2f}x | 1.00x | |")
    print(f"| batch loader (train split, 4096, shuffle; load_criteo {t_load:.1f}s) | {t_iter:.1f} "
          f"| {n_it / t_iter:,.0f} samples/s | | | |")
    if not args.keep:
        import shutil

        shutil.rmtree(prep_out, ignore_errors=True)
        src.unlink()


if __name__ == "__main__":
    main()
