"""Reproducibility: the same seed and data give the same predictions on CPU, in any process,
and every result records its seed, library versions and data sha256."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pymatgen.io.cif import CifWriter
from tiny_settings import TINY

from matbench_dim.bench import matbench_io
from matbench_dim.bench import results as res
from matbench_dim.bench.grid import run_grid
from matbench_dim.data import task as data
from matbench_dim.data.cif import load_cif_dataset
from matbench_dim.data.sources import load_task, sha256_file
from matbench_dim.estimator import SiteNetDIMRegressor

FIT_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
from pymatgen.core import Structure
from matbench_dim.estimator import SiteNetDIMRegressor

inputs, out, params = sys.argv[1:4]
d = json.loads(Path(inputs).read_text())
X, X_unlab, X_test = ([Structure.from_dict(s) for s in d[k]] for k in ("X", "X_unlab", "X_test"))
est = SiteNetDIMRegressor(**json.loads(params)).fit(X, np.asarray(d["y"]), X_unlabeled=X_unlab)
Path(out).write_text("\\n".join(float(v).hex() for v in est.predict(X_test)))
"""

VERSIONED = ("matbench-dim", "numpy", "scikit-learn", "torch", "pymatgen", "matminer", "matbench")


def split(real_structures, real_targets):
    return {
        "X": real_structures[:12],
        "y": list(map(float, real_targets[:12])),
        "X_unlab": real_structures[12:20],
        "X_test": real_structures[20:],
    }


