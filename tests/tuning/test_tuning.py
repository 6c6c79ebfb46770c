"""Tests of matbench_dim.tuning: spaces, storages, pruning, encoder cache, workers, export.

Most studies here use :class:`MagpieLinearRegressor`, a small real model (gradient-descent
linear regression on Magpie composition features, with an optional PCA "encoder" pretrained
on unlabelled structures) that has the estimator's API (``pretrain``, ``save_encoder``,
``encoder_init``, per-epoch ``callbacks``), so that studies of several trials, killed workers
and parallel workers stay cheap. One test runs a real study with ``SiteNetDIMRegressor``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from matbench_dim.training.callbacks import Callback, StopTraining, TrainingState
from matbench_dim.tuning import (
    EncoderCache,
    HeartbeatJournalStorage,
    InnerCVObjective,
    OptunaPruningCallback,
    SpaceError,
    export_best,
    inner_splits,
    load_best_params,
    load_space,
    load_spaces,
    resolve_storage,
    study_name_for,
    tune,
)
from matbench_dim.tuning.progress import TrialTimer, format_seconds

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parents[1]
JDFT2D = REPO / "matbench_dim" / "data" / "samples" / "matbench_jdft2d.json.gz"

# ----------------------------------------------------------------------- a small real model

_MAGPIE: dict[str, np.ndarray] = {}
_MAGPIE_EP: dict[str, Any] = {}
SEEN_IDS: set[str] = set()  # ids of every structure the model was given (fit, predict, pretrain)


def magpie_features(X: Any) -> np.ndarray:
    """(n, 132) Magpie statistics of the compositions of ``X`` (a Series of structures)."""
    from matminer.featurizers.composition import ElementProperty

    SEEN_IDS.update(str(i) for i in X.index)
    rows = []
    for s in X:
        key = s.composition.reduced_formula
        if key not in _MAGPIE:
            if "featurizer" not in _MAGPIE_EP:
                _MAGPIE_EP["featurizer"] = ElementProperty.from_preset("magpie")
            values = _MAGPIE_EP["featurizer"].featurize(s.composition)
            _MAGPIE[key] = np.nan_to_num(np.asarray(values, dtype=float))
        rows.append(_MAGPIE[key])
    return np.vstack(rows)


class MagpieLinearRegressor:
    """Linear regression by full-batch gradient descent on Magpie features.

    ``pretrain(X)`` fits a standardiser + PCA (``encoder__n_components``) on unlabelled
    structures; ``save_encoder`` writes it to a folder that ``encoder_init`` reads back.
    ``fit`` holds out 20 % of its data and reports ``train_loss``/``val_loss`` (MSE of the
    standardised target) to the callbacks after each epoch.
    """

    def __init__(
        self,
        encoder__n_components: int = 4,
        finetune__lr: float = 0.1,
        finetune__epochs: int = 30,
        finetune__alpha: float = 1e-3,
        random_state: int = 0,
        callbacks: Any = None,
        encoder_init: Any = None,
        epoch_delay_s: float = 0.0,
    ) -> None:
        self.encoder__n_components = encoder__n_components
        self.finetune__lr = finetune__lr
        self.finetune__epochs = finetune__epochs
        self.finetune__alpha = finetune__alpha
        self.random_state = random_state
        self.callbacks = callbacks
        self.encoder_init = encoder_init
        self.epoch_delay_s = epoch_delay_s

    def pretrain(self, X: Any) -> MagpieLinearRegressor:
        from sklearn.decomposition import PCA

        F = magpie_features(X)
        self.mean_, self.scale_ = F.mean(0), F.std(0) + 1e-9
        self.pca_ = PCA(self.encoder__n_components, whiten=True, random_state=self.random_state)
        self.pca_.fit((F - self.mean_) / self.scale_)
        return self

    def save_encoder(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True)
        np.savez(
            path / "encoder.npz",
            mean=self.mean_,
            scale=self.scale_,
            components=self.pca_.components_,
            center=self.pca_.mean_,
            var=self.pca_.explained_variance_,
        )
        return path

    def _features(self, X: Any, fitting: bool) -> np.ndarray:
        F = magpie_features(X)
        if self.encoder_init is not None:
            enc = np.load(Path(self.encoder_init) / "encoder.npz")
            Z = (F - enc["mean"]) / enc["scale"]
            return (Z - enc["center"]) @ enc["components"].T / np.sqrt(enc["var"])
        if fitting:
            self.mean_, self.scale_ = F.mean(0), F.std(0) + 1e-9
        return (F - self.mean_) / self.scale_

    def fit(self, X: Any, y: Any) -> MagpieLinearRegressor:
        F, y = self._features(X, True), np.asarray(y, dtype=float)
        self.y_mean_, self.y_std_ = y.mean(), y.std() or 1.0
        t = (y - self.y_mean_) / self.y_std_
        idx = np.random.default_rng(self.random_state).permutation(len(y))
        val, tr = idx[: max(1, len(y) // 5)], idx[max(1, len(y) // 5) :]
        w, b = np.zeros(F.shape[1]), 0.0
        cbs = list(self.callbacks or [])
        state = TrainingState("finetune", self, {})
        for cb in cbs:
            cb.on_train_begin("finetune", state)
        try:
            for epoch in range(self.finetune__epochs):
                r = F[tr] @ w + b - t[tr]
                w = w - self.finetune__lr * (F[tr].T @ r / len(tr) + self.finetune__alpha * w)
                b = b - self.finetune__lr * float(r.mean())
                logs = {
                    "train_loss": float(np.mean((F[tr] @ w + b - t[tr]) ** 2)),
                    "val_loss": float(np.mean((F[val] @ w + b - t[val]) ** 2)),
                }
                state.epoch = epoch
                state.history.append(logs)
                time.sleep(self.epoch_delay_s)
                for cb in cbs:
                    cb.on_epoch_end("finetune", epoch, logs, state)
        except StopTraining:
            pass
        except BaseException as exc:
            for cb in cbs:
                cb.on_exception("finetune", state, exc)
            raise
        for cb in cbs:
            cb.on_train_end("finetune", state)
        self.w_, self.b_, self.history_ = w, b, {"finetune": state.history}
        return self

    def predict(self, X: Any) -> np.ndarray:
        return (self._features(X, False) @ self.w_ + self.b_) * self.y_std_ + self.y_mean_


def small_task(n: int = 30) -> Any:
    """``n`` real matbench_jdft2d crystals (exfoliation energy, meV/atom), 5 seeded folds."""
    from matminer.utils.io import load_dataframe_from_json

    from matbench_dim.data.task import task_from_structures

    df = load_dataframe_from_json(str(JDFT2D), pbar=False)
    df = df.assign(nsites=[len(s) for s in df["structure"]])
    df = df[df["nsites"] <= 8].iloc[::7].head(n)
    return task_from_structures(
        list(df["structure"]),
        list(df["exfoliation_en"]),
        ids=[f"jdft-{i}" for i in df.index],
        name="jdft2d_small",
        target_name="exfoliation_en",
    )


def write_space(path: Path, params: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"family": path.stem, "params": params}))
    return path


def cheap_space(tmp_path: Path, encoder: bool = False) -> Any:
    params = [
        {
            "name": "finetune__lr",
            "type": "float",
            "low": 1e-3,
            "high": 0.3,
            "log": True,
            "default": 0.1,
        },
        {"name": "finetune__alpha", "type": "float", "low": 1e-5, "high": 1e-1, "log": True},
    ]
    if encoder:
        params.append(
            {
                "name": "encoder__n_components",
                "type": "categorical",
                "choices": [2, 4],
                "default": 4,
            }
        )
    return load_space(write_space(tmp_path / f"cheap{int(encoder)}.json", params))


def _worker_main(journal: str, root: str, n_trials: int, worker: int, delay: float) -> None:
    """Entry point of the subprocess workers (killed / parallel worker tests)."""
    tune(
        small_task(),
        12,
        n_trials,
        storage=f"journal://{journal}",
        seed=0,
        worker=worker,
        spaces=cheap_space(Path(root), encoder=True),
        n_splits=3,
        pruner="none",
        factory=MagpieLinearRegressor,
        base_params={"epoch_delay_s": delay},
        cache_dir=Path(root) / "cache",
        best_dir=Path(root) / "best",
        tracking=False,
        count_states=(TrialState.COMPLETE,),
        heartbeat_interval=1,
        export=False,
    )


def _spawn_worker(tmp_path: Path, journal: Path, n_trials: int, worker: int, delay: float) -> Any:
    code = (
        f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_tuning import _worker_main; "
        f"_worker_main({str(journal)!r}, {str(tmp_path)!r}, {n_trials}, {worker}, {delay!r})"
    )
    env = {**os.environ, "MATBENCH_DIM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.fixture(scope="module")
def task() -> Any:
    return small_task()


@pytest.fixture(autouse=True)
def _quiet_optuna() -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------- spaces


def test_shipped_spaces_hold_the_seed_defaults_and_estimator_names() -> None:
    from matbench_dim.estimator import SiteNetDIMRegressor

    space = load_spaces()
    names = SiteNetDIMRegressor().get_params(deep=False)
    assert set(space.names) <= set(names), set(space.names) - set(names)
    d = space.defaults()
    assert d["optimizer__lr"] == 1e-4
    assert d["optimizer__weight_decay"] == 1e-4
    assert d["dim__weight_kl"] == 0.1
    assert d["dim__weight_prior"] == 0.0
    assert (d["encoder__local_dim"], d["encoder__global_dim"]) == (32, 64)
    assert (d["pretrain__batch_sites"], d["finetune__batch_sites"]) == (1200, 400)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "optimizer__lr", "type": "loguniform", "low": 1, "high": 2}, "unknown type"),
        (
            {"name": "optimizer__lr", "type": "float", "low": 1e-2, "high": 1e-4},
            r"low \(0.01\) > high",
        ),
        ({"name": "optimizer__lr", "type": "float", "low": 0, "high": 1, "log": True}, "low > 0"),
        (
            {"name": "optimizer__lr", "type": "float", "low": 0, "high": 1, "default": 2},
            "default 2",
        ),
        ({"name": "encoder__heads", "type": "int", "low": 1.5, "high": 4}, "numeric 'low'"),
        ({"name": "encoder__heads", "type": "categorical", "choices": []}, "non-empty 'choices'"),
        (
            {"name": "encoder__heads", "type": "categorical", "choices": [1, 2], "default": 3},
            "not one of the choices",
        ),
        (
            {"name": "optimizer__lr", "type": "float", "low": 0, "high": 1, "lgo": True},
            "unknown keys",
        ),
    ],
)
def test_space_validation_names_file_and_entry(tmp_path: Path, entry: dict, message: str) -> None:
    path = write_space(
        tmp_path / "bad.json",
        [{"name": "finetune__lr", "type": "float", "low": 1e-5, "high": 1e-3}, entry],
    )
    with pytest.raises(SpaceError, match=message) as info:
        load_space(path)
    assert str(path) in str(info.value)
    assert "params[1]" in str(info.value)
    assert entry["name"] in str(info.value)


def test_space_files_errors_and_yaml(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(SpaceError, match=r"broken\.json"):
        load_space(tmp_path / "broken.json")
    with pytest.raises(SpaceError, match="not found"):
        load_space("no_such_family", tmp_path)
    entry = {"name": "finetune__lr", "type": "float", "low": 1e-5, "high": 1e-3}
    write_space(tmp_path / "a.json", [entry])
    write_space(tmp_path / "b.json", [entry])
    with pytest.raises(SpaceError, match="defined in both"):
        load_spaces(["a", "b"], tmp_path)
    (tmp_path / "c.yaml").write_text(
        "params:\n  - {name: finetune__epochs, type: int, low: 10, high: 100, step: 10, default: 50}\n"
    )
    space = load_space("c", tmp_path)
    assert space.defaults() == {"finetune__epochs": 50}
    trial = optuna.create_study().ask()
    assert space.suggest(trial)["finetune__epochs"] in range(10, 101, 10)


def test_package_reexports_the_public_api() -> None:
    import importlib

    import matbench_dim.tuning as tuning

    api = {"DEFAULT_SPACES", "DEFAULT_STORAGE", "EncoderCache", "HeartbeatJournalStorage",
           "InnerCVObjective", "InnerSplit", "OptunaPruningCallback", "ParamSpec", "SearchSpace",
           "SpaceError", "best_params_path", "export_best", "inner_splits", "load_best_params",
           "load_space", "load_spaces", "make_pruner", "resolve_storage", "study_name_for",
           "tune"}  # fmt: skip
    assert api <= set(tuning.__all__)
    for name in tuning.__all__:
        obj = getattr(tuning, name)
        home = getattr(obj, "__module__", None)
        if home is not None and home.startswith("matbench_dim.tuning."):
            assert getattr(importlib.import_module(home), name) is obj, name
    assert all(m.__doc__ for m in map(importlib.import_module, _submodules(tuning)))


def _submodules(package: Any) -> list[str]:
    import pkgutil

    return [f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)]


def test_default_spaces_found_from_any_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matbench_dim.tuning.spaces as spaces_module
    from matbench_dim.tuning.spaces import default_space_dir

    packaged = Path(spaces_module.__file__).resolve().parent / "spaces"
    monkeypatch.chdir(tmp_path)  # no ./tuning/spaces here: the packaged defaults are used
    assert default_space_dir().resolve() == packaged
    space = load_spaces()
    assert all(Path(s).resolve().parent == packaged for s in space.sources)
    assert space.defaults()["optimizer__lr"] == 1e-4
    local = tmp_path / "tuning" / "spaces"
    local.mkdir(parents=True)
    write_space(local / "head.json", [{"name": "head__x", "type": "int", "low": 1, "high": 2}])
    assert load_space("head").names == ["head__x"]  # ./tuning/spaces takes precedence


def test_repository_tuning_spaces_are_the_packaged_ones() -> None:
    import matbench_dim.tuning.spaces as spaces_module

    packaged = Path(spaces_module.__file__).resolve().parent / "spaces"
    repo_spaces = REPO / "tuning" / "spaces"
    if not repo_spaces.exists():
        pytest.skip("not a source checkout")
    assert sorted(p.name for p in repo_spaces.iterdir()) == sorted(
        p.name for p in packaged.iterdir()
    )
    for p in packaged.iterdir():
        assert (repo_spaces / p.name).read_bytes() == p.read_bytes()


def test_missing_space_folder_error_names_the_folder(tmp_path: Path) -> None:
    with pytest.raises(SpaceError, match="does not exist") as info:
        load_space("head", tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    assert load_space(REPO / "tuning" / "spaces" / "head.json").names  # a path still works


# ----------------------------------------------------------------------- splits, storage, names


def test_inner_splits_stay_in_the_pool_and_partition_the_subset() -> None:
    splits = inner_splits(24, 12, n_splits=3, n_repeats=2, seed=5)
    assert len(splits) == 6
    for r in range(2):
        parts = [s for s in splits if s.repeat == r]
        val = np.concatenate([s.val for s in parts])
        assert sorted(val) == sorted(set(val))
        assert len(val) == 12
        assert val.max() < 24
        for s in parts:
            assert not set(s.train) & set(s.val)
            assert len(s.train) + len(s.val) == 12
    assert set(splits[0].val) | set(splits[0].train) != set(splits[3].val) | set(splits[3].train)
    assert [s.val.tolist() for s in splits] == [
        s.val.tolist() for s in inner_splits(24, 12, n_splits=3, n_repeats=2, seed=5)
    ]
    with pytest.raises(ValueError, match="training size"):
        inner_splits(10, 11)


def test_storage_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    default = resolve_storage(None)
    assert isinstance(default, optuna.storages.RDBStorage)
    assert (tmp_path / "tuning" / "optuna.db").exists()
    journal = resolve_storage(f"journal://{tmp_path}/j/x.journal", heartbeat_interval=5)
    assert isinstance(journal, HeartbeatJournalStorage)
    assert journal.grace_period == 10
    assert isinstance(resolve_storage("journal://rel.journal?lock=open"), HeartbeatJournalStorage)
    with pytest.raises(ValueError, match="journal://"):
        resolve_storage("journal://x.journal?lock=nfs")
    assert (
        study_name_for("matbench_perovskites", "e_form", 100, 0)
        == "matbench_perovskites-e_form-n100-fold0"
    )
    assert study_name_for("sample:flla", "gap opt", 50) == "sample_flla-gap_opt-n50-fold0"


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
def test_journal_heartbeat_fails_stale_trials(tmp_path: Path) -> None:
    url = f"journal://{tmp_path}/hb.journal"
    storage = resolve_storage(url, heartbeat_interval=1, grace_period=30)
    study = optuna.create_study(storage=storage, study_name="hb")
    alive, remote_old, remote_new, remote_slow, local_dead = (study.ask() for _ in range(5))
    storage.record_heartbeat(alive._trial_id)
    # another host: stale after max(grace, 2 x the writer's interval) without a beat
    for trial, age, interval in ((remote_old, 100, 1), (remote_new, 1, 1), (remote_slow, 100, 60)):
        beat = {"trial_id": trial._trial_id, "time": time.time() - age, "host": "elsewhere",
                "pid": 1, "interval": interval}  # fmt: skip
        storage.set_trial_system_attr(trial._trial_id, "matbench_dim:heartbeat", beat)
    # this host: stale as soon as the process is gone, however recent its last beat
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    beat = {"trial_id": local_dead._trial_id, "time": time.time(), "host": socket.gethostname(),
            "pid": int(gone.stdout), "interval": 1}  # fmt: skip
    storage.set_trial_system_attr(local_dead._trial_id, "matbench_dim:heartbeat", beat)
    assert storage._get_stale_trial_ids(study._study_id) == [
        remote_old._trial_id,
        local_dead._trial_id,
    ]
    optuna.storages.fail_stale_trials(study)
    states = {t.number: t.state for t in study.get_trials()}
    assert states[remote_old.number] == states[local_dead.number] == TrialState.FAIL
    assert {states[t.number] for t in (alive, remote_new, remote_slow)} == {TrialState.RUNNING}
    retried = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retried) == sorted(
        [remote_old.number, local_dead.number]
    )


# ----------------------------------------------------------------------- pruning and cache


def test_pruning_callback_prunes_a_clearly_worse_trial(task: Any, tmp_path: Path) -> None:
    X, y = task.train_data(0)
    space = load_space(
        write_space(
            tmp_path / "lr.json",
            [{"name": "finetune__lr", "type": "float", "low": 1e-6, "high": 10.0, "log": True}],
        )
    )
    objective = InnerCVObjective(
        X,
        y,
        space,
        12,
        n_splits=3,
        factory=MagpieLinearRegressor,
        base_params={"finetune__epochs": 20},
        X_pretrain=X,
        pretrain_ids=list(X.index),
        cache=EncoderCache(tmp_path / "enc"),
    )
    pruner = optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
    study = optuna.create_study(pruner=pruner)
    for lr in (0.01, 0.03, 0.02, 5.0):  # the last one diverges: far worse at every epoch
        study.enqueue_trial({"finetune__lr": lr})
    study.optimize(objective, n_trials=4)
    states = [t.state for t in study.trials]
    assert states[:3] == [TrialState.COMPLETE] * 3
    assert states[3] == TrialState.PRUNED
    assert study.trials[3].user_attrs["inner_maes"] == []  # recorded for pruned trials too
    assert study.trials[3].user_attrs["seconds"] > 0
    assert max(study.trials[3].intermediate_values) < objective.step_stride  # first inner fit
    first_fit = [v for k, v in sorted(study.trials[0].intermediate_values.items()) if k < 21]
    assert len(first_fit) == 20  # one report per epoch: the best validation loss so far
    assert all(b <= a for a, b in itertools.pairwise(first_fit))
    # a non-finite loss prunes at once, whatever the pruner says
    cb = OptunaPruningCallback(optuna.create_study().ask(), "val_loss")
    state = TrainingState("finetune", None, {})
    cb.on_epoch_end("pretrain", 0, {"val_loss": float("nan")}, state)  # other stage: ignored
    with pytest.raises(optuna.TrialPruned, match="not finite"):
        cb.on_epoch_end("finetune", 0, {"val_loss": float("nan")}, state)


def test_encoder_cache_pretrains_once_per_pretraining_params(task: Any, tmp_path: Path) -> None:
    X, y = task.train_data(0)
    cache = EncoderCache(tmp_path / "enc")
    kwargs = {
        "n_splits": 3,
        "factory": MagpieLinearRegressor,
        "X_pretrain": X,
        "pretrain_ids": list(X.index),
        "cache": cache,
    }
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(InnerCVObjective(X, y, cheap_space(tmp_path), 12, **kwargs), n_trials=4)
    assert cache.n_pretrained == 1  # only fine-tuning changed
    assert [t.user_attrs["encoder_cache_hit"] for t in study.trials] == [False, True, True, True]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    study.optimize(InnerCVObjective(X, y, cheap_space(tmp_path, True), 12, **kwargs), n_trials=6)
    values = {t.params["encoder__n_components"] for t in study.trials}
    assert cache.n_pretrained == 1 + len(values - {4})  # n_components=4 was cached already
    assert len(list((tmp_path / "enc").iterdir())) == len(values | {4})
    other = EncoderCache(tmp_path / "enc")
    assert other.key({"encoder__n_components": 4, "finetune__lr": 1.0}, X.index) == other.key(
        {"encoder__n_components": 4, "finetune__lr": 0.1, "callbacks": [Callback()]}, X.index
    )
    assert other.key({}, X.index, MagpieLinearRegressor) == other.key(
        {"encoder__n_components": 4}, X.index, MagpieLinearRegressor
    )
    assert other.key({"encoder__n_components": 4}, X.index) != other.key(
        {"encoder__n_components": 4}, X.index[:-1]
    )


# ----------------------------------------------------------------------- tune, resume, export


def test_trial_timer_estimates_what_is_left_from_the_mean_trial_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    timer = TrialTimer(5, clock=lambda: now[0])
    study = optuna.create_study()
    with caplog.at_level(logging.INFO, logger="matbench_dim.tuning"):
        for seconds in (60.0, 180.0):  # mean 120 s per trial after the second
            now[0] += seconds
            trial = study.ask()
            trial.set_user_attr("seconds", seconds)
            study.tell(trial, 1.0)
            timer(study, study.trials[-1])
        pruned = study.ask()
        pruned.report(36.6, 10)
        study.tell(pruned, state=TrialState.PRUNED)
        timer(study, study.trials[-1])
    first, second, third = caplog.messages
    assert third.startswith("trial 2 pruned in ?; 2 left")  # no objective value shown
    assert (
        first
        == "trial 0 complete in 60 s, value 1; 4 left, about 4 min more (at 60 s per trial so far)"
    )
    assert second.endswith(
        "in 3 min, value 1; 3 left, about 6 min more (at 2 min per trial so far)"
    )
    assert format_seconds(3 * 3600) == "3.0 h"


def test_tune_resumes_exports_and_never_touches_test_data(
    task: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("tuning read the test targets")

    monkeypatch.setattr(type(task), "test_targets", forbidden)
    SEEN_IDS.clear()
    kwargs = {
        "storage": f"sqlite:///{tmp_path}/s.db",
        "spaces": cheap_space(tmp_path, True),
        "n_splits": 3,
        "factory": MagpieLinearRegressor,
        "cache_dir": tmp_path / "cache",
        "best_dir": tmp_path / "best",
        "tracking": False,
    }
    with caplog.at_level(logging.INFO, logger="matbench_dim.tuning"):
        study = tune(task, 12, 3, **kwargs)
    log = caplog.text
    assert "3 trials to run; each fine-tunes 3 times (inner splits) on ~8 labelled" in log
    assert "DIM pretraining on" in log
    assert "trial 0: inner split 3/3, validation MAE" in log
    assert re.search(r"trial 0 complete in \d+ s, value [\d.]+; 2 left, about", log)
    last = [m for m in caplog.messages if m.startswith("trial 2 complete in")]
    assert len(last) == 1
    assert "left" not in last[0]  # the study is done: no estimate
    assert SEEN_IDS
    assert not SEEN_IDS & set(task.test_ids(0))
    assert set(task.train_ids(0)) >= SEEN_IDS
    first = study.trials[0]
    assert first.user_attrs["enqueued"] == "seed defaults"
    assert first.params["finetune__lr"] == 0.1
    assert first.params["encoder__n_components"] == 4
    assert study.study_name == "jdft2d_small-exfoliation_en-n12-fold0"
    assert {k: study.user_attrs[k] for k in ("task", "target", "n", "fold")} == {
        "task": "jdft2d_small",
        "target": "exfoliation_en",
        "n": 12,
        "fold": 0,
    }
    assert all(
        t.user_attrs["n"] == 12 and len(t.user_attrs["inner_maes"]) == 3 for t in study.trials
    )
    study = tune(task, 12, 5, **kwargs)  # resume: 2 more trials, defaults not enqueued again
    assert len(study.trials) == 5
    assert sum(t.user_attrs.get("enqueued") == "seed defaults" for t in study.trials) == 1
    assert len(tune(task, 12, 5, **kwargs).trials) == 5  # already complete: nothing to do
    with pytest.raises(ValueError, match="other settings"):
        tune(task, 12, 6, **{**kwargs, "n_splits": 4})

    params = load_best_params("jdft2d_small", 12, best_dir=tmp_path / "best")
    best = study.best_trial
    assert best.params.items() <= params.items()
    assert params["finetune__lr"] == best.params["finetune__lr"]
    assert "encoder_init" not in params
    assert "random_state" not in params
    assert load_best_params("jdft2d_small", 12, 0, kwargs["storage"]) == params
    record = json.loads((tmp_path / "best" / "jdft2d_small_n12.json").read_text())["records"][0]
    assert record["best_value"] == study.best_value
    assert record["n_trials"] == 5
    assert record["default_value"] == study.trials[0].value
    assert record["study_name"] == study.study_name
    MagpieLinearRegressor(**params)  # the exported parameters build the estimator
    with pytest.raises(KeyError, match="fold 1"):
        load_best_params("jdft2d_small", 12, fold=1, best_dir=tmp_path / "best")
    with pytest.raises(FileNotFoundError):
        load_best_params("jdft2d_small", 50, best_dir=tmp_path / "best")
    export_best(study, tmp_path / "best")  # re-export replaces the record
    data = json.loads((tmp_path / "best" / "jdft2d_small_n12.json").read_text())
    assert len(data["records"]) == 1


def test_real_sitenet_study_reuses_pretraining(task: Any, tmp_path: Path) -> None:
    """A small real study with SiteNetDIMRegressor: DIM pretraining once, fine-tunes vary."""
    study = tune(
        task,
        12,
        2,
        storage=f"journal://{tmp_path}/real.journal",
        spaces=["finetune"],
        n_splits=2,
        cache_dir=tmp_path / "cache",
        best_dir=tmp_path / "best",
        tracking=False,
        base_params={
            "pretrain__epochs": 1,
            "finetune__epochs": 3,
            "pretrain__patience": 0,
            "finetune__patience": 0,
            "device": "cpu",
        },
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert [t.user_attrs["encoder_cache_hit"] for t in study.trials] == [False, True]
    assert len(list((tmp_path / "cache" / "encoders").iterdir())) == 1
    assert all(np.isfinite(t.value) and t.value > 0 for t in study.trials)
    assert study.trials[0].params == {  # the first trial is the space's defaults
        "finetune__lr": 1e-4,
        "finetune__batch_sites": 400,
        "finetune__encoder_lr_scale": 1.0,
        "finetune__head_warmup_epochs": 0,
        "finetune__min_steps": 0,
    }


def _rdb_urls() -> list[Any]:
    urls: list[Any] = ["sqlite"]
    pg = os.environ.get("MATBENCH_DIM_TEST_POSTGRES_URL")  # e.g. postgresql://u:p@host/db
    reason = "set MATBENCH_DIM_TEST_POSTGRES_URL (and install psycopg2) to test PostgreSQL"
    urls.append(pytest.param(pg, marks=pytest.mark.skipif(not pg, reason=reason)))
    return urls


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")
@pytest.mark.parametrize("url", _rdb_urls())
def test_rdb_heartbeat_fails_and_retries_a_dead_trial(task: Any, tmp_path: Path, url: Any) -> None:
    """A RUNNING trial whose heartbeat stopped is failed and re-run once by the next worker."""
    if url == "sqlite":
        url = f"sqlite:///{tmp_path}/hb.db"
    name = f"hb-{os.getpid()}-{time.time_ns()}"
    storage = resolve_storage(url, heartbeat_interval=1, grace_period=1)
    first = optuna.create_study(storage=storage, study_name=name)
    first.enqueue_trial({"finetune__lr": 0.05})
    dead = first.ask()
    dead.suggest_float("finetune__lr", 1e-3, 0.3, log=True)
    storage.record_heartbeat(dead._trial_id)  # then its worker "dies"
    time.sleep(1.5)
    study = tune(
        task, 12, 2, storage=url, study_name=name, spaces=cheap_space(tmp_path), n_splits=3,
        factory=MagpieLinearRegressor, cache_dir=tmp_path / "cache", best_dir=tmp_path / "best",
        tracking=False, heartbeat_interval=1, grace_period=1, count_states=(TrialState.COMPLETE,),
    )  # fmt: skip
    states = [t.state for t in study.trials]
    assert states[dead.number] == TrialState.FAIL
    assert states.count(TrialState.COMPLETE) == 2
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead.number]
    assert len(retry) == 1
    assert retry[0].state == TrialState.COMPLETE
    assert retry[0].params["finetune__lr"] == 0.05


# ----------------------------------------------------------------------- workers


def test_killed_worker_trial_is_failed_retried_and_study_finishes(
    task: Any, tmp_path: Path
) -> None:
    journal = tmp_path / "kill.journal"
    proc = _spawn_worker(tmp_path, journal, 4, 0, 0.05)
    storage = resolve_storage(f"journal://{journal}", heartbeat_interval=1)
    deadline = time.time() + 120
    running = None
    try:
        while time.time() < deadline and running is None:
            time.sleep(0.3)
            if proc.poll() is not None:
                pytest.fail(f"worker ended early: {proc.stdout.read().decode()[-2000:]}")
            if not journal.exists() or not optuna.get_all_study_names(storage):
                continue
            trials = optuna.load_study(study_name=None, storage=storage).get_trials()
            if any(t.state == TrialState.COMPLETE for t in trials):  # kill it while it fits
                fitting = [t for t in trials if t.state == TrialState.RUNNING
                           and "encoder_cache_hit" in t.user_attrs]  # fmt: skip
                running = fitting[0] if fitting else None
        assert running is not None, "no trial started within the time limit"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    _worker_main(str(journal), str(tmp_path), 4, 0, 0.0)  # resume in this process
    study = optuna.load_study(study_name=None, storage=storage)
    states = {t.number: t.state for t in study.trials}
    assert states[running.number] == TrialState.FAIL
    assert sum(s == TrialState.COMPLETE for s in states.values()) == 4
    assert not [s for s in states.values() if s in (TrialState.RUNNING, TrialState.WAITING)]
    retry = [t for t in study.trials if t.system_attrs.get("failed_trial") == running.number]
    assert len(retry) == 1
    assert retry[0].params == running.params


@pytest.mark.slow
def test_two_workers_share_a_journal_study(task: Any, tmp_path: Path) -> None:
    journal = tmp_path / "two.journal"
    procs = [_spawn_worker(tmp_path, journal, 6, w, 0.02) for w in (0, 1)]
    for p in procs:
        out = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, out[-3000:]
    storage = resolve_storage(f"journal://{journal}")
    study = optuna.load_study(study_name=None, storage=storage)
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert 6 <= len(complete) <= 7  # each worker stops once 6 are complete: overshoot <= 1
    assert len(complete) == len(study.trials)  # none failed, running or waiting
    workers = {t.user_attrs["worker"] for t in complete}
    assert workers == {f"{socket.gethostname()}:{p.pid}" for p in procs}  # both contributed
    keys = [json.dumps(t.params, sort_keys=True) for t in complete]
    assert len(set(keys)) == len(keys)  # no trial evaluated twice
    assert sum(t.user_attrs.get("enqueued") == "seed defaults" for t in complete) == 1


# ----------------------------------------------------------------------- dashboard, MLflow


def test_study_is_readable_by_optuna_dashboard(task: Any, tmp_path: Path) -> None:
    """``optuna-dashboard sqlite:///...`` lists the study by name with its user attributes."""
    dashboard = pytest.importorskip("optuna_dashboard")
    from wsgiref.util import setup_testing_defaults

    storage = f"sqlite:///{tmp_path}/optuna.db"
    tune(
        task, 12, 2, storage=storage, spaces=cheap_space(tmp_path), n_splits=3,
        factory=MagpieLinearRegressor, cache_dir=tmp_path / "cache", best_dir=tmp_path / "best",
        tracking=False,
    )  # fmt: skip
    app = dashboard.wsgi(storage)

    def get(path: str) -> Any:
        environ: dict[str, Any] = {"PATH_INFO": path}
        setup_testing_defaults(environ)
        status: list[str] = []
        body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
        assert status[0].startswith("200"), status
        return json.loads(body)

    summary = get("/api/studies")["study_summaries"][0]
    assert summary["study_name"] == "jdft2d_small-exfoliation_en-n12-fold0"
    attrs = {a["key"]: a["value"] for a in summary["user_attrs"]}
    assert {"task", "target", "n", "fold", "metric"} <= set(attrs)
    assert "jdft2d_small" in attrs["task"]
    detail = get(f"/api/studies/{summary['study_id']}")
    trial_attrs = {a["key"] for a in detail["trials"][0]["user_attrs"]}
    assert {"task", "target", "n", "fold", "inner_maes", "worker"} <= trial_attrs


@pytest.mark.slow
def test_trials_are_tracked_as_mlflow_child_runs(task: Any, tmp_path: Path) -> None:
    """One MLflow parent run per worker, one child run per trial with metrics and a plot."""
    study = tune(
        task, 12, 2, storage=f"sqlite:///{tmp_path}/optuna.db", spaces=cheap_space(tmp_path),
        n_splits=3, factory=MagpieLinearRegressor, cache_dir=tmp_path / "cache",
        best_dir=tmp_path / "best", tracking=True, tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )  # fmt: skip
    parent = study.user_attrs["mlflow_parent_run_id.w0"]
    runs = {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert len(runs) == 2
    assert {t.user_attrs["mlflow_parent_run_id"] for t in study.trials} == {parent}
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert client.get_run(parent).data.tags["optuna.study"] == study.study_name
    for trial in study.trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.info.status == "FINISHED"
        assert run.data.metrics["inner/mae"] == pytest.approx(trial.value)
        assert "split0/finetune/val_loss" in run.data.metrics
        assert "learning_curves.png" in [a.path for a in client.list_artifacts(run.info.run_id)]
