"""Tasks: matbench loading, local datasets and samples, the user's own data."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymatgen.core import Structure
from pymatgen.io.cif import CifWriter
from sklearn.model_selection import KFold

from matbench_dim.data import cif as cif_mod
from matbench_dim.data import sources
from matbench_dim.data import task as data
from matbench_dim.data.cif import load_cif_dataset
from matbench_dim.data.sources import (
    DataNotFoundError,
    available_tasks,
    data_search_path,
    datasets_dir,
    load_matbench_task,
    load_task,
    sha256_file,
)

OFFICIAL_DUMMY_MAE_JDFT2D = [53.1447, 72.8118, 83.1220, 61.3174, 66.0295]
SAMPLES_DIR = datasets_dir()


def official_splits(task_name: str) -> dict:
    """The official fold membership, read straight from matbench's shipped JSON."""
    import matbench

    path = Path(matbench.__file__).parent / "matbench_v0.1_validation.json"
    return json.loads(path.read_text())["splits"][task_name]


def assert_partition(task: data.Task) -> None:
    """Test sets are disjoint, cover every id, and never overlap their fold's train set."""
    tests = [set(task.test_ids(f)) for f in range(task.n_folds)]
    assert sum(len(t) for t in tests) == len(task)
    assert set().union(*tests) == set(task.ids)
    for f in range(task.n_folds):
        assert not set(task.train_ids(f)) & tests[f]
        assert set(task.train_ids(f)) | tests[f] == set(task.ids)


@pytest.fixture
def no_default_data(monkeypatch, tmp_path):
    """No env data homes and no ../shared/data: only matminer's home and shipped files."""
    monkeypatch.delenv(sources.SHARED_DATA_ENV, raising=False)
    monkeypatch.delenv(sources.MATMINER_DATA_ENV, raising=False)
    monkeypatch.setattr(sources, "REPO_SHARED_DATA", tmp_path / "no_shared")

    def no_download(*args, **kwargs):
        raise AssertionError("matminer tried to download a dataset")

    import matminer.datasets.utils

    monkeypatch.setattr(matminer.datasets.utils, "_fetch_external_dataset", no_download)


# ------------------------------------------------------------------ shipped samples


def test_samples_manifest_matches_the_shipped_files():
    manifest = json.loads((SAMPLES_DIR / "SAMPLES.json").read_text())
    assert set(manifest["samples"]) == set(sources.SAMPLE_DATASETS)
    for name, entry in manifest["samples"].items():
        path = SAMPLES_DIR / entry["file"]
        assert sha256_file(path) == entry["sha256"], name
        assert len(load_task(name, sample=True).provenance) > 0
        assert entry["source_sha256"]
        assert entry["selection"]
    jdft = manifest["shipped_full"]["matbench_jdft2d"]
    assert sha256_file(SAMPLES_DIR / jdft["file"]) == jdft["sha256"]
    total = sum(p.stat().st_size for p in SAMPLES_DIR.glob("*.json.gz"))
    assert total < 2_000_000


def test_perovskite_sample_uses_official_ids_and_folds(perovskite_sample_task):
    task = perovskite_sample_task
    assert task.name == "sample:perovskites_subset"
    assert (task.target_name, task.unit, task.source) == ("e_form", "eV/unit cell", "local")
    assert len(task) == 300
    assert task.n_folds == 5
    assert all(i.startswith("mb-perovskites-") for i in task.ids)
    assert_partition(task)
    splits = official_splits("matbench_perovskites")
    ids = set(task.ids)
    for f, key in enumerate(splits):
        assert len(task.test_ids(f)) == 60
        assert list(task.test_ids(f)) == [i for i in splits[key]["test"] if i in ids]
        assert list(task.train_ids(f)) == [i for i in splits[key]["train"] if i in ids]
    assert task.provenance["sha256"] == sha256_file(task.provenance["path"])
    assert "official" in task.provenance["fold_strategy"]


