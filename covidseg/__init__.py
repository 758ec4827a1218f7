"""covidseg: a reproducible pipeline for COVID-19 lung infection segmentation in CT."""

import logging

from covidseg.errors import CovidSegError

__all__ = ["CovidSegError"]
__version__ = "0.1.0"

# a library shows nothing until its application configures logging (covidseg.log.configure)
logging.getLogger(__name__).addHandler(logging.NullHandler())
