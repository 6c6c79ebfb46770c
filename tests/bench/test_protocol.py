"""The label-masking grid: subsets, leak checks, resume, cell files, backends, methods, and
the MLflow runs each grid leaves (parent per task, child per pretraining and per cell)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tiny_settings import TINY

from matbench_dim.bench import results as res
from matbench_dim.bench.baselines import DummyMeanRegressor
from matbench_dim.bench.grid import run_grid
from matbench_dim.bench.methods import EstimatorMethod, Method, make_method
from matbench_dim.bench.subsets import LeakageError, check_disjoint, draw_subset, pretraining_pool
from matbench_dim.data.sources import load_task
from matbench_dim.data.task import task_from_structures


def run_cells(*args, **kwargs):
    """``run_grid``, tracked only when a test names a store (``tracking_uri``)."""
    kwargs.setdefault("tracking", "tracking_uri" in kwargs)
    return run_grid(*args, **kwargs)


@pytest.fixture(autouse=True)
def _no_ambient_store(monkeypatch, tmp_path):
    """No inherited MLflow store; a stray default store would land in a temporary folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def _runs(uri: str, task: str) -> list:
    """Every run of the task's experiment."""
    from mlflow import MlflowClient

    from matbench_dim.tracking.tracker import task_experiment

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(task_experiment(task))
    return client.search_runs([exp.experiment_id], max_results=1000)


@pytest.fixture(scope="module")
def small_task(jdft2d_df):
    """150 real jdft2d crystals with seeded 5-fold splits (120 train / 30 test per fold)."""
    df = jdft2d_df.iloc[:150]
    return task_from_structures(
        pd.Series(list(df["structure"]), index=[f"e{i:03d}" for i in range(150)]),
        df["exfoliation_en"].to_numpy(),
        name="jdft2d150",
        target_name="exfoliation_en",
    )


class CountingMethod(EstimatorMethod):
    """Train-mean predictor that logs every fit and can fail once on a chosen cell."""

    fits: list[tuple[int, int]] = []
    fail_on: tuple[int, int] | None = None

    def __init__(self, name: str = "counting") -> None:
        super().__init__(name, DummyMeanRegressor())

    def build(self, random_state, pretrained):
        method = self

        class _Est(DummyMeanRegressor):
            def fit(self, X, y):
                key = (len(X), random_state)
                if method.fail_on == key:
                    method.fail_on = None
                    raise RuntimeError("simulated interruption")
                CountingMethod.fits.append(key)
                return super().fit(X, y)

        return _Est()


class PretrainSpy(Method):
    """A method with pretraining that only records which ids it was given."""

    name = "spy"
    pretrain_key = "spy"
    seen: list[list[str]] = []

    def pretrain(self, X, path, random_state, task, fold):
        PretrainSpy.seen.append(list(X.index))
        path.mkdir(parents=True)

    def build(self, random_state, pretrained):
        assert pretrained is not None
        assert pretrained.is_dir()
        return DummyMeanRegressor()


# --------------------------------------------------------------------------- subsets


def test_subsets_nested_reproducible_and_disjoint(small_task):
    for fold in range(small_task.n_folds):
        train, test = small_task.train_ids(fold), small_task.test_ids(fold)
        for seed in (0, 1):
            small = draw_subset(train, 10, fold, seed)
            big = draw_subset(train, 40, fold, seed)
            assert list(big[:10]) == list(small)
            assert len(set(big)) == 40
            assert set(big) <= set(train)
            assert not set(big) & set(test)
            np.testing.assert_array_equal(big, draw_subset(train, 40, fold, seed))
            perm = np.random.default_rng(1000 * fold + seed).permutation(len(train))
            assert list(big) == [train[i] for i in perm[:40]]
        assert list(draw_subset(train, 40, fold, 0)) != list(draw_subset(train, 40, fold, 1))
    with pytest.raises(ValueError, match=r"n=121 .* only 120 labelled training entries"):
        draw_subset(small_task.train_ids(0), 121, 0, 0)
    with pytest.raises(ValueError, match="positive integer"):
        draw_subset(small_task.train_ids(0), 0, 0, 0)


