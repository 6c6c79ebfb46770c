"""Turn a results folder into learning curves, a markdown table and paired statistics.

Input is the table of :func:`matbench_dim.bench.results.load_results` (one row per cell). Outputs:

- a learning-curve PNG per (task, target): test MAE vs n (log x), one line per method,
  error bars = standard deviation over all seeds and folds of that (method, n);
- a markdown table per (task, target): mean ± std MAE (runs) per method and n, with the
  reference anchors of :data:`REFERENCE_ANCHORS` beside ours when the task matches;
- a paired comparison of a reference method (``dim``) against each other method over the
  cells that share (fold, seed): win rate and the two-sided Wilcoxon signed-rank p-value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from matbench_dim.bench.results import load_results, safe_name
from matbench_dim.data.sources import target_unit

logger = logging.getLogger(__name__)

__all__ = [
    "REFERENCE_ANCHORS",
    "anchors_for",
    "markdown_table",
    "paired_comparison",
    "plot_learning_curve",
    "summarize",
    "write_report",
]

# Reference anchors quoted in the project's issue 5 (test MAE, mean over 5 folds x 5 seeds,
# same label-masking protocol; e_form in eV/atom, band gap in eV). A float applies to every n,
# a dict gives the value per n. ``tasks`` lists the task names each entry matches.
REFERENCE_ANCHORS: dict[str, dict[str, Any]] = {
    "perovskites_subset_e_form": {
        "tasks": ("matbench_perovskites_partial", "perovskites_partial", "perovskites_subset"),
        "target": "e_form",
        "methods": {
            "rf_magpie": {50: 0.515, 100: 0.489, 250: 0.461, 500: 0.447, 1000: 0.441},
            "dummy_mean": 0.57,
        },
    },
    "flla_e_form": {
        "tasks": ("flla",),
        "target": "formation_energy_per_atom",
        "methods": {
            "rf_magpie": {50: 0.405, 100: 0.353, 250: 0.292, 500: 0.250, 1000: 0.219},
            "dummy_mean": 0.90,
        },
    },
    "perovskites_subset_band_gap": {
        "tasks": ("matbench_perovskites_partial", "perovskites_partial", "perovskites_subset"),
        "target": "gap gllbsc",
        "methods": {"zero": 0.068, "dummy_mean": 0.135},
    },
}


def anchors_for(task: str, target: str) -> dict[str, float | dict[int, float]]:
    """Anchors per method for (task, target), or ``{}`` when none applies."""
    for entry in REFERENCE_ANCHORS.values():
        if task in entry["tasks"] and target == entry["target"]:
            return dict(entry["methods"])
    return {}


def _anchor_value(anchor: float | dict[int, float], n: int) -> float | None:
    if isinstance(anchor, dict):
        return anchor.get(int(n))
    return float(anchor)


# --------------------------------------------------------------------------- summaries


def summarize(results: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1; 0 for a single run) and count of MAE per (task, target, method, n)."""
    keys = ["task", "target", "method", "n"]
    if results.empty:
        return pd.DataFrame(columns=[*keys, "mae_mean", "mae_std", "runs"])
    grouped = results.groupby(keys, sort=True)["mae"]
    out = grouped.agg(mae_mean="mean", mae_std="std", runs="count").reset_index()
    out["mae_std"] = out["mae_std"].fillna(0.0)
    return out


