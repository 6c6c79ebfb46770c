"""A user's own data set, named by its path, as a :class:`~matbench_dim.data.task.Task`.

Every command that takes a task name also takes a path (``--task my_cifs/``,
``--tasks data.json.gz:band_gap``):

- a folder or ``.zip`` of CIFs with a CSV of ``file,<target>`` inside (or beside, with
  :func:`~matbench_dim.data.cif.load_cif_dataset`'s rules): the target column is ``target``
  unless named;
- a matminer-format ``.json`` / ``.json.gz`` DataFrame file with a ``structure`` column: the
  target column is the one numeric column, or the one named.

Rows without a target are unlabelled structures, used only by label-free pretraining. Folds
are a seeded 5-fold ``KFold`` over the labelled entries (the matbench seed); the provenance
records the path and the sha256 of the data, as for the built-in sets.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from matbench_dim.data.cif import load_cif_dataset
from matbench_dim.data.sources import sha256_file
from matbench_dim.data.task import MATBENCH_SEED, N_SPLITS, Task, build_task

logger = logging.getLogger(__name__)

__all__ = ["is_dataset_path", "load_matminer_file", "load_user_dataset"]

_FILE_SUFFIXES = (".json", ".json.gz")


def is_dataset_path(spec: str) -> bool:
    """True when ``spec`` names a data set by path rather than a built-in task name."""
    if spec.startswith("sample:"):
        return False
    lowered = spec.lower()
    return (
        os.sep in spec
        or lowered.endswith((".zip", *_FILE_SUFFIXES))
        or Path(spec).expanduser().exists()
    )


def load_matminer_file(
    path: str | os.PathLike[str],
    target: str | None = None,
    *,
    name: str | None = None,
    unit: str | None = None,
    n_splits: int = N_SPLITS,
    random_state: int = MATBENCH_SEED,
) -> Task:
    """A task from a matminer-format DataFrame file (``structure`` column plus targets).

    Parameters
    ----------
    path
        ``.json`` or ``.json.gz`` written by ``matminer.utils.io.store_dataframe_as_json``.
    target
        Target column; default the single numeric column besides ``structure``.
    name, unit
        Task name (default: the file name without its suffixes) and target unit.
    n_splits, random_state
        Seeded ``KFold`` over the labelled rows.
    """
    from matminer.utils.io import load_dataframe_from_json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    try:
        df = load_dataframe_from_json(str(path), pbar=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a matminer DataFrame file ({exc})") from exc
    if "structure" not in df.columns:
        raise ValueError(f"{path}: no 'structure' column (columns: {', '.join(map(str, df))})")
    if target is None:
        numeric = [
            c for c in df.columns if c != "structure" and np.issubdtype(df[c].dtype, np.number)
        ]
        if len(numeric) != 1:
            raise ValueError(
                f"{path}: name the target column (numeric columns: {', '.join(map(str, numeric)) or 'none'})"
            )
        target = str(numeric[0])
    if target not in df.columns:
        raise ValueError(f"{path}: no column {target!r} (columns: {', '.join(map(str, df))})")
    stem = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    return build_task(
        name or Path(stem).stem,
        df.index.astype(str).tolist(),
        list(df["structure"]),
        df[target].tolist(),
        target_name=target,
        unit=unit,
        folds=n_splits,
        random_state=random_state,
        provenance={"path": str(path), "sha256": sha256_file(path), "n_rows": len(df)},
        missing_target="unlabelled",
    )


def load_user_dataset(path: str | os.PathLike[str], target: str | None = None) -> Task:
    """A folder/zip of CIFs (+ CSV) or a matminer file, by its path (see the module doc)."""
    p = Path(path).expanduser()
    if p.name.lower().endswith(_FILE_SUFFIXES):
        return load_matminer_file(p, target)
    if p.is_dir() or p.suffix.lower() == ".zip":
        if not p.exists():
            raise FileNotFoundError(f"{p}: no such folder or zip of CIFs")
        return load_cif_dataset(p, target_column=target or "target", missing_target="unlabelled")
    raise ValueError(
        f"{p}: not a data set (a folder or .zip of CIFs with a CSV, or a matminer .json(.gz))"
    )
