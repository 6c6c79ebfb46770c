"""Baselines: constant predictors, the featurized forests and the per-crystal feature cache."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from pymatgen.core import Lattice, Structure

from matbench_dim.bench.baselines import (
    ConstantRegressor,
    DummyMeanRegressor,
    FeatureCache,
    FeaturizationError,
    FeaturizedForest,
    MedianRegressor,
    item_key,
)


def test_constant_predictors(real_structures, real_targets):
    y = np.asarray(real_targets)
    X = real_structures
    np.testing.assert_allclose(DummyMeanRegressor().fit(X, y).predict(X[:5]), y.mean())
    np.testing.assert_allclose(MedianRegressor().fit(X, y).predict(X[:5]), np.median(y))
    assert np.all(ConstantRegressor().fit(X, y).predict(X[:3]) == 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        DummyMeanRegressor().fit(X[:2], [1.0, np.nan])
    with pytest.raises(ValueError, match="but y has"):
        MedianRegressor().fit(X[:3], [1.0])


@pytest.mark.parametrize("featurizer", ["magpie", "sine_coulomb"])
def test_forest_is_seeded_and_learns(real_structures, real_targets, featurizer):
    X, y = real_structures, np.asarray(real_targets)
    a = FeaturizedForest(featurizer, n_estimators=30, random_state=0).fit(X, y)
    b = FeaturizedForest(featurizer, n_estimators=30, random_state=0).fit(X, y)
    c = FeaturizedForest(featurizer, n_estimators=30, random_state=1).fit(X, y)
    pa, pb, pc = a.predict(X), b.predict(X), c.predict(X)
    assert pa.shape == (len(X),)
    np.testing.assert_array_equal(pa, pb)
    assert not np.array_equal(pa, pc)
    # a forest fits its own training set much better than the mean does
    assert np.abs(pa - y).mean() < 0.7 * np.abs(y - y.mean()).mean()


def test_sine_coulomb_forest_pads_and_truncates(real_structures, real_targets):
    small = [s for s in real_structures if len(s) <= 4]
    y = [t for s, t in zip(real_structures, real_targets, strict=True) if len(s) <= 4]
    model = FeaturizedForest("sine_coulomb", n_estimators=10).fit(small, y)
    assert model.n_features_ == max(len(s) for s in small)
    big = [s for s in real_structures if len(s) > model.n_features_]
    assert big, "fixture should hold larger crystals"
    assert model.predict(big).shape == (len(big),)


def test_cache_computes_each_crystal_once(real_structures, monkeypatch):
    cache = FeatureCache("magpie")
    calls = []
    original = cache._impl.featurize_one
    monkeypatch.setattr(
        cache._impl, "featurize_one", lambda item: calls.append(1) or original(item)
    )
    first = cache.get(real_structures[:6])
    copies = [s.copy() for s in real_structures[:6]]
    second = cache.get(copies + real_structures[6:8])
    assert len(calls) == 8
    for u, v in zip(first, second[:6], strict=True):
        np.testing.assert_array_equal(u, v)
    assert item_key(real_structures[0]) == item_key(copies[0])
    assert item_key(real_structures[0]) != item_key(real_structures[1])


def test_cache_roundtrip(tmp_path, real_structures, monkeypatch):
    cache = FeatureCache("sine_coulomb")
    vecs = cache.get(real_structures[:5])
    path = cache.save(tmp_path / "scm.npz")
    other = FeatureCache("sine_coulomb")
    assert other.update_from(path) == 5
    assert other.update_from(path) == 0  # a path is read once per process
    calls = []
    monkeypatch.setattr(other._impl, "featurize_one", lambda item: calls.append(1))
    for u, v in zip(vecs, other.get(real_structures[:5]), strict=True):
        np.testing.assert_array_equal(u, v)
    assert not calls


def test_featurizer_failure_names_the_entry():
    lattice = Lattice.cubic(4.0)
    bad = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0, 0, 0]])
    good = Structure(lattice, ["Na", "Cl"], [[0, 0, 0], [0.5, 0.5, 0.5]])
    X = pd.Series([good, bad], index=["mb-test-0001", "mb-test-0002"])
    with pytest.raises(FeaturizationError, match=r"mb-test-0002 \(NaCl\)"):
        FeatureCache("sine_coulomb").get(X)
    with pytest.raises(FeaturizationError, match="#0"):
        FeatureCache("sine_coulomb").get(["NaCl"])
    with pytest.raises(ValueError, match="unknown featurizer"):
        FeatureCache("xrd_typo")


def test_task_features_are_saved_as_they_go_and_resume(tmp_path, monkeypatch, flla_sample_task):
    """An interrupted featurization of a task keeps the slices it finished, and the next run
    computes only the rest."""
    from matbench_dim.bench import baselines, grid

    task = flla_sample_task
    monkeypatch.setattr(grid, "FEATURE_SAVE_EVERY", 10)
    monkeypatch.setattr(baselines, "_CACHES", {})
    impl = baselines.get_cache("magpie")._impl
    original, calls = impl.featurize_one, []

    def dies_after_25(item):
        if len(calls) == 25:
            raise KeyboardInterrupt
        calls.append(1)
        return original(item)

    monkeypatch.setattr(impl, "featurize_one", dies_after_25)
    with pytest.raises(KeyboardInterrupt):
        grid._features(tmp_path, task, "magpie")
    from matbench_dim.bench.results import safe_name

    path = tmp_path / "features" / safe_name(task.name) / "magpie.npz"
    with np.load(path) as saved:
        assert len(saved["keys"]) == 20  # two finished slices of 10
    # a new process: a fresh cache reads the file and computes only what is missing
    monkeypatch.setattr(baselines, "_CACHES", {})
    fresh = baselines.get_cache("magpie")._impl
    again = []
    monkeypatch.setattr(fresh, "featurize_one", lambda item: again.append(1) or original(item))
    grid._features(tmp_path, task, "magpie")
    n_unique = len({item_key(s) for s in task.structures})
    assert len(again) == n_unique - 20
    with np.load(path) as saved:
        assert len(saved["keys"]) == n_unique
