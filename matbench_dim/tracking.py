"""MLflow tracking: where runs go, how they nest, and what each one records.

Tracking is an adapter at the edge: the model and the training loops never import MLflow;
they see only :class:`MLflowCallback`, a :class:`matbench_dim.callbacks.Callback`.

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
import hashlib
import json
import logging
import math
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from matbench_dim.callbacks import Callback, TrainingState

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_EXPERIMENT",
    "MLflowCallback",
    "NullTracker",
    "Terminated",
    "TrackedRun",
    "Tracker",
    "close_stale_runs",
    "default_store",
    "download_encoder",
    "file_sha256",
    "flatten_params",
    "git_commit",
    "package_versions",
    "resolve_tracking_uri",
    "setup_tracking",
    "task_experiment",
]

DEFAULT_EXPERIMENT = "matbench-dim"
TAG_PID = "matbench_dim.pid"
TAG_HOST = "matbench_dim.hostname"
TAG_PROC_START = "matbench_dim.proc_start"
TAG_PARENT = "mlflow.parentRunId"
MAX_PARAM_CHARS = 500  # the limit of older MLflow servers (3.x accepts 6000)
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000
_VERSIONED = (
    "matbench-dim",
    "torch",
    "pymatgen",
    "matminer",
    "matbench",
    "scikit-learn",
    "mlflow",
    "optuna",
    "numpy",
    "pandas",
)
_BAD_KEY_CHARS = re.compile(r"[^\w\-. /:]")


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while a run is open; exits with status 143."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(128 + int(signum))


# --------------------------------------------------------------------------- where runs go
def default_store(root: str | Path | None = None) -> tuple[str, Path]:
    """The default store: ``(sqlite URI of <root>/mlruns/mlflow.db, <root>/mlruns/artifacts)``.

    ``root`` defaults to the current working directory.
    """
    base = Path(root if root is not None else Path.cwd()).resolve() / "mlruns"
    return f"sqlite:///{base / 'mlflow.db'}", base / "artifacts"


def resolve_tracking_uri(uri: str | Path | None = None, root: str | Path | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the default store.

    A bare path is accepted for convenience: ``x.db`` means ``sqlite:///<abs x.db>`` and a
    folder means a SQLite store ``<folder>/mlflow.db``.
    """
    value = str(uri) if uri is not None else os.environ.get("MLFLOW_TRACKING_URI") or None
    if value is None:
        return default_store(root)[0]
    if "://" in value or value.startswith(("databricks", "file:")):
        return value
    path = Path(value).expanduser().resolve()
    return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"


def task_experiment(task: str) -> str:
    """The experiment of a task (one per task): ``matbench-dim/<task>``."""
    return f"{DEFAULT_EXPERIMENT}/{task}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "default"


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
    from mlflow.exceptions import MlflowException

    tracking_uri = resolve_tracking_uri(uri, root)
    db = _sqlite_path(tracking_uri)
    artifact_location = None
    if db is not None:  # sqlite:///relative.db is relative to the working directory
        db = db.expanduser().resolve()
        db.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (db.parent / "artifacts" / _slug(experiment)).as_uri()
    client = MlflowClient(tracking_uri)
    exp = _retry(client.get_experiment_by_name, experiment)
    if exp is None:
        try:
            exp_id = client.create_experiment(experiment, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        exp_id = exp.experiment_id
        if exp.lifecycle_stage == "deleted":
            logger.warning("restoring deleted MLflow experiment %r", experiment)
            client.restore_experiment(exp_id)
    logger.info("MLflow tracking to %s, experiment %r (id %s)", tracking_uri, experiment, exp_id)
    return Tracker(tracking_uri, exp_id, experiment, client=client)


# ----------------------------------------------------------------------- small utilities
def _retry(fn: Callable[..., Any], *args: Any, attempts: int = 6, **kwargs: Any) -> Any:
    """Call ``fn``, retrying with backoff while a SQLite store reports 'database is locked'."""
    for i in range(attempts):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if i == attempts - 1 or "locked" not in str(exc).lower():
                raise
            time.sleep(0.1 * 2**i)
    raise AssertionError("unreachable")


def _stringify(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return str(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list | tuple | set | frozenset):
        items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
        return "[" + ", ".join(_stringify(v) for v in items) + "]"
    if isinstance(value, type):
        return f"{value.__module__}.{value.__qualname__}"
    if type(value).__repr__ is object.__repr__:  # '<... at 0x...>' is not reproducible
        return f"{type(value).__module__}.{type(value).__qualname__}"
    return repr(value)


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested mappings (keys joined by ``.``) and stringify every value.

    Values are full-length here; :meth:`TrackedRun.log_params` truncates them to
    ``MAX_PARAM_CHARS`` (and logs the full set as ``params.json`` when it has to).
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_params(value, prefix=f"{name}."))
        else:
            out[name] = _stringify(value)
    return out


def _key(name: str) -> str:
    """An MLflow-safe metric/param key (alphanumerics, ``_ - . / : space``; <= 250 chars)."""
    key = _BAD_KEY_CHARS.sub("_", str(name)).strip("/") or "_"
    return re.sub(r"/+", "/", key)[:250]


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=str)
    return _stringify(obj)


