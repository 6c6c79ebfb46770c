"""The label-masking benchmark: a grid of (task, fold, method, n, seed) cells.

For each task and selected fold:

1. the fold's training structures (plus the task's unlabelled pool, never tested; capped
   by ``max_train_structures`` through a seeded draw) are offered to label-free pretraining,
   once per fold and per pretraining family (``Method.pretrain_key``);
2. for each labelled-subset size ``n`` and seed, :func:`draw_subset` takes the first ``n``
   ids of a ``numpy.random.default_rng(1000 * fold + seed)`` permutation of the fold's
   training ids (so subsets are nested in ``n``), the method is fitted on them and predicts
   the fold's whole test set;
3. the cell is saved (:mod:`matbench_dim.bench.results`) and, for matbench tasks, recorded in its
   own ``MatbenchBenchmark`` file per (method, n, seed) (:mod:`matbench_dim.bench.recording`);
4. with ``tracking=True`` every pretraining and every cell leaves an MLflow run, nested
   under one parent run per (task, grid invocation) (:mod:`matbench_dim.bench.recording`).

No test id may reach pretraining or fitting: :func:`check_disjoint` raises
:class:`LeakageError` before each pretraining and each fit. Early stopping and model
selection happen inside a method's ``fit`` on the ids it is given, so they never see test ids.

Cells are independent; they run (:mod:`matbench_dim.bench.cells`) through joblib (``n_jobs``
local processes) or, with ``backend="dask"``, on a Dask cluster through joblib's dask backend. Finished cells (their
JSON exists) are skipped, so a re-run resumes an interrupted grid.

Methods plug in through :class:`matbench_dim.bench.methods.Method` (re-exported here with the
method adapters and :func:`make_method`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import pandas as pd

from matbench_dim.bench import recording as rec
from matbench_dim.bench import results as res
from matbench_dim.bench.cells import (
    CellOutput,
    TaskRef,
    current_log_levels,
    data_sha256,
    pretrain_paths,
    resolve_task,
    run_cell,
    run_pretrain,
)
from matbench_dim.bench.methods import (
    OPTIONAL_METHODS,
    Method,
    make_method,
)
from matbench_dim.bench.results import Cell
from matbench_dim.bench.subsets import draw_subset
from matbench_dim.data.task import Task
from matbench_dim.paths import check_writable

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_N_LABELS",
    "DEFAULT_SEEDS",
    "GridSummary",
    "grid_cells",
    "run_grid",
    "unavailable_methods",
]

DEFAULT_N_LABELS: tuple[int, ...] = (50, 100, 250, 500, 1000)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
FEATURE_SAVE_EVERY = 2000
"""Entries between saves of a task's descriptor file while it is being computed."""
# --------------------------------------------------------------------------- the grid


@dataclass
class GridSummary:
    """Counts of a :func:`run_grid` call."""

    n_cells: int = 0
    n_skipped: int = 0
    n_run: int = 0
    n_pretrained: int = 0
    n_recorded: int = 0
    wall_s: float = 0.0
    out: Path = field(default_factory=Path)
    tracking_runs: dict[str, str] = field(default_factory=dict)
    """MLflow parent run id per ``"<task>/<target>"`` (tracked tasks with cells run)."""
    skipped_methods: dict[str, str] = field(default_factory=dict)
    """Methods left out because an optional package is missing: name -> why."""

    def results(self) -> pd.DataFrame:
        """Every cell under ``out`` (see :func:`matbench_dim.bench.results.load_results`)."""
        return res.load_results(self.out)


def _parallel_context(n_jobs: int, backend: str, scheduler_address: str | None) -> Any:
    stack = contextlib.ExitStack()
    if backend == "dask":
        from dask.distributed import Client

        client = stack.enter_context(Client(scheduler_address))
        logger.info("running the grid on dask scheduler %s", client.scheduler.address)
        stack.enter_context(joblib.parallel_config(backend="dask"))
        return stack, -1
    stack.enter_context(joblib.parallel_config(backend=backend))
    return stack, n_jobs


def _as_task_ref(task: str | tuple[str, str] | Task, data_home: str | None) -> TaskRef | Task:
    if isinstance(task, Task):
        return task
    if isinstance(task, tuple):
        return TaskRef(task[0], task[1], data_home)
    return TaskRef(str(task), None, data_home)


