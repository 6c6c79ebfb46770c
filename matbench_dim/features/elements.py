"""Elemental property table for Site-Net site features (Z = 1..103), built once per process.

Source
------
The eight Magpie properties used by the Site-Net seed, read from matminer's Magpie tables
(``matminer/utils/data_files/magpie_elementdata/*.table``, the files behind
``matminer.utils.data.MagpieData``), *without* matminer's mean imputation:

=====================  ==================  =======  ==================================
name                   raw unit            scale    scaled quantity
=====================  ==================  =======  ==================================
Number                 -                   0.1      Z / 10
AtomicWeight           u                   0.1      weight / 10
Row                    -                   1        period
Column                 -                   1        group (all rare earths listed as 3)
FirstIonizationEnergy  eV                  1        eV
Electronegativity      Pauling             10       10 x Pauling
AtomicRadius           Angstrom            10       radius in 0.1 Angstrom
Density                kg/m^3 (= g/L)      0.001    g/cm^3 (gases at STP are tiny)
=====================  ==================  =======  ==================================

The scales are the seed's fixed scalers ``[0.1, 0.1, 1, 1, 1, 10, 10, 0.001]``. There is no
oxidation-state column: matbench structures are undecorated, so the seed's column was always 0
and carries no information (site features are therefore 8-dimensional, not 9).

Fill rule for values Magpie lacks (applied in this order, first hit wins; never NaN)
-----------------------------------------------------------------------------------
1. pymatgen's value of the same quantity: ``ionization_energies[0]`` (At),
   ``Element.X`` (Rn, Lr), ``atomic_radius``, ``density_of_solid`` (kg/m^3).
2. A related property from the Magpie tables: Electronegativity <- Allen electronegativity
   (He, Ne, Ar; the only scale defined for the light noble gases, within 0.03 of Pauling for
   Kr and Xe); AtomicRadius <- covalent radius / 100 (pm -> Angstrom; noble gases, At, Fr, Cm).
3. Period neighbour: the value (after steps 1-2) of the nearest element in the same row that
   has one, ties going to the lower Z (e.g. density of At <- Po, Es <- Cf; radius Bk..Lr <- Cm).

An element that is still missing a value raises :class:`ElementDataError` naming the property
and the element. :func:`fill_sources` tells which rule filled which entry.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from collections.abc import Sequence
from importlib import resources

import numpy as np

logger = logging.getLogger(__name__)

MAX_Z = 103
SITE_FEATURE_NAMES: tuple[str, ...] = (
    "Number",
    "AtomicWeight",
    "Row",
    "Column",
    "FirstIonizationEnergy",
    "Electronegativity",
    "AtomicRadius",
    "Density",
)
SITE_FEATURE_SCALES: tuple[float, ...] = (0.1, 0.1, 1.0, 1.0, 1.0, 10.0, 10.0, 0.001)
N_SITE_FEATURES = len(SITE_FEATURE_NAMES)

# Related Magpie property used as a proxy (step 2 of the fill rule) and its unit factor.
_PROXIES: dict[str, tuple[str, float]] = {
    "Electronegativity": ("AllenElectronegativity", 1.0),
    "AtomicRadius": ("CovalentRadius", 0.01),
}


class ElementDataError(ValueError):
    """An element has no usable value for a site feature, or is outside Z = 1..103."""


def _symbol(z: int) -> str:
    from pymatgen.core.periodic_table import Element

    return Element.from_Z(z).symbol


def _read_magpie_table(name: str) -> np.ndarray:
    """One Magpie table as a (MAX_Z,) float64 array (NaN where the table has no number)."""
    path = resources.files("matminer.utils") / "data_files" / "magpie_elementdata" / f"{name}.table"
    lines = path.read_text().splitlines()
    out = np.full(MAX_Z, np.nan)
    for z in range(1, MAX_Z + 1):
        with contextlib.suppress(ValueError, IndexError):
            out[z - 1] = float(lines[z - 1])
    return out


def _pymatgen_value(name: str, z: int) -> float:
    """pymatgen's value of the same quantity (NaN when it has none)."""
    from pymatgen.core.periodic_table import Element

    el = Element.from_Z(z)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "FirstIonizationEnergy":
            ies = el.ionization_energies
            val = ies[0] if ies else None
        elif name == "Electronegativity":
            val = el.X
        elif name == "AtomicRadius":
            val = el.atomic_radius
        elif name == "Density":
            val = el.density_of_solid  # kg m^-3, as Magpie
        else:
            return math.nan
    try:
        val = float(val) if val is not None else math.nan
    except (TypeError, ValueError):
        return math.nan
    return val if math.isfinite(val) else math.nan


