"""The README's Python blocks run as written (a newcomer copies them verbatim).

- every ```python block compiles, and every name it imports from matbench_dim exists;
- the MLflow-model block runs against a store made by ``matbench-dim run`` in a temporary
  folder, with ``<run_id>`` replaced by that run's id and ``my.cif`` written there; it leaves
  no stray ``./mlflow.db`` (MLflow's own default store);
- the library block (a real 20-epoch pretraining) runs as written in the slow set.
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
    code = _block("SiteNetDIMRegressor(")
    done = _run(code + "\nprint(len(pred))\n", tmp_path, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0
    assert (tmp_path / "model" / "config.json").is_file()
