"""The ``matbench-dim`` command line.

Every command prints where its outputs went. Errors caused by the user's input (a missing
file, a bad option value, an unknown task) end with a one-line message and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="matbench-dim",
    help="Deep InfoMax pretraining of Site-Net for matbench: run, pretrain, fit, predict, "
    "bench, report, tune.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_STATE: dict[str, Any] = {"debug": False}


class UserError(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")] = False,
    threads: Annotated[
        int | None, typer.Option(help="Torch threads (default: $MATBENCH_DIM_NUM_THREADS or torch's).")
    ] = None,
) -> None:
    """Deep InfoMax pretraining of Site-Net, inside matbench's fold loop."""
    _STATE["debug"] = debug
    logging.basicConfig(
        level=logging.INFO if verbose or debug else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from matbench_dim.runtime import configure_threads

    configure_threads(threads)


def _parse_params(items: list[str] | None) -> dict[str, Any]:
    """``["optimizer__lr=1e-3", "encoder__heads=2"]`` -> dict with JSON-parsed values."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise UserError(f"--param expects NAME=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def _estimator(params: dict[str, Any]) -> Any:
    from matbench_dim.estimator import SiteNetDIMRegressor

    est = SiteNetDIMRegressor()
    try:
        est.set_params(**params)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    return est


@app.command()
def run(
    task: Annotated[str, typer.Option(help="Task name (see `matbench-dim tasks`).")] = "matbench_jdft2d",
    fold: Annotated[int, typer.Option(help="Fold to run.")] = 0,
    n_labels: Annotated[int, typer.Option(help="Labelled training structures.")] = 100,
    seed: Annotated[int, typer.Option(help="Seed of the labelled subset and the model.")] = 0,
    pretrain_epochs: Annotated[int, typer.Option(help="DIM pretraining epochs.")] = 8,
    finetune_epochs: Annotated[int, typer.Option(help="Fine-tuning epochs.")] = 150,
    out: Annotated[Path, typer.Option(help="Output folder.")] = Path("outputs/run"),
    data_home: Annotated[Path | None, typer.Option(help="Folder with the dataset files.")] = None,
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="Estimator parameter NAME=VALUE.")
    ] = None,
) -> None:
    """The main job: pretrain DIM on a fold's training structures, fine-tune on a few labels,
    predict the fold's test set and record it in a matbench results file.

    Defaults run on matbench_jdft2d (shipped with the package) in a few minutes on 2 cores.
    """
    import numpy as np
    import pandas as pd

    from matbench_dim.data import load_task
    from matbench_dim.matbench_io import new_benchmark, record, save_benchmark
    from matbench_dim.protocol import draw_subset

    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    t = load_task(task, data_home=data_home)
    if not 0 <= fold < t.n_folds:
        raise UserError(f"--fold must be in 0..{t.n_folds - 1} for {task}, got {fold}")
    x_train, y_train = t.train_data(fold)
    ids = draw_subset(t.train_ids(fold), n_labels, fold=fold, seed=seed)
    params = {
        "pretrain__epochs": pretrain_epochs,
        "finetune__epochs": finetune_epochs,
        "random_state": seed,
        "encoder__activation": "silu",
        **_parse_params(param),
    }
    est = _estimator(params)
    typer.echo(
        f"{task} fold {fold}: DIM pretraining on {len(x_train)} training structures (labels "
        f"hidden), fine-tuning on {len(ids)} labels, predicting {len(t.test_ids(fold))} test "
        "structures"
    )
    est.fit(x_train.loc[ids], y_train.loc[ids], X_unlabeled=x_train)
    x_test = t.test_inputs(fold)
    pred = est.predict(x_test)
    model_dir = est.save(out / "model")
    est.save_encoder(out / "encoder")
    y_test = t.test_targets(fold).loc[x_test.index].to_numpy(dtype=float)
    mae = float(np.mean(np.abs(pred - y_test)))
    dummy = float(np.mean(np.abs(y_test - y_train.mean())))
    lines = [
        f"test MAE {mae:.4g} {t.unit or ''} (train-mean dummy {dummy:.4g}) on {len(y_test)} structures",
    ]
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
        lines.append(f"matbench results: {path}")
    pd_path = out / "predictions.csv"
    pd.DataFrame({"id": x_test.index, "prediction": pred, "target": y_test}).to_csv(pd_path, index=False)
    lines += [f"predictions: {pd_path}", f"model: {model_dir}", f"encoder: {out / 'encoder'}"]
    lines.append(f"wall time {time.perf_counter() - t0:.0f} s")
    typer.echo("\n".join(lines))


@app.command()
def tasks() -> None:
    """List the task names `--task` accepts and whether their data are present."""
    from matbench_dim.data import available_tasks

    for name, status in available_tasks().items():
        typer.echo(f"{name:32s} {status}")


def main() -> None:
    """Entry point: runs the app and turns user errors into one-line messages."""
    try:
        app(standalone_mode=False)
    except SystemExit as exc:
        raise exc
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        import click

        if isinstance(exc, click.exceptions.Abort):
            typer.echo("aborted", err=True)
            sys.exit(130)
        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if _STATE.get("debug"):
            raise
        typer.echo(f"error: {_one_line(exc)}", err=True)
        sys.exit(2)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    text = msg[0] if msg else type(exc).__name__
    if len(msg) > 1:
        text += " (" + "; ".join(m.strip() for m in msg[1:4] if m.strip()) + ")"
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, UserError) else text


if __name__ == "__main__":
    os.environ.setdefault("MPLBACKEND", "Agg")
    main()
