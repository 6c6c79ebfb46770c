"""Where MLflow runs go: the tracking URI and the default store.

The bottom of :mod:`matbench_dim.tracking.tracker`: it imports nothing else of the package (not
even MLflow), so :mod:`~matbench_dim.tracking.tracker`, :mod:`~matbench_dim.tracking.runs`
and :mod:`~matbench_dim.tracking.pyfunc` all resolve a store the same way.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_store", "resolve_tracking_uri"]


def default_store(root: str | Path | None = None) -> tuple[str, Path]:
    """The default store: ``(sqlite URI of <root>/mlruns/mlflow.db, <root>/mlruns/artifacts)``.

    ``root`` defaults to the current working directory.
    """
    base = Path(root if root is not None else Path.cwd()).resolve() / "mlruns"
    return f"sqlite:///{base / 'mlflow.db'}", base / "artifacts"


def resolve_tracking_uri(uri: str | Path | None = None, root: str | Path | None = None) -> str:
    """The tracking URI to use: ``uri``, else ``$MLFLOW_TRACKING_URI``, else the default store.

    A bare path is accepted for convenience: ``x.db`` means ``sqlite:///<abs x.db>`` and a
    folder means a SQLite store ``<folder>/mlflow.db``.
    """
    value = str(uri) if uri is not None else os.environ.get("MLFLOW_TRACKING_URI") or None
    if value is None:
        return default_store(root)[0]
    if "://" in value or value.startswith(("databricks", "file:")):
        return value
    path = Path(value).expanduser().resolve()
    return f"sqlite:///{path if path.suffix == '.db' else path / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
