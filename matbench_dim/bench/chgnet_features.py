"""Frozen CHGNet crystal features for the ``chgnet_rf`` baseline (optional ``chgnet`` extra).

``chgnet_rf`` is the baseline a user would reach for instead of self-supervised pretraining: a
random forest on the crystal vector of the pretrained universal potential CHGNet (Deng et al.
2023, model 0.3.0, whose weights ship inside the ``chgnet`` wheel: nothing is downloaded at run
time). The vector is CHGNet's pooled atom features before its energy head, ``(64,)`` float64.

CHGNet was trained on MPtrj, the Materials Project's relaxation trajectories and their DFT
energies. On a task derived from the Materials Project it has therefore seen the test-fold
structures, and for an energy target their energies too: :func:`overlap_note` says so, and
the report prints that note beside the method's numbers.

Install with ``pip install 'matbench-dim[chgnet]'``; without it the bench skips ``chgnet_rf``
with a message (:data:`MISSING_MESSAGE`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = [
    "MISSING_MESSAGE",
    "MODEL_VERSION",
    "ChgnetFeaturizer",
    "chgnet_available",
    "overlap_note",
]

MODEL_VERSION = "0.3.0"
MISSING_MESSAGE = (
    "chgnet_rf needs the optional CHGNet package, which is not installed: "
    "pip install 'matbench-dim[chgnet]'"
)

# Tasks whose structures come from the Materials Project (so from MPtrj's source), and which
# of them have an energy-like target CHGNet was trained on.
_MP_TASKS = {
    "flla",
    "matbench_mp_e_form",
    "matbench_mp_gap",
    "matbench_mp_is_metal",
    "matbench_log_gvrh",
    "matbench_log_kvrh",
    "matbench_dielectric",
    "matbench_phonons",
}
_ENERGY_WORDS = ("e_form", "formation", "energy", "e_above_hull")


def chgnet_available() -> bool:
    """True when the ``chgnet`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("chgnet") is not None


def overlap_note(task: str, target: str) -> str | None:
    """What CHGNet's training data already holds of ``task`` (``None``: no known overlap).

    >>> overlap_note("flla", "formation_energy_per_atom").startswith("CHGNet was trained")
    True
    >>> overlap_note("perovskites_subset", "e_form") is None
    True
    """
    base = task.removeprefix("sample:")
    if base not in _MP_TASKS:
        return None
    if any(word in target.lower() for word in _ENERGY_WORDS):
        return (
            f"CHGNet was trained on Materials Project energies (MPtrj), so on {base} it has "
            "seen the test-fold structures and their DFT energies: chgnet_rf is not a "
            "label-masked result here"
        )
    return (
        f"CHGNet was trained on Materials Project structures (MPtrj), so on {base} it has "
        "seen the test-fold structures (not these labels)"
    )


class ChgnetFeaturizer:
    """CHGNet 0.3.0's crystal feature of a structure: (64,) float64.

    The model is loaded on first use, on the CPU, in evaluation mode; structures are
    featurized in batches (:meth:`featurize_many`; :class:`~matbench_dim.bench.baselines.FeatureCache`
    redoes a failed batch one structure at a time, so that the error names the structure).
    """

    name = "chgnet"

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        self._model: Any = None

    def _load(self) -> Any:
        if self._model is None:
            if not chgnet_available():
                raise ImportError(MISSING_MESSAGE)
            from chgnet.model import CHGNet

            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):  # CHGNet prints on load, even when quiet
                self._model = CHGNet.load(model_name=MODEL_VERSION, use_device="cpu", verbose=False)
            self._model.eval()
            for line in printed.getvalue().splitlines():
                logger.debug("chgnet: %s", line)
        return self._model

    def _predict(self, items: Sequence[Any]) -> list[np.ndarray]:
        import torch
        from pymatgen.core import Structure

        for item in items:
            if not isinstance(item, Structure):
                raise TypeError(f"CHGNet features need a Structure, got {type(item).__name__}")
        model = self._load()
        with torch.no_grad():
            out = model.predict_structure(
                list(items), task="e", return_crystal_feas=True, batch_size=self.batch_size
            )
        preds = [out] if isinstance(out, dict) else list(out)
        vecs = [np.asarray(p["crystal_fea"], dtype=np.float64).ravel() for p in preds]
        for vec in vecs:
            if not np.isfinite(vec).all():
                raise ValueError("non-finite CHGNet crystal features")
        return vecs

    def featurize_one(self, item: Any) -> np.ndarray:
        """CHGNet crystal feature of one structure, (64,) float64."""
        return self._predict([item])[0]

    def featurize_many(self, items: Sequence[Any]) -> list[np.ndarray]:
        """Features of ``items`` in batched model calls, one (64,) float64 vector each."""
        return self._predict(items)
