"""The ``matbench-dim`` command line, end to end on real structures with tiny models.

Every command runs in a temporary folder; tracked commands write to a temporary SQLite
store, never to the repository's ``mlruns/``.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from matbench_dim.cli.app import app

TINY = [
    f"--param={name}=16"
    for name in (
        "encoder__site_dim",
        "encoder__pair_dim",
        "encoder__attention_hidden",
        "encoder__local_dim",
        "encoder__global_hidden",
        "encoder__global_dim",
        "dim__critic_dim",
        "dim__critic_hidden",
        "finetune__head_hidden",
    )
] + ["-p", "device=cpu", "-p", "finetune__patience=0"]
COMMANDS = ("run", "pretrain", "fit", "predict", "bench", "report", "tune", "tasks", "submit")


@pytest.fixture(autouse=True)
def _in_tmp(monkeypatch, tmp_path):
    """Commands run in a temporary folder with no inherited MLflow store."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)


def invoke(*args: str, code: int = 0):
    """Run ``matbench-dim ARGS`` in this process; check its exit code."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == code, f"{args}: exit {result.exit_code}\n{result.output[-3000:]}"
    return result


def _line(output: str, prefix: str) -> str:
    return next(line for line in output.splitlines() if line.startswith(prefix))


# --------------------------------------------------------------------------- basics


def test_help_lists_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "matbench_dim.cli.app", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    listed = proc.stdout.split("Commands:")[1]
    for command in COMMANDS:
        assert f"\n  {command} " in listed
    lines = invoke("tasks").output.splitlines()
    assert any(line.split()[0] == "matbench_jdft2d" for line in lines if line.strip())
    usage = invoke("report", "--help").output.splitlines()[0]
    assert usage.endswith("report [OPTIONS] RESULTS_DIR"), usage  # not typer's {results_dir}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--task", "no_such_task"], "unknown task 'no_such_task'"),
        (["run", "--n-labels", "100000"], "n=100000 labelled entries requested"),
        (["run", "--n-labels", "many"], "Invalid value for '--n-labels'"),
        (["run", "-p", "encoder__site_dimm=8"], "did you mean encoder__site_dim"),
        (["run", "-p", "optimizer__lr"], "--param expects NAME=VALUE"),
        (["run", "-p", "encoder__heads=0"], "encoder heads must be >= 1"),
        (["run", "--fold", "7"], "--fold must be in 0..4"),
        (["predict", "--model", "missing_model", "--cifs", "."], "missing_model does not exist"),
        (["fit", "--cifs", "missing_cifs", "--out", "m"], "missing_cifs does not exist"),
        (["pretrain", "--epochs", "1"], "exactly one of --task or --cifs"),
        (["bench", "--tasks", "sample:flla", "--methods", "dmi"], "unknown method 'dmi'"),
        (["bench", "--tasks", "sample:flla", "--n-labels", "5000"], "n_labels [5000] exceed"),
        (["report", "no_results"], "no_results does not exist"),
        (["no-such-command"], "No such command"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, message):
    extra = ["--no-tracking"] if args[0] in ("run", "bench") else []
    result = invoke(*args, *extra, code=2)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not Path("mlruns").exists()


def test_debug_shows_the_exception():
    result = CliRunner().invoke(app, ["--debug", "run", "--task", "no_such_task"])
    assert isinstance(result.exception, ValueError)
    assert "unknown task" in str(result.exception)


# --------------------------------------------------------------------------- run / pretrain


def test_run_end_to_end_records_a_valid_matbench_file(tmp_path):
    from matbench_dim.bench import matbench_io
    from matbench_dim.bench.subsets import draw_subset
    from matbench_dim.data.sources import load_task

    out = tmp_path / "run"
    result = invoke(
        "run", "--pretrain-epochs", 1, "--finetune-epochs", 2, "--n-labels", 20,
        "--max-train-structures", 60, "--seed", 3, "--out", out, "--no-tracking", *TINY,
    )  # fmt: skip
    task = load_task("matbench_jdft2d")
    mb = matbench_io.load_benchmark(out / "results.json.gz", task)
    mtask = mb.tasks_map["matbench_jdft2d"]
    assert mtask.is_recorded[0]
    assert not any(mtask.is_recorded[f] for f in (1, 2, 3, 4))
    params = mtask.results["fold_0"].parameters
    assert list(params["labelled_ids"]) == list(draw_subset(task.train_ids(0), 20, 0, 3))
    preds = pd.read_csv(out / "predictions.csv")
    assert list(preds["id"]) == list(task.test_ids(0))
    mae = float(np.mean(np.abs(preds["prediction"] - preds["target"])))
    assert mtask.results["fold_0"].scores.mae == pytest.approx(mae, rel=1e-6)
    assert f"fine-tuned from DIM: {mae:.4g} meV/atom" in result.stdout
    assert (out / "model" / "config.json").is_file()
    assert (out / "encoder" / "config.json").is_file()
    assert not (tmp_path / "mlruns").exists()  # --no-tracking records nothing


def test_pretrain_resumes_after_interruption_then_run_fine_tunes_its_encoder(
    tmp_path, store, monkeypatch
):
    from mlflow import MlflowClient

    from matbench_dim.training import pretrain as training

    args = ["pretrain", "--task", "matbench_jdft2d", "--fold", 1, "--max-train-structures", 30]
    args += ["--epochs", 2, "--out", tmp_path / "pre", "--tracking-uri", store, *TINY]
    original = training.PretrainCheckpoint.on_epoch_end

    def killed_after_first_epoch(self, stage, epoch, logs, state):
        original(self, stage, epoch, logs, state)
        if epoch == 0:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.PretrainCheckpoint, "on_epoch_end", killed_after_first_epoch)
    invoke(*args, code=130)
    assert (tmp_path / "pre" / "pretrain.ckpt").is_file()
    assert not (tmp_path / "pre" / "encoder").exists()
    monkeypatch.setattr(training.PretrainCheckpoint, "on_epoch_end", original)
    result = invoke(*args)
    assert "resuming from" in result.output
    manifest = json.loads((tmp_path / "pre" / "pretrain.json").read_text())
    assert len(manifest["history"]) == 2
    assert manifest["n_structures"] == 30

    client = MlflowClient(store)
    runs = client.search_runs(
        [client.get_experiment_by_name("matbench-dim/matbench_jdft2d").experiment_id]
    )
    assert sorted(r.info.status for r in runs) == ["FINISHED", "KILLED"]
    run_id = manifest["mlflow_run_id"]
    resumed = client.get_metric_history(run_id, "pretrain/train_dim_loss")
    assert [m.step for m in resumed] == [1]  # only the epoch run after resuming

    import torch

    from matbench_dim import estimator as est_module
    from matbench_dim.pretrained import PretrainedEncoder

    starts = []
    original_finetune = est_module.finetune

    def capture(net, *a, **kw):  # the encoder's weights as each fine-tuning begins
        starts.append({k: v.detach().clone() for k, v in net.encoder.state_dict().items()})
        return original_finetune(net, *a, **kw)

    monkeypatch.setattr(est_module, "finetune", capture)
    out = tmp_path / "run"
    result = invoke(
        "run", "--fold", 1, "--finetune-epochs", 2, "--n-labels", 20, "--out", out,
        "--encoder-from", f"runs:/{run_id}/encoder", "--tracking-uri", store, *TINY,
    )  # fmt: skip
    saved = PretrainedEncoder.load(tmp_path / "pre" / "encoder").state_dict
    same = [all(torch.equal(s[k], saved[k]) for k in saved) for s in starts]
    assert sorted(same) == [False, True]  # the DIM fine-tune starts bitwise from the run's
    # encoder (downloaded from MLflow); the random-init comparison does not
    assert "fine-tuning the encoder" in result.output
    assert "fine-tuned from the given encoder:" in result.output
    assert "from random weights:" in result.output
    assert json.loads((out / "model" / "config.json").read_text())["fitted"]["pretrained"]
    assert not (out / "encoder").exists()  # nothing new was pretrained
    fine_tune = _line(result.stdout, "MLflow run").split()[2]
    run = client.get_run(fine_tune)
    assert run.data.params["encoder_from"] == f"runs:/{run_id}/encoder"
    assert run.data.tags["method"] == "dim"
    assert {a.path for a in client.list_artifacts(fine_tune)} >= {"estimator", "matbench"}
    from matbench_dim.tracking.pyfunc import load_model  # MLflow 3 keeps models apart from runs

    assert _line(result.stdout, "MLflow model").endswith(f"runs:/{fine_tune}/model")
    assert load_model(f"runs:/{fine_tune}/model", tracking_uri=store) is not None


# --------------------------------------------------------------------------- fit / predict


def _write_cifs(folder: Path, structures, names) -> None:
    folder.mkdir(parents=True)
    for s, name in zip(structures, names, strict=True):
        (folder / f"{name}.cif").write_text(s.to(fmt="cif"))


def test_fit_and_predict_on_cifs(tmp_path, real_structures, real_targets):
    from matbench_dim.estimator import SiteNetDIMRegressor

    labelled, unlabelled, queries = (
        real_structures[:12],
        real_structures[12:16],
        real_structures[16:],
    )
    names = [f"crystal_{i:02d}" for i in range(len(real_structures))]
    _write_cifs(tmp_path / "train", labelled, names[:12])
    _write_cifs(tmp_path / "extra", unlabelled, names[12:16])
    pd.DataFrame(
        {"file": [f"{n}.cif" for n in names[:12]], "exfoliation_en": real_targets[:12]}
    ).to_csv(tmp_path / "labels.csv", index=False)
    with zipfile.ZipFile(tmp_path / "queries.zip", "w") as zf:
        for s, name in zip(queries, names[16:], strict=True):
            zf.writestr(f"queries/{name}.cif", s.to(fmt="cif"))

    model = tmp_path / "model"
    result = invoke(
        "fit", "--cifs", tmp_path / "train", "--csv", tmp_path / "labels.csv",
        "--target-column", "exfoliation_en", "--unlabelled", tmp_path / "extra",
        "--pretrain-epochs", 1, "--finetune-epochs", 3, "--out", model, "--no-tracking", *TINY,
    )  # fmt: skip
    assert "after DIM pretraining on 16" in result.output
    est = SiteNetDIMRegressor.load(model)
    assert est.pretrained_
    assert est.n_train_ == 12

    invoke("predict", "--model", model, "--cifs", tmp_path / "queries.zip", "--out", "p.csv")
    preds = pd.read_csv(tmp_path / "p.csv")
    assert list(preds["id"]) == names[16:]
    np.testing.assert_allclose(preds["prediction"], est.predict(queries), rtol=1e-5)
    assert not (tmp_path / "mlruns").exists()

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.cif").write_text("data_bad\n_cell_length_a 3\n")
    result = invoke("predict", "--model", model, "--cifs", tmp_path / "broken", code=2)
    assert "bad.cif" in result.stderr


def test_fit_keeps_rows_with_an_empty_target_as_unlabelled_when_asked(tmp_path, real_structures):
    names = [f"c{i}" for i in range(10)]
    _write_cifs(tmp_path / "cifs", real_structures[:10], names)
    targets = [1.0, 2.0, "", 3.0, 4.0, 5.0, "", 6.0, 7.0, 8.0]
    labels = pd.DataFrame({"file": [f"{n}.cif" for n in names], "target": targets})
    labels.to_csv(tmp_path / "labels.csv", index=False)
    args = ["fit", "--cifs", tmp_path / "cifs", "--csv", tmp_path / "labels.csv", "--no-tracking"]
    args += ["--pretrain-epochs", 1, "--finetune-epochs", 2, *TINY]
    refused = invoke(*args, "--out", "m0", code=2)
    assert "missing (NaN/empty) targets for ids 'c2', 'c6'" in refused.stderr
    assert "--missing-target unlabelled" in refused.stderr
    assert not (tmp_path / "m0").exists()  # a refused command leaves no output folder
    result = invoke(*args, "--out", "m1", "--missing-target", "unlabelled")
    assert "fitting on 8 labelled structures after DIM pretraining on 10" in result.output


def test_predict_skip_bad_predicts_the_rest_and_lists_what_it_left_out(tmp_path, real_structures):
    from tiny_settings import TINY as TINY_KW

    from matbench_dim.estimator import SiteNetDIMRegressor

    est = SiteNetDIMRegressor(**{**TINY_KW, "pretrain__epochs": 1, "finetune__epochs": 2})
    est.fit(real_structures[:8], np.arange(8.0), X_unlabeled=None)
    est.save(tmp_path / "model")
    good = ["ok_a", "ok_b", "ok_c"]
    _write_cifs(tmp_path / "mixed", real_structures[8:11], good)
    (tmp_path / "mixed" / "bad.cif").write_text("data_bad\n_cell_length_a 3\n")
    disordered = real_structures[11].copy()
    disordered.replace(0, {"Fe": 0.5, "Co": 0.5})
    (tmp_path / "mixed" / "alloy.cif").write_text(disordered.to(fmt="cif"))
    args = ["predict", "--model", tmp_path / "model", "--cifs", tmp_path / "mixed"]

    refused = invoke(*args, "--out", "all.csv", code=2)
    assert "1 unreadable CIF file(s)" in refused.stderr  # the message fit gives, too
    assert "bad.cif" in refused.stderr
    assert "--skip-bad" in refused.stderr
    assert not (tmp_path / "all.csv").exists()

    result = invoke(*args, "--out", "some.csv", "--skip-bad")
    preds = pd.read_csv(tmp_path / "some.csv")
    assert sorted(preds["id"]) == good
    skipped = pd.read_csv(tmp_path / "some.skipped.csv")
    assert sorted(skipped["file"]) == ["alloy.cif", "bad.cif"]
    assert skipped["reason"].str.len().min() > 10  # a reason, not a placeholder
    assert "2 skipped" in result.output


# --------------------------------------------------------------------------- bench / report


def test_bench_resumes_and_report_writes_table_and_curve(tmp_path):
    args = ["bench", "--tasks", "sample:perovskites_subset", "--folds", "0,1", "--n-labels", 10]
    args += ["--n-labels", 20, "--seeds", 0, "--methods", "dummy_mean,median", "--out", "b"]
    first = invoke(*args, "--no-tracking")
    assert first.stdout.startswith("8 cells: 8 run, 0 already done")
    assert "dummy_mean" in first.output
    again = invoke(*args, "--no-tracking")
    assert again.stdout.startswith("8 cells: 0 run, 8 already done")
    result = invoke("report", "b")
    table = Path(_line(result.stdout, "table: ").split(": ", 1)[1])
    png = Path(_line(result.stdout, "learning curve").split(": ", 1)[1])
    assert table.resolve() == (tmp_path / "b" / "report" / "report.md").resolve()
    assert "median" in table.read_text()
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "mlruns").exists()


def test_bench_default_methods_add_zero_and_median_for_band_gaps(tmp_path, monkeypatch):
    import matbench_dim.bench.methods as methods
    from matbench_dim.bench.results import load_results

    monkeypatch.setattr(methods, "DEFAULT_METHODS", ("dummy_mean",))  # no Site-Net: seconds
    assert methods.default_methods("gap opt") == ["dummy_mean", "zero", "median"]
    tasks = ["--tasks", "sample:perovskites_subset", "--tasks", "sample:perovskites_subset:gap"]
    result = invoke("bench", *tasks, "--folds", 0, "--n-labels", 10, "--seeds", 0, "--out", "b",
                    "--no-tracking")  # fmt: skip
    assert result.stdout.startswith("4 cells: 4 run")
    table = load_results(tmp_path / "b")
    got = {t: set(g["method"]) for t, g in table.groupby("target")}
    assert got == {"e_form": {"dummy_mean"}, "gap gllbsc": {"dummy_mean", "zero", "median"}}


def test_bench_chgnet_rf_runs_or_is_skipped_with_a_message(tmp_path, monkeypatch):
    import importlib.util

    from matbench_dim.bench.results import load_results

    args = ["bench", "--tasks", "sample:perovskites_subset", "--folds", 0, "--n-labels", 10,
            "--seeds", 0, "--methods", "dummy_mean,chgnet_rf", "--no-tracking"]  # fmt: skip
    if importlib.util.find_spec("chgnet") is not None:
        result = invoke(*args, "--out", "with")
        assert result.stdout.startswith("2 cells: 2 run")
        assert set(load_results(tmp_path / "with")["method"]) == {"dummy_mean", "chgnet_rf"}
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "chgnet" else real(name, *a)
    )
    result = invoke(*args, "--out", "without")
    lines = result.stdout.splitlines()
    assert lines[0] == (
        "skipped chgnet_rf: chgnet_rf needs the optional CHGNet package, which is not "
        "installed: pip install 'matbench-dim[chgnet]'"
    )
    assert lines[1].startswith("1 cells: 1 run")


# --------------------------------------------------------------------------- tune


def test_tune_exports_parameters_that_bench_uses(tmp_path):
    tiny = [*TINY, "-p", "pretrain__epochs=1", "-p", "finetune__epochs=2"]
    task = ["--task", "sample:perovskites_subset", "--n-labels", 20]
    result = invoke("tune", *task, "--trials", 1, "--no-tracking", *tiny)
    assert (
        "1 trials to run; each fine-tunes 5 times (inner splits) on ~16 labelled" in result.stderr
    )
    assert "inner split 5/5, validation MAE" in result.stderr  # progress inside the trial
    assert "trial 0 complete in" in result.stderr
    exported = Path(_line(result.stdout, "exported for").split(": ", 1)[1])
    best = json.loads(exported.read_text())["records"][0]["params"]
    assert _line(result.stdout, "best inner-CV MAE")
    args = ["bench", "--tasks", "sample:perovskites_subset", "--methods", "random_init"]
    args += ["--n-labels", 20, "--folds", 0, "--seeds", 0, "--out", "b", "--no-tracking"]
    invoke(*args, "--params-from-study", *tiny)
    (cell,) = (tmp_path / "b" / "cells").rglob("fold0_seed0.json")
    used = json.loads(cell.read_text())["params"]["method"]["estimator_params"]
    overridden = {"encoder__local_dim", "encoder__global_dim", "finetune__head_hidden"}
    assert {k: v for k, v in best.items() if k not in overridden} == {
        k: used[k] for k in best if k not in overridden
    }
    assert used["encoder__global_dim"] == 16  # --param wins over the tuned value
    result = invoke(*args, "--params-from-study", "--n-labels", 10, code=2)  # n=10 not tuned
    assert "no tuned parameters" in result.stderr


def test_bench_and_tune_take_your_own_cif_folder(tmp_path, user_cif_folder):
    spec = f"{user_cif_folder}:e_form"
    args = ["bench", "--tasks", spec, "--methods", "dummy_mean,random_init", "--n-labels", 20]
    args += ["--folds", 0, "--seeds", 0, "--out", "b", "--no-tracking", *TINY]
    result = invoke(*args)
    assert "2 cells: 2 run" in result.stdout
    (cell,) = (tmp_path / "b" / "cells" / "my_cifs").rglob("random_init/**/fold0_seed0.json")
    record = json.loads(cell.read_text())
    assert (record["task"], record["target"], record["n"]) == ("my_cifs", "e_form", 20)
    assert record["n_test"] == 10  # fold 0 of the 50 labelled entries (KFold(5))
    tiny = [*TINY, "-p", "pretrain__epochs=1", "-p", "finetune__epochs=2"]
    tuned = invoke("tune", "--task", str(user_cif_folder), "--target", "e_form",
                   "--n-labels", 20, "--trials", 1, "--no-tracking", *tiny)  # fmt: skip
    assert "study my_cifs-e_form-n20-fold0: 1 trials" in tuned.stdout


def test_bench_extra_pool_joins_pretraining_after_the_guard(tmp_path, perovskite_sample_task):
    tiny = [*TINY, "-p", "pretrain__epochs=1", "-p", "finetune__epochs=2"]
    args = ["bench", "--tasks", "sample:perovskites_subset", "--methods", "dim", "--n-labels", 10]
    args += ["--folds", 0, "--seeds", 0, "--out", "b", "--no-tracking", "--extra-pool"]
    result = invoke(*args, "sample:flla", *tiny)
    assert "'offered': 300, 'dropped_matches': 0, 'kept': 300" in result.stderr
    (manifest,) = [
        json.loads(p.read_text())
        for p in (tmp_path / "b" / "pretrained").rglob("*.json")
        if "pool_sha256" in p.read_text()
    ]
    own = len(perovskite_sample_task.unlabelled_structures(0))
    assert manifest["n_pretrain"] == own + 300
    again = invoke(*args, "sample:perovskites_subset", *tiny, "--out", "c")  # itself: all dropped
    assert "'offered': 300, 'dropped_matches': 300, 'kept': 0" in again.stderr


def test_submit_writes_a_folder_matbench_accepts_and_continues_it(tmp_path):
    from matbench.bench import MatbenchBenchmark

    tiny = [*TINY, "-p", "pretrain__epochs=1", "-p", "finetune__epochs=2"]
    args = ["submit", "--tasks", "sample:matbench_jdft2d", "--authors", "A. Tester"]
    args += ["--out", "sub", *tiny]
    first = invoke(*args, "--folds", "0,1")
    assert "matbench_jdft2d: folds [0, 1] recorded" in first.stdout
    assert "run the same command again to continue" in first.stdout
    assert "matbench_jdft2d fold 1: test MAE" in first.stderr  # progress, one line per fold
    second = invoke(*args)
    assert "matbench_jdft2d fold 1: already recorded in sub/results.json.gz" in second.stderr
    assert "matbench_jdft2d: folds [0, 1, 2, 3, 4] recorded" in second.stdout
    assert "valid (read by MatbenchBenchmark.from_file" in second.stdout
    assert MatbenchBenchmark.from_file(str(tmp_path / "sub" / "results.json.gz")).is_valid
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == [
        "info.json", "results.json.gz", "run_submission.py", "submission.json",
    ]  # fmt: skip
    refused = invoke(*args, "--seed", 1, code=2)
    assert "was started with other settings" in refused.stderr
    assert "matbench has folds 0-4" in invoke(*args, "--folds", 5, code=2).stderr


@pytest.mark.slow
def test_pretrain_killed_with_sigkill_resumes_from_its_checkpoint(tmp_path):
    """A real ``kill -9`` between epochs; the same command then resumes from the checkpoint."""
    import os
    import signal
    import time

    import torch

    out = tmp_path / "pre"
    args = [sys.executable, "-m", "matbench_dim.cli.app", "pretrain", "--task", "matbench_jdft2d"]
    args += ["--max-train-structures", "80", "--epochs", "40", "-p", "pretrain__patience=0"]
    args += ["--out", str(out), "--no-tracking", *TINY]
    env = {**os.environ, "MATBENCH_DIM_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ckpt = out / "pretrain.ckpt"
    try:
        deadline = time.monotonic() + 300
        while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = torch.load(ckpt, weights_only=True)
    assert saved["epoch"] < 39  # killed mid-way
    assert not (out / "encoder").exists()
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from {ckpt}" in done.stdout
    history = json.loads((out / "pretrain.json").read_text())["history"]
    assert len(history) == 40
    kept = saved["epoch"] + 1
    # epochs before the kill were not re-run: their logs (wall times included) are the saved ones
    assert [h["epoch_time_s"] for h in history[:kept]] == [
        h["epoch_time_s"] for h in saved["history"]
    ]


def _heavy_imports_of(args: list[str], code: int, cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter; fail if it exits otherwise than with ``code`` or
    imported torch, pymatgen, scikit-learn, matbench or MLflow."""
    script = (
        f"import runpy, sys; sys.argv = ['matbench-dim', *{args!r}]\n"
        "try:\n    runpy.run_module('matbench_dim', run_name='__main__')\n"
        f"except SystemExit as e:\n    assert (e.code or 0) == {code}, e.code\n"
        "heavy = [m for m in ('torch', 'pymatgen.core', 'sklearn', 'matbench', 'mlflow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


def test_python_m_runs_the_cli_and_tasks_loads_no_torch(tmp_path):
    """`python -m matbench_dim` is the CLI; `tasks`, `--help` and a misspelled option of a
    training command never import torch (the thread set-up waits until options parse)."""
    out = _heavy_imports_of(["tasks"], 0, tmp_path)
    misspelled = _heavy_imports_of(["run", "--n-label", "20"], 2, tmp_path)
    assert "No such option: --n-label" in misspelled.stderr
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    assert "sample:flla" in names
    assert "matbench_mp_gap" in names
    helped = subprocess.run(
        [sys.executable, "-m", "matbench_dim", "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert helped.returncode == 0
    assert "bench" in helped.stdout
