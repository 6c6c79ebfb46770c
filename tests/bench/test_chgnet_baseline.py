"""The ``chgnet_rf`` baseline: frozen CHGNet crystal features, its caveat, and its skip path."""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from matbench_dim.bench import grid
from matbench_dim.bench.baselines import FeatureCache, FeaturizationError, FeaturizedForest
from matbench_dim.bench.chgnet_features import MISSING_MESSAGE, overlap_note
from matbench_dim.bench.report import markdown_table

needs_chgnet = pytest.mark.skipif(
    importlib.util.find_spec("chgnet") is None, reason="the optional chgnet extra is not installed"
)


@needs_chgnet
def test_batched_features_equal_one_at_a_time(real_structures):
    X = real_structures[:6]
    batched = FeatureCache("chgnet").get(X)
    single = [FeatureCache("chgnet")._impl.featurize_one(s) for s in X]
    assert all(v.shape == (64,) and v.dtype == np.float64 for v in batched)
    for u, v in zip(batched, single, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)
    # different crystals, different vectors (the features are not a constant)
    assert np.linalg.norm(batched[0] - batched[-1]) > 1e-3


@needs_chgnet
def test_chgnet_forest_learns(real_structures, real_targets):
    X, y = real_structures, np.asarray(real_targets)
    model = FeaturizedForest("chgnet", n_estimators=30, random_state=0).fit(X, y)
    assert model.n_features_ == 64
    assert np.abs(model.predict(X) - y).mean() < 0.7 * np.abs(y - y.mean()).mean()


@needs_chgnet
def test_a_failing_batch_names_the_entry(real_structures):
    good = real_structures[:3]
    X = pd.Series([*good, "NaCl"], index=["a", "b", "c", "mb-bad-7"])
    with pytest.raises(FeaturizationError, match=r"'chgnet' failed on entry mb-bad-7 \(NaCl\)"):
        FeatureCache("chgnet").get(X)


def test_overlap_note_marks_materials_project_tasks():
    assert "energies" in overlap_note("flla", "formation_energy_per_atom")
    assert "energies" in overlap_note("sample:flla", "e_form")
    gap = overlap_note("matbench_mp_gap", "gap pbe")
    assert gap is not None
    assert "not these labels" in gap
    assert overlap_note("perovskites_subset", "e_form") is None
    assert overlap_note("matbench_jdft2d", "exfoliation_en") is None


def test_report_table_puts_the_note_beside_chgnet_rf():
    rows = [
        {"task": t, "target": "e_form", "method": m, "fold": 0, "n": 50, "seed": s, "mae": v}
        for t in ("flla", "perovskites_subset")
        for m, v in (("chgnet_rf", 0.1), ("rf_magpie", 0.2))
        for s in (0, 1)
    ]
    frame = pd.DataFrame(rows)
    flla = markdown_table(frame, "flla", "e_form")
    assert "| chgnet_rf (see note) |" in flla
    assert "Note on chgnet_rf: CHGNet was trained" in flla
    perov = markdown_table(frame, "perovskites_subset", "e_form")
    assert "| chgnet_rf |" in perov
    assert "Note on" not in perov


def test_grid_skips_chgnet_rf_when_chgnet_is_missing(tmp_path, monkeypatch):
    real = importlib.util.find_spec

    def no_chgnet(name, *args, **kwargs):
        return None if name == "chgnet" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", no_chgnet)
    summary = grid.run_grid(
        ["sample:flla"],
        tmp_path / "out",
        folds=[0],
        n_labels=[10],
        seeds=[0],
        methods=["dummy_mean", "chgnet_rf"],
        tracking=False,
        record_matbench=False,
    )
    assert summary.skipped_methods == {"chgnet_rf": MISSING_MESSAGE}
    assert summary.n_run == 1
    assert list(summary.results()["method"]) == ["dummy_mean"]


def test_featurizer_is_built_lazily_without_chgnet(monkeypatch):
    # a cache for another featurizer never touches chgnet, and the chgnet featurizer only
    # imports it when it first featurizes
    import sys

    monkeypatch.setitem(sys.modules, "chgnet", None)
    FeatureCache("magpie")
    cache = FeatureCache("chgnet")
    structure = Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    other = Structure(Lattice.cubic(4.4), ["K", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    with pytest.raises(ImportError, match=r"pip install 'matbench-dim\[chgnet\]'"):
        cache.get([structure, other])  # the batched path
    with pytest.raises(ImportError, match="not installed"):
        cache.get([structure])
