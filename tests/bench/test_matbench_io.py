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
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json.gz"]
    back = mio.load_benchmark(path)
    assert isinstance(back, MatbenchBenchmark)
    assert back.is_valid
    assert back.validate() == {}
    assert fold_maes(back) == pytest.approx(fold_maes(mb))
    assert back.scores["matbench_jdft2d"]["mae"]["mean"] == pytest.approx(
        np.mean(OFFICIAL_DUMMY_MAE_JDFT2D), abs=1e-3
    )

    # the gzip holds exactly what matbench's own from_dict / from_file read
    assert MatbenchBenchmark.from_dict(json.loads(gzip.decompress(path.read_bytes()))).is_valid
    plain = mio.save_benchmark(mb, tmp_path / "results.json")
    assert MatbenchBenchmark.from_file(str(plain)).is_valid
    assert mio.load_benchmark(plain).is_valid


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
