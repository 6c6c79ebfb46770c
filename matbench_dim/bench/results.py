"""The project's own results table: one JSON file per grid cell, plus its predictions.

Layout under an output folder ``out``::

    out/cells/<task>/<target>/<method>/n<n>/fold<k>_seed<s>.json        (CellResult)
    out/cells/<task>/<target>/<method>/n<n>/fold<k>_seed<s>.preds.csv   (id, y_true, y_pred)

The predictions file is written first and the JSON last, each atomically (temporary file +
``os.replace``), so an existing JSON marks a finished cell even after a crash.
:func:`load_results` gathers every cell into a ``pandas.DataFrame``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from matbench_dim.versions import library_versions

logger = logging.getLogger(__name__)

__all__ = [
    "CellResult",
    "atomic_write_text",
    "cell_paths",
    "ids_sha256",
    "iter_cells",
    "library_versions",
    "load_predictions",
    "load_results",
    "read_cell",
    "regression_metrics",
    "safe_name",
    "write_cell",
]

CELLS_DIR = "cells"
_SAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass
class CellResult:
    """The outcome of one (task, target, fold, method, n, seed) cell.

    Attributes
    ----------
    mae, rmse, max_error
        Test-set errors in the target's unit.
    n_test
        Size of the fold's test set (all of it is predicted).
    n_pretrain
        Structures used for label-free pretraining (0 when the method does not pretrain).
    max_train_structures
        The cap on the pretraining pool (``None``: the whole training fold).
    wall_s
        Wall time of fit + predict in seconds (pretraining excluded: it is shared per fold).
    params
        Method hyperparameters and protocol settings.
    subset_sha256, data_sha256
        sha256 of the labelled subset ids, and of the fold's (train ids, test ids, test targets).
    versions
        Library versions of the run.
    """

    task: str
    target: str
    fold: int
    method: str
    mode: str
    n: int
    seed: int
    mae: float
    rmse: float
    max_error: float
    n_test: int
    n_pretrain: int
    max_train_structures: int | None
    wall_s: float
    params: dict[str, Any] = field(default_factory=dict)
    subset_sha256: str = ""
    data_sha256: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellResult:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        names = {f.name for f in dataclasses.fields(cls)}
        extra = set(d) - names
        if extra:
            raise ValueError(f"unknown CellResult fields: {sorted(extra)}")
        return cls(**d)


def safe_name(part: str) -> str:
    """``part`` with every character outside ``[A-Za-z0-9._+-]`` replaced by ``_`` (for paths)."""
    return _SAFE.sub("_", str(part)).strip("_") or "_"


def cell_paths(
    out: str | Path, task: str, target: str, method: str, n: int, fold: int, seed: int
) -> tuple[Path, Path]:
    """``(json_path, predictions_path)`` of a cell under ``out``."""
    folder = (
        Path(out)
        / CELLS_DIR
        / safe_name(task)
        / safe_name(target)
        / safe_name(method)
        / f"n{int(n)}"
    )
    stem = f"fold{int(fold)}_seed{int(seed)}"
    return folder / f"{stem}.json", folder / f"{stem}.preds.csv"


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_cell(
    out: str | Path,
    result: CellResult,
    ids: Sequence[str],
    y_true: Sequence[float],
    y_pred: Sequence[float],
    y_std: Sequence[float] | None = None,
) -> Path:
    """Save a cell's predictions (and their std, for an ensemble) then its
    :class:`CellResult`; return the JSON path."""
    json_path, preds_path = cell_paths(
        out, result.task, result.target, result.method, result.n, result.fold, result.seed
    )
    if not (len(ids) == len(y_true) == len(y_pred)):
        raise ValueError(
            f"ids, y_true, y_pred lengths differ: {len(ids)}, {len(y_true)}, {len(y_pred)}"
        )
    frame = pd.DataFrame(
        {
            "id": [str(i) for i in ids],
            "y_true": np.asarray(y_true, float),
            "y_pred": np.asarray(y_pred, float),
        }
    )
    if y_std is not None:
        frame["y_std"] = np.asarray(y_std, float)
    atomic_write_text(preds_path, frame.to_csv(index=False, float_format="%.17g"))
    if not result.created:
        result.created = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_text(json_path, json.dumps(result.to_dict(), indent=1, sort_keys=True))
    return json_path


def read_cell(path: str | Path) -> CellResult:
    """Load one cell JSON."""
    path = Path(path)
    try:
        return CellResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: not a valid cell result ({exc})") from exc


def load_predictions(json_path: str | Path) -> pd.DataFrame:
    """The predictions saved beside a cell JSON: columns ``id``, ``y_true``, ``y_pred`` (and
    ``y_std`` for a method that predicts a spread)."""
    json_path = Path(json_path)
    preds = json_path.with_name(json_path.name.removesuffix(".json") + ".preds.csv")
    if not preds.exists():
        raise FileNotFoundError(f"no predictions file beside {json_path} ({preds.name})")
    return pd.read_csv(preds, dtype={"id": str})


def iter_cells(out: str | Path) -> Iterable[Path]:
    """Every cell JSON under ``out/cells``, sorted."""
    root = Path(out) / CELLS_DIR
    return sorted(root.rglob("fold*_seed*.json")) if root.exists() else []


def load_results(out: str | Path) -> pd.DataFrame:
    """All cells under ``out`` as a DataFrame (one row per cell, columns = CellResult fields,
    plus ``path``). An empty folder gives an empty frame with those columns."""
    rows = []
    for path in iter_cells(out):
        row = read_cell(path).to_dict()
        row["path"] = str(path)
        rows.append(row)
    columns = [f.name for f in dataclasses.fields(CellResult)] + ["path"]
    frame = pd.DataFrame(rows, columns=columns)
    if rows:
        frame = frame.sort_values(["task", "target", "method", "n", "fold", "seed"], kind="stable")
    return frame.reset_index(drop=True)


def regression_metrics(y_true: Sequence[float], y_pred: Sequence[float]) -> dict[str, float]:
    """``mae``, ``rmse`` and ``max_error`` of (n,) predictions."""
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.shape != y_pred.shape or y_true.ndim != 1:
        raise ValueError(f"shape mismatch: y_true {y_true.shape}, y_pred {y_pred.shape}")
    if not np.isfinite(y_pred).all():
        raise ValueError(f"{int((~np.isfinite(y_pred)).sum())} predictions are not finite")
    err = np.abs(y_pred - y_true)
    return {
        "mae": float(err.mean()),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "max_error": float(err.max()),
    }


def ids_sha256(ids: Iterable[Any]) -> str:
    """sha256 hex of ids joined by newlines, in the given order."""
    return hashlib.sha256("\n".join(str(i) for i in ids).encode()).hexdigest()


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
        return cell_paths(out, self.task, self.target, self.method, self.n, self.fold, self.seed)