def test_pretraining_pool_cap(small_task):
    pool = small_task.train_ids(2)
    assert list(pretraining_pool(pool, None, 2)) == list(pool)
    assert list(pretraining_pool(pool, 10_000, 2)) == list(pool)
    capped = pretraining_pool(pool, 25, 2)
    assert len(capped) == 25
    assert set(capped) <= set(pool)
    assert list(capped) == list(pretraining_pool(pool, 25, 2))
    assert list(capped) != list(pretraining_pool(pool, 25, 3))


def test_grid_rejects_too_large_n_before_any_work(small_task, tmp_path):
    with pytest.raises(ValueError, match=r"n_labels \[500\] exceed"):
        run_cells([small_task], tmp_path, n_labels=[10, 500], seeds=[0], methods=["dummy_mean"])
    assert not list(tmp_path.rglob("*.json"))
    with pytest.raises(ValueError, match="unknown method"):
        run_cells([small_task], tmp_path, n_labels=[10], methods=["dmi"])


# --------------------------------------------------------------------------- leaks


def _leaky_copy(task):
    """The same task with one test id of fold 0 slipped into its training ids."""
    leaky = task_from_structures(task.structures, task.targets, name="leaky")
    train, test = leaky.folds[0]
    leaky.folds[0] = (np.append(train, test[0]), test)
    return leaky, test[0]


def test_check_disjoint_names_the_ids():
    check_disjoint(["a", "b"], ["c"], stage="fitting", where="here")
    with pytest.raises(LeakageError, match=r"here: 1 test ids would reach pretraining: 'b'"):
        check_disjoint(["a", "b"], ["b", "c"], stage="pretraining", where="here")


def test_leak_stops_pretraining_and_fitting(small_task, tmp_path):
    leaky, _ = _leaky_copy(small_task)
    PretrainSpy.seen = []
    with pytest.raises(LeakageError, match="pretraining"):
        run_cells(
            [leaky], tmp_path / "a", folds=[0], n_labels=[10], seeds=[0], methods=[PretrainSpy()]
        )
    assert PretrainSpy.seen == []
    CountingMethod.fits = []
    # n=121 is the whole leaky training set, so the subset holds the test id
    with pytest.raises(LeakageError, match="fitting"):
        run_cells(
            [leaky],
            tmp_path / "b",
            folds=[0],
            n_labels=[121],
            seeds=[0],
            methods=[CountingMethod()],
        )
    assert CountingMethod.fits == []
    assert not list((tmp_path / "b").rglob("fold*.json"))


def test_pretraining_sees_only_training_ids(small_task, tmp_path):
    PretrainSpy.seen = []
    summary = run_cells(
        [small_task],
        tmp_path,
        folds=[0, 1],
        n_labels=[10, 20],
        seeds=[0, 1],
        methods=[PretrainSpy()],
        max_train_structures=50,
    )
    assert summary.n_pretrained == 2
    assert summary.n_run == 8
    for fold, seen in enumerate(PretrainSpy.seen):
        assert len(seen) == 50
        assert set(seen) <= set(small_task.train_ids(fold))
    table = summary.results()
    assert set(table["n_pretrain"]) == {50}
    assert set(table["max_train_structures"]) == {50}


# --------------------------------------------------------------------------- resume and files


def test_resume_refuses_other_settings(small_task, tmp_path):
    grid = {"folds": [0], "n_labels": [10], "seeds": [0]}
    run_cells([small_task], tmp_path, methods=[PretrainSpy()], max_train_structures=50, **grid)
    with pytest.raises(ValueError, match=r"other settings.*max_train_structures 50 vs 40"):
        run_cells([small_task], tmp_path, methods=[PretrainSpy()], max_train_structures=40, **grid)
    run_cells(
        [small_task],
        tmp_path / "rf",
        methods=["rf_magpie"],
        **grid,
        method_params={"rf_magpie": {"n_estimators": 5}},
    )
    with pytest.raises(ValueError, match=r"other settings.*method parameters"):
        run_cells(
            [small_task],
            tmp_path / "rf",
            methods=["rf_magpie"],
            **grid,
            method_params={"rf_magpie": {"n_estimators": 6}},
        )


