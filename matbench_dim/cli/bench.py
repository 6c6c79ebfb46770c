"""``matbench-dim bench`` (the label-masking grid) and ``report`` (its tables and curves)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from matbench_dim.cli.support import (
    NoTracking,
    Params,
    TrackingUri,
    UserError,
    check_params,
    echo_lines,
    existing,
    int_values,
    load_task_quietly,
    parse_params,
    quiet_matbench,
    split_values,
    task_spec,
    tuned_params,
)


def bench(
    tasks: Annotated[
        list[str],
        typer.Option(
            "--tasks",
            "--task",
            help="Task NAME or NAME:TARGET, or PATH[:TARGET] of your own data set (repeatable).",
        ),
    ],
    folds: Annotated[list[str] | None, typer.Option(help="Folds (default: all).")] = None,
    n_labels: Annotated[
        list[str] | None, typer.Option(help="Labelled-subset sizes (default 50,100,250,500,1000).")
    ] = None,
    seeds: Annotated[list[str] | None, typer.Option(help="Seeds (default 0,1,2,3,4).")] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(
            help="Methods (default dummy_mean,rf_magpie,dim,random_init; band-gap targets "
            "also zero,median)."
        ),
    ] = None,
    max_train_structures: Annotated[
        int | None, typer.Option(help="Cap on each fold's pretraining structures.")
    ] = None,
    extra_pool: Annotated[
        str | None,
        typer.Option(
            help="More label-free structures for every pretraining pool: a task name or a "
            "path; copies of the task's own labelled structures are dropped first."
        ),
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
    from matbench_dim.bench.grid import DEFAULT_N_LABELS, DEFAULT_SEEDS, run_grid
    from matbench_dim.bench.methods import SITENET_NAMES, default_methods
    from matbench_dim.bench.report import summarize
    from matbench_dim.data.user import is_dataset_path

    if backend not in ("loky", "dask"):
        raise UserError(f"--backend must be loky or dask, got {backend!r}")
    specs = [task_spec(s) for s in split_values(tasks)]
    ns = int_values(n_labels, "--n-labels") or list(DEFAULT_N_LABELS)
    chosen = split_values(methods)
    # default: DEFAULT_METHODS, plus the zero / median predictors for band-gap targets
    per_spec = {s: chosen or default_methods(s[1] or s[0]) for s in specs}
    method_names = list(dict.fromkeys(m for names in per_spec.values() for m in names))
    extra = parse_params(param)
    sitenet = [m for m in method_names if m in SITENET_NAMES]
    if extra and not sitenet:
        raise UserError("--param sets Site-Net estimator parameters; no Site-Net method chosen")
    if extra:
        check_params(extra)
    quiet_matbench()
    grid = {
        "folds": int_values(folds, "--folds") or None,
        "seeds": int_values(seeds, "--seeds") or list(DEFAULT_SEEDS),
        "methods": method_names,
        "max_train_structures": max_train_structures,
        "n_jobs": n_jobs,
        "backend": backend,
        "scheduler_address": scheduler_address,
        "data_home": None if data_home is None else str(data_home),
        "tracking_uri": tracking_uri,
        "tracking": not no_tracking,
    }
    own: dict[tuple[str, str | None], Any] = {}  # your own data sets, loaded once

    def grid_task(name: str, target: str | None) -> Any:
        if not is_dataset_path(name) and extra_pool is None:
            return (name, target) if target else name
        if (name, target) not in own:
            task = load_task_quietly(name, target, data_home)
            if extra_pool is not None:
                from matbench_dim.data.pool import extend_pool

                extra = load_task_quietly(*task_spec(extra_pool), data_home)
                more = extra.unlabelled_structures(None)  # structures only, labels unread
                task = extend_pool(task, more, source=extra.name)
                typer.echo(f"{task.name}: extra pool {task.provenance['extra_pool']}", err=True)
            own[name, target] = task
        return own[name, target]

    # tuned parameters depend on (task, n): one grid call per pair; otherwise one call per
    # set of methods (band-gap tasks get more baselines by default)
    groups: dict[tuple[str, ...], list[tuple[str, str | None]]] = {}
    for s in specs:
        groups.setdefault(tuple(per_spec[s]), []).append(s)
    calls = [(group, ns, {}, list(names)) for names, group in groups.items()]
    if params_from_study and sitenet:
        calls = [
            ([s], [n], tuned_params(_task_name(grid_task(*s)), s[1], n, study_storage), per_spec[s])
            for s in specs
            for n in ns
        ]
    t0 = time.perf_counter()
    totals = {"cells": 0, "run": 0, "skipped": 0, "pretrained": 0, "recorded": 0}
    parents: dict[str, str] = {}
    left_out: dict[str, str] = {}
    for call_specs, call_ns, tuned, call_methods in calls:
        est_params = {**tuned, **extra}
        method_params: dict[str, dict[str, Any]] = {
            m: {"estimator_params": est_params} for m in sitenet
        }
        if "transfer" in method_params:
            method_params["transfer"]["transfer_target"] = transfer_target
        summary = run_grid(
            [grid_task(name, target) for name, target in call_specs],
            out,
            n_labels=call_ns,
            method_params={m: p for m, p in method_params.items() if m in call_methods},
            **{**grid, "methods": call_methods},
        )
        for key in totals:
            totals[key] += getattr(summary, f"n_{key}")
        parents.update(summary.tracking_runs)
        left_out.update(summary.skipped_methods)
    table = summarize(summary.results())
    lines = [f"skipped {name}: {why}" for name, why in left_out.items()]
    lines += [
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
    echo_lines(lines)


def _task_name(task: Any) -> str:
    return task if isinstance(task, str) else task[0] if isinstance(task, tuple) else task.name


def report(
    results_dir: Annotated[Path, typer.Argument(help="Results folder of `bench`.")],
    out: Annotated[
        Path | None, typer.Option(help="Where to write (default RESULTS_DIR/report).")
    ] = None,
    reference: Annotated[
        list[str] | None,
        typer.Option(
            help="Method compared pairwise to the others (repeatable; default dim, dim_rf)."
        ),
    ] = None,
) -> None:
    """Learning curves (PNG), a markdown table and paired statistics from a results folder."""
    from matbench_dim.bench.report import write_report

    refs = split_values(reference) if reference else ["dim", "dim_rf"]
    paths = write_report(existing(results_dir, "results folder"), out, reference=refs)
    lines = [f"table: {paths.pop('markdown')}"]
    lines += [f"learning curve {key}: {png}" for key, png in paths.items()]
    echo_lines(lines)
