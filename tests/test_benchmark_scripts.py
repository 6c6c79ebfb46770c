"""The benchmark scripts that cannot be measured here (a GPU) still run: their CPU path."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_gpu_benchmark_runs_its_cpu_path(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_gpu.py"), "--device", "cpu", "--structures", "40",
         "--steps", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"GPU DIM step: \d+ crystals/s \(fp32\), peak \d+ MiB", lines[-1]), lines
    assert any(line.startswith("one DIM pretraining epoch on 40 structures") for line in lines)
    assert any(re.match(r"supervised fp32 +[\d.]+ crystals/s", line) for line in lines)


def test_readme_tables_are_rewritten_from_the_csv(tmp_path):
    import pandas as pd

    sys.path.insert(0, str(BENCH))
    import collect_cells

    rows = [
        {"task": "flla", "target": "e", "method": m, "fold": 0, "n": 50, "seed": s,
         "mae": mae + 0.01 * s, "study": "st", "n_test": 10}
        for m, mae in (("dim", 0.4), ("random_init", 0.5)) for s in range(3)
    ]  # fmt: skip
    csv = tmp_path / "cells.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{collect_cells.BEGIN}\nSTALE TABLE\n{collect_cells.END}\noutro\n")
    collect_cells.write_readme(collect_cells.read(csv), None, readme)
    text = readme.read_text()
    assert "STALE TABLE" not in text
    assert text.startswith("intro\n")
    assert text.endswith("outro\n")
    assert "| dim | 0.410 ± 0.010 |" in text
    assert "dim vs random_init, paired: n=50: -19.6 % (3/3 pairs better)" in text
    collect_cells.write_readme(collect_cells.read(csv), None, readme)
    assert readme.read_text() == text  # idempotent
