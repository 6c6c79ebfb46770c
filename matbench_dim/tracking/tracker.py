"""MLflow tracking: where runs go, how they nest, and what each one records.

Tracking is an adapter at the edge: the model and the training loops never import MLflow;
they see only :class:`MLflowCallback`, a :class:`matbench_dim.training.callbacks.Callback`.

This module holds the store (URI resolution, experiments), :class:`Tracker` (opening and
ending runs) and stale-run cleanup; what a run records (:class:`TrackedRun`,
:class:`MLflowCallback`, params and provenance helpers) lives in
:mod:`matbench_dim.tracking.runs` and is re-exported here.

Public API (the benchmark protocol, the Optuna study and the CLI call only these)::

    tracker = setup_tracking(uri=None, experiment=task_experiment("matbench_jdft2d"),
                             enabled=True)            # -> Tracker, or NullTracker if disabled
    with tracker.start_parent_run("bench", tags={"method": "dim", "mode": "transfer"},
                                  params={...}) as parent:        # one per benchmark / study
        with tracker.start_child_run(parent.run_id, "fold0-n100-seed0",
                                     tags={...}, params={...}) as run:  # per cell / trial
            run.log_estimator_params(est)
            run.log_provenance("matbench_jdft2d", path=data_file, fold=0, n=100, seed=0,
                               subset_ids={"train": [...], "test": [...]})
            est.set_params(callbacks=[run.callback()])  # per-epoch metrics, step=epoch
            est.fit(X, y)
            run.log_test_metrics(y_test, est.predict(X_test))  # test/mae, test/rmse, ...
            run.log_results({...}); run.log_config({...}); run.log_figure(fig, "curve.png")
            run.log_estimator(est)                  # saved folder -> artifact "estimator"
            run.log_encoder(est)                    # encoder folder -> artifact "encoder"
            run.log_pyfunc_model(est, X[:2])        # MLflow model "model": CIF -> prediction
    download_encoder("runs:/<run_id>/encoder")      # -> local folder for ``encoder_init``
    download_artifact_dir("runs:/<run_id>/estimator")  # any logged folder (or a local one)
    close_stale_runs(experiment, older_than_s)      # RUNNING runs of dead processes -> KILLED

Where runs go (:func:`resolve_tracking_uri`): the ``uri`` argument (``--tracking-uri``), else
``$MLFLOW_TRACKING_URI``, else a SQLite store under the current working directory:
``sqlite:///<cwd>/mlruns/mlflow.db`` with artifacts under ``<cwd>/mlruns/artifacts`` (MLflow
3.13+ refuses a plain ``./mlruns`` file store, which is in maintenance mode anyway). A team
server (``http://...``) or database works unchanged.

Runs are opened with :class:`mlflow.MlflowClient` and explicit run ids, never through the
fluent "active run" stack, so cells running in joblib workers (a :class:`Tracker` pickles to
its URI and experiment id) or several processes logging into one store do not interfere.
Each run records its host name and pid; the context managers end a run FINISHED on success,
FAILED on an exception and KILLED on Ctrl-C or SIGTERM (SIGTERM is turned into
:class:`Terminated` while a run is open in the main thread), and :func:`close_stale_runs`
marks RUNNING runs whose process has died (e.g. after ``kill -9``) as KILLED; every parent
run calls it when it starts.

Standard tags: ``method`` (``dim``, ``random_init``, ``transfer``, ``rf_magpie``,
``dummy_mean``, ...) and ``mode`` (``transfer`` or ``representation``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from matbench_dim.runtime import pid_alive
from matbench_dim.tracking.runs import (
    MAX_PARAM_CHARS,
    MLflowCallback,
    TrackedRun,
    _key,
    _retry,
    _slug,
    _stringify,
    file_sha256,
    flatten_params,
    git_commit,
    package_versions,
)
from matbench_dim.tracking.store import _sqlite_path, resolve_tracking_uri

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MAX_PARAM_CHARS",
    "MLflowCallback",
    "NullTracker",
    "Terminated",
    "TrackedRun",
    "Tracker",
    "close_stale_runs",
    "download_artifact_dir",
    "download_encoder",
    "file_sha256",
    "flatten_params",
    "git_commit",
    "is_artifact_uri",
    "package_versions",
    "setup_tracking",
    "task_experiment",
]

DEFAULT_EXPERIMENT = "matbench-dim"
TAG_PID = "matbench_dim.pid"
TAG_HOST = "matbench_dim.hostname"
TAG_PROC_START = "matbench_dim.proc_start"
TAG_PARENT = "mlflow.parentRunId"


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while a run is open; exits with status 143."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))


# --------------------------------------------------------------------------- where runs go
def task_experiment(task: str) -> str:
    """The experiment of a task (one per task): ``matbench-dim/<task>``."""
    return f"{DEFAULT_EXPERIMENT}/{task}"


def setup_tracking(
    uri: str | Path | None = None,
    experiment: str = DEFAULT_EXPERIMENT,
    *,
    enabled: bool = True,
    root: str | Path | None = None,
) -> Tracker | NullTracker:
    """Connect to the store, create ``experiment`` if needed and return a :class:`Tracker`.

    For a SQLite store the experiment's artifacts go to ``<db folder>/artifacts/<experiment>``
    (so the default store keeps everything under ``mlruns/``); other stores (a server, a
    database) choose the artifact location themselves. ``enabled=False`` (``--no-tracking``)
    returns a :class:`NullTracker` whose runs record nothing.
    """
    if not enabled:
        return NullTracker()
    from mlflow import MlflowClient

    tracking_uri = resolve_tracking_uri(uri, root)
    db = _sqlite_path(tracking_uri)
    artifact_location = None
    if db is not None:  # sqlite:///relative.db is relative to the working directory
        db = db.expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "artifacts" / _slug(experiment)).as_uri()
    if db is not None:
        # Creating the client of a new SQLite store creates its tables (alembic migrations);
        # two processes doing it at once collide ("table _alembic_tmp_... already exists").
        # Serialise that first contact with a lock file beside the database.
        from filelock import FileLock

        with FileLock(str(db) + ".init.lock"):
            client = MlflowClient(tracking_uri)
            exp_id = _get_or_create_experiment(client, experiment, artifact_location)
    else:
        client = MlflowClient(tracking_uri)
        exp_id = _get_or_create_experiment(client, experiment, artifact_location)
    logger.info("MLflow tracking to %s, experiment %r (id %s)", tracking_uri, experiment, exp_id)
    return Tracker(tracking_uri, exp_id, experiment, client=client)


def _get_or_create_experiment(client: Any, experiment: str, artifact_location: str | None) -> str:
    """Id of ``experiment``, created (or restored from deletion) when needed."""
    from mlflow.exceptions import MlflowException

    exp = _retry(client.get_experiment_by_name, experiment)
    if exp is None:
        try:
            return client.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            return exp.experiment_id
    if exp.lifecycle_stage == "deleted":
        logger.warning("restoring deleted MLflow experiment %r", experiment)
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


@lru_cache(maxsize=1)
def _hostname() -> str:
    return socket.gethostname()


def _proc_start(pid: int) -> str | None:
    """Start time of process ``pid`` in clock ticks after boot (Linux ``/proc``), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _process_gone(tags: Mapping[str, str]) -> bool | None:
    """True/False whether the process that opened a run is gone; None if it cannot be told."""
    pid, host = tags.get(TAG_PID), tags.get(TAG_HOST)
    if pid is None or host != _hostname():
        return None
    if not pid_alive(int(pid)):
        return True
    started, now = tags.get(TAG_PROC_START), _proc_start(int(pid))
    return started is not None and now is not None and started != now  # pid reused


