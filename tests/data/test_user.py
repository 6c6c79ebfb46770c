"""Your own data set by its path: CIF folders / zips with a CSV, matminer files."""

from __future__ import annotations

import zipfile

import pandas as pd
import pytest

from matbench_dim.data.cif import members_sha256
from matbench_dim.data.sources import sha256_file
from matbench_dim.data.user import is_dataset_path, load_matminer_file, load_user_dataset


def test_cif_folder_and_zip_become_tasks_with_folds_pool_and_sha256(user_cif_folder):
    cif_folder = user_cif_folder
    task = load_user_dataset(cif_folder, "e_form")
    assert task.name == "my_cifs"
    assert len(task.structures) == 50  # labelled; the 10 empty targets are unlabelled
    assert len(task.unlabelled_pool) == 10
    assert task.n_folds == 5
    for fold in range(5):
        assert not set(task.train_ids(fold)) & set(task.test_ids(fold))
        assert set(task.unlabelled_pool.index) <= set(task.unlabelled_structures(fold).index)
    assert task.provenance["sha256"] == members_sha256(
        {p.name: p.read_bytes() for p in cif_folder.iterdir()}
    )
    archive = cif_folder.with_suffix(".zip")
    with zipfile.ZipFile(archive, "w") as zf:
        for p in cif_folder.iterdir():
            zf.write(p, p.name)
    zipped = load_user_dataset(archive, "e_form")
    assert list(zipped.structures.index) == list(task.structures.index)
    assert zipped.provenance["sha256"] == sha256_file(archive)
    with pytest.raises(ValueError, match="missing column"):
        load_user_dataset(cif_folder)  # the default target column is `target`


def test_matminer_file_needs_an_unambiguous_target(tmp_path, flla_sample_task):
    from matminer.utils.io import store_dataframe_as_json

    df = pd.DataFrame(
        {
            "structure": list(flla_sample_task.structures.iloc[:30]),
            "e": flla_sample_task.targets.iloc[:30].to_numpy(),
            "twice": 2 * flla_sample_task.targets.iloc[:30].to_numpy(),
        }
    )
    path = tmp_path / "mine.json.gz"
    store_dataframe_as_json(df, str(path), compression="gz")
    with pytest.raises(ValueError, match=r"name the target column \(numeric columns: e, twice\)"):
        load_matminer_file(path)
    task = load_user_dataset(path, "twice")
    assert task.name == "mine"
    assert task.targets.to_list() == pytest.approx(df["twice"].to_list())
    assert task.provenance["sha256"] == sha256_file(path)
    with pytest.raises(ValueError, match="no column 'nope'"):
        load_matminer_file(path, "nope")
    with pytest.raises(FileNotFoundError, match="no such data file"):
        load_user_dataset(tmp_path / "absent.json.gz")


def test_paths_and_names_are_told_apart(tmp_path):
    assert is_dataset_path("cifs/")
    assert is_dataset_path("data.json.gz")
    assert is_dataset_path("structures.zip")
    assert not is_dataset_path("matbench_jdft2d")
    assert not is_dataset_path("sample:flla")
    (tmp_path / "plain").mkdir()
    assert is_dataset_path(str(tmp_path / "plain"))
