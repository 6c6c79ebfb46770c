"""What a study will cost and how far it is: the plan before the first trial, then timings.

A trial of the default objective pretrains (once per distinct set of pretraining parameters;
cached) and fine-tunes ``n_splits x n_repeats`` times, so with the estimator's defaults it
runs for minutes without a word. :func:`plan_message` states the work before the study
starts; :class:`TrialTimer` logs each finished trial with its time and an estimate of what is
left (mean time per trial of this worker so far, times the trials still missing). The
objective logs each inner split as it finishes. Everything goes through :mod:`logging`
(logger ``matbench_dim.tuning``): the CLI shows it by default, a library user with
``logging.basicConfig(level=logging.INFO)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from matbench_dim.tuning._common import count_trials

logger = logging.getLogger("matbench_dim.tuning")

__all__ = ["TrialTimer", "format_seconds", "plan_message"]


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"12 min"`` or ``"3.4 h"``."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _default(factory: Callable[..., Any], params: Mapping[str, Any], name: str) -> Any:
    if name in params:
        return params[name]
    try:
        return factory().get_params().get(name)
    except Exception:  # a factory without defaults: say nothing about them
        return None


def plan_message(
    *,
    n_run: int,
    n_labels: int,
    n_splits: int,
    n_repeats: int,
    n_pretrain: int | None,
    tuned: Sequence[str],
    base_params: Mapping[str, Any],
    factory: Callable[..., Any],
) -> str:
    """One paragraph: how many trials, fits, pretrainings and epochs this call will run.

    Parameters
    ----------
    n_run
        Trials this worker will run (the study's missing ones).
    n_labels, n_splits, n_repeats
        The inner cross-validation: ``n_splits x n_repeats`` fine-tunings per trial, each on
        about ``n_labels (n_splits - 1) / n_splits`` labelled crystals.
    n_pretrain
        Structures in the label-free pretraining pool, or ``None`` without pretraining.
    tuned
        Names of the tuned parameters (a trial that changes a pretraining parameter pretrains).
    """
    fits = n_splits * n_repeats
    n_train = round(n_labels * (n_splits - 1) / n_splits)
    ft = _default(factory, base_params, "finetune__epochs")
    lines = [
        f"{n_run} trials to run; each fine-tunes {fits} times (inner splits) on ~{n_train} "
        f"labelled crystals" + (f", up to {ft} epochs each" if ft else "")
    ]
    if n_pretrain is not None:
        pre = _default(factory, base_params, "pretrain__epochs")
        retune = [t for t in tuned if t.startswith(("pretrain__", "dim__", "encoder__"))]
        when = (
            f"again whenever a trial changes {', '.join(sorted(retune)[:3])}"
            + (", ..." if len(retune) > 3 else "")
            if retune
            else "once for the whole study"
        )
        lines.append(
            f"DIM pretraining on {n_pretrain} structures"
            + (f" ({pre} epochs)" if pre else "")
            + f": {when} (cached)"
        )
    lines.append("time per trial is reported after the first one")
    return "; ".join(lines)


class TrialTimer:
    """Optuna callback: log each finished trial with its time and the estimated time left.

    Parameters
    ----------
    n_trials, count_states
        The study's target, counted as :func:`tune` counts it.
    clock
        Seconds since an arbitrary origin (``time.perf_counter``); replaceable in tests.
    """

    def __init__(
        self,
        n_trials: int,
        count_states: Sequence[TrialState] = (TrialState.COMPLETE, TrialState.PRUNED),
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.n_trials, self.count_states, self.clock = n_trials, tuple(count_states), clock
        self.t0 = clock()
        self.finished = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.finished += 1
        elapsed = self.clock() - self.t0
        per_trial = elapsed / self.finished
        left = max(self.n_trials - count_trials(study, self.count_states), 0)
        seconds = trial.user_attrs.get("seconds")
        took = format_seconds(seconds) if seconds is not None else "?"
        # a pruned trial's value is its last intermediate report, not the objective: omit it
        complete = trial.state == TrialState.COMPLETE and trial.value is not None
        value = f", value {trial.value:.4g}" if complete else ""
        msg = f"trial {trial.number} {trial.state.name.lower()} in {took}{value}"
        if left:
            msg += (
                f"; {left} left, about {format_seconds(left * per_trial)} more "
                f"(at {format_seconds(per_trial)} per trial so far)"
            )
        logger.info(msg)
