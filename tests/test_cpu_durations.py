"""`--cpu-durations` counts CPU, not wall time: a test that sleeps costs nothing, one that
computes (itself or in a child it waits for) costs what it computed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITE = """
import subprocess, sys, time

def burn(seconds):
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass

def test_sleeps():
    time.sleep(0.6)

def test_computes():
    burn(0.4)

def test_child_computes():
    code = "import time\\nend = time.process_time() + 0.4\\nwhile time.process_time() < end: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
"""


def test_cpu_durations_count_cpu_of_the_test_and_its_children(tmp_path: Path) -> None:
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    environ = {**os.environ, "PYTHONPATH": str(HERE)}
    command = [sys.executable, "-m", "pytest", "-p", "cpu_durations", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*command, "--cpu-durations=5", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    cpu = {
        name: float(seconds)
        for seconds, name in re.findall(r"^\s*([\d.]+)s\s+\S+::(\w+)$", done.stdout, re.MULTILINE)
    }
    assert set(cpu) == {"test_sleeps", "test_computes", "test_child_computes"}, done.stdout
    assert cpu["test_sleeps"] < 0.2  # 0.6 s of wall, no CPU
    assert cpu["test_computes"] >= 0.35
    assert cpu["test_child_computes"] >= 0.35  # the child's CPU, charged to its test
