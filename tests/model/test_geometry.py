"""Cell geometry (supercells, LLL, primitive cells) and minimum-image distances.

Checks :mod:`matbench_dim.features.supercell` and :mod:`matbench_dim.model.geometry` (distances and
the log-Coulomb pair feature) against pymatgen, scipy and brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from matbench_dim.features import featurize as fz
from matbench_dim.features import supercell as sc
from matbench_dim.features.featurize import (
    CrystalRecord,
    FeaturizerConfig,
    collate,
    featurize,
    featurize_structure,
)
from matbench_dim.model.geometry import COULOMB_CLIP, coulomb_features, minimum_image_distances

# ------------------------------------------------------------------------------ cells


def _periodic_match(cart_a, cart_b, lattice, tol=1e-4):
    """Index in b of each position of a (mod lattice); -1 where none within tol (Angstrom)."""
    inv = np.linalg.inv(lattice)
    d = cart_a[:, None, :] @ inv - cart_b[None, :, :] @ inv
    d -= np.rint(d)
    dist = np.linalg.norm(d @ lattice, axis=-1)
    best = dist.argmin(1)
    return np.where(dist[np.arange(len(cart_a)), best] < tol, best, -1)


def _integer_matrix(record: CrystalRecord, structure: Structure) -> np.ndarray:
    m = record.lattice.astype(np.float64) @ np.linalg.inv(structure.lattice.matrix)
    m_int = np.rint(m)
    assert np.abs(m - m_int).max() < 1e-4, "record lattice is not a supercell of the input"
    return m_int.astype(int)


def _defect(lat: np.ndarray) -> float:
    """Orthogonality defect: product of row lengths / volume (1 for orthorhombic)."""
    return float(np.prod(np.linalg.norm(lat, axis=1)) / abs(np.linalg.det(lat)))


def test_supercell_is_greedy_maximal_and_more_orthogonal(real_structures):
    """Growth stops only when one more increment on the shortest sheared axis exceeds N,
    and the sheared supercell is at least as orthogonal as the plain diagonal one."""
    from scipy.linalg import rq

    for s in real_structures:
        lat, n = s.lattice.matrix, len(s)
        m = sc.supercell_matrix(lat, n, 50)
        inc = np.diag(m)
        r, _ = rq(lat)
        nxt = inc.copy()
        nxt[np.argmin(inc * np.abs(np.diag(r)))] += 1
        assert np.prod(nxt) * n > 50 >= np.prod(inc) * n or n > 50
        assert _defect(m @ lat) <= _defect(np.diag(inc) @ lat) + 1e-9


def test_supercell_sites_equal_pymatgen_supercell(real_structures):
    """Sites (positions and species) equal pymatgen's `structure * M` as periodic sets."""
    for i, s in enumerate(real_structures):
        r = featurize_structure(s, FeaturizerConfig(primitive=False), name=str(i))
        m = _integer_matrix(r, s)
        sup = s * m
        assert len(sup) == r.n_super
        lat = r.lattice.astype(np.float64)
        match = _periodic_match(r.super_coords.astype(np.float64), sup.cart_coords, lat)
        assert (match >= 0).all(), f"structure {i}: supercell site missing from pymatgen's"
        assert len(set(match.tolist())) == r.n_super
        z_ours = r.atomic_numbers[r.image_of]
        np.testing.assert_array_equal(z_ours, np.array(sup.atomic_numbers)[match])
        # each image is a lattice translate of the input cell's site it comes from
        diff = (r.super_coords - r.prim_coords[r.image_of]).astype(np.float64)
        frac = diff @ np.linalg.inv(s.lattice.matrix)
        assert np.abs(frac - np.rint(frac)).max() < 1e-4


def test_supercell_matrix_is_upper_triangular_with_unit_shear(real_structures):
    for s in real_structures:
        m = sc.supercell_matrix(s.lattice.matrix, len(s), 50)
        assert m.dtype.kind == "i"
        assert np.all(np.tril(m, -1) == 0)
        assert 1 <= round(np.linalg.det(m)) * len(s) <= max(50, len(s))
    big = real_structures[-1]
    np.testing.assert_array_equal(sc.supercell_matrix(big.lattice.matrix, 60, 50), np.eye(3))


