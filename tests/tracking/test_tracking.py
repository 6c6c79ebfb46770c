"""MLflow tracking: store resolution, nested runs, per-epoch metrics, artifacts, the pyfunc
model over CIF strings, and runs that end FAILED/KILLED instead of staying RUNNING.

Every test writes to a temporary SQLite store, never to the repository's ``mlruns/``.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from matbench_dim.tracking import tracker as tracking
from matbench_dim.tracking.pyfunc import CifParseError, cif_frame, load_model, structures_from_cifs
from matbench_dim.tracking.runs import MAX_PARAM_CHARS, MLflowCallback, flatten_params, git_commit
from matbench_dim.tracking.store import default_store, resolve_tracking_uri
from matbench_dim.tracking.tracker import (
    TAG_HOST,
    TAG_PARENT,
    TAG_PID,
    TAG_PROC_START,
    NullTracker,
    close_stale_runs,
    download_encoder,
    setup_tracking,
)
from matbench_dim.training.callbacks import Callback

TINY = {
    "device": "cpu",
    "random_state": 0,
    "pretrain__epochs": 2,
    "finetune__epochs": 3,
    "finetune__patience": 0,
    "encoder__site_dim": 16,
    "encoder__pair_dim": 16,
    "encoder__attention_hidden": 16,
    "encoder__local_dim": 16,
    "encoder__global_hidden": 16,
    "encoder__global_dim": 16,
    "dim__critic_dim": 16,
    "dim__critic_hidden": 16,
    "finetune__head_hidden": 16,
}


@pytest.fixture(autouse=True)
def _no_ambient_store(monkeypatch, tmp_path):
    """No inherited store; a stray default store would land in a temporary folder."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the module (creating its tables takes several seconds)."""
    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    setup_tracking(uri, "warm-up")
    return uri


def _env(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "MATBENCH_DIM_NUM_THREADS": "1"}


# ----------------------------------------------------------------------- pure helpers
def test_resolve_tracking_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri, artifacts = default_store()
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns' / 'mlflow.db'}"
    assert artifacts == tmp_path.resolve() / "mlruns" / "artifacts"
    assert resolve_tracking_uri() == uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://team-server:5000")
    assert resolve_tracking_uri() == "http://team-server:5000"
    assert resolve_tracking_uri("postgresql://db/mlflow") == "postgresql://db/mlflow"
    assert resolve_tracking_uri(tmp_path / "x.db") == f"sqlite:///{tmp_path.resolve() / 'x.db'}"
    assert resolve_tracking_uri(str(tmp_path / "store")) == (
        f"sqlite:///{tmp_path.resolve() / 'store' / 'mlflow.db'}"
    )


def test_flatten_params_stringifies_reproducibly():
    class Opaque:
        pass

    flat = flatten_params(
        {
            "a": {"b": 1, "c": {"d": None}},
            "lst": [1, 2.5, "x"],
            "np": np.float32(0.5),
            "o": Opaque(),
        }
    )
    assert flat == {
        "a.b": "1",
        "a.c.d": "None",
        "lst": "[1, 2.5, x]",
        "np": "0.5",
        "o": f"{__name__}.test_flatten_params_stringifies_reproducibly.<locals>.Opaque",
    }


def test_structures_from_cifs_names_the_bad_row(real_structures):
    good = cif_frame(real_structures[:1])["cif"].iloc[0]
    assert len(structures_from_cifs([good])[0]) == len(real_structures[0])
    with pytest.raises(CifParseError, match=r"row 1 \(index 'b'\).*not a readable CIF"):
        structures_from_cifs([good, "not a cif"], index=["a", "b"])
    with pytest.raises(CifParseError, match=r"row 0 .*not a CIF string"):
        structures_from_cifs([None])


def test_null_tracker_records_nothing_but_still_computes(tmp_path):
    tracker = setup_tracking(tmp_path / "never", enabled=False)
    assert isinstance(tracker, NullTracker)
    with tracker.start_parent_run("p") as parent, tracker.start_child_run(None, "c") as run:
        assert parent.run_id is None
        assert run.run_id is None
        run.log_params({"a": 1})
        run.log_json({"x": 1}, "x.json")
        assert type(run.callback()) is Callback
        metrics = run.log_test_metrics([1.0, 2.0, 4.0], [1.0, 3.0, 1.0])
    assert metrics["mae"] == pytest.approx(4 / 3)
    assert metrics["rmse"] == pytest.approx(np.sqrt(10 / 3))
    assert metrics["max_error"] == 3.0
    assert not (tmp_path / "never").exists()


