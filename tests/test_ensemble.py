"""SiteNetDIMEnsemble: one pretraining, k fine-tunes, mean and spread; save/load; matbench std."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_settings import TINY

from matbench_dim.bench import matbench_io as mio
from matbench_dim.data.sources import load_task
from matbench_dim.ensemble import SiteNetDIMEnsemble, member_seed
from matbench_dim.estimator import SiteNetDIMRegressor


@pytest.fixture(scope="module")
def fitted(real_structures, real_targets):
    X, y = real_structures, np.asarray(real_targets, dtype=float)
    calls = []
    original = SiteNetDIMRegressor._run_pretraining

    def counting(self, *args, **kwargs):
        calls.append(self.random_state)
        return original(self, *args, **kwargs)

    SiteNetDIMRegressor._run_pretraining = counting
    try:
        ens = SiteNetDIMEnsemble(SiteNetDIMRegressor(**TINY, random_state=3), n_members=3)
        ens.fit(X[:16], y[:16], X_unlabeled=X[16:20])
    finally:
        SiteNetDIMRegressor._run_pretraining = original
    return {"ens": ens, "X": X, "y": y, "pretrain_calls": calls}


def test_member_0_is_the_single_model_and_pretraining_runs_once(fitted):
    ens, X, y = fitted["ens"], fitted["X"], fitted["y"]
    assert fitted["pretrain_calls"] == [3]  # member 0 only
    single = SiteNetDIMRegressor(**TINY, random_state=3).fit(X[:16], y[:16], X_unlabeled=X[16:20])
    np.testing.assert_array_equal(ens.members_[0].predict(X[20:]), single.predict(X[20:]))
    seeds = [m.random_state for m in ens.members_]
    assert seeds == [3, member_seed(3, 1), member_seed(3, 2)]
    assert len(set(seeds)) == 3
    assert all(m.pretrained_ for m in ens.members_)  # 1 and 2 start from member 0's encoder
    assert not any(hasattr(m, "pretrained_encoder_") for m in ens.members_[1:])


def test_mean_and_std_are_those_of_the_members(fitted):
    ens, X = fitted["ens"], fitted["X"]
    each = ens.predict_members(X[20:])
    assert each.shape == (3, 4)
    mean, std = ens.predict(X[20:], return_std=True)
    np.testing.assert_allclose(mean, each.mean(axis=0))
    np.testing.assert_allclose(std, each.std(axis=0))
    assert (std > 0).all()  # different seeds give different models
    np.testing.assert_array_equal(ens.predict(X[20:]), mean)
    one = SiteNetDIMEnsemble(n_members=1)
    one.members_ = ens.members_[:1]
    with pytest.raises(ValueError, match="n_members >= 2"):
        one.predict(X[20:], return_std=True)
    with pytest.raises(ValueError, match="n_members must be >= 1"):
        SiteNetDIMEnsemble(n_members=0).fit(X[:4], fitted["y"][:4])


def test_save_and_load_give_the_same_predictions(fitted, tmp_path):
    ens, X = fitted["ens"], fitted["X"]
    path = ens.save(tmp_path / "ens")
    assert sorted(p.name for p in path.iterdir()) == [
        "ensemble.json", "member_0", "member_1", "member_2",
    ]  # fmt: skip
    back = SiteNetDIMEnsemble.load(path)
    for a, b in zip(
        ens.predict(X[20:], return_std=True), back.predict(X[20:], return_std=True), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    meta = json.loads((path / "ensemble.json").read_text())
    (path / "ensemble.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(ValueError, match="format 99"):
        SiteNetDIMEnsemble.load(path)


def test_record_passes_std_to_matbench(tmp_path):
    task = load_task("matbench_jdft2d", sample=True)
    mb = mio.new_benchmark(task)
    n = len(task.test_ids(0))
    pred, std = np.full(n, 50.0), np.linspace(1.0, 2.0, n)
    mio.record(mb, "matbench_jdft2d", 0, pred, std=std)
    stored = mb.tasks_map["matbench_jdft2d"].results["fold_0"]["uncertainty"]
    assert [stored[i]["std"] for i in task.test_ids(0)] == pytest.approx(std)
    back = mio.load_benchmark(mio.save_benchmark(mb, tmp_path / "r.json.gz"))
    assert back.tasks_map["matbench_jdft2d"].results["fold_0"]["uncertainty"] == stored
    m = len(task.test_ids(1))
    with pytest.raises(ValueError, match="std must be > 0"):
        mio.record(mb, "matbench_jdft2d", 1, np.full(m, 50.0), std=np.zeros(m))
