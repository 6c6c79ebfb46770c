"""The matbench submission folder: real fits on the shipped matbench_jdft2d, matbench's own
reader, the info.json keys of its leaderboard, resume after an interruption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matbench.bench import MatbenchBenchmark
from tiny_settings import TINY

from matbench_dim.bench.submission import (
    INFO_KEYS,
    SubmissionInfo,
    check_submission,
    run_submission,
)
from matbench_dim.data.sources import load_task
from matbench_dim.estimator import SiteNetDIMRegressor

SAMPLES = Path(__file__).resolve().parents[2] / "matbench_dim" / "data" / "samples"
PARAMS = {**TINY, "pretrain__epochs": 1, "finetune__epochs": 3}


class CountingRegressor(SiteNetDIMRegressor):
    """The real estimator; records what every fit was given."""

    fits: list[dict[str, Any]] = []

    def fit(self, X: Any, y: Any, X_unlabeled: Any = None) -> CountingRegressor:
        type(self).fits.append({"ids": set(X.index), "n": len(X), "random_init": self.random_init})
        return super().fit(X, y, X_unlabeled)


@pytest.fixture(scope="module")
def jdft2d():
    return load_task("matbench_jdft2d", sample=True)


def fold_predictions(path: Path) -> dict[str, dict[str, float]]:
    d = json.loads(path.read_text())
    results = d["tasks"]["matbench_jdft2d"]["results"]
    return {k: v["data"] for k, v in results.items() if v.get("data")}


def test_submission_is_read_by_matbench_and_resumes_where_it_stopped(jdft2d, tmp_path):
    out = tmp_path / "matbench_v0.1_SiteNet-DIM"
    info = SubmissionInfo(authors="A. Tester", notes="CI run with tiny settings")
    CountingRegressor.fits = []
    kwargs = {"info": info, "estimator_params": PARAMS, "factory": CountingRegressor}
    run_submission([jdft2d], out, folds=[0, 1], **kwargs)  # as if stopped after fold 1
    partial = fold_predictions(out / "results.json.gz")
    assert sorted(partial) == ["fold_0", "fold_1"]
    notes = json.loads((out / "info.json").read_text())["notes"]
    assert "incomplete: folds not recorded {'matbench_jdft2d': [2, 3, 4]}" in notes
    with pytest.raises(ValueError, match="not every fold is recorded"):
        check_submission(out)

    run_submission([jdft2d], out, **kwargs)  # resumes: only folds 2-4 are fitted
    assert [f["n"] for f in CountingRegressor.fits] == [len(jdft2d.train_ids(f)) for f in range(5)]
    for fold, fit in enumerate(CountingRegressor.fits):
        assert fit["ids"] == set(jdft2d.train_ids(fold))  # the whole training fold, no test id
        assert not fit["ids"] & set(jdft2d.test_ids(fold))
        assert fit["random_init"] is False  # fit() DIM-pretrains before fine-tuning
    full = fold_predictions(out / "results.json.gz")
    assert {k: full[k] for k in partial} == partial  # recorded folds kept bit for bit

    # what matbench's leaderboard reads: its own from_file, a valid complete benchmark
    theirs = MatbenchBenchmark.from_file(str(out / "results.json.gz"))
    assert theirs.is_valid
    assert theirs.tasks_map["matbench_jdft2d"].all_folds_recorded
    for fold in range(5):
        recorded = theirs.tasks_map["matbench_jdft2d"].results[f"fold_{fold}"]["data"]
        assert list(recorded) == list(jdft2d.test_ids(fold))
    scores = check_submission(out)
    assert np.isfinite(scores["matbench_jdft2d"])
    written = json.loads((out / "info.json").read_text())
    assert all(written[k] for k in INFO_KEYS if k != "notes")
    assert written["authors"] == "A. Tester"
    assert written["notes"] == "CI run with tiny settings"  # the "incomplete" note is gone
    assert any(r.startswith("matbench==") for r in written["requirements"]["python"])
    assert "arXiv:2407.00671" in written["bibtex_refs"][0]

    # the source file of the folder reproduces it: run again there, it finds every fold done
    before = (out / "results.json.gz").read_bytes()
    env = {"MATBENCH_DIM_SHARED_DATA": str(SAMPLES), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "run_submission.py"], cwd=out, capture_output=True, text=True,
        timeout=300, env={**env, "PYTHONPATH": ":".join(sys.path)},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert (out / "results.json.gz").read_bytes() == before

    with pytest.raises(ValueError, match="was started with other settings"):
        run_submission([jdft2d], out, **{**kwargs, "seed": 1})


def test_submission_refuses_local_data_and_empty_info(tmp_path, flla_sample_task):
    with pytest.raises(ValueError, match="flla: not a matbench task"):
        run_submission([flla_sample_task], tmp_path / "s", info=SubmissionInfo(authors="A"))
    with pytest.raises(ValueError, match="non-empty 'authors'"):
        SubmissionInfo(authors=" ")


def test_submission_ensemble_records_the_members_std(jdft2d, tmp_path):
    kwargs = {"info": SubmissionInfo(authors="A. Tester"), "estimator_params": PARAMS}
    run_submission([jdft2d], tmp_path / "s", folds=[0], n_members=2, **kwargs)
    d = json.loads((tmp_path / "s" / "results.json.gz").read_text())
    fold0 = d["tasks"]["matbench_jdft2d"]["results"]["fold_0"]
    stds = [u["std"] for u in fold0["uncertainty"].values()]
    assert len(stds) == len(jdft2d.test_ids(0))
    assert min(stds) > 0
    assert fold0["parameters"]["n_members"] == 2
