"""Featurization of real structures: records, site features, cache, errors, batching.

The cell geometry itself (supercell matrices, LLL, primitive cells) is tested in
``test_geometry.py``.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pymatgen.core import Element, Lattice, Structure

from matbench_dim.features import cache as feature_cache
from matbench_dim.features import elements, supercell
from matbench_dim.features import featurize as fz
from matbench_dim.features.featurize import (
    CrystalRecord,
    FeaturizationError,
    FeaturizerConfig,
    batch_indices,
    collate,
    featurize,
    featurize_structure,
)
from matbench_dim.model.geometry import minimum_image_distances

# ------------------------------------------------------------------------------ config


def test_config_key_is_stable_and_tracks_record_fields():
    a, b = FeaturizerConfig(), FeaturizerConfig()
    assert a.key() == b.key()
    assert len(a.key()) == 16
    assert FeaturizerConfig(max_supercell_sites=40).key() != a.key()
    assert FeaturizerConfig(primitive=False).key() != a.key()
    # coulomb does not change records, so it does not change the cache key
    assert FeaturizerConfig(coulomb=True).key() == a.key()
    assert FeaturizerConfig.from_dict(a.to_dict()) == a
    assert a.to_dict() == {"max_supercell_sites": 50, "primitive": True, "coulomb": False}


@pytest.mark.parametrize(
    "bad", [{"max_supercell_sites": 0}, {"max_supercell_sites": 2.5}, {"primitive": "yes"}]
)
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        FeaturizerConfig(**bad)


# ------------------------------------------------------------------------------ records


@pytest.mark.parametrize("n_max", [50, 12, 1])
def test_supercell_size_bounds_shapes_and_dtypes(real_structures, n_max):
    cfg = FeaturizerConfig(max_supercell_sites=n_max)
    for i, s in enumerate(real_structures):
        r = featurize_structure(s, cfg, name=str(i))
        p, n_s = r.n_prim, r.n_super
        assert p <= len(s)
        assert len(s) % p == 0
        assert p <= n_s <= max(n_max, p)
        assert n_s % p == 0
        assert r.site_features.shape == (p, elements.N_SITE_FEATURES)
        assert r.site_features.dtype == np.float32
        assert r.atomic_numbers.shape == (p,)
        assert np.issubdtype(r.atomic_numbers.dtype, np.integer)
        assert r.prim_coords.shape == (p, 3)
        assert r.prim_coords.dtype == np.float32
        assert r.super_coords.shape == (n_s, 3)
        assert r.super_coords.dtype == np.float32
        assert r.image_of.shape == (n_s,)
        assert np.issubdtype(r.image_of.dtype, np.integer)
        assert r.lattice.shape == (3, 3)
        assert r.lattice.dtype == np.float32
        assert np.bincount(r.image_of, minlength=p).tolist() == [n_s // p] * p
        np.testing.assert_array_equal(r.prim_coords, r.super_coords[:p])
        # volume per atom is preserved by primitive reduction and supercell construction
        vol = abs(np.linalg.det(r.lattice.astype(np.float64)))
        assert vol / n_s == pytest.approx(s.volume / len(s), rel=1e-4)


def test_primitive_reduction_recovers_the_cell(real_structures):
    for s in real_structures[:12]:
        conv = s * [2, 1, 1]
        r_conv = featurize_structure(conv)
        r_prim = featurize_structure(s)
        assert r_conv.n_prim == r_prim.n_prim
        assert sorted(r_conv.atomic_numbers.tolist()) == sorted(r_prim.atomic_numbers.tolist())
        r_keep = featurize_structure(conv, FeaturizerConfig(primitive=False))
        assert r_keep.n_prim == len(conv)


def test_site_features_are_scaled_magpie_values(real_structures):
    r = featurize_structure(real_structures[3])
    raw = elements.raw_element_table()[r.atomic_numbers.astype(int) - 1]
    np.testing.assert_allclose(
        r.site_features, raw * np.array(elements.SITE_FEATURE_SCALES), rtol=1e-6
    )
    fe = elements.site_features([26])[0]
    assert fe[0] == pytest.approx(2.6)
    assert fe[2] == 4
    assert fe[3] == 8
    assert fe[4] == pytest.approx(7.9024, rel=1e-4)  # eV
    assert fe[7] == pytest.approx(7.874, rel=1e-4)  # g/cm^3


def test_element_that_cannot_be_filled_raises_naming_it(monkeypatch):
    """With no data anywhere for a property, the table build names the property and element."""
    real = elements._read_magpie_table

    def no_density(name):
        out = real(name)
        if name == "Density":
            out[[25]] = np.nan  # Fe
            out[elements._read_magpie_table("Row") == 4] = np.nan  # and its whole row
        return out

    monkeypatch.setattr(elements, "_read_magpie_table", no_density)
    monkeypatch.setattr(elements, "_pymatgen_value", lambda name, z: math.nan)
    elements._build.cache_clear()
    try:
        with pytest.raises(elements.ElementDataError, match=r"Density of K \(Z=19\)"):
            elements._build()
    finally:
        elements._build.cache_clear()


def test_site_features_finite_for_every_element():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        known = [z for z in range(1, 104) if Element.from_Z(z)]
    feats = elements.site_features(known)
    assert feats.shape == (103, 8)
    assert np.isfinite(feats).all()
    table = elements.raw_element_table()
    assert (table[:, 0] == np.arange(1, 104)).all()
    assert (table[:, [1, 2, 3, 6]] > 0).all()  # weights, rows, columns, radii
    sources = elements.fill_sources()
    assert sources[("He", "Electronegativity")] == "magpie AllenElectronegativity"
    assert set(sources.values()) <= {
        "pymatgen",
        "magpie AllenElectronegativity",
        "magpie CovalentRadius",
        "period neighbour",
    }
    for bad in (0, 104, 118):
        with pytest.raises(elements.ElementDataError, match=f"Z={bad}"):
            elements.site_features([6, bad])


# ------------------------------------------------------------------------------ errors


def _bad_structures():
    lat = Lattice.cubic(4.0)
    return {
        "mixed": Structure(lat, [{"Fe": 0.5, "Co": 0.5}, "O"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "vacancy": Structure(lat, [{"Fe": 0.9}], [[0, 0, 0]]),
        "empty": Structure(lat, [], []),
        "overlap": Structure(lat, ["Na", "Cl"], [[0, 0, 0], [0.01, 0, 0]]),
        "nan": Structure(lat, ["Na", "Cl"], [[0, 0, 0], [np.nan, 0.5, 0.5]]),
        "heavy": Structure(lat, ["Na", "Og"], [[0, 0, 0], [0.5, 0.5, 0.5]]),
        "self": Structure(Lattice.tetragonal(0.05, 4.0), ["Na"], [[0, 0, 0]]),
        "not-a-structure": "NaCl",
        "flat": Structure(Lattice([[3, 0, 0], [0, 3, 0], [3, 3, 0]]), ["Na"], [[0, 0, 0]]),
    }


@pytest.mark.parametrize(
    ("key", "pattern"),
    [
        ("mixed", r"entry 'mixed': site 0 is disordered"),
        ("vacancy", r"entry 'vacancy': site 0 is disordered"),
        ("empty", r"entry 'empty': structure has no sites"),
        ("overlap", r"entry 'overlap': overlapping atoms \(sites 0 and 1"),
        ("nan", r"entry 'nan': non-finite"),
        ("heavy", r"entry 'heavy': site 1 \(Og\) has Z=118"),
        ("self", r"entry 'self': overlapping atoms \(a lattice vector is 0.05"),
        ("not-a-structure", r"entry 'not-a-structure': expected a pymatgen Structure"),
        ("flat", r"entry 'flat': degenerate lattice"),
    ],
)
def test_bad_structure_errors_name_the_entry(key, pattern):
    with pytest.raises(FeaturizationError, match=pattern):
        featurize_structure(_bad_structures()[key], name=key)


def test_featurize_reports_all_bad_entries_and_keeps_good_ones(real_structures, tmp_path):
    bad = _bad_structures()
    structs = [real_structures[0], bad["mixed"], real_structures[1], bad["empty"], bad["overlap"]]
    ids = ["good-a", "mixed", "good-b", "empty", "overlap"]
    with pytest.raises(FeaturizationError) as info:
        featurize(structs, ids=ids, cache_dir=tmp_path, progress=False)
    err = info.value
    assert set(err.failures) == {"mixed", "empty", "overlap"}
    for name in ("mixed", "empty", "overlap"):
        assert f"entry '{name}'" in str(err)
    assert err.records[0] is not None
    assert err.records[1] is None
    # the good entries were cached: asking for them again featurizes nothing
    calls = _count_calls()
    out = featurize([real_structures[0], real_structures[1]], cache_dir=tmp_path, progress=False)
    assert calls.stop() == 0
    assert len(out) == 2
    skipped = featurize(structs, ids=ids, cache_dir=tmp_path, progress=False, errors="skip")
    assert skipped.ids == ["good-a", "good-b"]
    assert skipped.indices == [0, 2]
    assert set(skipped.skipped) == {"mixed", "empty", "overlap"}
    np.testing.assert_array_equal(skipped[1].super_coords, out[1].super_coords)


def test_every_bad_entry_of_a_batch_is_reported_once(real_structures):
    bad = _bad_structures()
    names = list(bad)
    structs = [
        s for pair in zip(real_structures[: len(bad)], bad.values(), strict=True) for s in pair
    ]
    ids = [x for i, name in enumerate(names) for x in (f"good-{i}", name)]
    out = featurize(structs, ids=ids, errors="skip", progress=False)
    assert set(out.skipped) == set(names)
    assert out.ids == [f"good-{i}" for i in range(len(bad))]
    for name, msg in out.skipped.items():
        assert msg.startswith(f"entry {name!r}")


def test_featurize_rejects_bad_arguments(real_structures):
    with pytest.raises(ValueError, match="ids"):
        featurize(real_structures[:2], ids=["a"], progress=False)
    with pytest.raises(ValueError, match="errors"):
        featurize(real_structures[:2], errors="ignore", progress=False)


# ------------------------------------------------------------------------------ cache


class _count_calls:
    """Count the structures passed to the vectorised featurizer (in-process, n_jobs=1)."""

    def __init__(self) -> None:
        self.n = 0
        self.orig = fz._featurize_batch

        def wrapped(lattices, fracs, *args, **kwargs):
            self.n += len(fracs)
            return self.orig(lattices, fracs, *args, **kwargs)

        fz._featurize_batch = wrapped

    def stop(self) -> int:
        fz._featurize_batch = self.orig
        return self.n


def _cache_root(tmp_path):
    return tmp_path / f"sitenet-v{feature_cache.FORMAT_VERSION}-{FeaturizerConfig().key()}"


def _assert_same(a: list[CrystalRecord], b: list[CrystalRecord]) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        for f in ("site_features", "atomic_numbers", "prim_coords", "super_coords", "image_of"):
            np.testing.assert_array_equal(getattr(ra, f), getattr(rb, f))
            assert getattr(ra, f).dtype == getattr(rb, f).dtype
        np.testing.assert_array_equal(ra.lattice, rb.lattice)


def test_cache_hit_on_second_call(real_structures, tmp_path):
    structs = real_structures[:10]
    calls = _count_calls()
    try:
        first = featurize(structs + structs[:3], cache_dir=tmp_path, progress=False, chunk_size=4)
        assert calls.n == 10  # duplicates featurized once
        second = featurize(structs, cache_dir=tmp_path, progress=False)
        assert calls.n == 10
        # an index lost in an interrupted run is rebuilt from the shards
        (_cache_root(tmp_path) / "index.npz").unlink()
        third = featurize(structs, cache_dir=tmp_path, progress=False)
        assert calls.n == 10
        # a new structure is the only one featurized
        featurize(real_structures[:11], cache_dir=tmp_path, progress=False)
        assert calls.n == 11
        # another config is another cache
        featurize(
            structs[:2],
            FeaturizerConfig(max_supercell_sites=20),
            cache_dir=tmp_path,
            progress=False,
        )
        assert calls.n == 13
    finally:
        calls.stop()
    _assert_same(first[:10], second)
    _assert_same(second, third)
    _assert_same(first[10:], first[:3])
    shards = list((_cache_root(tmp_path)).glob("shard-*.npz"))
    assert len(shards) == 3 + 1  # one shard per chunk of 4, plus the later structure
    assert not list(tmp_path.rglob(".tmp-*"))


def test_interrupted_run_keeps_finished_chunks(real_structures, tmp_path, monkeypatch):
    orig = fz._featurize_chunk
    seen = []

    def dying(chunk, config):
        seen.append(len(chunk[0]))
        if len(seen) == 2:
            raise KeyboardInterrupt
        return orig(chunk, config)

    monkeypatch.setattr(fz, "_featurize_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        featurize(real_structures[:12], cache_dir=tmp_path, chunk_size=4, progress=False)
    monkeypatch.setattr(fz, "_featurize_chunk", orig)
    assert len(list(_cache_root(tmp_path).glob("shard-*.npz"))) == 1
    calls = _count_calls()
    try:
        out = featurize(real_structures[:12], cache_dir=tmp_path, progress=False)
    finally:
        assert calls.stop() == 8  # the first chunk of 4 came from the cache
    _assert_same(out, featurize(real_structures[:12], progress=False))


def test_featurization_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(FeaturizationError("entry 'a': bad", {"a": "bad"})))
    assert str(err) == "entry 'a': bad"
    assert err.failures == {"a": "bad"}


def test_cache_ignores_unreadable_shard(real_structures, tmp_path):
    featurize(real_structures[:3], cache_dir=tmp_path, progress=False)
    root = _cache_root(tmp_path)
    (root / "index.npz").unlink()
    (root / "shard-garbage.npz").write_bytes(b"not a zip file")
    calls = _count_calls()
    try:
        out = featurize(real_structures[:3], cache_dir=tmp_path, progress=False)
    finally:
        assert calls.stop() == 0
    assert len(out) == 3


def test_a_damaged_shard_is_detected_and_recomputed(real_structures, tmp_path, caplog):
    """One flipped byte inside a shard's data (the zip's CRC catches it) or a truncated
    shard: the damaged entries are featurized again, giving the same records as fresh."""
    import logging

    fresh = featurize(real_structures[:3], progress=False)
    featurize(real_structures[:3], cache_dir=tmp_path, progress=False)
    (shard,) = _cache_root(tmp_path).glob("shard-*.npz")
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the stored arrays, not the zip directory
    shard.write_bytes(bytes(raw))
    calls = _count_calls()
    with caplog.at_level(logging.WARNING, logger="matbench_dim.features.cache"):
        try:
            again = featurize(real_structures[:3], cache_dir=tmp_path, progress=False)
        finally:
            assert calls.stop() == 3  # all three recomputed
    assert f"cache shard {shard.name} unreadable" in caplog.text
    for a, b in zip(fresh, again, strict=True):
        np.testing.assert_array_equal(a.super_coords, b.super_coords)
        np.testing.assert_array_equal(a.site_features, b.site_features)
    for shard in _cache_root(tmp_path).glob("shard-*.npz"):  # truncated: also recomputed
        shard.write_bytes(shard.read_bytes()[:50])
    assert len(featurize(real_structures[:3], cache_dir=tmp_path, progress=False)) == 3


def test_cache_key_and_directory_of_existing_caches_are_kept():
    """Compatibility pin: caches written by earlier versions must stay valid.

    The values are those the featurizer has always produced for these configs; a change of
    the key recipe or the directory layout silently re-featurizes every user's cache, so it
    must come with a deliberate ``FORMAT_VERSION`` bump (and an update of this test).
    """
    assert feature_cache.FORMAT_VERSION == 1
    assert FeaturizerConfig().key() == "eb612eed331d14b2"
    assert FeaturizerConfig(max_supercell_sites=12, primitive=False).key() == "ac971a98215cd30a"
    assert feature_cache.cache_root("cache", "k") == Path("cache") / "sitenet-v1-k"


def test_shard_cache_round_trip_keeps_dtypes(real_structures, tmp_path):
    _, lat, fracs, zs, _ = fz._read_structures(real_structures, [str(i) for i in range(24)])
    lat, fracs, _ = supercell.check_and_reduce_cells(lat, fracs, [str(i) for i in range(24)])
    block = supercell.supercell_sites(lat, fracs, zs, 50)
    block.keys = feature_cache.content_keys(lat, fracs, zs)
    cache = feature_cache.ShardCache(tmp_path, "somekey")
    cache.write(block)
    cache.save_index()
    (shard,) = cache.root.glob("shard-*.npz")
    with np.load(shard) as d:  # compact on disk
        assert d["atomic_numbers"].dtype == np.uint8
        assert d["image_of"].dtype == np.int16
    found = feature_cache.ShardCache(tmp_path, "somekey").load([*block.keys, "f" * 32])
    assert set(found) == set(block.keys)
    loaded, row = found[block.keys[5]]
    assert row == 5
    for f in ("n_prim", "n_super", "atomic_numbers", "prim_coords", "super_coords", "image_of"):
        np.testing.assert_array_equal(getattr(loaded, f), getattr(block, f))
        assert getattr(loaded, f).dtype == getattr(block, f).dtype
    np.testing.assert_array_equal(loaded.lattice, block.lattice)
    assert feature_cache.ShardCache(tmp_path, "otherkey").load(block.keys) == {}


def test_content_keys_identify_structures_by_content(real_structures):
    s = real_structures[6]
    moved = s.copy()
    moved.translate_sites([0], [1e-4, 0, 0])
    swapped = s.copy()
    swapped.replace(0, "Xe" if s[0].specie.symbol != "Xe" else "Kr")
    cells = [s, Structure.from_dict(s.as_dict()), moved, swapped, real_structures[7]]
    _, lat, fracs, zs, _ = fz._read_structures(cells, [str(i) for i in range(len(cells))])
    keys = feature_cache.content_keys(lat, fracs, zs)
    assert all(len(k) == 32 and int(k, 16) >= 0 for k in keys)
    assert keys[1] == keys[0]  # an identical copy
    assert len(set(keys[:1] + keys[2:])) == 4  # a moved atom, another species, another crystal
    assert feature_cache.content_keys(lat[:0], [], []) == []


def test_moved_names_are_reexported_and_dependencies_point_one_way():
    for name in ("rq_shear", "lll_reduce", "primitive_cell", "supercell_matrix", "supercell_sites"):
        assert getattr(fz, name) is getattr(supercell, name)
    assert fz.FORMAT_VERSION == feature_cache.FORMAT_VERSION
    assert fz.PRIMITIVE_SYMPREC == supercell.PRIMITIVE_SYMPREC
    code = (
        "import sys, matbench_dim.features.supercell, matbench_dim.features.cache; "
        "print('matbench_dim.features.featurize' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_featurize_is_deterministic_and_matches_single_calls(real_structures):
    structs = real_structures[:12]
    a = featurize(structs, progress=False)
    b = featurize(structs, progress=False, n_jobs=2, chunk_size=4)
    _assert_same(a, b)
    _assert_same(a, [featurize_structure(s) for s in structs])


def test_unexpected_error_in_a_chunk_is_isolated_to_its_entry(real_structures, monkeypatch):
    """A crash of the vectorised path is retried one by one, so only the culprit fails."""
    orig = fz._featurize_batch
    culprit = real_structures[2].lattice.matrix

    def flaky(lattices, *args, **kwargs):
        if any(np.array_equal(lat, culprit) for lat in lattices):
            raise RuntimeError("boom")
        return orig(lattices, *args, **kwargs)

    monkeypatch.setattr(fz, "_featurize_batch", flaky)
    out = featurize(real_structures[:5], ids=list("abcde"), errors="skip", progress=False)
    assert out.ids == ["a", "b", "d", "e"]
    assert "entry 'c'" in out.skipped["c"]
    assert "boom" in out.skipped["c"]


# ------------------------------------------------------------------------------ batching


def test_collate_pads_and_masks(real_structures):
    recs = featurize(real_structures[:6], progress=False)
    batch = collate(recs, [4, 0, 5])
    b, p, s = 3, max(recs[i].n_prim for i in (4, 0, 5)), max(recs[i].n_super for i in (4, 0, 5))
    assert batch.site_features.shape == (b, p, 8)
    assert batch.site_features.dtype == torch.float32
    assert batch.atomic_numbers.dtype == torch.long
    assert batch.image_of.dtype == torch.long
    assert batch.super_coords.shape == (b, s, 3)
    assert batch.lattice.shape == (b, 3, 3)
    assert batch.index.tolist() == [4, 0, 5]
    assert len(batch) == 3
    for k, i in enumerate([4, 0, 5]):
        r = recs[i]
        assert batch.prim_mask[k].sum() == r.n_prim
        assert batch.super_mask[k].sum() == r.n_super
        np.testing.assert_array_equal(batch.super_coords[k, : r.n_super].numpy(), r.super_coords)
        np.testing.assert_array_equal(batch.image_of[k, : r.n_super].numpy(), r.image_of)
        assert not batch.site_features[k, r.n_prim :].any()
    moved = batch.to("cpu")
    assert torch.equal(moved.super_coords, batch.super_coords)
    with pytest.raises(ValueError, match="empty"):
        collate(recs, [])


def test_batch_indices_cover_everything_within_budget():
    rng = np.random.default_rng(0)
    sizes = [*rng.integers(1, 60, size=500).tolist(), 1500]
    for shuffle in (False, True):
        batches = batch_indices(sizes, max_sites=300, shuffle=shuffle, seed=1)
        flat = sorted(i for b in batches for i in b)
        assert flat == list(range(len(sizes)))
        for b in batches:
            assert sum(sizes[i] for i in b) <= 300 or len(b) == 1
        assert [500] in batches
    a = batch_indices(sizes, 300, shuffle=True, seed=3)
    assert a == batch_indices(sizes, 300, shuffle=True, seed=3)
    assert a != batch_indices(sizes, 300, shuffle=True, seed=4)

    # bucketing keeps crystals of similar size together: less padding than random batches
    def pad(batches):
        return sum(len(b) * max(sizes[i] for i in b) for b in batches) / sum(sizes)

    assert pad(a) < 1.25
    assert batch_indices([], 10) == []
    with pytest.raises(ValueError):
        batch_indices([3, 0], 10)


# ------------------------------------------------------------------------------ property test


@st.composite
def _random_structures(draw):
    lengths = [draw(st.floats(2.5, 8.0)) for _ in range(3)]
    angles = [draw(st.floats(60.0, 120.0)) for _ in range(3)]
    lat = Lattice.from_parameters(*lengths, *angles)
    assume(np.isfinite(lat.volume) and lat.volume > 0.3 * math.prod(lengths))
    n = draw(st.integers(1, 8))
    frac = [[draw(st.floats(0.0, 1.0, exclude_max=True)) for _ in range(3)] for _ in range(n)]
    zs = [draw(st.integers(1, 103)) for _ in range(n)]
    s = Structure(lat, zs, frac)
    if n > 1:
        dm = s.distance_matrix + np.eye(n) * 10
        assume(dm.min() > 0.5)
    return s


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(structure=_random_structures(), n_max=st.sampled_from([50, 8]))
def test_random_valid_structures_featurize(structure, n_max):
    r = featurize_structure(structure, FeaturizerConfig(max_supercell_sites=n_max))
    assert np.isfinite(r.site_features).all()
    assert r.n_prim <= r.n_super <= max(n_max, r.n_prim)
    batch = collate([r])
    d = minimum_image_distances(batch.prim_coords, batch.super_coords, batch.lattice)[0].numpy()
    assert np.isfinite(d).all()
    sup = Structure(
        r.lattice.astype(np.float64),
        r.atomic_numbers[r.image_of].tolist(),
        r.super_coords.astype(np.float64),
        coords_are_cartesian=True,
    )
    np.testing.assert_allclose(d, sup.distance_matrix[: r.n_prim], atol=1e-5)