def _neighbour_fill(values: np.ndarray, rows: np.ndarray, z: int) -> float:
    """Value of the nearest element of the same row that has one (ties: lower Z)."""
    best: tuple[int, int] | None = None
    for other in range(1, MAX_Z + 1):
        if other == z or rows[other - 1] != rows[z - 1] or not np.isfinite(values[other - 1]):
            continue
        cand = (abs(other - z), other)
        if best is None or cand < best:
            best = cand
    return math.nan if best is None else float(values[best[1] - 1])


@functools.lru_cache(maxsize=1)
def _build() -> tuple[np.ndarray, dict[tuple[str, str], str]]:
    rows = _read_magpie_table("Row")
    raw = np.full((MAX_Z, N_SITE_FEATURES), np.nan)
    sources: dict[tuple[str, str], str] = {}
    for k, name in enumerate(SITE_FEATURE_NAMES):
        col = _read_magpie_table(name)
        proxy = None
        if name in _PROXIES:
            proxy_name, factor = _PROXIES[name]
            proxy = (proxy_name, _read_magpie_table(proxy_name) * factor)
        for z in np.flatnonzero(~np.isfinite(col)) + 1:
            val = _pymatgen_value(name, int(z))
            src = "pymatgen"
            if not math.isfinite(val) and proxy is not None:
                val, src = float(proxy[1][z - 1]), f"magpie {proxy[0]}"
            if math.isfinite(val):
                col[z - 1] = val
                sources[(_symbol(int(z)), name)] = src
        for z in np.flatnonzero(~np.isfinite(col)) + 1:
            val = _neighbour_fill(col, rows, int(z))
            if not math.isfinite(val):
                raise ElementDataError(
                    f"no value for {name} of {_symbol(int(z))} (Z={z}): missing from Magpie and "
                    "pymatgen, and no element of the same row has one"
                )
            col[z - 1] = val
            sources[(_symbol(int(z)), name)] = "period neighbour"
        raw[:, k] = col
    if not np.all(np.isfinite(raw)):  # pragma: no cover - guarded by the loop above
        raise ElementDataError("element table has non-finite entries after filling")
    logger.debug("element table built: %d values filled", len(sources))
    return raw, sources


def raw_element_table() -> np.ndarray:
    """Unscaled, filled properties: (103, 8) float64, row ``Z - 1`` for element Z."""
    return _build()[0].copy()


@functools.lru_cache(maxsize=1)
def element_feature_table() -> np.ndarray:
    """Scaled site features indexed by Z: (104, 8) float32; row 0 (no element) is zeros."""
    table = np.zeros((MAX_Z + 1, N_SITE_FEATURES), dtype=np.float32)
    table[1:] = _build()[0] * np.asarray(SITE_FEATURE_SCALES)
    table.setflags(write=False)
    return table


def fill_sources() -> dict[tuple[str, str], str]:
    """Which fill rule supplied each value Magpie lacks: ``{(symbol, property): rule}``."""
    return dict(_build()[1])


def site_features(atomic_numbers: Sequence[int] | np.ndarray) -> np.ndarray:
    """Scaled elemental features of sites.

    Parameters
    ----------
    atomic_numbers
        (n,) atomic numbers in 1..103.

    Returns
    -------
    (n, 8) float32 array, columns :data:`SITE_FEATURE_NAMES` times :data:`SITE_FEATURE_SCALES`.
    """
    z = np.asarray(atomic_numbers, dtype=np.int64)
    bad = (z < 1) | (z > MAX_Z)
    if bad.any():
        zb = int(z[bad][0])
        name = _symbol(zb) if 1 <= zb <= 118 else "unknown"
        raise ElementDataError(
            f"no elemental data for Z={zb} ({name}): the site-feature table covers Z=1..{MAX_Z}"
        )
    return element_feature_table()[z]
