"""matbench I/O wrappers: recording, saving and loading on the shipped matbench_jdft2d."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch
from matbench.bench import MatbenchBenchmark

from matbench_dim.bench import matbench_io as mio
from matbench_dim.data.sources import load_task

OFFICIAL_DUMMY_MAE_JDFT2D = [53.1447, 72.8118, 83.1220, 61.3174, 66.0295]


@pytest.fixture(scope="module")
def jdft2d_task():
    """The shipped full matbench_jdft2d task, loaded through matbench."""
    return load_task("matbench_jdft2d", sample=True)


def dummy(task, fold: int) -> np.ndarray:
    """The train-mean predictor of matbench's ``matbench_v0.1_dummy`` entry."""
    _, y = task.train_data(fold)
    return np.full(len(task.test_ids(fold)), y.mean())


def fold_maes(mb: MatbenchBenchmark) -> list[float]:
    results = mb.tasks_map["matbench_jdft2d"].results
    return [dict(results)[f"fold_{f}"]["scores"]["mae"] for f in range(5)]


def test_full_round_trip_gives_a_valid_official_benchmark(jdft2d_task, tmp_path):
    mb = mio.new_benchmark(jdft2d_task)
    preds = [
        dummy(jdft2d_task, 0),  # float64 array
        dummy(jdft2d_task, 1).astype(np.float32).tolist(),  # list of np.float32
        torch.tensor(dummy(jdft2d_task, 2), dtype=torch.float32),
        pd.Series(dummy(jdft2d_task, 3), index=jdft2d_task.test_ids(3)).iloc[::-1],
        dummy(jdft2d_task, 4).astype(np.float32),
    ]
    for fold, p in enumerate(preds):
        mio.record(
            mb, "matbench_jdft2d", fold, p, params={"fold": np.int64(fold), "lr": np.float32(0.1)}
        )
    assert mb.is_valid
    assert mb.validate() == {}
    assert fold_maes(mb) == pytest.approx(OFFICIAL_DUMMY_MAE_JDFT2D, abs=1e-3)

    path = mio.save_benchmark(mb, tmp_path / "results.json.gz")
    assert [p.name for p in tmp_path.iterdir()] == ["results.json.gz"]
    back = mio.load_benchmark(path)
    assert isinstance(back, MatbenchBenchmark)
    assert back.is_valid
    assert back.validate() == {}
    assert fold_maes(back) == pytest.approx(fold_maes(mb))
    assert back.scores["matbench_jdft2d"]["mae"]["mean"] == pytest.approx(
        np.mean(OFFICIAL_DUMMY_MAE_JDFT2D), abs=1e-3
    )

    # matbench's own reader reads every file we write, the .gz name included
    theirs = MatbenchBenchmark.from_file(str(path))
    assert theirs.is_valid
    assert fold_maes(theirs) == pytest.approx(fold_maes(mb), rel=1e-12)
    plain = mio.save_benchmark(mb, tmp_path / "results.json")
    assert MatbenchBenchmark.from_file(str(plain)).is_valid
    assert mio.load_benchmark(plain).is_valid
    # a real gzip (an earlier version of this package wrote them) still loads through ours
    old = tmp_path / "old.json.gz"
    old.write_bytes(gzip.compress(plain.read_bytes()))
    assert mio.load_benchmark(old).is_valid


def test_record_hands_matbench_float64_equal_to_our_predictions(jdft2d_task, monkeypatch):
    """What matbench receives is float64 and bit-equal to the predictions (float32 inputs are
    widened exactly, never rounded through float32 on the way)."""
    from matbench.task import MatbenchTask

    seen = []
    original = MatbenchTask.record

    def spy(self, fold_number, predictions, *args, **kwargs):
        seen.append(predictions)
        return original(self, fold_number, predictions, *args, **kwargs)

    monkeypatch.setattr(MatbenchTask, "record", spy)
    mb = mio.new_benchmark([jdft2d_task])
    pred64 = dummy(jdft2d_task, 0) + np.linspace(0, 1e-9, len(jdft2d_task.test_ids(0)))
    mio.record(mb, "matbench_jdft2d", 0, pred64)
    pred32 = dummy(jdft2d_task, 1).astype(np.float32) + np.float32(0.1)
    mio.record(mb, "matbench_jdft2d", 1, pred32)
    assert [np.asarray(p).dtype for p in seen] == [np.float64, np.float64]
    assert np.array_equal(np.asarray(seen[0]), pred64)  # not merely close: equal
    assert np.array_equal(np.asarray(seen[1]), pred32.astype(np.float64))
    stored = mb.tasks_map["matbench_jdft2d"].results["fold_0"].data
    assert np.array_equal(np.array(list(stored.values()), dtype=np.float64), pred64)


def test_record_through_a_task_and_refuse_double_recording(jdft2d_task):
    fresh = load_task("matbench_jdft2d", sample=True)
    mio.record(fresh, 0, dummy(fresh, 0))
    mtask = fresh.matbench_task
    assert mtask.is_recorded[0]
    with pytest.raises(mio.AlreadyRecordedError, match="fold 0 is already recorded"):
        mio.record(fresh, 0, dummy(fresh, 0) + 1.0)
    before = dict(mtask.results)["fold_0"]["scores"]["mae"]
    mio.record(fresh, 0, dummy(fresh, 0) + 1.0, {"again": True}, overwrite=True)
    after = dict(mtask.results)["fold_0"]["scores"]["mae"]
    assert after != pytest.approx(before)
    assert dict(mtask.results)["fold_0"]["parameters"] == {"again": True}
    assert mio.new_benchmark(jdft2d_task).tasks_map["matbench_jdft2d"].is_recorded[0] is False


