"""The memory-vs-AUC figure of a results file: test AUC against the tables' serving bytes (log x), Pareto front.

One panel per model (a frontier across models would compare unlike things), one line per method with its
spread over seeds, and the full table, the Bayes-optimal AUC and the one-hot LR reference as horizontal lines.
The points are the report's groups (:func:`embcompress.report.group_runs`).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .report import bayes_auc_of, full_table_auc, group_runs, reference_of

__all__ = ["plot_results", "pareto_front"]


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (bytes, auc) that no other point beats on both (fewer or equal bytes and higher AUC)."""
    front, best = [], -math.inf
    for b, a in sorted(points, key=lambda p: (p[0], -p[1])):
        if a > best:
            front.append((b, a))
            best = a
    return front


def plot_results(records: list[dict], path: str | os.PathLike, *, title: str = "") -> Path:
    """AUC vs bytes (log x), one line per method, the Pareto frontier, full-table and Bayes references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [g for g in group_runs(records) if g["bytes"] > 0]  # a log axis has no place for 0 or unknown bytes
    models = list(dict.fromkeys(g["model"] for g in rows)) or [""]
    # One panel per model: a frontier or a full-table line across models would compare unlike things.
    fig, axes = plt.subplots(1, len(models), figsize=(8.5 * len(models), 5.5), squeeze=False, sharey=True)
    bayes = bayes_auc_of(records)
    reference = reference_of(records)
    methods = list(dict.fromkeys(g["method"] for g in rows))
    # A method keeps its colour and marker in every panel; tab20 and 7 markers tell a dozen methods apart.
    style = {m: (plt.get_cmap("tab20").colors[(2 * i) % 20 + (i // 10) % 2], "osD^vPX"[i % 7])
             for i, m in enumerate(methods)}
    for ax, model in zip(axes[0], models):
        mine = [g for g in rows if g["model"] == model]
        for method in dict.fromkeys(g["method"] for g in mine):
            pts = sorted((g["bytes"], g["auc"], g["auc_std"]) for g in mine if g["method"] == method)
            xs, ys, es = zip(*pts)
            color, marker = style[method]
            ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, markersize=4, capsize=3, label=method)
        front = pareto_front([(g["bytes"], g["auc"]) for g in mine])
        if front:
            fx, fy = zip(*front)
            ax.step(fx, fy, where="post", color="black", alpha=0.35, linewidth=3, label="Pareto frontier", zorder=0)
        full = full_table_auc(rows, model)
        if full is not None:
            ax.axhline(full, color="gray", linestyle="--", linewidth=1, label=f"full table ({full:.4f})")
        if bayes is not None:
            ax.axhline(bayes, color="green", linestyle=":", linewidth=1.5, label=f"Bayes AUC ({bayes:.4f})")
        if reference is not None:
            ax.axhline(reference["test_auc"], color="tab:red", linestyle="-.", linewidth=1,
                       label=f"one-hot LR ({reference['test_auc']:.4f})")
        ax.set_xscale("log")
        ax.set_xlabel("embedding serving bytes (log scale)")
        ax.set_title(f"{title or 'memory vs AUC'}{f' — {model}' if len(models) > 1 else ''}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:  # every run failed, or none has a test AUC: an empty plane, said so
            ax.text(0.5, 0.5, "no run with a test AUC", transform=ax.transAxes, ha="center", va="center")
    axes[0][0].set_ylabel("test AUC")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