def test_resume_after_interruption(small_task, tmp_path):
    grid = {"folds": [0, 1], "n_labels": [10, 20], "seeds": [0, 1, 2]}
    CountingMethod.fits = []
    method = CountingMethod()
    method.fail_on = (20, 1)  # dies on the (n=20, seed=1) cell of fold 0
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_cells([small_task], tmp_path, methods=[method], **grid)
    done_first = len(CountingMethod.fits)
    assert done_first == 4  # fold 0: n=10 x 3 seeds, then n=20 seed 0
    assert len(res.load_results(tmp_path)) == done_first

    summary = run_cells([small_task], tmp_path, methods=[method], **grid)
    assert summary.n_cells == 12
    assert summary.n_skipped == done_first
    assert summary.n_run == len(CountingMethod.fits) - done_first == 12 - done_first

    cells = sorted((tmp_path / "cells").rglob("fold*.json"))
    for path in cells[:3]:
        path.unlink()
    before = len(CountingMethod.fits)
    summary = run_cells([small_task], tmp_path, methods=[method], **grid)
    assert (summary.n_run, summary.n_skipped) == (3, 9)
    assert len(CountingMethod.fits) - before == 3
    assert len(res.load_results(tmp_path)) == 12


def test_cell_files_are_consistent(small_task, tmp_path):
    run_cells([small_task], tmp_path, folds=[3], n_labels=[30], seeds=[4], methods=["dummy_mean"])
    table = res.load_results(tmp_path)
    assert len(table) == 1
    row = table.iloc[0]
    subset = draw_subset(small_task.train_ids(3), 30, 3, 4)
    assert row["subset_sha256"] == res.ids_sha256(subset)
    assert row["n_test"] == len(small_task.test_ids(3)) == 30
    assert row["mode"] == "baseline"
    assert row["n_pretrain"] == 0
    assert row["versions"]["scikit-learn"] != "absent"
    preds = res.load_predictions(row["path"])
    assert list(preds["id"]) == list(small_task.test_ids(3))
    y = small_task.targets
    np.testing.assert_allclose(preds["y_pred"], y.loc[subset].mean(), rtol=1e-9)
    np.testing.assert_allclose(preds["y_true"], y.loc[small_task.test_ids(3)], rtol=1e-9)
    assert row["mae"] == pytest.approx(np.abs(preds["y_pred"] - preds["y_true"]).mean(), rel=1e-9)
    assert json.loads(Path(row["path"]).read_text())["params"]["subset_seed"] == 3004


# --------------------------------------------------------------------------- backends


def test_joblib_processes_match_sequential(small_task, tmp_path):
    grid = {
        "folds": [0, 1],
        "n_labels": [10, 40],
        "seeds": [0, 1],
        "methods": ["dummy_mean", "median"],
    }
    run_cells([small_task], tmp_path / "seq", n_jobs=1, **grid)
    run_cells([small_task], tmp_path / "par", n_jobs=2, backend="loky", **grid)
    a, b = res.load_results(tmp_path / "seq"), res.load_results(tmp_path / "par")
    assert len(a) == len(b) == 16
    np.testing.assert_allclose(a["mae"], b["mae"], rtol=1e-12)


def test_joblib_processes_match_sequential_for_site_net(small_task, tmp_path):
    """Worker processes give the Site-Net methods bit-identical predictions: the pretrained
    encoder is shared through the results folder, seeds and thread counts travel along."""
    params = {"estimator_params": {**TINY, "pretrain__epochs": 1, "finetune__epochs": 2}}
    grid = {
        "folds": [0],
        "n_labels": [10],
        "seeds": [0, 1],
        "methods": ["dim", "random_init"],
        "method_params": {"dim": params, "random_init": params},
    }
    run_cells([small_task], tmp_path / "seq", n_jobs=1, **grid)
    run_cells([small_task], tmp_path / "par", n_jobs=2, backend="loky", **grid)
    a, b = res.load_results(tmp_path / "seq"), res.load_results(tmp_path / "par")
    assert len(a) == len(b) == 4
    key = ["method", "n", "seed"]
    a, b = a.sort_values(key).reset_index(drop=True), b.sort_values(key).reset_index(drop=True)
    assert a["mae"].tolist() == b["mae"].tolist()  # bit-identical, not just close
    for pa, pb in zip(a["path"], b["path"], strict=True):
        assert (
            res.load_predictions(pa)["y_pred"].tolist()
            == res.load_predictions(pb)["y_pred"].tolist()
        )


