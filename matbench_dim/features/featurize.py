"""Crystal structures -> compact Site-Net records -> padded batches.

This module holds the featurizer's public data types (:class:`FeaturizerConfig`,
:class:`CrystalRecord`, :class:`Batch`), reading pymatgen Structures into arrays, the
parallel chunked driver :func:`featurize` and batching (:func:`collate`,
:func:`batch_indices`). The cell geometry (validation, LLL reduction, primitive cells,
near-orthorhombic supercells) lives in :mod:`matbench_dim.features.supercell`, the on-disk shard
cache in :mod:`matbench_dim.features.cache`; their public names are re-exported here.

A structure is read (ordered, non-empty, finite, Z in 1..103), checked and LLL-reduced,
optionally reduced to its primitive cell, then expanded to a supercell of at most
``max_supercell_sites`` sites (see :mod:`matbench_dim.features.supercell` for each step). Site
features come from :mod:`matbench_dim.features.elements` (8 scaled Magpie properties) and are looked
up from the atomic numbers; the cache stores geometry and Z only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from matbench_dim.features.cache import FORMAT_VERSION, ShardCache, cache_root, content_keys
from matbench_dim.features.elements import MAX_Z, site_features
from matbench_dim.features.supercell import (
    LLL_DELTA,
    OVERLAP_DISTANCE,
    PRIMITIVE_SYMPREC,
    SupercellBlock,
    check_and_reduce_cells,
    lll_reduce,
    primitive_cell,
    primitive_cells,
    rq_shear,
    supercell_matrix,
    supercell_sites,
)

if TYPE_CHECKING:  # torch is imported lazily so that joblib workers start fast
    import torch

__all__ = [
    "FORMAT_VERSION",
    "LLL_DELTA",
    "OVERLAP_DISTANCE",
    "PRIMITIVE_SYMPREC",
    "Batch",
    "CrystalRecord",
    "FeaturizationError",
    "FeaturizerConfig",
    "RecordList",
    "ShardCache",
    "SupercellBlock",
    "batch_indices",
    "cache_root",
    "check_and_reduce_cells",
    "collate",
    "content_keys",
    "featurize",
    "featurize_structure",
    "lll_reduce",
    "primitive_cell",
    "primitive_cells",
    "rq_shear",
    "supercell_matrix",
    "supercell_sites",
]

logger = logging.getLogger(__name__)


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


# --------------------------------------------------------------------------- featurization


def _records(block: SupercellBlock, rows: Iterable[int] | None = None) -> dict[int, CrystalRecord]:
    """Records of the given rows of ``block`` (default all), as views into its arrays."""
    p0 = np.concatenate([[0], np.cumsum(block.n_prim)]).tolist()
    s0 = np.concatenate([[0], np.cumsum(block.n_super)]).tolist()
    feats = site_features(block.atomic_numbers)
    out = {}
    for r in range(len(block.n_prim)) if rows is None else rows:
        a, b, c, d = p0[r], p0[r + 1], s0[r], s0[r + 1]
        out[r] = CrystalRecord(
            feats[a:b],
            block.atomic_numbers[a:b],
            block.prim_coords[a:b],
            block.super_coords[c:d],
            block.image_of[c:d],
            block.lattice[r],
        )
    return out


def _featurize_batch(
    lattices: np.ndarray,
    fracs: list[np.ndarray],
    zs: list[np.ndarray],
    names: list[str],
    config: FeaturizerConfig,
) -> tuple[list[int], SupercellBlock, dict[int, str]]:
    """Featurize K cells at once (inputs as returned by :func:`_read_structures`).

    Returns the positions of the cells that succeeded, their geometry (a
    :class:`SupercellBlock` without keys) and ``{position: error message}`` for the others.
    """
    lat = np.array(lattices, dtype=np.float64).reshape(-1, 3, 3)
    lat, fracs, failures = check_and_reduce_cells(lat, list(fracs), list(names))
    ok = [i for i in range(len(fracs)) if i not in failures]
    if not ok:
        return [], SupercellBlock.concat([]), failures
    lat, fracs, zs = lat[ok], [fracs[i] for i in ok], [zs[i] for i in ok]
    if config.primitive:
        lat, fracs, zs = primitive_cells(lat, fracs, zs, [names[i] for i in ok])
    return ok, supercell_sites(lat, fracs, zs, config.max_supercell_sites), failures


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


def featurize_structure(
    structure: Any, config: FeaturizerConfig | None = None, name: str | None = None
) -> CrystalRecord:
    """Featurize one pymatgen Structure (pure function; steps in :mod:`matbench_dim.features.supercell`).

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
    return _records(block)[0]


Chunk = tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _featurize_chunk(
    chunk: Chunk, config: FeaturizerConfig
) -> tuple[SupercellBlock, dict[str, str]]:
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
    return SupercellBlock.concat(blocks), bad


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
    for k, (i, key) in enumerate(zip(read, content_keys(lat, fracs, zs), strict=True)):
        keys[i] = key
        if key not in todo:
            todo[key] = (names[i], lat[k], fracs[k], zs[k])
    cache = ShardCache(cache_dir, config.key()) if cache_dir is not None else None
    found = cache.load(todo) if cache else {}
    todo = {k: v for k, v in todo.items() if k not in found}
    logger.info("featurize: %d structures, %d to featurize", n, len(todo))
    failed = _run_chunks(todo, config, cache, found, n_jobs, progress, chunk_size)
    if cache is not None and todo:
        cache.save_index()
    for i, k in enumerate(keys):
        if k in failed:
            failures[i] = failed[k]
    by_block: dict[int, tuple[SupercellBlock, list[int]]] = {}
    for k in {k for i, k in enumerate(keys) if k is not None and i not in failures}:
        block, row = found[k]
        by_block.setdefault(id(block), (block, []))[1].append(row)
    made: dict[str, CrystalRecord] = {}
    for block, rows in by_block.values():
        for r, rec in _records(block, rows).items():
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
    cache: ShardCache | None,
    found: dict[str, tuple[SupercellBlock, int]],
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
        results: Iterable[tuple[SupercellBlock, dict[str, str]]] = (
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

    def pin_memory(self) -> Batch:
        """Copy of the batch in page-locked host memory (for non-blocking GPU copies)."""
        return Batch(
            **{f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)}
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
