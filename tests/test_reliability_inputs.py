"""Bad and unusual input, end to end: every case gets an error naming the entry, or a
documented handling (see docs/failure-modes.md); never a silent NaN, never a lost batch.

The corpus is generated here (pymatgen Structures and CIF text written to ``tmp_path``).
"""

from __future__ import annotations

import functools
import logging
import math
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pymatgen.core import Element, Lattice, Structure
from pymatgen.io.cif import CifWriter
from tiny_settings import TINY

from matbench_dim.bench import matbench_io
from matbench_dim.bench.grid import run_grid
from matbench_dim.bench.subsets import draw_subset
from matbench_dim.data import task as data
from matbench_dim.data.cif import (
    CifError,
    load_cif_dataset,
)
from matbench_dim.data.sources import DataNotFoundError, load_task
from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.features.featurize import (
    FeaturizationError,
    FeaturizerConfig,
    collate,
    featurize,
    featurize_structure,
)
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder, SiteNetRegressorNet

NOBLE_GASES = ["He", "Ne", "Ar", "Kr", "Xe", "Rn"]
ACTINIDES = [Element.from_Z(z).symbol for z in range(89, 104)]  # Ac .. Lr


# ------------------------------------------------------------------------------ the corpus


def rocksalt(a: float = 5.64) -> Structure:
    """Primitive rock-salt NaCl (2 sites)."""
    return Structure(
        Lattice.cubic(a).matrix @ (np.ones((3, 3)) - np.eye(3)) / 2,
        ["Na", "Cl"],
        [[0, 0, 0], [0.5] * 3],
    )


@functools.cache
def unusual_structures() -> dict[str, Structure]:
    """Valid but unusual crystals that must featurize and be predicted."""
    grid = np.stack(np.meshgrid(*[np.arange(6)] * 3, indexing="ij"), -1).reshape(-1, 3)
    jitter = np.random.default_rng(0).uniform(-0.01, 0.01, grid.shape)  # no translation symmetry
    big = Structure(  # 216 sites in its primitive cell: above both budgets
        Lattice.cubic(6 * 2.82),
        ["Na" if sum(g) % 2 else "Cl" for g in grid],
        (grid + 0.5) / 6 + jitter,
    )
    fcc = [[0, 0, 0], [0.5, 0.5, 0], [0.5, 0, 0.5], [0, 0.5, 0.5]]
    return {
        "one_atom": Structure(Lattice.cubic(2.9), ["Fe"], [[0, 0, 0]]),
        "one_atom_triclinic": Structure(
            Lattice.from_parameters(2.5, 3.1, 4.0, 70, 80, 100), ["Li"], [[0.1, 0.2, 0.3]]
        ),
        "noble_gases": Structure(
            Lattice.cubic(9.0), NOBLE_GASES, [[0, 0, 0], *fcc[1:], [0.5] * 3, [0.25] * 3]
        ),
        "actinides_a": Structure(Lattice.cubic(6.0), ACTINIDES[:4], fcc),
        "actinides_b": Structure(Lattice.cubic(6.0), ACTINIDES[4:8], fcc),
        "actinides_c": Structure(Lattice.cubic(6.0), ACTINIDES[8:12], fcc),
        "actinides_d": Structure(Lattice.cubic(6.0), [*ACTINIDES[12:], "O"], fcc),
        "molecule_in_huge_box": Structure(
            Lattice.cubic(1000.0), ["C", "O"], [[0, 0, 0], [1.13e-3, 0, 0]]
        ),
        "very_long_axis": Structure(Lattice.tetragonal(3.0, 1.0e5), ["C"], [[0, 0, 0]]),
        "above_supercell_budget": big,
    }


def nacl_cif() -> str:
    return str(CifWriter(Structure(Lattice.cubic(4.0), ["Na", "Cl"], [[0, 0, 0], [0.5] * 3])))


