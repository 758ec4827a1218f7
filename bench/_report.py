"""Timing and table helpers shared by the benchmarks."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(wall seconds, result) of one call."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def timed_cpu(fn: Callable[[], T]) -> tuple[float, float, T]:
    """(wall seconds, this process's CPU seconds, result) of one call.

    CPU time hardly moves when other jobs load the machine; wall time does.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def median(values: Sequence[float]) -> float:
    """Median of the repeats (the noise on a shared 2-core machine is large)."""
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> str:
    """`min-max` of the repeats, for the noise column."""
    return f"{min(values):.3g}-{max(values):.3g}" if len(values) > 1 else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table."""
    cells = [[str(c) for c in header], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def torch_threads() -> int:
    """The torch threads a benchmark uses: 2 (its figures' setting), or OMP_NUM_THREADS where
    the caller set it (the test suite gives each of its workers one)."""
    return int(os.environ.get("OMP_NUM_THREADS") or 2)


def machine_note() -> str:
    """One line on the conditions: cores and current load (other jobs share this machine)."""
    load = os.getloadavg()[0]
    return f"cores: {os.cpu_count()}, load average (1 min) at start: {load:.2f}"


def load_note() -> str:
    """The load average when a benchmark ends (other jobs share this machine)."""
    return f"load average (1 min) at end: {os.getloadavg()[0]:.2f}"


def verdict(ratio: float, goal: float) -> str:
    """`ratio 1.23x (goal <= 1.5x): met` or `... not met`."""
    state = "met" if ratio <= goal else "NOT met"
    return f"{ratio:.2f}x (goal <= {goal:.2f}x): {state}"


def model_args(
    description: str, quick: str, more: Callable[[argparse.ArgumentParser], object]
) -> argparse.Namespace:
    """The command line of a benchmark of one small model: --quick (whose effect `quick` says),
    --arch, --encoder, --size and --repeats (3, or 2 with --quick), and what `more` adds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=128, help="model input (stored) size")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (2 with --quick)")
    more(parser)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 3)
    return args
