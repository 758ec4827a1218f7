"""The one way a CT becomes model input, and the one way probabilities become labels.

`model_input` (canonical volume -> slices at `image_size`) is what `prepare` stores and what
`predict` feeds the network; `labels_on_grid` (probabilities on the model's grid -> labels on
the scan's grid) is what `evaluate` scores and what `predict` writes. Sharing them keeps
training, evaluation and prediction in step: a change here reaches all three.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from covidseg.config import PrepareParams
from covidseg.data.intensity import check_encoding, normalise
from covidseg.data.resample import to_original_grid, to_square
from covidseg.data.volumes import Volume, check_finite, reorient


@dataclass(frozen=True)
class Recipe:
    """How intensities and sizes are mapped: `prepare`'s params, carried by every model."""

    hu_window: tuple[float, float]
    image_size: int
    image_dtype: str = "float16"


def recipe_of(params: PrepareParams) -> Recipe:
    """The recipe that `prepare` applies and every trained model carries."""
    return Recipe(params.hu_window, params.image_size, params.image_dtype)


@dataclass(frozen=True)
class Grid:
    """The in-plane shape (rows, cols) of the canonical scan: what `labels_on_grid` restores."""

    rows: int
    cols: int


@dataclass(frozen=True)
class ModelInput:
    """Slices (slices, size, size) in [0, 1], in the recipe's dtype, and how to go back."""

    image: np.ndarray
    encoding: str
    grid: Grid


def model_input(volume: Volume, case: str, recipe: Recipe) -> ModelInput:
    """Check the encoding, map to HU and window to [0, 1], pad to square and resize."""
    check_finite(volume.data, case, "image")
    encoding = check_encoding(volume.data, case)
    window = normalise(volume.data, encoding, recipe.hu_window)
    image = to_square(window, recipe.image_size, labels=False).astype(recipe.image_dtype)
    rows, cols = volume.data.shape[1:]
    return ModelInput(image=image, encoding=encoding, grid=Grid(rows, cols))


def scan_input(
    data: np.ndarray, affine: np.ndarray, case: str, recipe: Recipe
) -> tuple[ModelInput, Volume]:
    """A scan as read from disk -> (its model input, its canonical volume)."""
    check_finite(data, case, "image")
    volume = reorient(data, affine)
    return model_input(volume, case, recipe), volume


def to_labels(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(C, ...) probabilities -> uint8 labels: threshold for C == 1, argmax otherwise."""
    if prob.shape[0] == 1:
        return (prob[0] >= threshold).astype(np.uint8)
    return prob.argmax(axis=0).astype(np.uint8)


def labels_on_grid(prob: np.ndarray, grid: Grid, threshold: float) -> np.ndarray:
    """(C, slices, S, S) probabilities -> uint8 labels on the scan's grid (resampled first,
    thresholded after, so that the boundary is placed at the scan's resolution)."""
    original = np.stack([to_original_grid(p, grid.rows, grid.cols, labels=False) for p in prob])
    return to_labels(original, threshold)


BODY_HU = -500.0  # above air (about -1000 HU), below fat (about -100): the body's outline
STRIDE = 32  # the encoders' total stride: crop boxes start and end on multiples of it


def body_level(hu_window: tuple[float, float]) -> float:
    """The model-input value of `BODY_HU` under the recipe's HU window (0 when below it)."""
    low, high = hu_window
    return float(np.clip((BODY_HU - low) / (high - low), 0.0, 1.0))


def body_boxes(image: np.ndarray, level: float, *, margin: int, min_size: int) -> np.ndarray:
    """(slices, S, S) model input -> (slices, 4) int boxes (row0, row1, col0, col1) around the
    voxels above `level`, widened by `margin`, aligned to `STRIDE` (start and end) and at
    least `min_size` long, within the slice. A slice without such voxels gets an empty box
    (row0 == row1).

    Aligned boxes keep the pooling grid of the whole slice, so inside the box the network
    computes what it computes on the whole slice, except near the box's edge."""
    size = image.shape[1:]
    boxes = np.zeros((image.shape[0], 4), np.int64)
    body = np.asarray(image > level)
    for axis, (lo, hi) in ((2, (0, 1)), (1, (2, 3))):  # rows: any over columns, and vice versa
        extent = size[0] if axis == 2 else size[1]
        found = np.asarray(body.any(axis=axis))  # (slices, extent)
        has = found.any(axis=1)
        first = np.argmax(found, axis=1)
        last = extent - 1 - np.argmax(found[:, ::-1], axis=1)
        start = np.clip((first - margin) // STRIDE * STRIDE, 0, extent)
        stop = np.clip(-(-(last + 1 + margin) // STRIDE) * STRIDE, 0, extent)
        least = min(-(-min_size // STRIDE) * STRIDE, extent)
        stop = np.maximum(stop, np.minimum(start + least, extent))  # widened to `least`,
        start = np.minimum(start, stop - least)  # at the far side when at the slice's edge
        boxes[:, lo] = np.where(has, start, 0)
        boxes[:, hi] = np.where(has, stop, 0)
    empty = boxes[:, 0] == boxes[:, 1]
    boxes[empty] = 0
    return boxes
