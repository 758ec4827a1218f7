"""In-plane resizing of slice stacks, and its exact inverse.

A non-square slice (e.g. 630x401) is first padded to a square, centred, with the lowest value
(air after windowing, background for masks), then resized: anatomy keeps its aspect ratio and
both in-plane spacings stay equal. `to_original_grid` undoes both steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.data.volumes import slabs

Pad = tuple[tuple[int, int], tuple[int, int]]
SLAB_SLICES = 4  # slices resized per step (a float32 copy of a slab, not of the volume)


def square_padding(rows: int, cols: int) -> Pad:
    """Centred padding ((top, bottom), (left, right)) that makes a rows x cols slice square."""
    side = max(rows, cols)
    dr, dc = side - rows, side - cols
    return (dr // 2, dr - dr // 2), (dc // 2, dc - dc // 2)


def _interpolate(stack: np.ndarray, size: tuple[int, int], labels: bool) -> np.ndarray:
    """Resize (slices, H, W) to (slices, *size): bilinear with antialiasing, or nearest."""
    if stack.shape[1:] == size:
        return stack
    tensor = torch.from_numpy(np.ascontiguousarray(stack))
    if labels:
        out = F.interpolate(tensor[:, None].float(), size=size, mode="nearest-exact")
        return out[:, 0].to(torch.uint8).numpy()
    out = F.interpolate(
        tensor[:, None].float(), size=size, mode="bilinear", align_corners=False, antialias=True
    )
    return out[:, 0].numpy().astype(stack.dtype, copy=False)


def to_square(
    stack: np.ndarray, size: int, labels: bool, *, fill: float | None = None
) -> np.ndarray:
    """Pad (slices, H, W) to square and resize to (slices, size, size). The padding is 0 for
    labels, else `fill` (default: the stack's minimum; a caller working in slabs passes the
    whole volume's). Slices are resized a slab at a time: the float temporaries stay small."""
    pad = square_padding(*stack.shape[1:])
    padded = any(any(p) for p in pad)
    if not padded and stack.shape[1:] == (size, size):
        return stack
    if fill is None:
        fill = 0 if labels else float(stack.min())
    resized = max(stack.shape[1:]) != size
    out = np.empty((len(stack), size, size), np.uint8 if labels and resized else stack.dtype)
    for part in slabs(len(stack), SLAB_SLICES):
        block = stack[part]
        if padded:
            block = np.pad(block, ((0, 0), *pad), constant_values=0 if labels else fill)
        out[part] = _interpolate(block, (size, size), labels)
    return out


def to_original_grid(stack: np.ndarray, rows: int, cols: int, labels: bool) -> np.ndarray:
    """Inverse of `to_square`: resize (slices, S, S) back to the padded square and crop."""
    (top, bottom), (left, right) = square_padding(rows, cols)
    side = max(rows, cols)
    out = _interpolate(stack, (side, side), labels)
    return out[:, top : side - bottom, left : side - right]


def resized_spacing(
    spacing: tuple[float, float, float], rows: int, cols: int, size: int
) -> tuple[float, float, float]:
    """Voxel size (slice, row, col) in mm after `to_square` (padding keeps the spacing)."""
    factor = max(rows, cols) / size
    return (spacing[0], spacing[1] * factor, spacing[2] * factor)
