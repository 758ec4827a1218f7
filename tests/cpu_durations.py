"""`--cpu-durations=N`: the N tests that used the most CPU, and the CPU of each module.

`--durations` reports wall time, which on two busy cores says little about what a test costs:
a test waiting for the other worker looks slow. This counts the CPU of the test process and of
the children it waited for (`dvc repro` and its stage processes), per test across setup, call
and teardown, so a session fixture is charged to the first test that used it. Daemons a test
started (a server, Slurm) are not counted.
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from collections.abc import Generator

import pytest

KEY = "cpu_s"
_spent = pytest.StashKey[list[float]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--cpu-durations",
        type=int,
        default=None,
        metavar="N",
        help="show the N tests that used the most CPU (with the children they waited for), "
        "and the CPU per module",
    )


def _cpu() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _measured(item: pytest.Item) -> Generator[None, object, object]:
    start = _cpu()
    try:
        return (yield)
    finally:
        item.stash.setdefault(_spent, []).append(_cpu() - start)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _measured(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _measured(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, object, object]:
    return (yield from _measured(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if call.when == "teardown" and item.config.getoption("cpu_durations") is not None:
        spent: list[float] = item.stash.get(_spent, [])
        report.user_properties.append((KEY, sum(spent)))
    return report


class _Totals:
    def __init__(self) -> None:
        self.cpu: dict[str, float] = {}
        self.started = time.monotonic()

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for name, value in report.user_properties:
            if name == KEY:
                self.cpu[report.nodeid] = float(value)  # type: ignore[arg-type]


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("cpu_durations") is not None and not hasattr(config, "workerinput"):
        config.pluginmanager.register(_Totals(), "cpu-durations-totals")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    totals = terminalreporter.config.pluginmanager.get_plugin("cpu-durations-totals")
    if not isinstance(totals, _Totals) or not totals.cpu:
        return
    count = terminalreporter.config.getoption("cpu_durations")
    wall = time.monotonic() - totals.started
    spent = sum(totals.cpu.values())
    write = terminalreporter.write_line
    terminalreporter.section(f"CPU: {spent:.0f} s in {len(totals.cpu)} tests, {wall:.0f} s wall")
    modules: dict[str, float] = defaultdict(float)
    for nodeid, seconds in totals.cpu.items():
        modules[nodeid.split("::")[0]] += seconds
    for module, seconds in sorted(modules.items(), key=lambda kv: -kv[1])[:count]:
        write(f"{seconds:8.1f}s  {module}")
    write("")
    for nodeid, seconds in sorted(totals.cpu.items(), key=lambda kv: -kv[1])[:count]:
        write(f"{seconds:8.1f}s  {nodeid}")