def test_rq_shear_matches_scipy_rq(real_structures):
    from scipy.linalg import rq

    lats = np.stack([s.lattice.matrix for s in real_structures])
    lengths, shear = sc.rq_shear(lats)
    for lat, ln, sh in zip(lats, lengths, shear, strict=True):
        r, _ = rq(lat)
        np.testing.assert_allclose(ln, np.abs(np.diag(r)), rtol=1e-10)
        rinv = np.linalg.inv(r)
        np.testing.assert_allclose(sh, rinv / np.diag(rinv)[:, None], atol=1e-10)
        rows = sh @ lat
        gram = rows @ rows.T
        np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0, atol=1e-8)


def test_lll_reduce_keeps_the_lattice_and_handedness():
    rng = np.random.default_rng(1)
    for _ in range(20):
        base = Lattice.from_parameters(*rng.uniform(3, 6, 3), *rng.uniform(70, 110, 3)).matrix
        skew = np.array([[1, 3, -2], [0, 1, 4], [0, 0, 1]]) @ base  # same lattice, bad basis
        red = sc.lll_reduce(skew)
        t = red @ np.linalg.inv(skew)
        np.testing.assert_allclose(t, np.rint(t), atol=1e-8)
        assert round(np.linalg.det(np.rint(t))) == 1
        assert sc._is_reduced(red[None])[0]
        assert not sc._is_reduced(skew[None])[0]


def test_pure_translation_detection_matches_a_direct_check(real_structures):
    def direct(lat, frac, z):
        for i in range(1, len(z)):
            d = frac[None] - (frac[:, None] + frac[i] - frac[0])
            d -= np.rint(d)
            c = d @ lat
            ok = (np.einsum("abk,abk->ab", c, c) < 0.02**2) & (z[:, None] == z[None])
            if z[i] == z[0] and ok.any(1).all():
                return True
        return False

    cells = [*real_structures, *(s * [1, 2, 1] for s in real_structures[:10])]
    _, lat, fracs, zs, _ = fz._read_structures(cells, [str(i) for i in range(len(cells))])
    n = np.array([len(z) for z in zs])
    got = sc._pure_translations(lat, np.concatenate(fracs), np.concatenate(zs), n, max_pairs=64)
    want = [direct(lt, f, z) for lt, f, z in zip(lat, fracs, zs, strict=True)]
    assert got.tolist() == want
    assert got[len(real_structures) :].all()


@pytest.mark.shared_data("matbench_phonons.json.gz")
def test_primitive_cells_of_shared_phonons_match_pymatgen(shared_data_dir):
    """Real phonon structures: spglib-reduced cells have pymatgen's primitive size."""
    from matminer.utils.io import load_dataframe_from_json

    df = load_dataframe_from_json(str(shared_data_dir / "matbench_phonons.json.gz"), pbar=False)
    structs = list(df["structure"])
    _, lat, fracs, zs, _ = fz._read_structures(structs, [str(i) for i in range(len(structs))])
    n = np.array([len(z) for z in zs])
    flagged = np.flatnonzero(
        sc._pure_translations(lat, np.concatenate(fracs), np.concatenate(zs), n)
    )
    assert 0 < len(flagged) < 50
    rng = np.random.default_rng(0)
    picks = [*flagged[:6].tolist(), *rng.choice(len(structs), 10, replace=False).tolist()]
    recs = featurize([structs[i] for i in picks], progress=False)
    for i, r in zip(picks, recs, strict=True):
        assert r.n_prim == len(structs[i].get_primitive_structure(tolerance=0.02))


def _arrays(structures):
    """Lattices (K, 3, 3), fractional coordinates and atomic numbers, as featurize reads them."""
    _, lat, fracs, zs, failures = fz._read_structures(
        structures, [str(i) for i in range(len(structures))]
    )
    assert not failures
    return lat, fracs, zs


