"""How fast a hand-written kernel could run the attention core (no grad): a measurement.

Issue 13 asks for a DIM step within 2x of its FLOP floor. The step's time is elementwise work
in compiled regions and between them (``benchmarks/README.md``); the question this script
answers is how much of that a hand-written, fused, vectorised kernel would win, measured on
the region where it is simplest to write: :func:`matbench_dim.model.kernels.attention_core`
without grad (the engineered-negative passes), on the arguments of a real batch.

The kernel (C++ with AVX-512 intrinsics, built with ``torch.utils.cpp_extension``; needs a
C++ compiler, ninja and an AVX-512 CPU) does in one pass over each row what the compiled
region does: gather + add, mish (a polynomial ``exp`` with ``scalef``), the two-half
LayerNorm, the logits, an online softmax over the row's columns and the attention-weighted
sum; every per-pair intermediate stays in registers. It is a prototype for the measurement,
not used by the package: heads = 1 only, no backward.

Goal: tell whether hand-written kernels could close the gap to 2x. Last figures:
``benchmarks/README.md`` (section "A hand-written attention kernel, measured").

    python benchmarks/proto_fused_attention.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from matbench_dim.model import fused, kernels
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder
from matbench_dim.runtime import configure_allocator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_encoder import activation_rates, bench_batches, load_structures, marginal_ns

SOURCE = r"""
// matbench-dim prototype v3
#include <torch/extension.h>
#include <immintrin.h>
#include <cmath>
#include <limits>
#include <vector>

static inline __m512 exp_ps(__m512 x) {
    // e^x = 2^k 2^f, k = round(x log2 e), |f| <= 1/2; 2^f by a degree-7 Taylor polynomial
    // (relative error ~1e-8 before rounding); 2^k applied with scalef (no bit tricks).
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.4426950408889634f));
    __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.6931471805599453f));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, k);
}

static inline __m512 mish_ps(__m512 x) {
    __m512 e = _mm512_min_ps(exp_ps(x), _mm512_set1_ps(485165195.40979028f));  // e^20
    __m512 n = _mm512_mul_ps(e, _mm512_add_ps(e, _mm512_set1_ps(2.0f)));
    // n / (n + 2) with a reciprocal estimate and one Newton step (a division costs ~10x more)
    __m512 d = _mm512_add_ps(n, _mm512_set1_ps(2.0f));
    __m512 y = _mm512_rcp14_ps(d);
    y = _mm512_mul_ps(y, _mm512_fnmadd_ps(d, y, _mm512_set1_ps(2.0f)));
    return _mm512_mul_ps(x, _mm512_mul_ps(n, y));
}

// One half (A = 16 * V floats) normalised in place; returns nothing.
template <int V>
static inline void layer_norm(__m512* h, float eps) {
    __m512 s = h[0];
    for (int v = 1; v < V; ++v) s = _mm512_add_ps(s, h[v]);
    float mean = _mm512_reduce_add_ps(s) / (16.0f * V);
    __m512 m = _mm512_set1_ps(mean);
    __m512 q = _mm512_setzero_ps();
    for (int v = 0; v < V; ++v) {
        h[v] = _mm512_sub_ps(h[v], m);
        q = _mm512_fmadd_ps(h[v], h[v], q);
    }
    float var = _mm512_reduce_add_ps(q) / (16.0f * V);
    __m512 r = _mm512_set1_ps(1.0f / std::sqrt(var + eps));
    for (int v = 0; v < V; ++v) h[v] = _mm512_mul_ps(h[v], r);
}

