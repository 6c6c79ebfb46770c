"""Label-free pretraining monitors: per-negative critic accuracies and effective ranks."""

from __future__ import annotations

import math

import mlflow
import numpy as np
import pytest
import torch
from test_dim_losses import random_views

from matbench_dim.features.featurize import collate, featurize
from matbench_dim.model.dim import DIMConfig, GlobalDIMLoss, LocalDIMLoss, participation_ratio
from matbench_dim.model.negatives import GLOBAL_FALSE_LOCALS, LOCAL_NEGATIVES
from matbench_dim.model.sitenet import EncoderConfig, SiteNetEncoder
from matbench_dim.tracking.tracker import setup_tracking
from matbench_dim.training.common import OptimizerConfig, split_train_val
from matbench_dim.training.pretrain import PretrainConfig, pretrain_dim

ENC = EncoderConfig(
    site_dim=16,
    pair_dim=16,
    attention_hidden=16,
    local_dim=8,
    global_hidden=16,
    global_dim=8,
    activation="silu",
)
DIM = DIMConfig(critic_dim=16, critic_hidden=16)
ACC_KEYS = [f"acc_local_{k}" for k in ("pos", *LOCAL_NEGATIVES)] + [
    f"acc_global_{k}" for k in ("pos", "neg_other", *GLOBAL_FALSE_LOCALS)
]


def slow_participation_ratio(x):
    """Eigenvalues of numpy's covariance, then (sum l)^2 / sum l^2."""
    lam = np.linalg.eigvalsh(np.cov(np.asarray(x, dtype=np.float64), rowvar=False))
    return lam.sum() ** 2 / (lam**2).sum()


@pytest.mark.parametrize(("n", "d", "seed"), [(2, 3, 0), (5, 8, 1), (40, 8, 2), (300, 32, 3)])
def test_participation_ratio_matches_eigenvalue_reference(n, d, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d) * 5
    want = slow_participation_ratio(x)
    assert participation_ratio(x) == pytest.approx(want, rel=1e-10)
    assert participation_ratio(torch.tensor(x, dtype=torch.float32)) == pytest.approx(
        want, rel=1e-4
    )
    # invariant to a rotation, a global scale and a shift; between 1 and min(n - 1, d)
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    assert participation_ratio(3.0 * x @ q + 7.0) == pytest.approx(want, rel=1e-8)
    assert 1.0 - 1e-9 <= want <= min(n - 1, d) + 1e-9


def test_participation_ratio_known_values():
    rng = np.random.default_rng(0)
    assert participation_ratio(rng.normal(size=(20000, 6))) == pytest.approx(6.0, rel=0.01)
    line = rng.normal(size=(50, 1)) * rng.normal(size=(1, 5))
    assert participation_ratio(line) == pytest.approx(1.0)
    two = np.zeros((100, 4))
    two[:, :2] = rng.choice([-1.0, 1.0], size=(100, 2))
    assert participation_ratio(two) == pytest.approx(slow_participation_ratio(two))
    assert math.isnan(participation_ratio(np.ones((1, 3))))
    assert math.isnan(participation_ratio(np.ones((4, 3))))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        participation_ratio(np.ones(3))


def test_local_accuracy_parts_add_up():
    torch.manual_seed(0)
    z, pos, negs, row_crystal = random_views()
    out = LocalDIMLoss(7, 5, critic_dim=8, critic_hidden=6)(z, pos, negs, row_crystal)
    assert list(out.parts) == ["pos", *LOCAL_NEGATIVES]
    negs_mean = sum(out.parts[k] for k in LOCAL_NEGATIVES) / 3
    torch.testing.assert_close(out.accuracy, 0.5 * (out.parts["pos"] + negs_mean))


def test_global_accuracy_parts_add_up():
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    loss = GlobalDIMLoss(4, 5, critic_dim=8, critic_hidden=6)
    z = torch.randn(4, 3, 5, generator=g)
    false_locals = [(torch.randn(4, 3, 5, generator=g), mask) for _ in range(3)]
    out = loss(torch.randn(4, 4, generator=g), z, mask, false_locals)
    assert list(out.parts) == ["pos", "neg_other", *GLOBAL_FALSE_LOCALS]
    negs = ["neg_other", *GLOBAL_FALSE_LOCALS]
    negs_mean = sum(out.parts[k] for k in negs) / 4
    torch.testing.assert_close(out.accuracy, 0.5 * (out.parts["pos"] + negs_mean))
    for v in out.parts.values():
        assert 0.0 <= float(v) <= 1.0


@pytest.fixture(scope="module")
def records(flla_sample_task):
    return featurize(list(flla_sample_task.structures)[:80], progress=False)


def run(records, epochs=2, **kw):
    return pretrain_dim(
        records,
        encoder_cfg=ENC,
        dim_cfg=DIM,
        optimizer_cfg=OptimizerConfig(lr=1e-3),
        cfg=PretrainConfig(epochs=epochs, batch_sites=150, val_fraction=0.25, patience=0),
        seed=3,
        **kw,
    )


def test_monitors_are_in_every_epochs_logs(records):
    res = run(records)
    keys = {f"{p}_{k}" for p in ("train", "val") for k in ACC_KEYS}
    keys |= {"val_pr_local", "val_pr_global", "ref_pr_local", "ref_pr_global"}
    for h in res.history:
        assert keys <= set(h), keys - set(h)
        for k in keys:
            assert math.isfinite(h[k]), k
        for k in ACC_KEYS:
            assert 0.0 <= h[f"val_{k}"] <= 1.0
        assert 1.0 <= h["val_pr_local"] <= ENC.local_dim + 1e-9
        assert 1.0 <= h["val_pr_global"] <= ENC.global_dim + 1e-9
    # the reference: the seeded random encoder on the validation slice, the same each epoch
    assert len({(h["ref_pr_local"], h["ref_pr_global"]) for h in res.history}) == 1
    torch.manual_seed(3)
    fresh = SiteNetEncoder(ENC).eval()
    _, val_idx = split_train_val(len(records), 0.25, 3)
    with torch.no_grad():
        out = fresh(collate(records, val_idx))
    assert res.history[0]["ref_pr_local"] == pytest.approx(
        participation_ratio(out.local_mu[out.site_mask]), rel=1e-5
    )
    assert res.history[0]["ref_pr_global"] == pytest.approx(
        participation_ratio(out.global_mu), rel=1e-5
    )
    assert res.extra["reference"] == {
        "ref_pr_local": res.history[0]["ref_pr_local"],
        "ref_pr_global": res.history[0]["ref_pr_global"],
    }


def test_monitors_reach_mlflow(records, store):
    tracker = setup_tracking(store, "monitors")
    with tracker.start_parent_run("pretrain") as parent:
        res = run(records, callbacks=[parent.callback(flush_every_s=0.0)])
    client = mlflow.MlflowClient(tracker.tracking_uri)
    for key in ("val_pr_local", "ref_pr_global", "val_acc_global_neg_permuted"):
        history = sorted(
            client.get_metric_history(parent.run_id, f"pretrain/{key}"), key=lambda m: m.step
        )
        assert [m.step for m in history] == [0, 1]
        assert [m.value for m in history] == pytest.approx([h[key] for h in res.history])
