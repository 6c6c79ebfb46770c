"""Throughput of a supervised step and of a DIM pretraining step on CPU, against their floor.

For each step (forward, backward, AdamW): crystals/s, MFLOP per crystal (matrix products,
counted by ``torch.utils.flop_counter.FlopCounterMode`` on the eager form of the same
computation), the achieved GFLOP/s, the rate of a plain ``60000x64 @ 64x64`` product measured
in the same process between the steps, and the ratio of the step's time to its FLOP floor
(its FLOPs at that matmul rate), and the step's activation floor (the fewest activation
evaluations of its eager form at the measured per-element rate of the compiled activation and
of ATen's exp, as a multiple of the FLOP floor). The frozen pre-optimisation implementation
(``reference_dim_step.py``) runs side by side on the same batches, interleaved with the new
one, so that machine load hits both alike; the speed-up is the ratio of their times. The
reference runs with glibc's default malloc settings, as before this work; the new code runs
with ``runtime.configure_allocator`` (as the estimator and the CLI do) and also without it.

Real structures: the perovskite subset in ../shared/data when present (5 unique and 40
supercell sites each), else the shipped matbench_jdft2d; N = 50 supercells, batches of about
1,200 unique sites, the seed's widths.

    python benchmarks/bench_encoder.py [--threads 1] [--activation mish] [--batches 4] [--parts]

``--parts`` also times the parts of the new DIM step (encoder forward, local critic, engineered
negatives, global critic, backward, optimiser step), to show where the time goes on the
machine at hand. The last line reads ``DIM step: <N> crystals/s, <R>x its FLOP floor``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from matbench_dim.features.featurize import batch_indices, collate, featurize
from matbench_dim.model import dim as dim_module
from matbench_dim.model import fused
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.sitenet import (
    EncoderConfig,
    SiteNetEncoder,
    SiteNetRegressorNet,
    count_parameters,
)
from matbench_dim.runtime import configure_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_dim_step import reference_internals

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


def bench_batches(structures: list, batch_sites: int, n_batches: int) -> tuple[list, list, list]:
    """``(records, groups, batches)``: the first ``n_batches`` shuffled batches of about
    ``batch_sites`` unique sites (seed 0) with more than one crystal each."""
    records = featurize(structures, progress=False)
    groups = batch_indices([r.n_prim for r in records], batch_sites, shuffle=True, seed=0)
    groups = [g for g in groups if len(g) > 1][:n_batches]
    return records, groups, [collate(records, g) for g in groups]


def matmul_rate(repeats: int = 10) -> float:
    """GFLOP/s of ``(60000, 64) @ (64, 64)`` products (best of ``repeats``)."""
    a, b = torch.randn(60000, 64), torch.randn(64, 64)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * 60000 * 64 * 64 / best / 1e9


def _glibc_malloc(tuned: bool) -> None:
    """Switch glibc's malloc between the tuned settings and its defaults (benchmark only)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    if tuned:
        libc.mallopt(m_mmap_max, 0)
        libc.mallopt(m_trim_threshold, 1 << 30)
    else:
        libc.mallopt(m_mmap_max, 65536)
        libc.mallopt(m_mmap_threshold, 128 * 1024)
        libc.mallopt(m_trim_threshold, 128 * 1024)
        libc.mallopt(m_top_pad, 0)
        libc.malloc_trim(0)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Compiled kernels off (``MATBENCH_DIM_COMPILE=0``) inside, the old setting restored."""
    old = os.environ.get(fused.COMPILE_ENV)
    os.environ[fused.COMPILE_ENV] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[fused.COMPILE_ENV]
        else:
            os.environ[fused.COMPILE_ENV] = old


def count_flops(step: Callable[[object], None], batch: object) -> int:
    """Matrix-product FLOPs of ``step(batch)``, on the eager form (compiled kernels off)."""
    with _eager(), FlopCounterMode(display=False) as fc:
        step(batch)
    return fc.get_total_flops()


_ACTIVATION_OPS = ("mish", "silu", "exp", "sigmoid")


class _ActivationCounter(TorchDispatchMode):
    """Counts the elements of every mish / silu / exp / sigmoid evaluation (aten level)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in _ACTIVATION_OPS:
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def count_activations(forward: Callable[[object], object], batch: object) -> int:
    """Activation evaluations (elements) in ``forward(batch)``, on its eager form.

    Counts the elements that go through mish, silu, exp or sigmoid in the forward pass only,
    with compiled kernels off: the eager form evaluates each activation once (the critic's
    whole-row negative reuses its source rows there), so this is the fewest evaluations the
    function needs. Backward work (derivatives) is not counted.
    """
    with _eager(), torch.no_grad(), _ActivationCounter() as counter:
        forward(batch)
    return counter.elements


