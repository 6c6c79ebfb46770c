"""The scikit-learn estimators on small real structures (matbench_jdft2d, shipped)."""

from __future__ import annotations

import json
from dataclasses import fields

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.ensemble import RandomForestRegressor
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import Pipeline
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)
from tiny_settings import EMBEDDER_TINY, TINY

from matbench_dim.embedder import DIMEmbedder
from matbench_dim.estimator import GROUPS, SiteNetDIMRegressor
from matbench_dim.pretrained import IncompatibleModelError, PretrainedEncoder
from matbench_dim.training.callbacks import Callback


@pytest.fixture(scope="module")
def data(real_structures, real_targets):
    x = real_structures[:16]
    y = np.asarray(real_targets[:16])
    return x, y, real_structures[16:]


@pytest.mark.parametrize("cls", [SiteNetDIMRegressor, DIMEmbedder])
def test_sklearn_data_free_checks(cls):
    est = cls()
    name = cls.__name__
    check_parameters_default_constructible(name, est)
    check_no_attributes_set_in_init(name, est)
    check_get_params_invariance(name, est)
    check_set_params(name, est)


def test_every_config_field_is_a_parameter():
    params = SiteNetDIMRegressor().get_params()
    internal = {
        ("finetune", "freeze_encoder"),
        ("featurizer", "coulomb"),
        ("encoder", "site_features"),
    }
    for group, cls in GROUPS.items():
        for f in fields(cls):
            if (group, f.name) in internal:
                continue
            assert f"{group}__{f.name}" in params, (
                f"{group}__{f.name} is not an estimator parameter"
            )
            default = SiteNetDIMRegressor.__init__.__kwdefaults__[f"{group}__{f.name}"]
            assert default == f.default, f"{group}__{f.name}: {default} != {f.default}"


def test_nested_params_route_and_clone():
    est = SiteNetDIMRegressor(encoder__heads=2)
    est.set_params(optimizer__lr=3e-3, dim__weight_local=0.5)
    assert est.get_params()["optimizer__lr"] == 3e-3
    assert est._group("dim").weight_local == 0.5
    assert est._group("encoder").heads == 2
    twin = clone(est)
    assert twin.get_params()["encoder__heads"] == 2
    assert twin is not est
    with pytest.raises(ValueError, match="Invalid parameter 'encoder__nope'"):
        est.set_params(encoder__nope=1)


def test_invalid_values_fail_in_fit_with_the_parameter_name(data):
    x, y, _ = data
    with pytest.raises(ValueError, match="heads"):
        SiteNetDIMRegressor(**{**TINY, "encoder__heads": 3}).fit(x, y)
    with pytest.raises(ValueError, match="mode"):
        SiteNetDIMRegressor(**TINY, mode="frozen").fit(x, y)


def test_predict_before_fit_raises(data):
    with pytest.raises(NotFittedError):
        SiteNetDIMRegressor().predict(data[0])
    with pytest.raises(NotFittedError):
        DIMEmbedder().transform(data[0])


def test_bad_targets_are_named(data):
    x, y, _ = data
    bad = y.copy()
    bad[3] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        SiteNetDIMRegressor(**TINY).fit(x, bad)
    with pytest.raises(ValueError, match="16 structures but y has 15"):
        SiteNetDIMRegressor(**TINY).fit(x, y[:-1])
    with pytest.raises(TypeError, match=r"X\[1\] is a str"):
        SiteNetDIMRegressor(**TINY).fit([x[0], "Fe2O3"], y[:2])


def test_fit_predict_is_deterministic_and_saves_without_pickle(data, tmp_path):
    x, y, x_unlab = data
    a = SiteNetDIMRegressor(**TINY, random_state=3).fit(x, y, X_unlabeled=x_unlab)
    b = SiteNetDIMRegressor(**TINY, random_state=3).fit(x, y, X_unlabeled=x_unlab)
    pa, pb = a.predict(x_unlab), b.predict(x_unlab)
    assert pa.shape == (len(x_unlab),)
    assert np.isfinite(pa).all()
    np.testing.assert_array_equal(pa, pb)
    assert a.pretrained_
    assert len(a.history_["pretrain"]) == 2
    assert len(a.history_["finetune"]) == 6
    c = SiteNetDIMRegressor(**TINY, random_state=4).fit(x, y, X_unlabeled=x_unlab)
    assert not np.array_equal(c.predict(x_unlab), pa)

    folder = a.save(tmp_path / "model")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "weights.pt"]
    loaded = SiteNetDIMRegressor.load(folder)
    np.testing.assert_allclose(loaded.predict(x_unlab), pa, rtol=1e-6)
    assert loaded.get_params()["encoder__global_dim"] == 8

    meta = json.loads((folder / "config.json").read_text())
    meta["format_version"] = 999
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(IncompatibleModelError, match="format version 999"):
        SiteNetDIMRegressor.load(folder)


