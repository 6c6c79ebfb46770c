"""Non-neural baselines with a scikit-learn ``fit(X, y)`` / ``predict(X)`` API on crystals.

``X`` is a sequence of pymatgen ``Structure`` objects (or compositions, for the composition
baselines). When ``X`` is a ``pandas.Series`` its index names the entries in error messages.

Baselines
---------
- :class:`DummyMeanRegressor` predicts the training mean (``dummy_mean``).
- :class:`ConstantRegressor` predicts a fixed value; ``value=0`` is the zero predictor for
  band-gap tasks (``zero``).
- :class:`MedianRegressor` predicts the training median (``median``).
- :class:`FeaturizedForest` is a random forest (200 trees, seeded) on fixed descriptors:
  ``featurizer="magpie"`` (matminer's ``ElementProperty.from_preset("magpie")`` composition
  statistics, 132 features; ``rf_magpie``), ``featurizer="sine_coulomb"`` (``rf_sine_coulomb``)
  or ``featurizer="chgnet"`` (frozen CHGNet crystal features, optional extra; ``chgnet_rf``,
  :mod:`matbench_dim.bench.chgnet_features`).

Structure descriptor choice: the sorted eigenvalues of matminer's ``SineCoulombMatrix``.
It costs well under a millisecond per crystal of up to ~50 sites, never fails on an ordered
structure and needs no element tables, whereas an XRD pattern (pymatgen ``XRDCalculator``) is
tens of milliseconds per crystal and needs a binning choice. The eigenvalue vector has one
entry per site; the forest pads it with zeros to the largest training crystal and truncates
larger test crystals to the same length (their largest eigenvalues are kept).

Features are cached per crystal (keyed by a content hash of lattice, species and fractional
coordinates) in a process-wide :class:`FeatureCache`, so a run computes each descriptor of each
crystal once; ``FeatureCache.save`` / ``update_from`` share it across worker processes.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.ensemble import RandomForestRegressor

logger = logging.getLogger(__name__)

__all__ = [
    "FEATURIZERS",
    "ConstantRegressor",
    "DummyMeanRegressor",
    "FeatureCache",
    "FeaturizationError",
    "FeaturizedForest",
    "MagpieFeaturizer",
    "MedianRegressor",
    "SineCoulombFeaturizer",
    "entry_names",
    "get_cache",
    "item_key",
]


class FeaturizationError(ValueError):
    """A descriptor could not be computed for one entry (the message names the entry)."""


# --------------------------------------------------------------------------- inputs


def entry_names(X: Sequence[Any]) -> list[str]:
    """Names of the entries of ``X``: the index of a ``pandas.Series``, else ``"#<position>"``."""
    if isinstance(X, pd.Series | pd.DataFrame):
        return [str(i) for i in X.index]
    return [f"#{i}" for i in range(len(X))]


def _as_list(X: Sequence[Any]) -> list[Any]:
    if isinstance(X, pd.Series):
        return X.tolist()
    return list(X)


def _composition(item: Any) -> Any:
    from pymatgen.core import Composition, Structure

    if isinstance(item, Structure):
        return item.composition
    if isinstance(item, Composition):
        return item
    if isinstance(item, str):
        return Composition(item)
    raise TypeError(f"expected a pymatgen Structure, Composition or formula, got {type(item)}")


def item_key(item: Any) -> str:
    """Content hash (sha256 hex) of a crystal or composition, used as the cache key.

    Structures are hashed from the lattice matrix and fractional coordinates (rounded to
    1e-6) and the site species, so equal crystals loaded twice share one key.
    """
    from pymatgen.core import Structure

    h = hashlib.sha256()
    if isinstance(item, Structure):
        h.update(b"structure")
        h.update(np.round(item.lattice.matrix, 6).astype(np.float64).tobytes())
        h.update(np.round(item.frac_coords, 6).astype(np.float64).tobytes())
        if item.is_ordered:
            h.update(np.asarray(item.atomic_numbers, dtype=np.int64).tobytes())
        else:
            h.update("|".join(s.species_string for s in item).encode())
    else:
        h.update(b"composition")
        h.update(_composition(item).formula.encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- featurizers


class MagpieFeaturizer:
    """matminer ``ElementProperty.from_preset("magpie")`` on the composition: (132,) float64."""

    name = "magpie"

    def __init__(self) -> None:
        self._ep: Any = None

    def featurize_one(self, item: Any) -> np.ndarray:
        """Magpie statistics of ``item``'s composition; raises when any value is not finite."""
        if self._ep is None:
            from matminer.featurizers.composition import ElementProperty

            self._ep = ElementProperty.from_preset("magpie")
        values = np.asarray(self._ep.featurize(_composition(item)), dtype=np.float64)
        bad = ~np.isfinite(values)
        if bad.any():
            labels = [lab for lab, b in zip(self._ep.feature_labels(), bad, strict=True) if b]
            raise ValueError(f"missing Magpie element data for {', '.join(labels[:5])}")
        return values


