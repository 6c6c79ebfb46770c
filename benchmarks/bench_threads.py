"""Torch threads 1 vs 2 (or any list) for pretraining, fine-tuning and featurization.

Each workload runs with every thread count in turn, interleaved, ``--repeats`` times, in one
process, so that the load from other jobs on a shared machine hits all counts alike. Prints
wall time per workload and thread count (median and best), CPU time, and the ratio to one
thread. This is what the default rule of ``matbench_dim.runtime.configure_threads`` rests on.

- pretraining: DIM steps (both stages, engineered negatives, AdamW) on ~1,200-site batches;
- fine-tuning: supervised steps (encoder + head, MSE, AdamW) on ~400-site batches;
- featurization: ``featurize`` (one process, no cache) + ``collate`` + the batches'
  minimum-image distances, the torch part of preparing data.

    python benchmarks/bench_threads.py [--threads 1 2] [--repeats 3] [--structures 600]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from matbench_dim.features.featurize import batch_indices, collate, featurize
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.layout import pair_inputs
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder, SiteNetRegressorNet
from matbench_dim.runtime import configure_allocator, usable_cpus

try:  # run as a script from the repository root or from benchmarks/
    from bench_encoder import load_structures
except ImportError:  # pragma: no cover
    from benchmarks.bench_encoder import load_structures


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--structures", type=int, default=600)
    ap.add_argument("--steps", type=int, default=3, help="training steps per measurement")
    args = ap.parse_args()
    configure_allocator()
    name, structures = load_structures(args.structures)
    records = featurize(structures, progress=False)

    def batches(sites: int) -> list:
        groups = batch_indices([r.n_prim for r in records], sites, shuffle=True, seed=0)
        return [collate(records, g) for g in groups if len(g) > 1][: args.steps]

    dim_batches, ft_batches = batches(1200), batches(400)
    cfg = EncoderConfig()
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg)
    objective = DIMObjective(DIMConfig(), cfg)
    net = SiteNetRegressorNet(SiteNetEncoder(cfg))
    opt_dim = torch.optim.AdamW(list(encoder.parameters()) + list(objective.parameters()))
    opt_ft = torch.optim.AdamW(net.parameters())
    gen = torch.Generator().manual_seed(0)

    def pretraining() -> None:
        for b in dim_batches:
            out = objective(encoder, b, gen)
            opt_dim.zero_grad()
            out["loss"].backward()
            opt_dim.step()

    def finetuning() -> None:
        for b in ft_batches:
            loss = net(b).pow(2).mean()
            opt_ft.zero_grad()
            loss.backward()
            opt_ft.step()

    def featurization() -> None:
        recs = featurize(structures[:300], progress=False, n_jobs=1)
        groups = batch_indices([r.n_prim for r in recs], 1200, shuffle=True, seed=0)
        for g in groups:
            pair_inputs(collate(recs, g))

    workloads = {
        "pretraining (DIM step)": pretraining,
        "fine-tuning (supervised step)": finetuning,
        "featurization": featurization,
    }
    print(
        f"data: {name}; {usable_cpus()} usable CPUs; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())} at start; thread counts "
        f"{args.threads}, {args.repeats} interleaved repeats"
    )
    for label, fn in workloads.items():
        for n in args.threads:  # warm-up (and compilation) at every count
            torch.set_num_threads(n)
            fn()
        wall: dict[int, list[float]] = {n: [] for n in args.threads}
        cpu: dict[int, list[float]] = {n: [] for n in args.threads}
        for _ in range(args.repeats):
            for n in args.threads:
                torch.set_num_threads(n)
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                wall[n].append(time.perf_counter() - t0)
                cpu[n].append(time.process_time() - c0)
        base = statistics.median(wall[args.threads[0]])
        for n in args.threads:
            med = statistics.median(wall[n])
            print(
                f"{label:30s} threads={n}: wall median {med:6.2f} s (best {min(wall[n]):6.2f} s), "
                f"CPU {statistics.median(cpu[n]):6.2f} s, wall x{med / base:.2f} of "
                f"threads={args.threads[0]}"
            )
    print(f"load average at end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