def bad_cif_corpus() -> dict[str, tuple[str | bytes, str]]:
    """``{stem: (content, what the error must say)}``: CIFs no run may silently use."""
    good = nacl_cif()
    lines = good.splitlines(keepends=True)
    cl_row = next(line for line in lines if line.strip().startswith("Cl "))
    return {
        "binary_garbage": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "could not parse"),
        "empty": ("", "could not parse"),
        "cut_mid_header": (good[: len(good) // 3], "could not parse"),
        "atom_list_truncated": (good.replace(cl_row, ""), "_chemical_formula_sum"),
        "two_data_blocks": (
            good + "\n" + good.replace("data_NaCl", "data_NaCl_2"),
            "holds 2 structures",
        ),
        "atoms_on_one_spot": (
            good.replace(cl_row, cl_row.replace("0.50000000", "0.00000000")),
            "could not parse",
        ),
        "zero_cell_edge": (
            good.replace("_cell_length_a   4.00000000", "_cell_length_a   0.0"),
            "could not parse",
        ),
        "unknown_element": (good.replace(" Cl  Cl1", " Xx  Xx1"), "Xx"),
    }


def write_targets(path: Path, names: list[str], values: list[object]) -> Path:
    pd.DataFrame({"file": names, "target": values}).to_csv(path, index=False)
    return path


def error_lines(message: str) -> dict[str, str]:
    """``{file stem: its line}`` of a multi-file CifError message."""
    out = {}
    for line in message.splitlines()[1:]:
        m = re.match(r"\s*(\S+?\.cif):", line)
        if m:
            out[Path(m.group(1)).stem] = line
    return out


@pytest.fixture(scope="module")
def good_structures(real_structures):
    return real_structures[:8]


@pytest.fixture
def cif_dir(tmp_path, good_structures):
    folder = tmp_path / "cifs"
    folder.mkdir()
    names = []
    for i, s in enumerate(good_structures):
        name = f"good_{i}"
        (folder / f"{name}.cif").write_text(str(CifWriter(s)))
        names.append(name)
    return folder, names


# ------------------------------------------------------------------------------ CIF files


def test_every_unreadable_cif_is_named_with_its_reason_in_one_error(cif_dir, tmp_path):
    folder, good = cif_dir
    corpus = bad_cif_corpus()
    for stem, (content, _) in corpus.items():
        target = folder / f"{stem}.cif"
        if isinstance(content, bytes):
            target.write_bytes(content)
        else:
            target.write_text(content)
    csv = write_targets(tmp_path / "t.csv", [*good, *corpus], list(range(len(good) + len(corpus))))
    with pytest.raises(CifError) as err:
        load_cif_dataset(folder, csv)
    msg = str(err.value)
    assert msg.startswith(f"{len(corpus)} unreadable CIF file(s)")
    lines = error_lines(msg)
    assert set(lines) == set(corpus), "every bad file, and only those, is reported"
    for stem, (_, reason) in corpus.items():
        assert reason in lines[stem], f"{stem}: {lines[stem]}"
        assert str(folder / f"{stem}.cif") in lines[stem]


def test_cif_zip_with_non_cif_members(cif_dir, tmp_path, caplog):
    folder, good = cif_dir
    csv = write_targets(tmp_path / "t.csv", [f"{n}.cif" for n in good], [1.0] * len(good))
    archive = tmp_path / "upload.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for n in good:
            zf.write(folder / f"{n}.cif", f"upload/{n}.cif")
        zf.write(csv, "upload/targets.csv")
        zf.writestr("upload/POSCAR", "Na Cl\n1.0\n4 0 0\n0 4 0\n0 0 4\nNa Cl\n1 1\nDirect\n")
        zf.writestr("upload/picture.png", b"\x89PNG\r\n")
        zf.writestr("upload/notes/README.md", "# notes")
        zf.writestr("upload/.hidden.cif", "not a cif")
        zf.writestr("__MACOSX/upload/._good_0.cif", b"\x00\x05\x16\x07")
    with caplog.at_level(logging.WARNING, logger="matbench_dim.data.cif"):
        task = load_cif_dataset(archive)
    assert list(task.ids) == good
    skipped = ["upload/POSCAR", "upload/notes/README.md", "upload/picture.png"]
    assert task.provenance["skipped_members"] == skipped
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "skipped 3 non-CIF members" in warned
    assert all(name in warned for name in skipped)
    assert ".hidden" not in warned
    assert "__MACOSX" not in warned

    with zipfile.ZipFile(archive, "a") as zf:  # a member that claims to be a CIF but is not
        zf.writestr("upload/broken.cif", b"\x00\xffnot a crystal")
    with pytest.raises(CifError, match=r"upload\.zip/upload/broken\.cif: pymatgen could not parse"):
        load_cif_dataset(archive, csv)

    only_junk = tmp_path / "junk.zip"
    with zipfile.ZipFile(only_junk, "w") as zf:
        zf.writestr("README.md", "nothing here")
    with pytest.raises(ValueError, match=r"holds no \.cif files"):
        load_cif_dataset(only_junk)
    fake = tmp_path / "fake.zip"
    fake.write_text("plain text")
    with pytest.raises(ValueError, match="neither a folder nor a zip archive"):
        load_cif_dataset(fake)
    with pytest.raises(FileNotFoundError, match="no folder or zip archive"):
        load_cif_dataset(tmp_path / "nowhere")


def test_csv_naming_missing_cifs_lists_them_all(cif_dir, tmp_path):
    folder, good = cif_dir
    names = [*good, "ghost_a.cif", "sub/dir/ghost_b", "good_0.cif.bak"]
    csv = write_targets(tmp_path / "t.csv", names, [1.0] * len(names))
    with pytest.raises(ValueError, match="names CIF files absent") as err:
        load_cif_dataset(folder, csv)
    for ghost in ("ghost_a", "ghost_b", "good_0.cif.bak"):
        assert repr(ghost) in str(err.value)
    # path-like names resolve by their file name (documented)
    paths = write_targets(tmp_path / "p.csv", [f"C:\\data\\{n}.cif" for n in good], [1.0] * 8)
    assert list(load_cif_dataset(folder, paths).ids) == good


def test_duplicate_ids_are_refused_everywhere(cif_dir, tmp_path, good_structures):
    folder, good = cif_dir
    twice = write_targets(tmp_path / "t.csv", [*good, "good_3"], [1.0] * 9)  # with and without .cif
    with pytest.raises(ValueError, match=r"named more than once: 'good_3'"):
        load_cif_dataset(folder, twice)
    (folder / "batch2").mkdir()
    (folder / "batch2" / "good_5.cif").write_text((folder / "good_5.cif").read_text())
    with pytest.raises(ValueError, match=r"duplicate ids.*batch2/good_5\.cif / good_5\.cif"):
        load_cif_dataset(folder)
    with pytest.raises(ValueError, match=r"duplicate ids 'a'"):
        data.task_from_structures(good_structures[:3], [1.0, 2.0, 3.0], ids=["a", "b", "a"])
    with pytest.raises(ValueError, match=r"duplicate ids '7'"):
        data.task_from_dataframe(
            pd.DataFrame({"structure": good_structures[:2], "y": [1.0, 2.0]}, index=[7, 7]),
            target_column="y",
            n_splits=None,
        )


@pytest.mark.parametrize(
    ("kind", "species"),
    [("partial_occupancy", {"Fe": 0.5, "Co": 0.5}), ("vacancy", {"Fe": 0.9})],
)
def test_disordered_cifs_load_with_a_warning_and_sitenet_names_them(
    kind, species, cif_dir, tmp_path, caplog, good_structures
):
    folder, good = cif_dir
    s = Structure(Lattice.cubic(4.0), [species, "O"], [[0, 0, 0], [0.5] * 3])
    (folder / f"{kind}.cif").write_text(str(CifWriter(s)))
    csv = write_targets(tmp_path / "t.csv", [*good, kind], list(range(9)))
    with caplog.at_level(logging.WARNING, logger="matbench_dim.data.task"):
        task = load_cif_dataset(folder, csv, n_splits=3)
    assert not task.structures[kind].is_ordered
    assert f"'{kind}'" in caplog.text
    assert "FeaturizationError" in caplog.text
    X = task.structures
    with pytest.raises(FeaturizationError, match=rf"entry '{kind}': site 0 is disordered") as err:
        SiteNetDIMRegressor(**TINY).fit(X, task.targets)
    assert set(err.value.failures) == {kind}
    # the documented way out: drop (or order) them; composition baselines accept them as they are
    from matbench_dim.bench.baselines import FeaturizedForest

    pred = FeaturizedForest(n_estimators=5).fit(X, task.targets).predict(X)
    assert np.isfinite(pred).all()


# ------------------------------------------------------------------------------ structures


@pytest.mark.parametrize("name", list(unusual_structures()))
def test_unusual_valid_structures_featurize_to_finite_records(name):
    s = unusual_structures()[name]
    config = FeaturizerConfig(max_supercell_sites=50)
    r = featurize_structure(s, config, name=name)
    for field in ("site_features", "prim_coords", "super_coords", "lattice"):
        assert np.isfinite(getattr(r, field)).all(), field
    assert r.n_prim <= r.n_super <= max(50, r.n_prim)
    if name == "above_supercell_budget":
        assert r.n_prim == r.n_super == 216  # too big for 50 sites: kept as it is, no images
    # same composition (the primitive reduction may shrink the cell, never change it)
    z_in, z_out = np.asarray(s.atomic_numbers), r.atomic_numbers.astype(int)
    np.testing.assert_allclose(
        np.bincount(z_out, minlength=104) / len(z_out), np.bincount(z_in, minlength=104) / len(z_in)
    )


def test_overlapping_and_unsupported_atoms_are_named_together_and_the_rest_is_kept(
    good_structures,
):
    lat = Lattice.cubic(4.0)
    bad = {
        "same_spot": Structure(lat, ["Na", "Cl"], [[0.2, 0.2, 0.2], [0.2, 0.2, 0.2]]),
        "too_close": Structure(lat, ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]]),
        "across_boundary": Structure(lat, ["Na", "Cl"], [[0.999, 0, 0], [0.001, 0, 0]]),
        "oganesson": Structure(lat, ["Og"], [[0, 0, 0]]),
    }
    X = pd.Series(
        [*good_structures[:4], *bad.values()], index=[f"g{i}" for i in range(4)] + list(bad)
    )
    with pytest.raises(FeaturizationError) as err:
        featurize(X.tolist(), ids=list(X.index), progress=False)
    assert set(err.value.failures) == set(bad)
    msg = str(err.value)
    assert msg.startswith(f"{len(bad)} of {len(X)} structures could not be featurized")
    for name in ("same_spot", "too_close", "across_boundary"):
        assert re.search(
            rf"entry '{name}': overlapping atoms \(sites 0 and 1 are [\d.e-]+ Angstrom", msg
        )
    assert re.search(r"entry 'oganesson': site 0 \(Og1?\) has Z=118; site features exist", msg)
    assert [r is not None for r in err.value.records] == [True] * 4 + [False] * 4
    with pytest.raises(FeaturizationError, match="entry 'too_close'"):
        SiteNetDIMRegressor(**TINY).fit(X, np.arange(len(X), dtype=float))


