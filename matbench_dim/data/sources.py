"""Where tasks come from: matbench (through matbench itself), local matminer files, samples.

Data files are looked for in this order (the first directory holding the file wins):

1. the ``data_home`` argument, when given (then nothing else is searched);
2. ``$MATBENCH_DIM_SHARED_DATA``;
3. ``$MATMINER_DATA`` (the variable matminer itself reads);
4. ``../shared/data`` next to the repository (a development checkout);
5. matbench tasks only: matminer's default data home (where an online
   ``matminer.datasets.load_dataset`` stores its downloads), then the files shipped in
   ``matbench_dim/data/samples`` (the full ``matbench_jdft2d.json.gz``).

A missing file raises :class:`DataNotFoundError` at once, naming the file and where to put
it; no download is attempted unless ``download=True`` is passed to
:func:`load_matbench_task`. It builds tasks with :mod:`matbench_dim.data.task`, below it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from matbench_dim.data.task import MATBENCH_SEED, Task, build_task

logger = logging.getLogger(__name__)

SHARED_DATA_ENV = "MATBENCH_DIM_SHARED_DATA"
MATMINER_DATA_ENV = "MATMINER_DATA"
SAMPLE_PREFIX = "sample:"
_REPO_ROOT = Path(__file__).resolve().parents[2]
REPO_SHARED_DATA: Path | None = (
    _REPO_ROOT.parent / "shared" / "data" if (_REPO_ROOT / "pyproject.toml").is_file() else None
)
"""``../shared/data`` next to the repository root; ``None`` outside a source checkout."""

PathLike = str | os.PathLike[str]


class DataNotFoundError(FileNotFoundError):
    """A data file is not on this machine; the message says which file to put where."""


def datasets_dir() -> Path:
    """Directory of the data files shipped inside the package (``matbench_dim/data/samples``)."""
    return Path(str(resources.files("matbench_dim") / "data" / "samples"))


def sha256_file(path: PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------


def data_search_path(data_home: PathLike | None = None) -> list[tuple[str, Path]]:
    """``[(label, directory), ...]`` searched for local data files, in order (module doc)."""
    if data_home is not None:
        return [("data_home argument", Path(data_home).expanduser())]
    out = []
    for env in (SHARED_DATA_ENV, MATMINER_DATA_ENV):
        if os.environ.get(env):
            out.append((f"${env}", Path(os.environ[env]).expanduser()))
    if REPO_SHARED_DATA is not None:
        out.append(("../shared/data next to the repository", REPO_SHARED_DATA))
    return out


def matbench_search_path(data_home: PathLike | None = None) -> list[tuple[str, Path]]:
    """Search path for matbench task files: :func:`data_search_path`, then matminer's
    default data home and the package's shipped files (only when ``data_home`` is None)."""
    out = data_search_path(data_home)
    if data_home is None:
        matminer = importlib.util.find_spec("matminer")  # its folder, without importing it
        if matminer is not None and matminer.submodule_search_locations:
            home = Path(next(iter(matminer.submodule_search_locations))) / "datasets"
            out.append(("matminer's default data home", home))
        out.append(("shipped in matbench_dim/data/samples", datasets_dir()))
    return out


def find_data_file(
    relpaths: Sequence[str], search: Sequence[tuple[str, Path]], how_to_get: str = ""
) -> Path:
    """First existing ``<directory>/<relpath>``, directories in ``search`` order.

    Raises
    ------
    DataNotFoundError
        Naming the file, every place searched and where to get it.
    """
    for _, directory in search:
        for rel in relpaths:
            candidate = directory / rel
            if candidate.is_file():
                return candidate
    where = "; ".join(f"{label}: {directory}" for label, directory in search)
    # suggest the first place the user chose (argument, env), else where matminer downloads
    # suggest a place the user chose (argument, env) or the checkout's ../shared/data, never
    # a folder inside an installed environment (matminer's data home lives in site-packages)
    chosen = [
        d
        for label, d in search
        if label == "data_home argument" or label.startswith(("$", "../shared"))
    ]
    put = (
        f"Put the file at {chosen[0] / relpaths[0]}, or point"
        if chosen
        else "Put the file in a folder of your choice and point"
    )
    raise DataNotFoundError(
        f"{relpaths[0]} not found (searched {where}). {put} data_home / ${SHARED_DATA_ENV} / "
        f"${MATMINER_DATA_ENV} at the folder holding it. {how_to_get}".rstrip()
    )


