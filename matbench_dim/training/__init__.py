"""Training loops (DIM pretraining, supervised fine-tuning, checkpoints) and their callbacks.

- :mod:`~matbench_dim.training.callbacks`: the :class:`Callback` protocol, early stopping;
- :mod:`~matbench_dim.training.common`: what both loops share (optimiser settings, seeded
  batches, the train / validation split, clipping, fingerprints);
- :mod:`~matbench_dim.training.pretrain`: :func:`pretrain_dim`, its label-free monitors,
  stopping rules and checkpoints;
- :mod:`~matbench_dim.training.finetune`: fine-tuning, prediction, frozen embeddings.

Tracking, pruning and checkpoints reach the loops as callbacks only: nothing here imports
MLflow, Optuna or matbench.
"""
