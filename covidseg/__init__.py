"""covidseg: a reproducible pipeline for COVID-19 lung infection segmentation in CT."""

from covidseg.errors import CovidSegError

__all__ = ["CovidSegError"]
__version__ = "0.1.0"
