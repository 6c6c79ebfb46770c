"""Structure -> tensor code, apart from the model: site features, supercells, records, cache.

- :mod:`~matbench_dim.features.elements`: scaled elemental site features;
- :mod:`~matbench_dim.features.supercell`: primitive cell and near-cubic supercell geometry;
- :mod:`~matbench_dim.features.featurize`: :class:`CrystalRecord`, batching, :func:`featurize`;
- :mod:`~matbench_dim.features.cache`: the sharded on-disk record cache.

Imports nothing of matbench, Optuna, MLflow or the CLI.
"""
