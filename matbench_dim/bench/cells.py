"""One grid cell, and one fold's pretraining, as run inside a worker process.

:func:`run_pretrain` pretrains a method on a fold's label-free pool and writes the artefact,
then its manifest; :func:`run_cell` fits a method on a cell's labelled subset, predicts the
fold's whole test set and saves the cell (:mod:`matbench_dim.bench.results`). Both check that no
test id reaches them (:func:`matbench_dim.bench.subsets.check_disjoint`) and, given a tracker,
record themselves as a child MLflow run of the grid's parent run
(:mod:`matbench_dim.bench.recording`).

Workers receive a :class:`TaskRef` (a few strings) and load the task themselves, once per
process (:func:`resolve_task`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from matbench_dim.bench import recording as rec
from matbench_dim.bench import results as res
from matbench_dim.bench.methods import Method
from matbench_dim.bench.results import Cell
from matbench_dim.data.sources import load_task
from matbench_dim.data.task import Task
from matbench_dim.tracking.tracker import NullTracker, Tracker

logger = logging.getLogger(__name__)

__all__ = [
    "Cell",
    "CellOutput",
    "TaskRef",
    "current_log_levels",
    "data_sha256",
    "pretrain_paths",
    "resolve_task",
    "run_cell",
    "run_pretrain",
    "worker_logging",
]


# --------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class TaskRef:
    """A task that workers load themselves (cheap to send): ``load_task(name, target)``."""

    name: str
    target: str | None = None
    data_home: str | None = None


@functools.lru_cache(maxsize=4)
def _load_cached(ref: TaskRef) -> Task:
    return load_task(ref.name, target=ref.target, data_home=ref.data_home)


def resolve_task(ref: TaskRef | Task) -> Task:
    """The task itself, loaded once per process for a :class:`TaskRef`."""
    return ref if isinstance(ref, Task) else _load_cached(ref)


@functools.lru_cache(maxsize=8)
def data_sha256(task: Task) -> str:
    """sha256 (hex) identifying the task's data, recorded with every cell.

    The data file's sha256 from the task's provenance (combined with that of an external
    targets CSV, when there is one); for a task built in memory, a hash of its structures
    (lattice, fractional coordinates, species), ids, targets and folds.
    """
    sha = task.provenance.get("sha256")
    if sha:
        csv_sha = task.provenance.get("csv_sha256")
        if not csv_sha:
            return str(sha)
        return hashlib.sha256(f"{sha}\n{csv_sha}".encode()).hexdigest()
    h = hashlib.sha256()
    h.update(res.ids_sha256(task.ids).encode())
    pool = [] if task.unlabelled_pool is None else list(task.unlabelled_pool)
    for structure in [*task.structures, *pool]:
        h.update(np.asarray(structure.lattice.matrix, dtype=np.float64).tobytes())
        h.update(np.asarray(structure.frac_coords, dtype=np.float64).tobytes())
        h.update(" ".join(site.species_string for site in structure).encode())
    if task.targets is not None:
        h.update(np.asarray(task.targets, dtype=np.float64).tobytes())
    for train, test in task.folds:
        h.update(res.ids_sha256(train).encode())
        h.update(res.ids_sha256(test).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- cells


@dataclass
class CellOutput:
    """What a worker sends back: the saved result and the test predictions (for recording)."""

    cell: Cell
    result: res.CellResult
    test_ids: list[str]
    predictions: np.ndarray
    std: np.ndarray | None = None


LOG_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def current_log_levels() -> dict[str, int]:
    """This process's levels of the loggers a grid worker should mirror (``""`` = root)."""
    return {
        name: logging.getLogger(name or None).level for name in ("", "matbench_dim", "matbench")
    }


