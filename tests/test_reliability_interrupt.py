"""Long jobs survive interruption: kill -9 during DIM pretraining or a benchmark grid, then
the same command resumes; an unusable output folder fails before any work starts.

The kill tests run real subprocesses (``sys.executable``) and SIGKILL them once they have
made some progress, so they are marked ``slow`` (``tox -e slow``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_settings import TINY_PRETRAIN

from matbench_dim.bench import results as res
from matbench_dim.features.featurize import featurize
from matbench_dim.model.dim import DIMConfig
from matbench_dim.model.sitenet import EncoderConfig
from matbench_dim.paths import check_writable
from matbench_dim.pretrained import PretrainedEncoder
from matbench_dim.training.callbacks import Callback
from matbench_dim.training.common import OptimizerConfig
from matbench_dim.training.pretrain import PretrainConfig, pretrain_dim

PRETRAIN_SCRIPT = """
import json, sys, time
from pathlib import Path
from pymatgen.core import Structure
from matbench_dim.training.callbacks import Callback
from matbench_dim.estimator import SiteNetDIMRegressor

structures, checkpoint, out, pause, params = sys.argv[1:6]
X = [Structure.from_dict(d) for d in json.loads(Path(structures).read_text())]

class Progress(Callback):
    def on_train_begin(self, stage, state):
        print(f"start {state.epoch + 1}", flush=True)

    def on_epoch_end(self, stage, epoch, logs, state):
        print(f"epoch {epoch}", flush=True)
        time.sleep(float(pause))

est = SiteNetDIMRegressor(
    **json.loads(params), pretrain__checkpoint=checkpoint, callbacks=[Progress()], random_state=0
)
est.pretrain(X)
est.save_encoder(out)
print("done", flush=True)
"""

GRID_SCRIPT = """
import json, sys, time
from matbench_dim.bench.baselines import DummyMeanRegressor
from matbench_dim.bench.grid import run_grid
from matbench_dim.bench.methods import EstimatorMethod

class SlowMean(DummyMeanRegressor):
    # the train-mean predictor, slowed down so that the run can be killed half-way
    def __init__(self, pause=0.0):
        self.pause = pause

    def fit(self, X, y):
        time.sleep(self.pause)
        return super().fit(X, y)

out, pause = sys.argv[1], float(sys.argv[2])
s = run_grid(
    ["matbench_jdft2d"], out, n_labels=[50], seeds=[0, 1],
    methods=[EstimatorMethod("slow_mean", SlowMean(pause))], backend="sequential", tracking=False,
)
print(json.dumps({"n_cells": s.n_cells, "n_skipped": s.n_skipped, "n_run": s.n_run,
                  "n_recorded": s.n_recorded}), flush=True)
"""


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        MATBENCH_DIM_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0"
    )
    return env


def start(script: Path, *args: str, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            [sys.executable, str(script), *args],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )


def run_to_end(script: Path, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=child_env(),
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def kill_when(proc: subprocess.Popen, ready, log: Path, timeout: float = 240) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` is true (polled); fail if it ends first."""
    t0 = time.monotonic()
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be killed:\n{log.read_text()}")
            if time.monotonic() - t0 > timeout:
                pytest.fail(f"no progress in {timeout} s:\n{log.read_text()}")
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL


# ------------------------------------------------------------------------------ kill -9


