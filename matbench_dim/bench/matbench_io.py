"""matbench 0.6 benchmarks without its quirks: build, record, save and load.

What matbench 0.6 does and what these wrappers do instead:

- ``MatbenchTask.record`` keeps numpy scalars of a float32 list (``validate`` then fails
  on them), cannot take a torch tensor, and on a second call for the same fold only logs
  an error and keeps the old values. :func:`record` always passes
  ``np.asarray(predictions, dtype=float)`` (1-D, finite, one per test entry) and raises
  :class:`AlreadyRecordedError` unless ``overwrite=True``.
- ``to_file`` writes plain JSON whatever the suffix (``results.json.gz`` included),
  non-atomically, and ``from_file`` reads only that. :func:`save_benchmark` writes the same
  plain JSON (so matbench's own ``MatbenchBenchmark.from_file`` reads every file we write),
  through a temporary file and ``os.replace``; :func:`load_benchmark` reads it and also real
  gzip (files written by earlier versions of this package, or by other tools).
- ``from_dict`` refuses a benchmark whose folds are not all recorded, so an interrupted
  run could not be resumed. :func:`load_benchmark` verifies the hash and the recorded
  folds itself for such a file and hands full ones to matbench's own ``from_dict``.
- A benchmark built with ``autoload=False`` has no data, so it cannot score a record.
  :func:`new_benchmark` takes loaded :class:`~matbench_dim.data.task.Task` objects and shares
  their data (no copy, fresh results), or loads the files (``autoload=True``) with the
  fail-fast search of :mod:`matbench_dim.data.task`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import numpy as np
import pandas as pd

from matbench_dim.data.sources import matbench_data_file, matminer_data_home
from matbench_dim.data.task import Task, format_ids

if TYPE_CHECKING:
    from matbench.bench import MatbenchBenchmark
    from matbench.task import MatbenchTask

logger = logging.getLogger(__name__)

BENCHMARK_NAME = "matbench_v0.1"
_GZIP_MAGIC = b"\x1f\x8b"


class AlreadyRecordedError(ValueError):
    """The fold already holds predictions (pass ``overwrite=True`` to replace them)."""


# --------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------


def new_benchmark(
    tasks: str | Task | Sequence[str | Task],
    autoload: bool = False,
    data_home: str | os.PathLike[str] | None = None,
) -> MatbenchBenchmark:
    """A fresh ``matbench_v0.1`` benchmark over some tasks.

    Parameters
    ----------
    tasks
        Task names and/or matbench :class:`~matbench_dim.data.task.Task` objects. A Task's loaded
        data is shared with the benchmark (so records can be scored at once); its results
        start empty, independent of any other benchmark.
    autoload
        Load the data of tasks given by name (fail-fast file search; ``data_home`` as in
        :func:`matbench_dim.data.sources.load_matbench_task`).
    """
    from matbench.bench import MatbenchBenchmark

    items = [tasks] if isinstance(tasks, str | Task) else list(tasks)
    names = [t.name if isinstance(t, Task) else str(t) for t in items]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate tasks in {names}")
    for t in items:
        if isinstance(t, Task) and not t.is_matbench:
            raise ValueError(
                f"task {t.name!r} was not loaded through matbench; it cannot be recorded"
            )
    mb = MatbenchBenchmark(benchmark=BENCHMARK_NAME, autoload=False, subset=names)
    for t in items:
        if isinstance(t, Task):
            attach_task_data(mb, t)
        elif autoload:
            path = matbench_data_file(t, data_home)
            with matminer_data_home(path.parent):
                mb.tasks_map[t].load()
    return mb


def attach_task_data(mb: MatbenchBenchmark, task: Task) -> None:
    """Give ``mb``'s task of the same name the data of a loaded matbench ``task`` (shared)."""
    if not task.is_matbench or task.matbench_task is None:
        raise ValueError(f"task {task.name!r} was not loaded through matbench")
    if task.name not in mb.tasks_map:
        raise KeyError(f"benchmark has no task {task.name!r} (tasks: {', '.join(mb.tasks_map)})")
    mb.tasks_map[task.name].df = task.matbench_task.df


# --------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------


