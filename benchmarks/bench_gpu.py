"""GPU throughput of the DIM and supervised steps in float32 and mixed precision, peak GPU
memory, and one epoch of real DIM pretraining through the estimator.

    python benchmarks/bench_gpu.py                      # CUDA when present
    python benchmarks/bench_gpu.py --device cpu --structures 60 --steps 2   # the CPU smoke run

For each precision (``fp32`` and the device's ``auto`` choice: bf16 where supported, else fp16
with a gradient scaler; on CPU only fp32) it times ``--steps`` training steps on batches of
about ``--batch-sites`` unique sites (after two warm-up steps) and prints crystals/s and the
peak memory the step allocated (``torch.cuda.max_memory_allocated``; on CPU ru_maxrss). Then it
runs ``SiteNetDIMRegressor(pretrain__epochs=1, precision="auto").pretrain(...)`` on the
structures and prints its wall time. Real structures: the perovskite subset of ../shared/data
when present, else the shipped matbench_jdft2d (repeated to ``--structures``).
The last line reads ``GPU DIM step: <N> crystals/s (<precision>), peak <M> MiB``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.features.featurize import batch_indices, collate, featurize
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder, SiteNetRegressorNet
from matbench_dim.training.precision import mixed_precision, to_device

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import load_structures


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_steps(
    kind: str, precision: str, batches: list, device: torch.device, steps: int
) -> tuple[float, float]:
    """(crystals/s, peak MiB) of ``steps`` training steps of ``kind`` ("dim" / "supervised")."""
    torch.manual_seed(0)
    cfg = EncoderConfig(activation="silu")
    encoder = SiteNetEncoder(cfg).to(device)
    net = SiteNetRegressorNet(encoder).to(device)
    objective = DIMObjective(DIMConfig(), cfg).to(device)
    opt = torch.optim.AdamW([*net.parameters(), *objective.parameters()], lr=1e-4)
    amp = mixed_precision(device, precision)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def step(batch: object) -> None:
        b = to_device(batch, device)
        with amp.autocast():
            loss = (
                objective(encoder, b, gen)["loss"]
                if kind == "dim"
                else net(b).float().pow(2).mean()
            )
        opt.zero_grad(set_to_none=True)
        amp.backward(loss)
        amp.unscale([opt])
        amp.step([opt])

    for b in batches[:2]:
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    n = 0
    t0 = time.perf_counter()
    for k in range(steps):
        b = batches[k % len(batches)]
        step(b)
        n += len(b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n / (time.perf_counter() - t0), peak_mib(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--structures", type=int, default=2000)
    ap.add_argument("--batch-sites", type=int, default=1200)
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    device = torch.device(args.device)
    name, structures = load_structures(args.structures)
    structures = (structures * (args.structures // len(structures) + 1))[: args.structures]
    records = featurize(structures, progress=False)
    groups = [
        g
        for g in batch_indices([r.n_prim for r in records], args.batch_sites, shuffle=True, seed=0)
        if len(g) > 1
    ]
    batches = [collate(records, g) for g in groups[: max(args.steps, 2)]]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {device} ({gpu}); data {name}, {len(records)} structures, {len(batches)} batches"
    )
    precisions = ["fp32"] + ([mixed_precision(device).name] if device.type == "cuda" else [])
    last = (0.0, 0.0, "fp32")
    for kind in ("supervised", "dim"):
        for p in precisions:
            rate, peak = time_steps(kind, p, batches, device, args.steps)
            print(f"{kind:10s} {p:5s} {rate:9.1f} crystals/s  peak {peak:8.0f} MiB")
            if kind == "dim":
                last = (rate, peak, p) if rate > last[0] else last
    t0 = time.perf_counter()
    SiteNetDIMRegressor(device=str(device), pretrain__epochs=1, pretrain__patience=0,
                        encoder__activation="silu").pretrain(structures)  # fmt: skip
    print(f"one DIM pretraining epoch on {len(structures)} structures (featurization included): "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
    print(f"GPU DIM step: {last[0]:.0f} crystals/s ({last[2]}), peak {last[1]:.0f} MiB")


if __name__ == "__main__":
    main()