@pytest.fixture(scope="module")
def fitted(real_structures, real_targets):
    x = pd.Series(real_structures[:16], index=[f"r{i}" for i in range(16)])
    est = SiteNetDIMRegressor(**TINY, random_state=0)
    return est.fit(x, np.asarray(real_targets[:16]), X_unlabeled=real_structures[16:])


def test_unusual_structures_are_predicted_finite(fitted, real_structures):
    extra = unusual_structures()
    X = pd.Series([*extra.values(), real_structures[0]], index=[*extra, "real"])
    pred = fitted.predict(X)
    assert pred.shape == (len(X),)
    assert np.isfinite(pred).all()
    vecs = fitted.transform(X)
    assert np.isfinite(vecs).all()
    # a crystal larger than the batch budget (150 sites) and the supercell budget: own batch
    alone = fitted.predict([extra["above_supercell_budget"]])
    np.testing.assert_allclose(alone, pred[list(extra).index("above_supercell_budget")], rtol=1e-5)


def test_unusual_structures_train_without_nan(real_structures, real_targets):
    extra = list(unusual_structures().values())
    X = [*real_structures[:6], *extra]
    y = np.concatenate([real_targets[:6], np.linspace(-1.0, 1.0, len(extra))])
    est = SiteNetDIMRegressor(**TINY, random_state=1).fit(X, y, X_unlabeled=X)
    for stage in ("pretrain", "finetune"):
        for row in est.history_[stage]:
            assert all(math.isfinite(v) for v in row.values()), (stage, row)
    assert np.isfinite(est.predict(X)).all()


