"""What the label-masking grid keeps besides its cell files: matbench files and MLflow runs.

- **matbench**: finished cells of matbench tasks go into one ``MatbenchBenchmark`` file per
  (task, method, n, seed) (:func:`matbench_path`), through :mod:`matbench_dim.bench.matbench_io`;
  only the process running the grid writes them (:class:`MatbenchRecorder`).
- **MLflow** (:mod:`matbench_dim.tracking.tracker`): one parent run per (task, grid invocation) in the
  task's experiment (:func:`matbench_dim.tracking.tracker.task_experiment`), with the grid settings,
  the data provenance and, at the end, the matbench files, the cell table and the learning
  curve as artifacts (:class:`GridRuns`, :func:`log_grid_artifacts`); one child run per pretraining
  (:func:`pretrain_run_tags`) and per cell (:func:`cell_run_tags`), with the estimator's
  flattened parameters, the data provenance and the subset ids
  (:func:`log_cell_inputs`), per-epoch metrics through the runs' ``MLflowCallback`` and the
  final test MAE / RMSE / max error.

Child runs are opened in the workers with the explicit-run-id API (a ``Tracker`` pickles to
its URI and experiment id); a crashed cell ends its run FAILED, and the parent then ends
FAILED too.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from matbench_dim.bench import results as res
from matbench_dim.data.task import Task
from matbench_dim.tracking.tracker import NullTracker, Tracker, setup_tracking, task_experiment

if TYPE_CHECKING:
    from matbench_dim.bench.results import Cell
    from matbench_dim.tracking.runs import TrackedRun

logger = logging.getLogger(__name__)

__all__ = [
    "GridRuns",
    "MatbenchRecorder",
    "cell_run_name",
    "cell_run_tags",
    "data_provenance",
    "grid_run_tags",
    "log_cell_inputs",
    "log_grid_artifacts",
    "matbench_params",
    "matbench_path",
    "pretrain_run_tags",
]


# --------------------------------------------------------------------------- matbench files


def matbench_path(out: str | Path, task: str, method: str, n: int, seed: int) -> Path:
    """The ``MatbenchBenchmark`` results file of one (task, method, n, seed) under ``out``.

    Plain JSON (what ``MatbenchBenchmark.from_file`` reads), written atomically.
    """
    return (
        Path(out)
        / "matbench"
        / res.safe_name(task)
        / res.safe_name(method)
        / f"n{n}_seed{seed}.json"
    )


def matbench_params(cell: Cell, result: res.CellResult, subset: Sequence[str]) -> dict[str, Any]:
    """The ``params`` recorded with a fold: subset ids, seed, hyperparameters, provenance
    (subset and data sha256, library versions)."""
    return {
        "method": cell.method,
        "mode": result.mode,
        "n_labels": cell.n,
        "seed": cell.seed,
        "subset_ids": [str(i) for i in subset],
        "subset_sha256": result.subset_sha256,
        "data_sha256": result.data_sha256,
        "n_pretrain": result.n_pretrain,
        "max_train_structures": -1
        if result.max_train_structures is None
        else result.max_train_structures,
        "hyperparameters": result.params,
        "versions": result.versions,
    }


class MatbenchRecorder:
    """Records finished cells of matbench tasks, one benchmark file per (method, n, seed).

    Only the process that runs the grid writes these files (workers never do), so cells of
    different folds that share a file cannot race.
    """

    def __init__(self, out: Path) -> None:
        self.out = Path(out)
        self._open: dict[Path, Any] = {}

    def _benchmark(self, task: Task, cell: Cell) -> tuple[Path, Any]:
        from matbench_dim.bench import matbench_io

        path = matbench_path(self.out, task.name, cell.method, cell.n, cell.seed)
        if path not in self._open:
            self._open[path] = (
                matbench_io.load_benchmark(path, task)
                if path.exists()
                else matbench_io.new_benchmark(task)
            )
        return path, self._open[path]

    def is_recorded(self, task: Task, cell: Cell) -> bool:
        """Whether the cell's fold is already in its benchmark file."""
        _, mb = self._benchmark(task, cell)
        return bool(mb.tasks_map[task.name].is_recorded[cell.fold])

    def record(
        self,
        task: Task,
        cell: Cell,
        result: res.CellResult,
        predictions: pd.Series,
        subset: Sequence[Any],
        std: pd.Series | None = None,
    ) -> bool:
        """Record the cell's test ``predictions`` (indexed by test id) and save the file,
        unless the fold is already recorded; return whether it recorded."""
        from matbench_dim.bench import matbench_io

        path, mb = self._benchmark(task, cell)
        if mb.tasks_map[task.name].is_recorded[cell.fold]:
            return False
        params = matbench_params(cell, result, [str(i) for i in subset])
        matbench_io.record(mb, task.name, cell.fold, predictions, params=params, std=std)
        matbench_io.save_benchmark(mb, path)
        return True


