"""Tiny Site-Net settings shared by the tests: real code paths, seconds of CPU."""

from __future__ import annotations

from matbench_dim.model.dim import DIMConfig
from matbench_dim.model.sitenet import EncoderConfig

TINY: dict = {
    "device": "cpu",
    "encoder__site_dim": 16,
    "encoder__pair_dim": 16,
    "encoder__attention_hidden": 16,
    "encoder__local_dim": 8,
    "encoder__global_hidden": 16,
    "encoder__global_dim": 8,
    "encoder__activation": "silu",
    "dim__critic_dim": 16,
    "dim__critic_hidden": 16,
    "pretrain__epochs": 2,
    "pretrain__batch_sites": 150,
    "finetune__epochs": 6,
    "finetune__batch_sites": 150,
    "finetune__patience": 0,
}
"""Estimator keywords for :class:`~matbench_dim.estimator.SiteNetDIMRegressor`."""

EMBEDDER_TINY: dict = {k: v for k, v in TINY.items() if not k.startswith("finetune")}
"""The same for :class:`~matbench_dim.embedder.DIMEmbedder` (no fine-tuning keywords)."""

TINY_PRETRAIN: dict = {
    **{k: v for k, v in EMBEDDER_TINY.items() if k != "pretrain__epochs"},
    "pretrain__val_fraction": 0.2,
    "pretrain__patience": 0,
}
"""Pretraining-only settings; the caller chooses the number of epochs."""

SMALL_ENCODER = EncoderConfig(
    site_dim=32,
    pair_dim=32,
    attention_hidden=32,
    local_dim=16,
    global_hidden=32,
    global_dim=16,
    activation="silu",
)
"""A small encoder for the loop tests that must learn something in seconds."""
SMALL_DIM = DIMConfig(critic_dim=32, critic_hidden=32)
"""The critics matching :data:`SMALL_ENCODER`."""
