"""The README's Python blocks run as written (a newcomer copies them verbatim).

- every ```python block compiles, and every name it imports from matbench_dim exists;
- the MLflow-model block runs against a store made by ``matbench-dim run`` in a temporary
  folder, with ``<run_id>`` replaced by that run's id and ``my.cif`` written there; it leaves
  no stray ``./mlflow.db`` (MLflow's own default store);
- the library block (a real 20-epoch pretraining) and the matbench fold-loop block (five
  15-epoch pretrainings) run as written in the slow set.
"""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def _block(marker: str) -> str:
    found = [b for b in python_blocks() if marker in b]
    assert len(found) == 1, f"expected one README python block with {marker!r}, got {len(found)}"
    return found[0]


def _run(code: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_readme_has_python_blocks_that_compile_and_import_real_names():
    blocks = python_blocks()
    assert len(blocks) >= 2
    for code in blocks:
        tree = ast.parse(code)  # a syntax error fails here
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("matbench_dim"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"{node.module} has no {alias.name}"


def test_readme_mlflow_model_block_runs_against_a_fresh_run(tmp_path, monkeypatch):
    from tiny_settings import TINY

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = [arg for k, v in TINY.items() for arg in ("-p", f"{k}={v}")]
    made = subprocess.run(
        [sys.executable, "-m", "matbench_dim", "run", "--n-labels", "20", "--out", "out",
         "--max-train-structures", "40", *params],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    output = made.stdout + made.stderr
    assert "INFO mlflow" not in output, output  # MLflow's own chatter stays out without -v
    assert "Downloading artifacts" not in output, output
    # the main job shows the method beside its baselines at the same n and budget
    for label in ("fine-tuned from DIM:", "from random weights:", "train-mean dummy:"):
        assert re.search(rf"{label}\s+\d", made.stdout), made.stdout
    model_line = next(
        line for line in made.stdout.splitlines() if "runs:/" in line and "/model" in line
    )
    run_id = re.search(r"runs:/(\w+)/model", model_line).group(1)

    from matbench_dim.data.sources import load_task

    structure = load_task("sample:matbench_jdft2d").structures.iloc[0]
    (tmp_path / "my.cif").write_text(structure.to(fmt="cif"))
    code = _block("mlflow.pyfunc.load_model").replace("<run_id>", run_id)
    done = _run(code, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    numbers = re.findall(r"-?\d+\.\d+", done.stdout)
    assert numbers, done.stdout
    assert not (tmp_path / "mlflow.db").exists(), "the snippet used MLflow's default store"


@pytest.mark.slow
def test_readme_library_block_runs_as_written(tmp_path):
    code = _block("est = SiteNetDIMRegressor(")
    done = _run(code + "\nprint(len(pred))\n", tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0
    assert (tmp_path / "model" / "config.json").is_file()


@pytest.mark.slow
@pytest.mark.timeout(3600)  # five real pretrainings: ~10 min here, past the default 600 s
def test_readme_matbench_fold_loop_block_runs_as_written(tmp_path):
    """The block that runs the estimator inside matbench's own fold loop (~12 min here)."""
    code = _block("new_benchmark(")
    check = (
        "\nfrom matbench.bench import MatbenchBenchmark\n"
        "back = MatbenchBenchmark.from_file('results.json.gz')\n"
        "t = back.tasks_map['matbench_jdft2d']\n"
        "print(len(t.results), back.is_recorded)\n"
    )
    done = _run(code + check, tmp_path, timeout=3600)
    assert done.returncode == 0, done.stderr[-3000:]
    n_folds, recorded = done.stdout.split()[-2:]
    assert (int(n_folds), recorded) == (5, "True")


# Commands of the README: `matbench-dim CMD ...` in a code span or a bash block, and the
# `tox -e cli -- CMD ...` / `python -m matbench_dim CMD ...` forms in bash blocks. A bash
# block's command must be complete; a code span in prose may name a command with only the
# option it talks about ("`matbench-dim bench --params-from-study`"), so missing required
# options are allowed there, unknown options and bad values are not. Spans with "/" or "..."
# ("`matbench-dim fit / predict`") are prose, not commands.
_CLI = re.compile(r"(?:matbench-dim|-m matbench_dim|tox -e cli --)\s+([^`\n]*)")


def readme_commands() -> list[tuple[list[str], bool]]:
    """``(argv, complete)`` of every README command; ``complete`` for bash-block lines."""
    import shlex

    text = README.read_text(encoding="utf-8")
    found: list[tuple[str, bool]] = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.splitlines():
            code = line.split(" #", 1)[0]
            found += [(m.group(1), True) for m in _CLI.finditer(code)]
    for span in re.findall(r"`(matbench-dim [^`]+)`", text):
        if "/" not in span and "..." not in span:
            found += [(m.group(1), False) for m in _CLI.finditer(span)]
    return [(shlex.split(c), complete) for c, complete in found if c.strip()]


def _parse(root, args: list[str]) -> str:
    """``"ok"``, ``"exit <code>"`` (--help) or ``"missing"`` (a required option is absent);
    an unknown command, option or bad value raises."""
    import typer

    try:
        with root.make_context("matbench-dim", list(args)) as ctx:
            rest = [*getattr(ctx, "_protected_args", []), *ctx.args]
            name, sub, sub_args = root.resolve_command(ctx, rest)
            sub.make_context(name, sub_args, parent=ctx)
    except typer.Exit as done:
        return f"exit {done.exit_code}"
    except typer.BadParameter as bad:  # typer's click: MissingParameter is a BadParameter
        if type(bad).__name__ != "MissingParameter":
            raise
        return "missing"
    return "ok"


def test_readme_commands_parse_with_the_real_cli():
    """Every option of every README command exists and takes the value written there
    (parsed by the real click command, not run: some are studies of minutes to hours)."""
    import typer

    from matbench_dim.cli.app import app

    commands = readme_commands()
    assert {"run", "tasks", "tune", "bench", "--help"} <= {a[0] for a, _ in commands}, commands
    root = typer.main.get_command(app)
    for args, complete in commands:
        outcome = _parse(root, args)
        assert outcome in ("ok", "exit 0", "missing"), (args, outcome)
        assert not (complete and outcome == "missing"), f"README command {args} is incomplete"
