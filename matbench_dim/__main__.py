"""``python -m matbench_dim ...`` runs the ``matbench-dim`` command line."""

from matbench_dim.cli.app import main

if __name__ == "__main__":
    main()
