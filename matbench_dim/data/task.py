"""Tasks: crystal structures, regression targets and cross-validation folds.

One notion of a task, :class:`Task`, whatever the data came from:

- a matbench v0.1 task loaded through matbench itself (:func:`load_matbench_task`), with
  the official ``mb-...`` ids, targets and folds;
- a local file in matminer's format (:func:`load_task`: ``perovskites_subset``, ``flla``,
  ``jarvis_dft_2d``), or the small real samples shipped in ``matbench_dim/data/samples``
  (``load_task(name, sample=True)``);
- the user's own data: a folder or zip of CIFs plus a CSV (:func:`load_cif_dataset`), a
  DataFrame (:func:`task_from_dataframe`) or a list of structures
  (:func:`task_from_structures`), with seeded 5-fold splits.

This module is the bottom of :mod:`matbench_dim.data.task`: it imports nothing else of the
package. The file-locating and loading code lives above it, in
:mod:`matbench_dim.data.sources` (search order of the data directories, fail-fast
:class:`~matbench_dim.data.sources.DataNotFoundError`, :func:`load_task`) and
:mod:`matbench_dim.data.cif` (:func:`load_cif_dataset`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matbench.task import MatbenchTask
    from pymatgen.core import Structure

__all__ = [
    "MATBENCH_SEED",
    "N_SPLITS",
    "Task",
    "build_task",
    "format_ids",
    "official_folds",
    "seeded_kfold",
    "task_from_dataframe",
    "task_from_structures",
    "validate_targets",
]

MATBENCH_SEED = 18012019
"""Seed of matbench v0.1's ``KFold(5, shuffle=True)`` (``matbench_v0.1_validation.json``)."""
N_SPLITS = 5

logger = logging.getLogger(__name__)

MissingTarget = Literal["raise", "unlabelled"]


def format_ids(ids: Sequence[Any], limit: int = 10, quote: bool = True) -> str:
    """``'a', 'b', ... (+N more)`` for error messages (``quote=False``: items as they are)."""
    ids = list(ids)
    shown = ", ".join(repr(i) if quote else str(i) for i in ids[:limit])
    return shown + (f", ... (+{len(ids) - limit} more)" if len(ids) > limit else "")