# --------------------------------------------------------------------------- MLflow runs


def data_provenance(task: Task, data_sha256: str) -> dict[str, Any]:
    """Provenance params of a task (``data.*`` once logged): file name, its sha256, target."""
    path = task.provenance.get("path")
    return {
        "file": Path(str(path)).name if path else None,
        "sha256": data_sha256,
        "target": task.target_name,
        "source": task.source,
        "fold_strategy": task.provenance.get("fold_strategy"),
    }


def grid_run_tags(task: Task, methods: Sequence[str]) -> dict[str, str]:
    """Tags of a grid's parent run."""
    return {
        "kind": "grid",
        "task": task.name,
        "target": task.target_name,
        "methods": ",".join(methods),
    }


def cell_run_name(cell: Cell) -> str:
    """``<method> fold<k> n<n> seed<s>``."""
    return f"{cell.method} fold{cell.fold} n{cell.n} seed{cell.seed}"


def cell_run_tags(cell: Cell, mode: str) -> dict[str, Any]:
    """Tags of a cell's run: the standard ``method`` and ``mode``, and where it sits."""
    return {
        "kind": "cell",
        "method": cell.method,
        "mode": mode,
        "task": cell.task,
        "target": cell.target,
        "fold": cell.fold,
        "n": cell.n,
        "seed": cell.seed,
    }


def pretrain_run_tags(task: Task, fold: int, method: str, key: str | None) -> dict[str, Any]:
    """Tags of a pretraining run (one per (task, fold, pretraining family))."""
    return {
        "kind": "pretrain",
        "method": method,
        "mode": "pretrain",
        "pretrain_key": key,
        "task": task.name,
        "target": task.target_name,
        "fold": fold,
    }


def log_cell_inputs(
    run: TrackedRun,
    task: Task,
    cell: Cell,
    estimator: Any,
    method_params: Mapping[str, Any],
    subset: Sequence[Any],
    test_ids: Sequence[Any],
    data_sha256: str,
) -> None:
    """Log what a cell is fitted from: the estimator's parameters (flattened, when it has
    ``get_params``), the method's recorded parameters (``method.*``), and the data
    provenance (``data.*``) with the subset and test ids as ``data/subset_ids.json``."""
    if not run.enabled:
        return
    if hasattr(estimator, "get_params"):
        run.log_estimator_params(estimator)
    run.log_params(method_params, prefix="method.")
    run.log_provenance(
        task.name,
        fold=cell.fold,
        n=cell.n,
        seed=cell.seed,
        subset_ids={"train": [str(i) for i in subset], "test": [str(i) for i in test_ids]},
        **data_provenance(task, data_sha256),
    )