# ------------------------------------------------------------------- store and run basics
def test_setup_tracking_keeps_artifacts_next_to_the_database(store):
    tracker = setup_tracking(store, "matbench-dim/layout test")
    again = setup_tracking(store, "matbench-dim/layout test")
    assert again.experiment_id == tracker.experiment_id
    exp = tracker.client.get_experiment(tracker.experiment_id)
    db_dir = Path(store[len("sqlite:///") :]).parent
    assert exp.artifact_location == (db_dir / "artifacts" / "matbench-dim_layout_test").as_uri()
    previous = signal.getsignal(signal.SIGTERM)
    with tracker.start_parent_run("p", tags={"method": "dim"}) as parent:
        assert signal.getsignal(signal.SIGTERM) is not previous
        parent.log_json({"ok": True}, "results/summary.json")
    assert signal.getsignal(signal.SIGTERM) is previous
    local = Path(exp.artifact_location[len("file://") :]) / parent.run_id / "artifacts"
    assert json.loads((local / "results" / "summary.json").read_text()) == {"ok": True}


def test_long_and_many_params_are_truncated_and_batched(store):
    tracker = setup_tracking(store, "params")
    params = {f"p{i:03d}": i for i in range(250)}
    params["long"] = "x" * 2000
    with tracker.start_parent_run("p", log_environment=False) as run:
        run.log_params(params)
    got = tracker.client.get_run(run.run_id).data.params
    assert len(got) == 251
    assert got["p249"] == "249"
    assert len(got["long"]) == MAX_PARAM_CHARS
    full = tracker.client.download_artifacts(run.run_id, "params.json")
    assert json.loads(Path(full).read_text())["long"] == "x" * 2000


def test_exceptions_end_runs_failed_or_killed(store):
    tracker = setup_tracking(store, "endings")
    client = tracker.client
    opened = {}

    def failing_cell(parent_id):
        with tracker.start_child_run(parent_id, "bad") as bad:
            opened["bad"] = bad.run_id
            raise ValueError("boom")

    def interrupted_benchmark():
        with tracker.start_parent_run("p") as parent:
            opened["parent"] = parent.run_id
            with pytest.raises(ValueError):
                failing_cell(parent.run_id)
            # a child whose process is still alive (e.g. a worker of this benchmark)
            tags = {
                TAG_PARENT: parent.run_id,
                TAG_PID: str(os.getpid()),
                TAG_HOST: tracking._hostname(),
            }
            opened["orphan"] = client.create_run(tracker.experiment_id, tags=tags).info.run_id
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_benchmark()
    status = {k: client.get_run(v).info.status for k, v in opened.items()}
    assert status == {"parent": "KILLED", "bad": "FAILED", "orphan": "KILLED"}
    assert "ValueError: boom" in client.get_run(opened["bad"]).data.tags["matbench_dim.error"]


def test_close_stale_runs_spares_live_and_unverifiable_runs(store):
    tracker = setup_tracking(store, "stale")
    client = tracker.client
    other_host = client.create_run(
        tracker.experiment_id, tags={TAG_PID: "1", TAG_HOST: "elsewhere.example"}
    ).info.run_id
    with tracker.start_parent_run("live", close_stale=False) as live:
        assert tracker.close_stale_runs() == []
        if Path(f"/proc/{os.getpid()}/stat").exists():  # the pid now belongs to another process
            tags = {TAG_PID: str(os.getpid()), TAG_HOST: tracking._hostname(), TAG_PROC_START: "1"}
            reused = client.create_run(tracker.experiment_id, tags=tags).info.run_id
            assert close_stale_runs("stale", tracking_uri=store) == [reused]
        assert (
            close_stale_runs("stale", 3600.0, tracking_uri=store, include_unverifiable=True) == []
        )
        assert close_stale_runs("stale", tracking_uri=store, include_unverifiable=True) == [
            other_host
        ]
        assert client.get_run(live.run_id).info.status == "RUNNING"
    assert client.get_run(other_host).info.status == "KILLED"
    assert client.get_run(live.run_id).info.status == "FINISHED"


_HOLD_RUN = """
import sys, time
from matbench_dim.tracking.tracker import setup_tracking
tracker = setup_tracking(sys.argv[1], sys.argv[2])
with tracker.start_parent_run(sys.argv[3]) as run:
    print(run.run_id, flush=True)
    time.sleep(300)
"""


