"""Severity numbers radiologists grade by: lesion volume, lung volumes, share of each lung infected.

Labels are those of the lung + infection target: 0 background, 1 left lung, 2 right lung,
3 infection (infection voxels lie inside the lungs but carry no side). Each infection voxel is
given the side of the nearest lung voxel, so a lung's volume includes its infected part.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.ndimage import distance_transform_edt

LEFT, RIGHT, INFECTION = 1, 2, 3
GRADE_BOUNDS = (25.0, 50.0, 75.0)  # % of a lung: 1 under 25, 2 25-50, 3 50-75, 4 over 75


def whole_lungs(
    labels: np.ndarray, spacing: tuple[float, float, float] | None = None
) -> np.ndarray:
    """{0, 1 left, 2 right}: lungs including their infected parts (infection -> nearest side,
    nearest in mm when `spacing` is given, else in voxel steps)."""
    infected = labels == INFECTION
    lungs = np.where(np.isin(labels, (LEFT, RIGHT)), labels, 0).astype(np.uint8)
    if not infected.any() or not lungs.any():
        return lungs
    box = _bounding_box(lungs > 0, infected)
    sub = lungs[box]
    nearest = distance_transform_edt(
        sub == 0, sampling=spacing, return_distances=False, return_indices=True
    )
    sides = sub[tuple(nearest)]
    lungs[box] = np.where(infected[box], sides, sub)
    return lungs


def _bounding_box(*masks: np.ndarray) -> tuple[slice, ...]:
    """The smallest box holding every True voxel of the masks."""
    union = np.logical_or.reduce(masks)
    box = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        box.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(box)


def extent_grade(percent: float) -> int:
    """0 none, 1 under 25 %, 2 25-50 %, 3 50-75 %, 4 over 75 % of the lung infected."""
    if percent <= 0 or math.isnan(percent):
        return 0
    return 1 + sum(percent >= bound for bound in GRADE_BOUNDS)


def severity(
    labels: np.ndarray, spacing: tuple[float, float, float], infection_label: int
) -> dict[str, float | int]:
    """Lesion volume and involved slices; with lung labels, per-lung volumes, % and grades."""
    voxel_ml = math.prod(spacing) / 1000.0
    infected = labels == infection_label
    out: dict[str, float | int] = {
        "lesion_volume_ml": round(float(infected.sum()) * voxel_ml, 3),
        "slices_involved": int(infected.any(axis=(1, 2)).sum()),
        "slices_total": int(labels.shape[0]),
    }
    if infection_label != INFECTION:
        return out
    lungs = whole_lungs(labels, spacing)
    for side, name in ((LEFT, "left"), (RIGHT, "right")):
        lung = lungs == side
        volume = int(lung.sum())
        percent = 100.0 * int((lung & infected).sum()) / volume if volume else float("nan")
        out[f"{name}_lung_volume_ml"] = round(volume * voxel_ml, 3)
        out[f"{name}_lung_infected_pct"] = round(percent, 3)
        out[f"{name}_lung_grade"] = extent_grade(percent)
    out["total_grade"] = int(out["left_lung_grade"]) + int(out["right_lung_grade"])
    return out
