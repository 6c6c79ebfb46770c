"""Pair geometry of padded batches: minimum-image distances and the log-Coulomb pair feature."""

from __future__ import annotations

import itertools

import torch

COULOMB_CLIP = 10.0

_SHIFTS = torch.tensor(list(itertools.product((-1.0, 0.0, 1.0), repeat=3)), dtype=torch.float64)


def minimum_image_distances(
    prim_coords: torch.Tensor, super_coords: torch.Tensor, lattice: torch.Tensor
) -> torch.Tensor:
    """Minimum-image distances between unique sites and supercell sites.

    The difference vector is expressed in fractional coordinates of the supercell lattice,
    wrapped to [-0.5, 0.5], and the shortest of its 27 neighbouring images is taken: the true
    minimum image for the reduced, near-orthorhombic lattices stored by
    :mod:`matbench_dim.features.featurize` (tests: within 1e-5 Angstrom of pymatgen). Computed in
    float64 (float32 on Apple MPS, which has no float64) as ``|c|^2 + 2 c.v + |v|^2`` with one batched matmul over the 27 image offsets
    ``v``; not meant to be differentiated.

    Parameters
    ----------
    prim_coords : (B, P, 3) Cartesian Angstrom.
    super_coords : (B, S, 3) Cartesian Angstrom.
    lattice : (B, 3, 3) supercell lattice, rows are vectors (Angstrom). Must be invertible
        for every batch element (padded rows and columns may hold any coordinates).

    Returns
    -------
    (B, P, S) distances in Angstrom, dtype of ``prim_coords``.
    """
    if prim_coords.ndim != 3 or super_coords.ndim != 3 or lattice.shape[-2:] != (3, 3):
        raise ValueError(
            "expected prim_coords (B, P, 3), super_coords (B, S, 3), lattice (B, 3, 3); got "
            f"{tuple(prim_coords.shape)}, {tuple(super_coords.shape)}, {tuple(lattice.shape)}"
        )
    out_dtype = prim_coords.dtype
    work = torch.float32 if lattice.device.type == "mps" else torch.float64  # MPS: no float64
    lat = lattice.to(work)
    inv = torch.linalg.inv(lat)
    # Cartesian difference per pair first (exactly 0 for a site and itself, whatever the
    # BLAS kernel), then fractional, wrapped to [-0.5, 0.5], then Cartesian again
    delta = super_coords.to(work).unsqueeze(1) - prim_coords.to(work).unsqueeze(2)  # (B,P,S,3)
    diff = delta @ inv.unsqueeze(1)
    diff -= torch.round(diff)
    b, p, s = diff.shape[:3]
    cart = (diff @ lat.unsqueeze(1)).reshape(b, p * s, 3)
    shifts = _SHIFTS.to(lat.device, work) @ lat  # (B, 27, 3) Cartesian image offsets
    # |c + v|^2 = |c|^2 + 2 c.v + |v|^2 for the 27 images v: one batched matmul, no 5-D tensor
    d2 = torch.baddbmm(
        (shifts * shifts).sum(-1).unsqueeze(1), cart, shifts.transpose(1, 2), alpha=2.0
    )  # (B, P * S, 27)
    d2 = d2.amin(-1) + (cart * cart).sum(-1)
    return d2.clamp_min(0.0).sqrt().reshape(b, p, s).to(out_dtype)


def coulomb_features(z_i: torch.Tensor, z_j: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Clipped log-Coulomb pair feature ``min(log(Z_i Z_j / r_ij), 10)``.

    The clip at 10 bounds the self pair (r = 0) and very short contacts; Z products below 1
    (padding, Z = 0) are treated as 1 so the output is always finite.

    Parameters
    ----------
    z_i, z_j : atomic numbers, broadcastable against ``d`` (e.g. (B, P, 1) and (B, 1, S)).
    d : distances in Angstrom, e.g. (B, P, S).

    Returns
    -------
    Tensor of the broadcast shape, dtype of ``d``.
    """
    zz = (z_i.to(d.dtype) * z_j.to(d.dtype)).clamp(min=1.0)
    r = d.clamp(min=torch.finfo(d.dtype).tiny)
    return (torch.log(zz) - torch.log(r)).clamp(max=COULOMB_CLIP)
