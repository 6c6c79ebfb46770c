"""MLflow tracking, an adapter at the edge (the model and the loops never import MLflow).

- :mod:`~matbench_dim.tracking.store`: where runs go (tracking URI, default store);
- :mod:`~matbench_dim.tracking.runs`: what a run records (:class:`TrackedRun`,
  :class:`MLflowCallback`, params and provenance helpers);
- :mod:`~matbench_dim.tracking.pyfunc`: the CIF-in MLflow pyfunc model;
- :mod:`~matbench_dim.tracking.tracker`: :class:`Tracker` (opening and ending runs),
  :func:`setup_tracking`, stale-run cleanup, artifact downloads.
"""