@pytest.mark.parametrize(
    ("bad", "error", "match"),
    [
        (lambda n: np.zeros(n - 1), ValueError, "126 .* for 127 test entries"),
        (lambda n: np.zeros((n, 1)), ValueError, "must be 1-D"),
        (lambda n: np.r_[np.nan, np.zeros(n - 1)], ValueError, "non-finite .*mb-jdft2d-003"),
        (lambda n: ["x"] * n, TypeError, "not numeric"),
    ],
)
def test_bad_predictions_are_refused(jdft2d_task, bad, error, match):
    mb = mio.new_benchmark(jdft2d_task)
    n = len(jdft2d_task.test_ids(1))
    with pytest.raises(error, match=match):
        mio.record(mb, "matbench_jdft2d", 1, bad(n))
    assert not mb.tasks_map["matbench_jdft2d"].is_recorded[1]


def test_bad_calls_are_refused(jdft2d_task):
    with pytest.raises(ValueError, match="data not loaded"):
        mio.record(
            mio.new_benchmark("matbench_jdft2d"), "matbench_jdft2d", 0, dummy(jdft2d_task, 0)
        )
    mb = mio.new_benchmark(jdft2d_task)
    with pytest.raises(ValueError, match="fold must be one of"):
        mio.record(mb, "matbench_jdft2d", 5, dummy(jdft2d_task, 0))
    with pytest.raises(KeyError, match="no task 'matbench_phonons'"):
        mio.record(mb, "matbench_phonons", 0, dummy(jdft2d_task, 0))
    with pytest.raises(TypeError, match="not JSON-serialisable"):
        mio.record(mb, "matbench_jdft2d", 0, dummy(jdft2d_task, 0), params={"f": object()})
    local = load_task("flla", sample=True)
    with pytest.raises(ValueError, match="not loaded through matbench"):
        mio.new_benchmark(local)


def test_autoload_reads_the_shipped_file():
    mb = mio.new_benchmark(["matbench_jdft2d"], autoload=True)
    assert len(mb.tasks_map["matbench_jdft2d"].df) == 636


def test_partial_benchmark_reloads_and_resumes(jdft2d_task, tmp_path):
    mb = mio.new_benchmark(jdft2d_task)
    mio.record(mb, "matbench_jdft2d", 0, dummy(jdft2d_task, 0))
    mio.record(mb, "matbench_jdft2d", 3, dummy(jdft2d_task, 3))
    path = mio.save_benchmark(mb, tmp_path / "partial.json.gz")
    back = mio.load_benchmark(path, jdft2d_task)
    mtask = back.tasks_map["matbench_jdft2d"]
    assert mtask.is_recorded == {0: True, 1: False, 2: False, 3: True, 4: False}
    with pytest.raises(mio.AlreadyRecordedError):
        mio.record(back, "matbench_jdft2d", 3, dummy(jdft2d_task, 3))
    for fold in (1, 2, 4):
        mio.record(back, "matbench_jdft2d", fold, dummy(jdft2d_task, fold))
    mio.save_benchmark(back, path)
    final = mio.load_benchmark(path)
    assert final.is_valid
    assert fold_maes(final) == pytest.approx(OFFICIAL_DUMMY_MAE_JDFT2D, abs=1e-3)


def test_tampered_or_foreign_files_are_refused(jdft2d_task, tmp_path):
    mb = mio.new_benchmark(jdft2d_task)
    mio.record(mb, "matbench_jdft2d", 0, dummy(jdft2d_task, 0))
    d = mb.as_dict()
    first = next(iter(d["tasks"]["matbench_jdft2d"]["results"]["fold_0"]["data"]))
    d["tasks"]["matbench_jdft2d"]["results"]["fold_0"]["data"][first] = 0.0
    (tmp_path / "tampered.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="hash mismatch"):
        mio.load_benchmark(tmp_path / "tampered.json")
    (tmp_path / "junk.json.gz").write_bytes(gzip.compress(b"not json"))
    with pytest.raises(ValueError, match="not a matbench benchmark file"):
        mio.load_benchmark(tmp_path / "junk.json.gz")


def test_matbench_documented_loop_with_our_estimator_pretrains_with_dim(tmp_path):
    """The README's matbench loop, unchanged but for tiny settings and one fold."""
    from tiny_settings import TINY

    from matbench_dim.estimator import SiteNetDIMRegressor

    mb = mio.new_benchmark([load_task("sample:matbench_jdft2d")])
    task = mb.tasks_map["matbench_jdft2d"]
    fold = task.folds[0]
    X, y = task.get_train_and_val_data(fold)
    model = SiteNetDIMRegressor(**TINY, random_state=0).fit(X, y)
    assert model.pretrained_
    assert model.pretrained_encoder_.info["n_pretrain"] == len(X)
    task.record(fold, model.predict(task.get_test_data(fold)))
    back = mio.load_benchmark(mio.save_benchmark(mb, tmp_path / "results.json.gz"))
    assert back.tasks_map["matbench_jdft2d"].is_recorded[fold]  # (matbench's own from_file
    # reads only files with every fold recorded; the round-trip test above covers that)
