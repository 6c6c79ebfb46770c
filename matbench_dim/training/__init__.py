"""Training loops (DIM pretraining, supervised fine-tuning, checkpoints) and their callbacks.

- :mod:`~matbench_dim.training.callbacks`: the :class:`Callback` protocol, early stopping;
- :mod:`~matbench_dim.training.loops`: :func:`pretrain_dim`, fine-tuning, checkpoints.

Tracking, pruning and checkpoints reach the loops as callbacks only: nothing here imports
MLflow, Optuna or matbench.
"""
