"""Targeted mutation check: plant named, semantic bugs and prove the tests catch each one.

Usage (also ``python3.11 -m tox -e mutation``)::

    python tests/mutation_check.py [--only NAME ...] [--list]

For each mutant, a copy of the repository's package and tests goes to a temporary folder,
the one edit is applied (it must match exactly once, so a refactor that moves the code makes
the check fail loudly rather than test nothing), and the tests that claim to guard it run
against the copy. A mutant survives when those tests still pass. First the same tests run
on the unmutated copy: they must pass, or a "caught" would mean nothing.

Exits non-zero naming every survivor; the last line is ``mutants: <k> of <m> caught``.
A general tool (mutmut) is too slow for this package on two cores; the list is the point:
each entry is a bug that would make a published number wrong.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]


MUTANTS = (
    Mutant(
        "an odd batch reuses negative 1's pass for negative 2 (a different corruption)",
        "matbench_dim/model/negatives.py",
        "if stochastic or not torch.equal(src_back, src):",
        "if stochastic:",
        (
            "tests/model/test_dim_step_equivalence.py::test_engineered_negatives_share_a_pass_only_when_the_batch_is_even",
        ),
    ),
    Mutant(
        "the one-division mish derivative loses a factor of 2",
        "matbench_dim/model/fused.py",
        "t + 4.0 * x * e * (1.0 + e) * (inv * inv)",
        "t + 2.0 * x * e * (1.0 + e) * (inv * inv)",
        ("tests/model/test_dim_step_equivalence.py::test_fast_mish_forms_keep_the_values",),
    ),
    Mutant(
        "the pair embedding's LayerNorm scale gets the bias's gradient",
        "matbench_dim/model/kernels.py",
        "return g_h * dh, grad * normed",
        "return g_h * dh, grad",
        (
            "tests/model/test_dim_step_equivalence.py::test_pair_embedding_backward_matches_autograd",
        ),
    ),
    Mutant(
        "dim pretrains on the whole task, test fold included",
        "matbench_dim/bench/methods.py",
        "SiteNetDIMRegressor(**kw).pretrain(X).save_encoder(path)",
        "SiteNetDIMRegressor(**kw).pretrain(task.structures).save_encoder(path)",
        ("tests/bench/test_guarantees.py",),
    ),
    Mutant(
        "fit fine-tunes from a fresh encoder instead of the DIM one",
        "matbench_dim/estimator.py",
        "encoder, pretrained = result.encoder, True",
        "encoder, pretrained = self._initial_encoder()[0], True",
        (
            "tests/bench/test_guarantees.py::test_fine_tuning_starts_bitwise_from_the_pretrained_encoder",
        ),
    ),
    Mutant(
        "predictions reach matbench through float32",
        "matbench_dim/bench/matbench_io.py",
        "arr = np.asarray(predictions, dtype=float)",
        "arr = np.asarray(predictions, dtype=np.float32).astype(float)",
        ("tests/bench/test_matbench_io.py",),
    ),
    Mutant(
        "pretraining resumes without the optimiser state",
        "matbench_dim/training/pretrain.py",
        'o.load_state_dict(ckpt["optimizers"][k])',
        "pass",
        ("tests/training/test_pretraining.py",),
    ),
    Mutant(
        "the global stage is fed the local samples instead of the means",
        "matbench_dim/model/sitenet.py",
        "self.global_(mu.detach() if detach_local else mu, site_mask)",
        "self.global_(z.detach() if detach_local else z, site_mask)",
        ("tests/training/test_dim_wiring.py",),
    ),
    Mutant(
        "labels reach the encoder (one gradient clip over every stage, probes included)",
        "matbench_dim/training/pretrain.py",
        """    for opt in optimizers.values():
        clip_grad([p for g in opt.param_groups for p in g["params"]], max_norm)""",
        """    clip_grad([p for o in optimizers.values() for g in o.param_groups for p in g["params"]],
              max_norm)""",
        ("tests/training/test_label_isolation.py",),
    ),
    Mutant(
        "a cell's labelled subset is drawn from the test fold",
        "matbench_dim/bench/cells.py",
        "subset = draw_subset(task.train_ids(cell.fold), cell.n, cell.fold, cell.seed)",
        "subset = draw_subset(task.test_ids(cell.fold), cell.n, cell.fold, cell.seed)",
        ("tests/bench/test_guarantees.py",),
    ),
    Mutant(
        "a cell scores the training fold instead of its test fold",
        "matbench_dim/bench/cells.py",
        "X_test = task.test_inputs(cell.fold)",
        "X_test = task.structures.loc[task.train_ids(cell.fold)[: len(test_ids)]]",
        ("tests/bench/test_guarantees.py",),
    ),
    Mutant(
        "the pretraining pool ignores the leak check",
        "matbench_dim/bench/cells.py",
        'check_disjoint(pool, task.test_ids(fold), stage="pretraining", where=where)',
        "pool = [*pool, *task.test_ids(fold)[:3]]",
        ("tests/bench/test_guarantees.py",),
    ),
    Mutant(
        "an extra pool lets copies of the task's structures in (no structure guard)",
        "matbench_dim/data/pool.py",
        "    matches = matching_structures(extra, labelled, symprec)",
        "    matches: dict[str, str] = {}",
        ("tests/data/test_pool.py",),
    ),
    Mutant(
        "a submission fits on the test fold",
        "matbench_dim/bench/submission.py",
        "            X, y = task.train_data(fold)",
        "            X, y = task.test_inputs(fold), task.test_targets(fold)",
        ("tests/bench/test_submission.py",),
    ),
)


def _copy(dest: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for part in ("matbench_dim", "tests", "benchmarks"):  # benchmarks: the frozen reference step
        shutil.copytree(REPO / part, dest / part, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, dest / name)


def _apply(root: Path, mutant: Mutant) -> None:
    path = root / mutant.path
    text = path.read_text(encoding="utf-8")
    count = text.count(mutant.old)
    if count != 1:
        raise SystemExit(
            f"mutant {mutant.name!r}: its code occurs {count} times in {mutant.path} "
            "(expected once); update MUTANTS to follow the code"
        )
    path.write_text(text.replace(mutant.old, mutant.new), encoding="utf-8")


def _pytest(root: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "MATBENCH_DIM_NUM_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "MPLBACKEND": "Agg",
        "PYTHONHASHSEED": "0",
    }
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1800)
    return done.returncode, (done.stdout + done.stderr)[-2000:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="run only mutants whose name contains these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    args = parser.parse_args(argv)
    chosen = [
        m for m in MUTANTS if not args.only or any(s.lower() in m.name.lower() for s in args.only)
    ]
    if args.list:
        for m in chosen:
            print(f"{m.name}  [{m.path}; {' '.join(m.tests)}]")
        return 0
    with tempfile.TemporaryDirectory(prefix="matbench-dim-mutants-") as tmp:
        base = Path(tmp) / "base"
        _copy(base)
        guards = tuple(dict.fromkeys(t for m in chosen for t in m.tests))
        code, log = _pytest(base, guards)
        if code != 0:
            print(log)
            print("the guarding tests fail on the unmutated code: fix them first")
            return 2
        survivors = []
        for k, mutant in enumerate(chosen):
            root = Path(tmp) / f"m{k}"
            _copy(root)
            _apply(root, mutant)
            t0 = time.perf_counter()
            code, log = _pytest(root, mutant.tests)
            caught = code != 0
            print(
                f"{'caught  ' if caught else 'SURVIVED'} {mutant.name} ({time.perf_counter() - t0:.0f} s)"
            )
            if not caught:
                survivors.append(mutant.name)
            shutil.rmtree(root, ignore_errors=True)
    for name in survivors:
        print(f"survivor: {name}")
    print(f"mutants: {len(chosen) - len(survivors)} of {len(chosen)} caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    raise SystemExit(main())
