"""Calibration metrics against a slow reference and against known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm

from matbench_dim.bench.calibration import (
    calibration_summary,
    coverage,
    expected_coverage,
    miscalibration_area,
)


def slow_area(y, mean, std, n_levels=100):
    """Loop reference: observed share inside each central interval, trapezoid over p."""
    levels = [i / (n_levels - 1) for i in range(n_levels)]
    gaps = []
    for p in levels:
        z = norm.ppf(0.5 + p / 2)
        inside = sum(abs(a - b) <= z * s for a, b, s in zip(y, mean, std, strict=True))
        gaps.append(abs(inside / len(y) - p))
    return sum(
        (gaps[i] + gaps[i + 1]) / 2 * (levels[i + 1] - levels[i]) for i in range(n_levels - 1)
    )


def test_area_matches_the_slow_reference():
    rng = np.random.default_rng(0)
    y, mean, std = rng.normal(size=200), rng.normal(size=200), rng.uniform(0.2, 2, 200)
    assert miscalibration_area(y, mean, std) == pytest.approx(slow_area(y, mean, std), abs=1e-12)


def test_a_calibrated_model_scores_near_ideal_and_overconfidence_is_seen():
    rng = np.random.default_rng(1)
    mean, std = rng.normal(size=20_000), rng.uniform(0.5, 2.0, 20_000)
    y = mean + std * rng.normal(size=20_000)  # truth drawn from the predicted distributions
    good = calibration_summary(y, mean, std)
    assert good["coverage_1sigma"] == pytest.approx(expected_coverage(1), abs=0.01)
    assert good["coverage_2sigma"] == pytest.approx(expected_coverage(2), abs=0.01)
    assert good["miscalibration_area"] < 0.01
    over = miscalibration_area(y, mean, std / 3)  # claims 3x less spread than it has
    assert over > 0.2
    assert coverage(y, mean, std / 3) < 0.35
    assert expected_coverage(1) == pytest.approx(math.erf(1 / math.sqrt(2)))


def test_bad_std_is_refused():
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        coverage([1.0], [1.0], [0.0])
    with pytest.raises(ValueError, match="equal, non-zero length"):
        coverage([1.0, 2.0], [1.0], [1.0])
