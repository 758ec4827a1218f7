"""What every stage script shares: one-line errors and an exit code."""

from __future__ import annotations

import sys
from collections.abc import Callable

from covidseg.errors import CovidSegError


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's `main`; a `CovidSegError` becomes `error: ...` on stderr and exit code 1."""
    try:
        main()
    except CovidSegError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