def test_dask_backend_on_local_cluster(small_task, tmp_path):
    distributed = pytest.importorskip("dask.distributed")
    grid = {
        "folds": [0],
        "n_labels": [10, 20],
        "seeds": [0, 1],
        "methods": ["dummy_mean", "rf_magpie"],
    }
    grid["method_params"] = {"rf_magpie": {"n_estimators": 10}}
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
    ) as cluster:
        summary = run_cells(
            [small_task],
            tmp_path / "dask",
            backend="dask",
            scheduler_address=cluster.scheduler_address,
            **grid,
        )
    assert summary.n_run == 8
    run_cells([small_task], tmp_path / "seq", **grid)
    a, b = res.load_results(tmp_path / "dask"), res.load_results(tmp_path / "seq")
    np.testing.assert_allclose(a["mae"], b["mae"], rtol=1e-12)


# --------------------------------------------------------------------------- methods


def test_method_registry():
    assert make_method("rf_magpie").featurizer == "magpie"
    assert make_method("zero").build(0, None).fit([1], [5.0]).predict([1, 2]).tolist() == [0, 0]
    assert make_method("dim").pretrain_key == make_method("dim_rf").pretrain_key
    assert make_method("random_init").pretrain_key is None
    assert make_method("dim_rf").mode == "representation"
    with pytest.raises(ValueError, match="transfer_target"):
        make_method("transfer")


def test_label_free_pretraining_is_shared_across_targets(tmp_path):
    """DIM never reads labels, so a task's two targets (same folds, same pool) share one
    encoder per fold; a second run finds it and pretrains nothing."""
    tiny = {"pretrain__epochs": 1, "finetune__epochs": 2, "finetune__patience": 0, "device": "cpu"}
    tasks = [load_task("sample:perovskites_subset", target=t) for t in ("e_form", "gap")]
    grid = {"folds": [0], "n_labels": [8], "seeds": [0], "methods": ["dim"]}
    grid.update(method_params={"dim": {"estimator_params": tiny}}, max_train_structures=20)
    summary = run_cells(tasks, tmp_path, **grid)
    assert summary.n_pretrained == 1
    assert summary.n_run == 2
    table = summary.results()
    assert set(table["target"]) == {"e_form", "gap gllbsc"}
    (encoder,) = {p["pretrained"] for p in table["params"]}
    assert "label-free" in encoder
    more = run_cells(tasks, tmp_path, **{**grid, "seeds": [1]})
    assert more.n_pretrained == 0
    assert more.n_run == 2


