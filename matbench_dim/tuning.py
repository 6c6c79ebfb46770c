"""Optuna tuning per task and labelled-subset size, inside one matbench training fold.

Pieces, from the inside out:

- **Search spaces** (``tuning/spaces/*.json``, one file per model family): declarative entries
  ``{"name", "type", "low", "high", "log", "step", "choices", "default"}`` whose names are the
  estimator's flat parameter names; :func:`load_spaces` validates them and the defaults (the
  seed's published values) become the first enqueued trial of a new study.
- **Objective** (:class:`InnerCVObjective`): labelled subsets of ``n`` crystals drawn from the
  fold's *training* data only, K-fold inner cross-validation on each, metric = mean
  inner-validation MAE. DIM pretraining on the fold's training structures (labels unused) is
  reused across trials through :class:`EncoderCache` when the pretraining parameters are the
  same.
- **Pruning** (:class:`OptunaPruningCallback`): a training callback that reports the
  estimator's per-epoch validation loss to the trial; the estimator never imports Optuna.
- **Storage and workers** (:func:`resolve_storage`): SQLite by default, a journal file
  (``journal:///path``) for parallel workers on one machine, an RDB URL (PostgreSQL) for
  several machines. Killed workers do not stall a study: RDB storages use Optuna's heartbeat,
  and :class:`HeartbeatJournalStorage` adds the same heartbeat to the journal file.
- :func:`tune` ties them together; :func:`export_best` / :func:`load_best_params` write and read
  ``tuning/best/<task>_n<N>.json`` for the benchmark protocol.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from matbench_dim.callbacks import Callback, TrainingState

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SPACES",
    "DEFAULT_STORAGE",
    "EncoderCache",
    "HeartbeatJournalStorage",
    "InnerCVObjective",
    "InnerSplit",
    "OptunaPruningCallback",
    "ParamSpec",
    "SearchSpace",
    "SpaceError",
    "best_params_path",
    "export_best",
    "inner_splits",
    "load_best_params",
    "load_space",
    "load_spaces",
    "make_pruner",
    "resolve_storage",
    "study_name_for",
    "tune",
]

DEFAULT_STORAGE = "sqlite:///tuning/optuna.db"
DEFAULT_SPACES = ("dim_pretraining", "finetune", "head")
DEFAULT_BEST_DIR = Path("tuning") / "best"
DEFAULT_CACHE_DIR = Path("tuning") / "cache"  # encoders/ and features/ below it
# Parameters that never change what pretraining produces (everything else keys the cache).
FINETUNE_ONLY_PREFIXES = ("finetune__", "head__")
RUN_ONLY_PARAMS = frozenset(
    {"callbacks", "encoder_init", "device", "n_jobs", "cache_dir", "verbose", "mode"}
)
# Left out of exported parameters: run plumbing and the seed (the protocol sets its own).
NOT_EXPORTED = (RUN_ONLY_PARAMS - {"mode"}) | {"random_state"}
_HOST = socket.gethostname()
_HEARTBEAT_KEY = "matbench_dim:heartbeat"
_SUBSET_SALT = 0x7E57  # keeps tuning subsets apart from the protocol's seeded subsets

# --------------------------------------------------------------------------- search spaces


class SpaceError(ValueError):
    """A search-space file or entry is invalid (the message names the file and the entry)."""


_TYPES = ("float", "int", "categorical")
_ENTRY_KEYS = {"name", "type", "low", "high", "log", "step", "choices", "default", "description"}
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class ParamSpec:
    """One tunable estimator parameter (``name`` is the flat name, e.g. ``optimizer__lr``)."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    default: Any = None
    description: str = ""

    def suggest(self, trial: optuna.Trial) -> Any:
        """Ask ``trial`` for a value of this parameter."""
        if self.type == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.type == "int":
            step = int(self.step) if self.step is not None else 1
            return trial.suggest_int(
                self.name, int(self.low), int(self.high), log=self.log, step=step
            )
        return trial.suggest_categorical(self.name, list(self.choices))