def test_perovskite_sample_gap_target_keeps_ids_and_folds(perovskite_sample_task):
    gap = load_task("sample:perovskites_subset", target="gap")
    assert (gap.target_name, gap.unit) == ("gap gllbsc", "eV")
    assert list(gap.ids) == list(perovskite_sample_task.ids)
    assert not np.allclose(gap.targets.to_numpy(), perovskite_sample_task.targets.to_numpy())
    for f in range(5):
        assert list(gap.test_ids(f)) == list(perovskite_sample_task.test_ids(f))


def test_flla_sample_folds_are_matbench_seeded_kfold(flla_sample_task):
    task = flla_sample_task
    assert (task.target_name, task.unit) == ("formation_energy_per_atom", "eV/atom")
    assert all(i.startswith("mp-") for i in task.ids)
    kf = KFold(5, shuffle=True, random_state=18012019)
    ids = np.asarray(task.ids)
    for f, (tr, te) in enumerate(kf.split(ids)):
        assert list(task.train_ids(f)) == list(ids[tr])
        assert list(task.test_ids(f)) == list(ids[te])
    assert_partition(task)


def test_task_methods_split_inputs_from_targets(flla_sample_task):
    task = flla_sample_task
    X, y = task.train_data(2)
    assert list(X.index) == list(y.index) == list(task.train_ids(2))
    assert all(isinstance(s, Structure) for s in X)
    assert y.dtype == float
    assert np.isfinite(y).all()
    X_test = task.test_inputs(2)
    assert isinstance(X_test, pd.Series)
    assert list(X_test.index) == list(task.test_ids(2))
    assert all(isinstance(s, Structure) for s in X_test)
    y_test = task.test_targets(2)
    assert list(y_test.index) == list(task.test_ids(2))
    np.testing.assert_array_equal(y_test, task.targets.loc[task.test_ids(2)])
    with pytest.raises(IndexError, match="out of range"):
        task.train_ids(5)
    with pytest.raises(TypeError):
        task.test_ids("0")
    assert "Structure" not in repr(task)
    assert "n=300" in repr(task)


def test_jarvis_sample_keeps_unlabelled_rows_for_pretraining_only():
    task = load_task("jarvis_dft_2d", sample=True)
    assert (task.target_name, task.unit) == ("e_form", "eV/atom")
    assert len(task) + len(task.unlabelled_pool) == 200
    assert len(task.unlabelled_pool) == 3
    assert all(i.startswith("JVASP-") for i in task.ids)
    assert_partition(task)
    pool_ids = set(task.unlabelled_pool.index)
    for f in range(task.n_folds):
        pre = task.unlabelled_structures(f)
        assert set(pre.index) == set(task.train_ids(f)) | pool_ids
        assert not set(pre.index) & set(task.test_ids(f))
        assert np.isfinite(task.test_targets(f)).all()
    everything = task.unlabelled_structures(None)
    assert len(everything) == 200
    gap = load_task("sample:jarvis_dft_2d", target="gap opt")
    assert gap.target_name == "gap opt"
    assert len(gap) < 200
    assert len(gap) + len(gap.unlabelled_pool) == 200


def test_phonons_sample_has_official_mbids_and_folds():
    task = load_task("sample:matbench_phonons")
    assert not task.is_matbench
    assert task.unit == "cm^-1"
    assert all(len(i) == len("mb-phonons-0001") for i in task.ids)
    splits = official_splits("matbench_phonons")
    for f, key in enumerate(splits):
        assert len(task.test_ids(f)) == 40
        assert set(task.test_ids(f)) <= set(splits[key]["test"])
    assert_partition(task)


# ------------------------------------------------------------------ matbench tasks


def test_shipped_jdft2d_loads_through_matbench_without_any_data_home(no_default_data):
    task = load_matbench_task("matbench_jdft2d")
    assert task.is_matbench
    assert task.source == "matbench"
    assert Path(task.provenance["path"]).parent == SAMPLES_DIR
    assert (task.target_name, task.unit, len(task)) == ("exfoliation_en", "meV/atom", 636)
    assert task.ids[0] == "mb-jdft2d-001"
    assert_partition(task)
    splits = official_splits("matbench_jdft2d")
    for f, key in enumerate(splits):
        assert list(task.test_ids(f)) == splits[key]["test"]
        _, y_train = task.train_data(f)
        y_test = task.test_targets(f)
        assert list(y_test.index) == list(task.test_ids(f))
        mae = float(np.mean(np.abs(y_test - y_train.mean())))
        assert mae == pytest.approx(OFFICIAL_DUMMY_MAE_JDFT2D[f], abs=1e-4)
    assert "matbench_task" not in repr(task)