def paired_comparison(
    results: pd.DataFrame, reference: str = "dim", others: Sequence[str] | None = None
) -> pd.DataFrame:
    """Compare ``reference`` with each other method on cells sharing (task, target, n, fold, seed).

    Returns one row per (task, target, method, n) with ``pairs``, ``win_rate`` (fraction of
    pairs where the reference has the lower MAE; ties count one half), ``mean_diff``
    (other MAE - reference MAE, so positive favours the reference) and ``wilcoxon_p``
    (two-sided ``scipy.stats.wilcoxon`` on the paired MAEs; NaN when it is undefined,
    1.0 when every difference is zero).
    """
    cols = ["task", "target", "method", "n", "pairs", "win_rate", "mean_diff", "wilcoxon_p"]
    if results.empty or reference not in set(results["method"]):
        return pd.DataFrame(columns=cols)
    keys = ["task", "target", "n", "fold", "seed"]
    ref = results[results["method"] == reference][[*keys, "mae"]]
    methods = sorted(set(results["method"]) - {reference}) if others is None else list(others)
    rows = []
    for method in methods:
        other = results[results["method"] == method][[*keys, "mae"]]
        merged = ref.merge(other, on=keys, suffixes=("_ref", "_other"))
        for (task, target, n), grp in merged.groupby(["task", "target", "n"], sort=True):
            a = grp["mae_ref"].to_numpy(float)
            b = grp["mae_other"].to_numpy(float)
            wins = float(np.sum(a < b) + 0.5 * np.sum(a == b))
            rows.append(
                {
                    "task": task,
                    "target": target,
                    "method": method,
                    "n": int(n),
                    "pairs": len(grp),
                    "win_rate": wins / len(grp),
                    "mean_diff": float(np.mean(b - a)),
                    "wilcoxon_p": wilcoxon_p(a, b),
                }
            )
    return pd.DataFrame(rows, columns=cols)


