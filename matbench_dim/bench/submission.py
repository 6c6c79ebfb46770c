"""A matbench leaderboard submission: DIM pretraining + fine-tuning inside matbench's fold loop.

For every fold of every task, :func:`run_submission` does what matbench's documentation asks
of a submitted algorithm: fit on the fold's whole training set, predict its test set, record
(``model.fit(X, y)`` DIM-pretrains on the training structures with the labels hidden, then
fine-tunes on them; no test structure reaches either stage). The folder it writes is the one
matbench's ``benchmarks/`` expects::

    <out>/results.json.gz     the benchmark (plain JSON, so MatbenchBenchmark.from_file reads it)
    <out>/info.json           authors, algorithm, algorithm_long, bibtex_refs, notes, requirements
    <out>/run_submission.py   the source that reproduces it (resumes, or re-checks, this folder)
    <out>/submission.json     tasks, folds, seed and estimator parameters (checked on resume)

The benchmark is saved after every fold (atomically), so an interrupted submission resumes at
the first fold not recorded; a folder started with other settings is refused.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from matbench_dim.bench.matbench_io import load_benchmark, new_benchmark, record, save_benchmark
from matbench_dim.bench.results import atomic_write_text, library_versions
from matbench_dim.data.task import Task
from matbench_dim.paths import check_writable

logger = logging.getLogger(__name__)

__all__ = [
    "INFO_KEYS",
    "SubmissionInfo",
    "check_submission",
    "run_submission",
]

RESULTS_FILE = "results.json.gz"
INFO_FILE = "info.json"
SOURCE_FILE = "run_submission.py"
CONFIG_FILE = "submission.json"
FORMAT_VERSION = 1
#: Keys matbench's leaderboard requires in ``info.json`` (its submission docs and tests).
INFO_KEYS = ("authors", "algorithm", "algorithm_long", "bibtex_refs", "notes", "requirements")

SEED_BIBTEX = """@article{moran2024dim,
  title = {Establishing Deep InfoMax as an effective self-supervised learning methodology in materials informatics},
  author = {Moran, Michael and Gaultois, Michael W. and Gusev, Vladimir V. and Rosseinsky, Matthew J.},
  journal = {arXiv preprint arXiv:2407.00671},
  year = {2024}
}"""

DEFAULT_LONG = (
    "Site-Net (self-attention over the sites of a real-space supercell) pretrained with Deep "
    "InfoMax on the structures of each training fold, labels hidden (mutual information "
    "between per-site representations and the crystal's global vector, negatives from other "
    "crystals), then fine-tuned on the fold's labels. Implemented by the matbench-dim package."
)


@dataclass(frozen=True)
class SubmissionInfo:
    """What ``info.json`` says about the algorithm (``requirements`` is filled in for you)."""

    authors: str
    algorithm: str = "SiteNet-DIM"
    algorithm_long: str = DEFAULT_LONG
    bibtex_refs: Sequence[str] = field(default_factory=lambda: (SEED_BIBTEX,))
    notes: str = ""

    def __post_init__(self) -> None:
        for key in ("authors", "algorithm", "algorithm_long"):
            if not str(getattr(self, key)).strip():
                raise ValueError(f"info.json needs a non-empty {key!r}")
        if not self.bibtex_refs:
            raise ValueError("info.json needs at least one bibtex reference")

    def as_dict(self, notes: str = "") -> dict[str, Any]:
        """The ``info.json`` content: these fields plus the installed library versions."""
        versions = library_versions()
        requirements = {"python": [f"{k}=={v}" for k, v in versions.items() if v != "absent"]}
        out = asdict(self) | {"bibtex_refs": list(self.bibtex_refs), "requirements": requirements}
        out["notes"] = "\n".join(s for s in (self.notes, notes) if s)
        return out


def _default_factory() -> Callable[..., Any]:
    from matbench_dim.estimator import SiteNetDIMRegressor

    return SiteNetDIMRegressor


def _jsonable(value: Any) -> Any:
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _source(config: Mapping[str, Any]) -> str:
    return f'''"""Reproduces this matbench submission (written by matbench-dim; run it in any folder).

