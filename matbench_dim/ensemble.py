"""A deep ensemble of fine-tunes from one DIM pretraining: predictions with a spread.

:class:`SiteNetDIMEnsemble` fits its first member exactly as the wrapped
:class:`~matbench_dim.estimator.SiteNetDIMRegressor` would on its own (so member 0 *is* the
single model), keeps that member's DIM-pretrained encoder, and fine-tunes ``n_members - 1``
more from it with other seeds (other weight initialisations of the head, other batch orders
and other validation splits for early stopping). Pretraining runs once. ``predict(X)`` is the
members' mean; ``predict(X, return_std=True)`` also returns their standard deviation (the
spread of the ensemble, ``ddof=0``), in target units.

Saved as a folder: ``ensemble.json`` (format version, parameters) and ``member_<k>/`` (each a
saved :class:`~matbench_dim.estimator.SiteNetDIMRegressor`); no pickle.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, RegressorMixin, clone
from sklearn.utils.validation import check_is_fitted

from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.pretrained import IncompatibleModelError

logger = logging.getLogger(__name__)

__all__ = ["SiteNetDIMEnsemble", "is_saved_ensemble", "member_seed"]

FORMAT_VERSION = 1
KIND = "matbench_dim.SiteNetDIMEnsemble"


def member_seed(random_state: int, k: int) -> int:
    """Seed of member ``k``: ``random_state`` itself for member 0, then seeds derived from
    ``(random_state, k)`` (never ``random_state + k``, which another run may use)."""
    if k == 0:
        return int(random_state)
    return int(np.random.SeedSequence([int(random_state), k]).generate_state(1)[0] % (2**31))


class SiteNetDIMEnsemble(RegressorMixin, BaseEstimator):
    """``n_members`` fine-tunes of one DIM-pretrained Site-Net; mean and spread.

    Parameters
    ----------
    estimator
        The member template (default ``SiteNetDIMRegressor()``); its ``random_state`` seeds
        member 0, and the others get :func:`member_seed`.
    n_members
        Ensemble size (>= 1; ``return_std`` needs >= 2).

    Attributes
    ----------
    members_ : list of SiteNetDIMRegressor
        The fitted members; ``members_[0]`` equals the template fitted on its own.
    fit_seconds_ : list of float
        Wall time of each member's fit (member 0 includes the pretraining), in seconds.
    """

    def __init__(self, estimator: SiteNetDIMRegressor | None = None, n_members: int = 5) -> None:
        self.estimator = estimator
        self.n_members = n_members

    @property
    def predicts_std(self) -> bool:
        """True when ``predict(X, return_std=True)`` works (two members or more)."""
        return isinstance(self.n_members, int) and self.n_members >= 2

    def _template(self) -> SiteNetDIMRegressor:
        base = self.estimator if self.estimator is not None else SiteNetDIMRegressor()
        return clone(base)

    def fit(self, X: Any, y: Any, X_unlabeled: Any = None) -> SiteNetDIMEnsemble:
        """Fit member 0 as the template would (DIM pretraining included), then the others
        from member 0's pretrained encoder; arguments as
        :meth:`SiteNetDIMRegressor.fit <matbench_dim.estimator.SiteNetDIMRegressor.fit>`."""
        if isinstance(self.n_members, bool) or not isinstance(self.n_members, int):
            raise TypeError(f"n_members must be an int, got {self.n_members!r}")
        if self.n_members < 1:
            raise ValueError(f"n_members must be >= 1, got {self.n_members}")
        base = self._template()
        seed = int(base.random_state)
        members: list[SiteNetDIMRegressor] = []
        seconds: list[float] = []
        for k in range(self.n_members):
            t0 = time.perf_counter()
            member = clone(base).set_params(random_state=member_seed(seed, k))
            if k == 0:
                member.fit(X, y, X_unlabeled)
            else:
                shared = getattr(members[0], "pretrained_encoder_", None)
                if shared is not None:  # one pretraining for the whole ensemble
                    member.set_params(encoder_init=shared)
                member.fit(X, y)
            members.append(member)
            seconds.append(time.perf_counter() - t0)
            logger.info(
                "ensemble member %d/%d fitted in %.0f s (best epoch %d)",
                k + 1, self.n_members, seconds[-1], member.best_epoch_,
            )  # fmt: skip
        self.members_ = members
        self.fit_seconds_ = seconds
        return self

    def predict(self, X: Any, return_std: bool = False) -> Any:
        """Mean prediction ``(n,)``; with ``return_std`` also the members' std ``(n,)``."""
        check_is_fitted(self, "members_")
        if return_std and len(self.members_) < 2:
            raise ValueError("return_std needs an ensemble of n_members >= 2")
        preds = self.predict_members(X)
        mean = preds.mean(axis=0)
        return (mean, preds.std(axis=0)) if return_std else mean

    def predict_members(self, X: Any) -> np.ndarray:
        """Every member's predictions, ``(n_members, n)``, target units."""
        check_is_fitted(self, "members_")
        from matbench_dim.features.inputs import as_structures, ids_of

        first = self.members_[0]  # members share the featurizer settings: featurize once
        structures = as_structures(X)
        device = first._setup()
        records = first._featurize(structures, ids_of(X, len(structures)))
        return np.stack([m._predict_records(records, device) for m in self.members_])

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to a folder: ``ensemble.json`` + ``member_<k>/`` (no pickle)."""
        check_is_fitted(self, "members_")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        for k, member in enumerate(self.members_):
            member.save(path / f"member_{k}")
        meta = {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "n_members": len(self.members_),
            "fit_seconds": self.fit_seconds_,
        }
        (path / "ensemble.json").write_text(json.dumps(meta, indent=2))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteNetDIMEnsemble:
        """Load a folder written by :meth:`save`."""
        path = Path(path)
        meta_path = path / "ensemble.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a saved ensemble: {meta_path} is missing")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION or meta.get("kind") != KIND:
            raise IncompatibleModelError(
                f"{path}: {meta.get('kind')!r} format {meta.get('format_version')}; this "
                f"matbench-dim reads {KIND!r} format {FORMAT_VERSION}"
            )
        members = [SiteNetDIMRegressor.load(path / f"member_{k}") for k in range(meta["n_members"])]
        est = cls(estimator=clone(members[0]), n_members=len(members))
        est.members_ = members
        est.fit_seconds_ = list(meta.get("fit_seconds", []))
        return est


def is_saved_ensemble(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a folder written by :meth:`SiteNetDIMEnsemble.save`."""
    return (Path(path) / "ensemble.json").is_file()
