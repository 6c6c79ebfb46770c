"""What an MLflow run records: params, provenance, metrics, artifacts and per-epoch curves.

:class:`TrackedRun` is one open run (opened by :class:`matbench_dim.tracking.tracker.Tracker`) with the
``log_*`` helpers the benchmark protocol, the Optuna study and the CLI use;
:class:`MLflowCallback` is the :class:`matbench_dim.training.callbacks.Callback` that sends each epoch's
metrics to a run (``step=epoch``), so the training loops never import MLflow. The small
helpers below (:func:`flatten_params`, :func:`file_sha256`, :func:`package_versions`,
:func:`git_commit`) turn parameters and provenance into reproducible strings.

Everything talks to the store through :class:`mlflow.MlflowClient` and explicit run ids (no
fluent "active run"), and retries while a SQLite store reports "database is locked".
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import platform
import re
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from matbench_dim.training.callbacks import Callback, TrainingState
from matbench_dim.versions import library_versions


class _HasClient(Protocol):
    """What a run needs of the tracker that opened it (a :class:`~.tracker.Tracker`)."""

    client: Any


logger = logging.getLogger(__name__)

__all__ = [
    "MAX_PARAM_CHARS",
    "MLflowCallback",
    "TrackedRun",
    "file_sha256",
    "flatten_params",
    "git_commit",
    "package_versions",
]

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


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "default"


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
    return {"python": platform.python_version(), **library_versions(_VERSIONED)}


def git_commit(path: str | Path | None = None) -> tuple[str, bool] | None:
    """``(commit, dirty)`` of the source this package came from, or ``None`` when unknown.

    A package imported from its git checkout (``pip install -e``, ``PYTHONPATH``) asks git;
    an installed package reads ``matbench_dim/_build.json``, written by ``setup.py`` when
    the sdist or wheel was built from a checkout (tox installs from an sdist). ``path`` is
    the package folder (default: this installed ``matbench_dim``).
    """
    pkg = Path(path) if path is not None else Path(__file__).resolve().parents[1]
    try:
        top = subprocess.run(
            ["git", "-C", str(pkg), "rev-parse", "--show-toplevel", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.split()  # fmt: skip
        if len(top) == 2 and Path(top[0]).resolve() == pkg.parent.resolve():
            status = subprocess.run(
                ["git", "-C", str(pkg), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=10, check=True,
            ).stdout  # fmt: skip
            return top[1], bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        info = json.loads((pkg / "_build.json").read_text(encoding="utf-8"))
        return str(info["git_commit"]), bool(info["git_dirty"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


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

    def __init__(self, tracker: _HasClient | None, run_id: str | None) -> None:
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
        else:
            params["git.commit"] = "unknown"
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
        see :func:`matbench_dim.tracking.pyfunc.log_pyfunc_model`. Returns the ``ModelInfo`` (or None)."""
        if not self.enabled:
            return None
        from matbench_dim.tracking.pyfunc import log_pyfunc_model

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
