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
from scipy.spatial import cKDTree

from covidseg.data.volumes import (
    INFECTION_ARCHIVE,
    LUNG_ARCHIVE,
    LUNG_INFECTION_ARCHIVE,
    slabs,
)
from covidseg.errors import CovidSegError

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
    return infection.view(np.uint8)  # False/True are the bytes 0/1: no copy


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
    lungs = lung_mask(masks)
    if not scheme.multi:
        return infection_mask(masks), lungs
    if lungs is None:
        raise CovidSegError(
            f"{case}: prepare.target is {scheme.target} but neither {LUNG_ARCHIVE} nor "
            f"{LUNG_INFECTION_ARCHIVE} was downloaded (add it to download.sha256)"
        )
    mask = np.empty(lungs.shape, np.uint8)
    for part in slabs(len(mask), SLAB_SLICES):  # no whole-volume infection mask beside the result
        infected = infection_mask({archive: m[part] for archive, m in masks.items()}) > 0
        mask[part] = np.where(infected, scheme.infection, lungs[part])
    return mask, lungs


def whole_lungs(
    labels: np.ndarray, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """{0, 1 left, 2 right} from lung + infection labels: each infection voxel takes the side of
    the nearest lung voxel (nearest in mm when `spacing` is given, else in voxel steps). A voxel
    exactly as far from both lungs takes either side (the search picks one of the nearest).

    Memory is that of the result plus the lung surface and slab-sized temporaries: a distance
    transform with indices would need 13 bytes per voxel of the lungs' box."""
    lungs = np.zeros(labels.shape, np.uint8)
    infected = False
    for part in slabs(labels.shape[0], SLAB_SLICES):
        block = labels[part]
        lungs[part] = np.where((block == LEFT_LUNG) | (block == RIGHT_LUNG), block, 0)
        infected = infected or bool((block == LUNG_INFECTION_VALUE).any())
    if not infected:
        return lungs
    surface = LungSurface(lungs, spacing)
    if not surface.voxels.size:  # no lungs, or no voxel outside them
        return lungs
    sides = lungs[tuple(surface.voxels.T)]
    for part in slabs(labels.shape[0], SLAB_SLICES):
        where = np.nonzero(labels[part] == LUNG_INFECTION_VALUE)
        if where[0].size:
            points = np.stack(where, axis=1)
            points[:, 0] += part.start
            lungs[part][where] = sides[surface.nearest(points)]
    return lungs


SLAB_SLICES = 8  # slices per step of the slab-wise loops: their temporaries stay small


class LungSurface:
    """The lung voxels with a non-lung 6-neighbour in the volume, searchable by distance. The
    nearest lung voxel of any non-lung voxel is one of them: a step from a lung voxel towards
    the point along any axis where they differ comes closer, so it must leave the lungs."""

    def __init__(self, lungs: np.ndarray, spacing: tuple[float, float, float] | None) -> None:
        self.voxels = lung_surface(lungs)
        self.scale = np.asarray(spacing if spacing is not None else (1.0, 1.0, 1.0), np.float64)
        self._tree = cKDTree(self.voxels * self.scale) if self.voxels.size else None

    def nearest(self, points: np.ndarray) -> np.ndarray:
        """Row numbers in `voxels` of the nearest surface voxel of each (n, 3) voxel index."""
        if self._tree is None:
            raise ValueError("no lung surface to search")
        _, rows = self._tree.query(points * self.scale)
        found: np.ndarray = rows
        return found


def lung_surface(lungs: np.ndarray) -> np.ndarray:
    """(n, 3) indices of the nonzero voxels with a zero 6-neighbour inside the volume."""
    found = []
    slices = lungs.shape[0]
    for part in slabs(slices, SLAB_SLICES):
        low, high = max(part.start - 1, 0), min(part.stop + 1, slices)
        block = lungs[low:high] > 0
        inner = block.copy()  # every neighbour inside the volume is lung too
        for axis in range(3):
            ahead = tuple(slice(1, None) if a == axis else slice(None) for a in range(3))
            behind = tuple(slice(None, -1) if a == axis else slice(None) for a in range(3))
            inner[ahead] &= block[behind]
            inner[behind] &= block[ahead]
        own = slice(part.start - low, part.stop - low)
        where = np.nonzero(block[own] & ~inner[own])
        found.append(np.stack(where, axis=1))
        found[-1][:, 0] += part.start
    return np.concatenate(found) if found else np.zeros((0, 3), np.intp)