# Not slow on purpose: CI must run one real kill -9 -> resume (about 30 s here).
def test_kill_9_during_pretraining_then_the_same_command_resumes(real_structures, tmp_path):
    structures = tmp_path / "structures.json"
    structures.write_text(json.dumps([s.as_dict() for s in real_structures[:20]]))
    script = tmp_path / "pretrain.py"
    script.write_text(PRETRAIN_SCRIPT)
    params = json.dumps({**TINY_PRETRAIN, "pretrain__epochs": 7})
    ckpt, out = tmp_path / "ckpt" / "dim.pt", tmp_path / "encoder"
    command = (str(structures), str(ckpt), str(out), "0.4", params)

    reference = start(
        script,
        str(structures),
        str(tmp_path / "ref.pt"),
        str(tmp_path / "ref"),
        "0",
        params,
        log=tmp_path / "ref.log",
    )
    log = tmp_path / "victim.log"
    victim = start(script, *command, log=log)
    kill_when(victim, lambda: "epoch 2" in log.read_text(), log)
    assert "start 0" in log.read_text()
    assert ckpt.exists()
    assert not out.exists(), "the killed run must not have finished"
    saved_epoch = int(torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"])
    assert 2 <= saved_epoch < 6

    stdout = run_to_end(script, *command)
    assert f"start {saved_epoch + 1}" in stdout, stdout
    assert "epoch 0\n" not in stdout, "resumed epochs are not run again"
    assert stdout.strip().endswith("done")

    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()
    resumed, uninterrupted = PretrainedEncoder.load(out), PretrainedEncoder.load(tmp_path / "ref")
    assert resumed.info["best_epoch"] == uninterrupted.info["best_epoch"]
    assert resumed.state_dict.keys() == uninterrupted.state_dict.keys()
    for key, value in uninterrupted.state_dict.items():
        torch.testing.assert_close(resumed.state_dict[key], value, rtol=1e-5, atol=1e-6, msg=key)


def cell_files(out: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in res.iter_cells(out)}


@pytest.mark.slow
def test_kill_9_during_a_benchmark_grid_keeps_finished_cells(tmp_path):
    from matbench.bench import MatbenchBenchmark

    from matbench_dim.bench.recording import matbench_path
    from matbench_dim.bench.subsets import draw_subset
    from matbench_dim.data.sources import load_task

    script = tmp_path / "grid.py"
    script.write_text(GRID_SCRIPT)
    out = tmp_path / "out"
    log = tmp_path / "grid.log"
    victim = start(script, str(out), "0.4", log=log)
    kill_when(victim, lambda: len(list(res.iter_cells(out))) >= 3, log)
    before = cell_files(out)
    assert 3 <= len(before) < 10
    for path in before:  # every cell that exists is complete: JSON and predictions
        assert len(res.load_predictions(path)) == res.read_cell(path).n_test

    summary = json.loads(run_to_end(script, str(out), "0.4").strip().splitlines()[-1])
    assert summary["n_cells"] == 10
    assert summary["n_skipped"] == len(before)
    assert summary["n_run"] == 10 - len(before)
    assert summary["n_recorded"] >= 10 - len(before)
    after = cell_files(out)
    assert len(after) == 10
    assert {p: after[p] for p in before} == before, "finished cells are not rewritten"

    table = res.load_results(out)
    assert len(table) == 10
    task = load_task("matbench_jdft2d")
    for seed in (0, 1):
        mb = MatbenchBenchmark.from_file(str(matbench_path(out, task.name, "slow_mean", 50, seed)))
        assert mb.validate() == {}
        mtask = mb.tasks_map[task.name]
        assert all(mtask.is_recorded.values())
        for fold in range(5):
            row = table[(table["fold"] == fold) & (table["seed"] == seed)].iloc[0]
            subset = draw_subset(task.train_ids(fold), 50, fold, seed)
            mean = task.targets.loc[subset].mean()
            preds = res.load_predictions(row["path"])
            assert list(preds["id"]) == list(task.test_ids(fold))
            np.testing.assert_allclose(preds["y_pred"], mean, rtol=1e-12)
            assert mtask.results[f"fold_{fold}"].scores.mae == pytest.approx(row["mae"], rel=1e-9)


# ------------------------------------------------------------------------------ output folders


def test_check_writable_creates_and_probes_the_folder(tmp_path):
    folder = check_writable(tmp_path / "a" / "b")
    assert folder.is_dir()
    assert list(folder.iterdir()) == [], "the probe file is removed"
    assert check_writable(folder) == folder  # an existing folder is fine


def test_check_writable_under_a_regular_file(tmp_path):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a folder")
    for path in (blocker, blocker / "run1", blocker / "run1" / "cells"):
        with pytest.raises(NotADirectoryError) as err:
            check_writable(path)
        assert f"output folder {path} is not usable" in str(err.value)
        assert f"{blocker} is a file, not a folder" in str(err.value)
        assert err.value.errno == errno.ENOTDIR
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("path", ["/proc/matbench-dim-test/out", "/sys/matbench-dim-test"])
def test_check_writable_outside_a_writable_filesystem(path):
    if not Path(path).parents[-2].is_dir():
        pytest.skip(f"no {Path(path).parents[-2]} on this system")
    with pytest.raises(OSError, match=rf"output folder {path} is not usable: creating the folder"):
        check_writable(path)
    assert not Path(path).exists()


def test_check_writable_when_writing_is_refused(tmp_path, monkeypatch):
    import builtins

    real_open = builtins.open

    def refusing_open(file, mode="r", *args, **kwargs):
        if ".write-probe-" in str(file) and "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", refusing_open)
    with pytest.raises(PermissionError) as err:
        check_writable(tmp_path / "out")
    msg = str(err.value)
    assert f"output folder {tmp_path / 'out'} is not usable: writing a probe file failed" in msg
    assert "Permission denied" in msg
    assert err.value.errno == errno.EACCES


