"""Calibration of predictive standard deviations (e.g. an ensemble's spread).

With a Gaussian reading of ``(mean, std)``, a calibrated model's interval ``mean ± k·std``
holds the truth in ``erf(k / √2)`` of the cases (68.3 % for k = 1, 95.4 % for k = 2).
:func:`coverage` counts how often it does; :func:`miscalibration_area` integrates
``|observed - expected|`` over central intervals of every probability (0 = calibrated,
0.5 = as bad as it gets), as in uncertainty-toolbox's definition.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

__all__ = ["calibration_summary", "coverage", "expected_coverage", "miscalibration_area"]


def _arrays(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y, mean, std = (np.asarray(a, dtype=float).ravel() for a in (y, mean, std))
    if not len(y) == len(mean) == len(std) or not len(y):
        raise ValueError(
            f"y, mean and std must have one equal, non-zero length: {len(y)}, {len(mean)}, {len(std)}"
        )
    if (std <= 0).any() or not np.isfinite(std).all():
        raise ValueError("std must be finite and > 0")
    return np.abs(y - mean), std


def expected_coverage(k: float) -> float:
    """Share of a normal distribution within ``k`` standard deviations of its mean."""
    return math.erf(k / math.sqrt(2.0))


def coverage(y: np.ndarray, mean: np.ndarray, std: np.ndarray, k: float = 1.0) -> float:
    """Observed share of ``|y - mean| <= k · std``; ``y``, ``mean``, ``std`` are ``(n,)``."""
    err, std = _arrays(y, mean, std)
    return float(np.mean(err <= k * std))


def miscalibration_area(
    y: np.ndarray, mean: np.ndarray, std: np.ndarray, n_levels: int = 100
) -> float:
    """Mean ``|observed - expected|`` over central intervals at ``n_levels`` probabilities
    evenly spaced in ``[0, 1]`` (trapezoidal rule)."""
    err, std = _arrays(y, mean, std)
    p = np.linspace(0.0, 1.0, n_levels)
    z = norm.ppf(0.5 + p / 2.0)  # half-width of the central interval holding p, in std units
    observed = (err[None, :] <= z[:, None] * std[None, :]).mean(axis=1)
    return float(np.trapezoid(np.abs(observed - p), p))


def calibration_summary(y: np.ndarray, mean: np.ndarray, std: np.ndarray) -> dict[str, float]:
    """``coverage_1sigma``, ``coverage_2sigma``, ``miscalibration_area`` and ``mean_std``."""
    return {
        "coverage_1sigma": coverage(y, mean, std, 1.0),
        "coverage_2sigma": coverage(y, mean, std, 2.0),
        "miscalibration_area": miscalibration_area(y, mean, std),
        "mean_std": float(np.mean(std)),
    }