def test_pretrained_encoder_is_reused_without_pretraining_again(data, tmp_path):
    x, y, x_unlab = data

    class CountEpochs(Callback):
        def __init__(self):
            self.stages = []

        def on_epoch_end(self, stage, epoch, logs, state):
            self.stages.append(stage)

    pre = SiteNetDIMRegressor(**TINY).pretrain(x_unlab)
    path = pre.save_encoder(tmp_path / "encoder")
    assert PretrainedEncoder.load(path).config == pre._group("encoder")
    counts = []
    preds = []
    for seed in (0, 1):
        counter = CountEpochs()
        est = SiteNetDIMRegressor(
            **TINY, encoder_init=str(path), random_state=seed, callbacks=[counter]
        )
        est.fit(x, y)
        counts.append(counter.stages)
        preds.append(est.predict(x_unlab))
        assert est.pretrained_
    assert all("pretrain" not in c and c.count("finetune") == 6 for c in counts)
    assert not np.array_equal(preds[0], preds[1])
    with pytest.raises(ValueError, match="different encoder configuration"):
        SiteNetDIMRegressor(**{**TINY, "encoder__local_dim": 4}, encoder_init=str(path)).fit(x, y)


def _encoder_change(est, start) -> float:
    now = est.model_.encoder.state_dict()
    return max(float((now[k] - v).abs().max()) for k, v in start.state_dict.items())


def test_head_warmup_and_encoder_lr_scale(data, tmp_path):
    """Head warm-up keeps the pretrained encoder fixed while the head trains; a small
    encoder learning-rate scale moves the encoder less than the default."""
    x, y, x_unlab = data
    path = SiteNetDIMRegressor(**TINY).pretrain(x_unlab).save_encoder(tmp_path / "enc")
    start = PretrainedEncoder.load(path)
    kw = {**TINY, "encoder_init": str(path), "finetune__val_fraction": 0.0}
    warm = SiteNetDIMRegressor(**kw, finetune__head_warmup_epochs=6).fit(x, y)
    assert _encoder_change(warm, start) == 0.0
    assert all(p.requires_grad for p in warm.model_.encoder.parameters())
    full = SiteNetDIMRegressor(**kw).fit(x, y)
    slow = SiteNetDIMRegressor(**kw, finetune__encoder_lr_scale=0.01).fit(x, y)
    assert 0.0 < _encoder_change(slow, start) < 0.1 * _encoder_change(full, start)
    part = SiteNetDIMRegressor(**kw, finetune__head_warmup_epochs=3).fit(x, y)
    assert _encoder_change(part, start) > 0.0
    for bad in ({"finetune__encoder_lr_scale": 0.0}, {"finetune__head_warmup_epochs": -1}):
        with pytest.raises(ValueError, match=next(iter(bad)).split("__")[1]):
            SiteNetDIMRegressor(**TINY, **bad).fit(x, y)


def test_min_steps_sets_the_budget_in_optimizer_steps(data):
    """With one optimizer step per epoch, min_steps=15 runs 15 epochs where epochs=6 would
    run 6, early stopping (patience 1) waits for the 15 steps, and the logs count them."""
    x, y, _ = data
    kw = {**TINY, "random_init": True, "finetune__batch_sites": 100_000}  # one batch per epoch
    plain = SiteNetDIMRegressor(**kw).fit(x, y)
    assert [h["steps"] for h in plain.history_["finetune"]] == [float(k) for k in range(1, 7)]
    longer = SiteNetDIMRegressor(**{**kw, "finetune__patience": 1}, finetune__min_steps=15).fit(
        x, y
    )
    assert len(longer.history_["finetune"]) == 15
    assert longer.history_["finetune"][-1]["steps"] == 15.0
    # the first 6 epochs are the same training as the 6-epoch run (same seeds, same batches)
    assert [h["train_loss"] for h in longer.history_["finetune"][:6]] == [
        h["train_loss"] for h in plain.history_["finetune"]
    ]
    with pytest.raises(ValueError, match="min_steps must be >= 0"):
        SiteNetDIMRegressor(**kw, finetune__min_steps=-1).fit(x, y)


