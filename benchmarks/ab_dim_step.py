"""A/B of one exact change to the DIM step: old and new settings interleaved in one process.

Each switch replaces one part of the step by its previous form; both forms give the same
numbers (the equivalence tests), so only the time differs. Old and new alternate step by step
on the same batches, so machine load and speed drift hit both alike; the script prints their
median times and the median and quartiles of the paired ratios (old / new, per batch and pass).

    python benchmarks/ab_dim_step.py pair-embedding-backward  # inductor's backward vs kernels.PairEmbedding
    python benchmarks/ab_dim_step.py shared-negative-pass     # 3 no-grad passes vs 2 on even batches
    python benchmarks/ab_dim_step.py row-block-bytes --old-bytes 1048576  # vs fused.ROW_BLOCK_BYTES
    python benchmarks/ab_dim_step.py mish-clamp               # kernel only: e^min(x, 20) vs min(e^x, e^20)
    python benchmarks/ab_dim_step.py mish-grad                # kernel only: mish' with 2 vs 1 division

``mish-clamp`` times the two compiled forms of mish on one ``1200 x 40 x 128`` tensor, and
``mish-grad`` the local critic's compiled backward (:func:`kernels.critic_scores_grad`) on a
``400 x 40 x 64`` block of rows with either form of mish's derivative (a compiled graph cannot
be switched inside a running process, but two graphs can run side by side). Data and sizes as in
``bench_encoder.py``. Last line: ``<switch>: old/new <r>x (paired median, quartiles <a>-<b>)``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from matbench_dim.model import fused, kernels
from matbench_dim.model.dim import DIMConfig, DIMObjective
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder
from matbench_dim.runtime import configure_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import bench_batches, load_structures

SWITCHES = (
    "pair-embedding-backward",
    "shared-negative-pass",
    "row-block-bytes",
    "mish-clamp",
    "mish-grad",
)


def _quartiles(ratios: list[float]) -> tuple[float, float, float]:
    r = sorted(ratios)
    return r[len(r) // 2], r[len(r) // 4], r[(3 * len(r)) // 4]


def _report(switch: str, old: list[float], new: list[float], unit: str) -> None:
    mid, lo, hi = _quartiles([a / b for a, b in zip(old, new, strict=True)])
    print(
        f"old {statistics.median(old) * 1e3:.2f} {unit}, new {statistics.median(new) * 1e3:.2f} "
        f"{unit} (medians of {len(old)})"
    )
    print(f"{switch}: old/new {mid:.3f}x (paired median, quartiles {lo:.3f}-{hi:.3f})")


def _old_mish(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(torch.clamp(x, max=20.0))
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


def mish_clamp(repeats: int) -> None:
    """The two compiled forms of mish, interleaved, on one per-pair-sized tensor."""
    x = torch.randn(1200 * 40 * 128, generator=torch.Generator().manual_seed(0))
    old_fn, new_fn = torch.compile(_old_mish), torch.compile(fused.mish_reference)
    with torch.no_grad():
        if not torch.equal(old_fn(x), new_fn(x)):
            raise SystemExit("the two forms of mish differ: the A/B would compare two functions")
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(repeats * 10):
            for name, fn in (("old", old_fn), ("new", new_fn)):
                t0 = time.perf_counter()
                fn(x)
                times[name].append(time.perf_counter() - t0)
    _report("mish-clamp", times["old"], times["new"], "ms per call")


def _two_division_mish_grad(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    e = torch.exp(x).clamp(max=fused._EXP_CLAMP)
    n = e * (e + 2.0)
    inv = 1.0 / (n + 2.0)
    t = n * inv
    return x * t, t + x * (2.0 * (1.0 + t) * inv) * (e / (1.0 + e))


def mish_grad(repeats: int) -> None:
    """The critic's compiled backward with the old and the new form of mish's derivative."""
    fused.ACTIVATION_GRADS["mish_two_divisions"] = _two_division_mish_grad
    gen = torch.Generator().manual_seed(0)
    rows, cols, width = 400, 40, 64
    args = (
        torch.randn(1200, width, generator=gen),
        torch.randint(0, 1200, (rows, cols), generator=gen),
        torch.rand(rows, cols, generator=gen) * 8,
        torch.randn(width, generator=gen),
        torch.randn(rows, width, generator=gen),
        torch.randn(rows, cols, generator=gen),
    )
    kernel = torch.compile(kernels.critic_scores_grad)
    times: dict[str, list[float]] = {"mish_two_divisions": [], "mish": []}
    with torch.no_grad():
        outs = [kernel(*args, name) for name in times]
        for a, b in zip(*outs, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        for _ in range(repeats * 10):
            for name in times:
                t0 = time.perf_counter()
                kernel(*args, name)
                times[name].append(time.perf_counter() - t0)
    _report("mish-grad", times["mish_two_divisions"], times["mish"], "ms per call")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("switch", choices=SWITCHES)
    ap.add_argument("--old-bytes", type=int, default=1 << 20, help="row-block-bytes: old size")
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=6, help="interleaved passes over the batches")
    ap.add_argument("--batch-sites", type=int, default=1200)
    ap.add_argument("--structures", type=int, default=1500)
    args = ap.parse_args()
    torch.set_num_threads(1)
    configure_allocator()
    if args.switch in ("mish-clamp", "mish-grad"):
        (mish_clamp if args.switch == "mish-clamp" else mish_grad)(args.repeats)
        return

    old = {"on": False}
    if args.switch == "pair-embedding-backward":
        new_apply = kernels.PairEmbedding.apply

        def apply(*a: object) -> torch.Tensor:
            if old["on"]:  # the compiled forward with inductor's own backward
                return fused.call_compiled("pair_embedding", kernels.pair_embedding, a, {0: (0, 1)})
            return new_apply(*a)

        kernels.PairEmbedding.apply = staticmethod(apply)  # type: ignore[method-assign]
    elif args.switch == "shared-negative-pass":
        real_equal = torch.equal  # negatives.engineered_false_locals compares the two rolls with it
        torch.equal = lambda a, b: False if old["on"] else real_equal(a, b)  # type: ignore[assignment]
    else:
        real_blocks: Callable[..., list[int]] = fused.row_blocks

        def row_blocks(n: int, row_bytes: int, block_bytes: int | None = None) -> list[int]:
            return real_blocks(n, row_bytes, args.old_bytes if old["on"] else block_bytes)

        fused.row_blocks = row_blocks  # type: ignore[assignment]

    name, structures = load_structures(args.structures)
    _, groups, batches = bench_batches(structures, args.batch_sites, args.batches)
    print(
        f"data: {name}, {len(batches)} batches of {', '.join(str(len(g)) for g in groups)} "
        f"crystals; switch {args.switch}"
    )
    cfg = EncoderConfig()
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg)
    objective = DIMObjective(DIMConfig(), cfg)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(objective.parameters()), lr=1e-4)
    gen = torch.Generator().manual_seed(0)

    def step(batch: object) -> None:
        out = objective(encoder, batch, gen)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()

    for setting in (True, False):  # warm-up: compiles both forms
        old["on"] = setting
        for b in batches:
            step(b)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.repeats):
        for b in batches:
            for setting in (True, False):
                old["on"] = setting
                t0 = time.perf_counter()
                step(b)
                times[setting].append(time.perf_counter() - t0)
    _report(args.switch, times[True], times[False], "ms per step")


if __name__ == "__main__":
    main()
