"""Study names and the exported best parameters (``tuning/best/<task>_n<N>.json``).

:func:`export_best` writes a study's best trial (merging the records of other folds and
targets under a file lock); :func:`load_best_params` reads them back, from the file or from
the study storage, for the benchmark protocol.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from matbench_dim.tuning._common import NOT_EXPORTED, count_trials, slug
from matbench_dim.tuning.storage import resolve_storage

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BEST_DIR",
    "best_params_path",
    "export_best",
    "load_best_params",
    "study_name_for",
]

DEFAULT_BEST_DIR = Path("tuning") / "best"


def study_name_for(task: str, target: str | None, n_labels: int, fold: int | None = None) -> str:
    """Readable study name, e.g. ``matbench_perovskites-e_form-n100-fold0``."""
    parts = [slug(task), *([slug(target)] if target else []), f"n{int(n_labels)}"]
    return "-".join([*parts, f"fold{0 if fold is None else int(fold)}"])


def best_params_path(task: str, n_labels: int, best_dir: str | Path | None = None) -> Path:
    """``<best_dir>/<task>_n<N>.json`` (default ``tuning/best``); one record per fold and target."""
    return Path(best_dir or DEFAULT_BEST_DIR) / f"{slug(task)}_n{int(n_labels)}.json"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _exported_params(trial: FrozenTrial) -> dict[str, Any]:
    params = {**trial.user_attrs.get("estimator_params", {}), **trial.params}
    return {k: v for k, v in sorted(params.items()) if k not in NOT_EXPORTED}


def export_best(study: optuna.Study, best_dir: str | Path | None = None) -> Path:
    """Write the study's best trial to :func:`best_params_path` (merging other folds/targets).

    The record holds the study name, task, target, n, fold, best value (mean inner MAE),
    best trial number, trial counts, the value of the default (seed) trial, the tuned
    parameters and the full estimator parameters of the best trial.
    """
    attrs = study.user_attrs
    for key in ("task", "n", "fold"):
        if key not in attrs:
            raise ValueError(f"study {study.study_name!r} lacks the user attribute {key!r}")
    best = study.best_trial
    defaults = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.user_attrs.get("enqueued") == "seed defaults"]  # fmt: skip
    record = {
        "study_name": study.study_name,
        "task": attrs["task"],
        "target": attrs.get("target"),
        "n": attrs["n"],
        "fold": attrs["fold"],
        "metric": "mean inner-validation MAE",
        "best_value": best.value,
        "best_trial": best.number,
        "default_value": defaults[0].value if defaults else None,
        "n_trials": count_trials(study, (TrialState.COMPLETE, TrialState.PRUNED)),
        "n_complete": count_trials(study, (TrialState.COMPLETE,)),
        "n_pruned": count_trials(study, (TrialState.PRUNED,)),
        "n_failed": count_trials(study, (TrialState.FAIL,)),
        "tuned_params": best.params,
        "params": _exported_params(best),
        "exported": datetime.now().isoformat(timespec="seconds"),
    }
    path = best_params_path(attrs["task"], attrs["n"], best_dir)
    with _locked(path):
        data = json.loads(path.read_text()) if path.exists() else {}
        records = [r for r in data.get("records", [])
                   if (r["fold"], r.get("target")) != (record["fold"], record["target"])]  # fmt: skip
        data = {"task": attrs["task"], "n": attrs["n"], "records": [*records, record]}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    logger.info(
        "best params of %s (MAE %.4g, trial %d) -> %s",
        study.study_name,
        best.value,
        best.number,
        path,
    )
    return path


def load_best_params(
    task: str,
    n: int,
    fold: int | None = None,
    storage: str | BaseStorage | None = None,
    *,
    target: str | None = None,
    best_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Estimator parameters of the best trial for ``(task, n, fold)`` (``fold=None``: fold 0).

    Read from the exported file, or from the study in ``storage`` when given. ``target`` is
    needed only when several targets of ``task`` were tuned.

    Raises
    ------
    FileNotFoundError, KeyError
        When nothing was exported/tuned for this task, n, fold or target (the message lists
        what exists).
    """
    fold = 0 if fold is None else int(fold)
    if storage is not None:
        store = resolve_storage(storage)
        prefix, suffix = f"{slug(task)}-", f"-n{int(n)}-fold{fold}"
        names = [
            s
            for s in optuna.get_all_study_names(store)
            if s.startswith(prefix) and s.endswith(suffix)
        ]
        if target is not None:
            names = [s for s in names if s == study_name_for(task, target, n, fold)]
        if len(names) != 1:
            raise KeyError(
                f"need exactly one study {prefix}<target>{suffix} in the storage, found {names}"
            )
        return _exported_params(optuna.load_study(study_name=names[0], storage=store).best_trial)
    path = best_params_path(task, n, best_dir)
    if not path.exists():
        raise FileNotFoundError(f"no tuned parameters for {task} n={n}: {path} does not exist")
    records = json.loads(path.read_text())["records"]
    found = [r for r in records if r["fold"] == fold and target in (None, r.get("target"))]
    if len(found) != 1:
        have = [(r["fold"], r.get("target")) for r in records]
        raise KeyError(f"{path}: need one record for fold {fold}, target {target}; have {have}")
    return dict(found[0]["params"])