@contextlib.contextmanager
def matminer_data_home(directory: PathLike | None) -> Iterator[None]:
    """Set ``$MATMINER_DATA`` to ``directory`` for the duration (``None``: leave it alone).

    Not thread-safe (the environment is process-wide).
    """
    if directory is None:
        yield
        return
    old = os.environ.get(MATMINER_DATA_ENV)
    os.environ[MATMINER_DATA_ENV] = str(directory)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(MATMINER_DATA_ENV, None)
        else:
            os.environ[MATMINER_DATA_ENV] = old


# --------------------------------------------------------------------------------------
# matbench tasks
# --------------------------------------------------------------------------------------


MATBENCH_STRUCTURE_TASKS: tuple[str, ...] = (
    "matbench_dielectric",
    "matbench_jdft2d",
    "matbench_log_gvrh",
    "matbench_log_kvrh",
    "matbench_mp_e_form",
    "matbench_mp_gap",
    "matbench_mp_is_metal",
    "matbench_perovskites",
    "matbench_phonons",
)
"""matbench v0.1's structure tasks, written out so that listing them does not load matbench
(about a second); a test checks it against ``matbench.metadata``."""


def matbench_task_names(input_type: str | None = "structure") -> list[str]:
    """Names of matbench v0.1 tasks (``input_type=None``: all 13, composition ones too)."""
    if input_type == "structure":
        return list(MATBENCH_STRUCTURE_TASKS)
    from matbench.metadata import mbv01_metadata

    return [
        k for k, v in mbv01_metadata.items() if input_type is None or v.input_type == input_type
    ]


def task_data_file(name: str, data_home: PathLike | None = None) -> Path | None:
    """Where the data of task ``name`` is on this machine, or ``None`` when it is not here.

    Looks only for the file (no loading, no matbench or matminer import): a matbench task's
    ``<name>.json.gz`` on the matbench search path, a local set's file on the data search
    path, a sample in the package.
    """
    if name.startswith(SAMPLE_PREFIX):
        base = name[len(SAMPLE_PREFIX) :]
        spec = SAMPLE_DATASETS.get(base)
        path = datasets_dir() / (spec.sample if spec else f"{base}.json.gz")
        return path if path.is_file() else None
    if name in LOCAL_DATASETS:
        relpaths, search = LOCAL_DATASETS[name].files, data_search_path(data_home)
    else:
        relpaths, search = (f"{name}.json.gz",), matbench_search_path(data_home)
    try:
        return find_data_file(relpaths, search) if relpaths else None
    except DataNotFoundError:
        return None


def matbench_data_file(name: str, data_home: PathLike | None = None) -> Path:
    """Path of the ``<name>.json.gz`` matbench would read, found without downloading.

    Raises
    ------
    DataNotFoundError
        When no searched directory holds the file (the message gives matminer's URL).
    """
    from matminer.datasets.utils import _load_dataset_dict

    meta = _load_dataset_dict()[name]
    filename = f"{name}.{meta['file_type']}"
    how = (
        f"Online, matminer downloads it from {meta['url']} (matminer.datasets.load_dataset"
        f"({name!r}), or load_matbench_task({name!r}, download=True))."
    )
    return find_data_file([filename], matbench_search_path(data_home), how)


