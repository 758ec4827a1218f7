"""Per-case metrics: hand-checked values, MONAI agreement, spacing, empty-mask rules."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping
from typing import cast, get_args

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice
from scipy import ndimage
from tiny import TINY

from covidseg.config import LOWER_IS_BETTER, PromoteMetric, parse_params
from covidseg.data.labels import INFECTION, LEFT_LUNG, LUNG_INFECTION, RIGHT_LUNG
from covidseg.evaluation.aggregate import LUNG_KEYS, ScoredCase, summary_of
from covidseg.evaluation.evaluate import score_case
from covidseg.evaluation.metrics import METRIC_KEYS, case_metrics, crop_to_union, summarise

ISO = (1.0, 1.0, 1.0)


def _sphere(shape: tuple[int, int, int], centre: tuple[float, ...], radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in shape)]
    return np.asarray(sum((g - c) ** 2 for g, c in zip(grid, centre, strict=True)) <= radius**2)


def _box(shape: tuple[int, int, int], box: tuple[slice, ...]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[box] = True
    return mask


def _blobs(seed: int, shape: tuple[int, int, int]) -> np.ndarray:
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2.0)
    return noise > np.quantile(noise, 0.93)


def test_box_shifted_by_two_voxels_has_hand_checked_overlap() -> None:
    ref = _box((20, 20, 20), np.s_[5:15, 5:15, 5:15])
    pred = np.roll(ref, 2, axis=2)  # overlap 10 x 10 x 8 = 800 of 1000 each
    m = case_metrics(pred, ref, ISO, 1.0)
    assert m["dice"] == pytest.approx(2 * 800 / 2000)
    assert m["iou"] == pytest.approx(800 / 1200)
    assert m["sensitivity"] == pytest.approx(0.8)
    assert m["precision"] == pytest.approx(0.8)


def test_sphere_dice_matches_counts_and_monai() -> None:
    ref = _sphere((24, 24, 24), (12, 12, 12), 6)
    pred = _sphere((24, 24, 24), (12, 12, 14), 6)
    tp = np.count_nonzero(ref & pred)
    expected = 2 * tp / (ref.sum() + pred.sum())
    assert 0.5 < expected < 0.9
    monai = compute_dice(torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None])
    m = case_metrics(pred, ref, ISO, 1.0)
    assert m["dice"] == pytest.approx(expected)
    assert m["dice"] == pytest.approx(monai.item(), rel=1e-6)


@pytest.mark.parametrize(("axis", "expected_mm"), [(0, 5.0), (1, 0.7), (2, 0.7)])
def test_hd95_uses_the_spacing_of_the_shifted_axis(axis: int, expected_mm: float) -> None:
    # A one-voxel-thick plate moved by one voxel across its thickness: every surface distance
    # is exactly the voxel size along that axis.
    box = [slice(4, 12)] * 3
    box[axis] = slice(6, 7)
    ref = _box((16, 16, 16), tuple(box))
    pred = np.roll(ref, 1, axis=axis)
    m = case_metrics(pred, ref, (5.0, 0.7, 0.7), nsd_tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(expected_mm, rel=1e-6)


def test_nsd_is_one_within_tolerance_and_drops_below_it() -> None:
    ref = _box((16, 16, 16), np.s_[6:7, 4:12, 4:12])
    pred = np.roll(ref, 1, axis=0)  # every surface point 5 mm from the other surface
    assert case_metrics(pred, ref, (5.0, 0.7, 0.7), 5.0)["nsd"] == pytest.approx(1.0)
    assert case_metrics(pred, ref, (5.0, 0.7, 0.7), 4.9)["nsd"] == pytest.approx(0.0)
    ref_sphere = _sphere((20, 20, 20), (10, 10, 10), 5)
    shifted = np.roll(ref_sphere, 2, axis=1)
    assert case_metrics(shifted, ref_sphere, ISO, 2.0)["nsd"] == pytest.approx(1.0)
    assert case_metrics(shifted, ref_sphere, ISO, 1.0)["nsd"] < 0.95


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")
@pytest.mark.parametrize("tolerance", [0.5, 2.0])
def test_cropped_metrics_equal_monai_on_full_arrays(tolerance: float) -> None:
    shape, spacing = (16, 40, 40), (2.5, 0.8, 0.8)
    ref, pred = _blobs(0, shape), _blobs(1, shape)
    ref[:, :8], pred[:, :8] = False, False  # leave room for the crop to cut away
    pred[0, 39, 39] = True  # an outlier on the array border
    p, r = torch.from_numpy(pred)[None, None], torch.from_numpy(ref)[None, None]
    nsd = compute_surface_dice(p, r, [tolerance], include_background=True, spacing=list(spacing))
    hd95 = compute_hausdorff_distance(
        p, r, include_background=True, percentile=95, spacing=list(spacing)
    )
    m = case_metrics(pred, ref, spacing, tolerance)
    assert m["nsd"] == pytest.approx(nsd.item(), rel=1e-6)
    assert m["hd95"] == pytest.approx(hd95.item(), rel=1e-6)
    assert 0.0 < m["nsd"] < 1.0


def test_crop_keeps_the_union_plus_margin() -> None:
    ref = _box((30, 30, 30), np.s_[10:12, 10:12, 10:12])
    pred = _box((30, 30, 30), np.s_[14:15, 10:11, 27:29])
    cropped_pred, cropped_ref = crop_to_union(pred, ref, (1, 2, 3))
    assert cropped_pred.shape == cropped_ref.shape == (7, 6, 23)  # 13:20, 8:14, 7:30 (clipped)
    assert cropped_pred.sum() == pred.sum() and cropped_ref.sum() == ref.sum()


def _check(metrics: Mapping[str, object], expected: Mapping[str, float]) -> None:
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, nan_ok=True), key


def test_empty_mask_rules_without_warnings() -> None:
    empty = np.zeros((8, 8, 8), bool)
    blob = _box((8, 8, 8), np.s_[2:5, 2:5, 2:5])
    nan = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both = case_metrics(empty, empty, ISO, 1.0)
        no_ref = case_metrics(blob, empty, ISO, 1.0)
        no_pred = case_metrics(empty, blob, ISO, 1.0)
        case_metrics(blob, np.roll(blob, 1, axis=0), ISO, 1.0)
    assert [str(w.message) for w in caught] == []
    assert tuple(both) == tuple(no_ref) == METRIC_KEYS
    ones = {"dice": 1, "iou": 1, "nsd": 1, "hd95": 0, "sensitivity": 1, "precision": 1}
    _check(both, ones)
    _check(no_ref, {"dice": 0, "iou": 0, "nsd": 0, "hd95": nan, "sensitivity": nan})
    _check(no_ref, {"precision": 0, "ref_volume_ml": 0, "pred_volume_ml": 0.027})
    _check(no_pred, {"dice": 0, "iou": 0, "nsd": 0, "hd95": nan, "sensitivity": 0})
    _check(no_pred, {"precision": nan, "ref_volume_ml": 0.027, "pred_volume_ml": 0})


def test_volumes_in_millilitres() -> None:
    ref = _box((20, 20, 20), np.s_[0:10, 0:10, 0:10])  # 1000 voxels
    pred = _box((20, 20, 20), np.s_[0:10, 0:10, 0:4])  # 400 voxels
    m = case_metrics(pred, ref, (2.0, 0.5, 0.5), 1.0)  # 0.5 mm^3 per voxel
    assert m["ref_volume_ml"] == pytest.approx(0.5)
    assert m["pred_volume_ml"] == pytest.approx(0.2)


def test_summarise_ignores_nan_and_reports_std_and_counts() -> None:
    rows = [
        {"dice": 0.5, "hd95": 2.0, "nsd": math.nan},
        {"dice": 1.0, "hd95": math.nan, "nsd": math.nan},
        {"dice": 0.0, "hd95": 4.0, "nsd": math.nan},
    ]
    s = summarise(rows, keys=("dice", "hd95", "nsd"))
    assert s["n_cases"] == 3
    assert s["dice"] == pytest.approx(0.5)
    assert s["dice_std"] == pytest.approx(math.sqrt(1 / 6))  # population std of 0.5, 1, 0
    assert (s["hd95"], s["hd95_std"], s["hd95_n"]) == pytest.approx((3.0, 1.0, 2))
    assert (s["nsd"], s["nsd_std"], s["nsd_n"]) == (None, None, 0)
    json.dumps(s, allow_nan=False)


def test_every_promote_metric_is_a_mean_that_aggregate_reports() -> None:
    """`config.PromoteMetric` restates metric names (config may not import evaluation): each
    one is a mean of the summary `aggregate` makes from a lung + infection model's rows, and
    every per-case metric but the volumes, and every lung metric of the report, is one."""
    labels = np.zeros((12, 24, 24), np.uint8)
    labels[2:10, 4:20, 2:12] = RIGHT_LUNG
    labels[2:10, 4:20, 12:22] = LEFT_LUNG
    labels[4:8, 8:14, 14:20] = LUNG_INFECTION.infection
    params = parse_params(TINY)
    promote = set(get_args(PromoteMetric))
    for scheme in (INFECTION, LUNG_INFECTION):
        ref = (labels if scheme.multi else labels == scheme.infection).astype(np.uint8)
        row = score_case(ref, ref, ISO, scheme, params=params)
        scored = ScoredCase("case_0", 0, dict(cast(Mapping[str, float], row)))
        summary = summary_of([scored], [0]).overall
        means = {key for key, value in summary.items() if isinstance(value, float)}
        assert (promote if scheme.multi else promote - set(LUNG_KEYS)) <= means, scheme.target
    assert promote == (set(METRIC_KEYS) - {"ref_volume_ml", "pred_volume_ml"}) | set(LUNG_KEYS)
    assert promote >= LOWER_IS_BETTER