template <int V>
static void core_rows(const float* nb, const float* sp, const float* pp, const int64_t* idx,
                      const bool* mask, const float* w, float b, float eps, int64_t r0,
                      int64_t r1, int64_t S, float* weights, float* pooled) {
    // Two passes per row, both in L1: (1) every column's hidden vector, its LayerNorms, its
    // logit, the value half kept in a row buffer; (2) the softmax over the row's columns,
    // vectorised, and the weighted sum of the buffered value halves.
    constexpr int A = 16 * V;
    const int64_t S16 = (S + 15) / 16 * 16;
    std::vector<float> logits(S16), values(S * A);
    for (int64_t r = r0; r < r1; ++r) {
        __m512 site[2 * V], wl[V];
        for (int v = 0; v < 2 * V; ++v) site[v] = _mm512_loadu_ps(sp + r * 2 * A + 16 * v);
        for (int v = 0; v < V; ++v) wl[v] = _mm512_loadu_ps(w + 16 * v);
        for (int64_t s = 0; s < S16; ++s) logits[s] = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < S; ++s) {
            if (!mask[r * S + s]) continue;
            const float* hn = nb + idx[r * S + s] * 2 * A;
            const float* hp = pp + (r * S + s) * 2 * A;
            __m512 h[2 * V];
            for (int v = 0; v < 2 * V; ++v) {
                __m512 x = _mm512_add_ps(_mm512_add_ps(_mm512_loadu_ps(hn + 16 * v),
                                                       _mm512_loadu_ps(hp + 16 * v)), site[v]);
                h[v] = mish_ps(x);
            }
            layer_norm<V>(h, eps);
            layer_norm<V>(h + V, eps);
            __m512 d = _mm512_mul_ps(h[0], wl[0]);
            for (int v = 1; v < V; ++v) d = _mm512_fmadd_ps(h[v], wl[v], d);
            logits[s] = _mm512_reduce_add_ps(d) + b;
            for (int v = 0; v < V; ++v) _mm512_storeu_ps(&values[s * A + 16 * v], h[V + v]);
        }
        __m512 mx = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
        for (int64_t s = 0; s < S16; s += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(&logits[s]));
        __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t s = 0; s < S16; s += 16) {
            __m512 e = exp_ps(_mm512_sub_ps(_mm512_loadu_ps(&logits[s]), m));
            __mmask16 valid = _mm512_cmp_ps_mask(_mm512_loadu_ps(&logits[s]),
                _mm512_set1_ps(-std::numeric_limits<float>::infinity()), _CMP_NEQ_OQ);
            e = _mm512_maskz_mov_ps(valid, e);
            _mm512_storeu_ps(&logits[s], e);
            sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        __m512 acc[V];
        for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
        for (int64_t s = 0; s < S; ++s) {
            const float p = logits[s] * inv;
            weights[r * S + s] = p;
            if (p == 0.0f) continue;
            __m512 pv = _mm512_set1_ps(p);
            for (int v = 0; v < V; ++v)
                acc[v] = _mm512_fmadd_ps(pv, _mm512_loadu_ps(&values[s * A + 16 * v]), acc[v]);
        }
        for (int v = 0; v < V; ++v) _mm512_storeu_ps(pooled + r * A + 16 * v, acc[v]);
    }
}

torch::Tensor mish_fused(torch::Tensor x, torch::Tensor out) {
    const float* px = x.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const int64_t n = x.numel() / 16 * 16;
    for (int64_t i = 0; i < n; i += 16) _mm512_storeu_ps(po + i, mish_ps(_mm512_loadu_ps(px + i)));
    return out;
}