def test_check_writable_read_only_folder(tmp_path, monkeypatch):
    """A read-only folder: chmod 0o500 for a normal user; root writes through that, so there
    the filesystem's answer (EROFS on the probe) is simulated instead of skipping."""
    import builtins

    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        real_open = builtins.open

        def read_only_open(file, mode="r", *args, **kwargs):
            if str(file).startswith(str(folder)) and "w" in mode:
                raise OSError(errno.EROFS, "Read-only file system", str(file))
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", read_only_open)
    folder.chmod(0o500)
    try:
        with pytest.raises(OSError, match=rf"output folder {folder} is not usable") as err:
            check_writable(folder)
        assert err.value.errno in (errno.EACCES, errno.EROFS)
    finally:
        folder.chmod(0o700)


def test_check_writable_disk_full(tmp_path, monkeypatch):
    import shutil

    from matbench_dim import paths

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(paths.shutil, "disk_usage", lambda p: usage._replace(free=3 * 2**20))
    with pytest.raises(
        OSError, match=r"only 3\.0 MiB free on its filesystem, 16\.0 MiB needed"
    ) as err:
        check_writable(tmp_path / "out")
    assert err.value.errno == errno.ENOSPC
    assert check_writable(tmp_path / "out", min_free_bytes=0).is_dir()

    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):
        if ".write-probe-" in str(file):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_disk)
    with pytest.raises(OSError, match="No space left on device") as err:
        check_writable(tmp_path / "out")
    assert err.value.errno == errno.ENOSPC


# ------------------------------------------------------------------------------ checkpoints

SMALL = EncoderConfig(
    site_dim=16,
    pair_dim=16,
    attention_hidden=16,
    local_dim=8,
    global_hidden=16,
    global_dim=8,
    activation="silu",
)


@pytest.fixture(scope="module")
def records(real_structures):
    return featurize(real_structures[:12], progress=False)


class CountEpochs(Callback):
    def __init__(self) -> None:
        self.epochs: list[int] = []

    def on_epoch_end(self, stage, epoch, logs, state):
        self.epochs.append(epoch)


def pretrain(records, epochs: int, **kw):
    return pretrain_dim(
        records,
        encoder_cfg=SMALL,
        dim_cfg=DIMConfig(critic_dim=16, critic_hidden=16),
        optimizer_cfg=OptimizerConfig(lr=1e-3),
        cfg=PretrainConfig(epochs=epochs, batch_sites=150, val_fraction=0.2, patience=0),
        seed=0,
        **kw,
    )


def test_unwritable_checkpoint_folder_fails_before_the_first_epoch(records, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    counter = CountEpochs()
    with pytest.raises(NotADirectoryError, match=rf"{blocker} is a file, not a folder"):
        pretrain(records, 2, checkpoint_path=blocker / "ckpt" / "dim.pt", callbacks=[counter])
    assert counter.epochs == []


class StopAfter(Callback):
    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, stage, epoch, logs, state):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_corrupt_checkpoint_restarts_with_a_warning(records, tmp_path, caplog):
    ckpt = tmp_path / "dim.pt"
    fresh = pretrain(records, 2)
    with pytest.raises(KeyboardInterrupt):
        pretrain(records, 2, checkpoint_path=ckpt, callbacks=[StopAfter(0)])
    ckpt.write_bytes(ckpt.read_bytes()[:100])  # a torn file (e.g. copied while being written)
    counter = CountEpochs()
    with caplog.at_level(logging.WARNING, logger="matbench_dim.training.pretrain"):
        again = pretrain(records, 2, checkpoint_path=ckpt, callbacks=[counter])
    assert "ignoring unreadable checkpoint" in caplog.text
    assert str(ckpt) in caplog.text
    assert again.resumed_from_epoch == -1
    assert counter.epochs == [0, 1]
    for key, value in fresh.encoder.state_dict().items():
        torch.testing.assert_close(again.encoder.state_dict()[key], value, msg=key)
