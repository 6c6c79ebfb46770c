"""Process-level settings: torch threads, the allocator, seeding and device selection.

Torch defaults to one thread per core. On a loaded two-core machine that can be many times
slower than a single thread (``benchmarks/bench_threads.py``), so the thread count is chosen
deliberately, in this order (:func:`resolve_threads`):

1. the caller's explicit value (the estimator's callers, ``matbench-dim --threads``);
2. the ``MATBENCH_DIM_NUM_THREADS`` environment variable (the test suite sets 1);
3. torch's current setting, when someone chose it: ``OMP_NUM_THREADS`` is set, or the
   count differs from the one torch started with (``torch.set_num_threads`` was called);
4. the default rule: 1 thread on machines with at most :data:`SINGLE_THREAD_MAX_CPUS`
   usable CPUs, torch's own default (one per core) above that.

:func:`configure_allocator` keeps glibc's malloc from handing large blocks back to the
kernel after every step (each new multi-MB tensor then page-faults anew: 30-40 % of a DIM
step's wall time on this machine); ``MATBENCH_DIM_MALLOC_TUNING=0`` leaves malloc alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

THREADS_ENV = "MATBENCH_DIM_NUM_THREADS"
MALLOC_ENV = "MATBENCH_DIM_MALLOC_TUNING"
SINGLE_THREAD_MAX_CPUS = 2
"""Up to this many usable CPUs the default is one torch thread (measured: see the README)."""

_TORCH_STARTUP_THREADS = torch.get_num_threads()
_ALLOCATOR: dict[str, bool] = {}


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_threads(
    explicit: int | None,
    env_value: str | None,
    *,
    n_cpus: int,
    current: int,
    startup: int,
    omp_set: bool = False,
) -> int:
    """The torch thread count by the precedence rule of this module (a pure function).

    Parameters
    ----------
    explicit
        The caller's value (``None``: not given).
    env_value
        ``MATBENCH_DIM_NUM_THREADS`` (``None`` or empty: unset).
    n_cpus
        Usable CPUs.
    current, startup
        Torch's thread count now and when this module was imported.
    omp_set
        Whether ``OMP_NUM_THREADS`` is set (torch then already follows it).
    """
    if explicit is not None:
        value = int(explicit)
    elif env_value is not None and env_value.strip():
        try:
            value = int(env_value)
        except ValueError as exc:
            raise ValueError(f"{THREADS_ENV} must be an integer, got {env_value!r}") from exc
    elif omp_set or current != startup:
        return current
    elif n_cpus <= SINGLE_THREAD_MAX_CPUS:
        return 1
    else:
        return current
    if value < 1:
        raise ValueError(f"n_threads must be >= 1, got {value}")
    return value


def configure_threads(n_threads: int | None = None) -> int:
    """Set torch's intra-op thread count by :func:`resolve_threads` and return it.

    Parameters
    ----------
    n_threads
        Threads to use; ``None`` applies ``MATBENCH_DIM_NUM_THREADS``, then a choice already
        made (``OMP_NUM_THREADS``, ``torch.set_num_threads``), then the default rule.
    """
    n = resolve_threads(
        n_threads,
        os.environ.get(THREADS_ENV),
        n_cpus=usable_cpus(),
        current=torch.get_num_threads(),
        startup=_TORCH_STARTUP_THREADS,
        omp_set=bool(os.environ.get("OMP_NUM_THREADS", "").strip()),
    )
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
        logger.debug("torch threads set to %d", n)
    return n


def configure_allocator() -> bool:
    """Keep freed memory in the process (glibc only); True when the settings were applied.

    ``mallopt``: no ``mmap`` for large blocks (``M_MMAP_MAX = 0``) and a 1 GiB trim
    threshold, so the tensors of the next step reuse the pages of the last one instead of
    faulting in fresh zeroed pages from the kernel. Peak memory is unchanged; memory freed by
    a finished run is kept by the process for its next allocations. Idempotent; skipped
    when ``MATBENCH_DIM_MALLOC_TUNING=0`` or outside glibc.
    """
    if "applied" in _ALLOCATOR:
        return _ALLOCATOR["applied"]
    applied = False
    if os.environ.get(MALLOC_ENV, "1").strip() not in ("0", "off", "false", "no") and (
        sys.platform.startswith("linux")
    ):
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.gnu_get_libc_version  # noqa: B018 - raises AttributeError outside glibc
            m_trim_threshold, m_mmap_max = -1, -4
            applied = bool(libc.mallopt(m_mmap_max, 0)) and bool(
                libc.mallopt(m_trim_threshold, 1 << 30)
            )
        except (OSError, AttributeError):
            applied = False
    _ALLOCATOR["applied"] = applied
    logger.debug("malloc tuning %s", "applied" if applied else "not applied")
    return applied


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; return a torch CPU generator seeded with ``seed``."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - seeds code that uses the global state
    torch.manual_seed(seed)
    gen = torch.Generator()
    gen.manual_seed(seed)
    return gen


def resolve_device(device: str = "auto") -> torch.device:
    """Return the torch device: ``"auto"`` picks CUDA when available, else CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} requested but CUDA is not available on this machine")
    return dev


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` of this host still runs (a zombie has already exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
