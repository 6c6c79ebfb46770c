"""A real ``mlflow server`` over a temporary SQLite store: runs logged straight into the store
and runs logged through the server are both read back through its REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest

from matbench_dim.tracking.tracker import setup_tracking

STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(base: str, endpoint: str, payload: dict) -> dict:
    request = urllib.request.Request(
        f"{base}/api/2.0/mlflow/{endpoint}",
        data=json.dumps(payload).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def _get(base: str, endpoint: str, **query: str) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def _wait_healthy(base: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    pytest.fail(
        f"mlflow server not healthy after {STARTUP_TIMEOUT_S} s:\n{log.read_text()[-3000:]}"
    )


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and everything it started (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(15)
    with contextlib.suppress(ProcessLookupError):  # uvicorn workers may outlive the CLI
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(15)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """``mlflow server`` on a free port over ``<tmp>/mlflow.db`` and ``<tmp>/artifacts``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    db_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        db_uri,
        "--default-artifact-root",
        str(tmp_path / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job consumers
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, proc, log)
        yield {"base": base, "db_uri": db_uri}
    finally:
        _stop(proc)


def test_runs_are_readable_through_the_rest_api(server, tmp_path):
    base = server["base"]
    # 1. logged straight into the server's SQLite store, as a local benchmark does
    local = setup_tracking(server["db_uri"], "matbench-dim/served")
    with local.start_parent_run("bench", tags={"method": "dim"}, params={"task": "jdft2d"}) as p:
        p.log_metrics({"mae": 1.25}, prefix="test/")
        with local.start_child_run(p.run_id, "cell", tags={"method": "dim"}) as child:
            child.log_metrics({"val_loss": 3.0}, step=2, prefix="finetune/")
    exp = _get(base, "experiments/get-by-name", experiment_name="matbench-dim/served")
    found = _post(
        base,
        "runs/search",
        {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 10},
    )["runs"]
    by_id = {r["info"]["run_id"]: r for r in found}
    assert set(by_id) == {p.run_id, child.run_id}
    parent = by_id[p.run_id]
    assert parent["info"]["status"] == "FINISHED"
    assert {"key": "task", "value": "jdft2d"} in parent["data"]["params"]
    assert any(m["key"] == "test/mae" and m["value"] == 1.25 for m in parent["data"]["metrics"])
    tags = {t["key"]: t["value"] for t in by_id[child.run_id]["data"]["tags"]}
    assert tags["mlflow.parentRunId"] == p.run_id
    assert tags["method"] == "dim"

    # 2. logged through the server (a team's tracking server), artifacts included
    remote = setup_tracking(base, "matbench-dim/remote")
    with remote.start_parent_run("study", tags={"method": "dim"}, log_environment=False) as r:
        r.log_params({"optimizer__lr": 1e-3})
        r.log_results({"best": 0.5})
    found = _post(
        base,
        "runs/search",
        {"experiment_ids": [remote.experiment_id], "filter": "tags.method = 'dim'"},
    )["runs"]
    assert [run["info"]["run_id"] for run in found] == [r.run_id]
    assert found[0]["info"]["status"] == "FINISHED"
    assert {"key": "optimizer__lr", "value": "0.001"} in found[0]["data"]["params"]
    path = mlflow.MlflowClient(base).download_artifacts(r.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == {"best": 0.5}
