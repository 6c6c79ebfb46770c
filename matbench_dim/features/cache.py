"""On-disk cache of featurized geometry: content keys and ``shard-*.npz`` files.

A cache directory ``<cache_dir>/sitenet-v<FORMAT_VERSION>-<config key>`` holds one shard per
featurized chunk (a :class:`~matbench_dim.features.supercell.SupercellBlock`: geometry and atomic
numbers, no site features) and an ``index.npz`` mapping content keys to (shard, row).
Structures are keyed by :func:`content_keys` (lattice, species and fractional coordinates),
so identical structures are featurized once whatever their ids. Used by
:func:`matbench_dim.features.featurize.featurize`; bumping ``FORMAT_VERSION`` invalidates every cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from matbench_dim.features.supercell import SupercellBlock

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1


def content_keys(lat: np.ndarray, fracs: list[np.ndarray], zs: list[np.ndarray]) -> list[str]:
    """Content key (32 hex digits) of each of K cells, the key of the cache.

    A blake2b hash of the lattice ``lat[k]`` (Angstrom) and fractional coordinates
    ``fracs[k]`` (N_k, 3), both rounded to 1e-6, and atomic numbers ``zs[k]`` (N_k,).
    """
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


def cache_root(cache_dir: str | os.PathLike[str], config_key: str) -> Path:
    """Directory of the cache of one featurizer config (``config_key``) under ``cache_dir``."""
    return Path(cache_dir) / f"sitenet-v{FORMAT_VERSION}-{config_key}"


class ShardCache:
    """Directory ``<cache_dir>/sitenet-v<FORMAT_VERSION>-<config_key>`` of shard files.

    ``config_key`` is :meth:`matbench_dim.features.featurize.FeaturizerConfig.key`. Each shard (one
    per featurized chunk, written to a temp file then renamed) holds a
    :class:`~matbench_dim.features.supercell.SupercellBlock`; ``index.npz`` maps content keys to
    (shard, row) and is rebuilt incrementally from the shards it does not list, so a killed
    run keeps what it wrote.
    """

    def __init__(self, cache_dir: str | os.PathLike[str], config_key: str) -> None:
        self.root = cache_root(cache_dir, config_key)
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

    def write(self, block: SupercellBlock) -> None:
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

    def load(self, keys: Iterable[str]) -> dict[str, tuple[SupercellBlock, int]]:
        """``{key: (block, row)}`` for every requested key present in the cache."""
        wanted = {self.where[k][0] for k in set(keys) if k in self.where}
        out: dict[str, tuple[SupercellBlock, int]] = {}
        for s in wanted:
            try:
                with np.load(self.root / s) as d:
                    block = SupercellBlock(
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