# ------------------------------------------------------------------------------ labels


def test_bad_labels_for_the_estimator_name_the_entries(real_structures):
    X = pd.Series(real_structures[:5], index=list("abcde"))
    est = SiteNetDIMRegressor(**TINY)
    cases = [
        (pd.Series([1.0, np.nan, 2.0, 3.0, 4.0], index=X.index), r"1 non-finite .* \['b'\]"),
        (pd.Series([1.0, 2.0, np.inf, 3.0, -np.inf], index=X.index), r"2 non-finite .*'c', 'e'"),
        (
            pd.Series([1.0, "2.5", "n/a", 3.0, "?"], index=X.index),
            r"2 non-numeric .*c \('n/a'\), e \('\?'\)",
        ),
        ([1.0, 2.0, 3.0, 4.0], r"X has 5 structures but y has 4 targets"),
        (np.ones((5, 2)), r"one-dimensional"),
    ]
    for y, pattern in cases:
        with pytest.raises(ValueError, match=pattern):
            est.fit(X, y)
    assert not hasattr(est, "model_")


def test_bad_labels_for_a_task_name_the_entries(good_structures):
    X = good_structures[:6]
    ids = [f"s{i}" for i in range(6)]
    with pytest.raises(ValueError, match=r"missing \(NaN/empty\) targets for ids 's2', 's4'"):
        data.task_from_structures(X, [1, 2, np.nan, 3, None, 5], ids=ids, n_splits=None)
    with pytest.raises(ValueError, match=r"infinite targets for ids 's1'"):
        data.task_from_structures(X, [1, np.inf, 2, 3, 4, 5], ids=ids, n_splits=None)
    with pytest.raises(ValueError, match=r"non-numeric targets for ids 's3' \('abc'\)"):
        data.task_from_structures(X, [1, 2, 3, "abc", 4, 5], ids=ids, n_splits=None)
    with pytest.raises(ValueError, match="5 targets for 6 structures"):
        data.task_from_structures(X, [1, 2, 3, 4, 5], ids=ids, n_splits=None)
    kept = data.task_from_structures(
        X, [1, 2, np.nan, 3, "", 5], ids=ids, n_splits=2, missing_target="unlabelled"
    )
    assert list(kept.unlabelled_pool.index) == ["s2", "s4"]
    assert set(kept.ids) == {"s0", "s1", "s3", "s5"}
    assert np.isfinite(kept.targets.to_numpy()).all()


