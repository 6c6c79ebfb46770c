"""What the estimators accept: structures, their ids and regression targets, checked with a
message that names the entry and what is wrong."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def as_structures(X: Any, name: str = "X") -> list[Any]:
    """Validate ``X`` as a sequence of pymatgen Structures (list, tuple, Series, array)."""
    from pymatgen.core import Structure

    if isinstance(X, pd.DataFrame):
        if "structure" not in X.columns:
            raise TypeError(f"{name} is a DataFrame without a 'structure' column")
        X = X["structure"]
    if isinstance(X, (str, bytes)) or not hasattr(X, "__len__"):
        raise TypeError(f"{name} must be a sequence of pymatgen Structures, got {type(X).__name__}")
    items = list(X.values) if isinstance(X, pd.Series) else list(X)
    if not items:
        raise ValueError(f"{name} is empty: at least one structure is needed")
    for i, s in enumerate(items):
        if not isinstance(s, Structure):
            raise TypeError(f"{name}[{i}] is a {type(s).__name__}, not a pymatgen Structure")
    return items


def ids_of(X: Any, n: int) -> list[str]:
    if isinstance(X, pd.Series | pd.DataFrame):
        return [str(i) for i in X.index]
    return [str(i) for i in range(n)]


def as_targets(y: Any, n: int) -> np.ndarray:
    """Validate ``y``: ``n`` finite numbers -> float64 array (clear errors otherwise)."""
    ids = [str(i) for i in y.index] if isinstance(y, pd.Series) else None
    try:
        arr = np.asarray(y, dtype=float)
    except (TypeError, ValueError) as exc:
        values = list(y.values) if isinstance(y, pd.Series) else list(y)
        bad_at = [i for i, v in enumerate(values) if v is not None and not _is_number(v)]
        shown = [f"{ids[i] if ids else i} ({values[i]!r})" for i in bad_at[:10]]
        raise ValueError(
            f"y must be numeric: {len(bad_at)} non-numeric targets, e.g. at {', '.join(shown)}"
            if bad_at
            else f"y must be numeric: {exc}"
        ) from exc
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"y must be one-dimensional, got shape {arr.shape}")
    if len(arr) != n:
        raise ValueError(f"X has {n} structures but y has {len(arr)} targets")
    bad = np.flatnonzero(~np.isfinite(arr))
    if len(bad):
        where = [ids[i] for i in bad[:10]] if ids else bad[:10].tolist()
        raise ValueError(f"y has {len(bad)} non-finite targets (NaN/inf), e.g. at {where}")
    return arr


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
