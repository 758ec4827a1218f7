"""Severity numbers radiologists grade by: lesion volume, lung volumes, share of each lung infected.

Labels follow the model's scheme (`covidseg.data.labels`). With lung labels, each infection voxel is
given the side of the nearest lung voxel, so a lung's volume includes its infected part.
"""

from __future__ import annotations

import math

import numpy as np

from covidseg.data.labels import LEFT_LUNG, RIGHT_LUNG, LabelScheme, whole_lungs

GRADE_BOUNDS = (25.0, 50.0, 75.0)  # % of a lung: 1 under 25, 2 25-50, 3 50-75, 4 over 75


def extent_grade(percent: float) -> int:
    """0 none, 1 under 25 %, 2 25-50 %, 3 50-75 %, 4 over 75 % of the lung infected."""
    if percent <= 0 or math.isnan(percent):
        return 0
    return 1 + sum(percent >= bound for bound in GRADE_BOUNDS)


def severity(
    labels: np.ndarray, spacing: tuple[float, float, float], scheme: LabelScheme
) -> dict[str, float | int]:
    """Lesion volume and involved slices; with lung labels, per-lung volumes, % and grades."""
    voxel_ml = math.prod(spacing) / 1000.0
    infected = labels == scheme.infection
    out: dict[str, float | int] = {
        "lesion_volume_ml": round(float(infected.sum()) * voxel_ml, 3),
        "slices_involved": int(infected.any(axis=(1, 2)).sum()),
        "slices_total": int(labels.shape[0]),
    }
    if not scheme.multi:
        return out
    lungs = whole_lungs(labels, spacing)
    for side, name in ((LEFT_LUNG, "left"), (RIGHT_LUNG, "right")):
        lung = lungs == side
        volume = int(lung.sum())
        percent = 100.0 * int((lung & infected).sum()) / volume if volume else float("nan")
        out[f"{name}_lung_volume_ml"] = round(volume * voxel_ml, 3)
        out[f"{name}_lung_infected_pct"] = round(percent, 3)
        out[f"{name}_lung_grade"] = extent_grade(percent)
    out["total_grade"] = int(out["left_lung_grade"]) + int(out["right_lung_grade"])
    return out