def test_supercell_sites_follow_supercell_matrix_cell_by_cell(real_structures):
    """Vectorised over cells: each row equals its supercell_matrix and its own one-cell run."""
    lat, fracs, zs = _arrays(real_structures[:12])
    block = sc.supercell_sites(lat, fracs, zs, 20)
    assert block.keys == []
    p0, s0 = np.cumsum([0, *block.n_prim]), np.cumsum([0, *block.n_super])
    for k, (cell, z) in enumerate(zip(lat, zs, strict=True)):
        m = sc.supercell_matrix(cell, len(z), 20)
        det = round(np.linalg.det(m))
        assert block.n_super[k] == det * len(z) <= max(20, len(z))
        # same lattice as M @ cell, possibly in another (reduced) basis
        t = block.lattice[k].astype(np.float64) @ np.linalg.inv(m @ cell)
        np.testing.assert_allclose(t, np.rint(t), atol=1e-4)
        assert abs(round(np.linalg.det(np.rint(t)))) == 1
        np.testing.assert_array_equal(
            block.image_of[s0[k] : s0[k + 1]], np.tile(np.arange(len(z)), det)
        )
        np.testing.assert_array_equal(block.atomic_numbers[p0[k] : p0[k + 1]], z)
    halves = [sc.supercell_sites(lat[a:b], fracs[a:b], zs[a:b], 20) for a, b in ((0, 5), (5, 12))]
    joined = sc.SupercellBlock.concat(halves)
    for f in ("n_prim", "n_super", "atomic_numbers", "prim_coords", "super_coords", "lattice"):
        np.testing.assert_array_equal(getattr(joined, f), getattr(block, f))
    assert sc.SupercellBlock.concat([]).lattice.shape == (0, 3, 3)


def test_primitive_cell_of_a_doubled_cell_and_of_a_primitive_one(real_structures):
    for s in real_structures[:10]:
        lat, fracs, zs = _arrays([s, s * [1, 1, 2]])
        plat, _, pz = sc.primitive_cell(lat[0], fracs[0], zs[0])
        dlat, dfrac, dz = sc.primitive_cell(lat[1], fracs[1], zs[1])
        assert len(dz) == len(pz) <= len(s)
        assert sorted(dz.tolist()) == sorted(pz.tolist())
        assert abs(np.linalg.det(dlat)) == pytest.approx(abs(np.linalg.det(plat)), rel=1e-6)
        assert dfrac.shape == (len(dz), 3)
        assert (dfrac >= 0).all()
        assert (dfrac < 1).all()
        # a primitive cell is returned as it is
        again = sc.primitive_cell(dlat, dfrac, dz)
        assert all(a is b for a, b in zip(again, (dlat, dfrac, dz), strict=True))


def test_check_and_reduce_cells_reduces_and_reports(real_structures):
    lat, fracs, _ = _arrays(real_structures[:3])
    skewed = lat.copy()
    skewed[1] = np.array([[1, 2, 0], [0, 1, -3], [0, 0, 1]]) @ lat[1]
    frac1 = fracs[1] @ lat[1] @ np.linalg.inv(skewed[1])
    cells, out_fracs, errors = sc.check_and_reduce_cells(
        skewed.copy(), [fracs[0], frac1, fracs[2][:1].repeat(2, 0)], ["a", "b", "c"]
    )
    assert set(errors) == {2}
    assert "entry 'c': overlapping atoms" in errors[2]
    assert sc._is_reduced(cells[1][None])[0]
    assert not sc._is_reduced(skewed[1][None])[0]
    # the same periodic sites, in the reduced basis
    frac_in = (frac1 @ skewed[1]) @ np.linalg.inv(cells[1])
    d = frac_in - out_fracs[1]
    np.testing.assert_allclose(d, np.rint(d), atol=1e-9)


# ------------------------------------------------------------------------------ distances


def _distances(records):
    b = collate(records)
    return minimum_image_distances(b.prim_coords, b.super_coords, b.lattice)


def test_distances_equal_pymatgen_supercell_built_from_the_input(real_structures):
    """Independent check: pymatgen builds the supercell from the input structure itself."""
    for i, s in enumerate(real_structures):
        r = featurize_structure(s, FeaturizerConfig(primitive=False), name=str(i))
        lat = r.lattice.astype(np.float64)
        m = np.rint(lat @ np.linalg.inv(s.lattice.matrix)).astype(int)
        sup = s * m
        inv = np.linalg.inv(lat)
        diff = r.super_coords.astype(np.float64)[:, None, :] @ inv - sup.cart_coords[None] @ inv
        diff -= np.rint(diff)
        match = np.linalg.norm(diff @ lat, axis=-1).argmin(1)  # our site -> pymatgen site
        assert sorted(match.tolist()) == list(range(len(sup)))
        ref = sup.distance_matrix[np.ix_(match[: r.n_prim], match)]
        ours = _distances([r])[0].numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-5, err_msg=f"structure {i}")


