"""The ``matbench-dim`` command line: run, pretrain, fit, predict, bench, report, tune, tasks.

Every command prints where its outputs went. An error caused by the user's input (an unknown
task, a missing file, a bad ``--param``, ``n`` larger than a fold) ends with a one-line
message on stderr and exit code 2; another failure gives one line and exit code 1.
``matbench-dim --debug <command>`` shows the traceback instead. Library code logs; only this
module prints.

Commands that train record an MLflow run (``--tracking-uri``, default ``$MLFLOW_TRACKING_URI``
or ``./mlruns``; ``--no-tracking`` records nothing).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import sys
import time
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

os.environ.setdefault("MPLBACKEND", "Agg")

_STATE: dict[str, Any] = {"debug": False, "verbose": False}
_INPUT_ERRORS = (ValueError, LookupError, FileNotFoundError, NotADirectoryError, TypeError)
"""Exceptions that mean bad input (exit code 2); anything else is a failure (exit code 1)."""


class UserError(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


_CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)
"""Base of the usage errors of the click that typer runs on (vendored in recent typer)."""


class _Group(TyperGroup):
    """Turns every error into one line on stderr and an exit code (unless ``--debug``)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        _STATE["debug"] = False
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            code = rv if isinstance(rv, int) else 0
        except _CLICK_ERROR as exc:
            code = int(getattr(exc, "exit_code", 2))
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]
            else:
                hint = " (see --help)" if isinstance(exc, typer.BadParameter.__mro__[1]) else ""
                message = exc.format_message()  # type: ignore[attr-defined]
                typer.echo(f"error: {_one_line(message)}{hint}", err=True)
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 130
        except Exception as exc:
            if _STATE["debug"]:
                raise
            code = 2 if isinstance(exc, (UserError, *_INPUT_ERRORS)) else 1
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            kind = "" if isinstance(exc, UserError) else f"{type(exc).__name__}: "
            more = "" if code == 2 else " (run with --debug for the traceback)"
            typer.echo(f"error: {kind}{_one_line(text) or type(exc).__name__}{more}", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] + (
        f" ({'; '.join(lines[1:4])}{'; ...' if len(lines) > 4 else ''})" if len(lines) > 1 else ""
    )


