"""Optuna tuning per task and labelled-subset size, inside one matbench training fold.

Pieces, from the inside out (one submodule each):

- **Search spaces** (:mod:`.spaces`; default files ship in ``matbench_dim/tuning/spaces/``,
  linked from the repository's ``tuning/spaces``; a ``./tuning/spaces`` folder of your own
  takes precedence; one file per model family): declarative entries ``{"name", "type", "low", "high", "log", "step",
  "choices", "default"}`` whose names are the estimator's flat parameter names;
  :func:`load_spaces` validates them and the defaults (the seed's published values) become the
  first enqueued trial of a new study.
- **Objective** (:mod:`.objective`, :class:`InnerCVObjective`): labelled subsets of ``n``
  crystals drawn from the fold's *training* data only, K-fold inner cross-validation on each,
  metric = mean inner-validation MAE. DIM pretraining on the fold's training structures
  (labels unused) is reused across trials through :class:`EncoderCache`
  (:mod:`.encoder_cache`) when the pretraining parameters are the same.
- **Pruning** (:mod:`.pruning`, :class:`OptunaPruningCallback`): a training callback that
  reports the estimator's per-epoch validation loss to the trial; the estimator never imports
  Optuna.
- **Storage and workers** (:mod:`.storage`, :func:`resolve_storage`): SQLite by default, a
  journal file (``journal:///path``) for parallel workers on one machine, an RDB URL
  (PostgreSQL) for several machines. Killed workers do not stall a study: RDB storages use
  Optuna's heartbeat, and :class:`HeartbeatJournalStorage` adds the same heartbeat to the
  journal file.
- :func:`tune` (:mod:`.study`) ties them together; :func:`export_best` /
  :func:`load_best_params` (:mod:`.export`) write and read ``tuning/best/<task>_n<N>.json``
  for the benchmark protocol.

Default paths (``tuning/optuna.db``, ``tuning/cache``, ``tuning/best``) are relative to the
working directory, i.e. the repository root's ``tuning/`` folder when run
from there.
"""

from __future__ import annotations

from matbench_dim.tuning._common import FINETUNE_ONLY_PREFIXES, NOT_EXPORTED, RUN_ONLY_PARAMS
from matbench_dim.tuning.encoder_cache import DEFAULT_CACHE_DIR, EncoderCache
from matbench_dim.tuning.export import (
    DEFAULT_BEST_DIR,
    best_params_path,
    export_best,
    load_best_params,
    study_name_for,
)
from matbench_dim.tuning.objective import InnerCVObjective, InnerSplit, inner_splits
from matbench_dim.tuning.pruning import OptunaPruningCallback, make_pruner
from matbench_dim.tuning.spaces import (
    DEFAULT_SPACES,
    ParamSpec,
    SearchSpace,
    SpaceError,
    default_space_dir,
    load_space,
    load_spaces,
)
from matbench_dim.tuning.storage import DEFAULT_STORAGE, HeartbeatJournalStorage, resolve_storage
from matbench_dim.tuning.study import tune

__all__ = [
    "DEFAULT_BEST_DIR",
    "DEFAULT_CACHE_DIR",
    "DEFAULT_SPACES",
    "DEFAULT_STORAGE",
    "FINETUNE_ONLY_PREFIXES",
    "NOT_EXPORTED",
    "RUN_ONLY_PARAMS",
    "EncoderCache",
    "HeartbeatJournalStorage",
    "InnerCVObjective",
    "InnerSplit",
    "OptunaPruningCallback",
    "ParamSpec",
    "SearchSpace",
    "SpaceError",
    "best_params_path",
    "default_space_dir",
    "export_best",
    "inner_splits",
    "load_best_params",
    "load_space",
    "load_spaces",
    "make_pruner",
    "resolve_storage",
    "study_name_for",
    "tune",
]