def marginal_ns(fn: Callable[[torch.Tensor], object], repeats: int = 9) -> float:
    """Marginal ns per element of ``fn`` on cache-resident float32 blocks.

    The difference of the best times for ``2^18`` and ``2^14`` elements (1 MiB and 64 KiB)
    over the difference in size: the cost of one more element with the per-call overhead
    taken out.
    """
    small, large = torch.randn(1 << 14) * 3, torch.randn(1 << 18) * 3

    def best(x: torch.Tensor, reps: int) -> float:
        for _ in range(3):
            fn(x)
        t = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                fn(x)
            t = min(t, (time.perf_counter() - t0) / reps)
        return t

    t_small, t_large = best(small, 200), best(large, 20)
    return max(t_large - t_small, 0.0) / (large.numel() - small.numel()) * 1e9


def activation_rates(activation: str) -> tuple[float, float]:
    """``(ns per element of the compiled activation, ns per element of ATen's exp)``.

    The first is the fastest form of the activation in this code (inductor's single-exp
    loop, eager where compiling is off); the second is its irreducible part (every mish or
    silu evaluation takes one exponential), written to a preallocated output.
    """
    fn = fused.ACTIVATION_FNS[activation]
    if fused.compile_mode() != "off":
        fn = torch.compile(fn, dynamic=False)
    out = torch.empty(1 << 18)
    return (
        statistics.median(marginal_ns(fn) for _ in range(3)),
        statistics.median(
            marginal_ns(lambda x: torch.exp(x, out=out[: x.numel()])) for _ in range(3)
        ),
    )


