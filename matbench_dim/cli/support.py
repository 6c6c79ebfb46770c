"""Shared pieces of the ``matbench-dim`` command line (:mod:`matbench_dim.cli.app`).

:class:`CLIGroup` turns every error into one line on stderr and an exit code (2 for bad
input, 1 otherwise; ``--debug`` re-raises); the helpers parse and check option values
(``--param``, repeated or comma-separated lists, ``name:target`` task specs), read CIF
folders or zips, and connect commands to the data, tracking and tuning modules.
"""

from __future__ import annotations

import difflib
import json
import logging
import sys
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = [
    "STATE",
    "CLIGroup",
    "EncoderFrom",
    "NoTracking",
    "Params",
    "TrackingUri",
    "UserError",
    "check_params",
    "echo_lines",
    "encoder_folder",
    "existing",
    "int_values",
    "load_task_quietly",
    "log_task_provenance",
    "make_estimator",
    "make_tracker",
    "one_line",
    "parse_params",
    "pretraining_structures",
    "quiet_matbench",
    "read_cifs",
    "split_values",
    "task_spec",
    "tuned_params",
]

STATE: dict[str, Any] = {"debug": False, "verbose": False}
INPUT_ERRORS = (ValueError, LookupError, FileNotFoundError, NotADirectoryError)
"""Exceptions that mean bad input (exit code 2); anything else is a failure (exit code 1)."""


class UserError(Exception):
    """An error in what the user asked for: reported in one line, exit code 2."""


CLICK_ERROR: type[Exception] = next(
    c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException"
)
"""Base of the usage errors of the click that typer runs on (vendored in recent typer)."""


class Command(TyperCommand):
    """Every command of the CLI.

    - Runs ``STATE["before_command"]`` (the group callback's torch set-up) only once the
      command's own options have parsed, so a misspelled option fails without importing torch.
    - Writes required arguments as ``RESULTS_DIR`` in the usage line (typer writes
      ``{results_dir}``, which reads like a format-string placeholder).
    """

    def invoke(self, ctx: Any) -> Any:
        setup = STATE.pop("before_command", None)
        if setup is not None:
            setup()
        return super().invoke(ctx)

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = super().collect_usage_pieces(ctx)
        return [p[1:-1].upper() if p.startswith("{") and p.endswith("}") else p for p in pieces]


class CLIGroup(TyperGroup):
    """Turns every error into one line on stderr and an exit code (unless ``--debug``)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        STATE["debug"] = False
        STATE.pop("before_command", None)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
            code = rv if isinstance(rv, int) else 0
        except CLICK_ERROR as exc:
            code = int(getattr(exc, "exit_code", 2))
            if type(exc).__name__ == "NoArgsIsHelpError":
                exc.show()  # type: ignore[attr-defined]
            else:
                hint = " (see --help)" if isinstance(exc, typer.BadParameter.__mro__[1]) else ""
                message = exc.format_message()  # type: ignore[attr-defined]
                typer.echo(f"error: {one_line(message)}{hint}", err=True)
        except typer.Abort:
            typer.echo("aborted", err=True)
            code = 130
        except Exception as exc:
            if STATE["debug"]:
                raise
            code = 2 if isinstance(exc, (UserError, *INPUT_ERRORS)) else 1
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            kind = "" if isinstance(exc, UserError) else f"{type(exc).__name__}: "
            more = "" if code == 2 else " (run with --debug for the traceback)"
            typer.echo(f"error: {kind}{one_line(text) or type(exc).__name__}{more}", err=True)
        if standalone_mode:
            sys.exit(code)
        return code


def one_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    return lines[0] + (
        f" ({'; '.join(lines[1:4])}{'; ...' if len(lines) > 4 else ''})" if len(lines) > 1 else ""
    )


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


def quiet_matbench() -> None:
    """matbench logs INFO on every benchmark it builds: keep it to warnings (unless -v)."""
    import matbench.bench  # noqa: F401 - its import installs the logger we quiet

    if not STATE["verbose"]:
        logging.getLogger("matbench").setLevel(logging.WARNING)


class _EchoHandler(logging.Handler):
    """Log records as plain lines on the current stderr (the CLI's progress lines)."""

    def emit(self, record: logging.LogRecord) -> None:
        typer.echo(self.format(record), err=True)


def show_progress(logger_name: str) -> None:
    """Print the INFO lines of one library logger (progress, estimates) even without -v."""
    if STATE["verbose"]:
        return  # the root handler already prints them, with timestamps
    log = logging.getLogger(logger_name)
    if not any(isinstance(h, _EchoHandler) for h in log.handlers):
        log.addHandler(_EchoHandler())
    log.setLevel(logging.INFO)
    log.propagate = False


def parse_params(items: list[str] | None) -> dict[str, Any]:
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


def check_params(params: dict[str, Any]) -> None:
    """Reject names the estimator does not have and values its configs refuse."""
    from matbench_dim.estimator import SiteNetDIMRegressor

    valid = SiteNetDIMRegressor().get_params(deep=False)
    for key in params:
        if key not in valid:
            close = difflib.get_close_matches(key, list(valid), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"--param: unknown estimator parameter {key!r}{hint}")
    try:
        SiteNetDIMRegressor(**params).validate_params()
    except (ValueError, TypeError) as exc:
        raise UserError(f"--param: {one_line(str(exc))}") from exc


def make_estimator(params: dict[str, Any]) -> Any:
    from matbench_dim.estimator import SiteNetDIMRegressor

    check_params(params)
    return SiteNetDIMRegressor(**params)


def make_tracker(uri: str | None, no_tracking: bool, experiment: str) -> Any:
    from matbench_dim.tracking.tracker import setup_tracking

    return setup_tracking(uri, experiment, enabled=not no_tracking)


def existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"{what} {path} does not exist")
    return path