def test_a_csv_with_several_kinds_of_label_errors_reports_them_all_at_once(
    good_structures, tmp_path
):
    folder = tmp_path / "cifs"
    folder.mkdir()
    names = [f"c{i}" for i in range(5)]
    for s, name in zip(good_structures[:5], names, strict=True):
        (folder / f"{name}.cif").write_text(s.to(fmt="cif"))
    labels = pd.DataFrame({"file": [f"{n}.cif" for n in names]})
    labels["target"] = ["1.0", "abc", "inf", "", "2.0"]
    labels.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(ValueError) as err:
        load_cif_dataset(folder, tmp_path / "labels.csv", n_splits=None)
    msg = str(err.value)
    assert "non-numeric targets for ids 'c1'" in msg
    assert "infinite targets for ids 'c2'" in msg
    assert "missing (NaN/empty) targets for ids 'c3'" in msg
    with pytest.raises(ValueError, match="non-numeric") as err:  # whatever missing_target says
        load_cif_dataset(
            folder, tmp_path / "labels.csv", n_splits=None, missing_target="unlabelled"
        )
    assert "infinite" in str(err.value)
    assert "missing" not in str(err.value)  # empty targets are allowed then


def test_n_larger_than_the_labelled_training_fold_fails_before_any_work(good_structures, tmp_path):
    structures = good_structures * 2  # 16 entries, 12 labelled, 4 unlabelled
    y = [float(i) if i < 12 else np.nan for i in range(16)]
    task = data.task_from_structures(
        structures, y, name="few", missing_target="unlabelled", n_splits=4
    )
    assert len(task.train_ids(0)) == 9  # the unlabelled pool never counts as labelled
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"fold 0 has 9 labelled training entries; n_labels \[10\]"
    ):
        run_grid([task], out, n_labels=[5, 10], seeds=[0], methods=["dummy_mean"], tracking=False)
    assert not any(p.is_file() for p in out.rglob("*")), "nothing may be written"
    with pytest.raises(ValueError, match=r"n=10 labelled entries requested but fold 2 has only 9"):
        draw_subset(task.train_ids(2), 10, 2, 0)