Each fold: SiteNetDIMRegressor(**params).fit(X_train, y_train) DIM-pretrains on the training
structures (labels hidden) and fine-tunes on them; predictions of the test structures are
recorded. Run again, it resumes at the first fold not recorded (or only re-checks the files).
The loop itself, in matbench's own terms, is matbench_dim.bench.submission.run_submission.
"""

import json
from pathlib import Path

from matbench_dim.bench.submission import SubmissionInfo, run_submission

here = Path(__file__).resolve().parent
config = json.loads((here / "{CONFIG_FILE}").read_text())
info = json.loads((here / "{INFO_FILE}").read_text())
run_submission(
    config["tasks"],
    here,
    info=SubmissionInfo(**{{k: info[k] for k in ("authors", "algorithm", "algorithm_long", "bibtex_refs")}}),
    estimator_params=config["estimator_params"],
    seed=config["seed"],
    folds=config["folds"],
    n_members=config["n_members"],
)
'''


def run_submission(
    tasks: Sequence[str | Task],
    out: str | os.PathLike[str],
    *,
    info: SubmissionInfo,
    estimator_params: Mapping[str, Any] | None = None,
    seed: int = 0,
    folds: Sequence[int] | None = None,
    factory: Callable[..., Any] | None = None,
    n_members: int = 1,
) -> Any:
    """Fit, predict and record every fold of ``tasks``; write the submission folder ``out``.

    Parameters
    ----------
    tasks
        matbench task names (``matbench_jdft2d``, ...) or loaded matbench
        :class:`~matbench_dim.data.task.Task` objects (local datasets are not matbench tasks).
    out
        The submission folder; created, or resumed when it holds an earlier call's files.
    info
        Authors and algorithm description for ``info.json``.
    estimator_params
        Parameters of the estimator (``factory(**estimator_params, random_state=seed)``).
    seed
        ``random_state`` of every fold's estimator.
    folds
        Folds to run (default all five); a submission is complete only with all of them.
    factory
        Estimator class (default :class:`~matbench_dim.estimator.SiteNetDIMRegressor`).
    n_members
        With ``>= 2``, each fold fits a :class:`~matbench_dim.ensemble.SiteNetDIMEnsemble` of
        that many fine-tunes from one pretraining, records the mean and passes the members'
        std to matbench (``record(std=...)``).

    Returns
    -------
    matbench.bench.MatbenchBenchmark
        The benchmark as saved in ``out/results.json.gz``.
    """
    from matbench_dim.data.sources import load_task

    loaded = [load_task(t) if isinstance(t, str) else t for t in tasks]
    not_matbench = [t.name for t in loaded if not t.is_matbench]
    if not_matbench:
        raise ValueError(
            f"{', '.join(not_matbench)}: not a matbench task; a submission is scored on "
            "matbench's official folds (use `bench` for local data sets)"
        )
    names = [t.name for t in loaded]
    folds = list(range(5)) if folds is None else sorted({int(f) for f in folds})
    params = dict(estimator_params or {})
    config = {
        "format_version": FORMAT_VERSION,
        "tasks": names,
        "folds": folds,
        "seed": int(seed),
        "n_members": int(n_members),
        "estimator_params": {k: _jsonable(v) for k, v in sorted(params.items())},
    }
    out = check_writable(out)
    results = out / RESULTS_FILE
    _check_config(out / CONFIG_FILE, config)
    if results.is_file():
        mb = load_benchmark(results, loaded)
        if sorted(mb.tasks_map) != sorted(names):
            raise ValueError(f"{results} holds tasks {sorted(mb.tasks_map)}, not {sorted(names)}")
    else:
        mb = new_benchmark(loaded)
    _write_json(out / CONFIG_FILE, config)
    make = factory if factory is not None else _default_factory()
    for task in loaded:
        mtask = mb.tasks_map[task.name]
        for fold in folds:
            if mtask.is_recorded[fold]:
                logger.info("%s fold %d: already recorded in %s", task.name, fold, results)
                continue
            t0 = time.perf_counter()
            X, y = task.train_data(fold)
            model = make(**params, random_state=int(seed))
            std = None
            if n_members > 1:
                from matbench_dim.ensemble import SiteNetDIMEnsemble

                ensemble = SiteNetDIMEnsemble(model, n_members=int(n_members)).fit(X, y)
                predictions, std = ensemble.predict(task.test_inputs(fold), return_std=True)
            else:
                predictions = model.fit(X, y).predict(task.test_inputs(fold))
            record(mb, task.name, fold, np.asarray(predictions, dtype=float), std=std,
                   params={**config["estimator_params"], "random_state": int(seed),
                           "n_members": int(n_members), "n_train": len(X)})  # fmt: skip
            save_benchmark(mb, results)
            mae = mtask.results[mtask.folds_map[fold]]["scores"]["mae"]
            logger.info(
                "%s fold %d: test MAE %.4g on %d test entries (%.0f s); saved %s",
                task.name, fold, mae, len(predictions), time.perf_counter() - t0, results,
            )  # fmt: skip
    done = {t.name: [f for f in range(5) if mb.tasks_map[t.name].is_recorded[f]] for t in loaded}
    missing = {k: sorted(set(range(5)) - set(v)) for k, v in done.items() if len(v) < 5}
    note = "" if not missing else f"incomplete: folds not recorded {missing}"
    _write_json(out / INFO_FILE, info.as_dict(note))
    (out / SOURCE_FILE).write_text(_source(config), encoding="utf-8")
    if not missing:
        check_submission(out)
    return mb


def _check_config(path: Path, config: Mapping[str, Any]) -> None:
    if not path.is_file():
        return
    old = json.loads(path.read_text(encoding="utf-8"))
    clash = {k: (old.get(k), v) for k, v in config.items() if k != "folds" and old.get(k) != v}
    if clash:
        raise ValueError(
            f"{path.parent} was started with other settings (there, asked): {clash}; "
            "use another folder or delete it"
        )


def check_submission(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a submission folder as matbench's leaderboard does; return its scores.

    ``results.json.gz`` must load with matbench's own ``MatbenchBenchmark.from_file`` and be
    valid and complete; ``info.json`` must hold every key of :data:`INFO_KEYS`, non-empty
    (``notes`` may be empty); there must be a ``.py`` source file.
    """
    from matbench.bench import MatbenchBenchmark

    folder = Path(folder)
    results = folder / RESULTS_FILE
    if not results.is_file():
        raise FileNotFoundError(f"{results}: no results file")
    ours = load_benchmark(results)  # reads partial files too: say which folds are missing
    missing = {
        t.dataset_name: [f for f, done in t.is_recorded.items() if not done]
        for t in ours.tasks
        if not t.all_folds_recorded
    }
    if missing:
        raise ValueError(f"{results}: not every fold is recorded (missing: {missing})")
    mb = MatbenchBenchmark.from_file(str(results))
    if not mb.is_valid:
        raise ValueError(f"{results}: not a valid matbench benchmark: {mb.validate()}")
    info = json.loads((folder / INFO_FILE).read_text(encoding="utf-8"))
    absent = [k for k in INFO_KEYS if k not in info or (k != "notes" and not info[k])]
    if absent:
        raise ValueError(f"{folder / INFO_FILE}: missing or empty {absent}")
    if not list(folder.glob("*.py")):
        raise ValueError(f"{folder}: no .py source file")
    return {name: scores["mae"]["mean"] for name, scores in mb.scores.items()}