def test_same_seed_same_predictions_across_processes(real_structures, real_targets, tmp_path):
    parts = split(real_structures, real_targets)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(
        json.dumps({k: v if k == "y" else [s.as_dict() for s in v] for k, v in parts.items()})
    )
    script = tmp_path / "fit.py"
    script.write_text(FIT_SCRIPT)
    params = json.dumps({**TINY, "random_state": 7})
    env = {**os.environ, "MATBENCH_DIM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    outs = [tmp_path / f"pred{i}.txt" for i in range(2)]
    procs = [  # two processes at once, started with different hash seeds
        subprocess.Popen(
            [sys.executable, str(script), str(inputs), str(out), params],
            env={**env, "PYTHONHASHSEED": str(seed)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for out, seed in zip(outs, (1, 2), strict=True)
    ]
    in_process = SiteNetDIMRegressor(**TINY, random_state=7).fit(
        parts["X"], np.asarray(parts["y"]), X_unlabeled=parts["X_unlab"]
    )
    mine = in_process.predict(parts["X_test"])
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        assert p.returncode == 0, stdout.decode()
    first, second = (out.read_text().split() for out in outs)
    assert len(first) == len(parts["X_test"])
    assert first == second, "two processes with the same seed disagree"
    assert [float.fromhex(v) for v in first] == mine.tolist(), "the test process disagrees"
    assert np.isfinite(mine).all()
    assert len(set(first)) > 1, "predictions depend on the input"


def test_saved_model_records_seed_and_versions(real_structures, real_targets, tmp_path):
    est = SiteNetDIMRegressor(**TINY, random_state=5).fit(real_structures[:6], real_targets[:6])
    meta = json.loads((est.save(tmp_path / "model") / "config.json").read_text())
    assert meta["params"]["random_state"] == 5
    for name in ("torch", "numpy", "scikit-learn", "pymatgen"):
        assert meta["versions"][name] == metadata.version(name)


# ------------------------------------------------------------------------------ results


@pytest.fixture(scope="module")
def jdft2d_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    task = load_task("sample:matbench_jdft2d")
    run_grid(
        [task], out, folds=[1], n_labels=[20], seeds=[3], methods=["dummy_mean"], tracking=False
    )
    return task, out


def test_cell_results_carry_seed_versions_and_data_sha256(jdft2d_grid):
    task, out = jdft2d_grid
    (path,) = res.iter_cells(out)
    raw = json.loads(path.read_text())
    assert raw["seed"] == 3
    assert raw["fold"] == 1
    assert raw["params"]["subset_seed"] == 1003
    assert raw["data_sha256"] == sha256_file(task.provenance["path"])
    for name in VERSIONED:
        assert raw["versions"][name] == metadata.version(name), name
    assert len(raw["subset_sha256"]) == 64


def fold_params(task: data.Task, out: Path) -> dict:
    """The params recorded with fold 1 in the grid's only (partial) matbench file."""
    (path,) = (out / "matbench").rglob("*.json")
    mb = matbench_io.load_benchmark(path)
    return dict(mb.tasks_map[task.name].results["fold_1"].parameters)


def test_matbench_params_carry_seed_and_versions(jdft2d_grid):
    task, out = jdft2d_grid
    params = fold_params(task, out)
    assert params["seed"] == 3
    assert params["n_labels"] == 20
    for name in VERSIONED:
        assert params["versions"][name] == metadata.version(name), name


def test_matbench_params_carry_the_data_sha256(jdft2d_grid):
    task, out = jdft2d_grid
    params = fold_params(task, out)
    assert params["data_sha256"] == sha256_file(task.provenance["path"])


def cell_data_sha256(task: data.Task, out: Path) -> str:
    run_grid(
        [task], out, folds=[0], n_labels=[4], seeds=[0], methods=["dummy_mean"], tracking=False
    )
    (path,) = res.iter_cells(out)
    return res.read_cell(path).data_sha256


def write_cif_folder(folder: Path, structures, targets) -> list[str]:
    folder.mkdir()
    names = [f"c{i:02d}" for i in range(len(structures))]
    for name, s in zip(names, structures, strict=True):
        (folder / f"{name}.cif").write_text(str(CifWriter(s)))
    pd.DataFrame({"file": names, "target": targets}).to_csv(folder / "targets.csv", index=False)
    return names


def test_data_sha256_of_a_cif_folder_follows_its_content(real_structures, real_targets, tmp_path):
    structures, targets = real_structures[:10], list(real_targets[:10])
    write_cif_folder(tmp_path / "a", structures, targets)
    task_a = load_cif_dataset(tmp_path / "a")
    sha_a = cell_data_sha256(task_a, tmp_path / "out_a")
    assert sha_a == task_a.provenance["sha256"]
    assert sha_a == cell_data_sha256(load_cif_dataset(tmp_path / "a"), tmp_path / "out_a2")

    moved = structures[3].copy()
    moved.translate_sites([0], [0.01, 0.0, 0.0])  # same ids, targets and folds; one atom moved
    write_cif_folder(tmp_path / "b", [*structures[:3], moved, *structures[4:]], targets)
    assert cell_data_sha256(load_cif_dataset(tmp_path / "b"), tmp_path / "out_b") != sha_a
    write_cif_folder(tmp_path / "c", structures, [t + 1.0 for t in targets])  # other targets
    assert cell_data_sha256(load_cif_dataset(tmp_path / "c"), tmp_path / "out_c") != sha_a


def test_data_sha256_of_a_zip_follows_its_external_targets(real_structures, real_targets, tmp_path):
    names = write_cif_folder(tmp_path / "cifs", real_structures[:10], list(real_targets[:10]))
    archive = tmp_path / "cifs.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name in names:
            zf.write(tmp_path / "cifs" / f"{name}.cif", f"{name}.cif")
    shas = []
    for shift in (0.0, 1.0):
        csv = tmp_path / f"targets{shift}.csv"
        pd.DataFrame({"file": names, "target": np.asarray(real_targets[:10]) + shift}).to_csv(
            csv, index=False
        )
        shas.append(cell_data_sha256(load_cif_dataset(archive, csv), tmp_path / f"out{shift}"))
    assert shas[0] != shas[1]


def test_data_sha256_of_an_in_memory_task_follows_its_structures(
    real_structures, real_targets, tmp_path
):
    targets = list(real_targets[:10])
    task_a = data.task_from_structures(real_structures[:10], targets)
    task_b = data.task_from_structures(real_structures[10:20], targets)
    assert cell_data_sha256(task_a, tmp_path / "a") != cell_data_sha256(task_b, tmp_path / "b")
