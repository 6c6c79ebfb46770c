"""Cell geometry of the Site-Net featurizer: reduction, primitive cells and supercells.

Pure numpy on arrays (lattices ``(K, 3, 3)`` with rows = vectors in Angstrom, fractional
coordinates, atomic numbers), vectorised over K cells; spglib is used only for cells that
are not primitive. :mod:`matbench_dim.features.featurize` runs these steps in order:

1. :func:`check_and_reduce_cells`: degenerate lattices and atoms closer than
   ``OVERLAP_DISTANCE`` = 0.1 Angstrom are errors; lattices are LLL-reduced
   (:func:`lll_reduce`).
2. :func:`primitive_cells` (optional; one cell: :func:`primitive_cell`). A cell whose species
   counts have gcd 1, or that has no pure lattice translation mapping it onto itself (checked
   in numpy), is already primitive; only the rest go through spglib
   (``standardize_cell(to_primitive=True, no_idealize=True)``, symprec ``PRIMITIVE_SYMPREC``
   = 0.01 Angstrom). A failure or a change of composition keeps the input cell.
3. :func:`supercell_sites`: near-orthorhombic supercell of at most N = ``max_sites`` sites.
   :func:`rq_shear` RQ-decomposes the lattice and normalises inv(R) to a unit-diagonal shear
   S; increments (1, 1, 1) grow along the axis of shortest sheared length while
   prod(increments) * n_prim <= N; the scaling matrix (:func:`supercell_matrix`) is
   M = rint(diag(increments) @ S) (upper triangular, det = prod(increments)). A cell with more
   than N sites keeps its P sites. Images are built here, not with pymatgen's
   ``make_supercell``: fractional coordinates ``(frac + t) @ inv(M)`` wrapped to [0, 1),
   translation-major, so ``image_of = tile(arange(P), det M)`` and
   ``prim_coords == super_coords[:P]``.
4. The supercell lattice is LLL-reduced where needed (same lattice, better basis) so that
   the 27-image minimum-image search of :mod:`matbench_dim.model.geometry` finds the true
   minimum (checked against pymatgen to 1e-5 Angstrom on real and random cells).

The result of step 3 is a :class:`SupercellBlock`, the concatenated geometry of K crystals,
which is also what a cache shard (:mod:`matbench_dim.features.cache`) holds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from matbench_dim.features.elements import MAX_Z

logger = logging.getLogger(__name__)

PRIMITIVE_SYMPREC = 0.01  # Angstrom, spglib distance tolerance
OVERLAP_DISTANCE = 0.1  # Angstrom: closer atoms are an error
LLL_DELTA = 0.99
_SHIFTS = np.array(
    [(i, j, k) for i in (-1, 0, 1) for j in (-1, 0, 1) for k in (-1, 0, 1)], dtype=np.float64
)

# --------------------------------------------------------------------------- lattice bases

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


# --------------------------------------------------------------------------- K cells at once


@dataclass
class SupercellBlock:
    """Concatenated supercell geometry of K crystals (P_k unique, S_k supercell sites each).

    A featurization worker's result and the content of one cache shard. Row k's sites are
    the slices ``[sum(n_prim[:k]), sum(n_prim[:k + 1]))`` of the per-site arrays (and the
    same with ``n_super`` for the supercell arrays).

    Attributes
    ----------
    n_prim, n_super : (K,) int64 site counts.
    atomic_numbers : (sum P,) int16.
    prim_coords : (sum P, 3) float32 Cartesian Angstrom.
    super_coords : (sum S, 3) float32 Cartesian Angstrom.
    image_of : (sum S,) int32 index in [0, P_k) of the unique site each image comes from.
    lattice : (K, 3, 3) float32 supercell lattices, rows are vectors in Angstrom.
    keys : K content keys of the crystals (set by the caller; empty from
        :func:`supercell_sites`).
    """

    n_prim: np.ndarray
    n_super: np.ndarray
    atomic_numbers: np.ndarray
    prim_coords: np.ndarray
    super_coords: np.ndarray
    image_of: np.ndarray
    lattice: np.ndarray
    keys: list[str] = field(default_factory=list)

    @classmethod
    def concat(cls, blocks: list[SupercellBlock]) -> SupercellBlock:
        """One block holding the crystals of ``blocks`` in order (empty for no blocks)."""
        if not blocks:
            e = np.zeros(0, np.int64)
            return cls(
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
            for f in dataclasses.fields(cls)
            if f.name != "keys"
        }
        return cls(keys=[k for b in blocks for k in b.keys], **cat)


def check_and_reduce_cells(
    lat: np.ndarray, fracs: list[np.ndarray], names: list[str]
) -> tuple[np.ndarray, list[np.ndarray], dict[int, str]]:
    """LLL-reduce the cells that need it; find degenerate cells and overlapping atoms.

    Overlaps are screened with the single nearest image of each pair, which is exact when all
    plane spacings are >= 0.2 Angstrom; thinner or suspect cells (and cells of more than 256
    sites) get the exact 27-image check.

    Parameters
    ----------
    lat : (K, 3, 3) float64 lattices (Angstrom); fracs : K arrays (N_k, 3) of fractional
    coordinates; names : K entry ids for the messages. ``lat`` and ``fracs`` are modified in
    place.

    Returns
    -------
    The (reduced) ``lat`` and ``fracs``, and ``{index: message}`` for the unusable cells.
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


def primitive_cells(
    lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray], names: list[str]
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Replace the cells that have a pure translation by spglib's (LLL-reduced) primitive cell.

    ``lat`` (K, 3, 3), ``fracs`` and ``zs`` (K arrays (N_k, 3) and (N_k,)) are modified in
    place and returned; ``names`` are the entry ids used in debug logs.
    """
    n = np.array([len(z) for z in zs])
    for i in np.flatnonzero(_pure_translations(lat, np.concatenate(fracs), np.concatenate(zs), n)):
        cell = lat[i]
        plat, pfrac, pz = _spglib_primitive(cell, fracs[i], zs[i], names[i])
        if plat is not cell:
            red = lll_reduce(plat)
            fracs[i], zs[i], lat[i] = _wrap(pfrac @ plat @ np.linalg.inv(red)), pz, red
    return lat, fracs, zs


def supercell_sites(
    lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray], max_sites: int
) -> SupercellBlock:
    """Site-Net supercells of K cells, vectorised over cells and images.

    ``lat`` (K, 3, 3) Angstrom, ``fracs`` and ``zs`` K arrays (P_k, 3) and (P_k,); each
    supercell has at most ``max(max_sites, P_k)`` sites (see :func:`supercell_matrix`).
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
    return SupercellBlock(
        n_prim=n,
        n_super=n_super,
        atomic_numbers=z,
        prim_coords=cart[prim_rows].astype(np.float32),
        super_coords=cart.astype(np.float32),
        image_of=local.astype(np.int32),
        lattice=slat.astype(np.float32),
    )
