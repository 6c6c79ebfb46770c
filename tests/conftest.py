"""Shared fixtures: small sets of real structures shipped inside the package."""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

import pytest

os.environ.setdefault("MATBENCH_DIM_NUM_THREADS", "1")

# Never let a test write into the repository's mlruns/: default MLflow store for the session.
_MLRUNS_TMP = tempfile.mkdtemp(prefix="matbench-dim-mlruns-")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_MLRUNS_TMP}/mlflow.db")

import torch  # noqa: E402 - after the environment above is set

torch.set_num_threads(int(os.environ["MATBENCH_DIM_NUM_THREADS"]))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A selection that collects no test (pytest's exit code 5) is not a failure."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.OK


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


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` (or ``$MATBENCH_DIM_SHARED_DATA``); skips the test when absent."""
    env = os.environ.get("MATBENCH_DIM_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "data")
    for c in candidates:
        if (c / "README.md").exists():
            return c
    pytest.skip("the full data files (../shared/data) are not present on this machine")


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
