"""Slice-by-slice prediction of whole volumes, in batches, with optional flip TTA.

`segment` is the one inference path of `evaluate` and `predict`: the same model and scan give
the same labels in both.

Three paths, chosen by `InferenceOptions.precision`:
- `fp32`: full precision, on a CPU in the contiguous layout (the reference);
- the fast path, `auto` and `bf16`: channels_last (oneDNN's faster convolutions); `bf16`
  autocasts to bf16, `auto` does so on CUDA, and on a CPU only where bf16 measures faster than
  fp32 (`covidseg.precision`);
- `int8` (CPU only): the caller passes the copy of the model that `quantize.int8_model` made
  for this scan (or the model itself, where that copy missed the bar), run like `fp32`.
The body crop (`predict --crop`) comes in as `boxes` from `covidseg.inference.crop`. Both
live in their own modules so that `evaluate`, which neither crops nor (by default) runs int8,
does not depend on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from covidseg.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, Precision
from covidseg.data.labels import LabelScheme
from covidseg.data.transforms import Grid, labels_on_grid, to_labels
from covidseg.precision import inference_autocast, probabilities

NCHW = ("fp32", "int8")  # contiguous on a CPU: the reference, and oneDNN's int8 kernels


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model on a volume (none of these change what the model is)."""

    batch_size: int = GPU_BATCH_SIZE
    tta_flip: bool = False
    threshold: float = 0.5
    precision: Precision = "auto"
    crop: bool = False  # run on each slice's body box only (changes the answer a little)


@dataclass(frozen=True)
class Segmentation:
    """Labels on the model's grid (for figures) and on the scan's grid (scored, written)."""

    stored: np.ndarray
    labels: np.ndarray


def whole_slices(image: np.ndarray) -> np.ndarray:
    """One box per slice of an (slices, H, W) volume, each the whole slice."""
    rows, cols = image.shape[1:]
    return np.tile(np.array([0, rows, 0, cols], np.int64), (image.shape[0], 1))


def _batches(boxes: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
    """(slice indices, box) of each batch: the slices of one box together, in slice order;
    slices without a body are skipped."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, box in enumerate(boxes.tolist()):
        if box[0] < box[1]:
            groups.setdefault(tuple(box), []).append(index)
    for box, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            yield np.asarray(indices[start : start + batch_size]), box


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass when none is asked for: fewer on a CPU, where larger batches
    measured slower per slice (docs/how-to/fast-inference.md)."""
    return CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE


def _layout(device: torch.device, options: InferenceOptions) -> torch.memory_format:
    """channels_last on CUDA and on a CPU's fast path (oneDNN's faster convolutions); the
    fp32 path on a CPU (and MPS) keeps the contiguous layout of earlier versions."""
    fast = device.type == "cuda" or (device.type == "cpu" and options.precision not in NCHW)
    return torch.channels_last if fast else torch.contiguous_format


@contextmanager
def _laid_out(model: torch.nn.Module, layout: torch.memory_format) -> Iterator[None]:
    """The model's weights in `layout` for the duration, contiguous again after (outside
    inference mode, so they stay ordinary tensors that training can use)."""
    if layout == torch.contiguous_format:
        yield
        return
    model.to(memory_format=layout)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _forward(
    model: torch.nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None,
) -> torch.Tensor:
    """(N, 1, h, w) batch -> (N, C, h, w) float32 probabilities (flip TTA averaged in)."""
    batch = batch.contiguous(memory_format=_layout(device, options))
    with inference_autocast(device, options.precision):
        prob = probabilities(model(batch))
        if options.tta_flip:
            mirrored = probabilities(model(batch.flip(-1))).flip(-1)
            if mirror is not None and mirrored.shape[1] > 1:
                mirrored = mirrored[:, list(mirror)]
            prob = (prob + mirrored) / 2
    return prob.float().cpu()


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None = None,
    boxes: np.ndarray | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(slices, H, W) image in [0, 1] -> (C, slices, H, W) float32 probabilities.

    `mirror` (the label scheme's left-right map) reorders the channels of the flipped pass of
    flip TTA for a multi-label model, whose lung channels swap in a mirror. `boxes` (one
    (row0, row1, col0, col1) per slice, `crop.crop_boxes`) limits each slice to its box;
    without them every slice is run whole. The model comes back as it went in (eval mode
    aside).
    """
    with suppress(NotImplementedError):  # a torch.export module is already in eval mode
        model.eval()
    boxes = whole_slices(image) if boxes is None else boxes
    with _laid_out(model, _layout(device, options)), torch.inference_mode():
        return _predict_boxes(
            model, image, device, options=options, mirror=mirror, progress=progress, boxes=boxes
        )


def _predict_boxes(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None,
    progress: bool,
    boxes: np.ndarray,
) -> np.ndarray:
    """`predict_volume`'s loop: each batch of slices of one box through the network."""
    batches = list(_batches(boxes, options.batch_size))
    out: np.ndarray | None = None
    for indices, (r0, r1, c0, c1) in tqdm(
        batches, desc="slices", unit="batch", disable=not progress, leave=False
    ):
        batch = torch.from_numpy(np.ascontiguousarray(image[indices, r0:r1, c0:c1]))
        batch = batch.to(device=device, dtype=torch.float32)[:, None]
        prob = _forward(model, batch, device, options=options, mirror=mirror)
        if out is None:  # background outside the boxes: 0, or class 0 of a softmax
            out = np.zeros((prob.shape[1], *image.shape), np.float32)
            if prob.shape[1] > 1:
                out[0] = 1.0
        out[:, indices, r0:r1, c0:c1] = prob.permute(1, 0, 2, 3).numpy()
    assert out is not None  # `crop.crop_boxes` leaves at least one slice to run
    return out


def segment(
    model: torch.nn.Module,
    image: np.ndarray,
    grid: Grid,
    *,
    scheme: LabelScheme,
    options: InferenceOptions,
    device: torch.device,
    boxes: np.ndarray | None = None,
    progress: bool = False,
) -> Segmentation:
    """Model input (slices, S, S) -> labels on the model's grid and on the scan's grid;
    `boxes` as for `predict_volume`."""
    prob = predict_volume(
        model,
        image,
        device,
        options=options,
        mirror=scheme.mirror,
        boxes=boxes,
        progress=progress,
    )
    stored = to_labels(prob, options.threshold)
    return Segmentation(stored=stored, labels=labels_on_grid(prob, grid, options.threshold))
