"""Pruning: Optuna pruners by name, and a training callback that reports to a trial.

:class:`OptunaPruningCallback` is a :class:`matbench_dim.training.callbacks.Callback`, so the
estimator's training loops report per-epoch validation losses to Optuna without importing it.
"""

from __future__ import annotations

import math
from typing import Any

import optuna

from matbench_dim.training.callbacks import Callback, TrainingState

__all__ = ["OptunaPruningCallback", "make_pruner"]


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