def test_sitenet_methods_run_on_a_sample(tmp_path, store):
    """DIM, random-init, transfer and representation methods through the real estimator,
    each cell and each pretraining leaving a FINISHED MLflow run with per-epoch curves."""
    task = load_task("sample:perovskites_subset")
    tiny = {"pretrain__epochs": 1, "finetune__epochs": 2, "finetune__patience": 0, "device": "cpu"}
    methods = ["dim", "random_init", "dim_rf", "random_rf", "transfer"]
    params = {m: {"estimator_params": tiny} for m in methods}
    params["transfer"]["transfer_target"] = "gap"
    params["dim_rf"]["n_estimators"] = params["random_rf"]["n_estimators"] = 10
    grid = {"folds": [0], "n_labels": [8], "seeds": [0], "methods": methods}
    grid.update(method_params=params, max_train_structures=30, tracking_uri=store)
    summary = run_cells([task], tmp_path, **grid)
    assert summary.n_pretrained == 2  # one DIM encoder shared by dim and dim_rf, one transfer
    table = summary.results().set_index("method")
    assert np.isfinite(table["mae"]).all()
    assert table.loc["dim", "n_pretrain"] == table.loc["transfer", "n_pretrain"] == 30
    assert table.loc["random_init", "n_pretrain"] == 0
    assert table.loc["dim_rf", "mode"] == "representation"
    assert any((tmp_path / "cache").iterdir())  # crystals featurized once, then cached

    runs = _runs(store, task.name)
    parent_id = summary.tracking_runs[f"{task.name}/e_form"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert len(runs) == 1 + 2 + 5  # parent, two pretrainings, five cells
    children = {r.info.run_id: r for r in runs if r.info.run_id != parent_id}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent_id}
    cells = {r.data.tags["method"]: r for r in children.values() if r.data.tags["kind"] == "cell"}
    assert set(cells) == set(methods)
    for method, run in cells.items():
        mine = table.loc[method]
        assert run.data.tags["mode"] == mine["mode"]
        assert run.info.run_id == mine["params"]["mlflow_run_id"]
        assert run.data.metrics["test/mae"] == pytest.approx(mine["mae"], rel=1e-9)
        assert run.data.metrics["test/rmse"] == pytest.approx(mine["rmse"], rel=1e-9)
        assert run.data.metrics["test/max_error"] == pytest.approx(mine["max_error"], rel=1e-9)
        assert (run.data.params["data.n"], run.data.params["data.seed"]) == ("8", "0")
        assert run.data.params["data.sha256"] == mine["data_sha256"]
    dim = cells["dim"].data.params
    assert dim["pretrain__epochs"] == "1"
    assert dim["encoder_init"] == table.loc["dim", "params"]["pretrained"]
    from mlflow import MlflowClient

    client = MlflowClient(store)
    history = client.get_metric_history(cells["dim"].info.run_id, "finetune/val_loss")
    assert sorted(m.step for m in history) == [0, 1]
    ids_file = client.download_artifacts(
        cells["random_init"].info.run_id, "data/subset_ids.json", str(tmp_path / "ids")
    )
    ids = json.loads(Path(ids_file).read_text())
    assert ids["train"] == list(draw_subset(task.train_ids(0), 8, 0, 0))
    assert ids["test"] == list(task.test_ids(0))
    pretrains = [r for r in children.values() if r.data.tags["kind"] == "pretrain"]
    dim_pre = next(r for r in pretrains if r.data.tags["method"] in ("dim", "dim_rf"))
    assert len(client.get_metric_history(dim_pre.info.run_id, "pretrain/train_dim_loss")) == 1
    assert {a.path for a in client.list_artifacts(dim_pre.info.run_id)} >= {"encoder", "data"}
    parent = client.get_run(parent_id)
    assert parent.data.params["grid.n_labels"] == "[8]"
    assert parent.data.metrics["grid/n_cells_run"] == 5
    assert {a.path for a in client.list_artifacts(parent_id, "figures")} == {
        "figures/learning_curve.png"
    }

    again = run_cells([task], tmp_path, **grid)
    assert (again.n_run, again.tracking_runs) == (0, {})
    assert len(_runs(store, task.name)) == len(runs)  # nothing to run, nothing recorded


def test_crashed_cell_ends_its_run_and_the_parent_failed(small_task, tmp_path, store):
    CountingMethod.fits = []
    method = CountingMethod()
    method.fail_on = (20, 0)
    with pytest.raises(RuntimeError, match="simulated interruption"):
        run_cells(
            [small_task],
            tmp_path,
            folds=[0],
            n_labels=[10, 20],
            seeds=[0],
            methods=[method],
            tracking_uri=store,
        )
    runs = _runs(store, small_task.name)
    status = sorted((r.data.tags["kind"], r.data.tags.get("n"), r.info.status) for r in runs)
    assert status == [
        ("cell", "10", "FINISHED"),
        ("cell", "20", "FAILED"),
        ("grid", None, "FAILED"),
    ]
    failed = next(r for r in runs if r.data.tags.get("n") == "20")
    assert "RuntimeError: simulated interruption" in failed.data.tags["matbench_dim.error"]


# --------------------------------------------------------------------------- matbench files


