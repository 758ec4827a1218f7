"""In-plane resizing of slice stacks, and its exact inverse.

A non-square slice (e.g. 630x401) is first padded to a square, centred, with the lowest value
(air after windowing, background for masks), then resized: anatomy keeps its aspect ratio and
both in-plane spacings stay equal. `to_original_grid` undoes both steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

Pad = tuple[tuple[int, int], tuple[int, int]]


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


def to_square(stack: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """Pad (slices, H, W) to square and resize to (slices, size, size)."""
    pad = square_padding(*stack.shape[1:])
    if any(any(p) for p in pad):
        fill = 0 if labels else float(stack.min())
        stack = np.pad(stack, ((0, 0), *pad), constant_values=fill)
    return _interpolate(stack, (size, size), labels)


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
