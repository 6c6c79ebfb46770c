"""Helpers shared by the tuning modules: parameter classes, JSON-safe values, names.

Parameters are the estimator's flat keyword names (``optimizer__lr``, ``finetune__epochs``).
:data:`FINETUNE_ONLY_PREFIXES` and :data:`RUN_ONLY_PARAMS` never change what pretraining
produces (everything else keys the encoder cache); :data:`NOT_EXPORTED` are left out of the
exported best parameters.
"""

from __future__ import annotations

import inspect
import json
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import optuna
from optuna.trial import TrialState

__all__ = [
    "FINETUNE_ONLY_PREFIXES",
    "HOST",
    "NOT_EXPORTED",
    "RUN_ONLY_PARAMS",
    "accepts",
    "count_trials",
    "default_factory",
    "jsonable",
    "keyword_defaults",
    "slug",
]

# Parameters that never change what pretraining produces (everything else keys the cache).
FINETUNE_ONLY_PREFIXES = ("finetune__", "head__")
RUN_ONLY_PARAMS = frozenset(
    {"callbacks", "encoder_init", "device", "n_jobs", "cache_dir", "verbose", "mode"}
)
# Left out of exported parameters: run plumbing and the seed (the protocol sets its own).
NOT_EXPORTED = (RUN_ONLY_PARAMS - {"mode"}) | {"random_state"}
HOST = socket.gethostname()  # names workers (``host:pid``) and their temporary files


def accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether ``factory`` takes a keyword ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def keyword_defaults(factory: Callable[..., Any]) -> dict[str, Any]:
    """Default values of ``factory``'s parameters that have one."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` without the values JSON cannot hold (numpy scalars become Python ones)."""
    out = {}
    for k, v in params.items():
        if isinstance(v, np.generic):
            v = v.item()
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def slug(part: Any) -> str:
    """``part`` as a file- and study-name-safe string (runs of other characters become ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", str(part)).strip("_") or "x"


def count_trials(study: optuna.Study, states: Sequence[TrialState]) -> int:
    """Number of trials of ``study`` in one of ``states``."""
    return len(study.get_trials(deepcopy=False, states=tuple(states)))


def default_factory() -> Callable[..., Any]:
    """The estimator class tuned by default (imported lazily: it pulls in torch)."""
    from matbench_dim.estimator import SiteNetDIMRegressor

    return SiteNetDIMRegressor