def wilcoxon_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p of paired samples (1.0 when all equal, NaN when
    undefined)."""
    if np.all(a == b):
        return 1.0
    try:
        return float(stats.wilcoxon(a, b, alternative="two-sided").pvalue)
    except ValueError as exc:
        logger.debug("Wilcoxon undefined (%s)", exc)
        return math.nan


# --------------------------------------------------------------------------- outputs


TRIVIAL_METHODS = ("dummy_mean", "zero", "median")
"""Constant predictors: drawn as reference lines, not curves."""


def plot_learning_curve(
    results: pd.DataFrame, task: str, target: str, path: str | Path, unit: str = ""
) -> Path:
    """Write a learning-curve PNG (MAE vs n, log x, one line per method, std error bars)."""
    from matplotlib.figure import Figure

    sub = results[(results["task"] == task) & (results["target"] == target)]
    if sub.empty:
        raise ValueError(f"no cells for task {task!r} target {target!r}")
    summary = summarize(sub)
    repeats = sub.groupby(["method", "n"]).size()
    fig = Figure(figsize=(8.0, 4.4), dpi=120)
    ax = fig.add_subplot()
    trivial = summary[summary["method"].isin(TRIVIAL_METHODS)]
    models = summary[~summary["method"].isin(TRIVIAL_METHODS)]
    notes = method_notes(task, target, list(models["method"].unique()))
    for method, grp in models.groupby("method", sort=True):
        label = f"{method} (has seen the test fold)" if method in notes else method
        ax.errorbar(
            grp["n"], grp["mae_mean"], yerr=grp["mae_std"], marker="o", capsize=3, label=label
        )
    ns = sorted(summary["n"].unique())
    for method, anchor in sorted(anchors_for(task, target).items()):
        vals = [(n, _anchor_value(anchor, n)) for n in ns]
        vals = [(n, v) for n, v in vals if v is not None]
        if vals:
            xs, ys = zip(*vals, strict=True)
            ax.plot(
                xs,
                ys,
                linestyle="--",
                color="0.5",
                linewidth=1,
                marker="x",
                label=f"anchor: {method}",
            )
    if not models.empty:  # scale the axis to the models; the trivial predictors as references
        low = float((models["mae_mean"] - models["mae_std"].fillna(0)).min())
        high = float((models["mae_mean"] + models["mae_std"].fillna(0)).max())
        pad = 0.08 * (high - low or high or 1.0)
        ax.set_ylim(max(0.0, low - pad), high + pad)
    top = ax.get_ylim()[1]
    for k, (method, grp) in enumerate(trivial.groupby("method", sort=True)):
        level = float(grp["mae_mean"].mean())
        style = {"color": "0.3", "linestyle": (0, (1, 2 + k)), "linewidth": 1.2}
        if level <= top:
            ax.axhline(level, label=f"{method} (reference): {level:.3g}", **style)
        else:  # off the top: say where it is instead of squeezing the curves
            ax.plot([], [], label=f"{method} (reference): {level:.3g}, above the axis", **style)
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("labelled training entries n (log scale)")
    unit = unit or target_unit(task, target)
    ax.set_ylabel(f"test MAE{f' ({unit})' if unit else ''}")
    rep = (
        f"{repeats.min()}" if repeats.min() == repeats.max() else f"{repeats.min()}-{repeats.max()}"
    )
    ax.set_title(f"{task} / {target}: {rep} repeats (folds x seeds) per point", fontsize="medium")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def _fmt(x: float, digits: int) -> str:
    return f"{x:.{digits}f}"


def method_notes(task: str, target: str, methods: Sequence[str]) -> dict[str, str]:
    """Caveats to print beside some methods' numbers on ``task``: method -> note.

    ``chgnet_rf`` on a Materials-Project-derived task: CHGNet's training set already holds
    the test-fold structures (and, for an energy target, their energies).
    """
    from matbench_dim.bench.chgnet_features import overlap_note

    notes: dict[str, str] = {}
    if "chgnet_rf" in methods:
        note = overlap_note(task, target)
        if note is not None:
            notes["chgnet_rf"] = note
    return notes


def markdown_table(results: pd.DataFrame, task: str, target: str, digits: int = 3) -> str:
    """Markdown table of mean ± std MAE (runs) per method (rows) and n (columns).

    Reference anchors for this task, when known, follow as rows named ``anchor: <method>``;
    a method with a caveat (:func:`method_notes`) is marked ``(see note)`` and its note
    follows the table.
    """
    sub = summarize(results[(results["task"] == task) & (results["target"] == target)])
    if sub.empty:
        raise ValueError(f"no cells for task {task!r} target {target!r}")
    ns = sorted(int(n) for n in sub["n"].unique())
    lines = [
        "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    notes = method_notes(task, target, list(sub["method"].unique()))
    for method, grp in sub.groupby("method", sort=True):
        by_n = {int(r.n): r for r in grp.itertuples()}
        cells = []
        for n in ns:
            r = by_n.get(n)
            cells.append(
                ""
                if r is None
                else f"{_fmt(r.mae_mean, digits)} ± {_fmt(r.mae_std, digits)} ({r.runs})"
            )
        label = f"{method} (see note)" if method in notes else method
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for method, anchor in sorted(anchors_for(task, target).items()):
        vals = [_anchor_value(anchor, n) for n in ns]
        cells = ["" if v is None else _fmt(v, digits) for v in vals]
        lines.append(f"| anchor: {method} | " + " | ".join(cells) + " |")
    lines += [f"\nNote on {method}: {note}." for method, note in notes.items()]
    return "\n".join(lines) + "\n"


def _paired_markdown(paired: pd.DataFrame, reference: str, digits: int = 3) -> str:
    lines = [
        f"| method | n | pairs | {reference} win rate | mean MAE diff (other - {reference}) "
        "| Wilcoxon p |",
        "|---|---|---|---|---|---|",
    ]
    for r in paired.itertuples():
        lines.append(
            f"| {r.method} | {r.n} | {r.pairs} | {r.win_rate:.2f} | {_fmt(r.mean_diff, digits)} "
            f"| {r.wilcoxon_p:.3g} |"
        )
    return "\n".join(lines) + "\n"


def calibration_table(results: pd.DataFrame) -> pd.DataFrame:
    """Calibration of the cells that predicted a std (``y_std`` beside their predictions):
    per (task, target, method, n), the mean over (fold, seed) of the coverage of
    ``mean ± 1 std`` / ``± 2 std`` (ideal 0.683 / 0.954), the miscalibration area (0 ideal),
    the mean predicted std and the number of cells."""
    from matbench_dim.bench.calibration import calibration_summary
    from matbench_dim.bench.results import load_predictions

    rows = []
    if "path" not in results.columns:  # frames built in memory carry no predictions
        return pd.DataFrame()
    for _, cell in results.iterrows():
        preds = load_predictions(cell["path"])
        if "y_std" not in preds:
            continue
        summary = calibration_summary(preds["y_true"], preds["y_pred"], preds["y_std"])
        rows.append({k: cell[k] for k in ("task", "target", "method", "n")} | summary)
    if not rows:
        return pd.DataFrame()
    frame = pd.DataFrame(rows)
    keys = ["task", "target", "method", "n"]
    out = frame.groupby(keys).mean(numeric_only=True)
    return out.assign(cells=frame.groupby(keys).size()).reset_index()


def _calibration_markdown(calib: pd.DataFrame) -> str:
    cols = ["method", "n", "coverage_1sigma", "coverage_2sigma", "miscalibration_area",
            "mean_std", "cells"]  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"]
    for _, row in calib.iterrows():
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    out: str | Path,
    dest: str | Path | None = None,
    reference: str | Sequence[str] = ("dim", "dim_rf"),
    results: pd.DataFrame | None = None,
) -> dict[str, Path]:
    """Write ``report.md`` and one learning-curve PNG per (task, target) into ``dest``.

    Parameters
    ----------
    out
        Results folder (holding ``cells/``).
    dest
        Where to write (default ``out/report``).
    reference
        Method(s) compared pairwise with every other one, one table each (skipped when
        absent): by default DIM transfer (``dim``) and the forest on frozen DIM vectors
        (``dim_rf``).
    results
        Cells to use instead of loading them from ``out``.

    Returns
    -------
    dict
        ``{"markdown": path, "<task>/<target>": png path, ...}``.
    """
    results = load_results(out) if results is None else results
    if results.empty:
        raise ValueError(f"no cell results under {Path(out) / 'cells'}")
    dest = Path(dest) if dest is not None else Path(out) / "report"
    dest.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    parts = ["# Label-masking learning curves\n"]
    references = [reference] if isinstance(reference, str) else list(reference)
    paired = {ref: paired_comparison(results, reference=ref) for ref in references}
    for (task, target), sub in results.groupby(["task", "target"], sort=True):
        png = dest / f"learning_curve_{safe_name(task)}_{safe_name(target)}.png"
        plot_learning_curve(sub, task, target, png)
        paths[f"{task}/{target}"] = png
        parts.append(f"## {task} / {target}\n")
        parts.append(f"![learning curve]({png.name})\n")
        parts.append("Test MAE, mean ± std over folds and seeds (number of runs).\n")
        parts.append(markdown_table(sub, task, target))
        if anchors_for(task, target):
            parts.append(
                "\nRows `anchor: ...` are the reference values of issue 5 "
                "(`matbench_dim.bench.report.REFERENCE_ANCHORS`).\n"
            )
        for ref, table in paired.items():
            mine = table[(table["task"] == task) & (table["target"] == target)]
            if not mine.empty:
                parts.append(f"\nPaired comparison with `{ref}` over matching (fold, seed):\n\n")
                parts.append(_paired_markdown(mine, ref))
        calib = calibration_table(sub)
        if not calib.empty:
            parts.append(
                "\nCalibration of the predicted std (coverage of mean ± 1 / 2 std, ideal "
                "0.683 / 0.954; miscalibration area, ideal 0):\n\n"
            )
            parts.append(_calibration_markdown(calib))
        parts.append("\n")
    md = dest / "report.md"
    md.write_text("\n".join(parts), encoding="utf-8")
    paths["markdown"] = md
    logger.info("report written to %s", md)
    return paths
