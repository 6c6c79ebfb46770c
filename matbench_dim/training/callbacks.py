"""The callback protocol of the training loops, and the callbacks that need no outside library.

Tracking (MLflow), pruning (Optuna) and anything else that talks to the outside world are
callbacks defined at the edge (``matbench_dim.tracking.tracker``, ``matbench_dim.tuning``); the loops in ``training.py``
only call the hooks below.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

STAGES = ("pretrain", "finetune")


class StopTraining(Exception):
    """Raised by a callback to end the current stage early (the best state so far is kept)."""


@dataclass
class TrainingState:
    """What a callback may look at (and, for checkpointing, save).

    Attributes
    ----------
    stage
        ``"pretrain"`` or ``"finetune"``.
    model
        The ``torch.nn.Module`` being trained.
    optimizers
        The optimisers of the stage, by name.
    epoch
        Index of the last finished epoch (-1 before the first).
    history
        One dict of floats per finished epoch.
    extra
        Stage-specific information (e.g. ``n_train``, ``n_val``, the run's seed).
    """

    stage: str
    model: Any
    optimizers: dict[str, Any]
    epoch: int = -1
    history: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class: every hook is a no-op. Subclass and override what you need."""

    def on_train_begin(self, stage: str, state: TrainingState) -> None:
        """Called once before the first epoch of a stage."""

    def on_epoch_end(
        self, stage: str, epoch: int, logs: dict[str, float], state: TrainingState
    ) -> None:
        """Called after each epoch with that epoch's metrics (flat dict of floats)."""

    def on_train_end(self, stage: str, state: TrainingState) -> None:
        """Called once after the last epoch of a stage, also when it stopped early."""

    def on_exception(self, stage: str, state: TrainingState, exc: BaseException) -> None:
        """Called when the stage ends with an exception (interrupt, pruning, error)."""


class EarlyStopping(Callback):
    """Stop a stage when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs
    (or optimizer steps).

    Parameters
    ----------
    monitor
        Key of the epoch logs to watch (lower is better).
    patience
        Epochs without improvement before stopping.
    min_delta
        Smallest decrease that counts as an improvement.
    stage
        Only act on this stage (``None``: both).
    min_steps
        Never stop before the logs' ``steps`` (optimizer steps so far) reach this.
    unit
        ``"epochs"`` or ``"steps"``: what ``patience`` counts (steps from the logs' ``steps``).
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        patience: int = 20,
        min_delta: float = 0.0,
        stage: str | None = "finetune",
        min_steps: int = 0,
        unit: str = "epochs",
    ) -> None:
        if unit not in ("epochs", "steps"):
            raise ValueError(f"EarlyStopping unit must be 'epochs' or 'steps', got {unit!r}")
        self.monitor = monitor
        self.patience = patience
        self.min_delta = min_delta
        self.stage = stage
        self.min_steps = min_steps
        self.unit = unit
        self.best_: float = math.inf
        self.wait_: float = 0
        self.best_steps_: float = 0.0

    def on_train_begin(self, stage: str, state: TrainingState) -> None:
        self.best_, self.wait_, self.best_steps_ = math.inf, 0, 0.0

    def on_epoch_end(
        self, stage: str, epoch: int, logs: dict[str, float], state: TrainingState
    ) -> None:
        if self.stage is not None and stage != self.stage:
            return
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        steps = logs.get("steps", math.inf)
        if value < self.best_ - self.min_delta:
            self.best_, self.wait_, self.best_steps_ = value, 0, steps
            return
        self.wait_ = self.wait_ + 1 if self.unit == "epochs" else steps - self.best_steps_
        if self.wait_ >= self.patience and steps >= self.min_steps:
            logger.info(
                "early stopping %s at epoch %d (%s=%.4g)", stage, epoch, self.monitor, value
            )
            raise StopTraining


def call_hook(callbacks: list[Callback], hook: str, *args: Any) -> None:
    """Call ``hook`` on every callback in order."""
    for cb in callbacks:
        getattr(cb, hook)(*args)