@dataclass(frozen=True)
class SearchSpace:
    """Parameters of one or several model families, in file order."""

    params: tuple[ParamSpec, ...]
    sources: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.params]

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggested values of every parameter for ``trial``."""
        return {p.name: p.suggest(trial) for p in self.params}

    def defaults(self) -> dict[str, Any]:
        """The entries' ``default`` values (the seed's published configuration)."""
        return {p.name: p.default for p in self.params if p.default is not None}

    def get(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


def _spec_from_entry(entry: Any, where: str) -> ParamSpec:
    if not isinstance(entry, Mapping):
        raise SpaceError(f"{where}: an entry must be a mapping, got {type(entry).__name__}")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise SpaceError(f"{where}: 'name' must be a flat estimator parameter name, got {name!r}")
    where = f"{where} ({name})"
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise SpaceError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_ENTRY_KEYS)}")
    kind = entry.get("type")
    if kind not in _TYPES:
        raise SpaceError(f"{where}: unknown type {kind!r}; expected one of {list(_TYPES)}")
    log, step, default = bool(entry.get("log", False)), entry.get("step"), entry.get("default")
    if kind == "categorical":
        choices = entry.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SpaceError(f"{where}: a categorical entry needs a non-empty 'choices' list")
        if any(c is not None and not isinstance(c, bool | int | float | str) for c in choices):
            raise SpaceError(f"{where}: choices must be numbers, strings, booleans or null")
        if len({json.dumps(c) for c in choices}) != len(choices):
            raise SpaceError(f"{where}: duplicate choices {choices}")
        if default is not None and default not in choices:
            raise SpaceError(f"{where}: default {default!r} is not one of the choices {choices}")
        return ParamSpec(name, kind, choices=tuple(choices), default=default)
    low, high = entry.get("low"), entry.get("high")
    number = int if kind == "int" else int | float
    for key, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, number):
            raise SpaceError(f"{where}: {kind} entry needs a numeric '{key}', got {value!r}")
    if low > high:
        raise SpaceError(f"{where}: low ({low}) > high ({high})")
    if log and low <= 0:
        raise SpaceError(f"{where}: a log-scale range needs low > 0, got {low}")
    if step is not None:
        if isinstance(step, bool) or not isinstance(step, number) or step <= 0:
            raise SpaceError(f"{where}: 'step' must be a positive {kind}, got {step!r}")
        if log and (kind == "float" or step != 1):
            raise SpaceError(f"{where}: 'step' and 'log' cannot be combined")
    if default is not None and (
        isinstance(default, bool) or not isinstance(default, number) or not low <= default <= high
    ):
        raise SpaceError(f"{where}: default {default!r} is not a {kind} in [{low}, {high}]")
    return ParamSpec(name, kind, low, high, log, step, default=default)


def _read_mapping(path: Path) -> Any:
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text)
        return json.loads(text)
    except ValueError as exc:  # JSONDecodeError and yaml.YAMLError's parse errors
        raise SpaceError(f"{path}: not valid {path.suffix.lstrip('.').upper()}: {exc}") from exc
    except Exception as exc:
        raise SpaceError(f"{path}: could not be parsed: {exc}") from exc


def default_space_dir() -> Path:
    """``./tuning/spaces`` when it exists, else the one next to the package source."""
    local = Path("tuning") / "spaces"
    return local if local.is_dir() else Path(__file__).resolve().parents[1] / "tuning" / "spaces"


def load_space(source: str | os.PathLike[str], directory: str | Path | None = None) -> SearchSpace:
    """Load and validate one space file: a path, or a family name looked up in ``directory``.

    Raises
    ------
    SpaceError
        When the file is missing or malformed, naming the file and the entry.
    """
    path = Path(source)
    if not path.is_file():
        base = Path(directory) if directory is not None else default_space_dir()
        found = [base / f"{source}{ext}" for ext in (".json", ".yaml", ".yml")]
        path = next((p for p in found if p.is_file()), found[0])
        if not path.is_file():
            raise SpaceError(f"search space {str(source)!r} not found (looked for {found})")
    data = _read_mapping(path)
    if not isinstance(data, Mapping) or not isinstance(data.get("params"), list):
        raise SpaceError(f"{path}: expected a mapping with a 'params' list")
    unknown = set(data) - {"family", "description", "params"}
    if unknown:
        raise SpaceError(f"{path}: unknown top-level keys {sorted(unknown)}")
    specs, seen = [], set()
    for i, entry in enumerate(data["params"]):
        spec = _spec_from_entry(entry, f"{path}: params[{i}]")
        if spec.name in seen:
            raise SpaceError(f"{path}: params[{i}]: duplicate parameter {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    return SearchSpace(tuple(specs), (str(path),))


def load_spaces(
    sources: Sequence[str | os.PathLike[str]] = DEFAULT_SPACES, directory: str | Path | None = None
) -> SearchSpace:
    """Load several space files and merge them (a name defined twice is an error)."""
    params: list[ParamSpec] = []
    where: dict[str, str] = {}
    paths: list[str] = []
    for source in sources:
        space = load_space(source, directory)
        for spec in space.params:
            if spec.name in where:
                raise SpaceError(
                    f"parameter {spec.name!r} defined in both {where[spec.name]} and {space.sources[0]}"
                )
            where[spec.name] = space.sources[0]
            params.append(spec)
        paths.extend(space.sources)
    return SearchSpace(tuple(params), tuple(paths))


# --------------------------------------------------------------------------- storages


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie has already exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """A journal-file storage with Optuna's heartbeat protocol (which ``JournalStorage`` lacks).

    While a trial runs, Optuna's heartbeat thread records ``{trial_id, time, host, pid,
    interval}`` in a system attribute every ``heartbeat_interval`` seconds. Before each trial,
    every worker fails the RUNNING trials that are stale, and ``stale_trial_callback`` (e.g. a
    retry) runs on them. Stale means: on this host, the recording process is gone (checked at
    once); on another host, no beat for ``max(grace_period, 2 * the writer's interval)``
    seconds (the hosts' clocks must agree). A RUNNING trial that never beat is stale after
    ``grace_period``, so all workers of a study must use this class.
    """

    def __init__(
        self,
        backend: JournalFileBackend,
        heartbeat_interval: int = 60,
        grace_period: int | None = None,
        stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None] | None = None,
    ) -> None:
        super().__init__(backend)
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval}")
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_period or 2 * heartbeat_interval
        self.stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        beat = {"trial_id": trial_id, "time": time.time(), "host": _HOST, "pid": os.getpid(),
                "interval": self.heartbeat_interval}  # fmt: skip
        self.set_trial_system_attr(trial_id, _HEARTBEAT_KEY, beat)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(_HEARTBEAT_KEY)
            if not isinstance(beat, dict) or beat.get("trial_id") != t._trial_id:
                started = t.datetime_start.timestamp() if t.datetime_start else now
                if now - started > self.grace_period:
                    stale.append(t._trial_id)
            elif beat["host"] == _HOST:
                if not _pid_alive(int(beat["pid"])):
                    stale.append(t._trial_id)
            elif now - float(beat["time"]) > max(self.grace_period, 2 * beat.get("interval", 0)):
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> int | None:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(
        self,
    ) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback

    def get_failed_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return self.stale_trial_callback


def resolve_storage(
    storage: str | BaseStorage | None = None,
    *,
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_retry: int = 1,
) -> BaseStorage:
    """Build a storage with heartbeat and stale-trial retry from a URL.

    Parameters
    ----------
    storage
        ``None`` (``sqlite:///tuning/optuna.db``), ``"journal://<path>"`` (journal file; the
        path follows ``journal://`` literally, so ``journal:///abs/x.journal`` is absolute;
        append ``?lock=open`` for file systems without symlinks, e.g. NFS), any SQLAlchemy
        URL (``sqlite:///...``, ``postgresql://user:pw@host/db``), or a ready storage.
    heartbeat_interval, grace_period
        Seconds between heartbeats of a running trial, and of silence before it is failed
        (default twice the interval).
    max_retry
        How many times a stale (killed) trial is re-enqueued with the same parameters.
    """
    if isinstance(storage, BaseStorage):
        return storage
    url = storage or DEFAULT_STORAGE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)
    if url.startswith("journal://"):
        path, _, query = url[len("journal://") :].partition("?")
        if not path or query not in ("", "lock=open"):
            raise ValueError(f"bad journal storage URL {url!r}; use journal://<path>[?lock=open]")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = JournalFileOpenLock(path) if query else None
        return HeartbeatJournalStorage(
            JournalFileBackend(path, lock_obj=lock), heartbeat_interval, grace_period, retry
        )
    if url.startswith("sqlite:///") and ":memory:" not in url:
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RDBStorage(
            url,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=retry,
        )


def make_pruner(pruner: str | optuna.pruners.BasePruner | None = "median") -> Any:
    """``"median"`` (after 5 trials and 10 warm-up epochs), ``"halving"``, ``"none"`` or a pruner."""
    if isinstance(pruner, optuna.pruners.BasePruner):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10)
    if pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if pruner in (None, "none"):
        return optuna.pruners.NopPruner()
    raise ValueError(f"unknown pruner {pruner!r}; use 'median', 'halving', 'none' or a pruner")


# --------------------------------------------------------------------------- pruning callback


class OptunaPruningCallback(Callback):
    """Report ``logs[monitor]`` to an Optuna trial after each epoch and prune when told.

    By default the best value so far is reported: the estimator keeps its best checkpoint, and
    the running minimum is far less noisy than one epoch's loss on a validation split of a few
    crystals. A non-finite value prunes at once.

    Parameters
    ----------
    trial
        The running trial.
    monitor
        Key of the epoch logs to report (lower is better), e.g. ``"val_loss"``.
    stage
        Only report this stage (``None``: both).
    step_offset
        Added to the epoch index, so several fits of one trial (inner folds) use distinct steps.
    best_so_far
        Report the running minimum of ``monitor`` (``False``: the epoch's own value).
    """

    def __init__(
        self,
        trial: optuna.Trial,
        monitor: str = "val_loss",
        stage: str | None = "finetune",
        step_offset: int = 0,
        best_so_far: bool = True,
    ) -> None:
        self.trial = trial
        self.monitor = monitor
        self.stage = stage
        self.step_offset = step_offset
        self.best_so_far = best_so_far
        self.best_ = math.inf

    def on_train_begin(self, stage: str, state: TrainingState) -> None:
        self.best_ = math.inf

    def on_epoch_end(
        self, stage: str, epoch: int, logs: dict[str, float], state: TrainingState
    ) -> None:
        if self.stage is not None and stage != self.stage:
            return
        value = logs.get(self.monitor)
        if value is None:
            return
        step = self.step_offset + epoch
        if not math.isfinite(value):
            raise optuna.TrialPruned(f"{self.monitor} is not finite at step {step}")
        self.best_ = min(self.best_, float(value))
        self.trial.report(self.best_ if self.best_so_far else float(value), step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step} ({self.monitor}={value:.4g})")


# --------------------------------------------------------------------------- inner splits


@dataclass(frozen=True)
class InnerSplit:
    """One inner train/validation split: positions into the fold's training arrays."""

    repeat: int
    fold: int
    train: np.ndarray
    val: np.ndarray


def inner_splits(
    n_pool: int, n_labels: int, *, n_splits: int = 5, n_repeats: int = 1, seed: int = 0
) -> list[InnerSplit]:
    """K-fold splits of ``n_repeats`` labelled subsets of ``n_labels`` drawn from ``n_pool``.

    Each repeat draws its subset as the first ``n_labels`` of a permutation seeded by
    ``(salt, seed, repeat)`` (so tuning subsets differ from the protocol's seeded subsets)
    and splits it into ``n_splits`` shuffled folds. Positions refer to the training pool only.
    """
    from sklearn.model_selection import KFold

    if not 1 <= n_labels <= n_pool:
        raise ValueError(
            f"n_labels must be in [1, {n_pool}] (the fold's training size), got {n_labels}"
        )
    if n_splits < 2 or n_splits > n_labels:
        raise ValueError(f"n_splits must be in [2, n_labels={n_labels}], got {n_splits}")
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    out = []
    for r in range(n_repeats):
        rng = np.random.default_rng([_SUBSET_SALT, seed, r])
        subset = rng.permutation(n_pool)[:n_labels]
        kf = KFold(n_splits=n_splits, shuffle=True, random_state=int(rng.integers(2**31)))
        for k, (tr, va) in enumerate(kf.split(subset)):
            out.append(InnerSplit(r, k, subset[tr], subset[va]))
    return out


def _take(X: Any, idx: np.ndarray) -> Any:
    if hasattr(X, "iloc"):
        return X.iloc[idx]
    if isinstance(X, np.ndarray):
        return X[idx]
    return [X[int(i)] for i in idx]


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _keyword_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


# --------------------------------------------------------------------------- encoder cache


class EncoderCache:
    """Pretrained encoders on disk, ``<directory>/<key>/encoder``, reused across trials.

    The key hashes the estimator's pretraining parameters (every parameter except the
    fine-tuning-only ones, :data:`FINETUNE_ONLY_PREFIXES` and :data:`RUN_ONLY_PARAMS`) and the
    ordered ids of the pretraining structures. Clear the directory when the model code
    changes. Several workers may share it: each writes to a private temporary folder and
    renames it into place; the first to finish wins.
    """

    def __init__(self, directory: str | Path = DEFAULT_CACHE_DIR / "encoders") -> None:
        self.directory = Path(directory)
        self.n_pretrained = 0  # pretraining runs done by this object (cache misses)

    @staticmethod
    def pretraining_params(params: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``params`` that can change the pretrained encoder."""
        return {
            k: v
            for k, v in sorted(_jsonable(params).items())
            if k not in RUN_ONLY_PARAMS and not k.startswith(FINETUNE_ONLY_PREFIXES)
        }

    def key(
        self,
        params: Mapping[str, Any],
        ids: Sequence[str],
        factory: Callable[..., Any] | None = None,
    ) -> str:
        """Hex digest (16 characters) of the pretraining parameters and structure ids.

        With ``factory``, its keyword defaults fill the parameters ``params`` leaves out, so
        an explicit default and an omitted one give the same key.
        """
        full = {**(_keyword_defaults(factory) if factory is not None else {}), **params}
        h = hashlib.sha256(json.dumps(self.pretraining_params(full), sort_keys=True).encode())
        h.update(b"\0ids\0" + "\0".join(map(str, ids)).encode())
        return h.hexdigest()[:16]

    def get_or_pretrain(
        self,
        factory: Callable[..., Any],
        params: Mapping[str, Any],
        X: Any,
        ids: Sequence[str],
    ) -> tuple[Path, bool]:
        """Path of the saved encoder for ``params`` on ``X``, pretraining on a miss.

        Returns ``(path, hit)``; the estimator is built as ``factory(**params)`` and must
        provide ``pretrain(X)`` and ``save_encoder(path)``.
        """
        key = self.key(params, ids, factory)
        final = self.directory / key
        encoder = final / "encoder"
        if encoder.exists():
            logger.info("encoder cache hit %s", key)
            return encoder, True
        logger.info("encoder cache miss %s: pretraining on %d structures", key, len(ids))
        tmp = self.directory / f".tmp-{key}-{_HOST}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            est = factory(**{k: v for k, v in params.items() if k != "callbacks"})
            est.pretrain(X)
            est.save_encoder(tmp / "encoder")
            self.n_pretrained += 1
            meta = {
                "key": key,
                "params": self.pretraining_params({**_keyword_defaults(factory), **params}),
                "n_structures": len(ids),
                "ids_sha256": hashlib.sha256("\0".join(map(str, ids)).encode()).hexdigest(),
                "seconds": round(time.perf_counter() - t0, 3),
                "created": datetime.now().isoformat(timespec="seconds"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
            try:
                tmp.rename(final)
            except OSError:  # another worker finished the same key first
                logger.info("encoder %s was saved meanwhile by another worker", key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return encoder, False


# --------------------------------------------------------------------------- objective


def _default_factory() -> Callable[..., Any]:
    from matbench_dim.estimator import SiteNetDIMRegressor

    return SiteNetDIMRegressor


class InnerCVObjective:
    """Mean inner-validation MAE of an estimator over labelled subsets of one training fold.

    Parameters
    ----------
    X, y
        Structures and targets of the fold's *training* part only, ``(n_pool,)``.
    space
        Parameters to tune; a trial's estimator is ``factory(**base_params, **suggested)``.
    n_labels, n_splits, n_repeats, seed
        Labelled-subset size and inner splits (:func:`inner_splits`).
    base_params
        Fixed estimator parameters (epochs, device, ...).
    factory
        Estimator class or factory (default :class:`matbench_dim.estimator.SiteNetDIMRegressor`).
        With a ``callbacks`` parameter it receives an :class:`OptunaPruningCallback` per fit;
        without, the running mean MAE is reported after each inner split.
    X_pretrain, pretrain_ids, cache
        Label-free pretraining set (the fold's training structures) and the encoder cache;
        ``X_pretrain=None`` disables pretraining (random initialisation).
    monitor
        Epoch-log key reported to the pruner.
    tracker, parent_run_id
        Optional MLflow tracker: one child run per trial with per-split metrics and a plot.
    """

    def __init__(
        self,
        X: Any,
        y: Any,
        space: SearchSpace,
        n_labels: int,
        *,
        n_splits: int = 5,
        n_repeats: int = 1,
        seed: int = 0,
        base_params: Mapping[str, Any] | None = None,
        factory: Callable[..., Any] | None = None,
        X_pretrain: Any = None,
        pretrain_ids: Sequence[str] | None = None,
        cache: EncoderCache | None = None,
        monitor: str = "val_loss",
        tracker: Any = None,
        parent_run_id: str | None = None,
    ) -> None:
        self.X, self.y = X, np.asarray(y, dtype=float).ravel()
        if len(self.y) != len(X):
            raise ValueError(f"{len(X)} structures but {len(self.y)} targets")
        self.space = space
        self.base_params = dict(base_params or {})
        self.factory = factory if factory is not None else _default_factory()
        self.splits = inner_splits(
            len(X), n_labels, n_splits=n_splits, n_repeats=n_repeats, seed=seed
        )
        self.X_pretrain = X_pretrain
        if X_pretrain is not None and pretrain_ids is None:
            raise ValueError("pretrain_ids are required with X_pretrain (they key the cache)")
        self.pretrain_ids = list(pretrain_ids or [])
        self.cache = cache if cache is not None else EncoderCache()
        self.monitor = monitor
        self.tracker, self.parent_run_id = tracker, parent_run_id
        unknown = [n for n in [*space.names, *self.base_params] if not _accepts(self.factory, n)]
        if unknown:
            raise ValueError(
                f"{getattr(self.factory, '__name__', self.factory)} has no parameters {unknown} "
                f"(search spaces: {', '.join(space.sources) or '-'})"
            )
        self.epoch_callbacks = _accepts(self.factory, "callbacks")
        epochs = self.space.get("finetune__epochs")
        stride = epochs.high if epochs is not None else self.base_params.get("finetune__epochs")
        self.step_stride = int(stride) + 1 if stride else 10_000

    def params_for(self, trial: optuna.Trial) -> dict[str, Any]:
        """Estimator parameters of ``trial``: base parameters updated by the suggestions."""
        return {**self.base_params, **self.space.suggest(trial)}

    def __call__(self, trial: optuna.Trial) -> float:
        return self.evaluate(self.params_for(trial), trial)

    def evaluate(self, params: Mapping[str, Any], trial: optuna.Trial | None = None) -> float:
        """Mean inner-validation MAE of ``params`` (target units); reports to ``trial``."""
        if self.tracker is None or trial is None:
            return self._evaluate(dict(params), trial, None)
        tags = {k: str(v) for k, v in trial.study.user_attrs.items() if k in ("task", "target")}
        name = f"trial-{trial.number}"
        with self.tracker.start_child_run(
            self.parent_run_id,
            name,
            tags={**tags, "optuna.trial": str(trial.number)},
            params=_jsonable(params),
        ) as run:
            if run.run_id is not None:
                trial.set_user_attr("mlflow_run_id", run.run_id)
            return self._evaluate(dict(params), trial, run)

    def _evaluate(self, params: dict[str, Any], trial: optuna.Trial | None, run: Any) -> float:
        t0 = time.perf_counter()
        maes: list[float] = []
        curves: list[Any] = []
        try:
            if self.X_pretrain is not None:
                encoder, hit = self.cache.get_or_pretrain(
                    self.factory, params, self.X_pretrain, self.pretrain_ids
                )
                params["encoder_init"] = str(encoder)
                if trial is not None:
                    trial.set_user_attr("encoder_key", encoder.parent.name)
                    trial.set_user_attr("encoder_cache_hit", hit)
            t_fit = time.perf_counter()
            self._fit_splits(params, trial, run, maes, curves)
        finally:  # also for pruned and failed trials
            if trial is not None:
                trial.set_user_attr("inner_maes", maes)
                trial.set_user_attr("seconds", round(time.perf_counter() - t0, 3))
                trial.set_user_attr("estimator_params", _jsonable(params | {"encoder_init": None}))
        value = float(np.mean(maes))
        if trial is not None:
            trial.set_user_attr("inner_mae_std", float(np.std(maes)))
            trial.set_user_attr("fit_seconds", round(time.perf_counter() - t_fit, 3))
        if run is not None:
            run.log_metrics({"inner/mae": value, "inner/mae_std": float(np.std(maes))})
            _log_learning_curves(run, curves)
        return value

    def _fit_splits(
        self,
        params: dict[str, Any],
        trial: optuna.Trial | None,
        run: Any,
        maes: list[float],
        curves: list[Any],
    ) -> None:
        """Fit and score every inner split, appending to ``maes`` and ``curves``."""
        for k, split in enumerate(self.splits):
            kwargs = dict(params)
            if self.epoch_callbacks:
                cbs = list(kwargs.get("callbacks") or [])
                if trial is not None:
                    offset = k * self.step_stride
                    cbs.append(OptunaPruningCallback(trial, self.monitor, step_offset=offset))
                if run is not None:
                    cbs.append(run.callback(prefix=f"split{k}/"))
                kwargs["callbacks"] = cbs
            est = self.factory(**kwargs)
            est.fit(_take(self.X, split.train), self.y[split.train])
            pred = np.asarray(est.predict(_take(self.X, split.val)), dtype=float).ravel()
            if not np.isfinite(pred).all():
                raise FloatingPointError(f"inner split {k}: non-finite predictions")
            maes.append(float(np.mean(np.abs(pred - self.y[split.val]))))
            curves.append(getattr(est, "history_", None))
            if run is not None:
                run.log_metrics({f"inner/mae_split{k}": maes[-1]})
            if trial is not None and not self.epoch_callbacks:
                trial.report(float(np.mean(maes)), k)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"pruned after inner split {k}")


def _finetune_history(history: Any) -> list[Mapping[str, float]]:
    if isinstance(history, Mapping):
        history = history.get("finetune")
    if isinstance(history, list) and all(isinstance(h, Mapping) for h in history):
        return history
    return []


def _log_learning_curves(run: Any, curves: Sequence[Any]) -> None:
    """Fine-tuning learning curves of a trial's inner fits, as one figure artifact."""
    histories = [_finetune_history(c) for c in curves]
    if not any(histories):
        return
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for k, hist in enumerate(histories):
        for key, style in (("train_loss", ":"), ("val_loss", "-")):
            values = [h.get(key) for h in hist]
            if any(v is not None for v in values):
                ax.plot(values, style, color=f"C{k % 10}", label=f"split {k} {key}")
    ax.set(xlabel="epoch", ylabel="loss", yscale="log", title="fine-tuning, inner splits")
    ax.legend(fontsize=6)
    try:
        run.log_figure(fig, "learning_curves.png")
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------- names and export


def _slug(part: Any) -> str:
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(part)).strip("_") or "x"


def study_name_for(task: str, target: str | None, n_labels: int, fold: int | None = None) -> str:
    """Readable study name, e.g. ``matbench_perovskites-e_form-n100-fold0``."""
    parts = [_slug(task), *([_slug(target)] if target else []), f"n{int(n_labels)}"]
    return "-".join([*parts, f"fold{0 if fold is None else int(fold)}"])


def best_params_path(task: str, n_labels: int, best_dir: str | Path | None = None) -> Path:
    """``<best_dir>/<task>_n<N>.json`` (default ``tuning/best``); one record per fold and target."""
    return Path(best_dir or DEFAULT_BEST_DIR) / f"{_slug(task)}_n{int(n_labels)}.json"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _count(study: optuna.Study, states: Sequence[TrialState]) -> int:
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def _exported_params(trial: FrozenTrial) -> dict[str, Any]:
    params = {**trial.user_attrs.get("estimator_params", {}), **trial.params}
    return {k: v for k, v in sorted(params.items()) if k not in NOT_EXPORTED}


def export_best(study: optuna.Study, best_dir: str | Path | None = None) -> Path:
    """Write the study's best trial to :func:`best_params_path` (merging other folds/targets).

    The record holds the study name, task, target, n, fold, best value (mean inner MAE),
    best trial number, trial counts, the value of the default (seed) trial, the tuned
    parameters and the full estimator parameters of the best trial.
    """
    attrs = study.user_attrs
    for key in ("task", "n", "fold"):
        if key not in attrs:
            raise ValueError(f"study {study.study_name!r} lacks the user attribute {key!r}")
    best = study.best_trial
    defaults = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("enqueued") == "seed defaults"]  # fmt: skip
    record = {
        "study_name": study.study_name,
        "task": attrs["task"],
        "target": attrs.get("target"),
        "n": attrs["n"],
        "fold": attrs["fold"],
        "metric": "mean inner-validation MAE",
        "best_value": best.value,
        "best_trial": best.number,
        "default_value": defaults[0].value if defaults else None,
        "n_trials": _count(study, (TrialState.COMPLETE, TrialState.PRUNED)),
        "n_complete": _count(study, (TrialState.COMPLETE,)),
        "n_pruned": _count(study, (TrialState.PRUNED,)),
        "n_failed": _count(study, (TrialState.FAIL,)),
        "tuned_params": best.params,
        "params": _exported_params(best),
        "exported": datetime.now().isoformat(timespec="seconds"),
    }
    path = best_params_path(attrs["task"], attrs["n"], best_dir)
    with _locked(path):
        data = json.loads(path.read_text()) if path.exists() else {}
        records = [r for r in data.get("records", [])
                   if (r["fold"], r.get("target")) != (record["fold"], record["target"])]  # fmt: skip
        data = {"task": attrs["task"], "n": attrs["n"], "records": [*records, record]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    logger.info(
        "best params of %s (MAE %.4g, trial %d) -> %s",
        study.study_name,
        best.value,
        best.number,
        path,
    )
    return path


def load_best_params(
    task: str,
    n: int,
    fold: int | None = None,
    storage: str | BaseStorage | None = None,
    *,
    target: str | None = None,
    best_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Estimator parameters of the best trial for ``(task, n, fold)`` (``fold=None``: fold 0).

    Read from the exported file, or from the study in ``storage`` when given. ``target`` is
    needed only when several targets of ``task`` were tuned.

    Raises
    ------
    FileNotFoundError, KeyError
        When nothing was exported/tuned for this task, n, fold or target (the message lists
        what exists).
    """
    fold = 0 if fold is None else int(fold)
    if storage is not None:
        store = resolve_storage(storage)
        prefix, suffix = f"{_slug(task)}-", f"-n{int(n)}-fold{fold}"
        names = [
            s
            for s in optuna.get_all_study_names(store)
            if s.startswith(prefix) and s.endswith(suffix)
        ]
        if target is not None:
            names = [s for s in names if s == study_name_for(task, target, n, fold)]
        if len(names) != 1:
            raise KeyError(
                f"need exactly one study {prefix}<target>{suffix} in the storage, found {names}"
            )
        return _exported_params(optuna.load_study(study_name=names[0], storage=store).best_trial)
    path = best_params_path(task, n, best_dir)
    if not path.exists():
        raise FileNotFoundError(f"no tuned parameters for {task} n={n}: {path} does not exist")
    records = json.loads(path.read_text())["records"]
    found = [r for r in records if r["fold"] == fold and target in (None, r.get("target"))]
    if len(found) != 1:
        have = [(r["fold"], r.get("target")) for r in records]
        raise KeyError(f"{path}: need one record for fold {fold}, target {target}; have {have}")
    return dict(found[0]["params"])


# --------------------------------------------------------------------------- tune


class _FailureGuard:
    """Stop this worker after ``limit`` consecutive failed trials (a bug, not bad luck)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.streak, self.last = limit, 0, ""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            self.streak = 0
            return
        self.streak += 1
        self.last = f"trial {trial.number}: {trial.system_attrs.get('fail_reason', '?')}"
        if self.streak >= self.limit:
            study.stop()


@contextmanager
def _tracking_parent(
    enabled: bool,
    uri: str | None,
    experiment: str,
    name: str,
    tags: dict[str, str],
    params: dict[str, Any],
) -> Iterator[tuple[Any, Any]]:
    """``(tracker, parent run)`` from :mod:`matbench_dim.tracking`, or ``(None, None)``."""
    if not enabled:
        yield None, None
        return
    try:
        from matbench_dim.tracking import setup_tracking

        tracker = setup_tracking(uri, experiment)
    except (ImportError, AttributeError) as exc:
        logger.warning("MLflow tracking unavailable (%s); tuning without it", exc)
        yield None, None
        return
    with tracker.start_parent_run(name, tags=tags, params=params) as parent:
        yield (tracker, parent) if parent.run_id is not None else (None, None)


def _training_fold(task: Any, fold: int) -> tuple[Any, np.ndarray, Any, list[str]]:
    """``(X_train, y_train, X_pretrain, pretrain_ids)`` of ``fold``; never reads test targets."""
    X, y = task.train_data(fold)
    test = set(task.test_ids(fold))
    pretrain = task.unlabelled_structures(fold)
    for what, ids in (("training", X.index), ("pretraining", pretrain.index)):
        clash = test.intersection(ids)
        if clash:
            raise AssertionError(
                f"{len(clash)} {what} ids of fold {fold} are test ids, e.g. {sorted(clash)[:3]}"
            )
    return X, y.to_numpy(dtype=float), pretrain, [str(i) for i in pretrain.index]


def tune(
    task: Any,
    n_labels: int,
    n_trials: int,
    fold: int | None = None,
    storage: str | BaseStorage | None = None,
    study_name: str | None = None,
    seed: int = 0,
    *,
    target: str | None = None,
    spaces: Sequence[str | os.PathLike[str]] | SearchSpace = DEFAULT_SPACES,
    base_params: Mapping[str, Any] | None = None,
    n_splits: int = 5,
    n_repeats: int = 1,
    pretrain: bool = True,
    pruner: str | optuna.pruners.BasePruner | None = "median",
    factory: Callable[..., Any] | None = None,
    cache_dir: str | Path | None = None,
    best_dir: str | Path | None = None,
    export: bool = True,
    tracking: bool = True,
    tracking_uri: str | None = None,
    worker: int = 0,
    timeout: float | None = None,
    count_states: Sequence[TrialState] = (TrialState.COMPLETE, TrialState.PRUNED),
    heartbeat_interval: int = 60,
    grace_period: int | None = None,
    max_failures: int = 3,
) -> optuna.Study:
    """Create or resume the study of ``(task, n_labels, fold)`` and run it to ``n_trials``.

    Parameters
    ----------
    task
        A :class:`matbench_dim.data.Task` or a name for :func:`matbench_dim.data.load_task`.
    n_labels
        Labelled-subset size ``n`` the parameters are tuned for.
    n_trials
        Trials the *study* should hold in ``count_states`` (COMPLETE and PRUNED): a resumed or
        parallel worker only runs the missing ones (parallel workers may overshoot by up to
        one trial each). Failed (e.g. killed) trials do not count.
    fold
        Matbench fold whose training part is used (``None``: fold 0, the seed's protocol).
    storage
        See :func:`resolve_storage` (default ``sqlite:///tuning/optuna.db``).
    study_name
        Default :func:`study_name_for` (``<task>-<target>-n<N>-fold<k>``).
    seed
        Seeds the inner subsets/splits and, with ``worker``, the TPE sampler.
    spaces
        Space files or family names (``tuning/spaces``), or a loaded :class:`SearchSpace`.
    base_params
        Fixed estimator parameters (not tuned).
    pretrain
        Pretrain (cached) on the fold's training structures and fine-tune from it.
    worker
        Index of this worker: parallel workers need distinct indices so their samplers differ.
    tracking, tracking_uri
        Log a parent MLflow run per worker call and a child run per trial (per-split
        metrics, per-epoch curves, a learning-curve figure); skipped when unavailable.
    cache_dir
        Root of ``encoders/`` (pretrained encoders) and ``features/`` (featurization cache);
        default ``tuning/cache``.
    best_dir, export
        Where :func:`export_best` writes when ``export`` (default ``tuning/best``).
    timeout
        Seconds after which this worker starts no new trial.
    heartbeat_interval, grace_period
        Liveness of running trials (:func:`resolve_storage`), in seconds.
    max_failures
        Consecutive failed trials after which this worker raises (a bug, not bad luck).

    Returns
    -------
    optuna.Study
        The study; the best parameters are exported with :func:`export_best` when ``export``.
    """
    if isinstance(task, str):
        from matbench_dim.data import load_task

        task = load_task(task, target=target)
    fold = 0 if fold is None else int(fold)
    X, y, X_pre, pre_ids = _training_fold(task, fold)
    space = spaces if isinstance(spaces, SearchSpace) else load_spaces(spaces)
    name = study_name or study_name_for(task.name, task.target_name, n_labels, fold)
    store = resolve_storage(
        storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period
    )
    attrs = {"task": task.name, "target": task.target_name, "n": int(n_labels), "fold": fold}
    settings = {"seed": seed, "n_splits": n_splits, "n_repeats": n_repeats, "pretrain": pretrain}
    study = _open_study(store, name, space, attrs, settings, seed, worker, make_pruner(pruner))
    done = _count(study, count_states)
    if done >= n_trials:
        logger.info("study %s already holds %d/%d trials", name, done, n_trials)
    else:
        factory = factory if factory is not None else _default_factory()
        base = dict(base_params or {})
        if _accepts(factory, "random_state"):
            base.setdefault("random_state", seed)
        root = Path(cache_dir or DEFAULT_CACHE_DIR)
        if _accepts(factory, "cache_dir"):  # the featurization cache, shared by all trials
            base.setdefault("cache_dir", str(root / "features"))
        objective = InnerCVObjective(
            X, y, space, n_labels, n_splits=n_splits, n_repeats=n_repeats, seed=seed,
            base_params=base, factory=factory, X_pretrain=X_pre if pretrain else None,
            pretrain_ids=pre_ids, cache=EncoderCache(root / "encoders"),
        )  # fmt: skip
        tags = {k: str(v) for k, v in attrs.items()} | {"optuna.study": name, "worker": worker}
        experiment = f"tune/{_slug(task.name)}"
        params = {
            **settings,
            "n_trials": n_trials,
            "spaces": list(space.sources),
            **_jsonable(base),
        }
        with _tracking_parent(tracking, tracking_uri, experiment, name, tags, params) as (
            tracker,
            parent,
        ):
            if parent is not None:
                study.set_user_attr(f"mlflow_parent_run_id.w{worker}", parent.run_id)
                objective.tracker, objective.parent_run_id = tracker, parent.run_id
            logger.info("study %s: %d/%d trials; worker %d starts", name, done, n_trials, worker)
            guard = _FailureGuard(max_failures)
            study.optimize(
                _with_trial_attrs(
                    objective, {**attrs, "mlflow_parent_run_id": objective.parent_run_id}
                ),
                timeout=timeout,
                callbacks=[MaxTrialsCallback(n_trials, states=tuple(count_states)), guard],
                catch=(RuntimeError, ValueError, ArithmeticError),
                gc_after_trial=True,
            )
        if guard.streak >= max_failures:
            raise RuntimeError(f"{guard.streak} consecutive failed trials in {name}; {guard.last}")
    if export and _count(study, (TrialState.COMPLETE,)):
        export_best(study, best_dir)
    return study


def _open_study(
    storage: BaseStorage,
    name: str,
    space: SearchSpace,
    attrs: Mapping[str, Any],
    settings: Mapping[str, Any],
    seed: int,
    worker: int,
    pruner: Any,
) -> optuna.Study:
    """Create or load the study; a new one gets its attributes and the seed defaults."""
    sampler_seed = int(np.random.SeedSequence([seed, worker]).generate_state(1)[0])
    study = optuna.create_study(
        storage=storage,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=pruner,
        study_name=name,
        direction="minimize",
        load_if_exists=True,
    )
    if "task" not in study.user_attrs:  # new (or created outside tune)
        extra = {"spaces": list(space.sources), "metric": "mean inner-validation MAE"}
        for key, value in {**attrs, **settings, **extra}.items():
            study.set_user_attr(key, value)
        if space.defaults():  # skip_if_exists: two workers creating the study at once
            study.enqueue_trial(
                space.defaults(), {"enqueued": "seed defaults"}, skip_if_exists=True
            )
    stored = study.user_attrs
    clash = {k: (stored.get(k), v) for k, v in {**attrs, **settings}.items() if stored.get(k) != v}
    if clash:
        raise ValueError(f"study {name!r} was created with other settings (stored, asked): {clash}")
    return study


def _with_trial_attrs(
    objective: InnerCVObjective, attrs: Mapping[str, Any]
) -> Callable[[optuna.Trial], float]:
    def run(trial: optuna.Trial) -> float:
        for key, value in {**attrs, "worker": f"{_HOST}:{os.getpid()}"}.items():
            trial.set_user_attr(key, value)
        return objective(trial)

    return run
