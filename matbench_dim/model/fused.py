"""Compiled CPU kernels for the elementwise work that dominates a DIM step.

After the algebra of :mod:`matbench_dim.model.sitenet` and :mod:`matbench_dim.model.dim`,
what is left of a step on CPU is mostly elementwise passes over ``(rows, supercell sites,
width)`` tensors: gathers, adds, the activation, LayerNorm, softmax. ATen's ``mish`` alone
evaluates ``x * tanh(log1p(exp(x)))`` (three transcendental functions) and its backward
four more; it was about 60 % of a step (``benchmarks/``). Two remedies, both here:

- mish in closed form with a single ``exp``: with ``n = e^x (e^x + 2)``,
  ``tanh(softplus(x)) = n / (n + 2)`` (:func:`mish_reference`, :func:`mish_grad_reference`);
- :func:`torch.compile` (inductor, C++) fuses a chain of such ops into one loop over memory
  (:func:`call_compiled`): mish on its own (:func:`mish`), and the larger regions of
  :mod:`matbench_dim.model.kernels` that ``sitenet`` and ``dim`` hand over, run over blocks of
  rows that fit in cache (:func:`row_blocks`).

Compiled kernels are used for large float32 CPU tensors only (at least
:data:`FUSED_MIN_NUMEL` elements of per-pair work, :data:`MISH_MIN_NUMEL` for mish on its own:
the per-pair and per-site tensors of the seed's 1,200-site batches), where they pay back their
one-off compile time (see ``benchmarks/README.md``: tens of seconds on a cold inductor cache,
a few on a warm one; the cache lives on disk, so later processes are warm). Small tensors,
other dtypes and other devices use eager ATen code. ``MATBENCH_DIM_COMPILE=0`` turns compiled
kernels off, ``=1`` uses them for every float32 CPU tensor (the equivalence tests do). A
failed compilation (no C++ compiler, for instance) is logged once and falls back to eager.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

logger = logging.getLogger(__name__)

COMPILE_ENV = "MATBENCH_DIM_COMPILE"
FUSED_MIN_NUMEL = 1 << 20
"""Smallest tensor (elements) sent to compiled kernels in the default ``auto`` mode."""
MISH_MIN_NUMEL = 1 << 16
"""Smallest tensor sent to the compiled mish in ``auto`` mode: ATen's mish (three
transcendental functions, four more in backward) costs ~3.5 ns per element here, the compiled
single-exp form under 1 ns, so per-site tensors of a 1,200-site batch (``1200 x 64``) pay."""

ROW_BLOCK_BYTES = 4 << 20
"""Target size of one block of a per-pair intermediate in the row-blocked compiled kernels
(about the size of a core's share of the last-level cache here)."""
MIN_BLOCK_ROWS = 8

# mish(x) = x for x > 20 to float32 precision; clamping keeps exp(x)^2 finite
_CLAMP = 20.0
_EXP_CLAMP = math.exp(_CLAMP)
"""``e^20``: the exponential is clamped *after* it is taken, ``min(e^x, e^20)``, which equals
``e^min(x, 20)`` (exp is monotonic) and gives the same mish to the bit; compiled, the clamp
before ``exp`` made inductor's loop ~2x slower on an AVX-512 Xeon (benchmarks/README.md)."""


def _clamped_exp(x: Tensor) -> Tensor:
    return torch.exp(x).clamp(max=_EXP_CLAMP)


def mish_reference(x: Tensor) -> Tensor:
    """Mish in closed form with one exponential: ``x * n / (n + 2)``, ``n = e^x (e^x + 2)``."""
    e = _clamped_exp(x)
    n = e * (e + 2.0)
    return x * (n / (n + 2.0))


def mish_grad_reference(x: Tensor, grad: Tensor) -> Tensor:
    """``grad * d mish / dx`` with ``t = tanh(softplus(x)) = n / (n + 2)``.

    ``d mish / dx = t + x (1 - t^2) sigmoid(x)``. With ``n + 1 = (1 + e)^2``,
    ``1 - t^2 = 4 (1 + e)^2 / (n + 2)^2`` and ``sigmoid(x) = e / (1 + e)``, so the second term
    is ``4 x e (1 + e) / (n + 2)^2``: one division per element (``1 / (n + 2)``, shared with
    ``t``) instead of two, ~15 % faster compiled, no cancellation for large ``x``, and for
    ``x`` up to the clamp (``e = e^20``) every factor stays within float32 range.
    """
    return grad * mish_and_grad(x)[1]


def mish_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mish(x), d mish / dx)`` in closed form (see :func:`mish_grad_reference`)."""
    e = _clamped_exp(x)
    n = e * (e + 2.0)
    inv = 1.0 / (n + 2.0)
    t = n * inv
    return x * t, t + 4.0 * x * e * (1.0 + e) * (inv * inv)


def silu_and_grad(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(silu(x), d silu / dx)``."""
    s = torch.sigmoid(x)
    return x * s, s * (1.0 + x * (1.0 - s))