def _read_line(proc: subprocess.Popen, timeout: float = 120.0) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"subprocess printed nothing in {timeout} s: {proc.stderr.read()}")
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait(10)
        pytest.fail(f"subprocess exited ({proc.returncode}): {proc.stderr.read()[-3000:]}")
    return line


def test_killed_processes_do_not_leave_runs_running(store, tmp_path):
    """SIGTERM ends the run KILLED at once; after SIGKILL, close_stale_runs does it."""
    script = tmp_path / "hold_run.py"
    script.write_text(_HOLD_RUN)
    procs = {}
    try:
        for name in ("sigterm", "sigkill"):
            procs[name] = subprocess.Popen(
                [sys.executable, str(script), store, "interrupted", name],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=_env(store),
            )
        run_ids = {name: _read_line(proc) for name, proc in procs.items()}
        procs["sigterm"].send_signal(signal.SIGTERM)
        procs["sigkill"].kill()
        assert procs["sigterm"].wait(60) == 143
        procs["sigkill"].wait(60)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    client = mlflow.MlflowClient(store)
    assert client.get_run(run_ids["sigterm"]).info.status == "KILLED"
    assert client.get_run(run_ids["sigkill"]).info.status == "RUNNING"
    assert close_stale_runs("interrupted", tracking_uri=store) == [run_ids["sigkill"]]
    assert client.get_run(run_ids["sigkill"]).info.status == "KILLED"


def _worker_cell(tracker, parent_id: str, k: int) -> tuple[str, int]:
    with tracker.start_child_run(parent_id, f"cell{k}", tags={"method": "dummy_mean"}) as run:
        run.log_params({"k": k})
        cb = run.callback(flush_every_s=0.0)
        for epoch in range(4):
            cb.on_epoch_end("finetune", epoch, {"val_loss": k + 0.5 * epoch}, None)
        run.log_metrics({"mae": float(k)}, prefix="test/")
    return run.run_id, os.getpid()


def test_child_runs_from_joblib_workers(store):
    from joblib import Parallel, delayed

    tracker = setup_tracking(store, "workers")
    with tracker.start_parent_run("grid") as parent:
        out = Parallel(n_jobs=2, backend="loky")(
            delayed(_worker_cell)(tracker, parent.run_id, k) for k in range(4)
        )
    assert any(pid != os.getpid() for _, pid in out)
    client = tracker.client
    for k, (run_id, _) in enumerate(out):
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        assert run.data.tags[TAG_PARENT] == parent.run_id
        assert run.data.params["k"] == str(k)
        history = client.get_metric_history(run_id, "finetune/val_loss")
        assert [(m.step, m.value) for m in history] == [(e, k + 0.5 * e) for e in range(4)]


# ------------------------------------------------------------- a real fit, end to end
@pytest.fixture(scope="module")
def fitted_run(store, real_structures, real_targets):
    import matplotlib.pyplot as plt

    from matbench_dim.estimator import SiteNetDIMRegressor

    tracker = setup_tracking(store, tracking.task_experiment("matbench_jdft2d"))
    X, y = real_structures, np.asarray(real_targets, dtype=float)
    data_file = Path(
        str(resources.files("matbench_dim") / "data" / "samples" / "matbench_jdft2d.json.gz")
    )
    tags = {"method": "dim", "mode": "transfer"}
    with (
        tracker.start_parent_run("bench", tags=tags) as parent,
        tracker.start_child_run(parent.run_id, "fold0-n16-seed0", tags=tags) as run,
    ):
        est = SiteNetDIMRegressor(**TINY, callbacks=[run.callback(flush_every_s=0.0)])
        run.log_estimator_params(est)
        run.log_provenance(
            "matbench_jdft2d",
            path=data_file,
            fold=0,
            n=16,
            seed=0,
            subset_ids={"train": list(range(16)), "unlabeled": list(range(16, 20))},
        )
        est.fit(X[:16], y[:16], X_unlabeled=X[16:20])
        metrics = run.log_test_metrics(y[20:], est.predict(X[20:]))
        run.log_config({"task": "matbench_jdft2d", "n": 16})
        run.log_results({"test": metrics})
        fig, ax = plt.subplots()
        ax.plot([e["train_loss"] for e in est.history_["finetune"]])
        run.log_figure(fig, "figures/finetune_loss.png")
        plt.close(fig)
        run.log_estimator(est)
        run.log_encoder(est)
        info = run.log_pyfunc_model(est, X[:2], output_name="exfoliation_en")
    return {
        "tracker": tracker,
        "parent": parent.run_id,
        "run": run.run_id,
        "est": est,
        "metrics": metrics,
        "info": info,
        "X": X,
        "data_file": data_file,
    }