# --------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Task:
    """Structures, targets and folds of one regression task.

    Attributes
    ----------
    name
        Task name (``matbench_jdft2d``, ``flla``, ``sample:flla``, a user name, ...).
    target_name
        Column the targets come from (``exfoliation_en``, ``e_form``, ...).
    unit
        Unit of the targets (``meV/atom``, ``eV/atom``, ...), ``None`` when unknown.
    structures
        ``pd.Series`` of pymatgen ``Structure`` indexed by unique string ids.
    targets
        ``pd.Series`` of finite floats with the same index, or ``None`` (unlabelled task).
    folds
        ``[(train_ids, test_ids), ...]``, arrays of ids; the test sets of matbench and
        seeded-KFold tasks partition the ids.
    source
        ``"matbench"`` (loaded through matbench) or ``"local"``.
    provenance
        Where the data came from: file path, file sha256, fold strategy, seed, ...
    task_type
        ``"regression"`` or ``"classification"`` (matbench ``*_is_metal``: targets 0/1).
    unlabelled_pool
        Structures without a target (e.g. jarvis_dft_2d rows lacking the chosen property),
        never in any fold, offered to pretraining by :meth:`unlabelled_structures`.
    matbench_task
        The loaded ``matbench.task.MatbenchTask`` for matbench tasks, else ``None``.
    """

    name: str
    target_name: str
    unit: str | None
    structures: pd.Series
    targets: pd.Series | None
    folds: list[tuple[np.ndarray, np.ndarray]]
    source: Literal["matbench", "local"] = "local"
    provenance: dict[str, Any] = field(default_factory=dict)
    task_type: str = "regression"
    unlabelled_pool: pd.Series | None = None
    matbench_task: MatbenchTask | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.folds = [
            (np.asarray(tr, dtype=object), np.asarray(te, dtype=object)) for tr, te in self.folds
        ]
        self._check()

    def _check(self) -> None:
        if not isinstance(self.structures, pd.Series):
            raise TypeError(f"Task {self.name!r}: structures must be a pandas Series")
        index = self.structures.index
        _check_ids(list(index), f"Task {self.name!r}")
        if self.targets is not None:
            if not isinstance(self.targets, pd.Series) or not self.targets.index.equals(index):
                raise ValueError(
                    f"Task {self.name!r}: targets must be a Series with the structures' index"
                )
            bad = self.targets.index[~np.isfinite(self.targets.to_numpy(dtype=float))]
            if len(bad):
                raise ValueError(
                    f"Task {self.name!r}: non-finite targets for ids {format_ids(bad)}"
                )
        known = set(index)
        for k, (train, test) in enumerate(self.folds):
            unknown = [i for i in (*train, *test) if i not in known]
            if unknown:
                raise ValueError(f"Task {self.name!r} fold {k}: unknown ids {format_ids(unknown)}")
            both = set(train) & set(test)
            if both:
                raise ValueError(
                    f"Task {self.name!r} fold {k}: ids in both train and test {format_ids(sorted(both))}"
                )
        if self.unlabelled_pool is not None:
            _check_ids(list(self.unlabelled_pool.index), f"Task {self.name!r} unlabelled pool")
            clash = known & set(self.unlabelled_pool.index)
            if clash:
                raise ValueError(
                    f"Task {self.name!r}: ids both labelled and in the unlabelled pool "
                    f"{format_ids(sorted(clash))}"
                )

    def __repr__(self) -> str:
        pool = 0 if self.unlabelled_pool is None else len(self.unlabelled_pool)
        return (
            f"Task(name={self.name!r}, target_name={self.target_name!r}, unit={self.unit!r}, "
            f"n={len(self.structures)}, labelled={self.targets is not None}, "
            f"n_folds={self.n_folds}, unlabelled_pool={pool}, source={self.source!r})"
        )

    def __len__(self) -> int:
        return len(self.structures)

    @property
    def ids(self) -> np.ndarray:
        """All labelled-task ids (the structures' index), shape ``(n,)``."""
        return self.structures.index.to_numpy(dtype=object)

    @property
    def n_folds(self) -> int:
        """Number of folds."""
        return len(self.folds)

    @property
    def is_matbench(self) -> bool:
        """True when the task was loaded through matbench (results can be recorded)."""
        return self.source == "matbench" and self.matbench_task is not None

    def _fold(self, fold: int) -> tuple[np.ndarray, np.ndarray]:
        if not self.folds:
            raise ValueError(f"Task {self.name!r} has no folds (built with n_splits=None)")
        if isinstance(fold, bool) or not isinstance(fold, int | np.integer):
            raise TypeError(f"fold must be an int, got {type(fold).__name__}")
        if not 0 <= fold < self.n_folds:
            raise IndexError(
                f"fold {fold} out of range for task {self.name!r} (0..{self.n_folds - 1})"
            )
        return self.folds[fold]

    def _require_targets(self) -> pd.Series:
        if self.targets is None:
            raise ValueError(
                f"Task {self.name!r} has no targets; use unlabelled_structures() for pretraining"
            )
        return self.targets

    def train_ids(self, fold: int) -> np.ndarray:
        """Ids of the training (+ validation) part of ``fold``, shape ``(n_train,)``."""
        return self._fold(fold)[0]

    def test_ids(self, fold: int) -> np.ndarray:
        """Ids of the test part of ``fold``, in matbench's recording order, ``(n_test,)``."""
        return self._fold(fold)[1]

    def train_data(self, fold: int) -> tuple[pd.Series, pd.Series]:
        """``(structures, targets)`` of the training part of ``fold``, indexed by id."""
        ids = self.train_ids(fold)
        return self.structures.loc[ids], self._require_targets().loc[ids]

    def test_inputs(self, fold: int) -> pd.Series:
        """Structures of the test part of ``fold`` (no targets), indexed by id."""
        return self.structures.loc[self.test_ids(fold)]

    def test_targets(self, fold: int) -> pd.Series:
        """Targets of the test part of ``fold``, for scoring; indexed by id.

        For matbench tasks they are read through ``get_test_data(fold, include_target=True)``.
        """
        self._fold(fold)
        if self.is_matbench:
            assert self.matbench_task is not None
            _, y = self.matbench_task.get_test_data(int(fold), include_target=True)
            return y.astype(float)
        return self._require_targets().loc[self.test_ids(fold)]

    def unlabelled_structures(self, fold: int | None) -> pd.Series:
        """Structures a label-free pretraining may use for ``fold``, indexed by id.

        The training structures of ``fold`` plus the unlabelled pool (rows with no target,
        which are never tested). ``fold=None`` gives every structure, test ones included
        (transductive use only: never for a benchmark score).
        """
        parts = [self.structures if fold is None else self.structures.loc[self.train_ids(fold)]]
        if self.unlabelled_pool is not None and len(self.unlabelled_pool):
            parts.append(self.unlabelled_pool)
        return pd.concat(parts) if len(parts) > 1 else parts[0]


