"""Crystal structures -> compact Site-Net records -> padded batches, with an on-disk cache.

Pipeline (numpy, vectorised over a chunk of crystals; pymatgen is only used to read the
Structures, spglib only for cells that are not primitive):

1. Validate (ordered, non-empty, finite, non-degenerate lattice, no two atoms closer than
   0.1 Angstrom) and LLL-reduce the lattice.
2. Optional primitive cell. A cell whose species counts have gcd 1, or that has no pure
   lattice translation mapping it onto itself (checked in numpy), is already primitive; only
   the rest go through spglib (``standardize_cell(to_primitive=True, no_idealize=True)``,
   symprec 0.01 Angstrom). A failure or a change of composition keeps the input cell.
3. Near-orthorhombic supercell of at most ``max_supercell_sites`` = N sites: RQ-decompose the
   lattice, normalise inv(R) to a unit-diagonal shear S, grow increments (1, 1, 1) along the
   axis of shortest sheared length while prod(increments) * n_prim <= N; the scaling matrix is
   M = rint(diag(increments) @ S) (upper triangular, det = prod(increments)). A cell with more
   than N sites keeps its P sites. Images are built here, not with pymatgen's
   ``make_supercell``: fractional coordinates ``(frac + t) @ inv(M)`` wrapped to [0, 1),
   translation-major, so ``image_of = tile(arange(P), det M)`` and
   ``prim_coords == super_coords[:P]``.
4. The supercell lattice is LLL-reduced where needed (same lattice, better basis) so that
   the 27-image minimum-image search of :mod:`matbench_dim.model.geometry` finds the true
   minimum (checked against pymatgen to 1e-5 Angstrom on real and random cells).

Site features come from :mod:`matbench_dim.elements` (8 scaled Magpie properties) and are
looked up from the atomic numbers; the cache stores geometry and Z only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from matbench_dim.elements import MAX_Z, site_features

if TYPE_CHECKING:  # torch is imported lazily so that joblib workers start fast
    import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
PRIMITIVE_SYMPREC = 0.01  # Angstrom, spglib distance tolerance
OVERLAP_DISTANCE = 0.1  # Angstrom: closer atoms are an error
LLL_DELTA = 0.99
_SHIFTS = np.array(
    [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.float64
)


class FeaturizationError(ValueError):
    """A structure cannot be featurized. ``failures`` maps entry id -> reason."""

    def __init__(self, message: str, failures: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.failures: dict[str, str] = dict(failures or {})
        self.records: list[CrystalRecord | None] = []

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.args[0], self.failures))


@dataclass(frozen=True)
class FeaturizerConfig:
    """Featurizer settings.

    ``coulomb`` only tells the model to add the clipped log-Coulomb pair feature; records are
    identical either way, so it is not part of :meth:`key`.
    """

    max_supercell_sites: int = 50
    primitive: bool = True
    coulomb: bool = False

    def __post_init__(self) -> None:
        n = self.max_supercell_sites
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"max_supercell_sites must be an int >= 1, got {n!r}")
        for name in ("primitive", "coulomb"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-python dict of the fields."""
        return {
            "max_supercell_sites": int(self.max_supercell_sites),
            "primitive": bool(self.primitive),
            "coulomb": bool(self.coulomb),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FeaturizerConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)

    def key(self) -> str:
        """Stable 16-hex hash of everything that changes a record (format version included)."""
        payload = {
            "format": FORMAT_VERSION,
            "max_supercell_sites": int(self.max_supercell_sites),
            "primitive": bool(self.primitive),
            "symprec": PRIMITIVE_SYMPREC,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class CrystalRecord:
    """One featurized crystal (P unique sites, S supercell sites, F = 8 site features).

    Attributes
    ----------
    site_features : (P, F) float32 scaled elemental features of the unique sites.
    atomic_numbers : (P,) int16.
    prim_coords : (P, 3) float32 Cartesian Angstrom (equal to ``super_coords[:P]``).
    super_coords : (S, 3) float32 Cartesian Angstrom.
    image_of : (S,) int32, index in [0, P) of the unique site each supercell site images.
    lattice : (3, 3) float32 supercell lattice, rows are vectors in Angstrom.
    """

    site_features: np.ndarray
    atomic_numbers: np.ndarray
    prim_coords: np.ndarray
    super_coords: np.ndarray
    image_of: np.ndarray
    lattice: np.ndarray

    @property
    def n_prim(self) -> int:
        """Number of unique (primitive) sites P."""
        return int(self.atomic_numbers.shape[0])

    @property
    def n_super(self) -> int:
        """Number of supercell sites S."""
        return int(self.super_coords.shape[0])


class RecordList(list):
    """``list[CrystalRecord]`` returned by :func:`featurize`, plus bookkeeping.

    ``ids``/``indices``: id and input position of each returned record; ``skipped``: id ->
    reason for entries left out with ``errors="skip"``.
    """

    ids: list[str]
    indices: list[int]
    skipped: dict[str, str]


# --------------------------------------------------------------------------- cell geometry

Rows = list[list[float]]


def _dot(u: list[float], v: list[float]) -> float:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _lll(b: Rows, delta: float = LLL_DELTA) -> Rows:
    """LLL reduction of 3 row vectors in plain python (faster than numpy for 3 x 3)."""
    b = [row[:] for row in b]
    handed = np.linalg.det(np.array(b)) > 0

    def gram_schmidt() -> tuple[Rows, list[float]]:
        ortho: Rows = []
        mu = [[0.0] * 3 for _ in range(3)]
        norms: list[float] = []
        for i in range(3):
            v = b[i][:]
            for j in range(i):
                mu[i][j] = m = _dot(b[i], ortho[j]) / norms[j]
                v = [v[t] - m * ortho[j][t] for t in range(3)]
            ortho.append(v)
            norms.append(_dot(v, v))
        return mu, norms

    mu, norms = gram_schmidt()
    k, guard = 1, 0
    while k < 3 and guard < 1000:
        guard += 1
        for j in range(k - 1, -1, -1):
            q = round(mu[k][j])
            if q:
                b[k] = [b[k][t] - q * b[j][t] for t in range(3)]
                mu, norms = gram_schmidt()
        if norms[k] >= (delta - mu[k][k - 1] ** 2) * norms[k - 1]:
            k += 1
        else:
            b[k - 1], b[k] = b[k], b[k - 1]
            mu, norms = gram_schmidt()
            k = max(k - 1, 1)
    if (np.linalg.det(np.array(b)) > 0) != handed:
        b = [[-x for x in row] for row in b]
    return b


def lll_reduce(basis: np.ndarray, delta: float = LLL_DELTA) -> np.ndarray:
    """LLL-reduce a (3, 3) lattice (rows = vectors), keeping its handedness."""
    return np.array(_lll(np.asarray(basis, dtype=np.float64).tolist(), delta))


def _is_reduced(b: np.ndarray, delta: float = 0.75) -> np.ndarray:
    """(K,) whether the rows of each basis in ``b`` (K, 3, 3), sorted by length, are LLL-reduced.

    Only a property of the set of rows matters here (plane spacings, the 27 neighbouring
    images), so a basis that is (classically, delta = 0.75) LLL-reduced up to the order of its
    rows is kept as it is; the others are reduced with ``delta = 0.99``.
    """
    order = np.argsort(np.einsum("kij,kij->ki", b, b), axis=1)
    b = np.take_along_axis(b, order[:, :, None], axis=1)
    r = np.linalg.qr(np.swapaxes(b, 1, 2), mode="r")  # b_i = sum_j r[j, i] q_j
    d2 = np.diagonal(r, axis1=1, axis2=2) ** 2
    mu10, mu20, mu21 = r[:, 0, 1] / r[:, 0, 0], r[:, 0, 2] / r[:, 0, 0], r[:, 1, 2] / r[:, 1, 1]
    size = np.maximum(np.maximum(abs(mu10), abs(mu20)), abs(mu21)) <= 0.51
    lovasz1 = d2[:, 1] >= (delta - mu10**2) * d2[:, 0]
    lovasz2 = d2[:, 2] >= (delta - mu21**2) * d2[:, 1]
    return size & lovasz1 & lovasz2


def _heights(b: np.ndarray) -> np.ndarray:
    """(K, 3) spacings (Angstrom) of the lattice planes of each basis in ``b`` (K, 3, 3)."""
    vol = np.abs(np.linalg.det(b))
    crosses = np.stack(
        [np.cross(b[:, 1], b[:, 2]), np.cross(b[:, 2], b[:, 0]), np.cross(b[:, 0], b[:, 1])], 1
    )
    return vol[:, None] / np.maximum(np.linalg.norm(crosses, axis=2), 1e-300)


def _wrap(frac: np.ndarray) -> np.ndarray:
    """Fractional coordinates wrapped to [0, 1)."""
    f = frac - np.floor(frac)
    f[f >= 1.0] = 0.0
    return f


def _min_image_matrix(lattice: np.ndarray, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """(na, nb) minimum-image distances (Angstrom) over the 27 neighbouring images."""
    shifts = _SHIFTS @ lattice  # (27, 3) Cartesian
    out = np.empty((len(fa), len(fb)))
    block = max(1, 20_000 // max(len(fb), 1))
    for s in range(0, len(fa), block):
        d = fb[None, :, :] - fa[s : s + block, None, :]
        d -= np.rint(d)
        c = (d @ lattice)[:, :, None, :] + shifts  # (a, b, 27, 3)
        out[s : s + block] = np.sqrt(np.einsum("abkl,abkl->abk", c, c).min(-1))
    return out


def _overlap_error(lattice: np.ndarray, frac: np.ndarray, name: str) -> str | None:
    """Exact (27-image) overlap check of one cell: the error message, or None."""
    self_image = float(
        np.linalg.norm(_SHIFTS[np.any(_SHIFTS != 0, axis=1)] @ lattice, axis=1).min()
    )
    if self_image < OVERLAP_DISTANCE:
        return (
            f"entry {name!r}: overlapping atoms (a lattice vector is {self_image:.3g} Angstrom, "
            f"shorter than {OVERLAP_DISTANCE})"
        )
    if len(frac) < 2:
        return None
    dist = _min_image_matrix(lattice, frac, frac)
    np.fill_diagonal(dist, np.inf)
    i, j = divmod(int(np.argmin(dist)), len(frac))
    if dist[i, j] >= OVERLAP_DISTANCE:
        return None
    return (
        f"entry {name!r}: overlapping atoms (sites {i} and {j} are {dist[i, j]:.3g} Angstrom "
        f"apart, closer than {OVERLAP_DISTANCE})"
    )


def _pure_translations(
    lat: np.ndarray, frac: np.ndarray, z: np.ndarray, n: np.ndarray, max_pairs: int = 500_000
) -> np.ndarray:
    """(K,) whether a non-zero translation maps each cell onto itself (within 0.02 Angstrom).

    Vectorised over cells. The number of such translations divides every species count, so
    cells whose counts have gcd 1 are primitive; for the others the candidates are the
    offsets between sites of the rarest species, each checked against all site pairs.

    Parameters
    ----------
    lat : (K, 3, 3); frac : (N, 3) and z : (N,) concatenated over the cells; n : (K,) sizes.
    """
    k = len(n)
    off = np.concatenate([[0], np.cumsum(n)])
    owner = np.repeat(np.arange(k), n)
    counts = np.zeros((k, MAX_Z + 1), dtype=np.int64)
    np.add.at(counts, (owner, z), 1)
    out = np.zeros(k, dtype=bool)
    maybe = np.gcd.reduce(counts, axis=1) > 1
    if not maybe.any():
        return out
    rare = np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max), axis=1)
    idx = np.flatnonzero(maybe[owner] & (z == rare[owner]))  # rare-species sites, by cell
    own = owner[idx]
    starts = np.r_[True, own[1:] != own[:-1]]
    first = np.zeros(k, dtype=np.int64)
    first[own[starts]] = idx[starts]
    cand_site, cand_own = idx[~starts], own[~starts]
    trans = frac[cand_site] - frac[first[cand_own]]  # (C, 3) candidate translations
    size = n[cand_own] ** 2
    bounds = np.searchsorted(np.cumsum(size), np.arange(1, 1 + size.sum() // max_pairs) * max_pairs)
    for group in np.split(np.arange(len(cand_own)), np.unique(bounds)):
        if not group.size:
            continue
        c_own, nc = cand_own[group], n[cand_own[group]]
        rep = np.repeat(np.arange(len(group)), nc * nc)
        q = np.arange(len(rep)) - np.repeat(np.cumsum(nc * nc) - nc * nc, nc * nc)
        i_loc, j_loc = np.divmod(q, nc[rep])
        base = off[c_own][rep]
        ri, cj = base + i_loc, base + j_loc
        d = frac[cj] - frac[ri] - trans[group][rep]
        d -= np.rint(d)
        cart = np.einsum("pi,pij->pj", d, lat[c_own][rep])
        close = np.einsum("pi,pi->p", cart, cart) < (2 * PRIMITIVE_SYMPREC) ** 2
        close &= z[ri] == z[cj]
        row_seg = np.repeat(nc, nc)  # one segment of nc pairs per (candidate, site i)
        row_ok = np.logical_or.reduceat(close, np.cumsum(row_seg) - row_seg)
        cand_ok = np.logical_and.reduceat(row_ok, np.cumsum(nc) - nc)
        np.logical_or.at(out, c_own, cand_ok)
    return out


def _spglib_primitive(
    lattice: np.ndarray, frac: np.ndarray, z: np.ndarray, name: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """spglib's primitive cell, or the input when spglib fails or changes the composition."""
    import spglib

    try:
        with warnings.catch_warnings():  # spglib >= 2.5 warns about its error-handling mode
            warnings.simplefilter("ignore", DeprecationWarning)
            res = spglib.standardize_cell(
                (lattice, frac, z), to_primitive=True, no_idealize=True, symprec=PRIMITIVE_SYMPREC
            )
    except Exception as exc:  # spglib raises its own error types across versions
        logger.debug("entry %s: spglib primitive failed (%s); keeping the input cell", name, exc)
        return lattice, frac, z
    if res is None:
        logger.debug("entry %s: spglib found no primitive cell; keeping the input cell", name)
        return lattice, frac, z
    pl, pf, pz = (np.asarray(a) for a in res)
    n, p = len(z), len(pz)
    nz = max(int(z.max()), int(pz.max())) + 1
    same_comp = (
        p > 0
        and n % p == 0
        and np.array_equal(np.bincount(z, minlength=nz), np.bincount(pz, minlength=nz) * (n // p))
    )
    if not same_comp or not math.isclose(
        abs(np.linalg.det(pl)) * n / p, abs(np.linalg.det(lattice)), rel_tol=1e-3
    ):
        logger.debug("entry %s: primitive cell changes composition; keeping the input", name)
        return lattice, frac, z
    if np.linalg.det(pl) < 0:
        pl, pf = -pl, -pf
    return pl.astype(np.float64), _wrap(pf.astype(np.float64)), pz.astype(np.int64)


def primitive_cell(
    lattice: np.ndarray, frac: np.ndarray, z: np.ndarray, name: str = "?"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Primitive cell (lattice (3,3), frac (P,3), z (P,)); the input itself when primitive."""
    if not _pure_translations(lattice[None], frac, z, np.array([len(z)]))[0]:
        return lattice, frac, z
    return _spglib_primitive(lattice, frac, z, name)


def rq_shear(lattices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sheared lengths and shears of lattices from their RQ decompositions ``L = R Q``.

    Parameters
    ----------
    lattices : (K, 3, 3), rows are vectors.

    Returns
    -------
    ``|diag(R)|`` (K, 3) and the unit-diagonal upper-triangular shears ``diag(R) inv(R)``
    (K, 3, 3), for which ``S @ L`` has orthogonal rows of those lengths. Closed form
    (backward Gram-Schmidt, vectorised); equal to ``scipy.linalg.rq`` (tested).
    """
    a, b, c = lattices[:, 0], lattices[:, 1], lattices[:, 2]
    r33 = np.linalg.norm(c, axis=1)
    q3 = c / r33[:, None]
    r23 = np.einsum("ki,ki->k", b, q3)
    b_perp = b - r23[:, None] * q3
    r22 = np.linalg.norm(b_perp, axis=1)
    q2 = b_perp / r22[:, None]
    r12, r13 = np.einsum("ki,ki->k", a, q2), np.einsum("ki,ki->k", a, q3)
    r11 = np.linalg.norm(a - r12[:, None] * q2 - r13[:, None] * q3, axis=1)
    shear = np.broadcast_to(np.eye(3), lattices.shape).copy()
    shear[:, 0, 1] = -r12 / r22
    shear[:, 0, 2] = (r12 * r23 / r22 - r13) / r33
    shear[:, 1, 2] = -r23 / r33
    return np.stack([r11, r22, r33], 1), shear


def _supercell_matrices(
    lattices: np.ndarray, n_prim: np.ndarray, max_sites: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scaling matrices (K, 3, 3) int64 and increments (K, 3) of the Site-Net supercells."""
    lengths, shear = rq_shear(lattices)
    k = len(lattices)
    inc = np.ones((k, 3), dtype=np.int64)
    active = np.ones(k, dtype=bool)
    rows = np.arange(k)
    while active.any():
        trial = inc.copy()
        trial[rows, np.argmin(inc * lengths, axis=1)] += 1
        active &= trial.prod(1) * n_prim <= max_sites
        inc[active] = trial[active]
    return np.rint(inc[:, :, None] * shear).astype(np.int64), inc


def supercell_matrix(lattice: np.ndarray, n_prim: int, max_sites: int) -> np.ndarray:
    """Integer (3, 3) scaling matrix M (upper triangular, det = prod(increments)).

    The supercell lattice is ``M @ lattice``; it has ``det(M) * n_prim <= max(max_sites,
    n_prim)`` sites and is near-orthorhombic (RQ shear construction of the Site-Net seed).
    A cell with more than ``max_sites`` sites gets a unimodular M (same sites, sheared basis).
    """
    lat = np.asarray(lattice, dtype=np.float64)[None]
    return _supercell_matrices(lat, np.array([n_prim]), max_sites)[0][0]


# --------------------------------------------------------------------------- featurization


@dataclass
class _Block:
    """Concatenated geometry of K crystals: a worker's result and a cache shard's content."""

    keys: list[str]
    n_prim: np.ndarray  # (K,)
    n_super: np.ndarray  # (K,)
    atomic_numbers: np.ndarray  # (sum P,) int16
    prim_coords: np.ndarray  # (sum P, 3) float32
    super_coords: np.ndarray  # (sum S, 3) float32
    image_of: np.ndarray  # (sum S,) int32
    lattice: np.ndarray  # (K, 3, 3) float32

    def records(self, rows: Iterable[int] | None = None) -> dict[int, CrystalRecord]:
        """Records of the given rows (default all), as views into the block's arrays."""
        p0 = np.concatenate([[0], np.cumsum(self.n_prim)]).tolist()
        s0 = np.concatenate([[0], np.cumsum(self.n_super)]).tolist()
        feats = site_features(self.atomic_numbers)
        out = {}
        for r in range(len(self.n_prim)) if rows is None else rows:
            a, b, c, d = p0[r], p0[r + 1], s0[r], s0[r + 1]
            out[r] = CrystalRecord(
                feats[a:b],
                self.atomic_numbers[a:b],
                self.prim_coords[a:b],
                self.super_coords[c:d],
                self.image_of[c:d],
                self.lattice[r],
            )
        return out


def _check_and_reduce(
    lat: np.ndarray, fracs: list[np.ndarray], names: list[str]
) -> tuple[np.ndarray, list[np.ndarray], dict[int, str]]:
    """LLL-reduce the cells that need it; find degenerate cells and overlapping atoms.

    Overlaps are screened with the single nearest image of each pair, which is exact when all
    plane spacings are >= 0.2 Angstrom; thinner or suspect cells (and cells of more than 256
    sites) get the exact 27-image check. Returns the (reduced) cells and ``{index: message}``.
    """
    errors: dict[int, str] = {}
    for i in np.flatnonzero(_heights(lat).min(1) < 1e-6):
        errors[int(i)] = f"entry {names[i]!r}: degenerate lattice (volume ~ 0)"
    for i in np.flatnonzero(~_is_reduced(lat)):
        if i not in errors:
            red = lll_reduce(lat[i])
            fracs[i] = _wrap(fracs[i] @ lat[i] @ np.linalg.inv(red))
            lat[i] = red
    n = np.array([len(f) for f in fracs])
    small = np.flatnonzero(n <= 256)
    ns = n[small]
    frac = np.concatenate([fracs[i] for i in small]) if small.size else np.zeros((0, 3))
    off = np.concatenate([[0], np.cumsum(ns)])
    owner = np.repeat(np.arange(len(ns)), ns)  # all n^2 ordered pairs of each small cell
    cnt = ns[owner]
    rows = np.repeat(np.arange(len(owner)), cnt)
    cols = np.repeat(off[owner], cnt) + np.arange(len(rows)) - np.repeat(np.cumsum(cnt) - cnt, cnt)
    d = frac[cols] - frac[rows]
    d -= np.rint(d)
    c = np.einsum("pi,pij->pj", d, lat[small][owner[rows]])
    d2 = np.einsum("pi,pi->p", c, c)
    d2[rows == cols] = np.inf
    min_d2 = np.zeros(len(n))
    if small.size:
        min_d2[small] = np.minimum.reduceat(d2, np.cumsum(ns * ns) - ns * ns)
    with np.errstate(invalid="ignore", divide="ignore"):
        thin = _heights(lat).min(1) < 2 * OVERLAP_DISTANCE
    for i in np.flatnonzero((min_d2 < OVERLAP_DISTANCE**2) | thin):
        if i not in errors:
            msg = _overlap_error(lat[i], fracs[i], names[i])
            if msg:
                errors[int(i)] = msg
    return lat, fracs, errors


def _primitive_cells(
    lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray], names: list[str]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Replace the cells that have a pure translation by spglib's (LLL-reduced) primitive cell."""
    n = np.array([len(z) for z in zs])
    for i in np.flatnonzero(_pure_translations(lat, np.concatenate(fracs), np.concatenate(zs), n)):
        cell = lat[i]
        plat, pfrac, pz = _spglib_primitive(cell, fracs[i], zs[i], names[i])
        if plat is not cell:
            red = lll_reduce(plat)
            fracs[i], zs[i], lat[i] = _wrap(pfrac @ plat @ np.linalg.inv(red)), pz, red
    return lat, fracs, zs


def _supercells(
    lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray], max_sites: int
) -> _Block:
    """Site-Net supercells of K cells, vectorised over cells and images.

    Images are ``(frac + t) @ inv(M)`` wrapped to [0, 1) for the translations t of the box
    ``0 <= t < diag(M)`` (a complete set of cosets because M is upper triangular),
    translation-major. Supercell lattices that are not LLL-reduced are reduced (rare).
    """
    n = np.array([len(z) for z in zs], dtype=np.int64)
    off = np.concatenate([[0], np.cumsum(n)])
    frac = np.concatenate(fracs)
    z = np.concatenate(zs).astype(np.int16)
    m, inc = _supercell_matrices(lat, n, max_sites)
    n_super = inc.prod(1) * n
    s_off = np.concatenate([[0], np.cumsum(n_super)])
    owner = np.repeat(np.arange(len(n)), n_super)
    t_idx, local = np.divmod(np.arange(len(owner)) - s_off[owner], n[owner])
    i2 = inc[owner]
    t = np.stack(
        [t_idx // (i2[:, 1] * i2[:, 2]), (t_idx // i2[:, 2]) % i2[:, 1], t_idx % i2[:, 2]], 1
    )
    m_inv = np.linalg.inv(m.astype(np.float64))
    sfrac = _wrap(np.einsum("ri,rij->rj", frac[off[owner] + local] + t, m_inv[owner]))
    slat = m @ lat
    cart = np.einsum("ri,rij->rj", sfrac, slat[owner])
    for i in np.flatnonzero(~_is_reduced(slat)):
        red = lll_reduce(slat[i])
        seg = slice(s_off[i], s_off[i + 1])
        cart[seg] = _wrap(cart[seg] @ np.linalg.inv(red)) @ red
        slat[i] = red
    prim_rows = np.repeat(s_off[:-1], n) + np.arange(len(z)) - np.repeat(off[:-1], n)
    return _Block(
        keys=[],
        n_prim=n,
        n_super=n_super,
        atomic_numbers=z,
        prim_coords=cart[prim_rows].astype(np.float32),
        super_coords=cart.astype(np.float32),
        image_of=local.astype(np.int32),
        lattice=slat.astype(np.float32),
    )


def _featurize_batch(
    lattices: np.ndarray,
    fracs: list[np.ndarray],
    zs: list[np.ndarray],
    names: list[str],
    config: FeaturizerConfig,
) -> tuple[list[int], _Block, dict[int, str]]:
    """Featurize K cells at once (inputs as returned by :func:`_read_structures`).

    Returns the positions of the cells that succeeded, their geometry (a :class:`_Block`
    without keys) and ``{position: error message}`` for the others.
    """
    lat = np.array(lattices, dtype=np.float64).reshape(-1, 3, 3)
    lat, fracs, failures = _check_and_reduce(lat, list(fracs), list(names))
    ok = [i for i in range(len(fracs)) if i not in failures]
    if not ok:
        return [], _concat_blocks([]), failures
    lat, fracs, zs = lat[ok], [fracs[i] for i in ok], [zs[i] for i in ok]
    if config.primitive:
        lat, fracs, zs = _primitive_cells(lat, fracs, zs, [names[i] for i in ok])
    return ok, _supercells(lat, fracs, zs, config.max_supercell_sites), failures


def _read_structures(
    structures: Sequence[Any], names: Sequence[str]
) -> tuple[list[int], np.ndarray, list[np.ndarray], list[np.ndarray], dict[int, str]]:
    """Arrays of ordered Structures, with the checks that need no geometry.

    Returns the positions read, lattices (K, 3, 3), fractional coordinates and atomic numbers
    (one array per structure) and ``{position: message}`` for unusable entries (not a
    Structure, no sites, disordered site, element outside Z = 1..103, non-finite numbers).
    """
    from pymatgen.core import IStructure, Structure

    failures: dict[int, str] = {}
    read: list[int] = []
    lats, fracs, zs = [], [], []
    for i, s in enumerate(structures):
        name = names[i]
        if not isinstance(s, Structure | IStructure):
            failures[i] = f"entry {name!r}: expected a pymatgen Structure, got {type(s).__name__}"
        elif len(s) == 0:
            failures[i] = f"entry {name!r}: structure has no sites"
        elif not s.is_ordered:
            j = next(j for j, site in enumerate(s) if not site.is_ordered)
            failures[i] = (
                f"entry {name!r}: site {j} is disordered ({s[j].species}); only ordered "
                "structures (full occupancy, one species per site) can be featurized"
            )
        else:
            read.append(i)
            lats.append(s.lattice.matrix)
            fracs.append(np.array([site.frac_coords for site in s], dtype=np.float64))
            zs.append(np.array([next(iter(site.species)).Z for site in s], dtype=np.int64))
    if not read:
        return [], np.zeros((0, 3, 3)), [], [], failures
    lat = np.array(lats, dtype=np.float64)
    n = np.array([len(z) for z in zs])
    owner = np.repeat(np.arange(len(read)), n)
    z, frac = np.concatenate(zs), np.concatenate(fracs)
    bad_z = (z < 1) | (z > MAX_Z)
    bad_x = ~np.isfinite(frac).all(1)
    bad = np.zeros(len(read), dtype=bool)
    bad[owner[bad_x]] = True
    bad[~np.isfinite(lat).all(axis=(1, 2))] = True
    for k in np.flatnonzero(bad):
        failures[read[k]] = f"entry {names[read[k]]!r}: non-finite lattice or coordinates"
    for g in np.flatnonzero(bad_z & ~bad[owner]):
        k = int(owner[g])
        if read[k] not in failures:
            j = int(g - np.searchsorted(owner, k))
            failures[read[k]] = (
                f"entry {names[read[k]]!r}: site {j} ({structures[read[k]][j].specie}) has "
                f"Z={z[g]}; site features exist for Z=1..{MAX_Z}"
            )
    keep = [k for k, i in enumerate(read) if i not in failures]
    if len(keep) < len(read):
        read, lat = [read[k] for k in keep], lat[keep]
        fracs, zs = [fracs[k] for k in keep], [zs[k] for k in keep]
    return read, lat, fracs, zs, failures


def _content_keys(lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray]) -> list[str]:
    """Hash of each cell's lattice, species and fractional coordinates rounded to 1e-6."""
    if not fracs:
        return []
    lat_i = np.rint(lat * 1e6).astype(np.int64)
    frac_i = np.rint(np.concatenate(fracs) * 1e6).astype(np.int64)
    z_i = np.concatenate(zs).astype(np.int64)
    off = np.concatenate([[0], np.cumsum([len(z) for z in zs])]).tolist()
    keys = []
    for k in range(len(fracs)):
        h = hashlib.blake2b(lat_i[k].tobytes(), digest_size=16)
        h.update(frac_i[off[k] : off[k + 1]].tobytes())
        h.update(z_i[off[k] : off[k + 1]].tobytes())
        keys.append(h.hexdigest())
    return keys


def featurize_structure(
    structure: Any, config: FeaturizerConfig | None = None, name: str | None = None
) -> CrystalRecord:
    """Featurize one pymatgen Structure (pure function; see the module docstring).

    Raises
    ------
    FeaturizationError
        Disordered, empty, overlapping or non-finite structure; the message names ``name``.
    """
    config = config or FeaturizerConfig()
    name = "<structure>" if name is None else str(name)
    _, lat, fracs, zs, failures = _read_structures([structure], [name])
    if not failures:
        _, block, failures = _featurize_batch(lat, fracs, zs, [name], config)
    if failures:
        raise FeaturizationError(failures[0], {name: failures[0]})
    return block.records()[0]


Chunk = tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _featurize_chunk(chunk: Chunk, config: FeaturizerConfig) -> tuple[_Block, dict[str, str]]:
    """Worker task: featurize a chunk ``(keys, names, lattices, frac, z, n)`` of cells.

    Returns the geometry of the good cells (with their keys) and ``{key: message}`` for the
    bad ones; an unexpected error in the vectorised path is isolated by retrying one by one.
    """
    keys, names, lattices, frac, z, n = chunk
    cut = np.cumsum(n)[:-1]
    fracs, zs = np.split(frac, cut), np.split(z, cut)
    try:
        ok, block, failed = _featurize_batch(lattices, fracs, zs, names, config)
        block.keys = [keys[i] for i in ok]
        return block, {keys[i]: msg for i, msg in failed.items()}
    except Exception:
        if len(keys) == 1:
            raise
        logger.debug("vectorised featurization failed; retrying one by one", exc_info=True)
    blocks, bad = [], {}
    for i in range(len(keys)):
        one = ([keys[i]], [names[i]], lattices[i : i + 1], fracs[i], zs[i], n[i : i + 1])
        try:
            b, f = _featurize_chunk(one, config)
        except Exception as exc:
            b, f = None, {keys[i]: f"entry {names[i]!r}: {exc!r}"}
        bad.update(f)
        if b is not None and b.keys:
            blocks.append(b)
    return _concat_blocks(blocks), bad


def _concat_blocks(blocks: list[_Block]) -> _Block:
    if not blocks:
        e = np.zeros(0, np.int64)
        return _Block(
            [],
            e,
            e,
            e.astype(np.int16),
            np.zeros((0, 3), np.float32),
            np.zeros((0, 3), np.float32),
            e.astype(np.int32),
            np.zeros((0, 3, 3), np.float32),
        )
    cat = {
        f.name: np.concatenate([getattr(b, f.name) for b in blocks])
        for f in dataclasses.fields(_Block)
        if f.name != "keys"
    }
    return _Block(keys=[k for b in blocks for k in b.keys], **cat)


# --------------------------------------------------------------------------- on-disk cache


class _ShardCache:
    """Directory ``<cache_dir>/sitenet-v<FORMAT>-<config.key()>`` of ``shard-*.npz`` files.

    Each shard (one per featurized chunk, written to a temp file then renamed) holds a
    :class:`_Block`; ``index.npz`` maps content keys to (shard, row) and is rebuilt
    incrementally from the shards it does not list, so a killed run keeps what it wrote.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], config: FeaturizerConfig) -> None:
        self.root = Path(cache_dir) / f"sitenet-v{FORMAT_VERSION}-{config.key()}"
        self.root.mkdir(parents=True, exist_ok=True)
        self.where: dict[str, tuple[str, int]] = {}
        self._load_index()

    def _atomic_save(self, path: Path, **arrays: np.ndarray) -> None:
        tmp = self.root / f".tmp-{uuid.uuid4().hex}.npz"
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def _load_index(self) -> None:
        shards = {p.name for p in self.root.glob("shard-*.npz")}
        listed: set[str] = set()
        index = self.root / "index.npz"
        if index.exists():
            try:
                with np.load(index) as d:
                    names = [str(s) for s in d["shards"]]
                    listed = set(names)
                    for k, s, r in zip(d["keys"], d["shard_of"], d["row"], strict=True):
                        if names[s] in shards:
                            self.where[k.decode()] = (names[s], int(r))
            except Exception as exc:
                logger.warning("cache index %s unreadable (%s); rebuilding it", index, exc)
                listed, self.where = set(), {}
        new = sorted(shards - listed)
        for name in new:
            try:
                with np.load(self.root / name) as d:
                    for r, k in enumerate(d["keys"]):
                        self.where[k.decode()] = (name, r)
            except Exception as exc:
                logger.warning("cache shard %s unreadable (%s); ignoring it", name, exc)
        if new or listed - shards:
            self.save_index()

    def save_index(self) -> None:
        """Write ``index.npz`` (atomically) from the in-memory key map."""
        names = sorted({s for s, _ in self.where.values()})
        pos = {n: i for i, n in enumerate(names)}
        keys = list(self.where)
        try:
            self._atomic_save(
                self.root / "index.npz",
                shards=np.array(names, dtype=str),
                keys=np.array(keys, dtype="S32"),
                shard_of=np.array([pos[self.where[k][0]] for k in keys], dtype=np.int32),
                row=np.array([self.where[k][1] for k in keys], dtype=np.int32),
            )
        except OSError as exc:
            logger.warning("could not write cache index in %s: %s", self.root, exc)

    def write(self, block: _Block) -> None:
        """Write one block as a shard (Z as uint8, image_of as int16 when it fits)."""
        if not block.keys:
            return
        name = f"shard-{uuid.uuid4().hex[:16]}.npz"
        small = int(block.n_prim.max()) < 2**15
        self._atomic_save(
            self.root / name,
            keys=np.array(block.keys, dtype="S32"),
            n_prim=block.n_prim.astype(np.int32),
            n_super=block.n_super.astype(np.int32),
            atomic_numbers=block.atomic_numbers.astype(np.uint8),
            prim_coords=block.prim_coords,
            super_coords=block.super_coords,
            image_of=block.image_of.astype(np.int16 if small else np.int32),
            lattice=block.lattice,
        )
        for r, k in enumerate(block.keys):
            self.where[k] = (name, r)

    def load(self, keys: Iterable[str]) -> dict[str, tuple[_Block, int]]:
        """``{key: (block, row)}`` for every requested key present in the cache."""
        wanted = {self.where[k][0] for k in set(keys) if k in self.where}
        out: dict[str, tuple[_Block, int]] = {}
        for s in wanted:
            try:
                with np.load(self.root / s) as d:
                    block = _Block(
                        keys=[k.decode() for k in d["keys"]],
                        n_prim=d["n_prim"].astype(np.int64),
                        n_super=d["n_super"].astype(np.int64),
                        atomic_numbers=d["atomic_numbers"].astype(np.int16),
                        prim_coords=d["prim_coords"],
                        super_coords=d["super_coords"],
                        image_of=d["image_of"].astype(np.int32),
                        lattice=d["lattice"],
                    )
            except Exception as exc:
                logger.warning("cache shard %s unreadable (%s); recomputing", s, exc)
                continue
            out.update({k: (block, r) for r, k in enumerate(block.keys)})
        return out


# --------------------------------------------------------------------------- batch driver


def featurize(
    structures: Sequence[Any],
    config: FeaturizerConfig | None = None,
    *,
    ids: Sequence[Any] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    n_jobs: int = 1,
    progress: bool = True,
    errors: Literal["raise", "skip"] = "raise",
    chunk_size: int | None = None,
) -> RecordList:
    """Featurize many structures, in parallel chunks, through an on-disk cache.

    Parameters
    ----------
    structures
        pymatgen Structures.
    ids
        Entry ids used in error messages (default: the positions ``"0"``, ``"1"``, ...).
    cache_dir
        Cache root (``None``: no cache). Identical structures (content hash) are featurized
        once; a second call with the same structures and config featurizes nothing.
    n_jobs
        joblib processes (1: in-process; -1: all cores). Work is sent in chunks of
        ``chunk_size`` structures (default: about 4 chunks per process, 256 to 4096 each),
        each vectorised and written to the cache as one shard.
    errors
        ``"raise"``: after featurizing (and caching) every good entry, raise one
        :class:`FeaturizationError` listing all bad entries (``.failures``, ``.records``).
        ``"skip"``: leave bad entries out (see ``RecordList.skipped``).

    Returns
    -------
    RecordList of CrystalRecord, in input order.
    """
    if errors not in ("raise", "skip"):
        raise ValueError(f"errors must be 'raise' or 'skip', got {errors!r}")
    config = config or FeaturizerConfig()
    structures = list(structures)
    n = len(structures)
    names = [str(i) for i in range(n)] if ids is None else [str(i) for i in ids]
    if len(names) != n:
        raise ValueError(f"got {len(names)} ids for {n} structures")
    read, lat, fracs, zs, failures = _read_structures(structures, names)
    keys: list[str | None] = [None] * n
    todo: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray]] = {}
    for k, (i, key) in enumerate(zip(read, _content_keys(lat, fracs, zs), strict=True)):
        keys[i] = key
        if key not in todo:
            todo[key] = (names[i], lat[k], fracs[k], zs[k])
    cache = _ShardCache(cache_dir, config) if cache_dir is not None else None
    found = cache.load(todo) if cache else {}
    todo = {k: v for k, v in todo.items() if k not in found}
    logger.info("featurize: %d structures, %d to featurize", n, len(todo))
    failed = _run_chunks(todo, config, cache, found, n_jobs, progress, chunk_size)
    if cache is not None and todo:
        cache.save_index()
    for i, k in enumerate(keys):
        if k in failed:
            failures[i] = failed[k]
    by_block: dict[int, tuple[_Block, list[int]]] = {}
    for k in {k for i, k in enumerate(keys) if k is not None and i not in failures}:
        block, row = found[k]
        by_block.setdefault(id(block), (block, []))[1].append(row)
    made: dict[str, CrystalRecord] = {}
    for block, rows in by_block.values():
        for r, rec in block.records(rows).items():
            made[block.keys[r]] = rec
    records: list[CrystalRecord | None] = [
        None if i in failures else made[keys[i]]
        for i in range(n)  # type: ignore[index]
    ]
    bad = {names[i]: failures[i] for i in sorted(failures)}
    if failures and errors == "raise":
        lines = "\n".join(f"  - {msg}" for msg in bad.values())
        done = "cached" if cache else "featurized"
        err = FeaturizationError(
            f"{len(bad)} of {n} structures could not be featurized (the others were {done}):\n"
            f"{lines}",
            bad,
        )
        err.records = records
        raise err
    if failures:
        logger.warning("featurize: skipped %d bad entries: %s", len(bad), ", ".join(bad))
    out = RecordList(r for r in records if r is not None)
    out.indices = [i for i in range(n) if i not in failures]
    out.ids = [names[i] for i in out.indices]
    out.skipped = bad
    return out


def _run_chunks(
    todo: dict[str, tuple[str, np.ndarray, np.ndarray, np.ndarray]],
    config: FeaturizerConfig,
    cache: _ShardCache | None,
    found: dict[str, tuple[_Block, int]],
    n_jobs: int,
    progress: bool,
    chunk_size: int | None,
) -> dict[str, str]:
    """Featurize ``todo`` into ``found``, writing one cache shard per chunk; return failures."""
    if not todo:
        return {}
    from joblib import Parallel, delayed
    from tqdm.auto import tqdm

    cpus = os.cpu_count() or 1
    workers = max(1, cpus + 1 + n_jobs if n_jobs < 0 else n_jobs)
    size = chunk_size or int(np.clip(math.ceil(len(todo) / (4 * workers)), 256, 4096))
    items = list(todo.items())
    chunks: list[Chunk] = []
    for s in range(0, len(items), size):
        part = items[s : s + size]
        chunks.append(
            (
                [k for k, _ in part],
                [v[0] for _, v in part],
                np.stack([v[1] for _, v in part]),
                np.concatenate([v[2] for _, v in part]),
                np.concatenate([v[3] for _, v in part]),
                np.array([len(v[3]) for _, v in part]),
            )
        )
    if workers == 1 or len(chunks) == 1:
        results: Iterable[tuple[_Block, dict[str, str]]] = (
            _featurize_chunk(c, config) for c in chunks
        )
    else:
        try:  # shards are written as chunks finish, in any order
            par = Parallel(n_jobs=workers, return_as="generator_unordered", batch_size=1)
        except ValueError:  # joblib < 1.4
            par = Parallel(n_jobs=workers, return_as="generator", batch_size=1)
        results = par(delayed(_featurize_chunk)(c, config) for c in chunks)
    failed: dict[str, str] = {}
    with tqdm(total=len(items), disable=not progress, desc="featurize", unit="struct") as bar:
        for block, bad in results:
            if cache is not None:
                cache.write(block)
            found.update({k: (block, r) for r, k in enumerate(block.keys)})
            failed.update(bad)
            bar.update(len(block.keys) + len(bad))
    return failed


# --------------------------------------------------------------------------- batching


@dataclass
class Batch:
    """Padded batch of B crystals (P = max unique sites, S = max supercell sites).

    ``site_features (B, P, F)`` float32, ``atomic_numbers (B, P)`` long, ``prim_mask (B, P)``
    bool, ``prim_coords (B, P, 3)`` float32, ``super_coords (B, S, 3)`` float32,
    ``image_of (B, S)`` long (0 on padding), ``super_mask (B, S)`` bool, ``lattice (B, 3, 3)``
    float32, ``index (B,)`` long positions of the crystals in the record list.
    """

    site_features: torch.Tensor
    atomic_numbers: torch.Tensor
    prim_mask: torch.Tensor
    prim_coords: torch.Tensor
    super_coords: torch.Tensor
    image_of: torch.Tensor
    super_mask: torch.Tensor
    lattice: torch.Tensor
    index: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Copy of the batch with every tensor on ``device``."""
        return Batch(
            **{
                f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
                for f in dataclasses.fields(self)
            }
        )

    def __len__(self) -> int:
        return int(self.index.shape[0])


def collate(records: Sequence[CrystalRecord], indices: Sequence[int] | None = None) -> Batch:
    """Pad the records at ``indices`` (default: all) into a :class:`Batch`."""
    import torch

    idx = list(range(len(records))) if indices is None else [int(i) for i in indices]
    if not idx:
        raise ValueError("cannot collate an empty batch")
    recs = [records[i] for i in idx]
    b = len(recs)
    n_p = np.array([r.atomic_numbers.shape[0] for r in recs])
    n_s = np.array([r.super_coords.shape[0] for r in recs])
    p, s = int(n_p.max()), int(n_s.max())
    # flat positions of every real site in the padded (B, P) and (B, S) layouts
    at_p = np.repeat(np.arange(b) * p - np.cumsum(n_p) + n_p, n_p) + np.arange(n_p.sum())
    at_s = np.repeat(np.arange(b) * s - np.cumsum(n_s) + n_s, n_s) + np.arange(n_s.sum())
    f = recs[0].site_features.shape[1]
    feats = np.zeros((b * p, f), np.float32)
    feats[at_p] = np.concatenate([r.site_features for r in recs])
    z = np.zeros(b * p, np.int64)
    z[at_p] = np.concatenate([r.atomic_numbers for r in recs])
    pc = np.zeros((b * p, 3), np.float32)
    pc[at_p] = np.concatenate([r.prim_coords for r in recs])
    sc = np.zeros((b * s, 3), np.float32)
    sc[at_s] = np.concatenate([r.super_coords for r in recs])
    img = np.zeros(b * s, np.int64)
    img[at_s] = np.concatenate([r.image_of for r in recs])
    pm = np.zeros(b * p, bool)
    pm[at_p] = True
    sm = np.zeros(b * s, bool)
    sm[at_s] = True
    lat = np.stack([r.lattice for r in recs]).astype(np.float32, copy=False)
    t = torch.from_numpy
    return Batch(
        site_features=t(feats.reshape(b, p, f)),
        atomic_numbers=t(z.reshape(b, p)),
        prim_mask=t(pm.reshape(b, p)),
        prim_coords=t(pc.reshape(b, p, 3)),
        super_coords=t(sc.reshape(b, s, 3)),
        image_of=t(img.reshape(b, s)),
        super_mask=t(sm.reshape(b, s)),
        lattice=t(lat),
        index=torch.tensor(idx, dtype=torch.long),
    )


def batch_indices(
    n_sites: Sequence[int],
    max_sites: int = 1200,
    shuffle: bool = False,
    seed: int | None = None,
    pool_batches: int = 32,
) -> list[list[int]]:
    """Group crystals into batches of at most ``max_sites`` unique sites in total.

    Crystals of similar size are batched together to limit padding: without shuffling, all
    crystals are sorted by size and packed greedily; with shuffling ("sortish" sampling), a
    seeded permutation is cut into pools of about ``pool_batches`` batches' worth of sites,
    each pool is sorted by size and packed, and the batches are shuffled. A crystal larger
    than ``max_sites`` gets a batch of its own. Deterministic given ``seed``.
    """
    sizes = np.asarray(n_sites, dtype=np.int64)
    if sizes.ndim != 1 or (sizes.size and sizes.min() < 1):
        raise ValueError("n_sites must be a 1-D sequence of positive integers")
    if max_sites < 1:
        raise ValueError(f"max_sites must be >= 1, got {max_sites}")
    rng = np.random.default_rng(seed)
    if shuffle:
        order = rng.permutation(len(sizes))
        pool_cut = np.cumsum(sizes[order]) // (pool_batches * max_sites)
        pools = [order[pool_cut == c] for c in np.unique(pool_cut)]
    else:
        pools = [np.arange(len(sizes))]
    batches: list[list[int]] = []
    for pool in pools:
        pool = pool[np.argsort(sizes[pool], kind="stable")]
        cur: list[int] = []
        total = 0
        for i in pool.tolist():
            if cur and total + sizes[i] > max_sites:
                batches.append(cur)
                cur, total = [], 0
            cur.append(i)
            total += int(sizes[i])
        if cur:
            batches.append(cur)
    if shuffle:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
    return batches