def print_parts(
    encoder: SiteNetEncoder,
    objective: DIMObjective,
    opt: torch.optim.Optimizer,
    gen: torch.Generator,
    batches: list,
    repeats: int,
) -> None:
    """Median wall time of each part of the new DIM step, in ms per batch."""
    times: dict[str, list[float]] = {}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: object, **k: object) -> object:
            t0 = time.perf_counter()
            out = fn(*a, **k)
            times.setdefault(name, []).append(time.perf_counter() - t0)
            return out

        return wrapper

    parts = [
        (encoder, "forward", "encoder forward"),
        (objective.local_loss, "forward", "local critic forward"),
        (dim_module, "engineered_false_locals", "engineered negatives (2-3 no-grad passes)"),
        (objective.global_loss, "forward", "global critic forward"),
    ]
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr, _ in parts]
    try:
        for obj, attr, name in parts:
            setattr(obj, attr, timed(name, getattr(obj, attr)))
        for _ in range(repeats):
            for b in batches:
                t0 = time.perf_counter()
                out = objective(encoder, b, gen)
                t1 = time.perf_counter()
                opt.zero_grad()
                out["loss"].backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                for name, t in (("DIM objective forward (all of the above and the rest)", t1 - t0),
                                ("backward", t2 - t1), ("AdamW step", t3 - t2), ("whole step", t3 - t0)):  # fmt: skip
                    times.setdefault(name, []).append(t)
    finally:
        for obj, attr, fn in saved:
            if attr == "forward":
                del obj.forward  # back to the class's method
            else:
                setattr(obj, attr, fn)
    n_steps = repeats * len(batches)
    print(f"\nparts of the DIM step (new code; ms per step, median of {n_steps} steps):")
    for name, ts in times.items():
        print(f"  {name:55s} {1000 * statistics.median(ts):8.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--activation", default="mish", choices=["mish", "silu"])
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved passes over the batches")
    ap.add_argument("--batch-sites", type=int, default=1200)
    ap.add_argument("--structures", type=int, default=1500)
    ap.add_argument("--parts", action="store_true", help="time the parts of the DIM step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configure_allocator()
    name, structures = load_structures(args.structures)
    records, groups, batches = bench_batches(structures, args.batch_sites, args.batches)
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
        f"activation={args.activation}; load average "
        f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}"
    )
    print(
        f"parameters: encoder {count_parameters(encoder)}, DIM critics/probes "
        f"{count_parameters(objective)}"
    )
    opt = torch.optim.AdamW(list(net.parameters()) + list(objective.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def supervised(batch: object) -> None:
        loss = net(batch).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def dim_step(batch: object) -> None:
        out = objective(encoder, batch, gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    variants = ("reference", "new, default malloc", "new")
    summary: dict[str, tuple[float, float]] = {}
    forwards = {"supervised step": net, "DIM step": lambda b: objective(encoder, b, gen)}
    for label, step in (("supervised step", supervised), ("DIM step", dim_step)):
        flops = {"new": sum(count_flops(step, b) for b in batches)}
        n_act = sum(count_activations(forwards[label], b) for b in batches)
        with reference_internals():
            flops["reference"] = sum(count_flops(step, b) for b in batches)
        # warm-up: compiles the new kernels (timed), fills the caches
        c0 = fused.compile_seconds()
        t0 = time.perf_counter()
        step(batches[0])
        step(batches[-1])
        warm = time.perf_counter() - t0
        compile_s = fused.compile_seconds() - c0
        with reference_internals():
            step(batches[0])
        times: dict[str, list[float]] = {v: [] for v in variants}
        rates = []
        for _ in range(args.repeats):
            rates.append(matmul_rate())
            elapsed = dict.fromkeys(variants, 0.0)
            for b in batches:
                for v in variants:
                    _glibc_malloc(tuned=v == "new")
                    if v == "reference":
                        with reference_internals():
                            t0 = time.perf_counter()
                            step(b)
                    else:
                        t0 = time.perf_counter()
                        step(b)
                    elapsed[v] += time.perf_counter() - t0
            for v in variants:
                times[v].append(elapsed[v])
        _glibc_malloc(tuned=True)
        rate = statistics.median(rates)
        print(
            f"\n{label}: warm-up {warm:.1f} s (of which compiling {compile_s:.1f} s); "
            f"matmul rate {rate:.1f} GFLOP/s (median of {args.repeats})"
        )
        for v in variants:
            t = statistics.median(times[v])
            f = flops["reference" if v == "reference" else "new"]
            floor = f / (rate * 1e9)
            print(
                f"  {v:20s} {n_crystals / t:8.1f} crystals/s  {f / n_crystals / 1e6:6.2f} "
                f"MFLOP/crystal  {f / t / 1e9:5.1f} GFLOP/s  {t / floor:5.1f}x its FLOP floor  "
                f"{t / len(batches):.3f} s/batch  (best pass {n_crystals / min(times[v]):.1f}/s)"
            )
        t_ref, t_new = statistics.median(times["reference"]), statistics.median(times["new"])
        floor_new = flops["new"] / (rate * 1e9)
        act_ns, exp_ns = activation_rates(args.activation)
        act_s, exp_s = n_act * act_ns * 1e-9, n_act * exp_ns * 1e-9
        print(
            f"  activation floor: {n_act / n_crystals / 1e3:.1f} k {args.activation} evaluations"
            f"/crystal (forward, each once) at {act_ns:.2f} ns (compiled, in cache) = "
            f"{act_s / floor_new:.2f}x the FLOP floor ({exp_s / floor_new:.2f}x at ATen's exp "
            f"alone, {exp_ns:.2f} ns); the new step is {t_new / (floor_new + act_s):.1f}x "
            "(FLOP floor + activation floor)"
        )
        print(
            f"  speed-up over the reference: {t_ref / t_new:.2f}x "
            f"(the reference's FLOP floor is {flops['reference'] / flops['new']:.2f}x the new one)"
        )
        summary[label] = (n_crystals / t_new, t_new / (flops["new"] / (rate * 1e9)))
    if args.parts:
        print_parts(encoder, objective, opt, gen, batches, args.repeats)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak memory (ru_maxrss): {peak:.0f} MiB")
    print(
        f"supervised step: {summary['supervised step'][0]:.0f} crystals/s, "
        f"{summary['supervised step'][1]:.1f}x its FLOP floor"
    )
    print(
        f"DIM step: {summary['DIM step'][0]:.0f} crystals/s, {summary['DIM step'][1]:.1f}x its FLOP floor"
    )


if __name__ == "__main__":
    main()
