"""Running a study: :func:`tune` creates or resumes the study of one task, n and fold.

It loads the fold's training data (never the test targets), the search space and the
storage, enqueues the seed defaults in a new study, runs the missing trials of
:class:`~matbench_dim.tuning.objective.InnerCVObjective` (optionally under an MLflow parent
run) and exports the best parameters.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from optuna.storages import BaseStorage
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial, TrialState

from matbench_dim.tuning._common import (
    HOST,
    accepts,
    count_trials,
    default_factory,
    jsonable,
    slug,
)
from matbench_dim.tuning.encoder_cache import DEFAULT_CACHE_DIR, EncoderCache
from matbench_dim.tuning.export import export_best, study_name_for
from matbench_dim.tuning.objective import InnerCVObjective
from matbench_dim.tuning.progress import TrialTimer, plan_message
from matbench_dim.tuning.pruning import make_pruner
from matbench_dim.tuning.spaces import DEFAULT_SPACES, SearchSpace, load_spaces
from matbench_dim.tuning.storage import resolve_storage

logger = logging.getLogger(__name__)

__all__ = ["tune"]


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
    """``(tracker, parent run)`` from :mod:`matbench_dim.tracking.tracker`, or ``(None, None)``."""
    if not enabled:
        yield None, None
        return
    try:
        from matbench_dim.tracking.tracker import setup_tracking

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
        A :class:`matbench_dim.data.task.Task` or a name for :func:`matbench_dim.data.sources.load_task`.
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
        from matbench_dim.data.sources import load_task

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
    done = count_trials(study, count_states)
    if done >= n_trials:
        logger.info("study %s already holds %d/%d trials", name, done, n_trials)
    else:
        factory = factory if factory is not None else default_factory()
        base = dict(base_params or {})
        if accepts(factory, "random_state"):
            base.setdefault("random_state", seed)
        root = Path(cache_dir or DEFAULT_CACHE_DIR)
        if accepts(factory, "cache_dir"):  # the featurization cache, shared by all trials
            base.setdefault("cache_dir", str(root / "features"))
        objective = InnerCVObjective(
            X, y, space, n_labels, n_splits=n_splits, n_repeats=n_repeats, seed=seed,
            base_params=base, factory=factory, X_pretrain=X_pre if pretrain else None,
            pretrain_ids=pre_ids, cache=EncoderCache(root / "encoders"),
        )  # fmt: skip
        tags = {k: str(v) for k, v in attrs.items()} | {"optuna.study": name, "worker": worker}
        experiment = f"tune/{slug(task.name)}"
        params = {
            **settings,
            "n_trials": n_trials,
            "spaces": list(space.sources),
            **jsonable(base),
        }
        with _tracking_parent(tracking, tracking_uri, experiment, name, tags, params) as (
            tracker,
            parent,
        ):
            if parent is not None:
                study.set_user_attr(f"mlflow_parent_run_id.w{worker}", parent.run_id)
                objective.tracker, objective.parent_run_id = tracker, parent.run_id
            logger.info("study %s: %d/%d trials; worker %d starts", name, done, n_trials, worker)
            logger.info(
                plan_message(
                    n_run=n_trials - done, n_labels=n_labels, n_splits=n_splits,
                    n_repeats=n_repeats, n_pretrain=len(X_pre) if pretrain else None,
                    tuned=space.names, base_params=base, factory=factory,
                )
            )  # fmt: skip
            guard = _FailureGuard(max_failures)
            timer = TrialTimer(n_trials, count_states)
            study.optimize(
                _with_trial_attrs(
                    objective, {**attrs, "mlflow_parent_run_id": objective.parent_run_id}
                ),
                timeout=timeout,
                callbacks=[MaxTrialsCallback(n_trials, states=tuple(count_states)), guard, timer],
                catch=(RuntimeError, ValueError, ArithmeticError),
                gc_after_trial=True,
            )
        if guard.streak >= max_failures:
            raise RuntimeError(f"{guard.streak} consecutive failed trials in {name}; {guard.last}")
    if export and count_trials(study, (TrialState.COMPLETE,)):
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
        for key, value in {**attrs, "worker": f"{HOST}:{os.getpid()}"}.items():
            trial.set_user_attr(key, value)
        return objective(trial)

    return run
