"""``matbench-dim submit``: a matbench leaderboard submission folder, fold by fold, resumable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from matbench_dim.cli.support import (
    Params,
    UserError,
    check_params,
    echo_lines,
    int_values,
    load_task_quietly,
    parse_params,
    show_progress,
    split_values,
)


def submit(
    tasks: Annotated[
        list[str], typer.Option(help="matbench task names (repeatable or comma-separated).")
    ],
    authors: Annotated[str, typer.Option(help="Authors, for info.json.")],
    out: Annotated[
        Path, typer.Option(help="Submission folder (resumed when it holds an earlier run).")
    ] = Path("submissions/matbench_v0.1_SiteNet-DIM"),
    algorithm: Annotated[str, typer.Option(help="Short algorithm name (info.json).")] = (
        "SiteNet-DIM"
    ),
    notes: Annotated[str, typer.Option(help="Free-form notes (info.json).")] = "",
    seed: Annotated[int, typer.Option(help="random_state of every fold's estimator.")] = 0,
    folds: Annotated[
        list[str] | None, typer.Option(help="Folds to run now (default all five).")
    ] = None,
    ensemble: Annotated[
        int,
        typer.Option(help="Fine-tunes per fold from one pretraining; >= 2 records their std."),
    ] = 1,
    param: Params = None,
) -> None:
    """Fit DIM pretraining + fine-tuning on every training fold, record the test folds, and
    write the folder matbench's leaderboard takes (results.json.gz, info.json, source)."""
    from matbench_dim.bench.submission import SubmissionInfo, check_submission, run_submission

    params = parse_params(param)
    check_params(params)
    names = split_values(tasks)
    if not names:
        raise UserError("--tasks names no task")
    chosen = int_values(folds, "--folds") or None
    bad = [f for f in chosen or [] if not 0 <= f < 5]
    if bad:
        raise UserError(f"--folds: matbench has folds 0-4, got {bad}")
    try:
        info = SubmissionInfo(authors=authors, algorithm=algorithm, notes=notes)
    except ValueError as exc:
        raise UserError(str(exc)) from exc
    loaded = [load_task_quietly(name) for name in names]
    show_progress("matbench_dim.bench.submission")  # one line per finished fold
    mb = run_submission(loaded, out, info=info, estimator_params=params, seed=seed, folds=chosen)
    lines = []
    for task in mb.tasks:
        done = [f for f, ok in task.is_recorded.items() if ok]
        lines.append(f"{task.dataset_name}: folds {done} recorded")
    try:
        scores = check_submission(out)
    except ValueError as exc:
        lines += [f"not complete yet: {exc}", "run the same command again to continue"]
    else:
        lines += [f"{name}: mean test MAE over 5 folds {mae:.4g}" for name, mae in scores.items()]
        lines.append("valid (read by MatbenchBenchmark.from_file; info.json has every key)")
    lines.append(f"submission folder: {out}")
    echo_lines(lines)
