"""Methods of the label-masking grid: how each one is built, pretrained and described.

A :class:`Method` tells :func:`matbench_dim.bench.grid.run_grid` how to run one method: ``build``
an unfitted estimator with ``fit(X, y)`` / ``predict(X)`` for a cell, and optionally
``pretrain`` once per (task, fold) on the fold's label-free pool. Methods sharing a
``pretrain_key`` share the pretrained artefact.

Adapters:

- :class:`EstimatorMethod` wraps any scikit-learn-style estimator (cloned and seeded per cell);
  :func:`baseline_method` builds the baselines of :mod:`matbench_dim.bench.baselines` by name
  (:data:`BASELINE_NAMES`);
- :class:`SiteNetMethod` runs the Site-Net methods through :mod:`matbench_dim.estimator`
  (:data:`SITENET_NAMES`: ``dim``, ``random_init``, ``transfer``, ``dim_rf``, ``random_rf``);
- :func:`make_method` maps a name of :data:`METHOD_NAMES` to its method.

Training callbacks (e.g. an MLflow callback per cell) reach the Site-Net estimators through
:meth:`Method.with_callbacks`; they never change a method's recorded parameters.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from matbench_dim.bench import results as res
from matbench_dim.data.sources import load_task
from matbench_dim.data.task import Task

__all__ = [
    "BAND_GAP_BASELINES",
    "BASELINE_NAMES",
    "DEFAULT_METHODS",
    "METHOD_NAMES",
    "SITENET_NAMES",
    "EstimatorMethod",
    "Method",
    "SiteNetMethod",
    "baseline_method",
    "default_methods",
    "is_band_gap",
    "make_method",
]


class Method:
    """How the grid runs one method. Subclass and override :meth:`build` (and, for methods
    with label-free or supervised pretraining, :meth:`pretrain` and ``pretrain_key``).

    Attributes
    ----------
    name
        Method name used in paths and tables (``rf_magpie``, ``dim``, ...).
    mode
        ``"baseline"``, ``"transfer"`` (fine-tune a network) or ``"representation"``
        (a regressor on frozen vectors).
    pretrain_key
        ``None`` for methods without pretraining. Methods with the same key share one
        pretrained artefact per (task, fold) (``dim`` and ``dim_rf``).
    pretrain_label_free
        True when pretraining reads no label of any target (DIM): the artefact then depends
        only on the fold's training structures and is shared by every target of the task
        whose fold has the same training ids (e.g. a task's formation energy and band gap).
    featurizer
        Name of a :class:`matbench_dim.bench.baselines.FeatureCache` featurizer the method uses;
        the grid computes it once per task entry and shares it with the workers.
    """

    name: str = ""
    mode: str = "baseline"
    pretrain_key: str | None = None
    pretrain_label_free: bool = False
    featurizer: str | None = None

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        """An unfitted estimator with ``fit(X, y)`` and ``predict(X) -> (n,)``.

        ``X`` is a ``pd.Series`` of structures indexed by id; ``pretrained`` is the artefact
        written by :meth:`pretrain` for this fold (``None`` without pretraining).
        """
        raise NotImplementedError

    def pretrain(self, X: pd.Series, path: Path, random_state: int, task: Task, fold: int) -> None:
        """Pretrain on the structures ``X`` (no labels of the task's target) and save to ``path``."""
        raise NotImplementedError(f"method {self.name!r} has no pretraining")

    def get_params(self) -> dict[str, Any]:
        """Hyperparameters to record (JSON-serialisable)."""
        return {}

    def pretrain_params(self) -> dict[str, Any]:
        """The parameters that shape the pretrained artefact (the same for every method
        sharing ``pretrain_key``); recorded in its manifest."""
        return self.get_params()

    def for_run(self, out: Path) -> Method:
        """The method as used by a grid writing to ``out`` (e.g. with a cache folder there)."""
        return self

    def with_callbacks(self, callbacks: Sequence[Any]) -> Method:
        """The method whose estimators also get these training callbacks (per-epoch tracking).

        The default returns ``self`` unchanged: a method without training epochs ignores them.
        """
        return self


def _json_safe(params: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v if isinstance(v, str | int | float | bool | type(None)) else repr(v)
        for k, v in sorted(params.items())
    }


class EstimatorMethod(Method):
    """A method that is a scikit-learn-style estimator, cloned and seeded for every cell.

    Parameters
    ----------
    name
        Method name.
    estimator
        Unfitted estimator with ``fit(X, y)`` / ``predict(X)``; its ``random_state`` (when it
        has one) is set to the cell's seed.
    featurizer
        Descriptor the estimator reads from the shared feature cache (``None``: none).
    """

    def __init__(self, name: str, estimator: Any, featurizer: str | None = None) -> None:
        self.name = name
        self.estimator = estimator
        self.featurizer = featurizer

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        from sklearn.base import clone

        est = clone(self.estimator)
        if "random_state" in est.get_params():
            est.set_params(random_state=random_state)
        return est

    def get_params(self) -> dict[str, Any]:
        params = _json_safe(self.estimator.get_params())
        if "random_state" in params:
            params["random_state"] = "cell seed"
        return {"estimator": type(self.estimator).__name__, **params}


BASELINE_NAMES = ("dummy_mean", "zero", "median", "rf_magpie", "rf_sine_coulomb", "chgnet_rf")
OPTIONAL_METHODS = {"chgnet_rf": "chgnet"}
"""Methods that need an optional package (method -> import name); the grid skips them, with
a message, when the package is not installed."""
SITENET_NAMES = ("dim", "random_init", "transfer", "dim_rf", "random_rf", "dim_ensemble")
METHOD_NAMES = BASELINE_NAMES + SITENET_NAMES
DEFAULT_METHODS = ("dummy_mean", "rf_magpie", "dim", "random_init")
BAND_GAP_BASELINES = ("zero", "median")


def is_band_gap(target: str) -> bool:
    """True for a band-gap target (``"gap"`` in its name: ``gap gllbsc``, ``gap opt``, or the
    task ``matbench_mp_gap``)."""
    return "gap" in target.lower()


def default_methods(target: str) -> list[str]:
    """The grid's default methods for ``target``: :data:`DEFAULT_METHODS`, plus the zero and
    median predictors for a band gap (many gaps are exactly 0, so predicting 0 or the median
    can beat the train-mean dummy and even trained models; a gain must be shown against them)."""
    extra = list(BAND_GAP_BASELINES) if is_band_gap(target) else []
    return [DEFAULT_METHODS[0], *extra, *DEFAULT_METHODS[1:]]


def baseline_method(name: str, **params: Any) -> EstimatorMethod:
    """A baseline of :mod:`matbench_dim.bench.baselines` by method name; ``params`` go to the
    estimator (e.g. ``n_estimators=50``)."""
    from matbench_dim.bench import baselines as bl

    factories: dict[str, tuple[Any, str | None]] = {
        "dummy_mean": (bl.DummyMeanRegressor, None),
        "zero": (bl.ConstantRegressor, None),
        "median": (bl.MedianRegressor, None),
        "rf_magpie": (lambda **kw: bl.FeaturizedForest("magpie", **kw), "magpie"),
        "rf_sine_coulomb": (lambda **kw: bl.FeaturizedForest("sine_coulomb", **kw), "sine_coulomb"),
        "chgnet_rf": (lambda **kw: bl.FeaturizedForest("chgnet", **kw), "chgnet"),
    }
    if name not in factories:
        raise ValueError(f"unknown baseline {name!r}; choose from {', '.join(BASELINE_NAMES)}")
    factory, featurizer = factories[name]
    return EstimatorMethod(name, factory(**params), featurizer)


_RUNTIME_KEYS = frozenset({"cache_dir", "n_jobs", "verbose", "callbacks"})
"""Estimator parameters that do not change a pretrained encoder (left out of its key)."""


class SiteNetMethod(Method):
    """Site-Net methods through :mod:`matbench_dim.estimator`.

    ``dim``: DIM-pretrain once per fold on the unlabelled pool, fine-tune on the n labels;
    ``random_init``: fine-tune from random weights; ``transfer``: supervised pretraining on
    ``transfer_target`` (the fold's training entries labelled with it), then fine-tune;
    ``dim_rf`` / ``random_rf``: a random forest (200 trees, seeded) on frozen global vectors of
    the DIM-pretrained / randomly initialised encoder; ``dim_ensemble``: ``n_members``
    fine-tunes from the same DIM encoder as ``dim`` (:class:`~matbench_dim.ensemble.SiteNetDIMEnsemble`;
    its member 0 is the ``dim`` cell), predicting the mean and the members' std.

    Parameters
    ----------
    name
        One of :data:`SITENET_NAMES`.
    estimator_params
        ``SiteNetDIMRegressor`` / ``DIMEmbedder`` keywords (``pretrain__epochs``, ...).
        Keywords the embedder does not take (``finetune__*``, ``mode``) are not passed to it.
    transfer_target
        Target of the same task used for ``transfer`` pretraining (e.g. ``"gap"``).
    n_estimators
        Trees of the representation forests.
    """

    def __init__(
        self,
        name: str,
        estimator_params: dict[str, Any] | None = None,
        transfer_target: str | None = None,
        n_estimators: int = 200,
        n_members: int = 5,
    ) -> None:
        if name not in SITENET_NAMES:
            raise ValueError(f"unknown Site-Net method {name!r}; choose from {SITENET_NAMES}")
        if name == "transfer" and not transfer_target:
            raise ValueError(
                "method 'transfer' needs transfer_target (the property to pretrain on)"
            )
        self.name = name
        self.estimator_params = dict(estimator_params or {})
        self.transfer_target = transfer_target
        self.n_estimators = n_estimators
        self.n_members = n_members
        self.mode = "representation" if name.endswith("_rf") else "transfer"
        self.cache_dir: str | None = None
        self.callbacks: list[Any] = []
        semantic = {k: v for k, v in self.estimator_params.items() if k not in _RUNTIME_KEYS}
        digest = hashlib.sha256(
            json.dumps(_json_safe(semantic), sort_keys=True).encode()
        ).hexdigest()[:10]
        self.pretrain_label_free = name in ("dim", "dim_rf", "dim_ensemble")
        if name in ("dim", "dim_rf", "dim_ensemble"):
            self.pretrain_key = f"dim-{digest}"
        elif name == "transfer":
            self.pretrain_key = f"transfer-{res.safe_name(transfer_target or '')}-{digest}"
        else:
            self.pretrain_key = None

    def for_run(self, out: Path) -> SiteNetMethod:
        """A copy whose estimators cache featurized crystals under ``out/cache`` (unless the
        estimator parameters name a ``cache_dir``), so each crystal is featurized once per run."""
        method = copy.copy(self)
        if "cache_dir" not in self.estimator_params:
            method.cache_dir = str(Path(out) / "cache")
        return method

    def with_callbacks(self, callbacks: Sequence[Any]) -> SiteNetMethod:
        """A copy whose estimators get ``callbacks`` after those of ``estimator_params``."""
        method = copy.copy(self)
        method.callbacks = list(callbacks)
        return method

    def _params(self, cls: type, random_state: int, **extra: Any) -> dict[str, Any]:
        accepted = cls().get_params(deep=False)
        kw = {k: v for k, v in self.estimator_params.items() if k in accepted}
        if self.cache_dir is not None:
            kw["cache_dir"] = self.cache_dir
        if self.callbacks and "callbacks" in accepted:
            own = kw.get("callbacks")
            own = [] if own is None else list(own) if isinstance(own, list | tuple) else [own]
            kw["callbacks"] = [*own, *self.callbacks]
        unknown = set(self.estimator_params) - set(accepted)
        if unknown and cls.__name__ == "SiteNetDIMRegressor":
            raise ValueError(f"{self.name}: unknown estimator parameters {sorted(unknown)}")
        return {**kw, "random_state": random_state, **extra}

    def pretrain(self, X: pd.Series, path: Path, random_state: int, task: Task, fold: int) -> None:
        from matbench_dim.bench.subsets import check_disjoint  # the grid's own leak check
        from matbench_dim.estimator import SiteNetDIMRegressor
        from matbench_dim.pretrained import PretrainedEncoder

        kw = self._params(SiteNetDIMRegressor, random_state)
        if self.pretrain_label_free:
            SiteNetDIMRegressor(**kw).pretrain(X).save_encoder(path)
            return
        other = load_task(task.name, target=self.transfer_target)
        if other.targets is None:
            raise ValueError(
                f"task {task.name}: no labels for transfer target {self.transfer_target!r}"
            )
        ids = [i for i in X.index if i in other.targets.index]
        check_disjoint(
            ids,
            task.test_ids(fold),
            stage="transfer pretraining",
            where=f"task {task.name} fold {fold}",
        )
        if not ids:
            raise ValueError(
                f"task {task.name} fold {fold}: no pretraining entry has {self.transfer_target!r}"
            )
        est = SiteNetDIMRegressor(**kw, random_init=True).fit(  # supervised, from random weights
            X.loc[ids], other.targets.loc[ids].to_numpy(dtype=float)
        )
        info = {"transfer_target": other.target_name, "n_pretrain": len(ids)}
        PretrainedEncoder.from_module(est.model_.encoder, info).save(path)

    def build(self, random_state: int, pretrained: Path | None) -> Any:
        from sklearn.ensemble import RandomForestRegressor
        from sklearn.pipeline import Pipeline

        from matbench_dim.embedder import DIMEmbedder
        from matbench_dim.estimator import SiteNetDIMRegressor

        if self.pretrain_key is not None and pretrained is None:
            raise ValueError(f"method {self.name!r} needs its pretrained encoder")
        init = None if pretrained is None else str(pretrained)
        if self.name == "dim_ensemble":
            from matbench_dim.ensemble import SiteNetDIMEnsemble

            member = SiteNetDIMRegressor(
                **self._params(SiteNetDIMRegressor, random_state, encoder_init=init)
            )
            return SiteNetDIMEnsemble(member, n_members=self.n_members)
        if self.mode == "transfer":
            return SiteNetDIMRegressor(
                **self._params(
                    SiteNetDIMRegressor, random_state, encoder_init=init, random_init=init is None
                )
            )
        embed_kw = self._params(
            DIMEmbedder, random_state, encoder_init=init, random_init=init is None
        )
        forest = RandomForestRegressor(
            n_estimators=self.n_estimators, random_state=random_state, n_jobs=1
        )
        return Pipeline([("embed", DIMEmbedder(**embed_kw)), ("rf", forest)])

    def pretrain_params(self) -> dict[str, Any]:
        semantic = {k: v for k, v in self.estimator_params.items() if k not in _RUNTIME_KEYS}
        out = {"estimator_params": _json_safe(semantic), "pretrain_key": self.pretrain_key}
        if self.transfer_target:
            out["transfer_target"] = self.transfer_target
        return out

    def get_params(self) -> dict[str, Any]:
        out = {
            "estimator_params": _json_safe(self.estimator_params),
            "pretrain_key": self.pretrain_key,
        }
        if self.transfer_target:
            out["transfer_target"] = self.transfer_target
        if self.mode == "representation":
            out["n_estimators"] = self.n_estimators
        if self.name == "dim_ensemble":
            out["n_members"] = self.n_members
        return out


def make_method(name: str | Method, **params: Any) -> Method:
    """A :class:`Method` from its name (:data:`METHOD_NAMES`); a ``Method`` is returned as is.

    ``params`` go to :func:`baseline_method` (estimator keywords) or :class:`SiteNetMethod`
    (``estimator_params``, ``transfer_target``, ``n_estimators``).
    """
    if isinstance(name, Method):
        return name
    if name in BASELINE_NAMES:
        return baseline_method(name, **params)
    if name in SITENET_NAMES:
        return SiteNetMethod(name, **params)
    raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHOD_NAMES)}")
