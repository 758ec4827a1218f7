"""Each DVC stage lists, as deps, exactly the package modules its script imports (transitively)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def imported_modules(path: Path) -> set[str]:
    """Top-level and function-level `covidseg.*` imports of one file, as module names."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("covidseg"):
            found.add(node.module)
            for alias in node.names:
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists():
                    found.add(f"{node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("covidseg")}
    return found


def module_file(module: str) -> Path:
    base = ROOT / module.replace(".", "/")
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def closure(script: Path) -> set[str]:
    """Package files reachable from a stage script, as repo-relative paths."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo += imported_modules(module_file(module))
    files = {module_file(m).relative_to(ROOT).as_posix() for m in seen}
    return {f for f in files if not f.endswith("__init__.py")}


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_match_imports(stage: str) -> None:
    spec = STAGES[stage]
    script = spec["cmd"].split()[1]
    deps = {d for d in spec["deps"] if d.startswith("covidseg/") and d.endswith(".py")}
    assert script in spec["deps"], f"{stage}: its script {script} is not a dep"
    needed = closure(ROOT / script)
    assert needed - deps == set(), f"{stage}: imports not listed as deps"
    assert deps - needed == set(), f"{stage}: deps it does not import"


def test_closure_follows_imports_transitively() -> None:
    # stages/prepare.py imports covidseg.data.prepare, which imports covidseg.data.volumes
    assert "covidseg/data/volumes.py" in closure(ROOT / "stages" / "prepare.py")
    assert "covidseg/training/train.py" not in closure(ROOT / "stages" / "prepare.py")
