"""Mixed precision: float32 on CPU by default (bit-identical to no autocast), bf16 / fp16
autocast paths that run and stay close, and the CUDA choice where a GPU is present."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_settings import TINY

from matbench_dim.data.sources import load_task
from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.training.precision import mixed_precision, to_device


def test_choice_per_device_and_setting():
    assert mixed_precision("cpu").name == "fp32"  # auto on CPU
    assert mixed_precision("cpu", "fp32").scaler is None
    bf16 = mixed_precision("cpu", "bf16")
    assert (bf16.dtype, bf16.scaler) == (torch.bfloat16, None)
    fp16 = mixed_precision("cpu", "fp16")
    assert fp16.dtype == torch.float16
    assert isinstance(fp16.scaler, torch.amp.GradScaler)
    with pytest.raises(ValueError, match="precision must be one of"):
        mixed_precision("cpu", "int8")


@pytest.fixture(scope="module")
def small():
    task = load_task("sample:flla")
    X, y = task.train_data(0)
    return X.iloc[:40], y.iloc[:40], task.test_inputs(0).iloc[:20]


def test_auto_on_cpu_is_bitwise_float32_and_autocast_paths_run(small):
    X, y, X_test = small
    fp32 = SiteNetDIMRegressor(**TINY, precision="fp32").fit(X, y).predict(X_test)
    auto = SiteNetDIMRegressor(**TINY).fit(X, y).predict(X_test)
    np.testing.assert_array_equal(auto, fp32)
    spread = float(np.std(y))
    for p in ("bf16", "fp16"):
        low = SiteNetDIMRegressor(**TINY, precision=p).fit(X, y).predict(X_test)
        assert np.isfinite(low).all()
        assert not np.array_equal(low, fp32)  # autocast did change the arithmetic
        assert np.abs(low - fp32).max() < 0.25 * spread
    with pytest.raises(ValueError, match="precision must be one of"):
        SiteNetDIMRegressor(**TINY, precision="half").fit(X, y)


def test_batches_stay_where_they_are_on_cpu(small):
    from matbench_dim.features.featurize import collate, featurize

    records = featurize(list(small[0].iloc[:3]), progress=False)
    batch = collate(records, [0, 1, 2])
    moved = to_device(batch, "cpu")
    assert torch.equal(moved.site_features, batch.site_features)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_auto_on_cuda_uses_autocast_and_pinned_copies(small):
    amp = mixed_precision("cuda")
    assert amp.name in ("bf16", "fp16")
    X, y, X_test = small
    pred = SiteNetDIMRegressor(**TINY, device="cuda").fit(X, y).predict(X_test)
    assert np.isfinite(pred).all()