def test_sample_flag_on_jdft2d_reads_the_shipped_full_task():
    task = load_task("sample:matbench_jdft2d")
    assert task.is_matbench
    assert len(task) == 636
    assert Path(task.provenance["path"]).parent == SAMPLES_DIR


def test_matminer_data_is_honoured_and_restored(monkeypatch, tmp_path, no_default_data):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(SAMPLES_DIR / "matbench_jdft2d.json.gz", home)
    monkeypatch.setenv("MATMINER_DATA", str(home))
    task = load_task("matbench_jdft2d")
    assert Path(task.provenance["path"]) == home / "matbench_jdft2d.json.gz"
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(SAMPLES_DIR / "matbench_jdft2d.json.gz", other)
    task = load_matbench_task("matbench_jdft2d", data_home=other)
    assert Path(task.provenance["path"]).parent == other
    assert os.environ["MATMINER_DATA"] == str(home)


@pytest.mark.parametrize("name", ["matbench_mp_gap", "matbench_mp_e_form"])
def test_missing_matbench_file_fails_fast_with_instructions(name, tmp_path, no_default_data):
    with pytest.raises(DataNotFoundError) as err:
        load_matbench_task(name, data_home=tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / (name + '.json.gz')}" in msg
    assert "https://" in msg
    with pytest.raises(DataNotFoundError, match="MATMINER_DATA") as err:
        load_task(name)
    assert "shipped in matbench_dim/data/samples" in str(err.value)


def test_missing_file_message_never_suggests_a_folder_inside_an_installation(
    monkeypatch, no_default_data
):
    monkeypatch.setattr(sources, "REPO_SHARED_DATA", None)  # as in an installed package
    with pytest.raises(DataNotFoundError) as err:
        load_task("matbench_mp_gap")
    msg = str(err.value)
    assert "Put the file in a folder of your choice and point" in msg
    home = next(d for label, d in sources.matbench_search_path() if label.startswith("matminer"))
    assert f"{home / 'matbench_mp_gap.json.gz'}" not in msg  # searched, but not suggested


def test_written_out_matbench_task_names_match_matbench():
    from matbench.metadata import mbv01_metadata

    expected = [k for k, v in mbv01_metadata.items() if v.input_type == "structure"]
    assert list(sources.MATBENCH_STRUCTURE_TASKS) == expected


def test_task_data_file_finds_files_without_loading_them(monkeypatch, tmp_path, no_default_data):
    assert sources.task_data_file("sample:flla") == SAMPLES_DIR / "flla_sample.json.gz"
    assert sources.task_data_file("flla") is None
    assert sources.task_data_file("matbench_mp_gap") is None
    assert sources.task_data_file("matbench_jdft2d") == SAMPLES_DIR / "matbench_jdft2d.json.gz"
    monkeypatch.setenv("MATBENCH_DIM_SHARED_DATA", str(tmp_path))
    (tmp_path / "flla.json.gz").write_bytes(b"")
    assert sources.task_data_file("flla") == tmp_path / "flla.json.gz"


def test_bad_names_and_targets_are_explained():
    with pytest.raises(ValueError, match="matbench_mp_gap") as err:
        load_task("matbench_nonsense")
    assert "perovskites_subset" in str(err.value)
    with pytest.raises(ValueError, match="structure tasks"):
        load_matbench_task("matbench_bogus")
    with pytest.raises(ValueError, match="composition task"):
        load_task("matbench_steels")
    with pytest.raises(ValueError, match="choose from"):
        load_task("flla", target="band_gap", sample=True)
    with pytest.raises(ValueError, match="single target"):
        load_task("matbench_jdft2d", target="e_form", sample=True)
    with pytest.raises(ValueError, match="no sample shipped"):
        load_task("matbench_mp_gap", sample=True)
    assert "sample:flla" in available_tasks()


