"""The user's own crystals: a folder or zip of CIF files plus a CSV of targets.

Rules (each breach raises a ``ValueError`` that names the offending files or ids):

- Ids are the CIF file stems (``Si_alpha.cif`` -> ``Si_alpha``); two CIFs with the same stem
  (in different sub-folders) are duplicate ids.
- The CSV has a ``file`` column (a file name, with or without ``.cif``, or a path whose last
  part is the name) and a target column (default ``target``). ``csv=None`` uses the single
  ``*.csv`` inside the folder/zip if there is one, else builds an unlabelled task.
- A CSV row naming a CIF that is absent, a file named twice, or a non-numeric / infinite /
  missing target is an error (``missing_target="unlabelled"`` instead keeps rows without a
  target as unlabelled structures for pretraining).
- CIFs that no CSV row names are kept as unlabelled structures (``Task.unlabelled_pool``),
  with a warning.
- Members that are neither CIF nor the CSV (``README.txt``, images, ...) are **skipped with
  a warning** listing them; hidden files and ``__MACOSX/`` entries are skipped silently.
- A CIF that pymatgen cannot parse, that holds several structures, or whose parsed
  composition disagrees with its own ``_chemical_formula_sum`` (a truncated atom list; see
  ``CifParser.check``) is an error naming the file and pymatgen's message. All bad files
  are reported together.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import pandas as pd
from pymatgen.core import Structure
from pymatgen.io.cif import CifParser

from matbench_dim.data.sources import sha256_file
from matbench_dim.data.task import MATBENCH_SEED, N_SPLITS, Task, build_task, format_ids

logger = logging.getLogger(__name__)


class CifError(ValueError):
    """One or more CIF files could not be read; the message lists each file and why."""


def unreadable_message(errors: list[str], limit: int = 20) -> str:
    """The one message for unreadable CIFs (``fit``, ``predict`` and the loaders share it):
    a count, then one line per file (``<file>: <reason>``), the first ``limit`` shown."""
    shown = "\n  ".join(errors[:limit]) + (
        f"\n  ... (+{len(errors) - limit} more)" if len(errors) > limit else ""
    )
    return f"{len(errors)} unreadable CIF file(s):\n  {shown}"


def _is_junk(name: str) -> bool:
    parts = PurePosixPath(name).parts
    return any(p.startswith(".") or p == "__MACOSX" for p in parts)


def read_members(
    path: str | os.PathLike[str],
) -> tuple[dict[str, bytes], dict[str, bytes], list[str]]:
    """Read a folder or a zip: ``(cifs {member: bytes}, csvs {member: bytes}, skipped)``.

    Member names are POSIX paths relative to the folder / zip root, sorted.
    """
    root = Path(path)
    cifs: dict[str, bytes] = {}
    csvs: dict[str, bytes] = {}
    skipped: list[str] = []

    def take(name: str, read: Callable[[], bytes]) -> None:
        if _is_junk(name):
            return
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in (".cif", ".csv"):
            (cifs if suffix == ".cif" else csvs)[name] = read()
        else:
            skipped.append(name)

    if root.is_dir():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                take(p.relative_to(root).as_posix(), p.read_bytes)
    elif root.is_file():
        if not zipfile.is_zipfile(root):
            raise ValueError(f"{root} is neither a folder nor a zip archive")
        with zipfile.ZipFile(root) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if not info.is_dir():
                    take(info.filename, lambda info=info: zf.read(info))
    else:
        raise FileNotFoundError(f"no folder or zip archive at {root}")
    return cifs, csvs, skipped


def members_sha256(members: dict[str, bytes]) -> str:
    """sha256 hex of a set of files: over the sorted ``(name, sha256(content))`` pairs.

    Identifies a folder of CIFs by content (a zip is identified by its own file's sha256).
    """
    digest = hashlib.sha256()
    for name in sorted(members):
        digest.update(name.encode("utf-8") + b"\0" + hashlib.sha256(members[name]).digest())
    return digest.hexdigest()


def parse_cif(text: str, label: str, check_formula: bool = True) -> Structure:
    """Parse one CIF into a Structure (no primitive reduction).

    Raises
    ------
    CifError
        Naming ``label`` with pymatgen's error and warnings.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            parser = CifParser.from_str(text)
            structures = parser.parse_structures(primitive=False, on_error="raise")
            problem = (
                parser.check(structures[0]) if check_formula and len(structures) == 1 else None
            )
        except Exception as exc:  # pymatgen raises many kinds (ValueError, ZeroDivisionError, ...)
            notes = "; ".join(dict.fromkeys(str(w.message).replace("\n", " ") for w in caught))
            raise CifError(
                f"{label}: pymatgen could not parse it ({type(exc).__name__}: {exc})"
                + (f" [pymatgen warnings: {notes}]" if notes else "")
            ) from exc
    if len(structures) != 1:
        raise CifError(f"{label}: holds {len(structures)} structures; one per file is expected")
    if problem:
        raise CifError(
            f"{label}: parsed composition disagrees with the file's _chemical_formula_sum "
            f"(truncated?): {' '.join(problem.split())}"
        )
    return structures[0]


def _stem(name: str) -> str:
    base = PurePosixPath(str(name).strip().replace("\\", "/")).name
    return base[:-4] if base.lower().endswith(".cif") else base


def _read_csv(
    csv: str | os.PathLike[str] | None, csvs: dict[str, bytes], root: Path
) -> tuple[pd.DataFrame | None, str | None]:
    if csv is not None:
        return pd.read_csv(csv, dtype=object, keep_default_na=True), str(csv)
    if not csvs:
        return None, None
    if len(csvs) > 1:
        raise ValueError(f"{root} holds several CSV files ({', '.join(csvs)}); pass csv=")
    ((name, data),) = csvs.items()
    logger.info("using %s inside %s as the targets CSV", name, root)
    return pd.read_csv(io.BytesIO(data), dtype=object, keep_default_na=True), f"{root}:{name}"


def load_cif_dataset(
    path: str | os.PathLike[str],
    csv: str | os.PathLike[str] | None = None,
    target_column: str = "target",
    *,
    file_column: str = "file",
    name: str | None = None,
    unit: str | None = None,
    n_splits: int | None = N_SPLITS,
    random_state: int = MATBENCH_SEED,
    missing_target: Literal["raise", "unlabelled"] = "raise",
    check_formula: bool = True,
) -> Task:
    """A task from a folder or zip of CIFs plus a CSV with columns ``file`` and a target.

    Parameters
    ----------
    path
        Folder (searched recursively) or ``.zip`` of ``*.cif`` files.
    csv
        CSV of targets; ``None`` uses the single CSV inside ``path``, if any.
    target_column, file_column
        CSV columns holding the target and the CIF file name.
    name, unit
        Task name (default: the folder / zip stem) and target unit.
    n_splits, random_state
        Seeded ``KFold(n_splits, shuffle=True, random_state)`` over the labelled ids, in
        CSV order (``n_splits=None``: no folds).
    missing_target
        ``"raise"`` (default) or ``"unlabelled"`` (rows without a target join the pool).
    check_formula
        Compare each parsed structure with its ``_chemical_formula_sum`` when present.

    Returns
    -------
    Task
        ``source="local"``; ``provenance`` has the path, its ``sha256`` (of the zip file, or
        :func:`members_sha256` of a folder's CIF and CSV files) and the CSV's.
    """

    root = Path(path)
    cifs, csvs, skipped = read_members(root)
    if skipped:
        logger.warning(
            "%s: skipped %d non-CIF members: %s", root, len(skipped), format_ids(skipped)
        )
    if not cifs:
        raise ValueError(f"{root} holds no .cif files")
    by_id: dict[str, str] = {}
    clashes = []
    for member in cifs:
        stem = _stem(member)
        if stem in by_id:
            clashes.append(f"{by_id[stem]} / {member}")
        by_id.setdefault(stem, member)
    if clashes:
        raise ValueError(
            f"{root}: CIF files with the same name (duplicate ids): {format_ids(clashes)}"
        )

    table, csv_label = _read_csv(csv, csvs, root)
    if table is not None:
        missing_cols = [c for c in (file_column, target_column) if c not in table.columns]
        if missing_cols:
            raise ValueError(
                f"{csv_label}: missing column(s) {missing_cols} (columns: {', '.join(table.columns)})"
            )
        empty = table.index[table[file_column].isna()].tolist()
        if empty:
            raise ValueError(
                f"{csv_label}: empty {file_column!r} in rows {format_ids([i + 2 for i in empty])} (line numbers)"
            )
        ids = [_stem(v) for v in table[file_column]]
        seen: set[str] = set()
        dup = sorted({i for i in ids if i in seen or seen.add(i)})  # type: ignore[func-returns-value]
        if dup:
            raise ValueError(f"{csv_label}: CIFs named more than once: {format_ids(dup)}")
        absent = [i for i in ids if i not in by_id]
        if absent:
            raise ValueError(
                f"{csv_label} names CIF files absent from {root}: {format_ids(absent)}"
            )
        targets: list[Any] | None = table[target_column].tolist()
    else:
        ids, targets = list(by_id), None
    extra = [i for i in by_id if i not in set(ids)]
    if extra:
        logger.warning(
            "%s: %d CIFs have no CSV row; kept as unlabelled structures: %s",
            root, len(extra), format_ids(extra),
        )  # fmt: skip

    parsed, errors = {}, []
    for i in [*ids, *extra]:
        member = by_id[i]
        try:
            text = cifs[member].decode("utf-8", errors="replace")
            parsed[i] = parse_cif(text, f"{root / member}", check_formula)
        except CifError as exc:
            errors.append(str(exc))
    if errors:
        raise CifError(unreadable_message(errors))

    pool = (
        pd.Series([parsed[i] for i in extra], index=extra, dtype=object, name="structure")
        if extra
        else None
    )
    provenance = {
        "path": str(root),
        "sha256": sha256_file(root) if root.is_file() else members_sha256({**cifs, **csvs}),
        "csv": csv_label,
        "csv_sha256": sha256_file(csv) if csv is not None else None,
        "n_cif": len(cifs),
        "skipped_members": skipped,
    }
    return build_task(
        name or root.stem,
        ids,
        [parsed[i] for i in ids],
        targets,
        target_name=target_column,
        unit=unit,
        folds=n_splits,
        random_state=random_state,
        provenance=provenance,
        missing_target=missing_target,
        pool=pool,
    )
