"""The markdown report of a results file: mean ± std over seeds per (model, method, target ratio).

:func:`format_table` gives the rows (serving bytes and the ratio on them, training bytes with the optimizer state
where the records have them, test AUC, ΔAUC vs the full table, logloss, train samples/s, the tuned settings),
the Bayes-optimal AUC of the data and the one-hot LR reference above them, the best method per budget, a method
x budget grid where a budget a method cannot reach shows as 'no', and the failed runs, one line per method and
cause. A table that lands more than 5% under its budget is marked. The grouping (:func:`group_runs`) is the
plot's too.
"""

from __future__ import annotations

import math
import re

import numpy as np

from .results import finite

__all__ = ["format_table", "best_per_budget", "group_runs", "full_table_auc", "bayes_auc_of", "reference_of",
           "UNDER_TARGET"]


def _mean(records: list[dict], key: str) -> float:
    """Mean of the finite values of ``key`` (NaN when none has one: a missing or null figure is not a zero)."""
    values = [r.get(key) for r in records if finite(r.get(key))]
    return float(np.mean(values)) if values else math.nan


def _runs(records: list[dict]) -> list[dict]:
    """The run records (finished or failed): not the tuning trials, nor the reference fit."""
    return [r for r in records if r.get("status") in ("ok", "failed")]


def reference_of(records: list[dict]) -> dict | None:
    """The scikit-learn logistic regression reference recorded beside the runs (the last one), if any."""
    refs = [r for r in records if r.get("status") == "reference" and finite(r.get("test_auc"))]
    return refs[-1] if refs else None


def _tuned_text(rs: list[dict]) -> str:
    """The tuned settings the seeds chose, e.g. ``lr=0.002, embedding_l2=1e-05`` (``a/b`` where seeds differ)."""
    keys = list(dict.fromkeys(k for r in rs for k in (r.get("tuned") or {})))
    parts = []
    for k in keys:
        values = list(dict.fromkeys(f"{r['tuned'][k]:g}" if isinstance((r.get("tuned") or {}).get(k), float)
                                    else str((r.get("tuned") or {}).get(k)) for r in rs))
        parts.append(f"{k}={'/'.join(values)}")
    return ", ".join(parts)


#: A table this far under its budget is marked in the report: "at most" was met with room to spare.
UNDER_TARGET = 0.95
BUFFER_SHARE = 0.10  # buffers at least this share of a stored table are reported (see _buffer_shares)


def _no_auc(records: list[dict]) -> list[dict]:
    """Runs recorded as finished without a finite test AUC (a NaN of an older version, a null, a missing key)."""
    return [r for r in records if r.get("status") == "ok" and not finite(r.get("test_auc"))]


def group_runs(records: list[dict]) -> list[dict]:
    """Mean and std over seeds of each (model, method, target ratio), over the runs with a test AUC."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "ok" and finite(r.get("test_auc")):
            groups.setdefault((r.get("model", ""), r.get("method"), r.get("target_ratio")), []).append(r)
    rows = []
    for (model, method, target), rs in groups.items():
        auc = np.array([r["test_auc"] for r in rs])
        size = _mean(rs, "bytes")
        rows.append({
            "model": model, "method": method, "target_ratio": target, "seeds": len(rs),
            "bytes": int(size) if math.isfinite(size) else 0, "ratio": _mean(rs, "ratio"),
            "training_bytes": _mean(rs, "training_bytes"),  # NaN for records written before it was recorded
            "auc": float(auc.mean()), "auc_std": float(auc.std()) if len(rs) > 1 else 0.0,
            "logloss": _mean(rs, "test_logloss"), "samples_per_second": _mean(rs, "samples_per_second"),
            "best_epoch": _mean(rs, "best_epoch"), "epochs_run": _mean(rs, "epochs_run"),
            "dense_parameters": _mean(rs, "dense_parameters"),
            "buffer_bytes": _mean(rs, "buffer_bytes"), "parameter_bytes": _mean(rs, "parameter_bytes"),
            "precision": rs[0].get("precision"), "fp32_auc": _mean(rs, "fp32_test_auc"),
            "under_target": any(finite(r.get("target_bytes")) and finite(r.get("bytes"))
                                and r["bytes"] < UNDER_TARGET * r["target_bytes"] for r in rs),
            "tuned": _tuned_text(rs),
        })
    return sorted(rows, key=lambda g: (str(g["model"]), -g["bytes"], str(g["method"])))


def full_table_auc(rows: list[dict], model: str) -> float | None:
    """The best mean AUC of an uncompressed table (ratio 1, no target) among ``model``'s groups, or None."""
    full = [g["auc"] for g in rows if g["model"] == model and g["ratio"] <= 1.001 and g["target_ratio"] is None]
    return max(full) if full else None


