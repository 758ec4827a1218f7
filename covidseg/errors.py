"""The one exception type that the stages turn into a one-line error message."""


class CovidSegError(Exception):
    """A user-facing error: bad input, bad params, unreachable mirror. Printed as one line."""
