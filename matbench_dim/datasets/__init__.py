"""Data files shipped with matbench-dim, and the readers of each data source.

- ``matbench_jdft2d.json.gz``: the full matbench_jdft2d task (read by matbench itself);
- ``*_sample.json.gz``: small deterministic samples of real data sets (``SAMPLES.json``
  records their source files, hashes and selection rules; ``make_samples.py`` rebuilds them);
- :mod:`~matbench_dim.datasets.sources`: matbench tasks, local matminer files, samples;
- :mod:`~matbench_dim.datasets.cif`: a folder or zip of CIFs plus a CSV of targets.

Use them through :mod:`matbench_dim.data`, which re-exports the public functions.
"""