def bayes_auc_of(records: list[dict]) -> float | None:
    """The Bayes-optimal test AUC of the data the records were run on (synthetic data only), or None."""
    return next((r.get("bayes_auc") for r in records if finite(r.get("bayes_auc"))), None)


def format_table(records: list[dict]) -> str:
    """Markdown table of the runs (mean +- std over seeds), with the Bayes AUC as the ceiling."""
    rows = group_runs(records)
    several_models = len({g["model"] for g in rows}) > 1
    bayes = bayes_auc_of(records)
    reference = reference_of(records)
    tuned = any(g["tuned"] for g in rows)
    training = any(finite(g["training_bytes"]) for g in rows)  # records before training bytes lack them
    lines = []
    if bayes is not None:
        lines.append(f"Bayes-optimal test AUC of the data (the ceiling): **{bayes:.4f}**\n")
    if reference is not None:
        c = f"C={reference['C']:g}" if finite(reference.get("C")) else "C"
        logloss = reference.get("test_logloss")
        lines.append(f"Reference, {reference.get('name', 'one-hot LR')} on the same train split ({c} chosen on "
                     f"validation): test AUC **{reference['test_auc']:.4f}**, logloss "
                     f"{f'{logloss:.4f}' if finite(logloss) else 'n/a'}\n")
    model_head = "| model | dense params " if several_models else ""
    bayes_head = "| vs Bayes " if bayes is not None else ""
    tuned_head = "| tuned on validation | best epoch / run " if tuned else ""
    # Last, so that the columns before it keep their places in reports of records without training bytes.
    training_head = "| training bytes " if training else ""
    lines.append(f"{model_head}| method | target | serving bytes | ratio | test AUC | ΔAUC vs full {bayes_head}"
                 f"| logloss | train samples/s | seeds {tuned_head}{training_head}|")
    lines.append("|---" * (9 + (bayes is not None) + 2 * several_models + 2 * tuned + training) + "|")
    for g in rows:
        full = full_table_auc(rows, g["model"])
        target = f"{g['target_ratio']:g}x" if g["target_ratio"] else "-"
        auc = _auc_cell(g)
        delta = f"{g['auc'] - full:+.4f}" if full is not None else "n/a"
        gap = f"| {g['auc'] - bayes:+.4f} " if bayes is not None else ""
        model_cells = f"| {g['model']} | {g['dense_parameters']:,.0f} " if several_models else ""
        under = " †" if g["under_target"] else ""
        tuned_cell = f"| {g['tuned']} | {g['best_epoch']:.2g} / {g['epochs_run']:.2g} " if tuned else ""
        training_cell = ("" if not training else f"| {g['training_bytes']:,.0f} " if finite(g["training_bytes"])
                         else "| — ")
        lines.append(
            f"{model_cells}| {g['method']} | {target} | {g['bytes']:,}{under} | {g['ratio']:.2f}x | {auc} | {delta} "
            f"{gap}| {g['logloss']:.4f} | {g['samples_per_second']:,.0f} | {g['seeds']} {tuned_cell}{training_cell}|"
        )
    if rows:
        lines.append("\nServing bytes: what the served table stores (a staged method's export); the ratio is the fp32 "
                     "baseline's bytes over them." + (" Training bytes: what the table that trained (a staged "
                     "method's supernet) stores plus the optimizer state held for it; — where a run did not "
                     "record them." if training else " These runs did not record training bytes (the table as "
                     "trained plus its optimizer state)."))
    if any(g["under_target"] for g in rows):
        lines.append(f"\n† more than {1 - UNDER_TARGET:.0%} under its budget: the method's sizes step coarsely "
                     "there, and a budget is a ceiling")
    best = best_per_budget(records)
    if best:
        lines += ["", "Best method per budget (highest mean test AUC):", ""]
        lines += [f"{model_head}| target | best method | serving bytes | test AUC | ΔAUC vs full |",
                  "|---" * (5 + 2 * several_models) + "|"]
        for g in best:
            model_cells = f"| {g['model']} | {g['dense_parameters']:,.0f} " if several_models else ""
            delta = f"{g['delta']:+.4f}" if g["delta"] is not None else "n/a"
            lines.append(f"{model_cells}| {g['target_ratio']:g}x | {g['method']} | {g['bytes']:,} "
                         f"| {_auc_cell(g)} | {delta} |")
    lines += _buffer_shares(rows)
    lines += _precision_costs(rows)
    lines += _coverage(records, rows)
    lines += _failures(records)
    missing = _no_auc(records)
    if missing:
        which = ", ".join(f"{r.get('method')} at {r['target_ratio']:g}x" if finite(r.get("target_ratio"))
                          else str(r.get("method")) for r in missing[:10])
        lines.append(f"\n{len(missing)} run(s) recorded as finished have no test AUC (nan, null or missing) and are "
                     f"left out above: {which}{' ...' if len(missing) > 10 else ''}")
    return "\n".join(lines)


