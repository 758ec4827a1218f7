"""The package's layering and signature rules, checked on the source (as test_stage_deps does).

- Stage modules (one per DVC stage, plus `predict`) use library modules; library modules never
  import a stage module, and stage modules do not import each other.
- Only `covidseg/tracking.py` imports mlflow.
- A function of more than four parameters takes the rest by keyword.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "covidseg"
STAGE_MODULES = {"download", "prepare", "train", "evaluate", "aggregate", "predict"}
ENTRY_POINTS = {"cli"}  # the command line may call the stage modules
MAX_POSITIONAL = 4


def modules() -> dict[str, Path]:
    return {p.stem: p for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


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
    """The `covidseg.<module>` names a file imports, as module stems."""
    names = {n.split(".")[1] for n in imports(path) if n.startswith("covidseg.")}
    return names & set(modules())


@pytest.mark.parametrize("name", sorted(set(modules()) - STAGE_MODULES - ENTRY_POINTS))
def test_library_modules_never_import_stage_modules(name: str) -> None:
    assert covidseg_imports(modules()[name]) & STAGE_MODULES == set()


@pytest.mark.parametrize("name", sorted(STAGE_MODULES))
def test_stage_modules_do_not_import_each_other(name: str) -> None:
    assert covidseg_imports(modules()[name]) & (STAGE_MODULES - {name}) == set()


def test_only_tracking_imports_mlflow() -> None:
    files = [*PACKAGE.glob("*.py"), *(ROOT / "stages").glob("*.py")]
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
    files = [*sorted(PACKAGE.glob("*.py")), *sorted((ROOT / "stages").glob("*.py"))]
    bad = [line for path in files for line in long_positional_signatures(path)]
    assert bad == []


def test_the_checks_see_violations(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import mlflow\nfrom covidseg.prepare import x\n"
        "def f(a, b, c, d, e):\n    pass\n"
        "def g(self, a, b, c, d, *, e):\n    pass\n"
    )
    assert "mlflow" in imports(sample) and "covidseg.prepare" in imports(sample)
    assert [line.split()[1].split("(")[0] for line in long_positional_signatures(sample)] == ["f"]
