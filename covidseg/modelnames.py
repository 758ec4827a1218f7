"""The architecture and encoder names that segmentation-models-pytorch accepts.

They are read from a list shipped with the package (`resources/model_names.json`), so every
stage checks `arch` and `encoder` when it loads its params, in milliseconds and without
importing torch: a typo fails `download` at once, not `train` after the data were fetched and
prepared. `tests/test_model_names.py` keeps the list equal to what the pinned SMP and timm
report; after upgrading either, regenerate it with `python -m covidseg.modelnames`.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import resources
from pathlib import Path

from covidseg.errors import CovidSegError
from covidseg.log import configure

log = logging.getLogger(__name__)

RESOURCE = "model_names.json"
TIMM_PREFIX = "tu-"


@cache
def known_names() -> dict[str, list[str]]:
    """{"architectures": [...], "encoders": [...], "timm": [...]} as shipped."""
    text = (resources.files("covidseg") / "resources" / RESOURCE).read_text()
    names: dict[str, list[str]] = json.loads(text)
    return names


def arch_error(arch: str) -> str | None:
    """Why `arch` is not an SMP architecture (case does not matter, as in SMP), or None."""
    archs = known_names()["architectures"]
    if arch.lower() in {a.lower() for a in archs}:
        return None
    return f"unknown architecture {arch!r}; choose one of {', '.join(archs)}"


def encoder_error(encoder: str) -> str | None:
    """Why `encoder` is not an SMP encoder nor `tu-<timm model>`, or None."""
    if encoder.startswith(TIMM_PREFIX):
        if encoder.removeprefix(TIMM_PREFIX) in set(known_names()["timm"]):
            return None
        return f"unknown encoder {encoder!r}: timm has no model named {encoder[3:]!r}"
    if encoder in set(known_names()["encoders"]):
        return None
    return (
        f"unknown encoder {encoder!r}; see the segmentation-models-pytorch encoder table "
        "(e.g. resnet18, resnet34, densenet201, efficientnet-b0, tu-<timm model name>)"
    )


def check_model_names(arch: str, encoder: str) -> None:
    """Refuse an unknown architecture or encoder in one line."""
    if reason := arch_error(arch):
        raise CovidSegError(f"arch: {reason}")
    if reason := encoder_error(encoder):
        raise CovidSegError(f"encoder: {reason}")


def live_names() -> dict[str, list[str]]:
    """The same lists from the installed SMP and timm (imports torch: tests and upgrades only)."""
    import segmentation_models_pytorch as smp
    import timm

    archs = sorted(a.__name__ for a in smp.MODEL_ARCHITECTURES_MAPPING.values())
    return {
        "architectures": archs,
        "encoders": sorted(smp.encoders.get_encoder_names()),
        "timm": sorted(timm.list_models()),
    }


def main() -> None:
    """Write the shipped list from the installed packages."""
    path = Path(str(resources.files("covidseg") / "resources" / RESOURCE))
    path.write_text(json.dumps(live_names(), indent=0) + "\n")
    log.info("wrote %s", path)


if __name__ == "__main__":
    configure()
    main()