def read_cifs(path: Path, skip_bad: bool | None = None) -> tuple[Any, dict[str, str]]:
    """Structures of every CIF in a folder or zip, as a Series indexed by file stem, and the
    files left out (``{file: reason}``; empty unless ``skip_bad``).

    Unreadable files raise one :class:`UserError` listing each of them (the message ``fit``
    gives too), unless ``skip_bad``: then they are skipped and returned with their reasons.
    ``skip_bad=False`` (a command that has ``--skip-bad``) adds a hint to the message.
    """
    import pandas as pd

    from matbench_dim.data.cif import CifError, parse_cif, read_members, unreadable_message

    cifs, _, _ = read_members(existing(path, "CIF folder or zip"))
    if not cifs:
        raise UserError(f"{path} holds no .cif files")
    structures, errors, skipped = {}, [], {}
    for member, data in cifs.items():
        stem = PurePosixPath(member).name[:-4]
        if stem in structures:
            raise UserError(f"{path}: two CIF files named {stem}.cif")
        label = f"{path}/{member}"
        try:
            structures[stem] = parse_cif(data.decode("utf-8", errors="replace"), label)
        except CifError as exc:
            errors.append(str(exc))
            skipped[member] = str(exc).removeprefix(f"{label}: ")
    if errors and not skip_bad:
        hint = "\n(--skip-bad predicts the others)" if skip_bad is False else ""
        raise UserError(unreadable_message(errors) + hint)
    if not structures:
        raise UserError(f"{path}: none of its {len(cifs)} CIF files is readable")
    return pd.Series(structures, dtype=object), skipped


def load_task_quietly(name: str, target: str | None = None, data_home: Path | None = None) -> Any:
    """A built-in task by name, or the user's own data set by path (``data/user.py``)."""
    from matbench_dim.data.user import is_dataset_path, load_user_dataset

    if is_dataset_path(name):
        return load_user_dataset(name, target)
    from matbench_dim.data.sources import load_task

    quiet_matbench()
    return load_task(name, target=target, data_home=data_home)


def pretraining_structures(task: Any, fold: int, max_train_structures: int | None) -> Any:
    """The fold's label-free pool (capped, seeded), checked against the fold's test ids."""
    from matbench_dim.bench.subsets import check_disjoint, pretraining_pool

    pool_all = task.unlabelled_structures(fold)
    pool = pretraining_pool(list(pool_all.index), max_train_structures, fold)
    check_disjoint(pool, task.test_ids(fold), stage="pretraining", where=f"{task.name} fold {fold}")
    return pool_all.loc[pool]


def encoder_folder(uri: str, out: Path, tracking_uri: str | None) -> Path:
    from matbench_dim.tracking.tracker import download_encoder, is_artifact_uri

    dst = out / "encoder_from" if is_artifact_uri(uri) else None
    if dst is not None:
        dst.mkdir(parents=True, exist_ok=True)
    return download_encoder(uri, dst, tracking_uri)


def log_task_provenance(run: Any, task: Any, **extra: Any) -> None:
    from matbench_dim.bench.cells import data_sha256
    from matbench_dim.bench.recording import data_provenance

    run.log_provenance(task.name, **extra, **data_provenance(task, data_sha256(task)))


def echo_lines(lines: list[str]) -> None:
    typer.echo("\n".join(lines))


# --------------------------------------------------------------------------- bench / report


def split_values(values: list[str] | None) -> list[str]:
    """Repeated and/or comma-separated option values: ``["50,100", "250"]`` -> 3 items."""
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def int_values(values: list[str] | None, option: str) -> list[int]:
    try:
        return [int(v) for v in split_values(values)]
    except ValueError as exc:
        raise UserError(f"{option} expects integers, got {values}") from exc


def task_spec(spec: str) -> tuple[str, str | None]:
    """``name`` or ``name:target`` (``sample:name[:target]`` for the shipped samples)."""
    prefix = "sample:" if spec.startswith("sample:") else ""
    name, _, target = spec[len(prefix) :].partition(":")
    if not name:
        raise UserError(f"--tasks expects NAME or NAME:TARGET, got {spec!r}")
    return prefix + name, target or None


def tuned_params(task: str, target: str | None, n: int, storage: str | None) -> dict[str, Any]:
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
        raise UserError(f"--params-from-study: {one_line(str(exc))}") from exc