class SineCoulombFeaturizer:
    """Eigenvalues of matminer's ``SineCoulombMatrix``, sorted descending: (n_sites,) float64."""

    name = "sine_coulomb"

    def __init__(self) -> None:
        self._scm: Any = None

    def featurize_one(self, item: Any) -> np.ndarray:
        """Sorted eigenvalues of the sine Coulomb matrix of a structure (Hartree-like units)."""
        from pymatgen.core import Structure

        if not isinstance(item, Structure):
            raise TypeError(f"the sine Coulomb matrix needs a Structure, got {type(item).__name__}")
        if not item.is_ordered:
            raise ValueError("the sine Coulomb matrix needs an ordered structure")
        if self._scm is None:
            from matminer.featurizers.structure import SineCoulombMatrix

            self._scm = SineCoulombMatrix(flatten=False)
        with warnings.catch_warnings():
            # matminer builds np.matrix objects; overlapping sites divide by zero (checked below)
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            warnings.simplefilter("ignore", RuntimeWarning)
            matrix = np.asarray(self._scm.featurize(item)[0], dtype=np.float64)
        eig = np.linalg.eigvalsh(matrix)[::-1].copy()
        if not np.isfinite(eig).all():
            raise ValueError("non-finite sine Coulomb eigenvalues (overlapping sites?)")
        return eig


def _chgnet_featurizer() -> Any:
    from matbench_dim.bench.chgnet_features import ChgnetFeaturizer

    return ChgnetFeaturizer()


FEATURIZERS: dict[str, Any] = {
    MagpieFeaturizer.name: MagpieFeaturizer,
    SineCoulombFeaturizer.name: SineCoulombFeaturizer,
    "chgnet": _chgnet_featurizer,
}


def _make_featurizer(name: str) -> Any:
    try:
        return FEATURIZERS[name]()
    except KeyError:
        raise ValueError(f"unknown featurizer {name!r}; known: {sorted(FEATURIZERS)}") from None


# --------------------------------------------------------------------------- cache


class FeatureCache:
    """Descriptor vectors of one featurizer, keyed by :func:`item_key`.

    Parameters
    ----------
    featurizer
        Name in :data:`FEATURIZERS` (``"magpie"``, ``"sine_coulomb"`` or ``"chgnet"``).
    chunk_size
        Entries per call of a batched featurizer's ``featurize_many``.
    """

    def __init__(self, featurizer: str, chunk_size: int = 64) -> None:
        self.featurizer = featurizer
        self.chunk_size = chunk_size
        self._impl = _make_featurizer(featurizer)
        self._store: dict[str, np.ndarray] = {}
        self._loaded: set[str] = set()

    def __len__(self) -> int:
        return len(self._store)

    def get(self, X: Sequence[Any], names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Descriptor of every entry of ``X`` (computed once, then cached).

        Raises
        ------
        FeaturizationError
            Naming the entry (``names`` or :func:`entry_names`) and its formula.
        """
        items = _as_list(X)
        names = list(names) if names is not None else entry_names(X)
        if len(names) != len(items):
            raise ValueError(f"{len(items)} entries but {len(names)} names")
        keys = [item_key(item) for item in items]
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        missing = sorted(i for key, i in first.items() if key not in self._store)
        many = getattr(self._impl, "featurize_many", None)
        if many is not None and len(missing) > 1:
            # batched featurizers (CHGNet): one model call per chunk; a chunk that fails is
            # redone one entry at a time below, so that the error names the entry
            for start in range(0, len(missing), self.chunk_size):
                chunk = missing[start : start + self.chunk_size]
                try:
                    vecs = many([items[i] for i in chunk])
                except ImportError:
                    raise  # a missing optional package, not a bad entry
                except Exception as exc:
                    logger.debug("%s: batch failed (%s); one entry at a time", self.featurizer, exc)
                    continue
                for i, vec in zip(chunk, vecs, strict=True):
                    self._store[keys[i]] = vec
        n_new = 0
        for i in missing:
            if keys[i] in self._store:
                n_new += 1
                continue
            try:
                self._store[keys[i]] = self._impl.featurize_one(items[i])
            except ImportError:
                raise
            except Exception as exc:
                formula = _safe_formula(items[i])
                raise FeaturizationError(
                    f"featurizer {self.featurizer!r} failed on entry {names[i]} ({formula}): {exc}"
                ) from exc
            n_new += 1
        if n_new:
            logger.debug("%s: computed %d new descriptors", self.featurizer, n_new)
        return [self._store[key] for key in keys]

    def save(self, path: str | Path) -> Path:
        """Write the cache to ``path`` (``.npz``: keys, flat values, offsets), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._store)
        vecs = [self._store[k] for k in keys]
        lengths = np.array([len(v) for v in vecs], dtype=np.int64)
        flat = np.concatenate(vecs) if vecs else np.zeros(0)
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, keys=np.array(keys, dtype="U64"), lengths=lengths, flat=flat)
        tmp.replace(path)
        return path

    def update_from(self, path: str | Path) -> int:
        """Add the vectors saved at ``path`` (once per path per process); return how many."""
        path = Path(path)
        tag = str(path.resolve())
        if tag in self._loaded:
            return 0
        with np.load(path) as data:
            keys, lengths, flat = data["keys"], data["lengths"], data["flat"]
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        for i, key in enumerate(keys):
            self._store.setdefault(str(key), flat[offsets[i] : offsets[i + 1]])
        self._loaded.add(tag)
        return len(keys)


