"""Results table (cell files) and the report: learning curves, markdown, paired statistics."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from matbench_dim.bench import results as res
from matbench_dim.bench.report import (
    REFERENCE_ANCHORS,
    anchors_for,
    markdown_table,
    paired_comparison,
    summarize,
    write_report,
)

TASK, TARGET = "perovskites_subset", "e_form"


def _cell(method, n, fold, seed, mae):
    return res.CellResult(
        task=TASK,
        target=TARGET,
        fold=fold,
        method=method,
        mode="baseline",
        n=n,
        seed=seed,
        mae=mae,
        rmse=mae * 1.3,
        max_error=mae * 4,
        n_test=3,
        n_pretrain=0,
        max_train_structures=None,
        wall_s=0.1,
        params={"a": 1},
    )


@pytest.fixture(scope="module")
def fake_results():
    """dim / rf_magpie / dummy_mean over 2 folds x 3 seeds x n in {50, 100}."""
    rng = np.random.default_rng(7)
    rows = []
    base = {"dim": 0.45, "rf_magpie": 0.50, "dummy_mean": 0.57}
    for method, n, fold, seed in itertools.product(base, (50, 100), (0, 1), (0, 1, 2)):
        mae = base[method] - 0.02 * (n == 100) + rng.normal(0, 0.03)
        rows.append(_cell(method, n, fold, seed, float(mae)).to_dict())
    return pd.DataFrame(rows)


def test_write_and_load_cells(tmp_path):
    cell = _cell("rf_magpie", 50, 1, 2, 0.0)
    metrics = res.regression_metrics([1.0, 2.0, 4.0], [1.5, 2.0, 2.0])
    assert metrics == pytest.approx({"mae": 2.5 / 3, "rmse": np.sqrt(4.25 / 3), "max_error": 2.0})
    cell.mae, cell.rmse, cell.max_error = metrics["mae"], metrics["rmse"], metrics["max_error"]
    path = res.write_cell(tmp_path, cell, ["a", "b", "c"], [1.0, 2.0, 4.0], [1.5, 2.0, 2.0])
    assert path == res.cell_paths(tmp_path, TASK, TARGET, "rf_magpie", 50, 1, 2)[0]
    assert not list(tmp_path.rglob("*.tmp"))
    table = res.load_results(tmp_path)
    assert len(table) == 1
    assert table.loc[0, "mae"] == pytest.approx(2.5 / 3)
    assert table.loc[0, "params"] == {"a": 1}
    assert table.loc[0, "created"]
    preds = res.load_predictions(path)
    assert list(preds["id"]) == ["a", "b", "c"]
    assert list(preds["y_pred"]) == [1.5, 2.0, 2.0]
    assert res.load_results(tmp_path / "empty").empty
    with pytest.raises(ValueError, match="lengths differ"):
        res.write_cell(tmp_path, cell, ["a"], [1.0, 2.0], [1.0, 2.0])


def test_summary_counts_runs(fake_results):
    summary = summarize(fake_results)
    assert len(summary) == 6
    assert set(summary["runs"]) == {6}
    grp = fake_results[(fake_results["method"] == "dim") & (fake_results["n"] == 50)]["mae"]
    row = summary[(summary["method"] == "dim") & (summary["n"] == 50)].iloc[0]
    assert row["mae_mean"] == pytest.approx(grp.mean())
    assert row["mae_std"] == pytest.approx(grp.std(ddof=1))


def test_paired_comparison_matches_scipy(fake_results):
    paired = paired_comparison(fake_results, reference="dim")
    assert len(paired) == 4  # 2 other methods x 2 n
    df = fake_results
    for row in paired.itertuples():
        ref = df[(df["method"] == "dim") & (df["n"] == row.n)].sort_values(["fold", "seed"])
        other = df[(df["method"] == row.method) & (df["n"] == row.n)].sort_values(["fold", "seed"])
        a, b = ref["mae"].to_numpy(), other["mae"].to_numpy()
        assert row.pairs == 6
        assert row.wilcoxon_p == pytest.approx(stats.wilcoxon(a, b).pvalue)
        assert row.win_rate == pytest.approx(np.mean(a < b))
        assert row.mean_diff == pytest.approx(np.mean(b - a))


def test_paired_comparison_ties_and_unmatched():
    rows = [_cell("dim", 50, 0, s, m).to_dict() for s, m in enumerate([0.1, 0.2, 0.3])]
    rows += [_cell("zero", 50, 0, s, m).to_dict() for s, m in enumerate([0.1, 0.3, 0.2])]
    rows.append(_cell("zero", 50, 1, 0, 0.9).to_dict())  # no dim partner: ignored
    paired = paired_comparison(pd.DataFrame(rows))
    row = paired.iloc[0]
    assert row["pairs"] == 3
    assert row["win_rate"] == pytest.approx(0.5)
    same = pd.DataFrame([_cell(m, 50, 0, 0, 0.2).to_dict() for m in ("dim", "zero")])
    assert paired_comparison(same).iloc[0]["wilcoxon_p"] == 1.0
    assert paired_comparison(same, reference="absent").empty


def test_markdown_has_methods_runs_and_anchors(fake_results):
    md = markdown_table(fake_results, TASK, TARGET)
    lines = md.splitlines()
    assert lines[0] == "| method | n=50 | n=100 |"
    by_method = {ln.split("|")[1].strip(): ln for ln in lines[2:]}
    assert set(by_method) == {
        "dim",
        "rf_magpie",
        "dummy_mean",
        "anchor: rf_magpie",
        "anchor: dummy_mean",
    }
    assert by_method["dim"].count("(6)") == 2
    assert by_method["anchor: rf_magpie"] == "| anchor: rf_magpie | 0.515 | 0.489 |"
    assert by_method["anchor: dummy_mean"] == "| anchor: dummy_mean | 0.570 | 0.570 |"
    assert anchors_for("flla", "formation_energy_per_atom")["rf_magpie"][1000] == 0.219
    assert anchors_for("perovskites_subset", "gap gllbsc") == {"zero": 0.068, "dummy_mean": 0.135}
    assert anchors_for("matbench_jdft2d", "exfoliation_en") == {}
    assert set(REFERENCE_ANCHORS) == {
        "perovskites_subset_e_form",
        "flla_e_form",
        "perovskites_subset_band_gap",
    }


def test_write_report_from_folder(tmp_path, fake_results):
    for row in fake_results.to_dict("records"):
        res.write_cell(tmp_path, res.CellResult(**row), ["x"], [0.0], [row["mae"]])
    paths = write_report(tmp_path)
    png = paths[f"{TASK}/{TARGET}"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    md = paths["markdown"].read_text()
    assert f"## {TASK} / {TARGET}" in md
    assert png.name in md
    assert "| anchor: rf_magpie |" in md
    paired_lines = [
        ln
        for ln in md.splitlines()
        if ln.startswith(("| rf_magpie | 50 |", "| dummy_mean | 100 |"))
    ]
    assert len(paired_lines) == 2
    assert all("| 6 |" in ln for ln in paired_lines)
    with pytest.raises(ValueError, match="no cell results"):
        write_report(tmp_path / "nothing")


def test_report_has_one_paired_table_per_reference(tmp_path, fake_results):
    rf = fake_results[fake_results["method"] == "dim"].assign(method="dim_rf")
    rf["mae"] = rf["mae"] + 0.01
    both = pd.concat([fake_results, rf], ignore_index=True)
    md = write_report(tmp_path, results=both)["markdown"].read_text()
    assert "Paired comparison with `dim` " in md
    assert "Paired comparison with `dim_rf` " in md
    # dim_rf is worse than dim by 0.01 in every pair: dim wins all 6, dim_rf none
    assert "| dim_rf | 50 | 6 | 1.00 | 0.010 |" in md
    assert "| dim | 50 | 6 | 0.00 | -0.010 |" in md
    only = write_report(tmp_path / "one", results=both, reference="dim")["markdown"].read_text()
    assert "with `dim_rf`" not in only


def test_learning_curve_has_units_a_reference_dummy_and_an_outside_legend(
    fake_results, tmp_path, monkeypatch
):
    from matplotlib.figure import Figure

    from matbench_dim.bench.report import plot_learning_curve

    far = fake_results.assign(
        mae=np.where(fake_results["method"] == "dummy_mean", 5.0, fake_results["mae"])
    )
    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: saved.append(self))
    plot_learning_curve(far, TASK, TARGET, tmp_path / "curve.png")
    (ax,) = saved[0].axes
    assert ax.get_ylabel() == "test MAE (eV/unit cell)"  # the task's unit, found by name
    models = far[far["method"] != "dummy_mean"]["mae"]
    assert ax.get_ylim()[1] < 1.0 < 5.0  # the dummy does not squeeze the model curves
    assert ax.get_ylim()[1] > models.groupby(far["n"]).mean().max()
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert any(lab.startswith("dummy_mean (reference): 5") and "above" in lab for lab in labels)
    assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1  # outside the data
    assert [t.get_text() for t in ax.get_xticklabels()] == ["50", "100"]
