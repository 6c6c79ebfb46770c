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