def _buffer_shares(rows: list[dict]) -> list[str]:
    """Methods whose stored table is at least ``BUFFER_SHARE`` buffers (index maps, id maps, seeds: stored,
    never trained), with the share at each budget: where a method's bytes go to addressing, not to vectors.
    Frozen exports (no parameters: every byte is a buffer) are left out."""
    shares: dict[str, dict[float, float]] = {}
    for g in rows:
        stored = g["buffer_bytes"] + g["parameter_bytes"]
        trained = finite(g["parameter_bytes"]) and g["parameter_bytes"] > 0
        if g["target_ratio"] and trained and g["buffer_bytes"] >= BUFFER_SHARE * stored:
            shares.setdefault(g["method"], {})[g["target_ratio"]] = g["buffer_bytes"] / stored
    if not shares:
        return []
    lines = ["", f"Buffers (stored index or id maps and seeds, never trained) are at least {BUFFER_SHARE:.0%} of "
                 "the stored table in:", ""]
    for method, by_target in shares.items():
        lines.append(f"- {method}: " + ", ".join(f"{share:.0%} at {t:g}x" for t, share in sorted(by_target.items())))
    return lines


def _precision_costs(rows: list[dict]) -> list[str]:
    """Tables served at a lower precision: the served test AUC beside the AUC of the same trained fp32 masters."""
    served = [g for g in rows if g.get("precision") and finite(g.get("fp32_auc"))]
    if not served:
        return []
    several_models = len({g["model"] for g in rows}) > 1
    model_head = "| model " if several_models else ""
    lines = ["", "Served precision: the test AUC of each table as served (rows at its precision) and of the same "
                 "trained fp32 rows, mean over seeds:", "",
             f"{model_head}| method | target | precision | serving bytes | served AUC | fp32 rows AUC | Δ |",
             "|---" * (7 + several_models) + "|"]
    for g in served:
        target = f"{g['target_ratio']:g}x" if g["target_ratio"] else "-"
        model_cell = f"| {g['model']} " if several_models else ""
        lines.append(f"{model_cell}| {g['method']} | {target} | {g['precision']} | {g['bytes']:,} | {g['auc']:.4f} "
                     f"| {g['fp32_auc']:.4f} | {g['auc'] - g['fp32_auc']:+.4f} |")
    return lines