def as_prediction_array(
    predictions: Any, test_ids: Sequence[str], where: str = "predictions"
) -> np.ndarray:
    """``predictions`` as a 1-D finite float64 array in ``test_ids`` order, shape ``(n_test,)``.

    Accepts lists, numpy arrays (any float dtype), torch tensors (any device) and pandas
    Series; a Series indexed by exactly the test ids is reordered to ``test_ids``.
    """
    if isinstance(predictions, pd.Series) and set(predictions.index) == set(test_ids):
        predictions = predictions.loc[list(test_ids)]
    if hasattr(predictions, "detach") and hasattr(predictions, "cpu"):  # torch.Tensor
        predictions = predictions.detach().cpu().numpy()
    try:
        arr = np.asarray(predictions, dtype=float)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{where} are not numeric: {exc}") from exc
    if arr.ndim != 1:
        raise ValueError(f"{where} must be 1-D, got shape {arr.shape}")
    if len(arr) != len(test_ids):
        raise ValueError(f"{len(arr)} {where} for {len(test_ids)} test entries")
    bad = ~np.isfinite(arr)
    if bad.any():
        ids = [test_ids[i] for i in np.flatnonzero(bad)]
        raise ValueError(f"non-finite {where} for test ids {format_ids(ids)}")
    return arr


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "detach") and hasattr(obj, "tolist"):
        return obj.detach().cpu().tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} in params is not JSON-serialisable")


def _clean_params(params: Mapping[str, Any] | None) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    bad_keys = [k for k in params if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"params keys must be strings, got {bad_keys}")
    return json.loads(json.dumps(dict(params), default=_jsonable))


def _matbench_task(task: Any) -> MatbenchTask:
    from matbench.task import MatbenchTask

    if isinstance(task, Task):
        if not task.is_matbench or task.matbench_task is None:
            raise ValueError(f"task {task.name!r} was not loaded through matbench")
        return task.matbench_task
    if isinstance(task, MatbenchTask):
        return task
    raise TypeError(
        f"expected a MatbenchTask, a matbench Task or a benchmark, got {type(task).__name__}"
    )


@overload
def record(
    task: MatbenchTask | Task,
    fold: int,
    predictions: Any,
    params: Mapping[str, Any] | None = None,
    *,
    std: Any = None,
    overwrite: bool = False,
) -> None: ...


@overload
def record(
    task: MatbenchBenchmark,
    task_name: str,
    fold: int,
    predictions: Any,
    params: Mapping[str, Any] | None = None,
    *,
    std: Any = None,
    overwrite: bool = False,
) -> None: ...


def record(
    task: Any, *args: Any, params: Any = None, std: Any = None, overwrite: bool = False
) -> None:
    """Record one fold's test predictions, checked and converted.

    Call as ``record(task, fold, predictions, params=None)`` with a ``MatbenchTask`` or a
    matbench :class:`~matbench_dim.data.task.Task` (then its own ``matbench_task``), or as
    ``record(benchmark, task_name, fold, predictions, params=None)``.

    Parameters
    ----------
    predictions
        One value per test entry, in ``get_test_data(fold)`` order (a Series indexed by the
        test ids is aligned); see :func:`as_prediction_array`.
    params
        Free-form JSON-able dict stored with the fold (numpy values are converted).
    std
        Optional standard deviation of each prediction (same order and checks, > 0), passed
        to matbench's ``record(std=...)`` (e.g. :class:`~matbench_dim.ensemble.SiteNetDIMEnsemble`).
    overwrite
        Replace an already recorded fold instead of raising :class:`AlreadyRecordedError`.
    """
    from matbench.bench import MatbenchBenchmark

    if isinstance(task, MatbenchBenchmark):
        if not args:
            raise TypeError("record(benchmark, task_name, fold, predictions, params=None)")
        name, *args = args
        if name not in task.tasks_map:
            raise KeyError(f"benchmark has no task {name!r} (tasks: {', '.join(task.tasks_map)})")
        task = task.tasks_map[name]
    if len(args) == 3:
        if params is not None:
            raise TypeError("params given twice")
        args, params = args[:2], args[2]
    if len(args) != 2:
        raise TypeError("record(task, fold, predictions, params=None)")
    fold, predictions = args
    mtask = _matbench_task(task)
    if isinstance(fold, bool) or not isinstance(fold, int | np.integer) or fold not in mtask.folds:
        raise ValueError(
            f"fold must be one of {mtask.folds} for {mtask.dataset_name}, got {fold!r}"
        )
    fold = int(fold)
    if mtask.df is None:
        raise ValueError(
            f"{mtask.dataset_name}: data not loaded, cannot score; build the benchmark with "
            "new_benchmark(task) / attach_task_data(mb, task), or load it"
        )
    fold_key = mtask.folds_map[fold]
    test_ids = list(mtask.validation[fold_key].test)
    arr = as_prediction_array(
        predictions, test_ids, f"{mtask.dataset_name} fold {fold} predictions"
    )
    spread = None
    if std is not None:
        spread = as_prediction_array(std, test_ids, f"{mtask.dataset_name} fold {fold} std")
        if (spread <= 0).any():  # matbench turns std into a normal 95 % interval: scale > 0
            bad = [test_ids[i] for i in np.flatnonzero(spread <= 0)]
            raise ValueError(
                f"{mtask.dataset_name} fold {fold}: std must be > 0, not for {format_ids(bad)}"
            )
    clean = _clean_params(params)
    if mtask.is_recorded[fold]:
        if not overwrite:
            raise AlreadyRecordedError(
                f"{mtask.dataset_name} fold {fold} is already recorded; pass overwrite=True to replace it"
            )
        logger.warning("%s fold %d: overwriting the recorded predictions", mtask.dataset_name, fold)
        mtask.results[fold_key] = {}
    mtask.record(fold, arr, std=spread, params=clean)
    if not mtask.is_recorded[fold]:  # matbench only logs some failures
        raise RuntimeError(f"matbench did not record {mtask.dataset_name} fold {fold}")