def log_grid_artifacts(
    run: TrackedRun, out: Path, task: Task, results: pd.DataFrame | None = None
) -> None:
    """At the end of a grid, attach to its parent run the task's matbench results files
    (``matbench/``), its cell table (``results/cells.csv``) and its learning curve
    (``figures/learning_curve.png``), from ``results`` (default: every cell under ``out``).
    A failure here is logged, not raised: the cells are already saved."""
    if not run.enabled:
        return
    from matbench_dim.bench.report import plot_learning_curve

    try:
        folder = out / "matbench" / res.safe_name(task.name)
        if folder.is_dir():
            run.log_dir(folder, "matbench")
        table = res.load_results(out) if results is None else results
        if table.empty:
            return
        table = table[(table["task"] == task.name) & (table["target"] == task.target_name)]
        if table.empty:
            return
        with tempfile.TemporaryDirectory(prefix="matbench_dim_grid_") as tmp:
            csv = Path(tmp) / "cells.csv"
            table.drop(columns=["params", "versions"], errors="ignore").to_csv(csv, index=False)
            run.log_file(csv, "results")
            png = plot_learning_curve(
                table,
                task.name,
                task.target_name,
                Path(tmp) / "learning_curve.png",
                task.unit or "",
            )
            run.log_file(png, "figures")
    except Exception:
        logger.exception("could not log the grid artifacts of %s to MLflow", task.name)


class GridRuns:
    """The MLflow parent runs of one grid invocation: one per task with cells to run.

    Each run is entered on ``stack`` when opened, so it ends FINISHED when the grid
    completes and FAILED (a cell crashed) or KILLED (Ctrl-C, SIGTERM) otherwise.

    Parameters
    ----------
    stack
        Owns the runs' context managers.
    tracking_uri, tracking
        Store and switch (``tracking=False``: :class:`~matbench_dim.tracking.tracker.NullTracker`).
    methods, settings
        Method names (a tag) and grid settings (params ``grid.*``) of every parent run.
    """

    def __init__(
        self,
        stack: contextlib.ExitStack,
        tracking_uri: str | None,
        tracking: bool,
        methods: Sequence[str],
        settings: Mapping[str, Any],
    ) -> None:
        self.stack = stack
        self.tracking_uri = tracking_uri
        self.tracking = tracking
        self.methods = list(methods)
        self.settings = dict(settings)
        self._runs: dict[tuple[str, str], tuple[TrackedRun, Tracker | NullTracker, Task]] = {}
        self._cells: dict[tuple[str, str], int] = {}

    def open(self, task: Task, data_sha256: str) -> None:
        """Open the parent run of ``task`` (once) in its experiment, with the grid settings
        and the data provenance; count one more cell to run for it."""
        key = (task.name, task.target_name)
        self._cells[key] = self._cells.get(key, 0) + 1
        if key in self._runs:
            return
        tracker = setup_tracking(
            self.tracking_uri, task_experiment(task.name), enabled=self.tracking
        )
        run = self.stack.enter_context(
            tracker.start_parent_run(
                f"grid {task.name} {task.target_name}",
                tags=grid_run_tags(task, self.methods),
                params={"grid": self.settings},
            )
        )
        if run.enabled:
            run.log_provenance(
                task.name, n_folds=task.n_folds, **data_provenance(task, data_sha256)
            )
        self._runs[key] = (run, tracker, task)

    def child_args(self, task: Task) -> tuple[Tracker | NullTracker, str | None]:
        """``(tracker, parent run id)`` for a worker's child run of a cell of ``task``."""
        run, tracker, _ = self._runs[(task.name, task.target_name)]
        return tracker, run.run_id

    def finish(self, out: Path) -> dict[str, str]:
        """Log each parent's cell count and artifacts (:func:`log_grid_artifacts`); return
        ``{"<task>/<target>": parent run id}`` of the tracked tasks."""
        ids = {}
        tracked = [run for run, _, _ in self._runs.values() if run.enabled]
        results = res.load_results(out) if tracked else None
        for key, (run, _, task) in self._runs.items():
            run.log_metrics({"grid/n_cells_run": float(self._cells[key])})
            log_grid_artifacts(run, out, task, results)
            if run.run_id is not None:
                ids[f"{task.name}/{task.target_name}"] = run.run_id
        return ids
