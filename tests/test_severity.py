"""Severity numbers: extent grades, infected voxels given a side, per-lung volumes and shares."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, generate_binary_structure

from covidseg.data.labels import INFECTION as INFECTION_ONLY
from covidseg.data.labels import (
    LUNG_INFECTION,
    SLAB_SLICES,
    LungSurface,
    lung_surface,
    whole_lungs,
)
from covidseg.reporting.severity import extent_grade, severity

LEFT, RIGHT, INFECTION = 1, 2, 3


@pytest.mark.parametrize(
    ("percent", "grade"),
    [
        (0.0, 0),
        (1e-6, 1),
        (10.0, 1),
        (24.999, 1),
        (25.0, 2),
        (49.999, 2),
        (50.0, 3),
        (74.999, 3),
        (75.0, 4),
        (100.0, 4),
        (math.nan, 0),
    ],
)
def test_extent_grade_boundaries(percent: float, grade: int) -> None:
    assert extent_grade(percent) == grade


def test_whole_lungs_gives_infection_the_side_of_the_nearest_lung_voxel() -> None:
    """A row from the patient's right (column 0) to left: right lung, gap, left lung."""
    labels = np.zeros((1, 3, 12), np.uint8)
    labels[0, :, 0:3] = RIGHT
    labels[0, :, 8:12] = LEFT
    labels[0, 1, 3] = INFECTION  # next to the right lung (1 voxel) rather than the left (5)
    labels[0, 1, 6] = INFECTION  # 2 voxels from the left lung, 4 from the right
    labels[0, 0, 9] = INFECTION  # inside the left lung
    labels[0, 2, 1] = INFECTION  # inside the right lung

    lungs = whole_lungs(labels)

    expected = np.where(np.isin(labels, (LEFT, RIGHT)), labels, 0)
    expected[0, 1, 3], expected[0, 1, 6] = RIGHT, LEFT
    expected[0, 0, 9], expected[0, 2, 1] = LEFT, RIGHT
    np.testing.assert_array_equal(lungs, expected)
    assert lungs.dtype == np.uint8
    assert labels[0, 1, 3] == INFECTION  # the input is left as it was


def test_whole_lungs_reaches_across_slices_and_outside_the_lungs_box() -> None:
    """Infection beyond the lungs' bounding box and on a slice without lung gets a side."""
    labels = np.zeros((3, 4, 10), np.uint8)
    labels[1, :, 2:4] = RIGHT
    labels[1, :, 6:9] = LEFT
    labels[0, 2, 7] = INFECTION  # the slice below: nearest is the left lung straight above
    labels[2, 1, 2] = INFECTION  # the slice above the right lung
    labels[1, 3, 0] = INFECTION  # left of the box of the lungs: nearest is the right lung
    labels[1, 0, 9] = INFECTION  # right of it: the left lung

    lungs = whole_lungs(labels)

    assert lungs[0, 2, 7] == LEFT
    assert lungs[2, 1, 2] == RIGHT
    assert lungs[1, 3, 0] == RIGHT
    assert lungs[1, 0, 9] == LEFT
    assert int((lungs > 0).sum()) == int(np.isin(labels, (LEFT, RIGHT)).sum()) + 4


def test_whole_lungs_without_lungs_drops_the_infection() -> None:
    labels = np.zeros((2, 3, 3), np.uint8)
    labels[1, 1, 1] = INFECTION
    assert not whole_lungs(labels).any()


def test_whole_lungs_when_the_lungs_fill_everything_else() -> None:
    """No voxel outside the lungs but the infected ones, and none at all: nothing to search."""
    labels = np.full((2, 3, 3), LEFT, np.uint8)
    labels[0, 0, 0] = INFECTION
    lungs = whole_lungs(labels)
    assert (lungs == LEFT).all()
    np.testing.assert_array_equal(whole_lungs(np.full((2, 3, 3), RIGHT, np.uint8)), RIGHT)


