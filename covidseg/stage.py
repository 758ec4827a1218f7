"""What every stage script shares: one-line messages, one-line errors and an exit code."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

from covidseg.errors import CovidSegError
from covidseg.log import configure

log = logging.getLogger(__name__)

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
    configure()
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except CovidSegError as error:
        log.error("%s", error)
        sys.exit(1)
    except KeyboardInterrupt:
        log.error("interrupted")
        sys.exit(130)
