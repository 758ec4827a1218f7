"""What every stage script shares: one-line errors and an exit code."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from types import FrameType

from covidseg.errors import CovidSegError


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # a terminated stage closes its MLflow run as KILLED, like Ctrl-C


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; a `CovidSegError` becomes `error: ...` on stderr and exit code 1,
    and SIGTERM (a timeout, `dvc queue kill`) is handled as Ctrl-C."""
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        main()
    except CovidSegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
