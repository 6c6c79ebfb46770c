"""Shared fixtures: small sets of real structures shipped inside the package."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("MATBENCH_DIM_NUM_THREADS", "1")

# Never let a test write into the repository's mlruns/: default MLflow store for the session.
_MLRUNS_TMP = tempfile.mkdtemp(prefix="matbench-dim-mlruns-")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_MLRUNS_TMP}/mlflow.db")

import torch  # noqa: E402 - after the environment above is set

torch.set_num_threads(int(os.environ["MATBENCH_DIM_NUM_THREADS"]))


SHARED_MARK = "shared_data"


@pytest.fixture(autouse=True)
def only_shipped_data(request, monkeypatch):
    """Tests see only the samples shipped in the package, never ``../shared`` by accident.

    ``$MATBENCH_DIM_SHARED_DATA``, ``$MATMINER_DATA`` and the checkout's ``../shared/data``
    are hidden from the data search path, except for tests marked
    ``@pytest.mark.shared_data(<files>)``, which get them (through ``shared_data_dir``).
    """
    if request.node.get_closest_marker(SHARED_MARK) is not None:
        return
    from matbench_dim.data import sources

    monkeypatch.delenv(sources.SHARED_DATA_ENV, raising=False)
    monkeypatch.delenv(sources.MATMINER_DATA_ENV, raising=False)
    monkeypatch.setattr(sources, "REPO_SHARED_DATA", None)


def embedded_dataset_path(name: str) -> Path:
    """Path of a data file shipped in ``matbench_dim/data/samples``."""
    return Path(str(resources.files("matbench_dim") / "data" / "samples" / name))


@pytest.fixture(scope="session")
def jdft2d_df():
    """The full matbench_jdft2d task (636 real 2D materials), as shipped in the package."""
    from matminer.utils.io import load_dataframe_from_json

    return load_dataframe_from_json(
        str(embedded_dataset_path("matbench_jdft2d.json.gz")), pbar=False
    )


@pytest.fixture(scope="session")
def real_structures(jdft2d_df):
    """24 real structures of varied size (2 to 40 sites) from matbench_jdft2d, deterministic."""
    df = jdft2d_df.assign(nsites=[len(s) for s in jdft2d_df["structure"]]).sort_values(
        ["nsites", "exfoliation_en"], kind="stable"
    )
    picks = df.iloc[:: max(1, len(df) // 24)].head(24)
    return list(picks["structure"])


@pytest.fixture(scope="session")
def real_targets(jdft2d_df, real_structures):
    """Exfoliation energies (meV/atom) matching ``real_structures``."""
    by_id = {
        id(s): y for s, y in zip(jdft2d_df["structure"], jdft2d_df["exfoliation_en"], strict=True)
    }
    return [by_id[id(s)] for s in real_structures]


def _shared_root() -> Path | None:
    env = os.environ.get("MATBENCH_DIM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    return next((c for c in candidates if c.is_dir()), None)


@pytest.fixture
def shared_data_dir(request) -> Path:
    """``../shared/data`` (or ``$MATBENCH_DIM_SHARED_DATA``) for a test marked
    ``@pytest.mark.shared_data("file", ...)``; skips when any named file is absent (a partial
    ``../shared`` skips, it does not fail)."""
    mark = request.node.get_closest_marker(SHARED_MARK)
    if mark is None:
        raise pytest.UsageError("shared_data_dir needs @pytest.mark.shared_data(<files>)")
    root = _shared_root()
    missing = [f for f in mark.args if root is None or not (root / f).is_file()]
    if missing:
        pytest.skip(f"full data files not on this machine: {', '.join(missing)}")
    return root


@pytest.fixture(scope="session")
def perovskite_sample_task():
    """300 real matbench_perovskites crystals (official ids, e_form target, official folds)."""
    from matbench_dim.data.sources import load_task

    return load_task("perovskites_subset", sample=True)


@pytest.fixture(scope="session")
def flla_sample_task():
    """300 real flla crystals (formation_energy_per_atom, eV/atom; seeded 5-fold KFold)."""
    from matbench_dim.data.sources import load_task

    return load_task("flla", sample=True)


@pytest.fixture
def user_cif_folder(tmp_path, flla_sample_task):
    """60 real flla structures as CIFs, a labels.csv with 10 empty targets."""
    folder = tmp_path / "my_cifs"
    folder.mkdir()
    structures = flla_sample_task.structures.iloc[:60]
    targets = flla_sample_task.targets.loc[structures.index]
    rows = []
    for k, (sid, s) in enumerate(structures.items()):
        (folder / f"{sid}.cif").write_text(s.to(fmt="cif"))
        rows.append({"file": f"{sid}.cif", "e_form": "" if k % 6 == 5 else targets[sid]})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    return folder


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow SQLite store (creating its tables takes seconds)."""
    from matbench_dim.tracking.tracker import setup_tracking

    db = tmp_path_factory.mktemp("template_store") / "mlflow.db"
    setup_tracking(f"sqlite:///{db}", "warm-up")
    return db


@pytest.fixture
def store(empty_store, tmp_path) -> str:
    """A fresh copy of the empty store for one test; its tracking URI."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store, db)
    return f"sqlite:///{db}"
