"""One epoch of DIM pretraining on 10^5 structures: wall time, featurization, peak memory.

    python benchmarks/bench_large.py [--structures 100000] [--epochs 1]

No 10^5-structure set is reachable from the development machine, so the pool is the real
perovskite subset of ../shared/data (11,742 crystals; the shipped 300-crystal sample without
it) repeated with seeded perturbations: every copy gets its own random strain (|e| <= 2 %) and
site displacements (0.05 A), so every structure is distinct and is featurized on its own
(no cache hit between copies). Prints the time to build the pool, featurization time and rate
(through the estimator's on-disk cache in a temporary folder), the epoch time and crystals/s,
and the process's resident memory after building the pool, after featurization and at the end
(peak: ru_maxrss), with the memory per structure. The last line reads
``10^5 run: <N> structures, featurize <F> s, epoch <E> s, peak <M> MiB``.
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from matbench_dim.estimator import SiteNetDIMRegressor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def base_structures() -> list:
    from matminer.utils.io import load_dataframe_from_json

    perov = SHARED / "subsets" / "matbench_perovskites_partial.json.gz"
    if not perov.exists():
        from importlib import resources

        perov = (
            resources.files("matbench_dim")
            / "data"
            / "samples"
            / "perovskites_subset_sample.json.gz"
        )
    return list(load_dataframe_from_json(str(perov), pbar=False)["structure"])


def perturbed_pool(base: list, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        s = base[k % len(base)].copy()
        if k >= len(base):  # the originals once, then distinct perturbed copies
            strain = rng.uniform(-0.02, 0.02, size=(3, 3))
            s.apply_strain(((strain + strain.T) / 2).tolist())
            s.perturb(0.05, min_distance=0.0)
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--structures", type=int, default=100_000)
    ap.add_argument("--epochs", type=int, default=1)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rss0 = rss_mib()
    t0 = time.perf_counter()
    pool = perturbed_pool(base_structures(), args.structures)
    t_pool = time.perf_counter() - t0
    rss_pool = rss_mib()
    print(
        f"pool: {len(pool)} structures built in {t_pool:.0f} s; RSS {rss0:.0f} -> {rss_pool:.0f} MiB"
    )
    with tempfile.TemporaryDirectory() as cache:
        est = SiteNetDIMRegressor(cache_dir=cache, pretrain__epochs=args.epochs,
                                  pretrain__patience=0, encoder__activation="silu")  # fmt: skip
        t1 = time.perf_counter()
        records = est._featurize(pool, [str(i) for i in range(len(pool))])
        t_feat = time.perf_counter() - t1
        rss_feat = rss_mib()
        print(f"featurize: {t_feat:.0f} s ({len(pool) / t_feat:.0f} structures/s); RSS {rss_feat:.0f} MiB "
              f"({(rss_feat - rss_pool) * 1024 / len(pool):.1f} KiB per record)")  # fmt: skip
        del records
        t2 = time.perf_counter()
        est.pretrain(pool)  # featurizes again, from the cache this time
        t_all = time.perf_counter() - t2
    epoch = sum(h["epoch_time_s"] for h in est.pretrain_history_)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"pretrain: {t_all:.0f} s in all (cache reads included), {epoch:.0f} s in "
          f"{len(est.pretrain_history_)} epoch(s), {len(pool) * args.epochs / epoch:.0f} crystals/s; "
          f"RSS at the end {rss_mib():.0f} MiB, peak {peak:.0f} MiB")  # fmt: skip
    print(f"10^5 run: {len(pool)} structures, featurize {t_feat:.0f} s, epoch {epoch / args.epochs:.0f} s, "
          f"peak {peak:.0f} MiB")  # fmt: skip


if __name__ == "__main__":
    main()
