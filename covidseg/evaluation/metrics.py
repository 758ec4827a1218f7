"""Per-case 3D segmentation metrics, computed in mm on the voxel grid of the case.

Normalised surface distance (NSD: the share of both surfaces within a tolerance in mm of the
other) and the 95th percentile Hausdorff distance (HD95, mm) use MONAI's surface extraction and
distances, searched once for both, with the reductions of `monai.metrics.compute_surface_dice`
and `compute_hausdorff_distance(percentile=95)`; the real, possibly anisotropic, voxel spacing
is used. Dice (as `monai.metrics.compute_dice`), IoU, sensitivity, precision and volumes (voxel
count x voxel volume, in mL) come from voxel counts. Both masks are first cropped to the
bounding box of their union plus a margin, which leaves every metric unchanged.

Empty masks follow fixed rules instead of MONAI's NaN/inf and warnings:

- both empty: dice = iou = nsd = 1, hd95 = 0, sensitivity = precision = 1;
- reference empty, prediction not: dice = iou = nsd = 0, hd95 = NaN, sensitivity = NaN
  (undefined), precision = 0;
- prediction empty, reference not: dice = iou = nsd = 0, hd95 = NaN, sensitivity = 0,
  precision = NaN.

NaN values are left out of the means by `summarise`, which reports for each metric how many
cases its mean is over (e.g. `hd95_n`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TypedDict

import numpy as np
import torch

from covidseg.data.volumes import voxel_volume_ml

METRIC_KEYS = (
    "dice",
    "nsd",
    "hd95",
    "iou",
    "sensitivity",
    "precision",
    "ref_volume_ml",
    "pred_volume_ml",
)
NAN = float("nan")

Spacing = tuple[float, float, float]
# `summarise`'s form: "n_cases", then per metric its mean, "<metric>_std" and "<metric>_n"
Summary = dict[str, float | int | None]


class CaseMetrics(TypedDict):
    """`case_metrics`: every one of `METRIC_KEYS` for one case (NaN where undefined)."""

    dice: float
    nsd: float
    hd95: float
    iou: float
    sensitivity: float
    precision: float
    ref_volume_ml: float
    pred_volume_ml: float


def _ratio(num: int, den: int) -> float:
    """num / den, NaN when den is 0."""
    return num / den if den else NAN


def crop_to_union(
    pred: np.ndarray, ref: np.ndarray, margin: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus `margin` voxels per axis."""
    union = pred | ref
    box = []
    for axis, pad in enumerate(margin):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        lo, hi = max(int(hits[0]) - pad, 0), min(int(hits[-1]) + pad + 1, union.shape[axis])
        box.append(slice(lo, hi))
    return pred[tuple(box)], ref[tuple(box)]


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, nsd_tolerance_mm: float
) -> tuple[float, float]:
    """(NSD, HD95 in mm) of two non-empty boolean masks from one pass over their surfaces.

    Same edges, distances and reductions as MONAI's `compute_surface_dice` and
    `compute_hausdorff_distance(percentile=95)`, which would each redo the surface search.
    """
    # imported here: `import monai` loads all of MONAI (~9 s of CPU), which only the
    # processes that score a case need, not those that import this module for its names
    from monai.metrics.utils import get_edge_surface_distance

    y_pred, y = (torch.from_numpy(np.ascontiguousarray(a)) for a in (pred, ref))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"the (ground truth|prediction) of class")
        warnings.filterwarnings(
            "ignore", message=r".*always_return_as_numpy", category=FutureWarning
        )
        # An all-true mask restricts nothing; it only skips MONAI's second crop (done already).
        everywhere = torch.ones_like(y)
        _, distances, _ = get_edge_surface_distance(
            y_pred, y, spacing=spacing, symmetric=True, mask=everywhere
        )
    within = sum(int(torch.count_nonzero(d <= nsd_tolerance_mm)) for d in distances)
    nsd = within / sum(len(d) for d in distances)
    hd95 = max(float(np.quantile(d.numpy(), 0.95)) for d in distances)  # as torch.quantile
    return nsd, hd95


def _empty_case_metrics(n_pred: int, n_ref: int) -> dict[str, float]:
    """Overlap and distance metrics when at least one mask is empty (module docstring)."""
    both_empty = n_pred == 0 and n_ref == 0
    score = 1.0 if both_empty else 0.0
    return {
        "dice": score,
        "iou": score,
        "nsd": score,
        "hd95": 0.0 if both_empty else NAN,
        "sensitivity": 1.0 if both_empty else _ratio(0, n_ref),
        "precision": 1.0 if both_empty else _ratio(0, n_pred),
    }


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, nsd_tolerance_mm: float
) -> CaseMetrics:
    """All `METRIC_KEYS` for one case; `pred`/`ref` boolean (slice, row, col), spacing in mm."""
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"need two 3D masks of one shape, got {pred.shape} and {ref.shape}")
    pred, ref = pred.astype(bool, copy=False), ref.astype(bool, copy=False)
    n_pred, n_ref = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    voxel_ml = voxel_volume_ml(spacing)
    volumes = {"ref_volume_ml": n_ref * voxel_ml, "pred_volume_ml": n_pred * voxel_ml}
    if n_pred == 0 or n_ref == 0:
        out = {**_empty_case_metrics(n_pred, n_ref), **volumes}
    else:
        margin = tuple(math.ceil(nsd_tolerance_mm / s) + 2 for s in spacing)
        pred, ref = crop_to_union(pred, ref, margin)
        tp = int(np.count_nonzero(pred & ref))
        nsd, hd95 = surface_metrics(pred, ref, spacing, nsd_tolerance_mm)
        out = {
            "dice": 2 * tp / (n_pred + n_ref),
            "iou": tp / (n_pred + n_ref - tp),
            "sensitivity": tp / n_ref,
            "precision": tp / n_pred,
            "nsd": nsd,
            "hd95": hd95,
            **volumes,
        }
    return {  # in the order of METRIC_KEYS
        "dice": float(out["dice"]),
        "nsd": float(out["nsd"]),
        "hd95": float(out["hd95"]),
        "iou": float(out["iou"]),
        "sensitivity": float(out["sensitivity"]),
        "precision": float(out["precision"]),
        "ref_volume_ml": float(out["ref_volume_ml"]),
        "pred_volume_ml": float(out["pred_volume_ml"]),
    }


def summarise(rows: Sequence[Mapping[str, object]], keys: tuple[str, ...] = METRIC_KEYS) -> Summary:
    """Mean, population std and count of non-NaN values per key; None where all are NaN."""
    summary: Summary = {"n_cases": len(rows)}
    for key in keys:
        values = np.array([row[key] for row in rows if row.get(key) is not None], dtype=float)
        values = values[~np.isnan(values)]
        summary[key] = float(values.mean()) if values.size else None
        summary[f"{key}_std"] = float(values.std()) if values.size else None
        summary[f"{key}_n"] = int(values.size)
    return summary
