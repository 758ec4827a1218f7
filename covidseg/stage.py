"""What every stage script shares: one-line errors and an exit code."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from covidseg.errors import CovidSegError

INTERRUPTED = threading.Event()  # set by SIGINT / SIGTERM, for `check_interrupt`


def _interrupt(signum: int, frame: FrameType | None) -> None:
    INTERRUPTED.set()
    raise KeyboardInterrupt  # a terminated stage closes its MLflow run as KILLED, like Ctrl-C


def check_interrupt() -> None:
    """Raise the Ctrl-C (or SIGTERM) that Python swallowed: one raised while a finalizer or a
    weakref callback runs is only printed, and training would go on to the end."""
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; a `CovidSegError` becomes `error: ...` on stderr and exit code 1,
    and SIGTERM (a timeout, `dvc queue kill`) is handled as Ctrl-C."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except CovidSegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