def worker_logging(levels: dict[str, int] | None) -> None:
    """Give a worker process the parent's log levels, so that ``-v`` shows the progress of
    pretrainings and cells run by loky or Dask workers (which start with no handler).

    Does nothing without ``levels`` or where the root logger already has a handler (the
    parent process itself, when ``n_jobs=1``).
    """
    if not levels:
        return
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=levels.get("", logging.WARNING), format=LOG_FORMAT)
    for name, level in levels.items():
        if name:
            logging.getLogger(name).setLevel(level)


def pretrain_paths(
    out: Path, task: Task, fold: int, key: str, label_free: bool = False
) -> tuple[Path, Path]:
    """``(artefact, manifest)`` of a fold's pretraining of family ``key`` under ``out``.

    A label-free pretraining (DIM) lives under ``<task>/label-free/fold<k>-<digest>``, the
    digest being that of the ids the fold offers to pretraining, so every target of a task
    with the same pool reuses it; a supervised one lives under the target it was made for.
    """
    base = out / "pretrained" / res.safe_name(task.name)
    if label_free:
        ids = "\n".join(sorted(str(i) for i in task.unlabelled_structures(fold).index))
        digest = hashlib.sha256(ids.encode()).hexdigest()[:10]
        folder = base / "label-free" / f"fold{fold}-{digest}"
    else:
        folder = base / res.safe_name(task.target_name) / f"fold{fold}"
    return folder / res.safe_name(key), folder / f"{res.safe_name(key)}.json"


