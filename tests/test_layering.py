"""The package's layering and signature rules, checked on the source (as test_stage_deps does).

- Sub-packages by phase, in this order: `data`, `reporting`, `training`, `inference`,
  `evaluation`; a module imports from its own sub-package, from the top-level core modules and
  from the sub-packages `ALLOWED` lists for it (training never sees inference, inference never
  sees evaluation). The core (the top-level modules but `cli`) imports no sub-package.
- No import cycle between modules, counting imports inside functions.
- Stage modules (one per DVC stage, plus `predict`) are imported by the stage scripts and the
  command line only; they do not import each other.
- Only `covidseg/tracking.py` imports mlflow.
- A function of more than four parameters takes the rest by keyword.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "covidseg"
STAGE_MODULES = {
    "data.download",
    "data.prepare",
    "training.train",
    "evaluation.evaluate",
    "evaluation.aggregate",
    "inference.predict",
}
ENTRY_POINTS = {"cli"}  # the command line may call the stage modules
CORE = "core"  # the top-level modules
ALLOWED = {  # sub-package -> the sub-packages its modules may import (besides itself and core)
    CORE: set(),
    "data": set(),
    "reporting": {"data"},
    "training": {"data"},
    "inference": {"data", "reporting", "training"},
    "evaluation": {"data", "reporting", "training", "inference"},
}
MAX_POSITIONAL = 4


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (`data.labels`, `config`)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.stem != "__init__":
            found[".".join(path.relative_to(PACKAGE).with_suffix("").parts)] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module name imported anywhere in the file (top level and inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return found


def covidseg_imports(path: Path) -> set[str]:
    """The package modules a file imports, as dotted names relative to the package."""
    names = {n.removeprefix("covidseg.") for n in imports(path) if n.startswith("covidseg.")}
    return names & set(modules())


def phase(name: str) -> str:
    """A module's sub-package, or `core` for a top-level module."""
    return name.split(".")[0] if "." in name else CORE


@pytest.mark.parametrize("name", sorted(set(modules()) - ENTRY_POINTS))
def test_modules_import_only_their_own_phase_and_earlier_ones(name: str) -> None:
    allowed = ALLOWED[phase(name)] | {phase(name), CORE}
    assert {phase(m) for m in covidseg_imports(modules()[name])} <= allowed


def test_every_sub_package_has_a_rule() -> None:
    assert {phase(name) for name in modules()} - ENTRY_POINTS <= set(ALLOWED)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph` (one per strongly connected component of 2+ modules or a
    module importing itself), each as the modules in it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    graph = {name: covidseg_imports(path) for name, path in modules().items()}
    assert cycles(graph) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize("name", sorted(set(modules()) - STAGE_MODULES - ENTRY_POINTS))
def test_library_modules_never_import_stage_modules(name: str) -> None:
    assert covidseg_imports(modules()[name]) & STAGE_MODULES == set()


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_stage_modules_do_not_import_each_other(name: str) -> None:
    assert covidseg_imports(modules()[name]) & (STAGE_MODULES - {name}) == set()


def test_only_tracking_imports_mlflow() -> None:
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "stages").glob("*.py")]
    users = {p.name for p in files if any(n.split(".")[0] == "mlflow" for n in imports(p))}
    assert users == {"tracking.py"}


def long_positional_signatures(path: Path) -> list[str]:
    """Functions whose positional parameters (self and cls aside) number more than four."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            positional = [a.arg for a in node.args.posonlyargs + node.args.args]
            positional = [a for a in positional if a not in ("self", "cls")]
            if len(positional) > MAX_POSITIONAL:
                bad.append(f"{path.name}:{node.lineno} {node.name}({', '.join(positional)})")
    return bad


def test_long_signatures_are_keyword_only() -> None:
    files = [*sorted(PACKAGE.rglob("*.py")), *sorted((ROOT / "stages").glob("*.py"))]
    bad = [line for path in files for line in long_positional_signatures(path)]
    assert bad == []


def test_the_checks_see_violations(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import mlflow\nfrom covidseg.data.prepare import x\nfrom covidseg.data import labels\n"
        "def f(a, b, c, d, e):\n    pass\n"
        "def g(self, a, b, c, d, *, e):\n    pass\n"
    )
    assert "mlflow" in imports(sample)
    assert covidseg_imports(sample) == {"data.prepare", "data.labels"}
    assert [line.split()[1].split("(")[0] for line in long_positional_signatures(sample)] == ["f"]
    assert phase("training.validation") == "training" and phase("config") == CORE