def _features(out: Path, task: Task, featurizer: str) -> str:
    """Compute (or load) ``featurizer`` for every labelled entry of ``task``; the file path."""
    from matbench_dim.bench.baselines import get_cache

    cache = get_cache(featurizer)
    path = out / "features" / res.safe_name(task.name) / f"{featurizer}.npz"
    if path.exists():
        cache.update_from(path)
    before = len(cache)
    t0 = time.perf_counter()
    structures = task.structures  # a Series: its index names an entry that fails
    for start in range(0, len(structures), FEATURE_SAVE_EVERY):
        # saved as it goes: an interrupted featurization (CHGNet: minutes) resumes from here
        n_cached = len(cache)
        cache.get(structures.iloc[start : start + FEATURE_SAVE_EVERY])
        if len(cache) > n_cached:
            cache.save(path)
            logger.info(
                "%s: %s descriptors of %d of %d entries",
                task.name,
                featurizer,
                min(start + FEATURE_SAVE_EVERY, len(structures)),
                len(structures),
            )
    if not path.exists():
        cache.save(path)
    if len(cache) > before:
        logger.info(
            "%s: %d %s descriptors in %.1f s",
            task.name,
            len(cache) - before,
            featurizer,
            time.perf_counter() - t0,
        )
    return str(path)


def grid_cells(
    task: Task,
    folds: Sequence[int],
    methods: Sequence[Method],
    n_labels: Sequence[int],
    seeds: Sequence[int],
) -> Iterator[Cell]:
    """Cells of one task in a fixed order: fold, method, n, seed."""
    for fold in folds:
        for method in methods:
            for n in n_labels:
                for seed in seeds:
                    yield Cell(
                        task.name, task.target_name, int(fold), method.name, int(n), int(seed)
                    )


