"""The benchmark scripts that cannot be measured here (a GPU) still run: their CPU path."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_encoder_benchmark_prints_the_floor_ratio_and_the_parts(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_encoder.py"), "--batches", "1", "--repeats", "1",
         "--structures", "120", "--batch-sites", "300", "--parts"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"DIM step: \d+ crystals/s, [\d.]+x its FLOP floor", lines[-1]), lines
    assert re.fullmatch(r"supervised step: \d+ crystals/s, [\d.]+x its FLOP floor", lines[-2])
    for variant in ("reference", "new, default malloc", "new"):
        assert any(re.match(rf"  {re.escape(variant)} +[\d.]+ crystals/s", ln) for ln in lines)
    parts = {
        m.group(1).strip(): float(m.group(2))
        for ln in lines
        if (m := re.fullmatch(r"  ([a-zA-Z].*?) +([\d.]+)", ln))
    }
    act = [ln for ln in lines if ln.startswith("  activation floor: ")]
    assert len(act) == 2, lines  # the supervised step's and the DIM step's
    for ln in act:
        m = re.search(r"([\d.]+) k mish evaluations/crystal .* = ([\d.]+)x the FLOP floor", ln)
        assert m, ln
        assert float(m.group(1)) > 0, ln
        assert float(m.group(2)) > 0, ln
    step = parts["whole step"]
    for name in ("encoder forward", "local critic forward", "backward", "AdamW step"):
        assert 0 < parts[name] < step, (name, parts)
    assert any(k.startswith("engineered negatives") for k in parts)


def test_activation_count_takes_the_eager_forward_and_restores_the_compile_mode(monkeypatch):
    import torch
    from torch.nn import functional as F

    from matbench_dim.model import fused

    sys.path.insert(0, str(BENCH))
    import bench_encoder

    seen = []

    def forward(x):
        seen.append((fused.compile_mode(), torch.is_grad_enabled()))
        return F.mish(x[:3]).sum() + torch.exp(x[:2, :2]).sum() + F.relu(x).sum()

    monkeypatch.setenv(fused.COMPILE_ENV, "1")
    assert bench_encoder.count_activations(forward, torch.randn(5, 4)) == 3 * 4 + 2 * 2
    assert seen == [("off", False)]
    assert fused.compile_mode() == "always"
    monkeypatch.delenv(fused.COMPILE_ENV)
    bench_encoder.count_activations(forward, torch.randn(5, 4))
    assert fused.COMPILE_ENV not in os.environ


def test_ab_script_prints_the_paired_ratio_of_a_switch(tmp_path):
    small = ["--structures", "120", "--batch-sites", "300", "--batches", "2", "--repeats", "1"]
    for switch in ("shared-negative-pass", "mish-clamp", "mish-grad"):
        proc = subprocess.run(
            [sys.executable, str(BENCH / "ab_dim_step.py"), switch, *small],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        last = proc.stdout.strip().splitlines()[-1]
        pattern = rf"{switch}: old/new [\d.]+x \(paired median, quartiles [\d.]+-[\d.]+\)"
        assert re.fullmatch(pattern, last), last


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
    assert "dim vs random_init, paired: n=50: -19.6 % (3/3 pairs better, Wilcoxon p 0.25)" in text
    collect_cells.write_readme(collect_cells.read(csv), None, readme)
    assert readme.read_text() == text  # idempotent


def test_readme_figures_are_drawn_from_the_csv(tmp_path):
    import pandas as pd

    sys.path.insert(0, str(BENCH))
    import plot_budget

    rows = [
        {"task": task, "target": target, "method": m, "fold": 0, "n": n, "seed": s,
         "mae": 0.5 - 0.001 * n + 0.01 * s, "study": study, "n_test": 10}
        for task, target in (("flla", "formation_energy_per_atom"), ("perovskites_subset", "e_form"))
        for study, _ in plot_budget.BUDGETS
        for m in ("dim", "dim_rf", "random_init", "random_rf", "dummy_mean")
        for n in (50, 100)
        for s in range(2)
    ]  # fmt: skip
    paths = plot_budget.write_figures(pd.DataFrame(rows), tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted([*plot_budget.CURVES.values(), "flla_pretraining_budget.png"])
    assert all(p.stat().st_size > 5000 for p in paths)


def test_study_script_commands_parse_with_the_real_cli(tmp_path):
    """benchmarks/label_masking_study.sh, dry-run with a recorder in place of matbench-dim:
    every bench / report command it runs parses with the real CLI."""
    import json
    import subprocess

    import typer
    from test_readme import _parse

    from matbench_dim.cli.app import app

    log = tmp_path / "argv.jsonl"
    recorder = tmp_path / "record"
    recorder.write_text(
        f"#!{sys.executable}\nimport json, sys\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    recorder.chmod(0o755)
    subprocess.run(
        ["bash", str(BENCH / "label_masking_study.sh"), str(tmp_path / "out")],
        env={"PATH": "/usr/bin:/bin", "MATBENCH_DIM": str(recorder), "PYTHON": str(recorder)},
        check=True,
        timeout=60,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    cli = [c for c in calls if not c[0].endswith(".py")]
    scripts = [c for c in calls if c[0].endswith(".py")]
    assert [c[1] for c in cli].count("bench") == 4
    assert scripts[-1][:2] == ["benchmarks/collect_cells.py", "readme"]
    root = typer.main.get_command(app)
    for args in cli:
        assert _parse(root, args) == "ok", args


def test_tables_mark_cells_with_fewer_runs():
    import pandas as pd

    sys.path.insert(0, str(BENCH))
    import collect_cells

    rows = [
        {"task": "flla", "target": "e", "method": m, "fold": f, "n": n, "seed": 0, "mae": 0.3,
         "study": "st", "n_test": 10}
        for m in ("dim", "rf_magpie") for n in (50, 500) for f in (range(5) if n == 50 else [0])
    ]  # fmt: skip
    text = collect_cells.tables(pd.DataFrame(rows))
    assert "5 runs per cell unless marked" in text
    assert "| dim | 0.300 ± 0.000 | 0.300 ± nan (1 runs) |" in text


def _has_avx512() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512f" in cpuinfo.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(not _has_avx512(), reason="the prototype kernel is written for AVX-512")
@pytest.mark.skipif(shutil.which("ninja") is None, reason="building the kernel needs ninja")
def test_hand_written_attention_prototype_matches_the_core_and_prints_its_speed(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "proto_fused_attention.py"), "--structures", "120",
         "--batch-sites", "300", "--rounds", "1", "--repeats", "2"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    errors = {
        m.group(1): float(m.group(2))
        for ln in lines
        if (m := re.match(r"  (\S+) +largest difference from float64 eager: (\S+)", ln))
    }
    assert set(errors) == {"hand-written", "compiled", "eager"}, lines
    assert errors["hand-written"] < 1e-4
    assert re.fullmatch(
        r"hand-written attention core \(no grad\): [\d.]+x the compiled one", lines[-1]
    ), lines
