"""The ``embcompress`` command line: ``list`` the registered methods and models, run ``bench`` suites."""

from __future__ import annotations

import argparse
import inspect
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


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import default_suite_path, format_table, load_suite, plot_results, run_suite

    suite_path = Path(args.suite) if args.suite else default_suite_path()
    suite = load_suite(suite_path)
    out = Path(args.out or Path("results") / suite.name)
    print(f"suite {suite.name} ({suite_path}): {len(suite.runs())} runs -> {out}", flush=True)
    records = run_suite(suite, out, device=args.device, progress=not args.quiet)
    table = format_table(records)
    (out / "report.md").write_text(f"# {suite.name}\n\n{table}\n")
    png = plot_results(records, out / "memory_vs_auc.png", title=f"{suite.name}: {suite.model['type']}, D={suite.embedding_dim}")
    print(table)
    print(f"\nresults: {out / 'results.jsonl'}\nreport:  {out / 'report.md'}\nplot:    {png}")
    return 0 if all(r.get("status") == "ok" for r in records) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embcompress",
        description="Memory-compressed embedding tables for CTR models, and the memory-vs-AUC benchmark.",
    )
    parser.add_argument("--version", action="version", version=f"embcompress {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list the registered table methods and CTR models")
    p_list.set_defaults(func=cmd_list)
    p_bench = sub.add_parser("bench", help="run a benchmark suite (default: benchmarks/default.yaml)")
    p_bench.add_argument("suite", nargs="?", help="suite YAML file (default: the default suite)")
    p_bench.add_argument("--out", help="output folder (default: results/<suite name>)")
    p_bench.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p_bench.add_argument("--quiet", action="store_true", help="no progress bars")
    p_bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, LookupError, FileNotFoundError) as err:
        print(f"embcompress: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
