"""Deep InfoMax pretraining of the Site-Net crystal encoder, as a scikit-learn estimator that
runs inside the matbench benchmark.

The public API is re-exported here and imported lazily on first use, so ``import
matbench_dim`` stays fast (torch, pymatgen, matbench and MLflow load only when needed)::

    from matbench_dim import SiteNetDIMRegressor, load_task, run_grid

- estimators: :class:`SiteNetDIMRegressor` (:mod:`matbench_dim.estimator`),
  :class:`DIMEmbedder` (:mod:`matbench_dim.embedder`), :class:`PretrainedEncoder`
  (:mod:`matbench_dim.pretrained`);
- data: :class:`Task`, :func:`task_from_structures` (:mod:`matbench_dim.data.task`),
  :func:`load_task` (:mod:`matbench_dim.data.sources`), :func:`load_cif_dataset`
  (:mod:`matbench_dim.data.cif`);
- the label-masking benchmark: :func:`run_grid` (:mod:`matbench_dim.bench.grid`),
  :func:`make_method` (:mod:`matbench_dim.bench.methods`), :func:`draw_subset`
  (:mod:`matbench_dim.bench.subsets`) and :func:`write_report` (:mod:`matbench_dim.bench.report`);
- tracking: :func:`setup_tracking`, :func:`download_encoder` (:mod:`matbench_dim.tracking.tracker`).

The package is laid out by pipeline stage (``docs/architecture.md``): ``data/`` ->
``features/`` -> ``model/`` -> ``training/`` -> ``estimator.py`` -> ``bench/``,
``tracking/``, ``tuning/`` -> ``cli/``; imports point down that list only.
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import TYPE_CHECKING, Any

try:
    __version__ = metadata.version("matbench-dim")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

_EXPORTS: dict[str, str] = {
    "SiteNetDIMRegressor": "matbench_dim.estimator",
    "DIMEmbedder": "matbench_dim.embedder",
    "PretrainedEncoder": "matbench_dim.pretrained",
    "SiteNetDIMEnsemble": "matbench_dim.ensemble",
    "Task": "matbench_dim.data.task",
    "load_task": "matbench_dim.data.sources",
    "load_cif_dataset": "matbench_dim.data.cif",
    "task_from_structures": "matbench_dim.data.task",
    "task_from_dataframe": "matbench_dim.data.task",
    "run_grid": "matbench_dim.bench.grid",
    "make_method": "matbench_dim.bench.methods",
    "draw_subset": "matbench_dim.bench.subsets",
    "write_report": "matbench_dim.bench.report",
    "setup_tracking": "matbench_dim.tracking.tracker",
    "download_encoder": "matbench_dim.tracking.tracker",
}

__all__ = [
    "DIMEmbedder",
    "PretrainedEncoder",
    "SiteNetDIMEnsemble",
    "SiteNetDIMRegressor",
    "Task",
    "__version__",
    "download_encoder",
    "draw_subset",
    "load_cif_dataset",
    "load_task",
    "make_method",
    "run_grid",
    "setup_tracking",
    "task_from_dataframe",
    "task_from_structures",
    "write_report",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time names load on first access
    from matbench_dim.bench.grid import run_grid
    from matbench_dim.bench.methods import make_method
    from matbench_dim.bench.report import write_report
    from matbench_dim.bench.subsets import draw_subset
    from matbench_dim.data.cif import load_cif_dataset
    from matbench_dim.data.sources import load_task
    from matbench_dim.data.task import Task, task_from_dataframe, task_from_structures
    from matbench_dim.embedder import DIMEmbedder
    from matbench_dim.ensemble import SiteNetDIMEnsemble
    from matbench_dim.estimator import SiteNetDIMRegressor
    from matbench_dim.pretrained import PretrainedEncoder
    from matbench_dim.tracking.tracker import download_encoder, setup_tracking


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'matbench_dim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
