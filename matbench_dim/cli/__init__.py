"""The ``matbench-dim`` command line: :mod:`~matbench_dim.cli.app` (the commands) and
:mod:`~matbench_dim.cli.support` (argument parsing and loading helpers shared by them)."""