def test_missing_local_file_lists_every_place_searched(monkeypatch, tmp_path, no_default_data):
    monkeypatch.setenv("MATBENCH_DIM_SHARED_DATA", str(tmp_path / "a"))
    monkeypatch.setenv("MATMINER_DATA", str(tmp_path / "b"))
    labels = [label for label, _ in data_search_path()]
    assert labels[:2] == ["$MATBENCH_DIM_SHARED_DATA", "$MATMINER_DATA"]
    with pytest.raises(DataNotFoundError) as err:
        load_task("flla")
    msg = str(err.value)
    assert str(tmp_path / "a" / "flla.json.gz") in msg
    assert str(tmp_path / "b") in msg
    assert "sample=True" in msg


def test_local_file_found_through_env(monkeypatch, tmp_path, no_default_data):
    (tmp_path / "subsets").mkdir()
    shutil.copy(SAMPLES_DIR / "perovskites_subset_sample.json.gz",
                tmp_path / "subsets" / "matbench_perovskites_partial.json.gz")  # fmt: skip
    monkeypatch.setenv("MATBENCH_DIM_SHARED_DATA", str(tmp_path))
    task = load_task("perovskites_subset")
    assert task.name == "perovskites_subset"
    assert len(task) == 300
    assert Path(task.provenance["path"]).parent == tmp_path / "subsets"


# ------------------------------------------------------------------ the user's own data


def test_task_from_structures_ids_folds_and_errors(real_structures, real_targets):
    task = data.task_from_structures(real_structures, real_targets, name="mine", unit="meV/atom")
    assert list(task.ids) == [str(i) for i in range(24)]
    assert task.n_folds == 5
    assert_partition(task)
    by_id = data.task_from_structures(
        dict(zip("abcdefghijklmnopqrstuvwx", real_structures, strict=True))
    )
    assert by_id.targets is None
    assert by_id.ids[0] == "a"
    with pytest.raises(ValueError, match="no targets"):
        by_id.train_data(0)
    with pytest.raises(ValueError, match=r"missing.*'3'"):
        data.task_from_structures(real_structures, [*real_targets[:3], math.nan, *real_targets[4:]])
    with pytest.raises(ValueError, match=r"infinite.*'5'"):
        data.task_from_structures(real_structures, [*real_targets[:5], np.inf, *real_targets[6:]])
    with pytest.raises(ValueError, match=r"non-numeric.*'2' \('abc'\)"):
        data.task_from_structures(real_structures, [*real_targets[:2], "abc", *real_targets[3:]])
    with pytest.raises(ValueError, match="23 targets for 24"):
        data.task_from_structures(real_structures, real_targets[:-1])
    with pytest.raises(ValueError, match=r"duplicate ids 'x'"):
        data.task_from_structures(real_structures[:2], ids=["x", "x"])
    with pytest.raises(TypeError, match=r"not pymatgen Structures: '1' \(str\)"):
        data.task_from_structures([real_structures[0], "Si"], n_splits=None)
    with pytest.raises(ValueError, match="cannot make 5 folds"):
        data.task_from_structures(real_structures[:3], real_targets[:3])
    no_folds = data.task_from_structures(real_structures[:3], real_targets[:3], n_splits=None)
    with pytest.raises(ValueError, match="no folds"):
        no_folds.test_ids(0)


def test_missing_targets_can_become_an_unlabelled_pool(real_structures, real_targets):
    y = list(real_targets)
    y[0] = y[7] = None
    task = data.task_from_structures(real_structures, y, missing_target="unlabelled")
    assert len(task) == 22
    assert set(task.unlabelled_pool.index) == {"0", "7"}
    for f in range(5):
        assert {"0", "7"} <= set(task.unlabelled_structures(f).index)
        assert not {"0", "7"} & set(task.test_ids(f))


def test_task_from_dataframe_accepts_structure_dicts(jdft2d_df):
    df = jdft2d_df.head(30).copy()
    df["name"] = [f"c{i:02d}" for i in range(30)]
    df["structure"] = [s.as_dict() for s in df["structure"]]
    task = data.task_from_dataframe(df, target_column="exfoliation_en", id_column="name")
    assert task.ids[0] == "c00"
    assert isinstance(task.structures.iloc[0], Structure)
    np.testing.assert_allclose(task.targets, df["exfoliation_en"])
    with pytest.raises(KeyError, match="'gap'"):
        data.task_from_dataframe(df, target_column="gap")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(5, 200), seed=st.integers(0, 2**31 - 1))