def _check_ids(ids: Sequence[Any], what: str) -> None:
    not_str = [i for i in ids if not isinstance(i, str)]
    if not_str:
        raise TypeError(f"{what}: ids must be strings, got {format_ids(not_str)}")
    seen: set[str] = set()
    dup = {i for i in ids if i in seen or seen.add(i)}  # type: ignore[func-returns-value]
    if dup:
        raise ValueError(f"{what}: duplicate ids {format_ids(sorted(dup))}")


def seeded_kfold(
    ids: Sequence[str], n_splits: int = N_SPLITS, random_state: int = MATBENCH_SEED
) -> list[tuple[np.ndarray, np.ndarray]]:
    """matbench's fold recipe on arbitrary ids: ``KFold(n_splits, shuffle=True, random_state)``.

    Returns ``[(train_ids, test_ids), ...]``; each part keeps the order of ``ids``.
    """
    ids_arr = np.asarray(list(ids), dtype=object)
    if n_splits < 2:
        raise ValueError(f"n_splits must be >= 2, got {n_splits}")
    if len(ids_arr) < n_splits:
        raise ValueError(
            f"{len(ids_arr)} labelled entries cannot make {n_splits} folds; "
            "pass a smaller n_splits, or n_splits=None for a task without folds"
        )
    from sklearn.model_selection import KFold  # here: `matbench-dim tasks` starts fast

    kf = KFold(n_splits=n_splits, shuffle=True, random_state=random_state)
    return [(ids_arr[tr], ids_arr[te]) for tr, te in kf.split(ids_arr)]


