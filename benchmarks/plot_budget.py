"""The README's flla figures from the committed cells (benchmarks/results/label_masking.csv).

    python benchmarks/plot_budget.py

writes docs/figures/learning_curve_flla_after_wiring_fix.png (15 DIM epochs, 5 seeds, with the
baselines) and docs/figures/flla_pretraining_budget.png (dim / dim_rf after 15, 50 and 150 DIM
epochs beside the random-initialisation baselines, which do not depend on the budget; fold 0,
where all three budgets ran).
"""

from pathlib import Path

import pandas as pd

from matbench_dim.bench.report import plot_learning_curve

ROOT = Path(__file__).resolve().parents[1]
df = pd.read_csv(ROOT / "benchmarks/results/label_masking.csv")
s15 = df[df.study == "means-to-global/dim15ep-lr1e-3-silu"]
plot_learning_curve(
    s15,
    "flla",
    "formation_energy_per_atom",
    ROOT / "docs/figures/learning_curve_flla_after_wiring_fix.png",
)
# budget figure: dim / dim_rf per pretraining budget, random baselines from the 15-epoch study
rows = []
for study, ep in (
    ("means-to-global/dim15ep-lr1e-3-silu", 15),
    ("means-to-global/dim50ep-lr1e-3-silu", 50),
    ("means-to-global/dim150ep-lr1e-3-silu", 150),
):
    part = df[(df.study == study) & df.method.isin(["dim", "dim_rf"]) & (df.fold == 0)].copy()
    part["method"] = part["method"] + f" ({ep} ep)"
    rows.append(part)
rows.append(s15[s15.method.isin(["random_init", "random_rf", "dummy_mean"]) & (s15.fold == 0)])
plot_learning_curve(
    pd.concat(rows),
    "flla",
    "formation_energy_per_atom",
    ROOT / "docs/figures/flla_pretraining_budget.png",
)
print("figures written to", ROOT / "docs/figures")
