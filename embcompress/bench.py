"""The memory-vs-AUC benchmark in one import: the public names of the modules a suite passes through.

A YAML suite is loaded and checked by :mod:`embcompress.suite`, run by :mod:`embcompress.runner` into the
results file of :mod:`embcompress.results`, and turned into the markdown tables of :mod:`embcompress.report`
and the figure of :mod:`embcompress.plot`. Those modules are where the code lives; this one gathers their
public names for notebooks and scripts (``from embcompress.bench import load_suite, run_suite, format_table``).
"""

from __future__ import annotations

from .plot import pareto_front, plot_results
from .report import best_per_budget, format_table, reference_of
from .results import json_line, read_results, results_frame
from .runner import reference_key, run_key, run_one, run_suite, trial_key
from .suite import (
    MethodSpec, ModelSpec, Run, Suite, default_suite_path, load_data, load_suite, manifest_checksum, table_spec,
)

__all__ = [
    "Suite", "MethodSpec", "ModelSpec", "Run", "load_suite", "default_suite_path", "load_data", "table_spec",
    "manifest_checksum", "run_suite", "run_one", "run_key", "trial_key", "reference_key", "json_line",
    "read_results", "results_frame", "format_table", "best_per_budget", "reference_of", "plot_results",
    "pareto_front",
]
