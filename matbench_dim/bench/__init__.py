"""The label-masking benchmark: protocol rules, baselines, methods, cells, grid and report.

Layered bottom-up (each module imports only those before it):

- :mod:`~matbench_dim.bench.subsets`: the protocol's rules (labelled subsets, pretraining
  pools, the leak check);
- :mod:`~matbench_dim.bench.results`: a cell's key and result files;
  :mod:`~matbench_dim.bench.baselines`, :mod:`~matbench_dim.bench.matbench_io`;
- :mod:`~matbench_dim.bench.methods`: method adapters around the estimators;
- :mod:`~matbench_dim.bench.report` and :mod:`~matbench_dim.bench.recording` (matbench files
  and MLflow runs of a grid);
- :mod:`~matbench_dim.bench.cells`: one cell's work; :mod:`~matbench_dim.bench.grid`:
  :func:`~matbench_dim.bench.grid.run_grid`, the scheduler.
"""