def _check_matbench_name(name: str) -> None:
    from matbench.metadata import mbv01_metadata

    structure_tasks = ", ".join(matbench_task_names())
    if name not in mbv01_metadata:
        raise ValueError(
            f"unknown matbench task {name!r}; matbench v0.1 structure tasks: {structure_tasks}"
        )
    if mbv01_metadata[name].input_type != "structure":
        raise ValueError(
            f"{name} is a composition task; matbench-dim needs crystal structures. "
            f"Structure tasks: {structure_tasks}"
        )


def load_matbench_task(
    name: str, data_home: PathLike | None = None, *, download: bool = False
) -> Task:
    """Load a matbench v0.1 structure task through matbench itself.

    ``MatbenchBenchmark(autoload=False, subset=[name])`` then ``task.load()``, which reads
    ``<dir>/<name>.json.gz`` with ``$MATMINER_DATA`` set to the directory found (module doc
    gives the search order). Ids are matbench's mbids (``mb-jdft2d-001``); folds come from
    ``get_train_and_val_data(fold)`` / ``get_test_data(fold)``.

    Parameters
    ----------
    name
        A matbench structure task, e.g. ``matbench_jdft2d`` or ``matbench_mp_gap``.
    data_home
        Directory holding ``<name>.json.gz``; ``None`` searches the default places.
    download
        Let matminer download a missing file into ``data_home`` (or its own data home).
        Needs internet: offline, matminer retries for minutes before failing.

    Raises
    ------
    ValueError
        Unknown or composition-only task name.
    DataNotFoundError
        The file is absent and ``download`` is False.
    """
    from matbench.bench import MatbenchBenchmark
    from matbench.constants import VERSION
    from matbench.metadata import mbv01_metadata

    _check_matbench_name(name)
    meta = mbv01_metadata[name]
    path = None if download else matbench_data_file(name, data_home)
    directory = data_home if path is None else path.parent
    t0 = time.perf_counter()
    with matminer_data_home(directory):
        mb = MatbenchBenchmark(autoload=False, subset=[name])
        mtask = mb.tasks_map[name]
        mtask.load()
        if path is None:
            path = matbench_data_file(name, directory)
    df = mtask.df
    folds = [
        (
            mtask.get_train_and_val_data(f)[0].index.to_numpy(dtype=object),
            mtask.get_test_data(f).index.to_numpy(dtype=object),
        )
        for f in mtask.folds
    ]
    task = Task(
        name=name,
        target_name=meta.target,
        unit=meta.unit,
        structures=df[meta.input_type],
        targets=df[meta.target].astype(float),
        folds=folds,
        source="matbench",
        provenance={
            "path": str(path),
            "sha256": sha256_file(path),
            "n_rows": len(df),
            "fold_strategy": "matbench_v0.1 official folds (matbench_v0.1_validation.json)",
            "seed": MATBENCH_SEED,
            "matbench_version": VERSION,
        },
        task_type=meta.task_type,
        matbench_task=mtask,
    )
    logger.info(
        "loaded %s (%d entries) from %s in %.1f s", name, len(df), path, time.perf_counter() - t0
    )
    return task


# --------------------------------------------------------------------------------------
# Local matminer-format datasets and the shipped samples
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalDataset:
    """How to read one local matminer-format dataset.

    Attributes
    ----------
    files
        Paths tried inside each data directory (empty: only a sample exists).
    sample
        File name of the sample shipped in ``matbench_dim/data/samples``.
    targets
        Accepted target name (or alias) -> ``(column, unit)``.
    id_column
        Column giving the ids (``None``: the file's index).
    folds
        ``"kfold"`` (seeded ``KFold(5)`` on the labelled rows) or a matbench task name whose
        official fold membership is used, restricted to the ids present.
    """

    name: str
    files: tuple[str, ...]
    sample: str
    targets: Mapping[str, tuple[str, str]]
    default_target: str
    id_column: str | None
    folds: str
    description: str


