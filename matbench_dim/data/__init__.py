"""Tasks and where they come from (the bottom of the pipeline).

- :mod:`~matbench_dim.data.task`: :class:`~matbench_dim.data.task.Task` (structures,
  targets, folds) and the builders from in-memory data; imports nothing else of the package;
- :mod:`~matbench_dim.data.sources`: matbench tasks, local matminer files, the shipped
  samples, the data search path and :func:`~matbench_dim.data.sources.load_task`;
- :mod:`~matbench_dim.data.cif`: a folder or zip of CIFs plus a CSV of targets;
- :mod:`~matbench_dim.data.make_samples`: rebuilds ``samples/`` (small real data shipped
  with the package; ``samples/SAMPLES.json`` records their sources and hashes).
"""