# --------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------


def save_benchmark(mb: MatbenchBenchmark, path: str | os.PathLike[str]) -> Path:
    """Write ``mb`` atomically, in the format matbench 0.6's ``to_file`` writes.

    That is plain JSON of ``as_dict()`` (with its hash) whatever the suffix, so
    ``MatbenchBenchmark.from_file(path)`` reads it, ``results.json.gz`` included. It goes to
    a temporary file in the same folder, then ``os.replace``.
    """
    path = Path(path)
    data = json.dumps(mb.as_dict()).encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug("saved benchmark to %s (%d bytes)", path, len(data))
    return path


def read_benchmark_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON dict of a benchmark file, gzip or plain (whatever its suffix)."""
    raw = Path(path).read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        raw = gzip.decompress(raw)
    try:
        return json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise ValueError(f"{path} is not a matbench benchmark file (bad JSON: {exc})") from exc


def _fully_recorded(d: dict[str, Any]) -> bool:
    from matbench.metadata import mbv01_validation

    for name, task_dict in d.get("tasks", {}).items():
        results = task_dict.get("results", {})
        for fold_key in mbv01_validation.splits.get(name, {}):
            if not results.get(fold_key, {}).get("data"):
                return False
    return True


def _from_partial_dict(d: dict[str, Any], path: Path) -> MatbenchBenchmark:
    from matbench.bench import MatbenchBenchmark
    from matbench.util import RecursiveDotDict, hash_dictionary

    required = {
        "@module",
        "@class",
        "version",
        "benchmark_name",
        "tasks",
        "user_metadata",
        "datestamp",
        "hash",
    }
    if set(d) != required:
        raise ValueError(
            f"{path}: keys {sorted(d)} differ from a matbench benchmark's {sorted(required)}"
        )
    expected = d.pop("hash")
    if hash_dictionary(d) != expected:
        raise ValueError(f"{path}: hash mismatch; the file was modified after matbench wrote it")
    mb = MatbenchBenchmark(benchmark=d["benchmark_name"], autoload=False, subset=list(d["tasks"]))
    for name, task_dict in d["tasks"].items():
        if task_dict.get("dataset_name") != name:
            raise ValueError(f"{path}: task key {name!r} holds {task_dict.get('dataset_name')!r}")
        mtask = mb.tasks_map[name]
        for fold_key, fold_results in task_dict["results"].items():
            if fold_key not in mtask.folds_keys:
                raise ValueError(f"{path}: {name} has an unknown fold {fold_key!r}")
            data = fold_results.get("data") or {}
            if data:
                required_ids = set(mtask.validation[fold_key].test)
                if set(data) != required_ids:
                    raise ValueError(
                        f"{path}: {name} {fold_key} ids differ from the official test set"
                    )
                if not all(isinstance(v, float) for v in data.values()):
                    raise ValueError(f"{path}: {name} {fold_key} holds non-float predictions")
        mtask.results = RecursiveDotDict(task_dict["results"])
    mb.user_metadata = d["user_metadata"]
    return mb


def load_benchmark(
    path: str | os.PathLike[str], tasks: Task | Sequence[Task] | None = None
) -> MatbenchBenchmark:
    """Read a benchmark written by :func:`save_benchmark` or matbench's ``to_file``.

    Fully recorded files go through ``MatbenchBenchmark.from_dict`` (matbench's validation);
    partially recorded ones (an interrupted run) are checked here (hash, fold ids, float
    values) so recording can resume. ``tasks`` (loaded matbench Tasks) get their data
    attached, so further folds can be recorded.
    """
    from matbench.bench import MatbenchBenchmark

    path = Path(path)
    d = read_benchmark_dict(path)
    if _fully_recorded(d):
        mb = MatbenchBenchmark.from_dict(d)
    else:
        mb = _from_partial_dict(d, path)
        logger.info("%s: partially recorded benchmark loaded", path)
    for t in [] if tasks is None else [tasks] if isinstance(tasks, Task) else list(tasks):
        attach_task_data(mb, t)
    return mb
