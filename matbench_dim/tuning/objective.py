"""The tuning objective: mean inner cross-validation MAE inside one training fold.

Labelled subsets of ``n`` crystals are drawn from the fold's *training* data only
(:func:`inner_splits`), and each is split K-fold; a trial's value is the mean MAE over the
inner validation parts. Pretraining is shared across trials through
:class:`~matbench_dim.tuning.encoder_cache.EncoderCache`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna

from matbench_dim.tuning._common import accepts, default_factory, jsonable
from matbench_dim.tuning.encoder_cache import EncoderCache
from matbench_dim.tuning.pruning import OptunaPruningCallback
from matbench_dim.tuning.spaces import SearchSpace

logger = logging.getLogger(__name__)

__all__ = ["InnerCVObjective", "InnerSplit", "inner_splits"]

_SUBSET_SALT = 0x7E57  # keeps tuning subsets apart from the protocol's seeded subsets


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
        self.factory = factory if factory is not None else default_factory()
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
        unknown = [n for n in [*space.names, *self.base_params] if not accepts(self.factory, n)]
        if unknown:
            raise ValueError(
                f"{getattr(self.factory, '__name__', self.factory)} has no parameters {unknown} "
                f"(search spaces: {', '.join(space.sources) or '-'})"
            )
        self.epoch_callbacks = accepts(self.factory, "callbacks")
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
            params=jsonable(params),
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
                trial.set_user_attr("estimator_params", jsonable(params | {"encoder_init": None}))
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
        label = f"trial {trial.number}" if trial is not None else "evaluation"
        for k, split in enumerate(self.splits):
            t0 = time.perf_counter()
            kwargs = dict(params)
            if self.epoch_callbacks:
                cbs = list(kwargs.get("callbacks") or [])
                if trial is not None:
                    offset = k * self.step_stride
                    cbs.append(OptunaPruningCallback(trial, self.monitor, step_offset=offset))
                if run is not None:
                    cbs.append(run.callback(prefix=f"split{k}/"))
                kwargs["callbacks"] = cbs
            if self.X_pretrain is None and accepts(self.factory, "random_init"):
                kwargs.setdefault("random_init", True)  # pretraining disabled: random weights
            est = self.factory(**kwargs)
            est.fit(_take(self.X, split.train), self.y[split.train])
            pred = np.asarray(est.predict(_take(self.X, split.val)), dtype=float).ravel()
            if not np.isfinite(pred).all():
                raise FloatingPointError(f"inner split {k}: non-finite predictions")
            maes.append(float(np.mean(np.abs(pred - self.y[split.val]))))
            curves.append(getattr(est, "history_", None))
            logger.info(
                "%s: inner split %d/%d, validation MAE %.4g (%.0f s)",
                label, k + 1, len(self.splits), maes[-1], time.perf_counter() - t0,
            )  # fmt: skip
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
