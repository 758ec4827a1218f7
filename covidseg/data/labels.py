"""The label schemes of the training targets, declared once; every other module asks here.

- `infection`: 0 background, 1 infection; one sigmoid output map.
- `lung_infection`: 0 background, 1 left lung, 2 right lung, 3 infection; one softmax map per
  label. Infection voxels lie inside the lungs but carry no side; a left-right mirror swaps the
  two lung labels.

A trained model carries its scheme in its metadata (`model.json`, MLflow's model metadata), as
MONAI bundles' `channel_def` and nnU-Net's label manager do, so evaluation, prediction, figures
and reports read the labels from the model instead of guessing from values.

The raw archives use the same values: `Infection_Mask` {0, 1}, `Lung_Mask` {0, 1 left,
2 right}, `Lung_and_Infection_Mask` {0, 1 left, 2 right, 3 infection}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.ndimage import distance_transform_edt

from covidseg.errors import CovidSegError
from covidseg.data.volumes import INFECTION_ARCHIVE, LUNG_ARCHIVE, LUNG_INFECTION_ARCHIVE

BACKGROUND, LEFT_LUNG, RIGHT_LUNG = 0, 1, 2
LUNG_INFECTION_VALUE = 3  # infection in Lung_and_Infection_Mask and in the lung_infection target


@dataclass(frozen=True)
class LabelScheme:
    """Names of the label values (index = value), the infection value and the mirror map."""

    target: str
    names: tuple[str, ...]
    infection: int
    mirror: tuple[int, ...]  # mirror[v]: the label of value v in a left-right mirrored image

    @property
    def classes(self) -> int:
        """Output maps: one (sigmoid) for a binary scheme, one per label (softmax) otherwise."""
        return 1 if len(self.names) == 2 else len(self.names)

    @property
    def multi(self) -> bool:
        """Whether the scheme has lung labels besides infection."""
        return self.classes > 1

    @property
    def display(self) -> dict[int, str]:
        """Foreground values and names for figures: `{1: "left lung", ...}`."""
        return {v: n.replace("_", " ") for v, n in enumerate(self.names) if v != BACKGROUND}

    def value(self, name: str) -> int:
        """The label value of `name` (e.g. `left_lung`)."""
        return self.names.index(name)

    def code(self, value: int) -> SegmentCode:
        """The coded meaning of a foreground label value (a DICOM-SEG segment's)."""
        return SEGMENT_CODES[self.names[value]]

    def to_json(self) -> dict[str, Any]:
        """Plain data for `model.json` and MLflow metadata."""
        return {
            "target": self.target,
            "names": list(self.names),
            "infection": self.infection,
            "mirror": list(self.mirror),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LabelScheme:
        """Read `to_json`'s form back; it must be one of the known schemes."""
        scheme = cls(
            target=str(raw["target"]),
            names=tuple(str(n) for n in raw["names"]),
            infection=int(raw["infection"]),
            mirror=tuple(int(v) for v in raw["mirror"]),
        )
        if SCHEMES.get(scheme.target) != scheme:
            raise ValueError(f"unknown label scheme {raw}")
        return scheme


Concept = tuple[str, str]  # (SNOMED CT code, code meaning)


@dataclass(frozen=True)
class SegmentCode:
    """What a label is, in SNOMED CT, as a DICOM-SEG segment states it (segmented property
    category and type, DICOM CID 7150/7151/7159; a laterality modifier; the anatomic region)."""

    category: Concept
    type: Concept
    modifier: Concept | None = None
    region: Concept | None = None


ANATOMICAL_STRUCTURE: Concept = ("123037004", "Anatomical Structure")
ABNORMAL_STRUCTURE: Concept = ("49755003", "Morphologically Abnormal Structure")
LUNG: Concept = ("39607008", "Lung")
# the dataset's "infection": ground-glass opacity and consolidation of COVID-19 pneumonia
SEGMENT_CODES = {
    "left_lung": SegmentCode(ANATOMICAL_STRUCTURE, LUNG, modifier=("7771000", "Left")),
    "right_lung": SegmentCode(ANATOMICAL_STRUCTURE, LUNG, modifier=("24028007", "Right")),
    "infection": SegmentCode(ABNORMAL_STRUCTURE, ("409774005", "Inflammation"), region=LUNG),
}

INFECTION = LabelScheme("infection", ("background", "infection"), 1, (0, 1))
LUNG_INFECTION = LabelScheme(
    "lung_infection",
    ("background", "left_lung", "right_lung", "infection"),
    LUNG_INFECTION_VALUE,
    (0, 2, 1, 3),
)
SCHEMES = {scheme.target: scheme for scheme in (INFECTION, LUNG_INFECTION)}
TARGETS = tuple(SCHEMES)


def scheme_for(target: str) -> LabelScheme:
    """The scheme of `prepare.target`."""
    try:
        return SCHEMES[target]
    except KeyError:
        raise CovidSegError(f"unknown target {target!r}; choose one of {list(SCHEMES)}") from None


def infection_mask(masks: dict[str, np.ndarray]) -> np.ndarray:
    """{0, 1} infection from Infection_Mask, or from Lung_and_Infection_Mask."""
    if INFECTION_ARCHIVE in masks:
        return masks[INFECTION_ARCHIVE]
    infection: np.ndarray = masks[LUNG_INFECTION_ARCHIVE] == LUNG_INFECTION_VALUE
    return infection.astype(np.uint8)


def lung_mask(masks: dict[str, np.ndarray]) -> np.ndarray | None:
    """{0, 1 left, 2 right} whole lungs (infected parts included), if any lung labels exist."""
    if LUNG_ARCHIVE in masks:
        return masks[LUNG_ARCHIVE]
    if LUNG_INFECTION_ARCHIVE not in masks:
        return None
    return whole_lungs(masks[LUNG_INFECTION_ARCHIVE])


def target_mask(
    masks: dict[str, np.ndarray], scheme: LabelScheme, case: str
) -> tuple[np.ndarray, np.ndarray | None]:
    """(training target in `scheme`'s values, whole lungs or None) from one case's masks."""
    infection = infection_mask(masks)
    lungs = lung_mask(masks)
    if not scheme.multi:
        return infection, lungs
    if lungs is None:
        raise CovidSegError(
            f"{case}: prepare.target is {scheme.target} but neither {LUNG_ARCHIVE} nor "
            f"{LUNG_INFECTION_ARCHIVE} was downloaded (add it to download.sha256)"
        )
    return np.where(infection > 0, scheme.infection, lungs).astype(np.uint8), lungs


def whole_lungs(
    labels: np.ndarray, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """{0, 1 left, 2 right} from lung + infection labels: each infection voxel takes the side of
    the nearest lung voxel (nearest in mm when `spacing` is given, else in voxel steps)."""
    infected = labels == LUNG_INFECTION_VALUE
    lungs = np.where(np.isin(labels, (LEFT_LUNG, RIGHT_LUNG)), labels, 0).astype(np.uint8)
    if not infected.any() or not lungs.any():
        return lungs
    box = bounding_box(lungs > 0, infected)
    sub = lungs[box]
    nearest = distance_transform_edt(
        sub == 0, sampling=spacing, return_distances=False, return_indices=True
    )
    # gathered at the infected voxels alone: indexing with the whole index volume would first
    # copy it as 64-bit integers (24 bytes per voxel of the box)
    where = np.nonzero(infected[box])
    sub[where] = sub[tuple(axis[where] for axis in nearest)]
    return lungs


def bounding_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of the masks (at least one must be True)."""
    union = np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)
