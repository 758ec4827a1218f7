"""Severity numbers radiologists grade by: lesion volume, lung volumes, share of each lung infected.

Labels follow the model's scheme (`covidseg.data.labels`). With lung labels, each infection voxel is
given the side of the nearest lung voxel, so a lung's volume includes its infected part.
"""

from __future__ import annotations

import math
from typing import NotRequired, TypedDict

import numpy as np

from covidseg.data.labels import LEFT_LUNG, RIGHT_LUNG, LabelScheme, whole_lungs
from covidseg.data.volumes import voxel_volume_ml

GRADE_BOUNDS = (25.0, 50.0, 75.0)  # % of a lung: 1 under 25, 2 25-50, 3 50-75, 4 over 75


def extent_grade(percent: float) -> int:
    """0 none, 1 under 25 %, 2 25-50 %, 3 50-75 %, 4 over 75 % of the lung infected."""
    if percent <= 0 or math.isnan(percent):
        return 0
    return 1 + sum(percent >= bound for bound in GRADE_BOUNDS)


class Severity(TypedDict):
    """`severity`'s numbers; the per-lung ones only for a scheme with lung labels."""

    lesion_volume_ml: float
    slices_involved: int
    slices_total: int
    left_lung_volume_ml: NotRequired[float]
    left_lung_infected_pct: NotRequired[float]  # NaN when the lung was not found
    left_lung_grade: NotRequired[int]
    right_lung_volume_ml: NotRequired[float]
    right_lung_infected_pct: NotRequired[float]
    right_lung_grade: NotRequired[int]
    total_grade: NotRequired[int]


def _lung(lung: np.ndarray, infected: np.ndarray, voxel_ml: float) -> tuple[float, float, int]:
    """(volume in mL, % infected, extent grade) of one lung's boolean mask."""
    volume = int(lung.sum())
    percent = 100.0 * int((lung & infected).sum()) / volume if volume else float("nan")
    return round(volume * voxel_ml, 3), round(percent, 3), extent_grade(percent)


def severity(
    labels: np.ndarray, spacing: tuple[float, float, float], scheme: LabelScheme
) -> Severity:
    """Lesion volume and involved slices; with lung labels, per-lung volumes, % and grades."""
    voxel_ml = voxel_volume_ml(spacing)
    infected = labels == scheme.infection
    out: Severity = {
        "lesion_volume_ml": round(float(infected.sum()) * voxel_ml, 3),
        "slices_involved": int(infected.any(axis=(1, 2)).sum()),
        "slices_total": int(labels.shape[0]),
    }
    if not scheme.multi:
        return out
    lungs = whole_lungs(labels, spacing)
    left = _lung(lungs == LEFT_LUNG, infected, voxel_ml)
    out["left_lung_volume_ml"], out["left_lung_infected_pct"], out["left_lung_grade"] = left
    right = _lung(lungs == RIGHT_LUNG, infected, voxel_ml)
    out["right_lung_volume_ml"], out["right_lung_infected_pct"], out["right_lung_grade"] = right
    out["total_grade"] = left[2] + right[2]
    return out