ACTIVATION_FNS: dict[str, Callable[[Tensor], Tensor]] = {"mish": mish_reference, "silu": F.silu}
"""Traceable activations for compiled regions, by :data:`sitenet.ACTIVATIONS` name."""
ACTIVATION_GRADS: dict[str, Callable[[Tensor], tuple[Tensor, Tensor]]] = {
    "mish": mish_and_grad,
    "silu": silu_and_grad,
}
"""Traceable ``(act(x), act'(x))`` pairs, for hand-written backward passes."""

DISABLED: set[str] = set()
"""Names of compiled regions to skip (their callers run eager code): for benchmarks."""

_COMPILED: dict[str, Callable[..., Any]] = {}
_STATE: dict[str, Any] = {"failed": set(), "compile_s": 0.0, "first_calls": set()}


def compile_mode() -> str:
    """``"off"``, ``"auto"`` (default) or ``"always"``, from ``MATBENCH_DIM_COMPILE``."""
    value = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "always"):
        return "always"
    return "auto"


def use_fused(x: Tensor, numel: int | None = None, min_numel: int | None = None) -> bool:
    """Whether work on ``x`` goes to compiled kernels (see the module docstring).

    ``numel``: the size of the work when it is not ``x.numel()`` (for instance the
    ``(R, S, width)`` tensor that a gather by an ``(R, S)`` index would build); ``min_numel``:
    the threshold of ``auto`` mode (default :data:`FUSED_MIN_NUMEL`).
    """
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    mode = compile_mode()
    if mode == "off":
        return False
    threshold = FUSED_MIN_NUMEL if min_numel is None else min_numel
    return mode == "always" or (x.numel() if numel is None else numel) >= threshold


def call_compiled(
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    dynamic: dict[int, tuple[int, ...]],
) -> Any:
    """``torch.compile(fn)(*args)``, compiled once per ``name``; None when unavailable.

    ``dynamic`` maps argument positions to the dimensions that vary between batches (rows,
    supercell sites); every other size (the layer widths) is compiled in, so batches of any
    size share one graph per grad mode. A failure disables that region for the process
    (logged once); the caller then runs its eager code.
    """
    if name in _STATE["failed"] or name in DISABLED:
        return None
    compiled = _COMPILED.get(name)
    if compiled is None:
        compiled = _COMPILED[name] = torch.compile(fn)
    key = (name, torch.is_grad_enabled())
    first = key not in _STATE["first_calls"]
    t0 = time.perf_counter()
    try:
        for pos, dims in dynamic.items():
            for d in dims:
                torch._dynamo.maybe_mark_dynamic(args[pos], d)
        out = compiled(*args)
    except Exception as exc:  # no compiler, unsupported platform: eager from now on
        _STATE["failed"].add(name)
        logger.warning("compiled kernels unavailable (%s: %s); using eager ones", name, exc)
        return None
    if first:  # the first call of each graph compiles it
        _STATE["first_calls"].add(key)
        _STATE["compile_s"] += time.perf_counter() - t0
    return out


def row_blocks(n_rows: int, row_bytes: int, block_bytes: int | None = None) -> list[int]:
    """Sizes of near-equal blocks of rows, each about ``block_bytes`` (default
    :data:`ROW_BLOCK_BYTES`) of a per-row intermediate of ``row_bytes`` bytes.

    Blocks have at least :data:`MIN_BLOCK_ROWS` rows (fewer only when ``n_rows`` is smaller),
    so a compiled graph with a dynamic row count never meets the 0/1 sizes that it would
    specialise on.
    """
    target = max(
        MIN_BLOCK_ROWS,
        (ROW_BLOCK_BYTES if block_bytes is None else block_bytes) // max(1, row_bytes),
    )
    n_blocks = max(1, -(-n_rows // target))
    base, extra = divmod(n_rows, n_blocks)
    return [base + 1] * extra + [base] * (n_blocks - extra)


def compile_seconds() -> float:
    """Wall time spent in the first call of each compiled graph in this process."""
    return float(_STATE["compile_s"])


class _FusedMish(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        flat = x.reshape(-1)
        out = call_compiled("mish", mish_reference, (flat,), {0: (0,)})
        if out is None:
            out = F.mish(flat)
        ctx.save_for_backward(x)
        return out.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        flat, g = x.reshape(-1), grad.reshape(-1)
        out = call_compiled("mish_grad", mish_grad_reference, (flat, g), {0: (0,), 1: (0,)})
        if out is None:
            out = torch.ops.aten.mish_backward(g, flat)
        return out.view(x.shape)


def mish(x: Tensor) -> Tensor:
    """Mish: the compiled single-exp kernels for large float32 CPU tensors, else ATen's."""
    if use_fused(x, min_numel=MISH_MIN_NUMEL):
        return _FusedMish.apply(x)
    return F.mish(x)
