"""The package's messages: one line each with the command line's prefixes, on the stderr of the
moment, and silent for a library caller that configures nothing."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from covidseg.log import configure


def test_messages_are_one_line_with_the_level_as_prefix(capsys: pytest.CaptureFixture[str]) -> None:
    configure()
    log = logging.getLogger("covidseg.inference.quantize")
    log.warning("int8 missed the bar on %s", "case_1")
    log.info("resuming after epoch %d of %d", 1, 2)
    log.error("x: no such file or folder")
    log.debug("not shown at the default level")
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "warning: int8 missed the bar on case_1",
        "note: resuming after epoch 1 of 2",
        "error: x: no such file or folder",
    ]


def test_configure_twice_shows_each_message_once(capsys: pytest.CaptureFixture[str]) -> None:
    configure()
    configure()
    logging.getLogger("covidseg.training.train").warning("once")
    assert capsys.readouterr().err == "warning: once\n"


def test_a_library_caller_sees_nothing_unless_it_asks() -> None:
    code = (
        "import logging, covidseg.training.checkpoint as c\n"
        "logging.getLogger('covidseg.training.checkpoint').warning('hidden')\n"
        "logging.getLogger('covidseg').setLevel(logging.INFO)\n"
        "logging.basicConfig(format='%(name)s|%(message)s', level=logging.INFO)\n"
        "logging.getLogger('covidseg').propagate = True\n"
        "logging.getLogger('covidseg.training.checkpoint').info('routed')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "hidden" not in done.stderr  # the package adds only a NullHandler
    assert "covidseg.training.checkpoint|routed" in done.stderr  # the caller's own format


def test_nothing_in_the_package_prints() -> None:
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    printing = []
    for path in sorted([*(root / "covidseg").rglob("*.py"), *(root / "stages").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print":
                printing.append(f"{path.relative_to(root)}:{node.lineno}")
    assert printing == []