def test_patience_in_steps(data):
    """With ``patience_unit="steps"`` patience counts optimizer steps: with several steps per
    epoch, a patience of 6 steps stops at the first epoch 6 steps past the best one, where a
    patience of 6 epochs waits 6 epochs."""
    x, y, _ = data
    kw = {**TINY, "random_init": True, "finetune__epochs": 40, "finetune__batch_sites": 30}
    kw["finetune__lr"] = 1.0  # diverges: the validation MAE stops improving early
    kw["finetune__patience"] = 6
    by_epoch = SiteNetDIMRegressor(**kw).fit(x, y)
    by_step = SiteNetDIMRegressor(**kw, finetune__patience_unit="steps").fit(x, y)
    h_epoch, h_step = by_epoch.history_["finetune"], by_step.history_["finetune"]
    assert h_step[0]["steps"] >= 2  # several steps per epoch, so the units differ
    assert len(h_epoch) == by_epoch.best_epoch_ + 7
    best = by_step.best_epoch_
    stop = next(e for e in range(best + 1, 40) if h_step[e]["steps"] - h_step[best]["steps"] >= 6)
    assert len(h_step) == stop + 1
    assert len(h_step) < len(h_epoch)
    with pytest.raises(ValueError, match="patience_unit must be 'epochs' or 'steps'"):
        SiteNetDIMRegressor(**kw, finetune__patience_unit="batches").fit(x, y)


def test_random_init_differs_from_pretrained_start(data):
    x, y, _x_unlab = data
    rnd = SiteNetDIMRegressor(**TINY, random_init=True).fit(x, y)
    assert not rnd.pretrained_
    assert rnd.history_["pretrain"] == []
    assert clone(rnd).get_params()["random_init"] is True


def test_plain_fit_pretrains_with_dim_on_its_own_structures(data):
    """matbench's loop calls fit(X, y): that must DIM-pretrain on X, then fine-tune."""
    x, y, x_unlab = data
    est = SiteNetDIMRegressor(**TINY).fit(x, y)
    assert est.pretrained_
    assert len(est.history_["pretrain"]) == TINY["pretrain__epochs"]
    assert est.pretrained_encoder_.info["n_pretrain"] == len(x)
    pooled = SiteNetDIMRegressor(**TINY).fit(x, y, X_unlabeled=x_unlab)
    assert pooled.pretrained_encoder_.info["n_pretrain"] == len(x) + len(x_unlab)
    with pytest.raises(ValueError, match="random_init=True excludes"):
        SiteNetDIMRegressor(**TINY, random_init=True).fit(x, y, X_unlabeled=x_unlab)


def test_representation_mode_freezes_the_encoder(data):
    x, y, _ = data
    est = SiteNetDIMRegressor(**TINY, mode="representation", random_init=True).fit(x, y)
    fresh = SiteNetDIMRegressor(**TINY)._initial_encoder()[0]
    for (k, v), (_, w) in zip(
        est.model_.encoder.state_dict().items(), fresh.state_dict().items(), strict=True
    ):
        np.testing.assert_array_equal(v.numpy(), w.numpy(), err_msg=k)


def test_embedder_in_a_pipeline(data):
    x, y, x_unlab = data
    pipe = Pipeline(
        [
            ("dim", DIMEmbedder(**EMBEDDER_TINY)),
            ("rf", RandomForestRegressor(n_estimators=10, random_state=0)),
        ]
    )
    pipe.fit(x, y)
    pred = pipe.predict(x_unlab)
    assert pred.shape == (len(x_unlab),)
    vecs = pipe.named_steps["dim"].transform(x_unlab)
    assert vecs.shape == (len(x_unlab), 8)
    assert np.isfinite(vecs).all()
    assert list(pipe.named_steps["dim"].get_feature_names_out()[:2]) == ["dim_0", "dim_1"]
    rnd = DIMEmbedder(**EMBEDDER_TINY, random_init=True).fit(x)
    assert not rnd.pretrained_
    assert not np.allclose(rnd.transform(x_unlab), vecs)
