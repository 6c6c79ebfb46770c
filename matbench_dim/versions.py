"""Versions of the libraries that shape the numbers, for provenance records (no heavy import)."""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata

__all__ = ["library_versions"]

VERSIONED = ("matbench-dim", "numpy", "scikit-learn", "torch", "pymatgen", "matminer", "matbench")


def library_versions(names: Sequence[str] = VERSIONED) -> dict[str, str]:
    """Installed versions of ``names`` (default :data:`VERSIONED`; ``"absent"`` if missing)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