std::vector<torch::Tensor> attention_core_fused(torch::Tensor nb, torch::Tensor sp,
        torch::Tensor pp, torch::Tensor idx, torch::Tensor mask, torch::Tensor w,
        torch::Tensor b, double eps) {
    const int64_t R = pp.size(0), S = pp.size(1), A = pp.size(2) / 2;
    TORCH_CHECK(w.size(0) == 1, "prototype: one head only");
    auto weights = torch::empty({R, S, 1}, pp.options());
    auto pooled = torch::empty({R, 1, A}, pp.options());
    const float bias = b.item<float>();
    auto run = [&](auto kernel) {
        kernel(nb.data_ptr<float>(), sp.data_ptr<float>(), pp.data_ptr<float>(),
               idx.data_ptr<int64_t>(), mask.data_ptr<bool>(), w.data_ptr<float>(), bias,
               static_cast<float>(eps), 0, R, S, weights.data_ptr<float>(),
               pooled.data_ptr<float>());
    };
    if (A == 64) run(core_rows<4>);
    else if (A == 32) run(core_rows<2>);
    else TORCH_CHECK(false, "prototype: half width 32 or 64 only, got ", A);
    return {weights, pooled};
}
"""


def capture_core_args(batch: object) -> tuple:
    """The arguments of the first attention core called in a no-grad encoder pass."""
    cfg = EncoderConfig()
    torch.manual_seed(0)
    encoder = SiteNetEncoder(cfg).eval()
    seen: list[tuple] = []
    real = kernels.attention_core_blocks

    def spy(*args: object) -> object:
        if not seen:
            seen.append(args)
        return real(*args)

    kernels.attention_core_blocks = spy  # type: ignore[assignment]
    try:
        with torch.no_grad():
            encoder(batch)
    finally:
        kernels.attention_core_blocks = real  # type: ignore[assignment]
    if not seen:
        raise SystemExit("the encoder did not call the compiled attention core (compile off?)")
    return seen[0]


def best_ms(fn: object, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all forms")
    ap.add_argument("--structures", type=int, default=1500)
    ap.add_argument("--batch-sites", type=int, default=1200)
    args = ap.parse_args()
    if "avx512f" not in Path("/proc/cpuinfo").read_text():
        raise SystemExit("this prototype needs an AVX-512 CPU")
    torch.set_num_threads(1)
    configure_allocator()
    from torch.utils.cpp_extension import load_inline

    t0 = time.perf_counter()
    ext = load_inline(
        "matbench_dim_proto_attention_v3",
        SOURCE,
        functions=["attention_core_fused", "mish_fused"],
        extra_cflags=["-O3", "-march=native"],
    )
    build_s = time.perf_counter() - t0
    _, structures = load_structures(args.structures)
    _, groups, batches = bench_batches(structures, args.batch_sites, 1)
    core_args = capture_core_args(batches[0])
    nb, sp, pp, idx, mask, w, b, eps, act = core_args
    if act != "mish":
        raise SystemExit(f"prototype: mish only, not {act}")
    r, s, width = pp.shape
    print(
        f"one attention core of a {args.batch_sites}-site batch ({len(groups[0])} crystals): rows {r}, "
        f"columns {s}, width {width} ({r * s * width / 1e6:.1f} M elements, "
        f"{mask.float().mean():.2f} of the pairs valid); extension built in {build_s:.0f} s"
    )
    with torch.no_grad():
        ref_w, ref_p = kernels.attention_core(*core_args)  # eager, float32
        ref64 = kernels.attention_core(
            nb.double(), sp.double(), pp.double(), idx, mask, w.double(), b.double(), eps, act
        )
        new_w, new_p = ext.attention_core_fused(nb, sp, pp, idx, mask, w, b, eps)
        comp = kernels.attention_core_blocks(*core_args)
    errors = {}
    for name, (wt, pl) in (
        ("hand-written", (new_w, new_p)),
        ("compiled", comp if comp is not None else (ref_w, ref_p)),
        ("eager", (ref_w, ref_p)),
    ):
        errors[name] = max(
            (wt.double() - ref64[0]).abs().max().item(), (pl.double() - ref64[1]).abs().max().item()
        )
        print(f"  {name:13s} largest difference from float64 eager: {errors[name]:.1e}")
    if errors["hand-written"] > 10 * max(errors["eager"], 1e-6):
        raise SystemExit("the hand-written kernel computes another function: not timed")

    forms = {
        "eager": lambda: kernels.attention_core(*core_args),
        "compiled (the package's)": lambda: kernels.attention_core_blocks(*core_args),
        "hand-written": lambda: ext.attention_core_fused(nb, sp, pp, idx, mask, w, b, eps),
    }
    times: dict[str, list[float]] = {k: [] for k in forms}
    with torch.no_grad():
        for fn in forms.values():
            fn()
        for _ in range(args.rounds):
            for k, fn in forms.items():
                times[k].append(best_ms(fn, args.repeats))
    n = r * s * width
    for k, ts in times.items():
        ms = statistics.median(ts)
        print(f"  {k:26s} {ms:7.2f} ms  {ms * 1e6 / n:5.2f} ns per (row, column, channel)")
    speedup = statistics.median(times["compiled (the package's)"]) / statistics.median(
        times["hand-written"]
    )
    out = torch.empty(1 << 18)
    hand = statistics.median(
        marginal_ns(lambda x: ext.mish_fused(x, out[: x.numel()])) for _ in range(3)
    )
    compiled, exp_alone = activation_rates("mish")
    print(
        f"mish alone, ns per element in cache: hand-written {hand:.2f}, compiled {compiled:.2f}, "
        f"ATen's exp alone {exp_alone:.2f}"
    )
    if fused.compile_mode() == "off":
        print("(MATBENCH_DIM_COMPILE=0: the 'compiled' row ran eager)")
    print(f"hand-written attention core (no grad): {speedup:.1f}x the compiled one")


if __name__ == "__main__":
    main()