def test_matbench_records_are_valid_and_resume(tmp_path, store):
    """Full matbench_jdft2d: one valid MatbenchBenchmark file per (method, n, seed), also
    attached to the grid's MLflow parent run."""
    from matbench.bench import MatbenchBenchmark

    from matbench_dim.bench.recording import matbench_path

    grid = {"n_labels": [50], "seeds": [0], "methods": ["dummy_mean", "rf_magpie"]}
    grid["method_params"] = {"rf_magpie": {"n_estimators": 50}}
    first = run_cells(["matbench_jdft2d"], tmp_path, folds=[0, 1], **grid)  # interrupted run
    assert first.n_recorded == 4
    summary = run_cells(["matbench_jdft2d"], tmp_path, tracking_uri=store, **grid)
    assert (summary.n_run, summary.n_skipped, summary.n_recorded) == (6, 4, 6)
    from mlflow import MlflowClient

    parent = summary.tracking_runs["matbench_jdft2d/exfoliation_en"]
    logged = MlflowClient(store).download_artifacts(parent, "matbench", str(tmp_path / "got"))
    for method in ("dummy_mean", "rf_magpie"):
        saved = matbench_path(tmp_path, "matbench_jdft2d", method, 50, 0)
        assert (Path(logged) / method / saved.name).read_bytes() == saved.read_bytes()
    task = load_task("matbench_jdft2d")
    table = res.load_results(tmp_path)
    for method in ("dummy_mean", "rf_magpie"):
        path = matbench_path(tmp_path, "matbench_jdft2d", method, 50, 0)
        mb = MatbenchBenchmark.from_file(str(path))
        assert mb.validate() == {}
        assert mb.is_valid
        mtask = mb.tasks_map["matbench_jdft2d"]
        assert all(mtask.is_recorded.values())
        for fold in range(5):
            result = mtask.results[f"fold_{fold}"]
            mine = table[(table["method"] == method) & (table["fold"] == fold)].iloc[0]
            assert result.scores.mae == pytest.approx(mine["mae"], rel=1e-9)
            subset = draw_subset(task.train_ids(fold), 50, fold, 0)
            assert list(result.parameters.subset_ids) == list(subset)
            assert result.parameters.seed == 0
            assert result.parameters.method == method
    # a cell saved but never recorded (crash between the two) is recorded on the next run
    path = matbench_path(tmp_path, "matbench_jdft2d", "dummy_mean", 50, 0)
    path.unlink()
    again = run_cells(["matbench_jdft2d"], tmp_path, **grid)
    assert (again.n_run, again.n_recorded) == (0, 5)
    assert MatbenchBenchmark.from_file(str(path)).validate() == {}


def test_worker_processes_mirror_the_parent_log_levels():
    """loky/Dask workers start with no log handler: the grid hands them the parent's levels,
    so that ``-v`` shows their progress while matbench's own INFO chatter stays quiet."""
    code = (
        "import logging\n"
        "from matbench_dim.bench.cells import worker_logging\n"
        "worker_logging({'': logging.INFO, 'matbench_dim': 0, 'matbench': logging.WARNING})\n"
        "logging.getLogger('matbench_dim.bench.cells').info('cell done')\n"
        "logging.getLogger('matbench').info('matbench chatter')\n"
        "worker_logging(None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "INFO" in out.stderr
    assert "matbench_dim.bench.cells: cell done" in out.stderr
    assert "matbench chatter" not in out.stderr
    silent = subprocess.run(
        [sys.executable, "-c", code.replace("logging.INFO", "logging.WARNING")],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "cell done" not in silent.stderr


def test_dim_ensemble_cells_keep_their_std_and_the_report_shows_calibration(tmp_path):
    """``dim_ensemble`` shares ``dim``'s pretrained encoder, saves each prediction's std,
    hands it to matbench (``record(std=...)``) and the report tabulates its calibration."""
    from matbench_dim.bench.recording import matbench_path
    from matbench_dim.bench.report import write_report

    task = load_task("matbench_jdft2d", sample=True)
    est = {**TINY, "pretrain__epochs": 1, "finetune__epochs": 2}
    summary = run_cells(
        [task], tmp_path, folds=[0], n_labels=[10], seeds=[0], methods=["dim", "dim_ensemble"],
        method_params={"dim": {"estimator_params": est},
                       "dim_ensemble": {"estimator_params": est, "n_members": 3}},
        max_train_structures=60,
    )  # fmt: skip
    assert summary.n_pretrained == 1  # one encoder for both methods
    cells = res.load_results(tmp_path).set_index("method")
    preds = res.load_predictions(cells.loc["dim_ensemble", "path"])
    assert (preds["y_std"] > 0).all()
    assert "y_std" not in res.load_predictions(cells.loc["dim", "path"])
    recorded = json.loads(matbench_path(tmp_path, task.name, "dim_ensemble", 10, 0).read_text())
    fold0 = recorded["tasks"]["matbench_jdft2d"]["results"]["fold_0"]
    assert [fold0["uncertainty"][i]["std"] for i in preds["id"]] == pytest.approx(preds["y_std"])
    report = write_report(tmp_path)["markdown"].read_text()
    assert "Calibration of the predicted std" in report
    assert "| dim_ensemble | 10 |" in report
