"""The label-masking benchmark: a grid of (task, fold, method, n, seed) cells.

For each task and selected fold:

1. the fold's training structures (plus the task's unlabelled pool, never tested; capped
   by ``max_train_structures`` through a seeded draw) are offered to label-free pretraining,
   once per fold and per pretraining family (``Method.pretrain_key``);
2. for each labelled-subset size ``n`` and seed, :func:`draw_subset` takes the first ``n``
   ids of a ``numpy.random.default_rng(1000 * fold + seed)`` permutation of the fold's
   training ids (so subsets are nested in ``n``), the method is fitted on them and predicts
   the fold's whole test set;
3. the cell is saved (:mod:`matbench_dim.results`) and, for matbench tasks, recorded in its
   own ``MatbenchBenchmark`` file per (method, n, seed) (:mod:`matbench_dim.matbench_io`).

No test id may reach pretraining or fitting: :func:`check_disjoint` raises
:class:`LeakageError` before each pretraining and each fit. Early stopping and model
selection happen inside a method's ``fit`` on the ids it is given, so they never see test ids.

Cells are independent; they run through joblib (``n_jobs`` local processes) or, with
``backend="dask"``, on a Dask cluster through joblib's dask backend. Finished cells (their
JSON exists) are skipped, so a re-run resumes an interrupted grid.

Methods plug in through the small :class:`Method` interface (``build`` an unfitted
estimator with ``fit(X, y)`` / ``predict(X)``; optionally ``pretrain`` once per fold).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd

from matbench_dim import results as res
from matbench_dim.data import Task, format_ids, load_task

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_N_LABELS",
    "DEFAULT_SEEDS",
    "METHOD_NAMES",
    "Cell",
    "EstimatorMethod",
    "GridSummary",
    "LeakageError",
    "Method",
    "SiteNetMethod",
    "TaskRef",
    "baseline_method",
    "check_disjoint",
    "draw_subset",
    "make_method",
    "matbench_path",
    "pretraining_pool",
    "run_grid",
]

DEFAULT_N_LABELS: tuple[int, ...] = (50, 100, 250, 500, 1000)
DEFAULT_SEEDS: tuple[int, ...] = (0, 1, 2, 3, 4)
POOL_SEED_OFFSET = 1_000_003
"""The pretraining pool cap of fold ``k`` draws with ``default_rng(POOL_SEED_OFFSET + k)``."""


class LeakageError(AssertionError):
    """A test-fold id reached pretraining or fitting."""


# --------------------------------------------------------------------------- subsets


def check_disjoint(used: Sequence[Any], test: Sequence[Any], *, stage: str, where: str) -> None:
    """Raise :class:`LeakageError` when ``used`` and ``test`` ids share any element.

    Parameters
    ----------
    used
        Ids about to be used for ``stage`` (pretraining pool, labelled subset).
    test
        The fold's test ids.
    stage, where
        Named in the message (e.g. ``"pretraining"``, ``"task flla fold 2"``).
    """
    both = set(map(str, used)) & set(map(str, test))
    if both:
        raise LeakageError(
            f"{where}: {len(both)} test ids would reach {stage}: {format_ids(sorted(both))}"
        )


def draw_subset(train_ids: Sequence[Any], n: int, fold: int, seed: int) -> np.ndarray:
    """The labelled subset of a cell: the first ``n`` of a seeded permutation of ``train_ids``.

    The permutation is ``default_rng(1000 * fold + seed).permutation(len(train_ids))``, so
    for one (fold, seed) the subsets are nested: the ``n=100`` subset starts with the ``n=50``
    one. Returns an object array of ``n`` ids.

    Raises
    ------
    ValueError
        When ``n`` exceeds the number of labelled training entries, or is not positive.
    """
    train = np.asarray(list(train_ids), dtype=object)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > len(train):
        raise ValueError(
            f"n={n} labelled entries requested but fold {fold} has only {len(train)} "
            "labelled training entries; choose n <= that"
        )
    order = np.random.default_rng(1000 * int(fold) + int(seed)).permutation(len(train))
    return train[order[: int(n)]]


def pretraining_pool(
    pool_ids: Sequence[Any], max_train_structures: int | None, fold: int
) -> np.ndarray:
    """Ids offered to pretraining: all of ``pool_ids``, or a seeded draw of at most
    ``max_train_structures`` of them (``default_rng(POOL_SEED_OFFSET + fold)``), in pool order."""
    pool = np.asarray(list(pool_ids), dtype=object)
    if max_train_structures is None or max_train_structures >= len(pool):
        return pool
    if max_train_structures < 1:
        raise ValueError(f"max_train_structures must be >= 1, got {max_train_structures}")
    rng = np.random.default_rng(POOL_SEED_OFFSET + int(fold))
    keep = np.sort(rng.choice(len(pool), size=int(max_train_structures), replace=False))
    return pool[keep]


# --------------------------------------------------------------------------- methods


class Method:
    """How the grid runs one method. Subclass and override :meth:`build` (and, for methods
    with label-free or supervised pretraining, :meth:`pretrain` and ``pretrain_key``).

    Attributes
    ----------
    name
        Method name used in paths and tables (``rf_magpie``, ``dim``, ...).
    mode
        ``"baseline"``, ``"transfer"`` (fine-tune a network) or ``"representation"``
        (a regressor on frozen vectors).
    pretrain_key
        ``None`` for methods without pretraining. Methods with the same key share one
        pretrained artefact per (task, fold) (``dim`` and ``dim_rf``).
    featurizer
        Name of a :class:`matbench_dim.baselines.FeatureCache` featurizer the method uses;
        the grid computes it once per task entry and shares it with the workers.
    """

    name: str = ""
    mode: str = "baseline"
    pretrain_key: str | None = None
    featurizer: str | None = None

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        """An unfitted estimator with ``fit(X, y)`` and ``predict(X) -> (n,)``.

        ``X`` is a ``pd.Series`` of structures indexed by id; ``pretrained`` is the artefact
        written by :meth:`pretrain` for this fold (``None`` without pretraining).
        """
        raise NotImplementedError

    def pretrain(self, X: pd.Series, path: Path, random_state: int, task: Task, fold: int) -> None:
        """Pretrain on the structures ``X`` (no labels of the task's target) and save to ``path``."""
        raise NotImplementedError(f"method {self.name!r} has no pretraining")

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters to record (JSON-serialisable)."""
        return {}

    def pretrain_params(self) -> dict[str, Any]:
        """The parameters that shape the pretrained artefact (the same for every method
        sharing ``pretrain_key``); recorded in its manifest."""
        return self.get_params()

    def for_run(self, out: Path) -> Method:
        """The method as used by a grid writing to ``out`` (e.g. with a cache folder there)."""
        return self


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


def _resolve_task(ref: TaskRef | Task) -> Task:
    return ref if isinstance(ref, Task) else _load_cached(ref)


def _data_sha256(task: Task) -> str:
    sha = task.provenance.get("sha256")
    if sha:
        return str(sha)
    h = hashlib.sha256()
    h.update(res.ids_sha256(task.ids).encode())
    if task.targets is not None:
        h.update(np.asarray(task.targets, dtype=np.float64).tobytes())
    for train, test in task.folds:
        h.update(res.ids_sha256(train).encode())
        h.update(res.ids_sha256(test).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- cells


@dataclass(frozen=True)
class Cell:
    """One grid cell."""

    task: str
    target: str
    fold: int
    method: str
    n: int
    seed: int

    def paths(self, out: str | Path) -> tuple[Path, Path]:
        """``(json, predictions)`` paths under ``out``."""
        return res.cell_paths(
            out, self.task, self.target, self.method, self.n, self.fold, self.seed
        )


@dataclass
class CellOutput:
    """What a worker sends back: the saved result and the test predictions (for recording)."""

    cell: Cell
    result: res.CellResult
    test_ids: list[str]
    predictions: np.ndarray


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

    def results(self) -> pd.DataFrame:
        """Every cell under ``out`` (see :func:`matbench_dim.results.load_results`)."""
        return res.load_results(self.out)


def _pretrain_paths(out: Path, task: Task, fold: int, key: str) -> tuple[Path, Path]:
    folder = (
        out
        / "pretrained"
        / res.safe_name(task.name)
        / res.safe_name(task.target_name)
        / f"fold{fold}"
    )
    return folder / res.safe_name(key), folder / f"{res.safe_name(key)}.json"


def _run_pretrain(
    task_ref: TaskRef | Task,
    method: Method,
    fold: int,
    max_train_structures: int | None,
    artefact: str,
    manifest_path: str,
) -> dict[str, Any]:
    """Pretrain ``method`` for one fold (worker side); write the artefact, then its manifest
    (whose presence marks the pretraining as done)."""
    task = _resolve_task(task_ref)
    where = f"task {task.name} fold {fold}"
    pool_all = task.unlabelled_structures(fold)
    pool = pretraining_pool(list(pool_all.index), max_train_structures, fold)
    check_disjoint(pool, task.test_ids(fold), stage="pretraining", where=where)
    path = Path(artefact)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
    }
    res.atomic_write_text(manifest_path, json.dumps(manifest, indent=1, default=str))
    logger.info("pretrained %s for %s on %d structures", method.pretrain_key, where, len(pool))
    return manifest


def _run_cell(
    task_ref: TaskRef | Task,
    method: Method,
    cell: Cell,
    out: str,
    pretrained: str | None,
    n_pretrain: int,
    max_train_structures: int | None,
    feature_files: Sequence[str],
) -> CellOutput:
    """Fit one cell on its labelled subset, predict the fold's test set, save (worker side)."""
    from matbench_dim.baselines import get_cache

    task = _resolve_task(task_ref)
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
    t0 = time.perf_counter()
    estimator = method.build(
        random_state=cell.seed, pretrained=None if pretrained is None else Path(pretrained)
    )
    estimator.fit(X_train, y_train.to_numpy(dtype=float))
    predictions = np.asarray(estimator.predict(X_test), dtype=np.float64).ravel()
    wall = time.perf_counter() - t0
    if predictions.shape != (len(test_ids),):
        raise ValueError(
            f"{where}: {predictions.shape} predictions for {len(test_ids)} test entries"
        )
    y_true = task.test_targets(cell.fold).loc[test_ids].to_numpy(dtype=float)
    metrics = res.regression_metrics(y_true, predictions)
    params = {
        "method": method.get_params(),
        "subset_seed": 1000 * cell.fold + cell.seed,
        "pretrained": pretrained,
        "pretrain_random_state": cell.fold if pretrained else None,
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
        data_sha256=_data_sha256(task),
        versions=res.library_versions(),
        **metrics,
    )
    res.write_cell(out, result, list(test_ids), y_true, predictions)
    logger.info("%s: MAE %.4g (%.1f s)", where, result.mae, wall)
    return CellOutput(cell, result, [str(i) for i in test_ids], predictions)


# --------------------------------------------------------------------------- method adapters


def _json_safe(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
        for k, v in sorted(params.items())
    }


class EstimatorMethod(Method):
    """A method that is a scikit-learn-style estimator, cloned and seeded for every cell.

    Parameters
    ----------
    name
        Method name.
    estimator
        Unfitted estimator with ``fit(X, y)`` / ``predict(X)``; its ``random_state`` (when it
        has one) is set to the cell's seed.
    featurizer
        Descriptor the estimator reads from the shared feature cache (``None``: none).
    """

    def __init__(self, name: str, estimator: Any, featurizer: str | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.featurizer = featurizer

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        from sklearn.base import clone

        est = clone(self.estimator)
        if "random_state" in est.get_params():
            est.set_params(random_state=random_state)
        return est

    def get_params(self) -> dict[str, Any]:
        params = _json_safe(self.estimator.get_params())
        if "random_state" in params:
            params["random_state"] = "cell seed"
        return {"estimator": type(self.estimator).__name__, **params}


BASELINE_NAMES = ("dummy_mean", "zero", "median", "rf_magpie", "rf_sine_coulomb")
SITENET_NAMES = ("dim", "random_init", "transfer", "dim_rf", "random_rf")
METHOD_NAMES = BASELINE_NAMES + SITENET_NAMES


def baseline_method(name: str, **params: Any) -> EstimatorMethod:
    """A baseline of :mod:`matbench_dim.baselines` by method name; ``params`` go to the
    estimator (e.g. ``n_estimators=50``)."""
    from matbench_dim import baselines as bl

    factories: dict[str, tuple[Any, str | None]] = {
        "dummy_mean": (bl.DummyMeanRegressor, None),
        "zero": (bl.ConstantRegressor, None),
        "median": (bl.MedianRegressor, None),
        "rf_magpie": (lambda **kw: bl.FeaturizedForest("magpie", **kw), "magpie"),
        "rf_sine_coulomb": (lambda **kw: bl.FeaturizedForest("sine_coulomb", **kw), "sine_coulomb"),
    }
    if name not in factories:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")
    factory, featurizer = factories[name]
    return EstimatorMethod(name, factory(**params), featurizer)


_RUNTIME_KEYS = frozenset({"cache_dir", "n_jobs", "verbose", "callbacks"})
"""Estimator parameters that do not change a pretrained encoder (left out of its key)."""


class SiteNetMethod(Method):
    """Site-Net methods through :mod:`matbench_dim.estimator`.

    ``dim``: DIM-pretrain once per fold on the unlabelled pool, fine-tune on the n labels;
    ``random_init``: fine-tune from random weights; ``transfer``: supervised pretraining on
    ``transfer_target`` (the fold's training entries labelled with it), then fine-tune;
    ``dim_rf`` / ``random_rf``: a random forest (200 trees, seeded) on frozen global vectors of
    the DIM-pretrained / randomly initialised encoder.

    Parameters
    ----------
    name
        One of :data:`SITENET_NAMES`.
    estimator_params
        ``SiteNetDIMRegressor`` / ``DIMEmbedder`` keywords (``pretrain__epochs``, ...).
        Keywords the embedder does not take (``finetune__*``, ``mode``) are not passed to it.
    transfer_target
        Target of the same task used for ``transfer`` pretraining (e.g. ``"gap"``).
    n_estimators
        Trees of the representation forests.
    """

    def __init__(
        self,
        name: str,
        estimator_params: dict[str, Any] | None = None,
        transfer_target: str | None = None,
        n_estimators: int = 200,
    ) -> None:
        if name not in SITENET_NAMES:
            raise ValueError(f"unknown Site-Net method {name!r}; choose from {SITENET_NAMES}")
        if name == "transfer" and not transfer_target:
            raise ValueError(
                "method 'transfer' needs transfer_target (the property to pretrain on)"
            )
        self.name = name
        self.estimator_params = dict(estimator_params or {})
        self.transfer_target = transfer_target
        self.n_estimators = n_estimators
        self.mode = "representation" if name.endswith("_rf") else "transfer"
        self.cache_dir: str | None = None
        semantic = {k: v for k, v in self.estimator_params.items() if k not in _RUNTIME_KEYS}
        digest = hashlib.sha256(
            json.dumps(_json_safe(semantic), sort_keys=True).encode()
        ).hexdigest()[:10]
        if name in ("dim", "dim_rf"):
            self.pretrain_key = f"dim-{digest}"
        elif name == "transfer":
            self.pretrain_key = f"transfer-{res.safe_name(transfer_target or '')}-{digest}"
        else:
            self.pretrain_key = None

    def for_run(self, out: Path) -> SiteNetMethod:
        """A copy whose estimators cache featurized crystals under ``out/cache`` (unless the
        estimator parameters name a ``cache_dir``), so each crystal is featurized once per run."""
        method = copy.copy(self)
        if "cache_dir" not in self.estimator_params:
            method.cache_dir = str(Path(out) / "cache")
        return method

    def _params(self, cls: type, random_state: int, **extra: Any) -> dict[str, Any]:
        accepted = cls().get_params(deep=False)
        kw = {k: v for k, v in self.estimator_params.items() if k in accepted}
        if self.cache_dir is not None:
            kw["cache_dir"] = self.cache_dir
        unknown = set(self.estimator_params) - set(accepted)
        if unknown and cls.__name__ == "SiteNetDIMRegressor":
            raise ValueError(f"{self.name}: unknown estimator parameters {sorted(unknown)}")
        return {**kw, "random_state": random_state, **extra}

    def pretrain(self, X: pd.Series, path: Path, random_state: int, task: Task, fold: int) -> None:
        from matbench_dim.estimator import PretrainedEncoder, SiteNetDIMRegressor

        kw = self._params(SiteNetDIMRegressor, random_state)
        if self.name in ("dim", "dim_rf"):
            SiteNetDIMRegressor(**kw).pretrain(X).save_encoder(path)
            return
        other = load_task(task.name, target=self.transfer_target)
        if other.targets is None:
            raise ValueError(
                f"task {task.name}: no labels for transfer target {self.transfer_target!r}"
            )
        ids = [i for i in X.index if i in other.targets.index]
        check_disjoint(
            ids,
            task.test_ids(fold),
            stage="transfer pretraining",
            where=f"task {task.name} fold {fold}",
        )
        if not ids:
            raise ValueError(
                f"task {task.name} fold {fold}: no pretraining entry has {self.transfer_target!r}"
            )
        est = SiteNetDIMRegressor(**kw).fit(
            X.loc[ids], other.targets.loc[ids].to_numpy(dtype=float)
        )
        info = {"transfer_target": other.target_name, "n_pretrain": len(ids)}
        PretrainedEncoder.from_module(est.model_.encoder, info).save(path)

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.pipeline import Pipeline

        from matbench_dim.estimator import DIMEmbedder, SiteNetDIMRegressor

        if self.pretrain_key is not None and pretrained is None:
            raise ValueError(f"method {self.name!r} needs its pretrained encoder")
        init = None if pretrained is None else str(pretrained)
        if self.mode == "transfer":
            return SiteNetDIMRegressor(
                **self._params(SiteNetDIMRegressor, random_state, encoder_init=init)
            )
        embed_kw = self._params(
            DIMEmbedder, random_state, encoder_init=init, random_init=init is None
        )
        forest = RandomForestRegressor(
            n_estimators=self.n_estimators, random_state=random_state, n_jobs=1
        )
        return Pipeline([("embed", DIMEmbedder(**embed_kw)), ("rf", forest)])

    def pretrain_params(self) -> dict[str, Any]:
        semantic = {k: v for k, v in self.estimator_params.items() if k not in _RUNTIME_KEYS}
        out = {"estimator_params": _json_safe(semantic), "pretrain_key": self.pretrain_key}
        if self.transfer_target:
            out["transfer_target"] = self.transfer_target
        return out

    def get_params(self) -> dict[str, Any]:
        out = {
            "estimator_params": _json_safe(self.estimator_params),
            "pretrain_key": self.pretrain_key,
        }
        if self.transfer_target:
            out["transfer_target"] = self.transfer_target
        if self.mode == "representation":
            out["n_estimators"] = self.n_estimators
        return out


def make_method(name: str | Method, **params: Any) -> Method:
    """A :class:`Method` from its name (:data:`METHOD_NAMES`); a ``Method`` is returned as is.

    ``params`` go to :func:`baseline_method` (estimator keywords) or :class:`SiteNetMethod`
    (``estimator_params``, ``transfer_target``, ``n_estimators``).
    """
    if isinstance(name, Method):
        return name
    if name in BASELINE_NAMES:
        return baseline_method(name, **params)
    if name in SITENET_NAMES:
        return SiteNetMethod(name, **params)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")


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
    """The ``params`` recorded with a fold: subset ids, seed, hyperparameters, provenance."""
    return {
        "method": cell.method,
        "mode": result.mode,
        "n_labels": cell.n,
        "seed": cell.seed,
        "subset_ids": [str(i) for i in subset],
        "subset_sha256": result.subset_sha256,
        "n_pretrain": result.n_pretrain,
        "max_train_structures": -1
        if result.max_train_structures is None
        else result.max_train_structures,
        "hyperparameters": result.params,
        "versions": result.versions,
    }


class _MatbenchRecorder:
    """Records finished cells of matbench tasks, one benchmark file per (method, n, seed).

    Only the process that runs :func:`run_grid` writes these files (workers never do), so
    cells of different folds that share a file cannot race.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self._open: dict[Path, Any] = {}

    def _benchmark(self, task: Task, cell: Cell) -> tuple[Path, Any]:
        from matbench_dim import matbench_io

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

    def record(self, task: Task, cell: Cell, output: CellOutput) -> bool:
        """Record and save unless already recorded; return whether it recorded."""
        from matbench_dim import matbench_io

        path, mb = self._benchmark(task, cell)
        if mb.tasks_map[task.name].is_recorded[cell.fold]:
            return False
        subset = draw_subset(task.train_ids(cell.fold), cell.n, cell.fold, cell.seed)
        predictions = pd.Series(output.predictions, index=output.test_ids)
        params = matbench_params(cell, output.result, subset)
        matbench_io.record(mb, task.name, cell.fold, predictions, params=params)
        matbench_io.save_benchmark(mb, path)
        return True


# --------------------------------------------------------------------------- the grid


def _parallel_context(n_jobs: int, backend: str, scheduler_address: str | None) -> Any:
    import contextlib

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
    from matbench_dim.baselines import get_cache

    cache = get_cache(featurizer)
    path = out / "features" / res.safe_name(task.name) / f"{featurizer}.npz"
    if path.exists():
        cache.update_from(path)
    before = len(cache)
    t0 = time.perf_counter()
    cache.get(task.structures)
    if len(cache) > before or not path.exists():
        cache.save(path)
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
) -> GridSummary:
    """Run (or resume) the label-masking grid; return what was done.

    Parameters
    ----------
    tasks
        Task names for :func:`~matbench_dim.data.load_task` (``"perovskites_subset"``), or
        ``(name, target)`` pairs, or :class:`~matbench_dim.data.Task` objects.
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

    Raises
    ------
    ValueError
        For an unknown method or fold, or an ``n`` larger than a fold's training set
        (checked for every cell before any work starts).
    LeakageError
        When a test id would reach pretraining or fitting.
    """
    t_start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    params = method_params or {}
    method_objs = [
        make_method(m, **params.get(m if isinstance(m, str) else m.name, {})).for_run(out)
        for m in methods
    ]
    names = [m.name for m in method_objs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate method names: {names}")
    summary = GridSummary(out=out)
    recorder = _MatbenchRecorder(out)
    prepared = []
    for task_arg in tasks:
        ref = _as_task_ref(task_arg, data_home)
        task = _resolve_task(ref)
        task_folds = list(range(task.n_folds)) if folds is None else [int(f) for f in folds]
        for fold in task_folds:
            n_train = len(task.train_ids(fold))
            too_big = [n for n in n_labels if n > n_train]
            if too_big:
                raise ValueError(
                    f"task {task.name} fold {fold} has {n_train} labelled training entries; "
                    f"n_labels {too_big} exceed it"
                )
        prepared.append((ref, task, task_folds))

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
    if not pending:
        summary.wall_s = time.perf_counter() - t_start
        return summary

    feature_files: dict[tuple[int, str], list[str]] = {}
    for _ref, task, method, _ in pending:
        key = (id(task), method.name)
        if key not in feature_files:
            feature_files[key] = (
                [] if method.featurizer is None else [_features(out, task, method.featurizer)]
            )

    stack, jobs = _parallel_context(n_jobs, backend, scheduler_address)
    with stack:
        pre_jobs, pre_paths = [], {}
        for ref, task, method, cell in pending:
            if method.pretrain_key is None:
                continue
            artefact, manifest = _pretrain_paths(out, task, cell.fold, method.pretrain_key)
            key = (id(task), cell.fold, method.pretrain_key)
            if key in pre_paths:
                continue
            pre_paths[key] = (artefact, manifest)
            if manifest.exists():
                _check_same_settings(manifest, method, max_train_structures, cell=False)
            else:
                pre_jobs.append(
                    joblib.delayed(_run_pretrain)(
                        ref, method, cell.fold, max_train_structures, str(artefact), str(manifest)
                    )
                )
        if pre_jobs:
            for _ in joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(pre_jobs):
                summary.n_pretrained += 1

        cell_jobs = []
        for ref, task, method, cell in pending:
            pretrained, n_pretrain = None, 0
            if method.pretrain_key is not None:
                artefact, manifest = pre_paths[(id(task), cell.fold, method.pretrain_key)]
                pretrained = str(artefact)
                n_pretrain = int(json.loads(manifest.read_text())["n_pretrain"])
            cell_jobs.append(
                joblib.delayed(_run_cell)(
                    ref,
                    method,
                    cell,
                    str(out),
                    pretrained,
                    n_pretrain,
                    max_train_structures,
                    feature_files[(id(task), method.name)],
                )
            )
        tasks_by_name = {(t.name, t.target_name): t for _, t, _ in prepared}
        for output in joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(cell_jobs):
            summary.n_run += 1
            task = tasks_by_name[(output.cell.task, output.cell.target)]
            if record_matbench and task.is_matbench:
                summary.n_recorded += recorder.record(task, output.cell, output)
    summary.wall_s = time.perf_counter() - t_start
    logger.info(
        "grid done: %d run, %d skipped, %d pretrained, %.1f s",
        summary.n_run,
        summary.n_skipped,
        summary.n_pretrained,
        summary.wall_s,
    )
    return summary


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


def _record_saved(recorder: _MatbenchRecorder, task: Task, cell: Cell, json_path: Path) -> bool:
    """Record a cell whose JSON exists but whose matbench record was lost (interrupted run)."""
    result = res.read_cell(json_path)
    preds = res.load_predictions(json_path)
    output = CellOutput(cell, result, preds["id"].tolist(), preds["y_pred"].to_numpy(float))
    return recorder.record(task, cell, output)
