"""What the package tells its user goes through `logging`, under the `covidseg` logger.

The stage runner and the command line call `configure` once: one line per message on stderr,
`error: ...`, `warning: ...` or `note: ...`, written around any progress bar. A library caller
(`load_predictor`, `segment`) gets the library default, nothing shown unless it configures
logging itself, and can silence or redirect the `covidseg` logger like any other.
"""

from __future__ import annotations

import logging
import sys

from tqdm import tqdm

ROOT = "covidseg"
PREFIXES = {logging.ERROR: "error", logging.WARNING: "warning", logging.INFO: "note"}


class OneLine(logging.Formatter):
    """`<level>: <message>`, the level as the command line has always said it."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = PREFIXES.get(record.levelno, record.levelname.lower())
        return f"{prefix}: {record.getMessage()}"


class BarSafeHandler(logging.Handler):
    """Writes to the stderr of the moment (also a test's captured one) through `tqdm.write`,
    so a message never lands inside a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
            sys.stderr.flush()
        except Exception:  # logging's own contract: a failing handler reports, never raises
            self.handleError(record)


def configure(level: int = logging.INFO) -> None:
    """Show the package's messages on stderr, one line each (idempotent)."""
    logger = logging.getLogger(ROOT)
    if not any(isinstance(h, BarSafeHandler) for h in logger.handlers):
        handler = BarSafeHandler()
        handler.setFormatter(OneLine())
        logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once, whatever the application does with the root logger