app = typer.Typer(
    name="matbench-dim",
    cls=_Group,
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
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    threads: Annotated[
        int | None,
        typer.Option(help="Torch threads (default: $MATBENCH_DIM_NUM_THREADS or torch's)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """Deep InfoMax pretraining of Site-Net, inside matbench's fold loop."""
    _STATE.update(debug=debug, verbose=verbose or debug)
    logging.basicConfig(
        level=logging.INFO if verbose or debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from matbench_dim.runtime import configure_threads

    configure_threads(threads)


# --------------------------------------------------------------------------- shared helpers

TrackingUri = Annotated[
    str | None,
    typer.Option(help="MLflow store (default: $MLFLOW_TRACKING_URI, else ./mlruns)."),
]
NoTracking = Annotated[bool, typer.Option("--no-tracking", help="Record no MLflow run.")]
Params = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Estimator parameter NAME=VALUE (repeatable)."),
]
EncoderFrom = Annotated[
    str | None,
    typer.Option(
        help="Pretrained encoder to fine-tune from: a folder, or runs:/<run_id>/encoder "
        "(skips pretraining)."
    ),
]


def _quiet_matbench() -> None:
    """matbench logs INFO on every benchmark it builds: keep it to warnings (unless -v)."""
    import matbench.bench  # noqa: F401 - its import installs the logger we quiet

    if not _STATE["verbose"]:
        logging.getLogger("matbench").setLevel(logging.WARNING)


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["optimizer__lr=1e-3", "encoder__heads=2"]`` -> dict with JSON-parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--param expects NAME=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _check_params(params: dict[str, Any]) -> None:
    """Reject names the estimator does not have and values its configs refuse."""
    from matbench_dim.estimator import SiteNetDIMRegressor

    valid = SiteNetDIMRegressor().get_params(deep=False)
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--param: unknown estimator parameter {key!r}{hint}")
    try:
        SiteNetDIMRegressor(**params)._validate()
    except (ValueError, TypeError) as exc:
        raise UserError(f"--param: {_one_line(str(exc))}") from exc


def _estimator(params: dict[str, Any]) -> Any:
    from matbench_dim.estimator import SiteNetDIMRegressor

    _check_params(params)
    return SiteNetDIMRegressor(**params)


def _tracker(uri: str | None, no_tracking: bool, experiment: str) -> Any:
    from matbench_dim.tracking import setup_tracking

    return setup_tracking(uri, experiment, enabled=not no_tracking)


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    return path


def _read_cifs(path: Path) -> Any:
    """Structures of every CIF in a folder or zip, as a Series indexed by file stem."""
    import pandas as pd

    from matbench_dim.datasets.cif import CifError, parse_cif, read_members

    cifs, _, _ = read_members(_existing(path, "CIF folder or zip"))
    if not cifs:
        raise UserError(f"{path} holds no .cif files")
    structures, errors = {}, []
    for member, data in cifs.items():
        stem = PurePosixPath(member).name[:-4]
        if stem in structures:
            raise UserError(f"{path}: two CIF files named {stem}.cif")
        try:
            structures[stem] = parse_cif(data.decode("utf-8", errors="replace"), f"{path}/{member}")
        except CifError as exc:
            errors.append(str(exc))
    if errors:
        raise UserError(f"{len(errors)} unreadable CIF file(s), e.g. {errors[0]}")
    return pd.Series(structures, dtype=object)


def _load_task(name: str, target: str | None = None, data_home: Path | None = None) -> Any:
    from matbench_dim.data import load_task

    _quiet_matbench()
    return load_task(name, target=target, data_home=data_home)


def _pretraining_pool(task: Any, fold: int, max_train_structures: int | None) -> Any:
    """The fold's label-free pool (capped, seeded), checked against the fold's test ids."""
    from matbench_dim.protocol import check_disjoint, pretraining_pool

    pool_all = task.unlabelled_structures(fold)
    pool = pretraining_pool(list(pool_all.index), max_train_structures, fold)
    check_disjoint(pool, task.test_ids(fold), stage="pretraining", where=f"{task.name} fold {fold}")
    return pool_all.loc[pool]


def _encoder_from(uri: str, out: Path, tracking_uri: str | None) -> Path:
    from matbench_dim.tracking import download_encoder, is_artifact_uri

    dst = out / "encoder_from" if is_artifact_uri(uri) else None
    if dst is not None:
        dst.mkdir(parents=True, exist_ok=True)
    return download_encoder(uri, dst, tracking_uri)


def _task_provenance(run: Any, task: Any, **extra: Any) -> None:
    from matbench_dim.cells import data_sha256
    from matbench_dim.recording import data_provenance

    run.log_provenance(task.name, **extra, **data_provenance(task, data_sha256(task)))


def _print(lines: list[str]) -> None:
    typer.echo("\n".join(lines))


# --------------------------------------------------------------------------- run


@app.command()
def run(
    task: Annotated[str, typer.Option(help="Task name (see `matbench-dim tasks`).")] = (
        "matbench_jdft2d"
    ),
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
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """The main job: DIM-pretrain on a fold's training structures (labels hidden), fine-tune
    on a few labels, predict the fold's test set and record it in a matbench results file.

    Defaults run on matbench_jdft2d (shipped with the package) in a few minutes on 2 cores.
    """
    import numpy as np
    import pandas as pd

    from matbench_dim.matbench_io import new_benchmark, record, save_benchmark
    from matbench_dim.protocol import draw_subset
    from matbench_dim.tracking import task_experiment

    t0 = time.perf_counter()
    params = {
        "pretrain__epochs": pretrain_epochs,
        "finetune__epochs": finetune_epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **_parse_params(param),
    }
    est = _estimator(params)
    t = _load_task(task, data_home=data_home)
    if not 0 <= fold < t.n_folds:
        raise UserError(f"--fold must be in 0..{t.n_folds - 1} for {task}, got {fold}")
    x_train, y_train = t.train_data(fold)
    ids = draw_subset(t.train_ids(fold), n_labels, fold=fold, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    pool = None
    if encoder_from is not None:
        est.set_params(encoder_init=str(_encoder_from(encoder_from, out, tracking_uri)))
        start = f"fine-tuning the encoder {encoder_from}"
    else:
        pool = _pretraining_pool(t, fold, max_train_structures)
        start = f"DIM pretraining on {len(pool)} training structures (labels hidden), fine-tuning"
    x_test = t.test_inputs(fold)
    typer.echo(
        f"{task} fold {fold}: {start} on {len(ids)} labels, predicting {len(x_test)} test structures"
    )
    tracker = _tracker(tracking_uri, no_tracking, task_experiment(t.name))
    tags = {"kind": "run", "method": "dim", "mode": "transfer"}
    with tracker.start_parent_run(f"run {t.name} fold{fold} n{n_labels} seed{seed}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            subsets = {"train": list(ids), "test": list(x_test.index)}
            if pool is not None:
                subsets["pretrain"] = list(pool.index)
            _task_provenance(mlrun, t, fold=fold, n=n_labels, seed=seed, subset_ids=subsets)
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
        pred_path = out / "predictions.csv"
        frame = {"id": x_test.index, "prediction": pred, "target": y_test}
        pd.DataFrame(frame).to_csv(pred_path, index=False)
        mlrun.log_file(pred_path)
        mlrun.log_dir(model_dir, "estimator")
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
    lines += [f"predictions: {pred_path}", f"model: {model_dir}"]
    if mlrun.run_id is not None:
        lines.append(f"MLflow run {mlrun.run_id} in {tracker.tracking_uri}")
        if pool is not None:
            lines.append(f"reuse the encoder with --encoder-from runs:/{mlrun.run_id}/encoder")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    _print(lines)


# --------------------------------------------------------------------------- pretrain


@app.command()
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
    from matbench_dim.tracking import DEFAULT_EXPERIMENT, task_experiment

    if (task is None) == (cifs is None):
        raise UserError("give exactly one of --task or --cifs")
    t0 = time.perf_counter()
    ckpt = out / "pretrain.ckpt"
    params = {
        "pretrain__epochs": epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **_parse_params(param),
        "pretrain__checkpoint": str(ckpt),
    }
    est = _estimator(params)
    if task is not None:
        t = _load_task(task, target, data_home)
        X = _pretraining_pool(t, fold, max_train_structures)
        source, experiment = f"{t.name} fold {fold}", task_experiment(t.name)
    else:
        X = _read_cifs(cifs)
        source, experiment = str(cifs), DEFAULT_EXPERIMENT
    out.mkdir(parents=True, exist_ok=True)
    resuming = ckpt.exists()
    typer.echo(
        f"DIM pretraining on {len(X)} structures of {source} for {epochs} epochs"
        + (f" (resuming from {ckpt})" if resuming else "")
    )
    tracker = _tracker(tracking_uri, no_tracking, experiment)
    tags = {"kind": "pretrain", "method": "dim", "mode": "pretrain"}
    with tracker.start_parent_run(f"pretrain {source}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            ids = {"pretrain": [str(i) for i in X.index]}
            if task is not None:
                _task_provenance(mlrun, t, fold=fold, subset_ids=ids)
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
    _print(lines)


# --------------------------------------------------------------------------- fit / predict


@app.command()
def fit(
    cifs: Annotated[Path, typer.Option(help="Labelled CIFs (folder or zip).")],
    out: Annotated[Path, typer.Option(help="Folder to save the fitted model in.")],
    csv: Annotated[
        Path | None,
        typer.Option(help="CSV with columns file and the target (default: inside --cifs)."),
    ] = None,
    target_column: Annotated[str, typer.Option(help="Target column of the CSV.")] = "target",
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

    from matbench_dim.data import load_cif_dataset
    from matbench_dim.tracking import task_experiment

    t0 = time.perf_counter()
    if encoder_from is not None and (unlabelled is not None or no_pretrain):
        raise UserError("--encoder-from excludes --unlabelled and --no-pretrain")
    params = {
        "pretrain__epochs": pretrain_epochs,
        "finetune__epochs": finetune_epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        "verbose": 1,
        **_parse_params(param),
    }
    est = _estimator(params)
    if csv is not None:
        _existing(csv, "CSV file")
    t = load_cif_dataset(_existing(cifs, "CIF folder or zip"), csv, target_column, n_splits=None)
    if t.targets is None:
        raise UserError(f"no targets for {cifs}: pass --csv with columns file and {target_column}")
    extra = [] if t.unlabelled_pool is None else [t.unlabelled_pool]
    if unlabelled is not None:
        extra.append(_read_cifs(unlabelled))
    pool = None
    if encoder_from is not None:
        est.set_params(encoder_init=str(_encoder_from(encoder_from, out, tracking_uri)))
    elif not no_pretrain:
        pool = pd.concat(extra) if extra else t.structures
    method = "dim" if pool is not None or encoder_from else "random_init"
    typer.echo(
        f"fitting on {len(t.structures)} labelled structures"
        + (
            f" after DIM pretraining on {len(t.structures) + sum(map(len, extra))}"
            if pool is not None
            else ""
        )
    )
    tracker = _tracker(tracking_uri, no_tracking, task_experiment(t.name))
    tags = {"kind": "fit", "method": method, "mode": "transfer"}
    with tracker.start_parent_run(f"fit {t.name}", tags) as mlrun:
        if mlrun.enabled:
            mlrun.log_estimator_params(est)
            _task_provenance(mlrun, t, subset_ids={"train": list(t.structures.index)})
            est.set_params(callbacks=[mlrun.callback()])
        est.fit(t.structures, t.targets.to_numpy(dtype=float), X_unlabeled=pool)
        path = est.save(out)
        mlrun.log_dir(path, "estimator")
        if mlrun.enabled:
            mlrun.log_pyfunc_model(est, list(t.structures.iloc[:2]), output_name=target_column)
    history = est.history_["finetune"]
    best = history[est.best_epoch_] if 0 <= est.best_epoch_ < len(history) else {}
    lines = [f"model: {path}"]
    if "val_mae" in best:
        lines.insert(0, f"best validation MAE {best['val_mae']:.4g} (epoch {est.best_epoch_})")
    if mlrun.run_id is not None:
        lines.append(f"MLflow run {mlrun.run_id}; MLflow model runs:/{mlrun.run_id}/model")
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    _print(lines)


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="Model folder (from `fit`), or runs:/<id>/estimator.")],
    cifs: Annotated[Path, typer.Option(help="CIFs to predict (folder or zip).")],
    out: Annotated[Path, typer.Option(help="CSV to write (columns id, prediction).")] = Path(
        "predictions.csv"
    ),
    tracking_uri: TrackingUri = None,
) -> None:
    """Predict the property of every CIF in a folder or zip with a fitted model."""
    import pandas as pd

    from matbench_dim.estimator import SiteNetDIMRegressor
    from matbench_dim.tracking import download_artifact_dir

    folder = download_artifact_dir(model, None, tracking_uri, what="model folder")
    est = SiteNetDIMRegressor.load(folder)
    X = _read_cifs(cifs)
    pred = est.predict(X)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"id": X.index, "prediction": pred}).to_csv(out, index=False)
    _print([f"{len(pred)} predictions: {out}"])


# --------------------------------------------------------------------------- bench / report


def _split(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values: ``["50,100", "250"]`` -> 3 items."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def _ints(values: list[str] | None, option: str) -> list[int]:
    try:
        return [int(v) for v in _split(values)]
    except ValueError as exc:
        raise UserError(f"{option} expects integers, got {values}") from exc


def _task_spec(spec: str) -> tuple[str, str | None]:
    """``name`` or ``name:target`` (``sample:name[:target]`` for the shipped samples)."""
    prefix = "sample:" if spec.startswith("sample:") else ""
    name, _, target = spec[len(prefix) :].partition(":")
    if not name:
        raise UserError(f"--tasks expects NAME or NAME:TARGET, got {spec!r}")
    return prefix + name, target or None


def _tuned_params(task: str, target: str | None, n: int, storage: str | None) -> dict[str, Any]:
    try:
        from matbench_dim.tuning import load_best_params
    except ImportError as exc:
        raise UserError(
            "--params-from-study needs matbench_dim.tuning.load_best_params, which this "
            f"installation lacks ({exc})"
        ) from exc
    try:
        return dict(load_best_params(task, n, None, storage, target=target))
    except (FileNotFoundError, KeyError) as exc:
        raise UserError(f"--params-from-study: {_one_line(str(exc))}") from exc


@app.command()
def bench(
    tasks: Annotated[
        list[str], typer.Option("--tasks", "--task", help="Task NAME or NAME:TARGET (repeatable).")
    ],
    folds: Annotated[list[str] | None, typer.Option(help="Folds (default: all).")] = None,
    n_labels: Annotated[
        list[str] | None, typer.Option(help="Labelled-subset sizes (default 50,100,250,500,1000).")
    ] = None,
    seeds: Annotated[list[str] | None, typer.Option(help="Seeds (default 0,1,2,3,4).")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(help="Methods (default dummy_mean,rf_magpie,dim,random_init)."),
    ] = None,
    max_train_structures: Annotated[
        int | None, typer.Option(help="Cap on each fold's pretraining structures.")
    ] = None,
    n_jobs: Annotated[int, typer.Option(help="Parallel cells (joblib workers).")] = 1,
    backend: Annotated[str, typer.Option(help="loky (local processes) or dask.")] = "loky",
    scheduler_address: Annotated[
        str | None, typer.Option(help="Dask scheduler (default: a local cluster).")
    ] = None,
    out: Annotated[Path, typer.Option(help="Results folder (resumed if it exists).")] = Path(
        "outputs/bench"
    ),
    param: Params = None,
    transfer_target: Annotated[
        str | None, typer.Option(help="Property the `transfer` method pretrains on.")
    ] = None,
    params_from_study: Annotated[
        bool,
        typer.Option(help="Use tuned parameters (tuning.load_best_params) per task and n."),
    ] = False,
    study_storage: Annotated[
        str | None, typer.Option(help="Optuna storage for --params-from-study (default: exports).")
    ] = None,
    data_home: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    tracking_uri: TrackingUri = None,
    no_tracking: NoTracking = False,
) -> None:
    """The label-masking benchmark: for each task, fold, method, n and seed, fit on n labels
    and predict the fold's test set. Finished cells are skipped, so a re-run resumes."""
    from matbench_dim.methods import SITENET_NAMES
    from matbench_dim.protocol import DEFAULT_N_LABELS, DEFAULT_SEEDS, run_grid
    from matbench_dim.report import summarize

    if backend not in ("loky", "dask"):
        raise UserError(f"--backend must be loky or dask, got {backend!r}")
    specs = [_task_spec(s) for s in _split(tasks)]
    ns = _ints(n_labels, "--n-labels") or list(DEFAULT_N_LABELS)
    method_names = _split(methods) or ["dummy_mean", "rf_magpie", "dim", "random_init"]
    extra = _parse_params(param)
    sitenet = [m for m in method_names if m in SITENET_NAMES]
    if extra and not sitenet:
        raise UserError("--param sets Site-Net estimator parameters; no Site-Net method chosen")
    if extra:
        _check_params(extra)
    _quiet_matbench()
    grid = {
        "folds": _ints(folds, "--folds") or None,
        "seeds": _ints(seeds, "--seeds") or list(DEFAULT_SEEDS),
        "methods": method_names,
        "max_train_structures": max_train_structures,
        "n_jobs": n_jobs,
        "backend": backend,
        "scheduler_address": scheduler_address,
        "data_home": None if data_home is None else str(data_home),
        "tracking_uri": tracking_uri,
        "tracking": not no_tracking,
    }
    # tuned parameters depend on (task, n): one grid call per pair; otherwise one call
    calls = [(specs, ns, {})]
    if params_from_study and sitenet:
        calls = [([s], [n], _tuned_params(s[0], s[1], n, study_storage)) for s in specs for n in ns]
    t0 = time.perf_counter()
    totals = {"cells": 0, "run": 0, "skipped": 0, "pretrained": 0, "recorded": 0}
    parents: dict[str, str] = {}
    for call_specs, call_ns, tuned in calls:
        est_params = {**tuned, **extra}
        method_params: dict[str, dict[str, Any]] = {
            m: {"estimator_params": est_params} for m in sitenet
        }
        if "transfer" in method_params:
            method_params["transfer"]["transfer_target"] = transfer_target
        summary = run_grid(
            [(name, target) if target else name for name, target in call_specs],
            out,
            n_labels=call_ns,
            method_params=method_params,
            **grid,
        )
        for key in totals:
            totals[key] += getattr(summary, f"n_{key}")
        parents.update(summary.tracking_runs)
    table = summarize(summary.results())
    lines = [
        f"{totals['cells']} cells: {totals['run']} run, {totals['skipped']} already done, "
        f"{totals['pretrained']} pretrainings, {totals['recorded']} matbench records, "
        f"{time.perf_counter() - t0:.0f} s",
    ]
    if not table.empty:
        lines += ["", table.to_string(index=False, float_format=lambda x: f"{x:.4g}"), ""]
    lines += [f"results: {out / 'cells'}"]
    if (out / "matbench").is_dir():
        lines.append(f"matbench results files: {out / 'matbench'}")
    lines += [f"MLflow parent run {rid} ({key})" for key, rid in parents.items()]
    lines.append(f"report: matbench-dim report {out}")
    _print(lines)


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="Results folder of `bench`.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default RESULTS_DIR/report).")
    ] = None,
    reference: Annotated[str, typer.Option(help="Method compared pairwise to the others.")] = "dim",
) -> None:
    """Learning curves (PNG), a markdown table and paired statistics from a results folder."""
    from matbench_dim.report import write_report

    paths = write_report(_existing(results_dir, "results folder"), out, reference=reference)
    lines = [f"table: {paths.pop('markdown')}"]
    lines += [f"learning curve {key}: {png}" for key, png in paths.items()]
    _print(lines)


# --------------------------------------------------------------------------- tune / tasks


@app.command()
def tune(
    task: Annotated[str, typer.Option(help="Task name (see `matbench-dim tasks`).")],
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
    extra = _parse_params(param)
    if extra:
        _check_params(extra)
    _quiet_matbench()
    study = run_tuning(
        _load_task(task, target),
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
    _print(lines)


@app.command()
def tasks() -> None:
    """List the task names `--task` accepts."""
    from matbench_dim.data import available_tasks

    for name in available_tasks():
        typer.echo(name)


def main() -> None:
    """Entry point of the ``matbench-dim`` script."""
    app()


if __name__ == "__main__":
    main()
