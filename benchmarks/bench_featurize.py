"""Featurization throughput, cache size and padding overhead on real matbench structures.

Compares, in the same run and on the same cores, the project's path (``featurize`` + ``batch_indices``
+ ``collate``) with a straightforward per-structure pymatgen implementation (pymatgen primitive
cell, ``make_supercell`` of the same supercell matrix, ``Structure.distance_matrix``, per-site
``Element`` property lookups, padding into tensors). The straightforward path runs on a seeded
random subset and its rate is extrapolated to the whole set.

    python benchmarks/bench_featurize.py                 # phonons + perovskites, ~1-2 minutes
    python benchmarks/bench_featurize.py --datasets jdft2d --baseline-subset 100

Prints figures; not a test. Data: ``$MATBENCH_DIM_SHARED_DATA`` or ``../shared/data``; falls
back to the jdft2d task shipped in the package.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import warnings
from importlib import resources
from pathlib import Path

os.environ.setdefault("MATBENCH_DIM_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402

from matbench_dim.featurize import (  # noqa: E402
    FeaturizerConfig,
    batch_indices,
    collate,
    featurize,
    supercell_matrix,
)
from matbench_dim.model.geometry import minimum_image_distances  # noqa: E402

torch.set_num_threads(int(os.environ["MATBENCH_DIM_NUM_THREADS"]))

SHARED = Path(os.environ.get("MATBENCH_DIM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FILES = {
    "phonons": SHARED / "matbench_phonons.json.gz",
    "perovskites": SHARED / "subsets" / "matbench_perovskites_partial.json.gz",
    "jdft2d": Path(str(resources.files("matbench_dim") / "datasets" / "matbench_jdft2d.json.gz")),
}


def load(name: str, limit: int | None) -> list:
    from matminer.utils.io import load_dataframe_from_json

    path = FILES[name]
    if not path.exists():
        print(f"[{name}] {path} not found; falling back to the shipped jdft2d")
        path = FILES["jdft2d"]
    df = load_dataframe_from_json(str(path), pbar=False)
    structures = list(df["structure"])
    return structures[:limit] if limit else structures


# ---------------------------------------------------------------- straightforward pymatgen path


def _baseline_one(structure, config: FeaturizerConfig):
    from pymatgen.core import Element
    from pymatgen.transformations.standard_transformations import PrimitiveCellTransformation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prim = PrimitiveCellTransformation().apply_transformation(structure) if config.primitive else structure
        m = supercell_matrix(prim.lattice.matrix, len(prim), config.max_supercell_sites)
        sup = prim.copy()
        sup.make_supercell(m)  # pymatgen orders the images site by site
        det = len(sup) // len(prim)
        dist = sup.distance_matrix[::det]  # (P, S): rows of the unique sites
        feats = []
        for sp in prim.species:
            el = Element(sp.symbol)
            ie = el.ionization_energies
            feats.append(
                [
                    el.Z,
                    float(el.atomic_mass),
                    el.row,
                    el.group,
                    ie[0] if ie else np.nan,
                    el.X,
                    float(el.atomic_radius) if el.atomic_radius is not None else np.nan,
                    float(el.density_of_solid) if el.density_of_solid is not None else np.nan,
                ]
            )
    feats = np.nan_to_num(np.asarray(feats, dtype=np.float32)) * np.float32([0.1, 0.1, 1, 1, 1, 10, 10, 0.001])
    return feats, dist.astype(np.float32)


def _baseline_batches(items, max_sites: int):
    out = []
    for idx in batch_indices([len(f) for f, _ in items], max_sites):
        feats = torch.nn.utils.rnn.pad_sequence([torch.from_numpy(items[i][0]) for i in idx], batch_first=True)
        p = max(items[i][1].shape[0] for i in idx)
        s = max(items[i][1].shape[1] for i in idx)
        dist = torch.zeros(len(idx), p, s)
        for k, i in enumerate(idx):
            d = items[i][1]
            dist[k, : d.shape[0], : d.shape[1]] = torch.from_numpy(d)
        out.append((feats, dist))
    return out


def run_baseline(structures, config, n_jobs: int, max_sites: int) -> float:
    t0 = time.perf_counter()
    items = Parallel(n_jobs=n_jobs)(delayed(_baseline_one)(s, config) for s in structures)
    _baseline_batches(items, max_sites)
    return time.perf_counter() - t0


# ---------------------------------------------------------------- project path


def run_ours(structures, config, n_jobs: int, max_sites: int, cache_dir=None, distances=False):
    t0 = time.perf_counter()
    records = featurize(structures, config, n_jobs=n_jobs, cache_dir=cache_dir, progress=False)
    t_feat = time.perf_counter() - t0
    batches = [collate(records, idx) for idx in batch_indices([r.n_prim for r in records], max_sites)]
    t_batch = time.perf_counter() - t0
    if distances:
        for b in batches:
            minimum_image_distances(b.prim_coords, b.super_coords, b.lattice)
    return records, t_feat, t_batch, time.perf_counter() - t0


def padding_overhead(records, batches) -> float:
    padded = sum(len(b) * max(records[i].n_prim for i in b) * max(records[i].n_super for i in b) for b in batches)
    real = sum(r.n_prim * r.n_super for r in records)
    return padded / real


def random_batches(n_sites, max_sites, seed):
    order = np.random.default_rng(seed).permutation(len(n_sites))
    out, cur, tot = [], [], 0
    for i in order.tolist():
        if cur and tot + n_sites[i] > max_sites:
            out.append(cur)
            cur, tot = [], 0
        cur.append(i)
        tot += n_sites[i]
    return out + ([cur] if cur else [])


def cache_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def bench(name: str, args) -> None:
    t0 = time.perf_counter()
    structures = load(name, args.max_structures)
    n = len(structures)
    print(f"\n== {name}: {n} structures (loaded in {time.perf_counter() - t0:.1f} s)")
    cfg = FeaturizerConfig(max_supercell_sites=args.max_supercell_sites, primitive=not args.no_primitive)
    nj = args.n_jobs

    # project path (joblib pool already warm: see main)
    records, t_feat, t_batch, t_dist = run_ours(structures, cfg, nj, args.max_sites, distances=True)
    rate = n / t_batch
    print(
        f"ours      featurize+collate: {rate:8.0f} structures/s  ({t_feat:.2f} s featurize, "
        f"{t_batch - t_feat:.2f} s batch_indices+collate; + distances on all batches: {n / t_dist:.0f}/s)"
    )
    if cfg.primitive:
        _, t_np, _, _ = run_ours(structures, FeaturizerConfig(args.max_supercell_sites, primitive=False), nj, args.max_sites)
        print(f"          featurize without primitive reduction: {n / t_np:.0f}/s (with: {n / t_feat:.0f}/s)")
    n_p = np.array([r.n_prim for r in records])
    n_s = np.array([r.n_super for r in records])
    print(f"          unique sites mean {n_p.mean():.1f} (max {n_p.max()}), supercell sites mean {n_s.mean():.1f} (max {n_s.max()})")

    # straightforward path on a subset
    rng = np.random.default_rng(0)
    sub_idx = rng.choice(n, size=min(args.baseline_subset, n), replace=False)
    subset = [structures[i] for i in sub_idx]
    t_base = run_baseline(subset, cfg, nj, args.max_sites)
    base_rate = len(subset) / t_base
    _, _, t_ours_sub, t_ours_sub_d = run_ours(subset, cfg, nj, args.max_sites, distances=True)
    print(f"pymatgen  straightforward:   {base_rate:8.1f} structures/s  (subset of {len(subset)}, extrapolated)")
    print(
        f"ratio     ours / pymatgen:   {rate / base_rate:8.1f} x  (whole set vs subset); same subset: "
        f"{t_base / t_ours_sub:.1f} x, {t_base / t_ours_sub_d:.1f} x with distances"
    )

    # cache: size and re-read speed
    tmp = Path(tempfile.mkdtemp(prefix="bench-featurize-"))
    try:
        t0 = time.perf_counter()
        featurize(structures, cfg, n_jobs=nj, cache_dir=tmp, progress=False)
        t_write = time.perf_counter() - t0
        size = cache_bytes(tmp)
        t0 = time.perf_counter()
        featurize(structures, cfg, n_jobs=nj, cache_dir=tmp, progress=False)
        t_read = time.perf_counter() - t0
        n_shards = len(list(tmp.rglob("shard-*.npz")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"cache     {size / n:.0f} B/structure -> {size / n * 1e5 / 2**20:.0f} MiB per 1e5 structures; "
        f"{n_shards} shards; write {n / t_write:.0f}/s, cached re-read {n / t_read:.0f}/s"
    )

    # padding overhead of size-bucketed batches vs random batches
    sizes = n_p.tolist()
    bucketed = batch_indices(sizes, args.max_sites, shuffle=True, seed=0)
    ordered = batch_indices(sizes, args.max_sites)
    rand = random_batches(sizes, args.max_sites, seed=0)
    print(
        f"padding   padded/real (prim x super) pairs at {args.max_sites} sites/batch: "
        f"bucketed+shuffled {padding_overhead(records, bucketed):.3f} ({len(bucketed)} batches), "
        f"sorted {padding_overhead(records, ordered):.3f}, random {padding_overhead(records, rand):.3f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=["phonons", "perovskites"], choices=sorted(FILES))
    ap.add_argument("--n-jobs", type=int, default=2)
    ap.add_argument("--max-structures", type=int, default=None, help="cap per dataset")
    ap.add_argument("--baseline-subset", type=int, default=300)
    ap.add_argument("--max-sites", type=int, default=1200, help="unique sites per batch")
    ap.add_argument("--max-supercell-sites", type=int, default=50)
    ap.add_argument("--no-primitive", action="store_true")
    args = ap.parse_args()
    print(f"n_jobs={args.n_jobs}, torch threads={torch.get_num_threads()}, cpus={os.cpu_count()}")
    # start the worker pool once (joblib/loky reuses it); report its cost separately
    warm = load("jdft2d", 64)
    t0 = time.perf_counter()
    featurize(warm, n_jobs=args.n_jobs, progress=False, chunk_size=16)
    Parallel(n_jobs=args.n_jobs)(delayed(_baseline_one)(s, FeaturizerConfig()) for s in warm[:8])
    print(f"worker pool start-up (once per process): {time.perf_counter() - t0:.2f} s")
    t0 = time.perf_counter()
    for name in args.datasets:
        bench(name, args)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
