"""Collect finished label-masking cells into one committed CSV, and print its tables.

    python benchmarks/collect_cells.py add RESULTS_DIR --study NAME   # append / update rows
    python benchmarks/collect_cells.py table [--study NAME] [--baseline-study NAME]  # tables
    python benchmarks/collect_cells.py readme [--baseline-study NAME]   # README tables + figures

``benchmarks/results/label_masking.csv`` holds one row per cell: ``task, target, method,
fold, n, seed, mae`` (the columns the study issue asks for), then ``study`` (which
pretraining budget and code produced it: runs with different budgets are different studies
and are never averaged together) and ``n_test``. ``add`` is idempotent: a cell already in
the file for the same study is replaced, so it can be run after every finished batch of
cells and committed as the study goes (an interrupted study loses nothing).

``table`` prints, per (study, task, target), mean ± std over seeds of the test MAE by method
and n, and for ``dim`` and ``dim_rf`` the paired comparison with ``random_init`` /
``random_rf`` on the same (fold, seed): the mean relative change, the win count and the
two-sided Wilcoxon signed-rank p. ``readme`` writes the same tables into the README's block
and the figures of ``plot_budget.py`` (one command for the README's whole results part).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import pandas as pd

from matbench_dim.bench.report import method_notes, wilcoxon_p
from matbench_dim.bench.results import load_results

CSV = Path(__file__).resolve().parent / "results" / "label_masking.csv"
KEY = ["study", "task", "target", "method", "fold", "n", "seed"]
COLUMNS = ["task", "target", "method", "fold", "n", "seed", "mae", "study", "n_test"]
PAIRS = {"dim": "random_init", "dim_rf": "random_rf"}


def read(csv: Path = CSV) -> pd.DataFrame:
    return pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=COLUMNS)


def add(results_dir: Path, study: str, csv: Path = CSV) -> pd.DataFrame:
    cells = load_results(results_dir)
    if cells.empty:
        raise SystemExit(f"{results_dir}: no finished cells")
    new = cells.assign(study=study)[COLUMNS]
    old = read(csv)
    kept = old[~old.set_index(KEY).index.isin(new.set_index(KEY).index)]
    merged = pd.concat([kept, new]) if len(kept) else new
    merged = merged.sort_values(KEY, kind="stable").reset_index(drop=True)
    csv.parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(csv, index=False, float_format="%.6g")
    return merged


def tables(frame: pd.DataFrame, baseline_study: str | None = None) -> str:
    """Markdown tables per (study, task, target). A study that did not run a paired
    reference method (``random_init`` / ``random_rf``: they do not depend on the pretraining
    budget) is paired with ``baseline_study``'s cells of the same (task, target, fold, n, seed),
    and the line says so."""
    out = []

    def natural(text: str) -> list[int | str]:
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]

    groups = sorted(
        frame.groupby(["study", "task", "target"]),
        key=lambda g: (g[0][0] != baseline_study, natural(g[0][0]), g[0][1], g[0][2]),
    )  # the baseline study first, then natural order (15ep before 50ep before 150ep)
    for (study, task, target), part in groups:
        ns = sorted(int(n) for n in part["n"].unique())
        seeds = sorted(int(s) for s in part["seed"].unique())
        folds = sorted(int(f) for f in part["fold"].unique())
        most = int(part.groupby(["method", "n"]).size().max())
        out.append(f"**{task} / {target}** — study `{study}`, folds {folds}, seeds {seeds}; "
                   "test MAE, mean ± std over (fold, seed), "
                   f"{most} runs per cell unless marked\n")  # fmt: skip
        out.append("| method | " + " | ".join(f"n={n}" for n in ns) + " |")
        out.append("|---" * (len(ns) + 1) + "|")
        notes = method_notes(task, target, list(part["method"].unique()))
        for method, rows in part.groupby("method", sort=True):
            stats = rows.groupby("n")["mae"].agg(["mean", "std", "count"])
            cells = [
                f"{stats.loc[n, 'mean']:.3f} ± {stats.loc[n, 'std']:.3f}"
                + ("" if stats.loc[n, "count"] == most else f" ({int(stats.loc[n, 'count'])} runs)")
                if n in stats.index
                else ""
                for n in ns
            ]
            label = f"{method} (see note)" if method in notes else method
            out.append(f"| {label} | " + " | ".join(cells) + " |")
        out += [f"\nNote on {method}: {note}." for method, note in notes.items()]
        for method, reference in PAIRS.items():
            a = part[part["method"] == method].set_index(["fold", "n", "seed"])["mae"]
            refs, label = part, reference
            if not (part["method"] == reference).any() and baseline_study:
                refs = frame[(frame["study"] == baseline_study) & (frame["task"] == task)
                             & (frame["target"] == target)]  # fmt: skip
                label = f"{reference} (study `{baseline_study}`)"
            b = refs[refs["method"] == reference].set_index(["fold", "n", "seed"])["mae"]
            both = a.index.intersection(b.index)
            if both.empty:
                continue
            diffs = []
            for n in ns:
                idx = [i for i in both if i[1] == n]
                if idx:
                    rel = ((a[idx] - b[idx]) / b[idx]).mean() * 100
                    wins = int((a[idx] < b[idx]).sum())
                    p = wilcoxon_p(a[idx].to_numpy(float), b[idx].to_numpy(float))
                    diffs.append(
                        f"n={n}: {rel:+.1f} % ({wins}/{len(idx)} pairs better, Wilcoxon p {p:.2g})"
                    )
            out.append(f"\n{method} vs {label}, paired: " + "; ".join(diffs))
        out.append("")
    return "\n".join(out)


README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- label-masking-tables:begin -->", "<!-- label-masking-tables:end -->"


def write_readme(frame: pd.DataFrame, baseline_study: str | None, readme: Path = README) -> None:
    """Replace the README's block between BEGIN and END with the tables of every study."""
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} block to fill")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    body = (
        "\n<!-- written by `python benchmarks/collect_cells.py readme"
        + (f" --baseline-study {baseline_study}" if baseline_study else "")
        + "` from benchmarks/results/label_masking.csv; do not edit by hand -->\n\n"
        + tables(frame, baseline_study)
    )
    readme.write_text(head + BEGIN + body + "\n" + END + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_add = sub.add_parser("add", help="append the cells of a results folder")
    p_add.add_argument("results_dir", type=Path)
    p_add.add_argument("--study", required=True)
    p_tab = sub.add_parser("table", help="print markdown tables")
    p_tab.add_argument("--study")
    p_tab.add_argument("--baseline-study", help="pair studies without random_init with this one")
    p_readme = sub.add_parser("readme", help="rewrite the README's tables and figures")
    p_readme.add_argument("--baseline-study")
    p_readme.add_argument("--no-figures", action="store_true", help="tables only")
    for p in (p_add, p_tab, p_readme):
        p.add_argument("--csv", type=Path, default=CSV)
    args = parser.parse_args(argv)
    if args.command == "add":
        frame = add(args.results_dir, args.study, args.csv)
        print(f"{len(frame)} cells in {args.csv}")
        return 0
    frame = read(args.csv)
    if args.command == "readme":
        write_readme(frame, args.baseline_study)
        print(f"README tables rewritten from {args.csv}")
        if not args.no_figures:
            from plot_budget import write_figures

            for path in write_figures(frame):
                print(f"figure written: {path}")
        return 0
    shown = frame if not args.study else frame[frame["study"] == args.study]
    print(tables(shown if not args.baseline_study else
                 pd.concat([shown, frame[frame["study"] == args.baseline_study]]).drop_duplicates(),
                 args.baseline_study))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
