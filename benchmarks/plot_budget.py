"""The README's label-masking figures from the committed cells (benchmarks/results/label_masking.csv).

    python benchmarks/plot_budget.py            # also run by `collect_cells.py readme`

writes, into docs/figures/:

- ``learning_curve_flla_after_wiring_fix.png`` and
  ``learning_curve_perovskites_after_wiring_fix.png``: the main study (15 DIM epochs, every
  fold and seed it holds, with the baselines);
- ``flla_pretraining_budget.png``: dim / dim_rf after 15, 50 and 150 DIM epochs beside the
  random-initialisation baselines, which do not depend on the budget (fold 0, where all three
  budgets ran).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from matbench_dim.bench.report import plot_learning_curve

ROOT = Path(__file__).resolve().parents[1]
CSV = ROOT / "benchmarks" / "results" / "label_masking.csv"
FIGURES = ROOT / "docs" / "figures"
MAIN_STUDY = "means-to-global/dim15ep-lr1e-3-silu"
BUDGETS = (
    (MAIN_STUDY, 15),
    ("means-to-global/dim50ep-lr1e-3-silu", 50),
    ("means-to-global/dim150ep-lr1e-3-silu", 150),
)
CURVES = {
    ("flla", "formation_energy_per_atom"): "learning_curve_flla_after_wiring_fix.png",
    ("perovskites_subset", "e_form"): "learning_curve_perovskites_after_wiring_fix.png",
}


def write_figures(df: pd.DataFrame, figures: Path = FIGURES) -> list[Path]:
    """Write the figures that ``df`` has cells for; return their paths."""
    figures.mkdir(parents=True, exist_ok=True)
    written = []
    main = df[df.study == MAIN_STUDY]
    for (task, target), name in CURVES.items():
        part = main[(main.task == task) & (main.target == target)]
        if not part.empty:
            plot_learning_curve(part, task, target, figures / name)
            written.append(figures / name)
    rows = []
    for study, ep in BUDGETS:
        part = df[(df.study == study) & df.method.isin(["dim", "dim_rf"]) & (df.fold == 0)]
        part = part[(part.task == "flla") & (part.n <= 250)].copy()
        part["method"] = part["method"] + f" ({ep} ep)"
        rows.append(part)
    base = main[main.method.isin(["random_init", "random_rf", "dummy_mean"]) & (main.fold == 0)]
    rows.append(base[(base.task == "flla") & (base.n <= 250)])
    budget = pd.concat(rows)
    if budget.method.str.contains("50 ep").any():
        out = figures / "flla_pretraining_budget.png"
        plot_learning_curve(budget, "flla", "formation_energy_per_atom", out)
        written.append(out)
    return written


if __name__ == "__main__":
    paths = write_figures(pd.read_csv(CSV))
    print("figures written:", ", ".join(str(p.relative_to(ROOT)) for p in paths))
    sys.exit(0)