def run_pretrain(
    task_ref: TaskRef | Task,
    method: Method,
    fold: int,
    max_train_structures: int | None,
    artefact: str,
    manifest_path: str,
    tracker: Tracker | NullTracker | None = None,
    parent_run_id: str | None = None,
    log_levels: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Pretrain ``method`` for one fold (worker side); write the artefact, then its manifest
    (whose presence marks the pretraining as done). With a tracker, the pretraining is a
    child run of ``parent_run_id`` with per-epoch metrics and the artefact as ``encoder``."""
    from matbench_dim.bench.subsets import check_disjoint, pretraining_pool  # the grid's rules

    worker_logging(log_levels)
    task = resolve_task(task_ref)
    where = f"task {task.name} fold {fold}"
    pool_all = task.unlabelled_structures(fold)
    pool = pretraining_pool(list(pool_all.index), max_train_structures, fold)
    check_disjoint(pool, task.test_ids(fold), stage="pretraining", where=where)
    path = Path(artefact)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tracker = tracker if tracker is not None else NullTracker()
    name = f"pretrain {method.pretrain_key} fold{fold}"
    tags = rec.pretrain_run_tags(task, fold, method.name, method.pretrain_key)
    with tracker.start_child_run(parent_run_id, name, tags=tags) as run:
        if run.enabled:
            run.log_params(method.pretrain_params(), prefix="method.")
            run.log_provenance(
                task.name,
                fold=fold,
                subset_ids={"pretrain": [str(i) for i in pool]},
                max_train_structures=max_train_structures,
                **rec.data_provenance(task, data_sha256(task)),
            )
            method = method.with_callbacks([run.callback()])
        t0 = time.perf_counter()
        method.pretrain(pool_all.loc[pool], tmp, random_state=int(fold), task=task, fold=fold)
        if path.is_dir():  # left by a run that died before writing the manifest
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
        os.replace(tmp, path)
        manifest = {
            "task": task.name,
            "target": task.target_name,
            "fold": fold,
            "pretrain_key": method.pretrain_key,
            "n_pretrain": len(pool),
            "max_train_structures": max_train_structures,
            "pool_sha256": res.ids_sha256(pool),
            "random_state": int(fold),
            "wall_s": time.perf_counter() - t0,
            "params": method.pretrain_params(),
            "mlflow_run_id": run.run_id,
        }
        run.log_metrics({"n_pretrain": len(pool), "wall_s": manifest["wall_s"]})
        if path.is_dir():
            run.log_dir(path, "encoder")
        res.atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))
    logger.info("pretrained %s for %s on %d structures", method.pretrain_key, where, len(pool))
    return manifest


def run_cell(
    task_ref: TaskRef | Task,
    method: Method,
    cell: Cell,
    out: str,
    pretrained: str | None,
    n_pretrain: int,
    max_train_structures: int | None,
    feature_files: Sequence[str],
    tracker: Tracker | NullTracker | None = None,
    parent_run_id: str | None = None,
    log_levels: dict[str, int] | None = None,
) -> CellOutput:
    """Fit one cell on its labelled subset, predict the fold's test set, save (worker side).

    With a tracker, the cell is a child run of ``parent_run_id`` (see
    :mod:`matbench_dim.bench.recording`); a failing cell ends it FAILED.
    """
    from matbench_dim.bench.baselines import get_cache
    from matbench_dim.bench.subsets import check_disjoint, draw_subset  # the grid's rules

    worker_logging(log_levels)
    task = resolve_task(task_ref)
    where = f"task {task.name} fold {cell.fold} method {cell.method} n={cell.n} seed={cell.seed}"
    test_ids = task.test_ids(cell.fold)
    subset = draw_subset(task.train_ids(cell.fold), cell.n, cell.fold, cell.seed)
    check_disjoint(subset, test_ids, stage="fitting", where=where)
    if method.featurizer is not None:
        cache = get_cache(method.featurizer)
        for path in feature_files:
            cache.update_from(path)
    X_train, y_train = task.structures.loc[subset], task.targets.loc[subset]
    X_test = task.test_inputs(cell.fold)
    data_sha = data_sha256(task)
    tracker = tracker if tracker is not None else NullTracker()
    tags = rec.cell_run_tags(cell, method.mode)
    with tracker.start_child_run(parent_run_id, rec.cell_run_name(cell), tags=tags) as run:
        fitted = method.with_callbacks([run.callback()]) if run.enabled else method
        estimator = fitted.build(
            random_state=cell.seed, pretrained=None if pretrained is None else Path(pretrained)
        )
        rec.log_cell_inputs(
            run, task, cell, estimator, method.get_params(), subset, test_ids, data_sha
        )
        t0 = time.perf_counter()
        estimator.fit(X_train, y_train.to_numpy(dtype=float))
        std = None
        if getattr(estimator, "predicts_std", False):  # an ensemble: mean and spread
            mean, spread = estimator.predict(X_test, return_std=True)
            predictions = np.asarray(mean, dtype=np.float64).ravel()
            std = np.asarray(spread, dtype=np.float64).ravel()
        else:
            predictions = np.asarray(estimator.predict(X_test), dtype=np.float64).ravel()
        wall = time.perf_counter() - t0
        if predictions.shape != (len(test_ids),):
            raise ValueError(
                f"{where}: {predictions.shape} predictions for {len(test_ids)} test entries"
            )
        y_true = task.test_targets(cell.fold).loc[test_ids].to_numpy(dtype=float)
        metrics = res.regression_metrics(y_true, predictions)
        run.log_test_metrics(y_true, predictions)
        run.log_metrics({"wall_s": wall, "n_pretrain": n_pretrain})
        params = {
            "method": method.get_params(),
            "subset_seed": 1000 * cell.fold + cell.seed,
            "pretrained": pretrained,
            "pretrain_random_state": cell.fold if pretrained else None,
            "mlflow_run_id": run.run_id,
        }
        result = res.CellResult(
            task=cell.task,
            target=cell.target,
            fold=cell.fold,
            method=cell.method,
            mode=method.mode,
            n=cell.n,
            seed=cell.seed,
            n_test=len(test_ids),
            n_pretrain=n_pretrain,
            max_train_structures=max_train_structures,
            wall_s=wall,
            params=params,
            subset_sha256=res.ids_sha256(subset),
            data_sha256=data_sha,
            versions=res.library_versions(),
            **metrics,
        )
        res.write_cell(out, result, list(test_ids), y_true, predictions, std)
    logger.info("%s: MAE %.4g (%.1f s)", where, result.mae, wall)
    return CellOutput(cell, result, [str(i) for i in test_ids], predictions, std)
