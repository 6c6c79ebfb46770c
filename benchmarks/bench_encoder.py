"""Forward + backward throughput of the Site-Net encoder and of a DIM step on CPU.

Prints crystals/s for (a) a supervised step (encoder + head, MSE) and (b) a full DIM
pretraining step (local + global stage, engineered negatives), at N = 50 supercells and
batches of about 1,200 unique sites, plus peak memory (ru_maxrss). Real structures: the
perovskite subset in ../shared/data when present (else the shipped matbench_jdft2d).

    python benchmarks/bench_encoder.py [--threads 1] [--activation mish] [--batches 6]
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import numpy as np
import torch

from matbench_dim.features.featurize import batch_indices, collate, featurize
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.sitenet import (
    EncoderConfig,
    SiteNetEncoder,
    SiteNetRegressorNet,
    count_parameters,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def load_structures(limit: int) -> tuple[str, list]:
    from matminer.utils.io import load_dataframe_from_json

    perov = SHARED / "subsets" / "matbench_perovskites_partial.json.gz"
    if perov.exists():
        df = load_dataframe_from_json(str(perov), pbar=False)
        return "perovskite subset", list(df["structure"].iloc[:limit])
    from importlib import resources

    path = resources.files("matbench_dim") / "data" / "samples" / "matbench_jdft2d.json.gz"
    df = load_dataframe_from_json(str(path), pbar=False)
    return "matbench_jdft2d", list(df["structure"].iloc[:limit])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activation", default="mish", choices=["mish", "silu"])
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--batch-sites", type=int, default=1200)
    ap.add_argument("--structures", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    name, structures = load_structures(args.structures)
    records = featurize(structures, progress=False)
    groups = batch_indices([r.n_prim for r in records], args.batch_sites, shuffle=True, seed=0)
    groups = [g for g in groups if len(g) > 1][: args.batches]
    batches = [collate(records, g) for g in groups]
    n_crystals = sum(len(g) for g in groups)
    n_sites = sum(records[i].n_prim for g in groups for i in g)
    n_pairs = sum(records[i].n_prim * records[i].n_super for g in groups for i in g)
    cfg = EncoderConfig(activation=args.activation)
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg)
    net = SiteNetRegressorNet(encoder)
    objective = DIMObjective(DIMConfig(), cfg)
    print(
        f"data: {name}, {len(batches)} batches, {n_crystals} crystals, {n_sites} unique sites, "
        f"{n_pairs} pairs ({n_pairs / n_crystals:.0f} per crystal); threads={args.threads}, "
        f"activation={args.activation}"
    )
    print(
        f"parameters: encoder {count_parameters(encoder)}, DIM critics/probes "
        f"{count_parameters(objective)}"
    )
    opt = torch.optim.AdamW(list(net.parameters()) + list(objective.parameters()), lr=1e-4)

    def supervised(batch):
        loss = net(batch).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    gen = torch.Generator().manual_seed(0)

    def dim_step(batch):
        out = objective(encoder, batch, gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    for label, step in (("supervised step", supervised), ("DIM pretraining step", dim_step)):
        step(batches[0])  # warm-up
        times = []
        for b in batches:
            t0 = time.perf_counter()
            step(b)
            times.append(time.perf_counter() - t0)
        total = sum(times)
        print(
            f"{label:22s} {n_crystals / total:8.1f} crystals/s  {n_sites / total:8.0f} sites/s  "
            f"{np.mean(times):.3f} s per ~{args.batch_sites}-site batch"
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory (ru_maxrss): {peak:.0f} MiB")


if __name__ == "__main__":
    main()