def brute_force_distances(lung: np.ndarray, points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(points, lung voxels) distances in mm, every pair."""
    return np.sqrt((((points[:, None, :] - lung[None, :, :]) * scale) ** 2).sum(axis=2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whole_lungs_agrees_with_a_brute_force_nearest_search(seed: int) -> None:
    """Random labels over more slices than one slab, random anisotropic spacing: the voxel
    found is at the least distance, and the side is that voxel's wherever it is unique."""
    rng = np.random.default_rng(seed)
    shape = (3 * SLAB_SLICES + 5, 9, 7)
    labels = rng.choice(4, size=shape, p=(0.55, 0.1, 0.1, 0.25)).astype(np.uint8)
    labels[: SLAB_SLICES + 2][np.isin(labels[: SLAB_SLICES + 2], (LEFT, RIGHT))] = 0  # far ones
    a, b, c = (float(v) for v in rng.uniform(0.4, 5.0, 3))
    spacing = (a, b, c)
    scale = np.asarray(spacing)
    lung, infected = np.argwhere(np.isin(labels, (LEFT, RIGHT))), np.argwhere(labels == INFECTION)
    distances = brute_force_distances(lung, infected, scale)
    least = distances.min(axis=1)

    surface = LungSurface(np.where(labels == INFECTION, 0, labels), spacing)
    found = surface.voxels[surface.nearest(infected)]
    np.testing.assert_allclose(np.sqrt((((found - infected) * scale) ** 2).sum(1)), least)
    assert np.isin(labels[tuple(found.T)], (LEFT, RIGHT)).all()

    lungs = whole_lungs(labels, spacing)
    ties = np.isclose(distances, least[:, None], rtol=1e-9, atol=0)
    nearest_sides = [set(labels[tuple(lung[row].T)]) for row in ties]
    unique = np.array([len(sides) == 1 for sides in nearest_sides])
    expected = np.array([min(sides) for sides in nearest_sides])
    got = lungs[tuple(infected.T)]
    np.testing.assert_array_equal(got[unique], expected[unique])
    assert all(side in sides for side, sides in zip(got, nearest_sides, strict=True))
    assert unique.sum() > 0.9 * len(unique) and infected[:, 0].min() < SLAB_SLICES
    others = labels != INFECTION
    np.testing.assert_array_equal(
        lungs[others], np.where(np.isin(labels, (1, 2)), labels, 0)[others]
    )


def test_lung_surface_is_the_lung_voxels_with_a_non_lung_neighbour() -> None:
    """Against a whole-volume erosion (outside the volume counts as lung), across slabs."""
    rng = np.random.default_rng(3)
    lungs = (rng.random((2 * SLAB_SLICES + 3, 10, 11)) < 0.7).astype(np.uint8)
    cross = generate_binary_structure(3, 1)
    interior = binary_erosion(lungs > 0, structure=cross, border_value=1)
    expected = np.argwhere((lungs > 0) & ~interior)
    found = lung_surface(lungs)
    np.testing.assert_array_equal(found[np.lexsort(found.T[::-1])], expected)


def lung_volume() -> np.ndarray:
    """(3, 4, 12) labels: slice 0 empty; the left lung (columns 8-11) half infected over
    slices 1-2, the right lung (columns 0-4) with 8 of its 40 voxels infected on slice 2."""
    labels = np.zeros((3, 4, 12), np.uint8)
    labels[1:, :, 0:5] = RIGHT
    labels[1:, :, 8:12] = LEFT
    labels[1:, :, 8:10] = INFECTION  # 16 of the left lung's 32 voxels
    labels[2, :, 3:5] = INFECTION  # 8 of the right lung's 40 voxels
    return labels


def test_severity_of_a_volume_with_known_counts() -> None:
    voxel_ml = 5.0 * 2.0 * 2.0 / 1000.0
    out = severity(lung_volume(), (5.0, 2.0, 2.0), LUNG_INFECTION)
    assert out == {
        "lesion_volume_ml": pytest.approx(24 * voxel_ml),
        "slices_involved": 2,
        "slices_total": 3,
        "left_lung_volume_ml": pytest.approx(32 * voxel_ml),
        "left_lung_infected_pct": pytest.approx(50.0),
        "left_lung_grade": 3,
        "right_lung_volume_ml": pytest.approx(40 * voxel_ml),
        "right_lung_infected_pct": pytest.approx(20.0),
        "right_lung_grade": 1,
        "total_grade": 4,
    }


def test_severity_uses_the_spacing_and_rounds_to_microlitres() -> None:
    out = severity(lung_volume(), (1.5, 0.7, 0.7), LUNG_INFECTION)
    voxel_ml = 1.5 * 0.7 * 0.7 / 1000.0
    assert out["lesion_volume_ml"] == round(24 * voxel_ml, 3)
    assert out["left_lung_volume_ml"] == round(32 * voxel_ml, 3)
    assert out["right_lung_volume_ml"] == round(40 * voxel_ml, 3)


def test_severity_of_an_infection_only_model_has_no_lung_numbers() -> None:
    labels = (lung_volume() == INFECTION).astype(np.uint8)
    out = severity(labels, (2.0, 1.0, 1.0), INFECTION_ONLY)
    assert out == {
        "lesion_volume_ml": pytest.approx(0.048),
        "slices_involved": 2,
        "slices_total": 3,
    }


def test_severity_without_infection_grades_zero() -> None:
    labels = np.where(lung_volume() == INFECTION, LEFT, lung_volume()).astype(np.uint8)
    out = severity(labels, (1.0, 1.0, 1.0), LUNG_INFECTION)
    assert out["lesion_volume_ml"] == 0.0
    assert out["slices_involved"] == 0
    assert out["left_lung_infected_pct"] == 0.0
    assert out["left_lung_grade"] == out["right_lung_grade"] == out["total_grade"] == 0
    assert out["left_lung_volume_ml"] == pytest.approx(0.04)  # 32 + 8 voxels relabelled left
