"""Versions of the libraries that shape the numbers, for provenance records (no heavy import)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["library_versions"]

VERSIONED = ("matbench-dim", "numpy", "scikit-learn", "torch", "pymatgen", "matminer", "matbench")


def library_versions() -> dict[str, str]:
    """Installed versions of :data:`VERSIONED` (``"absent"`` for a missing one)."""
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out