# ------------------------------------------------------------------------------ matbench


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No data home but ``tmp_path/empty``, and any download attempt fails the test."""
    from matbench_dim.data import sources

    monkeypatch.delenv(sources.SHARED_DATA_ENV, raising=False)
    monkeypatch.delenv(sources.MATMINER_DATA_ENV, raising=False)
    monkeypatch.setattr(sources, "REPO_SHARED_DATA", tmp_path / "no_shared")
    import matminer.datasets.utils

    def no_download(*args, **kwargs):
        raise AssertionError("a dataset download was attempted")

    monkeypatch.setattr(matminer.datasets.utils, "_fetch_external_dataset", no_download)
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def test_unknown_task_or_missing_file_fail_before_any_work(offline, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match=r"unknown task 'matbench_mp_gapp'; available: .*matbench_mp_gap"
    ):
        run_grid(
            ["matbench_mp_gapp"],
            out,
            n_labels=[5],
            seeds=[0],
            methods=["dummy_mean"],
            tracking=False,
        )
    with pytest.raises(DataNotFoundError) as err:
        run_grid(
            ["matbench_mp_e_form"],
            out,
            n_labels=[5],
            seeds=[0],
            methods=["dummy_mean"],
            data_home=str(offline),
            tracking=False,
        )
    assert str(offline / "matbench_mp_e_form.json.gz") in str(err.value)
    assert "https://" in str(err.value)
    assert not any(p.is_file() for p in out.rglob("*"))


@pytest.fixture(scope="module")
def jdft2d_task():
    return load_task("sample:matbench_jdft2d")


def test_results_file_with_the_fold_already_recorded(jdft2d_task, tmp_path):
    test_ids = list(jdft2d_task.test_ids(0))
    mean = float(jdft2d_task.train_data(0)[1].mean())
    mb = matbench_io.new_benchmark(jdft2d_task)
    matbench_io.record(mb, jdft2d_task.name, 0, np.full(len(test_ids), mean), {"seed": 0})
    path = matbench_io.save_benchmark(mb, tmp_path / "results.json.gz")

    again = matbench_io.load_benchmark(path, jdft2d_task)
    with pytest.raises(matbench_io.AlreadyRecordedError, match=r"fold 0 is already recorded"):
        matbench_io.record(again, jdft2d_task.name, 0, np.zeros(len(test_ids)))
    kept = again.tasks_map[jdft2d_task.name].results["fold_0"]
    assert kept.parameters.seed == 0
    assert kept.scores.mae == pytest.approx(
        float(np.mean(np.abs(jdft2d_task.test_targets(0) - mean)))
    )
    matbench_io.record(again, jdft2d_task.name, 0, np.zeros(len(test_ids)), overwrite=True)
    assert again.tasks_map[jdft2d_task.name].results["fold_0"].scores.mae == pytest.approx(
        float(np.mean(np.abs(jdft2d_task.test_targets(0))))
    )
    matbench_io.record(again, jdft2d_task.name, 1, np.full(len(jdft2d_task.test_ids(1)), mean))
    assert sum(again.tasks_map[jdft2d_task.name].is_recorded.values()) == 2


# ------------------------------------------------------------------------------ property test

SMALL_ENCODER = EncoderConfig(
    site_dim=16,
    pair_dim=16,
    attention_hidden=16,
    local_dim=8,
    global_hidden=16,
    global_dim=8,
    activation="silu",
)


@pytest.fixture(scope="module")
def tiny_nets():
    torch.manual_seed(0)
    encoder = SiteNetEncoder(SMALL_ENCODER).eval()
    net = SiteNetRegressorNet(encoder, head_hidden=8).eval()
    objective = DIMObjective(DIMConfig(critic_dim=16, critic_hidden=16), SMALL_ENCODER).eval()
    return net, objective, featurize_structure(rocksalt())


HEAVY = [2, 10, 18, 36, 54, 86, *range(89, 104)]  # noble gases and actinides


@st.composite
def random_crystals(draw):
    lengths = [draw(st.floats(2.0, 40.0)) for _ in range(3)]
    angles = [draw(st.floats(60.0, 120.0)) for _ in range(3)]
    lat = Lattice.from_parameters(*lengths, *angles)
    assume(np.isfinite(lat.volume) and lat.volume > 0.3 * math.prod(lengths))
    n = draw(st.integers(1, 8))
    frac = [[draw(st.floats(0.0, 1.0, exclude_max=True)) for _ in range(3)] for _ in range(n)]
    z = st.one_of(st.sampled_from(HEAVY), st.integers(1, 103))
    s = Structure(lat, [draw(z) for _ in range(n)], frac)
    if n > 1:
        assume((s.distance_matrix + np.eye(n) * 10).min() > 0.5)
    return s


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(structure=random_crystals(), n_max=st.sampled_from([50, 4]))
def test_random_valid_structures_give_finite_model_outputs(tiny_nets, structure, n_max):
    """Random valid crystals (heavy elements, long axes, tiny budgets) never crash the
    featurizer and give finite predictions, vectors and DIM losses."""
    net, objective, partner = tiny_nets
    r = featurize_structure(structure, FeaturizerConfig(max_supercell_sites=n_max))
    batch = collate([r, partner])
    with torch.no_grad():
        pred = net(batch)
        out = net.encoder(batch)
        losses = objective(net.encoder, batch, torch.Generator().manual_seed(0))
    assert torch.isfinite(pred).all()
    assert torch.isfinite(out.global_).all()
    assert torch.isfinite(out.local[out.site_mask]).all()
    assert all(torch.isfinite(torch.as_tensor(v)).all() for v in losses.values())
