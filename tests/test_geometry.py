"""Minimum-image distances and the log-Coulomb pair feature against pymatgen."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pymatgen.core import Lattice, Structure

from matbench_dim.featurize import FeaturizerConfig, collate, featurize, featurize_structure
from matbench_dim.model.geometry import COULOMB_CLIP, coulomb_features, minimum_image_distances


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