def test_fit_records_params_metrics_and_tags(fitted_run):
    client = mlflow.MlflowClient(fitted_run["tracker"].tracking_uri)
    est = fitted_run["est"]
    run = client.get_run(fitted_run["run"])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.name == "matbench-dim/matbench_jdft2d"
    assert run.info.status == "FINISHED"
    assert run.data.tags[TAG_PARENT] == fitted_run["parent"]
    assert (run.data.tags["method"], run.data.tags["mode"]) == ("dim", "transfer")
    params = run.data.params
    for key, value in est.get_params().items():
        if key != "callbacks":
            assert params[key] == str(value), key
    assert params["callbacks"] == "[matbench_dim.tracking.runs.MLflowCallback]"
    digest = hashlib.sha256(Path(fitted_run["data_file"]).read_bytes()).hexdigest()
    assert params["data.sha256"] == digest
    assert (params["data.dataset"], params["data.fold"], params["data.n"]) == (
        "matbench_jdft2d",
        "0",
        "16",
    )
    parent = client.get_run(fitted_run["parent"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["version.mlflow"] == mlflow.__version__
    assert "version.torch" in parent.data.params
    commit = git_commit()
    assert parent.data.params["git.commit"] == (commit[0] if commit else "unknown")
    checked = [("finetune", "val_loss"), ("finetune", "train_loss"), ("pretrain", "train_dim_loss")]
    for stage, key in checked:
        history = sorted(
            client.get_metric_history(run.info.run_id, f"{stage}/{key}"), key=lambda m: m.step
        )
        expected = [e[key] for e in est.history_[stage]]
        assert [m.step for m in history] == list(range(len(expected)))
        assert [m.value for m in history] == pytest.approx(expected)
    for name in ("mae", "rmse", "max_error"):
        assert run.data.metrics[f"test/{name}"] == pytest.approx(fitted_run["metrics"][name])


def test_history_can_be_logged_after_the_fact(fitted_run):
    tracker, est = fitted_run["tracker"], fitted_run["est"]
    with tracker.start_child_run(fitted_run["parent"], "replay") as run:
        run.log_history(est.history_, prefix="replay/")
    history = tracker.client.get_metric_history(run.run_id, "replay/finetune/val_loss")
    expected = [e["val_loss"] for e in est.history_["finetune"]]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(expected)


def test_fit_records_artifacts(fitted_run, tmp_path):
    from matbench_dim.estimator import SiteNetDIMRegressor

    client = mlflow.MlflowClient(fitted_run["tracker"].tracking_uri)
    run_id = fitted_run["run"]
    top = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "results.json", "data", "estimator", "encoder", "figures"} <= top
    got = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    assert json.loads((got / "data" / "subset_ids.json").read_text())["unlabeled"] == [
        16,
        17,
        18,
        19,
    ]
    assert json.loads((got / "results.json").read_text())["test"] == pytest.approx(
        fitted_run["metrics"]
    )
    assert (got / "figures" / "finetune_loss.png").read_bytes()[:4] == b"\x89PNG"
    again = SiteNetDIMRegressor.load(got / "estimator")
    X = fitted_run["X"]
    np.testing.assert_allclose(again.predict(X[20:]), fitted_run["est"].predict(X[20:]), rtol=1e-6)


def test_encoder_artifact_seeds_a_new_fine_tune(fitted_run, monkeypatch, real_targets):
    from matbench_dim.estimator import SiteNetDIMRegressor

    monkeypatch.setenv("MLFLOW_TRACKING_URI", fitted_run["tracker"].tracking_uri)
    path = download_encoder(f"runs:/{fitted_run['run']}/encoder")
    assert (path / "config.json").is_file()
    X = fitted_run["X"]
    est = SiteNetDIMRegressor(**{**TINY, "encoder_init": str(path)})
    est.fit(X[:16], real_targets[:16])
    assert est.pretrained_
    with pytest.raises(FileNotFoundError, match=r"encoder folder .* does not exist"):
        download_encoder(path / "missing")
    estimator = tracking.download_artifact_dir(f"runs:/{fitted_run['run']}/estimator")
    assert SiteNetDIMRegressor.load(estimator).n_train_ == 16
    assert tracking.is_artifact_uri("runs:/abc/estimator")
    assert not tracking.is_artifact_uri(path)


def test_pyfunc_model_predicts_cif_strings_in_a_fresh_process(fitted_run, tmp_path):
    uri = fitted_run["tracker"].tracking_uri
    X = fitted_run["X"]
    cif_frame(X[20:]).to_json(tmp_path / "input.json")
    code = textwrap.dedent(
        f"""
        import json, sys
        import mlflow, pandas as pd
        model = mlflow.pyfunc.load_model("runs:/{fitted_run["run"]}/model")
        out = model.predict(pd.read_json(sys.argv[1]))
        print(json.dumps(list(out["exfoliation_en"])))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "input.json")],
        capture_output=True,
        text=True,
        env=_env(uri),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = json.loads(proc.stdout.strip().splitlines()[-1])
    np.testing.assert_allclose(preds, fitted_run["est"].predict(X[20:]), rtol=1e-4)


def test_pyfunc_model_signature_and_bad_rows(fitted_run):
    model = load_model(fitted_run["info"].model_uri, fitted_run["tracker"].tracking_uri)
    assert model.metadata.get_input_schema().input_names() == ["cif"]
    assert model.metadata.get_output_schema().input_names() == ["exfoliation_en"]
    good = cif_frame(fitted_run["X"][:1])["cif"].iloc[0]
    bad = pd.DataFrame({"cif": [good, "data_x\n_cell_length_a 3\n"]}, index=["ok", "broken"])
    with pytest.raises(Exception, match=r"row 1 \(index 'broken'\)"):
        model.predict(bad)
    with pytest.raises(Exception, match="cif"):
        model.predict(pd.DataFrame({"structure": [good]}))


def test_pyfunc_model_of_an_ensemble_returns_mean_and_std(store, real_structures, real_targets):
    from matbench_dim.ensemble import SiteNetDIMEnsemble
    from matbench_dim.estimator import SiteNetDIMRegressor

    X, y = real_structures, np.asarray(real_targets, dtype=float)
    ens = SiteNetDIMEnsemble(SiteNetDIMRegressor(**TINY), n_members=2).fit(X[:16], y[:16])
    tracker = setup_tracking(store, "ensemble-pyfunc")
    with tracker.start_parent_run("ens") as run:
        info = run.log_pyfunc_model(ens, X[:2], output_name="exfoliation_en")
    model = load_model(info.model_uri, tracker.tracking_uri)
    names = model.metadata.get_output_schema().input_names()
    assert names == ["exfoliation_en", "exfoliation_en_std"]
    out = model.predict(cif_frame(X[20:]))
    mean, std = ens.predict(X[20:], return_std=True)
    np.testing.assert_allclose(out["exfoliation_en"], mean, rtol=1e-5)
    np.testing.assert_allclose(out["exfoliation_en_std"], std, rtol=1e-4, atol=1e-6)


def test_callback_survives_clone_and_pickle(fitted_run):
    import pickle

    from sklearn.base import clone

    copy = clone(fitted_run["est"])
    cb = copy.callbacks[0]
    assert isinstance(cb, MLflowCallback)
    assert cb._client is None
    assert cb.run_id == fitted_run["run"]
    restored = pickle.loads(pickle.dumps(cb))
    restored.on_epoch_end("finetune", 99, {"extra_metric": 1.5}, None)
    restored.flush()
    client = mlflow.MlflowClient(fitted_run["tracker"].tracking_uri)
    history = client.get_metric_history(fitted_run["run"], "finetune/extra_metric")
    assert [(m.step, m.value) for m in history] == [(99, 1.5)]


def test_concurrent_first_use_of_a_new_sqlite_store(tmp_path):
    """Several processes opening a brand-new store at once all get the same experiment."""
    import subprocess
    import sys

    code = (
        "from matbench_dim.tracking.tracker import setup_tracking; "
        f"t = setup_tracking('sqlite:///{tmp_path}/m.db', 'race'); print(t.experiment_id)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-500:] for _, e in outs]
    assert len({o.strip() for o, _ in outs}) == 1


def test_git_commit_comes_from_the_checkout_or_the_build_record(tmp_path):
    import subprocess

    repo = Path(__file__).resolve().parents[2]
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    if len(head) == 40:  # tests run from a checkout: the package was built from (or is) it
        assert git_commit() is not None
        assert git_commit()[0] == head
    installed = tmp_path / "site" / "matbench_dim"  # an installed copy: no .git above it
    installed.mkdir(parents=True)
    assert git_commit(installed) is None
    (installed / "_build.json").write_text('{"git_commit": "' + "a" * 40 + '", "git_dirty": true}')
    assert git_commit(installed) == ("a" * 40, True)
    (installed / "_build.json").write_text("{torn")
    assert git_commit(installed) is None
