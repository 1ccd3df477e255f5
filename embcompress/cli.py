"""The ``embcompress`` command line: ``list`` the registered methods and models, run ``bench`` suites."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import sys
from pathlib import Path

from . import __version__


def _first_line(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.splitlines()[0] if doc else ""


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import MODELS, TABLES, list_models, list_tables

    print("tables:")
    for name in list_tables():
        print(f"  {name:<14} {_first_line(TABLES.get(name))}")
    print("models:")
    for name in list_models():
        print(f"  {name:<14} {_first_line(MODELS.get(name))}")
    return 0


def _write_report(records: list[dict], out: Path, title: str) -> str:
    from .plot import plot_results
    from .report import format_table

    table = format_table(records)
    # Written aside and renamed: shards of a suite finishing together each write the report of the same folder.
    tmp = f".{os.getpid()}.tmp"
    (out / f"report.md{tmp}").write_text(f"# {title}\n\n{table}\n")
    os.replace(out / f"report.md{tmp}", out / "report.md")
    os.replace(plot_results(records, out / f"memory_vs_auc{tmp}.png", title=title), out / "memory_vs_auc.png")
    return f"{table}\n\nreport:  {out / 'report.md'}\nplot:    {out / 'memory_vs_auc.png'}"


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/2, got {text!r}") from None
    if not (count >= 1 and 0 <= index < count):
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return index, count


def _bench_run_rank(args: argparse.Namespace) -> int:
    # One process of `bench run --nproc N`: the process group is up, so training runs data-parallel.
    return cmd_bench_run(argparse.Namespace(**{**vars(args), "nproc": 1}))


def cmd_bench_run(args: argparse.Namespace) -> int:
    from .distributed import default_backend, init_from_env, is_main_process, launch
    from .runner import run_suite
    from .suite import default_suite_path, load_suite

    if getattr(args, "nproc", 1) != 1:  # N local processes, each with its share of the CPU threads
        threads = max(1, (os.cpu_count() or 1) // args.nproc)
        return max(launch(_bench_run_rank, args.nproc, args, backend=default_backend(args.device), threads=threads))
    init_from_env(args.device)  # under torchrun
    suite_path = Path(args.suite) if args.suite else default_suite_path()
    suite = load_suite(suite_path, data_path=args.data_path)
    out = Path(args.out or Path("results") / suite.name)
    if is_main_process():
        print(f"suite {suite.name} ({suite_path}): {len(suite.runs())} runs -> {out}", flush=True)
    records = run_suite(suite, out, device=args.device, progress=not args.quiet, shard=args.shard)
    failed = any(r.get("status") in ("failed", "reference_failed") for r in records)
    if not is_main_process():
        return 1 if failed else 0
    print(_write_report(records, out, f"{suite.name}: {', '.join(m.name for m in suite.models)}, D={suite.embedding_dim}"))
    print(f"results: {out / 'results.jsonl'}")
    return 1 if failed else 0


def cmd_bench_report(args: argparse.Namespace) -> int:
    from .results import read_results

    results = Path(args.results)
    if not results.is_file():
        raise FileNotFoundError(f"results file {str(results)!r} does not exist")
    out = Path(args.out) if args.out else results.parent
    out.mkdir(parents=True, exist_ok=True)
    print(_write_report(read_results(results), out, args.title or results.parent.name))
    return 0


def cmd_bench_speed(args: argparse.Namespace) -> int:
    from .results import json_line
    from .speed import format_speed, load_speed_suite, run_speed

    suite_path = Path(args.suite) if args.suite else Path(__file__).resolve().parent.parent / "benchmarks" / "speed.yaml"
    suite = load_speed_suite(suite_path)
    if args.batch_size is not None:
        if args.batch_size < 1:
            raise SystemExit(f"--batch-size must be a positive integer, got {args.batch_size}")
        suite = dataclasses.replace(suite, batch_size=args.batch_size)
    out = Path(args.out or Path("results") / f"{suite.name}-{args.device}")
    out.mkdir(parents=True, exist_ok=True)
    records = run_speed(suite, device=args.device, progress=not args.quiet)
    table = format_speed(records, suite, args.device)
    (out / "report.md").write_text(f"# {suite.name} ({args.device})\n\n{table}\n")
    with open(out / "results.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json_line(r) for r in records)  # strict JSON, as bench run writes
    print(f"{table}\n\nreport:  {out / 'report.md'}")
    return 0 if all(r["status"] == "ok" for r in records) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embcompress",
        description="Memory-compressed embedding tables for CTR models, and the memory-vs-AUC benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"embcompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered table methods and CTR models")
    p_list.set_defaults(func=cmd_list)

    p_bench = sub.add_parser("bench", help="benchmarks: run (the default), report, speed",
                             description="`embcompress bench` alone runs the default suite.")
    bench = p_bench.add_subparsers(dest="bench_command", required=True)
    run_opts = argparse.ArgumentParser(add_help=False)
    run_opts.add_argument("--out", help="output folder (default: results/<suite name>)")
    run_opts.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    run_opts.add_argument("--quiet", action="store_true", help="no progress bars")
    p_run = bench.add_parser("run", parents=[run_opts], help="run a suite (default: benchmarks/default.yaml)")
    p_run.add_argument("suite", nargs="?", help="suite YAML file")
    p_run.add_argument("--data-path", metavar="FOLDER",
                       help="train on this prepared data folder instead of the suite's data (embcompress data ...)")
    p_run.add_argument("--nproc", type=int, default=1,
                       help="train data-parallel in N local processes (DDP: gloo on CPU, nccl on GPU); "
                            "or launch with torchrun")
    p_run.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N",
                       help="run only the runs at positions I, I+N, I+2N, ... of the suite (0 <= I < N), so N "
                            "processes or machines can share one results folder")
    p_run.set_defaults(func=cmd_bench_run)
    p_report = bench.add_parser("report", help="markdown table and plot from a results.jsonl")
    p_report.add_argument("results", help="results.jsonl written by `bench run`")
    p_report.add_argument("--out", help="output folder (default: next to the results)")
    p_report.add_argument("--title", help="report title")
    p_report.set_defaults(func=cmd_bench_report)
    p_speed = bench.add_parser("speed", parents=[run_opts], help="training and inference speed of the tables")
    p_speed.add_argument("suite", nargs="?", help="speed suite YAML (default: benchmarks/speed.yaml)")
    p_speed.add_argument("--batch-size", type=int, help="time at this batch size instead of the suite's")
    p_speed.set_defaults(func=cmd_bench_speed)

    p_data = sub.add_parser("data", help="prepare data sets: criteo, csv")
    data = p_data.add_subparsers(dest="data_command", required=True)
    p_criteo = data.add_parser("criteo", help="Criteo TSV (plain or .gz) -> memory-mapped .npy arrays + manifest")
    p_criteo.add_argument("inputs", nargs="+", metavar="INPUT", help="Criteo TSV file(s), read in this order")
    p_criteo.add_argument("--out", required=True, help="output folder")
    p_criteo.add_argument("--min-count", type=int, default=1, help="values seen fewer times share the reserved id")
    p_criteo.add_argument("--max-rows-per-field", type=int, default=None, metavar="N",
                          help="keep the N-1 most frequent values of each field; the rest share the reserved id")
    p_criteo.add_argument("--dense-buckets", action="store_true",
                          help="add I1_bucket..I13_bucket: floor(ln(x)**2) of each dense value as a categorical field")
    p_criteo.add_argument("--split", choices=("dlrm", "random", "day"), default="dlrm",
                          help="dlrm (7 days), random 8:1:1, or day (Criteo 1TB: day_0..day_23; 23 halved)")
    p_criteo.add_argument("--seed", type=int, default=0, help="seed of the random split")
    p_criteo.add_argument("--on-bad-line", choices=("error", "skip"), default="error")
    p_criteo.add_argument("--block-rows", type=int, default=500_000, help="about this many lines per block")
    p_criteo.add_argument("--quiet", action="store_true", help="no progress lines")
    p_criteo.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p_criteo.set_defaults(func=cmd_data_criteo)
    p_csv = data.add_parser("csv", help="any CSV/TSV through a YAML spec -> the same arrays + manifest as criteo")
    p_csv.add_argument("spec", help="YAML spec (see embcompress.csv_spec): files, label, categorical, dense, split")
    p_csv.add_argument("--out", required=True, help="output folder")
    p_csv.add_argument("--block-rows", type=int, default=500_000, help="about this many lines per block")
    p_csv.add_argument("--quiet", action="store_true", help="no progress lines")
    p_csv.add_argument("--force", action="store_true", help=_FORCE_HELP)
    p_csv.set_defaults(func=cmd_data_csv)
    return parser


_FORCE_HELP = ("rebuild even if --out already holds this data set (same inputs and options); also replaces another "
               "data set there. The rebuild is written beside --out and swapped in at the end")


def _prepare_quietly(prepare, *args, **kw) -> dict:
    # The data warnings (a split without positives, ...) are printed below from the manifest, once, as one line each.
    import warnings

    from .prepared import DataWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return prepare(*args, **kw)


def _data_done(m: dict, out: str) -> bool:
    """Print the warnings of a prepared data set; True (after saying so) when it was already prepared."""
    for w in m.get("warnings", []):
        print(f"embcompress: warning: {w}", file=sys.stderr)
    if m.get("already_prepared"):
        print(f"{out}: already prepared from the same inputs and options ({m['rows']:,} rows); nothing done "
              "(--force rebuilds it)")
    return bool(m.get("already_prepared"))


def cmd_data_csv(args: argparse.Namespace) -> int:
    from .csvdata import prepare_csv

    m = _prepare_quietly(prepare_csv, args.spec, args.out, block_rows=args.block_rows, progress=not args.quiet,
                         force=args.force)
    if _data_done(m, args.out):
        return 0
    print(f"{m['name']}: {m['rows']:,} rows ({m['skipped']['total']:,} bad lines skipped) in {m['seconds']:.1f} s "
          f"-> {args.out}")
    print(f"splits: {m['splits']}\ncardinalities: {dict(zip(m['schema']['sparse'], m['cardinalities']))}")
    return 0


def cmd_data_criteo(args: argparse.Namespace) -> int:
    from .criteo import prepare_criteo

    m = _prepare_quietly(prepare_criteo, args.inputs, args.out, min_count=args.min_count, split=args.split,
                         seed=args.seed, max_rows_per_field=args.max_rows_per_field,
                         dense_buckets=args.dense_buckets, on_bad_line=args.on_bad_line,
                         block_rows=args.block_rows, progress=not args.quiet, force=args.force)
    if _data_done(m, args.out):
        return 0
    print(f"{m['rows']:,} rows ({m['skipped']['total']:,} bad lines skipped) in {m['seconds']:.1f} s -> {args.out}")
    print(f"splits: {m['splits']}\ncardinalities: {m['cardinalities']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `embcompress bench` alone, or with only options, runs the default suite.
    if argv[:1] == ["bench"] and (len(argv) == 1 or argv[1].startswith("-") and argv[1] not in ("-h", "--help")):
        argv.insert(1, "run")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, LookupError, FileNotFoundError) as err:
        print(f"embcompress: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
