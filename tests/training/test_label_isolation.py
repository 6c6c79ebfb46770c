"""Labels never reach the DIM encoder (issue 17): the property probe only watches.

The probe is trained on detached ``G``, but a gradient-norm clip shared by every optimiser
would let its (label-driven) gradients rescale the DIM steps. Each stage is clipped on its
own, so the encoder, the pretraining history's DIM losses and the best epoch are bitwise
the same whatever the probe targets are.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_settings import TINY

from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.features.featurize import featurize
from matbench_dim.model.dim import DIMConfig
from matbench_dim.model.sitenet import EncoderConfig
from matbench_dim.training.common import OptimizerConfig
from matbench_dim.training.pretrain import PretrainConfig, pretrain_dim

TINY_ENC = EncoderConfig(
    site_dim=16,
    pair_dim=16,
    attention_hidden=16,
    local_dim=8,
    global_hidden=16,
    global_dim=8,
    activation="silu",
)
TINY_DIM = DIMConfig(critic_dim=16, critic_hidden=16)


@pytest.fixture(scope="module")
def flla(flla_sample_task):
    structures = list(flla_sample_task.structures)[:120]
    y = np.asarray(flla_sample_task.targets, dtype=float)[:120]
    return featurize(structures, progress=False), y, structures


def assert_same_encoder(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def dim_history(res):
    """The DIM logs of each epoch; the probes' own losses are left out (the probes share one
    optimiser, so the label probe may rescale the label-free probes' steps: they only
    watch, and never reach the encoder)."""
    return [
        {k: v for k, v in h.items() if "probe_" not in k and k != "epoch_time_s"}
        for h in res.history
    ]


@pytest.mark.parametrize("grad_clip", [10.0, 0.5])
def test_encoder_is_bitwise_independent_of_probe_targets(flla, grad_clip):
    records, y, _ = flla
    half = y.copy()
    half[::2] = np.nan

    def run(targets):
        return pretrain_dim(
            records,
            encoder_cfg=TINY_ENC,
            dim_cfg=TINY_DIM,
            optimizer_cfg=OptimizerConfig(lr=1e-3),
            cfg=PretrainConfig(
                epochs=3, batch_sites=150, val_fraction=0.2, patience=0, grad_clip=grad_clip
            ),
            seed=0,
            probe_targets=targets,
        )

    labels = run(y)
    assert "train_probe_property" in labels.history[-1]  # the probe did train on the labels
    for other in (run(np.random.default_rng(0).permutation(y)), run(half), run(None)):
        assert_same_encoder(labels.encoder, other.encoder)
        assert other.best_epoch == labels.best_epoch
        assert dim_history(other) == dim_history(labels)


def test_best_pretraining_epoch_ignores_permuted_probe_targets(flla):
    """With a validation split and a patience rule on, the selected epoch, the number of
    epochs run and the selected weights are the same for the labels and a permutation."""
    records, y, _ = flla

    def run(targets):
        return pretrain_dim(
            records,
            encoder_cfg=TINY_ENC,
            dim_cfg=TINY_DIM,
            optimizer_cfg=OptimizerConfig(lr=3e-3),
            cfg=PretrainConfig(epochs=4, batch_sites=150, val_fraction=0.2, patience=2),
            seed=1,
            probe_targets=targets,
        )

    ref = run(y)
    other = run(np.random.default_rng(1).permutation(y))
    assert other.best_epoch == ref.best_epoch
    assert len(other.history) == len(ref.history)
    assert [h["val_dim_loss"] for h in other.history] == [h["val_dim_loss"] for h in ref.history]
    assert_same_encoder(ref.encoder, other.encoder)


def test_fit_with_hidden_labels_pretrains_as_label_free_pretrain(flla):
    """``fit(X, y, X_unlabeled)`` hands ``y`` to the probe only: its DIM encoder equals the
    one ``pretrain`` learns from the same pool without any label."""
    _, y, structures = flla
    x, x_unl = structures[:20], structures[20:60]
    fitted = SiteNetDIMRegressor(**TINY).fit(x, y[:20], X_unlabeled=x_unl)
    free = SiteNetDIMRegressor(**TINY).pretrain(x + x_unl)
    shuffled = SiteNetDIMRegressor(**TINY).pretrain(
        x + x_unl, y_probe=np.random.default_rng(0).permutation(y[:60])
    )
    enc = fitted.pretrained_encoder_.build()
    assert_same_encoder(enc, free.pretrained_encoder_.build())
    assert_same_encoder(enc, shuffled.pretrained_encoder_.build())
    assert (
        fitted.pretrained_encoder_.info["best_epoch"] == free.pretrained_encoder_.info["best_epoch"]
    )
