"""Process-level settings: torch threads, seeding and device selection.

Torch defaults to one thread per core. On a loaded two-core machine that can be many times
slower than a single thread, so the thread count is set deliberately: from the
``MATBENCH_DIM_NUM_THREADS`` environment variable when present (the test suite sets 1),
otherwise from the caller.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

THREADS_ENV = "MATBENCH_DIM_NUM_THREADS"


def configure_threads(n_threads: int | None = None) -> int:
    """Set torch's intra-op thread count and return it.

    Parameters
    ----------
    n_threads
        Threads to use. ``None`` reads ``MATBENCH_DIM_NUM_THREADS`` and, when that is unset,
        keeps torch's current setting.
    """
    if n_threads is None:
        env = os.environ.get(THREADS_ENV)
        if env is None:
            return torch.get_num_threads()
        n_threads = int(env)
    if n_threads < 1:
        raise ValueError(f"n_threads must be >= 1, got {n_threads}")
    if torch.get_num_threads() != n_threads:
        torch.set_num_threads(n_threads)
        logger.debug("torch threads set to %d", n_threads)
    return n_threads


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