def _status_for(exc: BaseException) -> str:
    if isinstance(exc, Terminated | KeyboardInterrupt | GeneratorExit):
        return "KILLED"
    if isinstance(exc, SystemExit):
        return "FINISHED" if exc.code in (0, None) else "FAILED"
    if type(exc).__name__ == "TrialPruned":  # optuna: stopped on purpose, not a failure
        return "KILLED"
    return "FAILED"


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """While open in the main thread, SIGTERM raises :class:`Terminated` (exit status 143)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    try:
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            yield
            return
        signal.signal(signal.SIGTERM, _raise)
    except ValueError:  # not the main interpreter
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _search_running(client: Any, experiment_id: str, extra: str = "") -> list[Any]:
    query = "attributes.status = 'RUNNING'" + (f" and {extra}" if extra else "")
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def close_stale_runs(
    experiment: str,
    older_than_s: float = 0.0,
    *,
    tracking_uri: str | None = None,
    include_unverifiable: bool = False,
) -> list[str]:
    """Mark RUNNING runs whose process is gone as KILLED; return their run ids.

    Parameters
    ----------
    experiment
        Experiment name (or id).
    older_than_s
        Only runs started at least this many seconds ago are considered.
    tracking_uri
        Store to use (resolved by :func:`resolve_tracking_uri`).
    include_unverifiable
        Also close runs whose process cannot be checked (started on another host, or without
        the pid/host tags), on age alone. Off by default: such a run may still be alive.
    """
    from mlflow import MlflowClient

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    exp = client.get_experiment_by_name(experiment) or _get_experiment_or_none(client, experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment named (or with id) {experiment!r}")
    return _close_stale(client, exp.experiment_id, older_than_s, include_unverifiable)


def _get_experiment_or_none(client: Any, experiment_id: str) -> Any:
    try:
        return client.get_experiment(experiment_id)
    except Exception:
        return None


def _close_stale(
    client: Any, experiment_id: str, older_than_s: float, include_unverifiable: bool
) -> list[str]:
    now_ms = time.time() * 1000
    closed = []
    for run in _search_running(client, experiment_id):
        if now_ms - (run.info.start_time or 0) < older_than_s * 1000:
            continue
        gone = _process_gone(run.data.tags)
        if gone or (gone is None and include_unverifiable):
            _retry(client.set_tag, run.info.run_id, "matbench_dim.closed_by", "close_stale_runs")
            _retry(client.set_terminated, run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        logger.warning("marked %d stale RUNNING run(s) as KILLED: %s", len(closed), closed)
    return closed


def is_artifact_uri(uri: str | Path) -> bool:
    """Whether ``uri`` names an MLflow artifact (``runs:/...``, ``models:/...``, a URL)."""
    text = str(uri)
    return "://" in text or text.startswith(("runs:", "models:"))


def download_artifact_dir(
    uri: str | Path,
    dst: str | Path | None = None,
    tracking_uri: str | None = None,
    *,
    what: str = "artifact folder",
) -> Path:
    """A local folder: a local path as is (it must exist), or an MLflow artifact URI
    (``runs:/<run_id>/<path>``) downloaded to ``dst`` (a temporary folder by default).

    The URI is resolved against ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else the
    default store, with :func:`mlflow.artifacts.download_artifacts`. ``what`` names the
    folder in error messages.
    """
    if not is_artifact_uri(uri):
        local = Path(str(uri)).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(f"{what} {local} does not exist")
        return local
    import mlflow.artifacts

    out = mlflow.artifacts.download_artifacts(
        artifact_uri=str(uri),
        dst_path=None if dst is None else str(dst),
        tracking_uri=resolve_tracking_uri(tracking_uri),
    )
    path = Path(out)
    if not path.is_dir() or not any(path.iterdir()):
        raise ValueError(f"{uri} is not a non-empty folder holding a {what} (got {path})")
    return path


def download_encoder(
    uri: str | Path, dst: str | Path | None = None, tracking_uri: str | None = None
) -> Path:
    """Local folder of a saved encoder: a local path as is, or an MLflow artifact URI.

    ``uri`` is e.g. ``runs:/<run_id>/encoder`` (see :func:`download_artifact_dir`); the
    folder can be passed as ``encoder_init`` of the estimator.
    """
    return download_artifact_dir(uri, dst, tracking_uri, what="encoder folder")


class Tracker:
    """Opens runs in one experiment of one store; pickles to ``(uri, experiment)``.

    Build it with :func:`setup_tracking`.
    """

    enabled = True

    def __init__(
        self, tracking_uri: str, experiment_id: str, experiment_name: str, client: Any = None
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment_id = experiment_id
        self.experiment_name = experiment_name
        self._client = client

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, experiment={self.experiment_name!r})"

    @property
    def client(self) -> Any:
        """The :class:`mlflow.MlflowClient` (created lazily in each process)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    @contextlib.contextmanager
    def start_parent_run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        *,
        log_environment: bool = True,
        close_stale: bool = True,
    ) -> Iterator[TrackedRun]:
        """Open a top-level run (a benchmark, a study) and end it FINISHED/FAILED/KILLED.

        On entry RUNNING runs of dead processes are closed (:func:`close_stale_runs`) and
        package versions and the git commit are logged; on exit the children still RUNNING
        whose process is gone (or all of them, if this run failed) are marked KILLED.
        """
        if close_stale:
            try:
                _close_stale(self.client, self.experiment_id, 0.0, False)
            except Exception:
                logger.exception("could not check for stale runs")
        with self._run(name, None, tags, params) as run:
            if log_environment:
                run.log_environment()
            yield run

    @contextlib.contextmanager
    def start_child_run(
        self,
        parent_run_id: str | None,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[TrackedRun]:
        """Open a run nested under ``parent_run_id`` (a grid cell, a trial); safe to call in
        another process than the parent's. ``parent_run_id=None`` opens a top-level run."""
        with self._run(name, parent_run_id, tags, params) as run:
            yield run

    def close_stale_runs(
        self, older_than_s: float = 0.0, include_unverifiable: bool = False
    ) -> list[str]:
        """:func:`close_stale_runs` for this tracker's experiment."""
        return _close_stale(self.client, self.experiment_id, older_than_s, include_unverifiable)

    @contextlib.contextmanager
    def _run(
        self,
        name: str,
        parent: str | None,
        tags: Mapping[str, Any] | None,
        params: Mapping[str, Any] | None,
    ) -> Iterator[TrackedRun]:
        base = {
            TAG_PID: str(os.getpid()),
            TAG_HOST: _hostname(),
            "mlflow.source.name": Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python",
            "mlflow.source.type": "LOCAL",
            "mlflow.user": os.environ.get("USER") or os.environ.get("USERNAME") or "unknown",
        }
        if (start := _proc_start(os.getpid())) is not None:
            base[TAG_PROC_START] = start
        if parent is not None:
            base[TAG_PARENT] = parent
        all_tags = {**base, **{_key(k): _stringify(v)[:8000] for k, v in (tags or {}).items()}}
        info = _retry(self.client.create_run, self.experiment_id, run_name=name, tags=all_tags).info
        run = TrackedRun(self, info.run_id)
        logger.info(
            "MLflow run %s (%s) started%s", info.run_id, name, f" under {parent}" if parent else ""
        )
        status = "FINISHED"
        try:
            with _sigterm_raises():
                if params:
                    run.log_params(params)
                yield run
        except BaseException as exc:
            status = _status_for(exc)
            with contextlib.suppress(Exception):
                run.set_tags({"matbench_dim.error": f"{type(exc).__name__}: {exc}"[:2000]})
            raise
        finally:
            self._end(info.run_id, status, is_parent=parent is None)

    def _end(self, run_id: str, status: str, is_parent: bool) -> None:
        try:
            if is_parent:
                children = _search_running(
                    self.client, self.experiment_id, f"tags.`{TAG_PARENT}` = '{run_id}'"
                )
                for child in children:
                    if status != "FINISHED" or _process_gone(child.data.tags):
                        _retry(self.client.set_terminated, child.info.run_id, status="KILLED")
            _retry(self.client.set_terminated, run_id, status=status)
            logger.info("MLflow run %s ended %s", run_id, status)
        except Exception:  # never hide the exception that ended the run
            logger.exception("could not end MLflow run %s as %s", run_id, status)


class NullTracker:
    """A tracker that records nothing (``--no-tracking``); same interface as :class:`Tracker`."""

    enabled = False
    tracking_uri = None
    experiment_id = None
    experiment_name = None

    def __repr__(self) -> str:
        return "NullTracker()"

    @contextlib.contextmanager
    def start_parent_run(
        self,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
        **_: Any,
    ) -> Iterator[TrackedRun]:
        yield TrackedRun(None, None)

    @contextlib.contextmanager
    def start_child_run(
        self,
        parent_run_id: str | None,
        name: str,
        tags: Mapping[str, Any] | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> Iterator[TrackedRun]:
        yield TrackedRun(None, None)

    def close_stale_runs(
        self, older_than_s: float = 0.0, include_unverifiable: bool = False
    ) -> list[str]:
        return []
