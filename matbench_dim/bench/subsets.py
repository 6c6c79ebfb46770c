"""The label-masking protocol's rules: which ids a cell may use, and the leak check.

Everything that pretrains, fits or schedules imports these rules from here; this module
imports nothing else of :mod:`matbench_dim.bench`, so the rules sit at the bottom of the
benchmark's wing:

- :func:`draw_subset`: a cell's labelled subset (nested in ``n`` for one fold and seed);
- :func:`pretraining_pool`: the ids a fold offers to label-free pretraining;
- :func:`check_disjoint` / :class:`LeakageError`: no test id reaches pretraining or fitting.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from matbench_dim.data.task import format_ids

__all__ = ["POOL_SEED_OFFSET", "LeakageError", "check_disjoint", "draw_subset", "pretraining_pool"]

POOL_SEED_OFFSET = 1_000_003
"""The pretraining pool cap of fold ``k`` draws with ``default_rng(POOL_SEED_OFFSET + k)``."""


class LeakageError(AssertionError):
    """A test-fold id reached pretraining or fitting."""


# --------------------------------------------------------------------------- subsets


def check_disjoint(used: Sequence[Any], test: Sequence[Any], *, stage: str, where: str) -> None:
    """Raise :class:`LeakageError` when ``used`` and ``test`` ids share any element.

    Parameters
    ----------
    used
        Ids about to be used for ``stage`` (pretraining pool, labelled subset).
    test
        The fold's test ids.
    stage, where
        Named in the message (e.g. ``"pretraining"``, ``"task flla fold 2"``).
    """
    both = set(map(str, used)) & set(map(str, test))
    if both:
        raise LeakageError(
            f"{where}: {len(both)} test ids would reach {stage}: {format_ids(sorted(both))}"
        )


def draw_subset(train_ids: Sequence[Any], n: int, fold: int, seed: int) -> np.ndarray:
    """The labelled subset of a cell: the first ``n`` of a seeded permutation of ``train_ids``.

    The permutation is ``default_rng(1000 * fold + seed).permutation(len(train_ids))``, so
    for one (fold, seed) the subsets are nested: the ``n=100`` subset starts with the ``n=50``
    one. Returns an object array of ``n`` ids.

    Raises
    ------
    ValueError
        When ``n`` exceeds the number of labelled training entries, or is not positive.
    """
    train = np.asarray(list(train_ids), dtype=object)
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if n > len(train):
        raise ValueError(
            f"n={n} labelled entries requested but fold {fold} has only {len(train)} "
            "labelled training entries; choose n <= that"
        )
    order = np.random.default_rng(1000 * int(fold) + int(seed)).permutation(len(train))
    return train[order[: int(n)]]


def pretraining_pool(
    pool_ids: Sequence[Any], max_train_structures: int | None, fold: int
) -> np.ndarray:
    """Ids offered to pretraining: all of ``pool_ids``, or a seeded draw of at most
    ``max_train_structures`` of them (``default_rng(POOL_SEED_OFFSET + fold)``), in pool order."""
    pool = np.asarray(list(pool_ids), dtype=object)
    if max_train_structures is None or max_train_structures >= len(pool):
        return pool
    if max_train_structures < 1:
        raise ValueError(f"max_train_structures must be >= 1, got {max_train_structures}")
    rng = np.random.default_rng(POOL_SEED_OFFSET + int(fold))
    keep = np.sort(rng.choice(len(pool), size=int(max_train_structures), replace=False))
    return pool[keep]
