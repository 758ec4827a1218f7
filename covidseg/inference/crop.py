"""The body crop of `predict --crop` (off by default): each slice runs on its body's box only.

`body_boxes` finds the voxels above -500 HU, widens them by S/16 and aligns the box to the
encoder stride, background outside: fewer pixels, but the network's answer moves with its field
of view (docs/how-to/fast-inference.md). `evaluate` never crops.
"""

from __future__ import annotations

import numpy as np

from covidseg.inference.segment import InferenceOptions, whole_slices

CROP_MARGIN_PARTS = 16  # the body box is widened by S / 16 (32 px at 512): a narrower margin
# moved a trained model's lesion volume by up to 2.8 % (docs/how-to/fast-inference.md)
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


def crop_boxes(
    image: np.ndarray, options: InferenceOptions, hu_window: tuple[float, float] | None
) -> np.ndarray:
    """Each slice's body box when the crop is on, else the whole slice."""
    size = image.shape[1:]
    whole = whole_slices(image)
    if hu_window is None or not options.crop:
        return whole
    boxes = body_boxes(
        image,
        body_level(hu_window),
        margin=max(min(size) // CROP_MARGIN_PARTS, 2),
        min_size=min(size) // 4,
    )
    if (boxes[:, 0] == boxes[:, 1]).all():  # nothing above air anywhere: let the model decide
        return whole
    return boxes
