"""Each DVC stage lists, as deps, exactly the package modules its script imports (transitively).

One exception, by design: `OPTIONAL` code that a stage imports inside a function only for one
param value (evaluate's int8 path), so that editing it reruns nothing under the default params.
dvc.yaml cannot make a dep depend on a param; the module's docstring says what to do instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
OPTIONAL = {"evaluate": {"covidseg.inference.paths": "evaluate.precision: int8"}}


def imported_modules(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Top-level and function-level `covidseg.*` imports of one file, as module names."""
    found = set()
    tree = ast.parse(path.read_text())
    for node in tree.body if top_level_only else ast.walk(tree):
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


def closure(script: Path, skip: frozenset[str] = frozenset()) -> set[str]:
    """Package files reachable from a stage script, as repo-relative paths, not going through
    the modules in `skip`."""
    todo, seen = list(imported_modules(script)), set()
    while todo:
        module = todo.pop()
        if module in seen or module in skip:
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
    needed = closure(ROOT / script, frozenset(OPTIONAL.get(stage, {})))
    assert needed - deps == set(), f"{stage}: imports not listed as deps"
    assert deps - needed == set(), f"{stage}: deps it does not import"


def test_closure_follows_imports_transitively() -> None:
    # stages/prepare.py imports covidseg.data.prepare, which imports covidseg.data.volumes
    assert "covidseg/data/volumes.py" in closure(ROOT / "stages" / "prepare.py")
    assert "covidseg/training/train.py" not in closure(ROOT / "stages" / "prepare.py")


@pytest.mark.parametrize("stage", sorted(OPTIONAL))
def test_optional_code_is_imported_only_where_it_is_used(stage: str) -> None:
    files = closure(ROOT / STAGES[stage]["cmd"].split()[1], frozenset(OPTIONAL[stage]))
    for module in OPTIONAL[stage]:
        assert module_file(module).relative_to(ROOT).as_posix() not in files
        for file in files:  # never at the top of a module the stage loads
            assert module not in imported_modules(ROOT / file, top_level_only=True), file


def test_what_does_not_change_a_stage_is_not_its_dep() -> None:
    deps = {name: set(spec["deps"]) for name, spec in STAGES.items()}
    predict_only = {
        "covidseg/inference/quantize.py",
        "covidseg/inference/crop.py",
        "covidseg/inference/paths.py",
        "covidseg/inference/predict.py",
        "covidseg/cli.py",
    }
    for stage in ("train", "evaluate", "aggregate"):
        assert deps[stage] & predict_only == set(), stage
    assert not any(d.startswith("covidseg/inference/") for d in deps["train"])
    assert not any(d.startswith("covidseg/evaluation/") for d in deps["train"])
    for stage in ("train", "evaluate"):  # MLflow settings change no number
        params = STAGES[stage]["params"]
        assert not any(str(p).startswith("tracking") for p in params), stage