LOCAL_DATASETS: dict[str, LocalDataset] = {
    "perovskites_subset": LocalDataset(
        name="perovskites_subset",
        files=(
            "subsets/matbench_perovskites_partial.json.gz",
            "matbench_perovskites_partial.json.gz",
        ),
        sample="perovskites_subset_sample.json.gz",
        targets={
            "e_form": ("e_form", "eV/unit cell"),
            "gap": ("gap gllbsc", "eV"),
            "gap gllbsc": ("gap gllbsc", "eV"),
        },
        default_target="e_form",
        id_column=None,
        folds="matbench_perovskites",
        description="11,742 of the 18,928 matbench_perovskites crystals; official ids/folds",
    ),
    "flla": LocalDataset(
        name="flla",
        files=("flla.json.gz",),
        sample="flla_sample.json.gz",
        targets={
            "formation_energy_per_atom": ("formation_energy_per_atom", "eV/atom"),
            "e_form": ("formation_energy_per_atom", "eV/atom"),
            "e_above_hull": ("e_above_hull", "eV/atom"),
            "formation_energy": ("formation_energy", "eV"),
        },
        default_target="formation_energy_per_atom",
        id_column="material_id",
        folds="kfold",
        description="matminer flla: 3,938 Materials Project crystals (about 2015)",
    ),
    "jarvis_dft_2d": LocalDataset(
        name="jarvis_dft_2d",
        files=("jarvis_dft_2d.json.gz",),
        sample="jarvis_dft_2d_sample.json.gz",
        targets={
            "e_form": ("e_form", "eV/atom"),
            "gap opt": ("gap opt", "eV"),
            "gap": ("gap opt", "eV"),
            "gap tbmbj": ("gap tbmbj", "eV"),
            "exfoliation_en": ("exfoliation_en", "meV/atom"),
        },
        default_target="e_form",
        id_column="jid",
        folds="kfold",
        description="matminer jarvis_dft_2d: 636 2D materials; sparse band gaps",
    ),
}

SAMPLE_DATASETS: dict[str, LocalDataset] = {
    **LOCAL_DATASETS,
    "matbench_phonons": LocalDataset(
        name="matbench_phonons",
        files=(),
        sample="matbench_phonons_sample.json.gz",
        targets={"last phdos peak": ("last phdos peak", "cm^-1")},
        default_target="last phdos peak",
        id_column=None,
        folds="matbench_phonons",
        description="200 matbench_phonons crystals with their official ids and folds",
    ),
}
"""Samples shipped in ``matbench_dim/data/samples`` (``matbench_jdft2d`` is shipped in full)."""

SHIPPED_MATBENCH = ("matbench_jdft2d",)


def target_unit(task: str, target: str) -> str:
    """The unit of ``target`` of a built-in task (``""`` when unknown), without loading data."""
    spec = LOCAL_DATASETS.get(task.removeprefix(SAMPLE_PREFIX))
    if spec is not None:
        for alias, (column, unit) in spec.targets.items():
            if target in (alias, column):
                return unit
        return ""
    if task.removeprefix(SAMPLE_PREFIX) in MATBENCH_STRUCTURE_TASKS:
        from matbench.metadata import mbv01_metadata

        return str(mbv01_metadata[task.removeprefix(SAMPLE_PREFIX)].unit or "")
    return ""


def available_tasks() -> list[str]:
    """Every name :func:`load_task` accepts."""
    samples = [*SAMPLE_DATASETS, *SHIPPED_MATBENCH]
    return [*matbench_task_names(), *LOCAL_DATASETS, *(SAMPLE_PREFIX + s for s in samples)]