def test_distances_equal_pymatgen_on_records_with_primitive_cells(real_structures):
    recs = featurize(real_structures, progress=False)
    d = _distances(recs)
    assert d.shape == (len(recs), max(r.n_prim for r in recs), max(r.n_super for r in recs))
    for k, r in enumerate(recs):
        sup = Structure(
            Lattice(r.lattice.astype(np.float64)),
            r.atomic_numbers[r.image_of].tolist(),
            r.super_coords.astype(np.float64),
            coords_are_cartesian=True,
        )
        ref = sup.distance_matrix[: r.n_prim]
        np.testing.assert_allclose(d[k, : r.n_prim, : r.n_super].numpy(), ref, atol=1e-5)
        assert torch.all(torch.diagonal(d[k, : r.n_prim, : r.n_prim]) == 0)


def test_padding_does_not_change_real_entries(real_structures):
    recs = featurize(real_structures[:8], progress=False)
    batched = _distances(recs)
    for k, r in enumerate(recs):
        alone = _distances([r])[0]
        torch.testing.assert_close(batched[k, : r.n_prim, : r.n_super], alone, rtol=0, atol=1e-6)


def test_distances_brute_force_on_skewed_cells():
    """Reduced but strongly triclinic cells: the 27-image search equals a 7^3-image search."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        lat = Lattice.from_parameters(*rng.uniform(3, 9, 3), *rng.uniform(65, 115, 3))
        s = Structure(lat, ["Si"] * 3, rng.random((3, 3)))
        if (s.distance_matrix + 10 * np.eye(3)).min() < 0.5:
            continue
        r = featurize_structure(s, FeaturizerConfig(max_supercell_sites=12))
        latr = r.lattice.astype(np.float64)
        diff = r.super_coords[None].astype(np.float64) - r.prim_coords[:, None].astype(np.float64)
        g = np.arange(-3, 4)
        shifts = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3) @ latr
        brute = np.linalg.norm(diff[:, :, None, :] + shifts, axis=-1).min(-1)
        np.testing.assert_allclose(_distances([r])[0].numpy(), brute, atol=1e-5)


def test_dtype_follows_input_and_lattice_translation_invariance(real_structures):
    r = featurize_structure(real_structures[7])
    b = collate([r])
    d32 = minimum_image_distances(b.prim_coords, b.super_coords, b.lattice)
    assert d32.dtype == torch.float32
    d64 = minimum_image_distances(
        b.prim_coords.double(), b.super_coords.double(), b.lattice.double()
    )
    assert d64.dtype == torch.float64
    torch.testing.assert_close(d32.double(), d64, atol=1e-6, rtol=0)
    shift = torch.tensor([[1.0, -1.0, 2.0]], dtype=torch.float64) @ b.lattice[0].double()
    moved = minimum_image_distances(
        b.prim_coords.double(), b.super_coords.double() + shift, b.lattice.double()
    )
    torch.testing.assert_close(moved, d64, atol=1e-9, rtol=0)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected prim_coords"):
        minimum_image_distances(torch.zeros(2, 3), torch.zeros(1, 4, 3), torch.eye(3)[None])


def test_coulomb_features_values_clip_and_padding():
    z_i = torch.tensor([[[26.0], [8.0], [0.0]]])  # (1, 3, 1); last row is padding
    z_j = torch.tensor([[[26.0, 8.0]]])  # (1, 1, 2)
    d = torch.tensor([[[0.0, 2.0], [2.0, 3.0], [1.0, 1.0]]])
    out = coulomb_features(z_i, z_j, d)
    assert out.shape == (1, 3, 2)
    assert torch.isfinite(out).all()
    assert out[0, 0, 0] == COULOMB_CLIP  # self pair, r = 0
    assert out[0, 0, 1].item() == pytest.approx(math.log(26 * 8 / 2.0))
    assert out[0, 1, 1].item() == pytest.approx(math.log(8 * 8 / 3.0))
    # padding (Z = 0): the product is clamped to 1, so the value is log(1 / r), finite
    assert out[0, 2, 0].item() == pytest.approx(0.0)
    assert (out <= COULOMB_CLIP).all()