def run_grid(
    tasks: Sequence[str | tuple[str, str] | Task],
    out: str | Path,
    *,
    folds: Sequence[int] | None = None,
    n_labels: Sequence[int] = DEFAULT_N_LABELS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    methods: Sequence[str | Method] = ("dummy_mean", "rf_magpie"),
    method_params: dict[str, dict[str, Any]] | None = None,
    max_train_structures: int | None = None,
    n_jobs: int = 1,
    backend: str = "loky",
    scheduler_address: str | None = None,
    record_matbench: bool = True,
    data_home: str | None = None,
    tracking_uri: str | None = None,
    tracking: bool = True,
) -> GridSummary:
    """Run (or resume) the label-masking grid; return what was done.

    Parameters
    ----------
    tasks
        Task names for :func:`~matbench_dim.data.sources.load_task` (``"perovskites_subset"``), or
        ``(name, target)`` pairs, or :class:`~matbench_dim.data.task.Task` objects.
    out
        Results folder (``cells/``, ``matbench/``, ``pretrained/``, ``features/``).
    folds
        Folds to run (``None``: all of each task).
    n_labels, seeds
        Labelled-subset sizes and seeds (defaults: 50..1000, seeds 0-4).
    methods, method_params
        Method names (:data:`METHOD_NAMES`) or :class:`Method` objects; ``method_params[name]``
        are keywords for :func:`make_method`.
    max_train_structures
        Cap on the pretraining pool of each fold (seeded draw; recorded in every cell).
    n_jobs, backend
        joblib workers and backend (``"loky"``, ``"threading"``, ``"sequential"``) or
        ``"dask"`` to send the cells to the Dask scheduler at ``scheduler_address`` (``None``
        starts a local cluster). Pretrained encoders and features are exchanged through
        ``out``, which must then be on a filesystem the Dask workers share.
    record_matbench
        Record matbench tasks in ``MatbenchBenchmark`` files (one per method, n, seed).
    tracking_uri, tracking
        MLflow store (:func:`matbench_dim.tracking.store.resolve_tracking_uri`: the argument, else
        ``$MLFLOW_TRACKING_URI``, else ``./mlruns``). With ``tracking`` (the default), each
        task with cells to run gets a parent run in its experiment
        (:func:`~matbench_dim.tracking.tracker.task_experiment`) and every pretraining and cell a
        child run (:mod:`matbench_dim.bench.recording`). With Dask workers on other machines the
        store must be reachable from them (a server, or SQLite on a shared filesystem).

    Raises
    ------
    ValueError
        For an unknown method or fold, or an ``n`` larger than a fold's training set
        (checked for every cell before any work starts).
    LeakageError
        When a test id would reach pretraining or fitting.
    """
    t_start = time.perf_counter()
    out = check_writable(out)  # a clear error now rather than after hours of work
    params = method_params or {}
    summary = GridSummary(out=out)
    for name, why in unavailable_methods(methods).items():
        logger.warning("skipping %s: %s", name, why)
        summary.skipped_methods[name] = why
    method_objs = [
        make_method(m, **params.get(m if isinstance(m, str) else m.name, {})).for_run(out)
        for m in methods
        if not (isinstance(m, str) and m in summary.skipped_methods)
    ]
    names = [m.name for m in method_objs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names: {names}")
    prepared = [_prepare_task(_as_task_ref(t, data_home), folds, n_labels) for t in tasks]
    recorder = rec.MatbenchRecorder(out)
    pending: list[tuple[TaskRef | Task, Task, Method, Cell]] = []
    for ref, task, task_folds in prepared:
        for cell in grid_cells(task, task_folds, method_objs, n_labels, seeds):
            summary.n_cells += 1
            method = method_objs[names.index(cell.method)]
            json_path, _ = cell.paths(out)
            if json_path.exists():
                _check_same_settings(json_path, method, max_train_structures, cell=True)
                summary.n_skipped += 1
                if record_matbench and task.is_matbench and not recorder.is_recorded(task, cell):
                    summary.n_recorded += _record_saved(recorder, task, cell, json_path)
                continue
            pending.append((ref, task, method, cell))
    logger.info(
        "grid: %d cells, %d done, %d to run", summary.n_cells, summary.n_skipped, len(pending)
    )
    if pending:
        settings = {
            "folds": folds,
            "n_labels": list(n_labels),
            "seeds": list(seeds),
            "methods": names,
            "max_train_structures": max_train_structures,
            "n_jobs": n_jobs,
            "backend": backend,
            "out": str(out.resolve()),
            "method_params": {m.name: m.get_params() for m in method_objs},
        }
        with contextlib.ExitStack() as stack:
            runs = rec.GridRuns(stack, tracking_uri, tracking, names, settings)
            for _, task, _, _ in pending:
                runs.open(task, data_sha256(task))
            _run_pending(
                pending,
                out,
                summary,
                recorder if record_matbench else None,
                runs,
                max_train_structures,
                n_jobs,
                backend,
                scheduler_address,
            )
            summary.tracking_runs = runs.finish(out)
    summary.wall_s = time.perf_counter() - t_start
    logger.info(
        "grid done: %d run, %d skipped, %d pretrained, %.1f s",
        summary.n_run,
        summary.n_skipped,
        summary.n_pretrained,
        summary.wall_s,
    )
    return summary


def unavailable_methods(methods: Sequence[str | Method]) -> dict[str, str]:
    """The methods of ``methods`` whose optional package is not installed: name -> message."""
    import importlib.util

    from matbench_dim.bench.chgnet_features import MISSING_MESSAGE

    messages = {"chgnet": MISSING_MESSAGE}
    out: dict[str, str] = {}
    for m in methods:
        package = OPTIONAL_METHODS.get(m) if isinstance(m, str) else None
        if package is not None and importlib.util.find_spec(package) is None:
            out[m] = messages.get(package, f"{m} needs the optional package {package!r}")
    return out


def _prepare_task(
    ref: TaskRef | Task, folds: Sequence[int] | None, n_labels: Sequence[int]
) -> tuple[TaskRef | Task, Task, list[int]]:
    """Load a task and check every ``n`` against every selected fold before any work."""
    task = resolve_task(ref)
    task_folds = list(range(task.n_folds)) if folds is None else [int(f) for f in folds]
    for fold in task_folds:
        n_train = len(task.train_ids(fold))
        too_big = [n for n in n_labels if n > n_train]
        if too_big:
            raise ValueError(
                f"task {task.name} fold {fold} has {n_train} labelled training entries; "
                f"n_labels {too_big} exceed it"
            )
    return ref, task, task_folds


def _task_key(task: Task) -> tuple[str, str]:
    return task.name, task.target_name


def _run_pending(
    pending: Sequence[tuple[TaskRef | Task, Task, Method, Cell]],
    out: Path,
    summary: GridSummary,
    recorder: rec.MatbenchRecorder | None,
    runs: rec.GridRuns,
    max_train_structures: int | None,
    n_jobs: int,
    backend: str,
    scheduler_address: str | None,
) -> None:
    """Pretrain what the pending cells need and run the cells (joblib or Dask), recording
    each finished cell of a matbench task as it arrives."""

    feature_files: dict[tuple[int, str], list[str]] = {}
    for _ref, task, method, _ in pending:
        key = (id(task), method.name)
        if key not in feature_files:
            feature_files[key] = (
                [] if method.featurizer is None else [_features(out, task, method.featurizer)]
            )

    stack, jobs = _parallel_context(n_jobs, backend, scheduler_address)
    levels = current_log_levels()
    with stack:
        pre_jobs, pre_paths, pre_artefacts = [], {}, set()
        for ref, task, method, cell in pending:
            if method.pretrain_key is None:
                continue
            artefact, manifest = pretrain_paths(
                out, task, cell.fold, method.pretrain_key, method.pretrain_label_free
            )
            key = (id(task), cell.fold, method.pretrain_key)
            if key in pre_paths:
                continue
            pre_paths[key] = (artefact, manifest)
            if artefact in pre_artefacts:  # a label-free artefact another target already needs
                continue
            pre_artefacts.add(artefact)
            if manifest.exists():
                _check_same_settings(manifest, method, max_train_structures, cell=False)
            else:
                pre_jobs.append(
                    joblib.delayed(run_pretrain)(
                        ref,
                        method,
                        cell.fold,
                        max_train_structures,
                        str(artefact),
                        str(manifest),
                        *runs.child_args(task),
                        log_levels=levels,
                    )
                )
        tasks_by_key = {_task_key(t): t for _, t, _, _ in pending}

        def cell_job(ref: TaskRef | Task, task: Task, method: Method, cell: Cell) -> Any:
            pretrained, n_pretrain = None, 0
            if method.pretrain_key is not None:
                artefact, manifest = pre_paths[(id(task), cell.fold, method.pretrain_key)]
                pretrained = str(artefact)
                n_pretrain = int(json.loads(manifest.read_text())["n_pretrain"])
            return joblib.delayed(run_cell)(
                ref,
                method,
                cell,
                str(out),
                pretrained,
                n_pretrain,
                max_train_structures,
                feature_files[(id(task), method.name)],
                *runs.child_args(task),
                log_levels=levels,
            )

        def collect(output: Any) -> None:
            if not isinstance(output, CellOutput):  # a pretraining's manifest
                summary.n_pretrained += 1
                return
            summary.n_run += 1
            task = tasks_by_key[(output.cell.task, output.cell.target)]
            if recorder is not None and task.is_matbench:
                predictions = pd.Series(output.predictions, index=output.test_ids)
                std = None if output.std is None else pd.Series(output.std, index=output.test_ids)
                subset = draw_subset(
                    task.train_ids(output.cell.fold),
                    output.cell.n,
                    output.cell.fold,
                    output.cell.seed,
                )
                summary.n_recorded += recorder.record(
                    task, output.cell, output.result, predictions, subset, std
                )

        # Phase 1: the pretrainings, with the cells that need none beside them (baselines,
        # random init keep the other workers busy during a long pretraining). Phase 2: the
        # cells that start from a pretrained artefact.
        free = [cell_job(*p) for p in pending if p[2].pretrain_key is None]
        parallel = joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")
        if pre_jobs or free:
            for output in parallel([*pre_jobs, *free]):
                collect(output)
        dependent = [cell_job(*p) for p in pending if p[2].pretrain_key is not None]
        if dependent:
            for output in parallel(dependent):
                collect(output)


def _check_same_settings(
    path: Path, method: Method, max_train_structures: int | None, *, cell: bool
) -> None:
    """Refuse to resume from a saved cell (``cell=True``) or pretraining manifest made with
    another pretraining cap or other method parameters."""
    saved = json.loads(path.read_text(encoding="utf-8"))
    params = saved.get("params", {})
    saved_method = params.get("method") if cell else params
    mine = method.get_params() if cell else method.pretrain_params()
    mine = json.loads(json.dumps(mine, default=str))
    problems = []
    if saved.get("max_train_structures") != max_train_structures:
        problems.append(
            f"max_train_structures {saved.get('max_train_structures')} vs {max_train_structures}"
        )
    if saved_method != mine:
        problems.append(f"method parameters {saved_method} vs {mine}")
    if problems:
        raise ValueError(
            f"{path} was made with other settings ({'; '.join(problems)}); "
            "use another output folder, or delete it to recompute"
        )


def _record_saved(recorder: rec.MatbenchRecorder, task: Task, cell: Cell, json_path: Path) -> bool:
    """Record a cell whose JSON exists but whose matbench record was lost (interrupted run)."""
    result = res.read_cell(json_path)
    preds = res.load_predictions(json_path)
    predictions = pd.Series(preds["y_pred"].to_numpy(float), index=preds["id"].tolist())
    std = None
    if "y_std" in preds:
        std = pd.Series(preds["y_std"].to_numpy(float), index=preds["id"].tolist())
    subset = draw_subset(task.train_ids(cell.fold), cell.n, cell.fold, cell.seed)
    return recorder.record(task, cell, result, predictions, subset, std)
