"""What both training loops share: the optimiser settings, seeded batches, the train /
validation split, log averaging, gradient clipping and content fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from matbench_dim.features.featurize import CrystalRecord, batch_indices

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW settings (the seed's: lr 1e-4, weight decay 1e-4, eps 1e-7, amsgrad)."""

    lr: float = 1e-4
    weight_decay: float = 1e-4
    eps: float = 1e-7
    amsgrad: bool = True

    def __post_init__(self) -> None:
        if not self.lr > 0:
            raise ValueError(f"optimizer lr must be > 0, got {self.lr}")
        if self.weight_decay < 0 or self.eps <= 0:
            raise ValueError("optimizer weight_decay must be >= 0 and eps > 0")

    def make(self, params: Any, lr: float | None = None) -> torch.optim.Optimizer:
        """Build an AdamW optimiser over ``params`` (``lr`` overrides ``self.lr``)."""
        return torch.optim.AdamW(
            params,
            lr=lr if lr is not None else self.lr,
            weight_decay=self.weight_decay,
            eps=self.eps,
            amsgrad=self.amsgrad,
        )


def check_loop(cfg: Any, name: str) -> None:
    if cfg.epochs < 1:
        raise ValueError(f"{name} epochs must be >= 1, got {cfg.epochs}")
    if cfg.batch_sites < 1:
        raise ValueError(f"{name} batch_sites must be >= 1, got {cfg.batch_sites}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"{name} val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.patience < 0 or cfg.grad_clip < 0:
        raise ValueError(f"{name} patience and grad_clip must be >= 0")


def split_train_val(
    n: int, val_fraction: float, seed: int, min_total_for_val: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into (train, validation) index arrays.

    The validation part has ``round(n * val_fraction)`` items, at least one when
    ``n >= min_total_for_val`` and ``val_fraction > 0``, none otherwise.
    """
    if val_fraction <= 0 or n < min_total_for_val:
        return np.arange(n), np.arange(0)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7_919 + 17) % (2**63)


def make_batches(
    records: Sequence[CrystalRecord], idx: np.ndarray, batch_sites: int, seed: int | None
) -> list[np.ndarray]:
    groups = batch_indices(
        [records[i].n_prim for i in idx], max_sites=batch_sites, shuffle=seed is not None, seed=seed
    )
    return [idx[np.asarray(g, dtype=int)] for g in groups]


def mean_logs(rows: list[dict[str, float]], weights: list[int], prefix: str) -> dict[str, float]:
    if not rows:
        return {}
    w = np.asarray(weights, dtype=float)
    keys = sorted({k for r in rows for k in r})
    out = {}
    for k in keys:
        vals = np.array([r.get(k, np.nan) for r in rows], dtype=float)
        ok = np.isfinite(vals)
        if ok.any():
            out[f"{prefix}{k}"] = float(np.average(vals[ok], weights=w[ok]))
    return out


def clip_grad(params: Any, max_norm: float) -> None:
    if max_norm > 0:
        nn.utils.clip_grad_norm_(params, max_norm)


def config_fingerprint(*parts: Any) -> str:
    blob = json.dumps(
        [asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def records_fingerprint(records: Sequence[CrystalRecord]) -> str:
    """Content hash of a list of records (order-sensitive), used to key checkpoints."""
    h = hashlib.sha256()
    for r in records:
        h.update(np.ascontiguousarray(r.site_features).tobytes())
        h.update(np.ascontiguousarray(r.super_coords).tobytes())
        h.update(np.ascontiguousarray(r.lattice).tobytes())
    return h.hexdigest()[:16]