def load_task(
    name: str,
    target: str | None = None,
    data_home: PathLike | None = None,
    sample: bool = False,
) -> Task:
    """Load a task by name: a matbench task, a local dataset or a shipped sample.

    Parameters
    ----------
    name
        A matbench structure task (``matbench_jdft2d``, ``matbench_mp_gap``, ...),
        ``perovskites_subset``, ``flla`` or ``jarvis_dft_2d``; ``sample:<name>`` is the
        same as ``sample=True``.
    target
        For local datasets: ``perovskites_subset`` ``e_form`` (default) or ``gap``;
        ``flla`` ``formation_energy_per_atom``; ``jarvis_dft_2d`` ``e_form`` (default) or
        ``gap opt``. A matbench task accepts only its own target.
    data_home
        Directory holding the full files (module doc gives the default search order).
    sample
        Load the small sample shipped in the package (no data files needed). The
        matbench_jdft2d file is shipped in full and loaded through matbench.
    """
    if name.startswith(SAMPLE_PREFIX):
        name, sample = name[len(SAMPLE_PREFIX) :], True
    if sample and name in SHIPPED_MATBENCH:
        return _load_matbench_with_target(name, target, datasets_dir())
    if sample:
        if name not in SAMPLE_DATASETS:
            raise ValueError(
                f"no sample shipped for {name!r}; samples: "
                f"{', '.join([*SAMPLE_DATASETS, *SHIPPED_MATBENCH])}"
            )
        spec = SAMPLE_DATASETS[name]
        return load_local_dataset(spec, target, datasets_dir() / spec.sample, sample=True)
    if name in LOCAL_DATASETS:
        spec = LOCAL_DATASETS[name]
        how = f"Without it, load_task({name!r}, sample=True) loads the shipped sample."
        return load_local_dataset(
            spec, target, find_data_file(spec.files, data_search_path(data_home), how)
        )
    if name in matbench_task_names(None):
        return _load_matbench_with_target(name, target, data_home)
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available_tasks())}")


def _load_matbench_with_target(name: str, target: str | None, data_home: PathLike | None) -> Task:
    from matbench.metadata import mbv01_metadata

    _check_matbench_name(name)
    own = mbv01_metadata[name].target
    if target is not None and target != own:
        raise ValueError(f"{name} has a single target, {own!r}; got target={target!r}")
    return load_matbench_task(name, data_home)


def load_local_dataset(
    spec: LocalDataset, target: str | None, path: PathLike, *, sample: bool = False
) -> Task:
    """Read a matminer-format file described by ``spec`` into a :class:`Task`.

    Rows whose target is missing are in no fold; their structures go to
    ``Task.unlabelled_pool``, which ``Task.unlabelled_structures(fold)`` offers to
    pretraining. Infinite or non-numeric targets raise.
    """
    from matminer.utils.io import load_dataframe_from_json

    alias = spec.default_target if target is None else target
    if alias not in spec.targets:
        raise ValueError(
            f"unknown target {alias!r} for {spec.name}; choose from {', '.join(spec.targets)}"
        )
    column, unit = spec.targets[alias]
    t0 = time.perf_counter()
    df = load_dataframe_from_json(str(path), pbar=False)
    for col in ("structure", column, spec.id_column):
        if col is not None and col not in df.columns:
            raise ValueError(
                f"{path}: no column {col!r} (columns: {', '.join(map(str, df.columns))})"
            )
    ids = (df.index if spec.id_column is None else df[spec.id_column]).astype(str).tolist()
    name = SAMPLE_PREFIX + spec.name if sample else spec.name
    task = build_task(
        name,
        ids,
        list(df["structure"]),
        df[column].tolist(),
        target_name=column,
        unit=unit,
        folds=spec.folds,
        provenance={
            "path": str(path),
            "sha256": sha256_file(path),
            "n_rows": len(df),
            "sample": sample,
        },
        missing_target="unlabelled",
    )
    logger.info(
        "loaded %s (%d rows, target %r) from %s in %.1f s",
        name, len(df), column, path, time.perf_counter() - t0,
    )  # fmt: skip
    return task