def test_seeded_kfold_partitions_any_ids(n, seed):
    ids = [f"id{i}" for i in range(n)]
    folds = data.seeded_kfold(ids, 5, seed)
    tests = [set(te) for _, te in folds]
    assert sum(map(len, tests)) == n
    assert set().union(*tests) == set(ids)
    assert all(not set(tr) & set(te) for tr, te in folds)
    assert max(map(len, tests)) - min(map(len, tests)) <= 1


def write_cifs(folder: Path, structures, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s, name in zip(structures, names, strict=True):
        (folder / f"{name}.cif").write_text(str(CifWriter(s)))


@pytest.fixture
def cif_folder(tmp_path, real_structures, real_targets):
    names = [f"crystal_{i:02d}" for i in range(12)]
    folder = tmp_path / "cifs"
    write_cifs(folder, real_structures[:12], names)
    pd.DataFrame({"file": [f"{n}.cif" for n in names], "target": real_targets[:12]}).to_csv(
        tmp_path / "targets.csv", index=False
    )
    return folder, tmp_path / "targets.csv", names


def test_cif_folder_with_csv(cif_folder, real_structures, real_targets):
    folder, csv, names = cif_folder
    task = load_cif_dataset(folder, csv, unit="meV/atom")
    assert list(task.ids) == names
    assert task.name == "cifs"
    np.testing.assert_allclose(task.targets, real_targets[:12])
    for s, ref in zip(task.structures, real_structures[:12], strict=True):
        assert s.composition == ref.composition
    assert [list(te) for _, te in task.folds] == [list(te) for _, te in data.seeded_kfold(names)]
    assert task.provenance["csv"] == str(csv)


def test_cif_zip_skips_non_cif_members_with_a_warning(cif_folder, tmp_path, caplog):
    folder, csv, names = cif_folder
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for n in names:
            zf.write(folder / f"{n}.cif", f"data/{n}.cif")
        zf.write(csv, "targets.csv")
        zf.writestr("README.txt", "notes")
        zf.writestr("__MACOSX/data/._crystal_00.cif", "junk")
    with caplog.at_level(logging.WARNING, logger="matbench_dim.data.cif"):
        task = load_cif_dataset(archive)
    assert list(task.ids) == names
    assert task.targets is not None
    assert "README.txt" in caplog.text
    assert "__MACOSX" not in caplog.text
    assert task.provenance["skipped_members"] == ["README.txt"]
    assert task.provenance["sha256"] == sha256_file(archive)


def test_cif_errors_name_the_files(cif_folder, tmp_path, real_structures):
    folder, csv, _names = cif_folder
    good = (folder / "crystal_03.cif").read_text()
    lines = good.splitlines(keepends=True)
    (folder / "crystal_03.cif").write_text("".join(lines[:-2]))  # atom list cut short
    (folder / "crystal_05.cif").write_text(good[: len(good) // 2])
    with pytest.raises(cif_mod.CifError) as err:
        load_cif_dataset(folder, csv)
    msg = str(err.value)
    assert "2 unreadable" in msg
    assert "crystal_03.cif" in msg
    assert "crystal_05.cif" in msg
    assert "chemical_formula_sum" in msg


def test_cif_csv_problems_are_listed(cif_folder, tmp_path, real_structures, caplog):
    folder, csv, _names = cif_folder
    table = pd.read_csv(csv)
    bad = table.copy()
    bad.loc[len(bad)] = ["ghost.cif", 1.0]
    bad.to_csv(tmp_path / "ghost.csv", index=False)
    with pytest.raises(ValueError, match=r"absent.*'ghost'"):
        load_cif_dataset(folder, tmp_path / "ghost.csv")
    nan = table.copy()
    nan.loc[4, "target"] = np.nan
    nan.to_csv(tmp_path / "nan.csv", index=False)
    with pytest.raises(ValueError, match=r"missing.*'crystal_04'"):
        load_cif_dataset(folder, tmp_path / "nan.csv")
    words = table.astype({"target": object})
    words.loc[2, "target"] = "n/a?"
    words.to_csv(tmp_path / "words.csv", index=False)
    with pytest.raises(ValueError, match=r"non-numeric.*crystal_02"):
        load_cif_dataset(folder, tmp_path / "words.csv")
    with pytest.raises(ValueError, match="missing column"):
        load_cif_dataset(folder, csv, target_column="band_gap")
    dup = pd.concat([table, table.iloc[[0]]])
    dup.to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(ValueError, match=r"more than once.*crystal_00"):
        load_cif_dataset(folder, tmp_path / "dup.csv")
    table.iloc[:10].to_csv(tmp_path / "short.csv", index=False)
    with caplog.at_level(logging.WARNING, logger="matbench_dim.data.cif"):
        task = load_cif_dataset(folder, tmp_path / "short.csv", n_splits=2)
    assert set(task.unlabelled_pool.index) == {"crystal_10", "crystal_11"}
    assert "no CSV row" in caplog.text
    write_cifs(folder / "more", real_structures[:1], ["crystal_00"])
    with pytest.raises(ValueError, match="duplicate ids"):
        load_cif_dataset(folder, csv)


# ------------------------------------------------------------------ the full shared files


@pytest.mark.shared_data("matbench_jdft2d.json.gz")
def test_full_jdft2d_via_matbench_gives_official_dummy_maes(shared_data_dir):
    task = load_matbench_task("matbench_jdft2d", data_home=shared_data_dir)
    assert Path(task.provenance["path"]).parent == shared_data_dir
    for f in range(5):
        _, y_train = task.train_data(f)
        mae = float(np.mean(np.abs(task.test_targets(f) - y_train.mean())))
        assert mae == pytest.approx(OFFICIAL_DUMMY_MAE_JDFT2D[f], abs=1e-4)


@pytest.mark.shared_data("subsets/matbench_perovskites_partial.json.gz")
def test_full_perovskite_subset_folds_are_official_and_cover_it(shared_data_dir):
    task = load_task("perovskites_subset", data_home=shared_data_dir)
    assert len(task) == 11742
    assert_partition(task)
    splits = official_splits("matbench_perovskites")
    ids = set(task.ids)
    for f, key in enumerate(splits):
        assert set(task.test_ids(f)) == set(splits[key]["test"]) & ids


@pytest.mark.shared_data("flla.json.gz", "jarvis_dft_2d.json.gz")
def test_full_flla_and_jarvis(shared_data_dir):
    flla = load_task("flla", data_home=shared_data_dir)
    assert len(flla) == 3938
    assert flla.provenance["sha256"].startswith("6914947f")
    ids = np.asarray(flla.ids)
    for f, (tr, te) in enumerate(KFold(5, shuffle=True, random_state=18012019).split(ids)):
        assert list(flla.test_ids(f)) == list(ids[te])
        assert list(flla.train_ids(f)) == list(ids[tr])
    jarvis = load_task("jarvis_dft_2d", data_home=shared_data_dir)
    assert (len(jarvis), len(jarvis.unlabelled_pool)) == (633, 3)
    gap = load_task("jarvis_dft_2d", target="gap opt", data_home=shared_data_dir)
    assert (len(gap), len(gap.unlabelled_pool)) == (522, 114)


@pytest.mark.slow  # re-reads four full files (~10-20 s)
@pytest.mark.shared_data(
    "subsets/matbench_perovskites_partial.json.gz",
    "flla.json.gz",
    "jarvis_dft_2d.json.gz",
    "matbench_phonons.json.gz",
)
def test_make_samples_reproduces_the_shipped_bytes(shared_data_dir, tmp_path):
    from matbench_dim.data import make_samples

    shutil.copy(SAMPLES_DIR / "matbench_jdft2d.json.gz", tmp_path)
    manifest = make_samples.make_samples(shared_data_dir, tmp_path)
    shipped = json.loads((SAMPLES_DIR / "SAMPLES.json").read_text())
    assert manifest == shipped
