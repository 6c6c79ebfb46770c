"""The package's house rules, read from its source with ``ast`` (docs/architecture.md).

- no import circle among the package's modules (imports inside functions and under
  ``TYPE_CHECKING`` count too: a lazy import hides a circle, it does not remove it);
- imports point down the stages: cli -> bench / tuning -> tracking -> estimator -> training
  -> model -> features -> data -> runtime / paths;
- ``model/`` and ``features/`` import nothing of matbench, Optuna, MLflow or the CLI;
- no module over 800 lines (the soft limit is ~600; a split goes by concept).

The top-level ``matbench_dim/__init__.py`` is the public facade (it loads every public name
lazily, by string): it is not a node of the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "matbench_dim"

# Rank of each stage: a module may import modules of its own rank or lower.
RANKS: dict[str, int] = {
    "runtime": 0,
    "paths": 0,
    "versions": 0,
    "data": 1,
    "features": 2,
    "model": 3,
    "training": 4,
    "estimator": 5,
    "pretrained": 5,  # the saved encoder; below the estimators in fact, ranked with them
    "embedder": 5,
    "ensemble": 5,  # wraps the estimator
    "tracking": 6,
    "bench": 7,
    "tuning": 7,
    "cli": 8,
    "__main__": 8,  # python -m matbench_dim: the command line
}
EDGE_LIBRARIES = ("matbench", "optuna", "mlflow", "typer", "dask", "optuna_dashboard", "chgnet")
PURE_STAGES = ("model", "features")
MAX_LINES = 800


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[int, str, tuple[str, ...]]]:
    """``(line, module, imported names)`` of every absolute import in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name, ()) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module, tuple(a.name for a in node.names)))
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}:{node.lineno}: relative import; use absolute ones")
    return out


def import_graph() -> dict[str, set[str]]:
    """Edges ``module -> modules of the package it imports`` (the root facade left out)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules if m != "matbench_dim"}
    for name in graph:
        for _, target, names in _imports(modules[name]):
            if not target.startswith("matbench_dim"):
                continue
            hits = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules]
            hits = hits or ([target] if target in modules else [])
            graph[name].update(h for h in hits if h != "matbench_dim")
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _stage(module: str) -> str:
    return module.split(".")[1]


def test_find_cycle_sees_a_circle_and_a_clean_graph():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_every_module_belongs_to_a_ranked_stage():
    unknown = sorted({_stage(m) for m in import_graph()} - set(RANKS))
    assert not unknown, f"stages without a rank in RANKS (and docs/architecture.md): {unknown}"


def test_imports_point_down_the_stages():
    upward = [
        f"{src} -> {dst}"
        for src, targets in import_graph().items()
        for dst in targets
        if RANKS[_stage(dst)] > RANKS[_stage(src)]
    ]
    assert not upward, "imports that climb the stages: " + "; ".join(sorted(upward))


@pytest.mark.parametrize("stage", PURE_STAGES)
def test_model_and_features_import_no_edge_library(stage):
    bad = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}"
        for path in sorted((PACKAGE / stage).rglob("*.py"))
        for line, target, _ in _imports(path)
        if target.split(".")[0] in EDGE_LIBRARIES
        or (target.startswith("matbench_dim.") and RANKS[_stage(target)] > RANKS["estimator"])
    ]
    assert not bad, "; ".join(bad)


def test_no_module_is_oversized():
    big = {
        str(p.relative_to(PACKAGE.parent)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not big, f"modules over {MAX_LINES} lines (split them by concept): {big}"