def _safe_formula(item: Any) -> str:
    try:
        return _composition(item).reduced_formula
    except Exception:
        return "unknown formula"


_CACHES: dict[str, FeatureCache] = {}


def get_cache(featurizer: str) -> FeatureCache:
    """The process-wide cache of ``featurizer`` (created on first use)."""
    if featurizer not in _CACHES:
        _CACHES[featurizer] = FeatureCache(featurizer)
    return _CACHES[featurizer]


# --------------------------------------------------------------------------- estimators


def _targets(y: Any, n: int) -> np.ndarray:
    y = np.asarray(y, dtype=np.float64).ravel()
    if len(y) != n:
        raise ValueError(f"X has {n} entries but y has {len(y)}")
    if n == 0:
        raise ValueError("cannot fit on zero entries")
    if not np.isfinite(y).all():
        raise ValueError(f"y holds {int((~np.isfinite(y)).sum())} non-finite values")
    return y


class DummyMeanRegressor(RegressorMixin, BaseEstimator):
    """Predict the mean of the training targets (matbench's dummy)."""

    def fit(self, X: Sequence[Any], y: Any) -> DummyMeanRegressor:
        self.value_ = float(np.mean(_targets(y, len(X))))
        return self

    def predict(self, X: Sequence[Any]) -> np.ndarray:
        """(n,) float64 constant predictions."""
        return np.full(len(X), self.value_, dtype=np.float64)


class MedianRegressor(RegressorMixin, BaseEstimator):
    """Predict the median of the training targets (the MAE-optimal constant)."""

    def fit(self, X: Sequence[Any], y: Any) -> MedianRegressor:
        self.value_ = float(np.median(_targets(y, len(X))))
        return self

    def predict(self, X: Sequence[Any]) -> np.ndarray:
        """(n,) float64 constant predictions."""
        return np.full(len(X), self.value_, dtype=np.float64)


class ConstantRegressor(RegressorMixin, BaseEstimator):
    """Predict ``value`` whatever the data (``value=0``: the zero predictor for band gaps)."""

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    def fit(self, X: Sequence[Any], y: Any = None) -> ConstantRegressor:
        self.value_ = float(self.value)
        return self

    def predict(self, X: Sequence[Any]) -> np.ndarray:
        """(n,) float64 constant predictions."""
        return np.full(len(X), self.value_, dtype=np.float64)


class FeaturizedForest(RegressorMixin, BaseEstimator):
    """Random forest on a fixed descriptor of each crystal.

    Parameters
    ----------
    featurizer
        ``"magpie"`` (composition), ``"sine_coulomb"`` or ``"chgnet"`` (structure).
    n_estimators
        Trees (200 by default, as in the reference anchors).
    random_state
        Seed of the forest.
    n_jobs
        Threads of the forest (1 inside a parallel grid).
    """

    def __init__(
        self,
        featurizer: str = "magpie",
        n_estimators: int = 200,
        random_state: int | None = 0,
        n_jobs: int = 1,
    ) -> None:
        self.featurizer = featurizer
        self.n_estimators = n_estimators
        self.random_state = random_state
        self.n_jobs = n_jobs

    def _matrix(self, X: Sequence[Any], width: int | None) -> np.ndarray:
        vecs = get_cache(self.featurizer).get(X)
        if width is None:
            width = max(len(v) for v in vecs)
        out = np.zeros((len(vecs), width), dtype=np.float64)
        for i, v in enumerate(vecs):
            k = min(width, len(v))
            out[i, :k] = v[:k]
        return out

    def fit(self, X: Sequence[Any], y: Any) -> FeaturizedForest:
        y = _targets(y, len(X))
        features = self._matrix(X, None)
        self.n_features_ = features.shape[1]
        self.forest_ = RandomForestRegressor(
            n_estimators=self.n_estimators, random_state=self.random_state, n_jobs=self.n_jobs
        ).fit(features, y)
        return self

    def predict(self, X: Sequence[Any]) -> np.ndarray:
        """(n,) float64 predictions."""
        return self.forest_.predict(self._matrix(X, self.n_features_))