@lru_cache(maxsize=64)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), cached per (path, size, modification time)."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that shape the results (``"absent"`` if missing)."""
    out = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def git_commit(path: str | Path | None = None) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the git checkout that holds matbench_dim, or ``None``.

    ``None`` when the package is not inside a git work tree of its own (an installed wheel,
    no ``git`` binary): the package folder's parent must be the repository's top level.
    """
    pkg = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        top = subprocess.run(
            ["git", "-C", str(pkg), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
        if len(top) != 2 or Path(top[0]).resolve() != pkg.parent.resolve():
            return None
        status = subprocess.run(
            ["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return top[1], bool(status.strip())


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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state not in ("Z", "X")  # a zombie has already exited


def _process_gone(tags: Mapping[str, str]) -> bool | None:
    """True/False whether the process that opened a run is gone; None if it cannot be told."""
    pid, host = tags.get(TAG_PID), tags.get(TAG_HOST)
    if pid is None or host != _hostname():
        return None
    if not _pid_alive(int(pid)):
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


def download_encoder(
    uri: str | Path, dst: str | Path | None = None, tracking_uri: str | None = None
) -> Path:
    """Local folder of a saved encoder: a local path as is, or an MLflow artifact URI.

    ``uri`` is e.g. ``runs:/<run_id>/encoder`` (resolved against ``tracking_uri``, else
    ``$MLFLOW_TRACKING_URI``, else the default store); it is downloaded to ``dst`` (a
    temporary folder by default) with :func:`mlflow.artifacts.download_artifacts`.
    """
    local = Path(str(uri)).expanduser()
    if "://" not in str(uri) and not str(uri).startswith(("runs:", "models:")):
        if not local.is_dir():
            raise FileNotFoundError(f"encoder folder {local} does not exist")
        return local
    import mlflow.artifacts

    out = mlflow.artifacts.download_artifacts(
        artifact_uri=str(uri),
        dst_path=None if dst is None else str(dst),
        tracking_uri=resolve_tracking_uri(tracking_uri),
    )
    path = Path(out)
    if not path.is_dir() or not any(path.iterdir()):
        raise ValueError(f"{uri} is not a folder holding a saved encoder (got {path})")
    return path


# --------------------------------------------------------------------------- the callback
class MLflowCallback(Callback):
    """Log each epoch's metrics to an MLflow run, ``step=epoch``.

    Metric names are ``<prefix><stage>/<key>``: ``pretrain/dim_local``,
    ``pretrain/disc_acc``, ``finetune/val_loss``, ...

    Parameters
    ----------
    client
        An :class:`mlflow.MlflowClient` or a tracking URI. Copies (``sklearn.clone``) and
        pickles keep only the URI and reconnect on first use.
    run_id
        The run to log into.
    prefix
        Prepended to every metric name.
    flush_every_s
        Epoch metrics are sent in one batch at most this often (and at the end of a stage).
    """

    def __init__(
        self, client: Any, run_id: str, prefix: str = "", flush_every_s: float = 1.0
    ) -> None:
        self.tracking_uri = client if isinstance(client, str) else client.tracking_uri
        self._client = None if isinstance(client, str) else client
        self.run_id = run_id
        self.prefix = prefix
        self.flush_every_s = flush_every_s
        self._buffer: list[Any] = []
        self._last_flush = 0.0

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None, "_buffer": []}

    @property
    def client(self) -> Any:
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def _name(self, stage: str, key: str) -> str:
        return _key(f"{self.prefix}{stage}/{key}")

    def flush(self) -> None:
        """Send the buffered metrics (a failure is logged, not raised: training goes on)."""
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        self._last_flush = time.monotonic()
        try:
            for i in range(0, len(batch), METRICS_PER_BATCH):
                _retry(self.client.log_batch, self.run_id, metrics=batch[i : i + METRICS_PER_BATCH])
        except Exception:
            logger.exception("could not log %d metric values to run %s", len(batch), self.run_id)

    def on_train_begin(self, stage: str, state: TrainingState) -> None:
        tags = {
            _key(f"{self.prefix}{stage}.{k}"): _stringify(v)[:MAX_PARAM_CHARS]
            for k, v in state.extra.items()
            if v is None or isinstance(v, bool | int | float | str | np.generic)
        }
        with contextlib.suppress(Exception):
            if tags:
                from mlflow.entities import RunTag

                _retry(
                    self.client.log_batch, self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
                )

    def on_epoch_end(
        self, stage: str, epoch: int, logs: dict[str, float], state: TrainingState
    ) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        for key, value in logs.items():
            try:
                val = float(value)
            except (TypeError, ValueError):
                continue
            self._buffer.append(Metric(self._name(stage, key), val, ts, int(epoch)))
        if time.monotonic() - self._last_flush >= self.flush_every_s:
            self.flush()

    def on_train_end(self, stage: str, state: TrainingState) -> None:
        self.flush()
        with contextlib.suppress(Exception):
            self.client.set_tag(self.run_id, _key(f"{self.prefix}{stage}.epochs"), state.epoch + 1)

    def on_exception(self, stage: str, state: TrainingState, exc: BaseException) -> None:
        self.flush()
        with contextlib.suppress(Exception):
            self.client.set_tag(
                self.run_id, _key(f"{self.prefix}{stage}.stopped_by"), type(exc).__name__
            )


# ------------------------------------------------------------------------------- the runs
class TrackedRun:
    """One open MLflow run (``run_id``) and what can be logged to it.

    A run of a :class:`NullTracker` has ``run_id=None``: every ``log_*`` call is a no-op
    (:meth:`log_test_metrics` still computes and returns the metrics).
    """

    def __init__(self, tracker: Tracker | None, run_id: str | None) -> None:
        self.tracker = tracker
        self.run_id = run_id

    @property
    def enabled(self) -> bool:
        return self.tracker is not None and self.run_id is not None

    @property
    def client(self) -> Any:
        if self.tracker is None:
            raise RuntimeError("tracking is disabled: this run has no MLflow client")
        return self.tracker.client

    def artifact_uri(self, path: str = "") -> str | None:
        """``runs:/<run_id>/<path>`` (None when tracking is disabled)."""
        return f"runs:/{self.run_id}/{path}" if self.enabled else None

    # -- params, tags, metrics
    def log_params(self, params: Mapping[str, Any], prefix: str = "") -> None:
        """Log flattened, stringified params in batches; values over 500 chars are cut
        (the full set then also goes to the artifact ``params.json``)."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        flat = {_key(k): v for k, v in flatten_params(params, prefix).items()}
        cut = {k: v for k, v in flat.items() if len(v) > MAX_PARAM_CHARS}
        items = [
            Param(k, v if k not in cut else v[: MAX_PARAM_CHARS - 3] + "...")
            for k, v in flat.items()
        ]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            _retry(self.client.log_batch, self.run_id, params=items[i : i + PARAMS_PER_BATCH])
        if cut:
            logger.info("params truncated to %d chars: %s", MAX_PARAM_CHARS, sorted(cut))
            self.log_json(flat, f"params{'_' + _slug(prefix) if prefix else ''}.json")

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set (or overwrite) tags; values are stringified."""
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        items = [RunTag(_key(k), _stringify(v)[:8000]) for k, v in tags.items()]
        for i in range(0, len(items), PARAMS_PER_BATCH):
            _retry(self.client.log_batch, self.run_id, tags=items[i : i + PARAMS_PER_BATCH])

    def log_metrics(
        self, metrics: Mapping[str, float], step: int | None = None, prefix: str = ""
    ) -> None:
        """Log numeric metrics (NaN allowed) at ``step`` (default 0)."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = []
        for k, v in metrics.items():
            try:
                value = float(v)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"metric {k!r} is not a number: {v!r}") from exc
            items.append(Metric(_key(prefix + k), value, ts, int(step or 0)))
        for i in range(0, len(items), METRICS_PER_BATCH):
            _retry(self.client.log_batch, self.run_id, metrics=items[i : i + METRICS_PER_BATCH])

    def log_estimator_params(self, estimator: Any, prefix: str = "") -> None:
        """Log every ``estimator.get_params(deep=True)`` value and tag its class."""
        self.log_params(estimator.get_params(deep=True), prefix)
        self.set_tags(
            {f"{prefix}estimator": f"{type(estimator).__module__}.{type(estimator).__qualname__}"}
        )

    def log_environment(self) -> None:
        """Package versions (params ``version.<pkg>``) and the git commit, when in a checkout."""
        params: dict[str, Any] = {
            "version": package_versions(),
            "host.platform": platform.platform(),
        }
        commit = git_commit()
        if commit is not None:
            params["git.commit"], params["git.dirty"] = commit
            self.set_tags({"mlflow.source.git.commit": commit[0]})
        self.log_params(params)

    def log_provenance(
        self,
        dataset: str,
        *,
        path: str | Path | None = None,
        fold: int | None = None,
        n: int | None = None,
        seed: int | None = None,
        subset_ids: Mapping[str, Sequence[Any]] | Sequence[Any] | None = None,
        **extra: Any,
    ) -> None:
        """Data provenance as params ``data.*`` (dataset, file + sha256, fold, n, seed, extra)
        and the ids of the subsets used as the artifact ``data/subset_ids.json``."""
        params: dict[str, Any] = {"dataset": dataset, "fold": fold, "n": n, "seed": seed, **extra}
        if path is not None:
            params["file"], params["sha256"] = Path(path).name, file_sha256(path)
        if subset_ids is not None:
            ids = (
                {k: list(v) for k, v in subset_ids.items()}
                if isinstance(subset_ids, Mapping)
                else list(subset_ids)
            )
            text = json.dumps(ids, default=_json_default, sort_keys=True)
            params["subset_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            self.log_json(ids, "data/subset_ids.json")
        self.log_params({k: v for k, v in params.items() if v is not None}, prefix="data.")

    def log_test_metrics(
        self, y_true: Sequence[float], y_pred: Sequence[float], prefix: str = "test/"
    ) -> dict[str, float]:
        """Compute and log MAE, RMSE and max error (units of the target) and ``n``."""
        t = np.asarray(y_true, dtype=float).ravel()
        p = np.asarray(y_pred, dtype=float).ravel()
        if t.shape != p.shape or t.size == 0:
            raise ValueError(
                f"y_true and y_pred must be equal, non-empty lengths: {t.size} vs {p.size}"
            )
        err = np.abs(p - t)
        metrics = {
            "mae": float(err.mean()),
            "rmse": float(math.sqrt(np.mean(err**2))),
            "max_error": float(err.max()),
            "n": float(t.size),
        }
        self.log_metrics(metrics, prefix=prefix)
        return metrics

    def log_history(
        self,
        history: Mapping[str, Sequence[Mapping[str, float]]] | Sequence[Mapping[str, float]],
        prefix: str = "",
    ) -> None:
        """Log a finished fit's epoch history after the fact (when no callback was attached):
        ``{stage: [logs of epoch 0, ...]}`` -> ``<prefix><stage>/<key>`` at ``step=epoch``."""
        stages = history.items() if isinstance(history, Mapping) else [("", history)]
        for stage, epochs in stages:
            for epoch, logs in enumerate(epochs):
                nums = {k: v for k, v in logs.items() if isinstance(v, int | float | np.number)}
                self.log_metrics(nums, step=epoch, prefix=f"{prefix}{stage}/" if stage else prefix)

    def callback(self, prefix: str = "", flush_every_s: float = 1.0) -> Callback:
        """A training callback logging per-epoch metrics here (a no-op one when disabled)."""
        if not self.enabled:
            return Callback()
        return MLflowCallback(self.client, self.run_id, prefix=prefix, flush_every_s=flush_every_s)

    # -- artifacts
    def log_json(self, obj: Any, artifact_file: str) -> None:
        """Write ``obj`` as indented JSON to the artifact ``artifact_file`` (e.g. ``a/b.json``)."""
        self._with_tmp(
            lambda d: (d / Path(artifact_file).name).write_text(
                json.dumps(obj, indent=2, default=_json_default)
            ),
            artifact_file,
        )

    def log_config(self, config: Mapping[str, Any]) -> None:
        """The run's configuration as ``config.json``."""
        self.log_json(dict(config), "config.json")

    def log_results(self, results: Any) -> None:
        """The run's results as ``results.json``."""
        self.log_json(results, "results.json")

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        """A matplotlib figure as an image artifact (``figures/curve.png``)."""
        if self.enabled:
            _retry(self.client.log_figure, self.run_id, figure, artifact_file)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        """A local file (a PNG, a CSV, ...) under the artifact folder ``artifact_path``."""
        if self.enabled:
            if not Path(path).is_file():
                raise FileNotFoundError(f"cannot log {path}: no such file")
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dir(self, path: str | Path, artifact_path: str) -> None:
        """A local folder's contents as the artifact folder ``artifact_path``."""
        if self.enabled:
            if not Path(path).is_dir():
                raise FileNotFoundError(f"cannot log {path}: no such folder")
            self.client.log_artifacts(self.run_id, str(path), artifact_path)

    def log_estimator(self, estimator: Any, artifact_path: str = "estimator") -> None:
        """The pickle-free saved estimator folder (``estimator.save``) as ``artifact_path``."""
        self._with_tmp(lambda d: estimator.save(d / "saved"), artifact_path, sub="saved")

    def log_encoder(self, estimator: Any, artifact_path: str = "encoder") -> None:
        """The pretrained encoder folder (``estimator.save_encoder``) as ``artifact_path``;
        use it later with ``download_encoder("runs:/<run_id>/encoder")``."""
        self._with_tmp(lambda d: estimator.save_encoder(d / "saved"), artifact_path, sub="saved")

    def log_pyfunc_model(
        self,
        estimator: Any,
        example: Sequence[Any],
        *,
        name: str = "model",
        output_name: str = "prediction",
    ) -> Any:
        """Log ``estimator`` as an MLflow pyfunc model (DataFrame column ``cif`` -> predictions);
        see :func:`matbench_dim.pyfunc.log_pyfunc_model`. Returns the ``ModelInfo`` (or None)."""
        if not self.enabled:
            return None
        from matbench_dim.pyfunc import log_pyfunc_model

        return log_pyfunc_model(
            estimator,
            self.run_id,
            self.client.tracking_uri,
            example_structures=example,
            name=name,
            output_name=output_name,
        )

    def _with_tmp(
        self, write: Callable[[Path], Any], artifact: str, sub: str | None = None
    ) -> None:
        """Let ``write`` fill a temporary folder, then upload: a folder as ``artifact`` when
        ``sub`` is given, else the single file into the folder of ``artifact``."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory(prefix="matbench_dim_") as tmp:
            write(Path(tmp))
            if sub is not None:
                self.client.log_artifacts(self.run_id, str(Path(tmp) / sub), artifact)
            else:
                parent = str(Path(artifact).parent)
                local = Path(tmp) / Path(artifact).name
                self.client.log_artifact(self.run_id, str(local), None if parent == "." else parent)


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
