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
from covidseg.data.intensity import check_encoding, normalise, normalised_min
from covidseg.data.resample import SLAB_SLICES, to_original_grid, to_square
from covidseg.data.volumes import Volume, check_finite, reorient, slabs


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


def model_input(volume: Volume, case: str, recipe: Recipe, *, dataset: bool = True) -> ModelInput:
    """Check the encoding, map to HU and window to [0, 1], pad to square and resize. The
    dataset's naming rule holds for a dataset case only (`check_encoding`)."""
    data, size = volume.data, recipe.image_size
    check_finite(data, case, "image")
    encoding = check_encoding(data, case, dataset=dataset)
    # a slab at a time into the output: no float32 copy of the whole volume. The padding is the
    # whole volume's lowest value, as if it had been normalised at once.
    fill = normalised_min(data, encoding, recipe.hu_window)
    image = np.empty((len(data), size, size), recipe.image_dtype)
    for part in slabs(len(data), SLAB_SLICES):
        window = normalise(data[part], encoding, recipe.hu_window)
        image[part] = to_square(window, size, labels=False, fill=fill)
    rows, cols = data.shape[1:]
    return ModelInput(image=image, encoding=encoding, grid=Grid(rows, cols))


def scan_input(
    data: np.ndarray, affine: np.ndarray, case: str, recipe: Recipe
) -> tuple[ModelInput, Volume]:
    """A user's scan as read from disk -> (its model input, its canonical volume); its
    encoding is told by its values alone, never by its name."""
    check_finite(data, case, "image")
    volume = reorient(data, affine)
    return model_input(volume, case, recipe, dataset=False), volume


def to_labels(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(C, ...) probabilities -> uint8 labels: threshold for C == 1, argmax otherwise."""
    if prob.shape[0] == 1:
        above: np.ndarray = prob[0] >= threshold
        return above.astype(np.uint8)
    best: np.ndarray = prob.argmax(axis=0)
    return best.astype(np.uint8)


def labels_on_grid(prob: np.ndarray, grid: Grid, threshold: float) -> np.ndarray:
    """(C, slices, S, S) probabilities -> uint8 labels on the scan's grid (resampled first,
    thresholded after, so that the boundary is placed at the scan's resolution)."""
    original = np.stack([to_original_grid(p, grid.rows, grid.cols, labels=False) for p in prob])
    return to_labels(original, threshold)
