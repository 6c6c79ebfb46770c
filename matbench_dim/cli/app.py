"""The ``matbench-dim`` command line: run, pretrain, fit, predict, bench, report, tune, tasks.

Every command prints where its outputs went. An error caused by the user's input (an unknown
task, a missing file, a bad ``--param``, ``n`` larger than a fold) ends with a one-line
message on stderr and exit code 2; another failure gives one line and exit code 1.
``matbench-dim --debug <command>`` shows the traceback instead. Library code logs; only the
command line (this module and :mod:`matbench_dim.cli.support`) prints.

Commands that train record an MLflow run (``--tracking-uri``, default ``$MLFLOW_TRACKING_URI``
or ``./mlruns``; ``--no-tracking`` records nothing).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from matbench_dim.cli.support import (
    STATE,
    CLIGroup,
    Command,
    EncoderFrom,
    NoTracking,
    Params,
    TrackingUri,
    UserError,
    check_params,
    echo_lines,
    encoder_folder,
    existing,
    load_task_quietly,
    log_task_provenance,
    make_estimator,
    make_tracker,
    parse_params,
    pretraining_structures,
    quiet_matbench,
    read_cifs,
    show_progress,
)
from matbench_dim.paths import check_writable

os.environ.setdefault("MPLBACKEND", "Agg")

NO_TORCH_COMMANDS = frozenset({"tasks", "report"})
"""Commands that never touch torch: the root callback does not import it for them."""


app = typer.Typer(
    name="matbench-dim",
    cls=CLIGroup,
    help="Deep InfoMax pretraining of Site-Net for matbench: run, pretrain, fit, predict, "
    "bench, report, tune, tasks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from matbench_dim import __version__

        typer.echo(f"matbench-dim {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads (default: $MATBENCH_DIM_NUM_THREADS, else 1 on machines with "
            "at most 2 CPUs, else torch's one per core)."
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Deep InfoMax pretraining of Site-Net, inside matbench's fold loop."""
    STATE.update(debug=debug, verbose=verbose or debug)
    if not (verbose or debug):  # read by MLflow at import: its INFO lines and download bars
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.basicConfig(
        level=logging.INFO if verbose or debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if ctx.invoked_subcommand in NO_TORCH_COMMANDS:
        return  # torch takes about a second to import: only commands that train load it

    def set_up_torch() -> None:
        from matbench_dim.runtime import configure_allocator, configure_threads

        configure_threads(threads)
        configure_allocator()

    STATE["before_command"] = set_up_torch  # run by Command.invoke, after option parsing


# --------------------------------------------------------------------------- run


@app.command(cls=Command)
def run(
    task: Annotated[
        str,
        typer.Option(
            help="Task name (see `matbench-dim tasks`), or the path of your own data set."
        ),
    ] = ("matbench_jdft2d"),
    fold: Annotated[int, typer.Option(help="Fold to run.")] = 0,
    n_labels: Annotated[int, typer.Option(help="Labelled training structures.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the labelled subset and the model.")] = 0,
    pretrain_epochs: Annotated[int, typer.Option(help="DIM pretraining epochs.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 150,
    max_train_structures: Annotated[
        int | None, typer.Option(help="Cap on the pretraining structures (seeded draw).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/run"),
    data_home: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    param: Params = None,
    encoder_from: EncoderFrom = None,
    compare: Annotated[
        bool,
        typer.Option(
            help="Also fine-tune from random weights with the same labels and budget, and print "
            "it beside the DIM result and the train-mean dummy."
        ),
    ] = True,
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """The main job: DIM-pretrain on a fold's training structures (labels hidden), fine-tune
    on a few labels, predict the fold's test set and record it in a matbench results file.

    Defaults run on matbench_jdft2d (shipped with the package) in a few minutes on 2 cores.
    """
    import numpy as np
    import pandas as pd

    from matbench_dim.bench.matbench_io import new_benchmark, record, save_benchmark
    from matbench_dim.bench.subsets import draw_subset
    from matbench_dim.tracking.tracker import task_experiment

    t0 = time.perf_counter()
    params = {
        "pretrain__epochs": pretrain_epochs,
        "finetune__epochs": finetune_epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **parse_params(param),
    }
    est = make_estimator(params)
    check_writable(out)
    t = load_task_quietly(task, data_home=data_home)
    if not 0 <= fold < t.n_folds:
        raise UserError(f"--fold must be in 0..{t.n_folds - 1} for {task}, got {fold}")
    x_train, y_train = t.train_data(fold)
    ids = draw_subset(t.train_ids(fold), n_labels, fold=fold, seed=seed)
    pool = None
    if encoder_from is not None:
        est.set_params(encoder_init=str(encoder_folder(encoder_from, out, tracking_uri)))
        start = f"fine-tuning the encoder {encoder_from}"
    else:
        pool = pretraining_structures(t, fold, max_train_structures)
        start = f"DIM pretraining on {len(pool)} training structures (labels hidden), fine-tuning"
    x_test = t.test_inputs(fold)
    typer.echo(
        f"{task} fold {fold}: {start} on {len(ids)} labels, predicting {len(x_test)} test structures"
    )
    tracker = make_tracker(tracking_uri, no_tracking, task_experiment(t.name))
    tags = {"kind": "run", "method": "dim", "mode": "transfer"}
    with tracker.start_parent_run(f"run {t.name} fold{fold} n{n_labels} seed{seed}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            subsets = {"train": list(ids), "test": list(x_test.index)}
            if pool is not None:
                subsets["pretrain"] = list(pool.index)
            log_task_provenance(mlrun, t, fold=fold, n=n_labels, seed=seed, subset_ids=subsets)
            mlrun.log_params({"encoder_from": encoder_from})
            est.set_params(callbacks=[mlrun.callback()])
        est.fit(x_train.loc[ids], y_train.loc[ids], X_unlabeled=pool)
        pred = est.predict(x_test)
        model_dir = est.save(out / "model")
        y_test = t.test_targets(fold).loc[x_test.index].to_numpy(dtype=float)
        metrics = mlrun.log_test_metrics(y_test, pred)
        dummy = float(np.mean(np.abs(y_test - y_train.loc[ids].mean())))
        mlrun.log_metrics({"test/dummy_mae": dummy})
        unit = f" {t.unit}" if t.unit else ""
        lines = [
            f"test MAE {metrics['mae']:.4g}{unit} (train-mean dummy {dummy:.4g}) on "
            f"{len(y_test)} structures"
        ]
        if compare:
            typer.echo("the same fine-tuning from random weights, for comparison")
            baseline = make_estimator({**params, "random_init": True})
            baseline.fit(x_train.loc[ids], y_train.loc[ids])
            rnd = float(np.mean(np.abs(y_test - baseline.predict(x_test))))
            mlrun.log_metrics({"test/random_init_mae": rnd})
            start_from = "DIM" if encoder_from is None else "the given encoder"
            lines = [
                f"test MAE on {len(y_test)} structures, {len(ids)} labels, same fine-tuning "
                f"budget:",
                f"  fine-tuned from {start_from}: {metrics['mae']:.4g}{unit}",
                f"  from random weights:  {rnd:.4g}{unit}",
                f"  train-mean dummy:     {dummy:.4g}{unit}",
            ]
        pred_path = out / "predictions.csv"
        frame = {"id": x_test.index, "prediction": pred, "target": y_test}
        pd.DataFrame(frame).to_csv(pred_path, index=False)
        mlrun.log_file(pred_path)
        mlrun.log_dir(model_dir, "estimator")
        if mlrun.enabled:
            mlrun.log_pyfunc_model(est, list(x_test.iloc[:2]), output_name=t.target_name)
        if pool is not None:
            est.save_encoder(out / "encoder")
            mlrun.log_dir(out / "encoder", "encoder")
            lines.append(f"encoder: {out / 'encoder'}")
        if t.is_matbench:
            mb = new_benchmark([t])
            run_params = {
                "n_labels": len(ids),
                "seed": seed,
                "labelled_ids": [str(i) for i in ids],
                **{k: v for k, v in est.get_params().items() if k != "callbacks"},
            }
            record(mb, t.name, fold, pd.Series(pred, index=x_test.index), params=run_params)
            path = save_benchmark(mb, out / "results.json.gz")
            mlrun.log_file(path, "matbench")
            lines.append(f"matbench results: {path}")
    lines += [
        f"predictions: {pred_path}",
        f"estimator folder (SiteNetDIMRegressor.load): {model_dir}",
    ]
    if mlrun.run_id is not None:
        lines.append(f"MLflow run {mlrun.run_id} in {tracker.tracking_uri}")
        lines.append(f"MLflow model (CIF in, prediction out): runs:/{mlrun.run_id}/model")
        if pool is not None:
            lines.append(f"reuse the encoder with --encoder-from runs:/{mlrun.run_id}/encoder")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    echo_lines(lines)


# --------------------------------------------------------------------------- pretrain


@app.command(cls=Command)
def pretrain(
    task: Annotated[str | None, typer.Option(help="Pretrain on this task's fold.")] = None,
    cifs: Annotated[
        Path | None, typer.Option(help="...or on your own CIFs (folder or zip).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target of --task (local datasets).")] = None,
    fold: Annotated[int, typer.Option(help="Fold of --task whose training part is used.")] = 0,
    max_train_structures: Annotated[
        int | None, typer.Option(help="Cap on the pretraining structures (seeded draw).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="DIM pretraining epochs.")] = 30,
    seed: Annotated[int, typer.Option(help="Seed of the weights and the DIM samples.")] = 0,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/pretrain"),
    data_home: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    param: Params = None,
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """DIM-pretrain the Site-Net encoder on a task fold's training structures or on your CIFs
    and save it to OUT/encoder. Each epoch is checkpointed to OUT/pretrain.ckpt: re-running
    the same command after an interruption resumes from there."""
    from matbench_dim.tracking.tracker import DEFAULT_EXPERIMENT, task_experiment

    if (task is None) == (cifs is None):
        raise UserError("give exactly one of --task or --cifs")
    t0 = time.perf_counter()
    ckpt = out / "pretrain.ckpt"
    params = {
        "pretrain__epochs": epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **parse_params(param),
        "pretrain__checkpoint": str(ckpt),
    }
    est = make_estimator(params)
    check_writable(out)
    if task is not None:
        t = load_task_quietly(task, target, data_home)
        X = pretraining_structures(t, fold, max_train_structures)
        source, experiment = f"{t.name} fold {fold}", task_experiment(t.name)
    else:
        X, _ = read_cifs(cifs)
        source, experiment = str(cifs), DEFAULT_EXPERIMENT
    resuming = ckpt.exists()
    typer.echo(
        f"DIM pretraining on {len(X)} structures of {source} for {epochs} epochs"
        + (f" (resuming from {ckpt})" if resuming else "")
    )
    tracker = make_tracker(tracking_uri, no_tracking, experiment)
    tags = {"kind": "pretrain", "method": "dim", "mode": "pretrain"}
    with tracker.start_parent_run(f"pretrain {source}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            ids = {"pretrain": [str(i) for i in X.index]}
            if task is not None:
                log_task_provenance(mlrun, t, fold=fold, subset_ids=ids)
            else:
                mlrun.log_provenance(str(cifs), subset_ids=ids)
            est.set_params(callbacks=[mlrun.callback()])
        est.pretrain(X)
        path = est.save_encoder(out / "encoder")
        history = est.pretrain_history_
        manifest = {
            "source": source,
            "n_structures": len(X),
            "ids": [str(i) for i in X.index],
            "params": {k: v for k, v in est.get_params().items() if k != "callbacks"},
            "history": history,
            "mlflow_run_id": mlrun.run_id,
        }
        (out / "pretrain.json").write_text(json.dumps(manifest, indent=1, default=str))
        mlrun.log_dir(path, "encoder")
    last = history[-1] if history else {}
    lines = [f"encoder: {path}", f"checkpoint: {ckpt}"]
    if "train_dim_loss" in last:
        lines.insert(0, f"{len(history)} epochs, last train DIM loss {last['train_dim_loss']:.4g}")
    if mlrun.run_id is not None:
        lines.append(f"MLflow run {mlrun.run_id}: --encoder-from runs:/{mlrun.run_id}/encoder")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    echo_lines(lines)


# --------------------------------------------------------------------------- fit / predict


@app.command(cls=Command)
def fit(
    cifs: Annotated[Path, typer.Option(help="Labelled CIFs (folder or zip).")],
    out: Annotated[Path, typer.Option(help="Folder to save the fitted model in.")],
    csv: Annotated[
        Path | None,
        typer.Option(help="CSV with columns file and the target (default: inside --cifs)."),
    ] = None,
    target_column: Annotated[str, typer.Option(help="Target column of the CSV.")] = "target",
    missing_target: Annotated[
        str,
        typer.Option(
            help="A CSV row with an empty target: raise (an error listing them), or "
            "unlabelled (keep the structure for DIM pretraining only)."
        ),
    ] = "raise",
    unlabelled: Annotated[
        Path | None, typer.Option(help="Extra unlabelled CIFs for DIM pretraining.")
    ] = None,
    encoder_from: EncoderFrom = None,
    no_pretrain: Annotated[
        bool, typer.Option("--no-pretrain", help="Fine-tune from random weights.")
    ] = False,
    pretrain_epochs: Annotated[int, typer.Option(help="DIM pretraining epochs.")] = 30,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 300,
    seed: Annotated[int, typer.Option(help="Seed of the model.")] = 0,
    param: Params = None,
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """Fit on your own labelled CIFs (after DIM pretraining on them and on --unlabelled, with
    labels hidden) and save the model; predict with `matbench-dim predict`."""
    import pandas as pd

    from matbench_dim.data.cif import load_cif_dataset
    from matbench_dim.tracking.tracker import task_experiment

    t0 = time.perf_counter()
    if encoder_from is not None and (unlabelled is not None or no_pretrain):
        raise UserError("--encoder-from excludes --unlabelled and --no-pretrain")
    params = {
        "pretrain__epochs": pretrain_epochs,
        "finetune__epochs": finetune_epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **parse_params(param),
    }
    if missing_target not in ("raise", "unlabelled"):
        raise UserError(f"--missing-target must be raise or unlabelled, got {missing_target!r}")
    est = make_estimator(params)
    if csv is not None:
        existing(csv, "CSV file")
    t = load_cif_dataset(
        existing(cifs, "CIF folder or zip"),
        csv,
        target_column,
        n_splits=None,
        missing_target=missing_target,  # type: ignore[arg-type]
    )
    check_writable(out)  # after the input checks: a refused command leaves no folder behind
    if t.targets is None:
        raise UserError(f"no targets for {cifs}: pass --csv with columns file and {target_column}")
    extra = [] if t.unlabelled_pool is None else [t.unlabelled_pool]
    if unlabelled is not None:
        extra.append(read_cifs(unlabelled)[0])
    pool = None
    if encoder_from is not None:
        est.set_params(encoder_init=str(encoder_folder(encoder_from, out, tracking_uri)))
    elif not no_pretrain:
        pool = pd.concat(extra) if extra else None  # fit pretrains on the labelled ones too
    else:
        est.set_params(random_init=True)
    method = "random_init" if no_pretrain else "dim"
    typer.echo(
        f"fitting on {len(t.structures)} labelled structures"
        + (
            f" after DIM pretraining on {len(t.structures) + sum(map(len, extra))}"
            if method == "dim" and encoder_from is None
            else ""
        )
    )
    tracker = make_tracker(tracking_uri, no_tracking, task_experiment(t.name))
    tags = {"kind": "fit", "method": method, "mode": "transfer"}
    with tracker.start_parent_run(f"fit {t.name}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            log_task_provenance(mlrun, t, subset_ids={"train": list(t.structures.index)})
            est.set_params(callbacks=[mlrun.callback()])
        est.fit(t.structures, t.targets.to_numpy(dtype=float), X_unlabeled=pool)
        path = est.save(out)
        mlrun.log_dir(path, "estimator")
        if mlrun.enabled:
            mlrun.log_pyfunc_model(est, list(t.structures.iloc[:2]), output_name=target_column)
    history = est.history_["finetune"]
    best = history[est.best_epoch_] if 0 <= est.best_epoch_ < len(history) else {}
    lines = [f"estimator folder (SiteNetDIMRegressor.load, or predict --model): {path}"]
    if "val_mae" in best:
        lines.insert(0, f"best validation MAE {best['val_mae']:.4g} (epoch {est.best_epoch_})")
    if mlrun.run_id is not None:
        lines.append(f"MLflow run {mlrun.run_id}; MLflow model runs:/{mlrun.run_id}/model")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    echo_lines(lines)


@app.command(cls=Command)
def predict(
    model: Annotated[str, typer.Option(help="Model folder (from `fit`), or runs:/<id>/estimator.")],
    cifs: Annotated[Path, typer.Option(help="CIFs to predict (folder or zip).")],
    out: Annotated[Path, typer.Option(help="CSV to write (columns id, prediction).")] = Path(
        "predictions.csv"
    ),
    skip_bad: Annotated[
        bool,
        typer.Option(
            help="Skip unreadable CIFs and structures Site-Net cannot take; list them, with "
            "the reason, in OUT's <name>.skipped.csv."
        ),
    ] = False,
    tracking_uri: TrackingUri = None,
) -> None:
    """Predict the property of every CIF in a folder or zip with a fitted model."""
    import pandas as pd

    from matbench_dim.estimator import SiteNetDIMRegressor
    from matbench_dim.features.featurize import FeaturizationError
    from matbench_dim.tracking.tracker import download_artifact_dir

    folder = download_artifact_dir(model, None, tracking_uri, what="model folder")
    check_writable(out.parent)
    X, skipped = read_cifs(cifs, skip_bad=skip_bad)
    est = SiteNetDIMRegressor.load(folder)
    try:
        pred = est.predict(X)
    except FeaturizationError as exc:
        if not skip_bad:
            raise UserError(f"{exc}\n(--skip-bad predicts the others)") from exc
        skipped.update({f"{i}.cif": reason for i, reason in exc.failures.items()})
        X = X.drop(index=list(exc.failures))
        if X.empty:
            raise UserError(f"{cifs}: Site-Net can take none of its structures") from exc
        pred = est.predict(X)
    pd.DataFrame({"id": X.index, "prediction": pred}).to_csv(out, index=False)
    lines = [f"{len(pred)} predictions: {out}"]
    if skip_bad:
        listed = out.with_name(f"{out.stem}.skipped.csv")
        frame = pd.DataFrame({"file": list(skipped), "reason": list(skipped.values())})
        frame.to_csv(listed, index=False)
        lines.append(f"{len(skipped)} skipped (file, reason): {listed}")
    echo_lines(lines)


# --------------------------------------------------------------------------- tune / tasks


@app.command(cls=Command)
def tune(
    task: Annotated[
        str,
        typer.Option(
            help="Task name (see `matbench-dim tasks`), or the path of your own data set."
        ),
    ],
    n_labels: Annotated[int, typer.Option(help="Labelled-subset size to tune for.")],
    trials: Annotated[int, typer.Option(help="Trials the study should hold (resumed).")],
    fold: Annotated[int | None, typer.Option(help="Fold whose training part is used (0).")] = None,
    storage: Annotated[
        str | None, typer.Option(help="Optuna storage URL (default sqlite:///tuning/optuna.db).")
    ] = None,
    target: Annotated[str | None, typer.Option(help="Target (local datasets).")] = None,
    param: Params = None,
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """Tune the estimator with Optuna (inner cross-validation inside a fold's training part)
    and export the best parameters for `bench --params-from-study`."""
    try:
        from matbench_dim.tuning import tune as run_tuning
    except ImportError as exc:
        raise UserError(f"tuning is unavailable in this installation ({exc})") from exc
    extra = parse_params(param)
    if extra:
        check_params(extra)
    quiet_matbench()
    if not STATE["verbose"]:  # our own lines say what Optuna's INFO lines would
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    show_progress("matbench_dim.tuning")  # the plan, each inner split, each trial's time + ETA
    study = run_tuning(
        load_task_quietly(task, target),
        n_labels,
        trials,
        fold=fold,
        storage=storage,
        base_params=extra,
        tracking=not no_tracking,
        tracking_uri=tracking_uri,
    )
    lines = [f"study {study.study_name}: {len(study.trials)} trials"]
    try:
        best = study.best_trial
        lines += [f"best inner-CV MAE {best.value:.4g} (trial {best.number})"]
        lines += [f"  {k} = {v}" for k, v in sorted(best.params.items())]
    except ValueError:
        lines.append("no trial completed yet")
    else:
        from matbench_dim.tuning import best_params_path

        exported = best_params_path(study.user_attrs.get("task", task), n_labels)
        if exported.exists():
            lines.append(f"exported for `bench --params-from-study`: {exported}")
    echo_lines(lines)


@app.command(cls=Command)
def tasks() -> None:
    """List the task names `--task` accepts, and whether their data is on this machine."""
    from matbench_dim.data.sources import available_tasks, task_data_file

    names = available_tasks()
    width = max(map(len, names))
    missing = 0
    for name in names:
        path = task_data_file(name)
        missing += path is None
        where = str(path) if path is not None else "data not on this machine"
        typer.echo(f"{name:<{width}}  {where}")
    if missing:
        typer.echo(
            f"\n{missing} of {len(names)} tasks need data that is not here; `load_task` names the "
            "file and where to put it (or set $MATBENCH_DIM_SHARED_DATA / $MATMINER_DATA)."
        )


from matbench_dim.cli.bench import bench, report  # noqa: E402 - they import only support
from matbench_dim.cli.submit import submit  # noqa: E402

for _command in (bench, report, submit):  # in the order of `matbench-dim --help`
    app.command(cls=Command)(_command)


def main() -> None:
    """Entry point of the ``matbench-dim`` script."""
    app()


if __name__ == "__main__":
    main()