def _failures(records: list[dict]) -> list[str]:
    """Failed runs, one line per method and cause: a budget error names the minimum budget, which is the same
    at every target below it, for every model and seed."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("status") == "failed":
            minimum = re.search(r"minimum budget ([\d,]+)", r.get("error") or "")
            groups.setdefault((r.get("method"), minimum.group(1) if minimum else r.get("error")), []).append(r)
    lines = []
    for (method, cause), rs in groups.items():
        targets = ", ".join(f"{t:g}x" if t else "no budget" for t in sorted({r.get("target_ratio") or 0 for r in rs}))
        models = ", ".join(dict.fromkeys(str(r.get("model")) for r in rs))
        seeds = sorted({r.get("seed") for r in rs}, key=str)
        lines.append(f"\nFAILED: {method} at {targets} ({models}; seed{'s' * (len(seeds) > 1)} "
                     f"{', '.join(map(str, seeds))}): {rs[0].get('error')}")
    failed_refs = [r for r in records if r.get("status") == "reference_failed"]
    if failed_refs and reference_of(records) is None:
        lines.append(f"\nFAILED: the one-hot LR reference: {failed_refs[-1].get('error')}")
    return lines


def _auc_cell(g: dict) -> str:
    return f"{g['auc']:.4f}" + (f" ± {g['auc_std']:.4f}" if g["seeds"] > 1 else "")


def best_per_budget(records: list[dict]) -> list[dict]:
    """For each (model, target ratio), the method with the highest mean test AUC over seeds: the report row's
    fields (``auc``, ``auc_std``, ``bytes``, ...) and ``delta``, its AUC less the full table's (None without one)."""
    rows = group_runs(records)
    best: dict[tuple, dict] = {}
    for g in rows:
        key = (g["model"], g["target_ratio"])
        if g["target_ratio"] is not None and (key not in best or g["auc"] > best[key]["auc"]):
            best[key] = g
    out = []
    for (model, _), g in sorted(best.items()):
        full = full_table_auc(rows, model)
        out.append({**g, "delta": g["auc"] - full if full is not None else None})
    return out


def _coverage(records: list[dict], rows: list[dict]) -> list[str]:
    """Method x budget grid of mean AUCs, per model; a budget a method could not reach shows as 'no'."""
    records = _runs(records)
    targets = sorted({r["target_ratio"] for r in records if finite(r.get("target_ratio"))})
    if len(targets) < 2:
        return []
    auc = {(g["model"], g["method"], g["target_ratio"]): g["auc"] for g in rows}
    tried = {(r.get("model", ""), r.get("method"), r.get("target_ratio")) for r in records}
    lines = []
    for model in dict.fromkeys(r.get("model", "") for r in records):
        methods = [m for m in dict.fromkeys(r.get("method") for r in records if r.get("model", "") == model)
                   if any((model, m, t) in tried for t in targets)]
        times = _relative_times(records, model)
        lines += ["", f"Test AUC by method and budget{f' ({model})' if model else ''}; 'no': not reachable "
                      "(see FAILED below)" + ("; time: the method's training (every stage with its evaluations) "
                                             "over one full-table training, mean over its budgets and seeds"
                                             if times else "") + ":", ""]
        time_head, time_rule = (" time |", "|---") if times else ("", "")
        lines += ["| method | " + " | ".join(f"{t:g}x" for t in targets) + f" |{time_head}",
                  "|---" * (len(targets) + 1) + f"{time_rule}|"]
        for m in methods:
            cells = [f"{auc[(model, m, t)]:.4f}" if (model, m, t) in auc else "no" if (model, m, t) in tried else ""
                     for t in targets]
            time_cell = f" {times[m]:.2f}x |" if m in times else " |" if times else ""
            lines.append(f"| {m} | " + " | ".join(cells) + f" |{time_cell}")
    return lines


def _relative_times(records: list[dict], model: str) -> dict[str, float]:
    """Each method's mean ``wall_seconds`` (training with every stage and evaluation) over the full table's, for
    ``model``'s finished runs; empty without a full-table run (ratio 1, no budget) that recorded its time."""
    finished = [r for r in records if r.get("status") == "ok" and r.get("model", "") == model
                and finite(r.get("wall_seconds"))]
    full = _mean([r for r in finished if r.get("target_ratio") is None and finite(r.get("ratio"))
                  and r["ratio"] <= 1.001], "wall_seconds")
    if not (math.isfinite(full) and full > 0):
        return {}
    methods = dict.fromkeys(r.get("method") for r in finished)
    return {m: _mean([r for r in finished if r.get("method") == m], "wall_seconds") / full for m in methods}
