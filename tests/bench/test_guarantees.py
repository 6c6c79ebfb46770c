"""The protocol's guarantees, tested where they are made, through the real code paths.

Spies wrap (never replace) :meth:`SiteNetDIMRegressor.pretrain` and ``fit``: the grid, the
method adapters and the estimator all run for real, at tiny settings, in this process.

- every method that pretrains sees no test-fold id, and exactly the pool it reports;
- every fit sees only its labelled subset (no test id) and the test set is the fold's own;
- fine-tuning starts bitwise from the pretrained encoder (captured by a callback when
  fine-tuning begins), after ``fit``'s own pretraining and from ``encoder_init``.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_settings import TINY

from matbench_dim.bench import results as res
from matbench_dim.bench.grid import run_grid
from matbench_dim.data.sources import load_task
from matbench_dim.embedder import DIMEmbedder
from matbench_dim.estimator import SiteNetDIMRegressor
from matbench_dim.pretrained import PretrainedEncoder
from matbench_dim.training.callbacks import Callback


@pytest.fixture(scope="module")
def task():
    return load_task("perovskites_subset", sample=True)


@pytest.fixture
def spied(monkeypatch):
    """Record the ids every SiteNetDIMRegressor pretraining and fit receives."""
    calls: list[tuple[str, list[str]]] = []
    pretrain, fit = SiteNetDIMRegressor.pretrain, SiteNetDIMRegressor.fit

    def spy_pretrain(self, X, *args, **kwargs):
        calls.append(("pretrain", [str(i) for i in X.index]))
        return pretrain(self, X, *args, **kwargs)

    def spy_fit(self, X, y, X_unlabeled=None):
        calls.append(("fit", [str(i) for i in X.index]))
        if X_unlabeled is not None:
            calls.append(("fit_unlabeled", [str(i) for i in X_unlabeled.index]))
        return fit(self, X, y, X_unlabeled)

    def spying(kind, original):
        def spy(self, X, *args, **kwargs):
            calls.append((kind, [str(i) for i in X.index]))
            return original(self, X, *args, **kwargs)

        return spy

    monkeypatch.setattr(SiteNetDIMRegressor, "pretrain", spy_pretrain)
    monkeypatch.setattr(SiteNetDIMRegressor, "fit", spy_fit)
    monkeypatch.setattr(
        SiteNetDIMRegressor, "predict", spying("predict", SiteNetDIMRegressor.predict)
    )
    monkeypatch.setattr(DIMEmbedder, "transform", spying("transform", DIMEmbedder.transform))
    return calls


@pytest.mark.parametrize("method", ["dim", "dim_rf", "transfer"])
def test_pretraining_methods_see_no_test_id_and_exactly_the_pool_they_report(
    method, task, spied, tmp_path
):
    params = {"estimator_params": {**TINY, "pretrain__epochs": 1, "finetune__epochs": 2}}
    if method == "transfer":
        params["transfer_target"] = "gap"
    run_grid(
        [task], tmp_path, folds=[0], n_labels=[10], seeds=[0], methods=[method],
        method_params={method: params}, max_train_structures=60, tracking=False,
    )  # fmt: skip
    test_ids = {str(i) for i in task.test_ids(0)}
    train_ids = {str(i) for i in task.train_ids(0)}
    assert spied, "no Site-Net pretraining or fit ran"
    for kind, ids in spied:
        if kind in ("pretrain", "fit", "fit_unlabeled"):
            assert not set(ids) & test_ids, f"{method}: {kind} saw test ids"
    manifests = [json.loads(p.read_text()) for p in (tmp_path / "pretrained").rglob("*.json")]
    manifests = [m for m in manifests if "pool_sha256" in m]
    assert len(manifests) == 1
    # the first Site-Net call is the pretraining; it saw the pool the manifest reports
    kind, pool = spied[0]
    assert kind == ("fit" if method == "transfer" else "pretrain")
    if method != "transfer":  # transfer keeps the pool's entries that have the other label
        assert len(pool) == manifests[0]["n_pretrain"] == 60
        assert res.ids_sha256(pool) == manifests[0]["pool_sha256"]
    assert set(pool) <= {str(i) for i in task.unlabelled_structures(0).index}
    # the cell's fit saw its 10 labelled training ids (the representation pipeline fits
    # only a forest on frozen vectors: no Site-Net fit there)
    fits = [ids for kind, ids in spied[1:] if kind == "fit"]
    assert all(len(ids) == 10 and set(ids) <= train_ids for ids in fits)
    # what was predicted is the fold's test set (the forest's last transform is its predict)
    kind, scored = next(c for c in reversed(spied) if c[0] in ("predict", "transform"))
    assert sorted(scored) == sorted(test_ids), f"{method} scored other structures ({kind})"
    cell = next(iter(res.iter_cells(tmp_path)))
    assert res.read_cell(cell).n_test == len(test_ids)
    assert set(map(str, res.load_predictions(cell)["id"])) == test_ids


def test_cli_bench_dim_pretrains_on_no_test_id(task, spied, tmp_path, monkeypatch):
    """The same guarantee through the command line (`bench --methods dim`), in this process."""
    from typer.testing import CliRunner

    from matbench_dim.cli.app import app

    monkeypatch.chdir(tmp_path)
    tiny = [arg for k, v in {**TINY, "pretrain__epochs": 1, "finetune__epochs": 2}.items()
            for arg in ("-p", f"{k}={v}")]  # fmt: skip
    args = ["bench", "--tasks", "sample:perovskites_subset", "--methods", "dim", "--n-labels",
            "10", "--folds", "0", "--seeds", "0", "--max-train-structures", "60",
            "--n-jobs", "1", "--out", "b", "--no-tracking", *tiny]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output[-3000:]
    kinds = [kind for kind, _ in spied]
    assert kinds[0] == "pretrain"
    assert "fit" in kinds
    test_ids = {str(i) for i in task.test_ids(0)}
    for kind, ids in spied:
        if kind in ("pretrain", "fit", "fit_unlabeled"):
            assert not set(ids) & test_ids, f"bench --methods dim: {kind} saw test ids"
    (manifest,) = [
        json.loads(p.read_text())
        for p in (tmp_path / "b" / "pretrained").rglob("*.json")
        if "pool_sha256" in p.read_text()
    ]
    assert res.ids_sha256(spied[0][1]) == manifest["pool_sha256"]
    assert len(spied[0][1]) == manifest["n_pretrain"] == 60


class EncoderAtFinetuneStart(Callback):
    """Copies the encoder's weights when fine-tuning begins."""

    def __init__(self) -> None:
        self.state: dict[str, torch.Tensor] | None = None

    def on_train_begin(self, stage, state):
        if stage == "finetune":
            self.state = {
                k: v.detach().clone() for k, v in state.model.encoder.state_dict().items()
            }


def _assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_fine_tuning_starts_bitwise_from_the_pretrained_encoder(real_structures, tmp_path):
    X, y = real_structures[:10], [float(i) for i in range(10)]
    seen = EncoderAtFinetuneStart()
    est = SiteNetDIMRegressor(**TINY, callbacks=[seen]).fit(X, y, X_unlabeled=real_structures[10:])
    _assert_bitwise(seen.state, est.pretrained_encoder_.state_dict)
    fresh = SiteNetDIMRegressor(**TINY, random_init=True)._initial_encoder()[0].state_dict()
    assert not all(torch.equal(seen.state[k], fresh[k]) for k in fresh)  # not the random start

    path = est.save_encoder(tmp_path / "encoder")
    again = EncoderAtFinetuneStart()
    SiteNetDIMRegressor(**TINY, encoder_init=str(path), callbacks=[again]).fit(X, y)
    _assert_bitwise(again.state, PretrainedEncoder.load(path).state_dict)