def official_folds(matbench_name: str, ids: Sequence[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """matbench v0.1's official fold membership restricted to ``ids`` (official mbids).

    Read from the ``matbench_v0.1_validation.json`` shipped in the matbench package; the
    order inside each part is matbench's.
    """
    from matbench.metadata import mbv01_validation

    if matbench_name not in mbv01_validation.splits:
        raise ValueError(f"{matbench_name!r} is not a matbench v0.1 task")
    splits = mbv01_validation.splits[matbench_name]
    available = set(ids)
    official = set(splits["fold_0"].train) | set(splits["fold_0"].test)
    unknown = sorted(available - official)
    if unknown:
        raise ValueError(f"ids that are not official {matbench_name} mbids: {format_ids(unknown)}")
    folds = []
    for key in splits:
        train = [i for i in splits[key].train if i in available]
        test = [i for i in splits[key].test if i in available]
        if not test:
            raise ValueError(f"{matbench_name} official {key}: none of its test ids is available")
        folds.append((np.asarray(train, dtype=object), np.asarray(test, dtype=object)))
    return folds


# --------------------------------------------------------------------------------------
# Building tasks from in-memory data
# --------------------------------------------------------------------------------------


def validate_targets(
    values: Sequence[Any], ids: Sequence[str], missing: MissingTarget = "raise"
) -> tuple[np.ndarray, np.ndarray]:
    """Check targets; return ``(float targets (n,), labelled mask (n,) bool)``.

    Non-numeric and infinite values always raise (naming the ids); missing values (NaN,
    None, empty) raise unless ``missing="unlabelled"``, which marks them unlabelled.
    """
    if len(values) != len(ids):
        raise ValueError(f"{len(values)} targets for {len(ids)} structures")
    raw = pd.Series(list(values), index=list(ids), dtype=object)
    missing_mask = (
        raw.isna().to_numpy() | raw.map(lambda v: isinstance(v, str) and not v.strip()).to_numpy()
    )
    numeric = pd.to_numeric(raw.where(~missing_mask), errors="coerce")
    non_numeric = ~missing_mask & numeric.isna().to_numpy()
    y = numeric.to_numpy(dtype=float)
    inf = np.isinf(y)
    problems = []  # every kind of error at once, so one fix of the file settles them all
    if non_numeric.any():
        bad = [f"{i!r} ({raw[i]!r})" for i in raw.index[non_numeric]]
        problems.append(f"non-numeric targets for ids {format_ids(bad, quote=False)}")
    if inf.any():
        problems.append(f"infinite targets for ids {format_ids(raw.index[inf])}")
    if missing_mask.any() and missing == "raise":
        problems.append(
            f"missing (NaN/empty) targets for ids {format_ids(raw.index[missing_mask])}; drop them "
            "or pass missing_target='unlabelled' (CLI: --missing-target unlabelled) to keep them "
            "for pretraining only"
        )
    if problems:
        raise ValueError("; ".join(problems))
    return y, ~missing_mask


def _as_structures(items: Sequence[Any], ids: Sequence[str]) -> list[Structure]:
    from pymatgen.core import Structure

    out, bad = [], []
    for i, s in zip(ids, items, strict=True):
        if isinstance(s, Structure):
            out.append(s)
        elif isinstance(s, dict) and "lattice" in s and "sites" in s:
            out.append(Structure.from_dict(s))
        else:
            bad.append(f"{i!r} ({type(s).__name__})")
    if bad:
        raise TypeError(f"entries that are not pymatgen Structures: {format_ids(bad, quote=False)}")
    disordered = [i for i, s in zip(ids, out, strict=True) if not s.is_ordered]
    if disordered:
        logger.warning(
            "%d disordered (partial occupancy or mixed-species) structures kept: %s. Site-Net "
            "featurization rejects them (FeaturizationError naming each); composition "
            "baselines accept them. Order them first (e.g. pymatgen's "
            "OrderDisorderedStructureTransformation) or drop them to use Site-Net methods",
            len(disordered),
            format_ids(disordered),
        )
    return out


def build_task(
    name: str,
    ids: Sequence[str],
    structures: Sequence[Any],
    targets: Sequence[Any] | None,
    *,
    target_name: str = "target",
    unit: str | None = None,
    folds: str | int | None = N_SPLITS,
    random_state: int = MATBENCH_SEED,
    provenance: dict[str, Any] | None = None,
    missing_target: MissingTarget = "raise",
    pool: pd.Series | None = None,
) -> Task:
    """Validate in-memory data and assemble a local :class:`Task`.

    ``folds``: an int (seeded KFold splits over the labelled ids), ``"kfold"`` (5 splits),
    a matbench task name (its official folds, ids must be mbids), or ``None`` (no folds).
    Entries with a missing target join ``pool`` when ``missing_target="unlabelled"``.
    """
    ids = [str(i) for i in ids]
    if len(structures) != len(ids):
        raise ValueError(f"{len(structures)} structures for {len(ids)} ids")
    _check_ids(ids, f"task {name!r}")
    structs = pd.Series(
        _as_structures(list(structures), ids), index=ids, dtype=object, name="structure"
    )
    y_series = None
    if targets is not None:
        y, labelled = validate_targets(targets, ids, missing_target)
        if not labelled.all():
            logger.info(
                "%s: %d entries lack %r; kept as unlabelled structures for pretraining only",
                name,
                int((~labelled).sum()),
                target_name,
            )
            extra = structs[~labelled]
            pool = extra if pool is None else pd.concat([pool, extra])
            structs = structs[labelled]
        y_series = pd.Series(y[labelled], index=structs.index, name=target_name)
    labelled_ids = list(structs.index)
    if folds is None:
        fold_list: list[tuple[np.ndarray, np.ndarray]] = []
        strategy = "none"
    elif folds == "kfold" or isinstance(folds, int):
        n_splits = N_SPLITS if folds == "kfold" else int(folds)
        fold_list = seeded_kfold(labelled_ids, n_splits, random_state)
        strategy = f"seeded KFold({n_splits}, shuffle=True, random_state={random_state}) on the labelled ids"
    else:
        fold_list = official_folds(str(folds), labelled_ids)
        strategy = (
            f"{folds} official folds (matbench_v0.1_validation.json) restricted to the ids present"
        )
    prov = {"fold_strategy": strategy, "seed": random_state, "n_labelled": len(labelled_ids)}
    if pool is not None:
        prov["n_unlabelled_pool"] = len(pool)
    prov.update(provenance or {})
    return Task(
        name=name,
        target_name=target_name,
        unit=unit,
        structures=structs,
        targets=y_series,
        folds=fold_list,
        source="local",
        provenance=prov,
        unlabelled_pool=pool,
    )


def task_from_structures(
    structures: Sequence[Structure] | pd.Series | Mapping[str, Structure],
    targets: Sequence[float] | pd.Series | None = None,
    ids: Sequence[str] | None = None,
    *,
    name: str = "structures",
    target_name: str = "target",
    unit: str | None = None,
    n_splits: int | None = N_SPLITS,
    random_state: int = MATBENCH_SEED,
    missing_target: MissingTarget = "raise",
) -> Task:
    """A task from structures (list, Series or ``{id: structure}``) and optional targets.

    Ids: ``ids`` if given, else the Series index / mapping keys, else ``"0"``, ``"1"``, ....
    Folds: seeded ``KFold(n_splits)`` over the labelled ids (``n_splits=None``: none).
    """
    if isinstance(structures, Mapping):
        default_ids, items = list(structures.keys()), list(structures.values())
    elif isinstance(structures, pd.Series):
        default_ids, items = list(structures.index), list(structures)
    else:
        items = list(structures)
        default_ids = [str(i) for i in range(len(items))]
    ids = default_ids if ids is None else list(ids)
    if (
        isinstance(targets, pd.Series)
        and isinstance(structures, pd.Series)
        and not targets.index.equals(structures.index)
    ):
        raise ValueError("targets and structures Series have different indexes")
    y = None if targets is None else list(targets)
    return build_task(
        name,
        ids,
        items,
        y,
        target_name=target_name,
        unit=unit,
        folds=n_splits,
        random_state=random_state,
        missing_target=missing_target,
        provenance={"source": "in-memory structures"},
    )


def task_from_dataframe(
    df: pd.DataFrame,
    structure_column: str = "structure",
    target_column: str | None = None,
    *,
    id_column: str | None = None,
    name: str = "dataframe",
    unit: str | None = None,
    n_splits: int | None = N_SPLITS,
    random_state: int = MATBENCH_SEED,
    missing_target: MissingTarget = "raise",
) -> Task:
    """A task from a DataFrame of structures (pymatgen objects or their dicts).

    Ids come from ``id_column`` or the index (as strings). ``target_column=None`` gives an
    unlabelled task.
    """
    for col in (structure_column, target_column, id_column):
        if col is not None and col not in df.columns:
            raise KeyError(
                f"column {col!r} not in the DataFrame (columns: {', '.join(map(str, df.columns))})"
            )
    ids = (df.index if id_column is None else df[id_column]).astype(str).tolist()
    targets = None if target_column is None else df[target_column].tolist()
    return build_task(
        name,
        ids,
        list(df[structure_column]),
        targets,
        target_name=target_column or "target",
        unit=unit,
        folds=n_splits,
        random_state=random_state,
        missing_target=missing_target,
        provenance={"source": "DataFrame"},
    )
