"""A scan through the opt-in paths of `predict`: the body crop and int8, then `segment`.

`predict` always comes through here; `evaluate` only with `evaluate.precision: int8`, the one
evaluate setting that runs this code (and so the one where editing `crop` or `quantize` should
re-evaluate: `dvc repro --force evaluate`, since dvc.yaml cannot list a dep for one param value).
"""

from __future__ import annotations

import numpy as np
import torch

from covidseg.data.labels import LabelScheme
from covidseg.data.transforms import Grid
from covidseg.inference.crop import crop_boxes
from covidseg.inference.quantize import int8_model
from covidseg.inference.segment import InferenceOptions, Segmentation, predict_volume, segment


def for_scan(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    hu_window: tuple[float, float] | None,
) -> tuple[torch.nn.Module, np.ndarray]:
    """The model to run on this scan (its int8 copy under `int8`) and the slices' boxes (the
    body boxes under `options.crop`, else whole slices); `hu_window` is the model's."""
    boxes = crop_boxes(image, options, hu_window)
    if options.precision == "int8":
        model = int8_model(model, image, device, options)
    return model, boxes


def predict_scan(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None = None,
    hu_window: tuple[float, float] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """`segment.predict_volume` with the crop and int8 that `options` asks for."""
    run, boxes = for_scan(model, image, device, options=options, hu_window=hu_window)
    return predict_volume(
        run, image, device, options=options, mirror=mirror, boxes=boxes, progress=progress
    )


def segment_scan(
    model: torch.nn.Module,
    image: np.ndarray,
    grid: Grid,
    *,
    scheme: LabelScheme,
    options: InferenceOptions,
    device: torch.device,
    hu_window: tuple[float, float] | None = None,
    progress: bool = False,
) -> Segmentation:
    """`segment.segment` with the crop and int8 that `options` asks for."""
    run, boxes = for_scan(model, image, device, options=options, hu_window=hu_window)
    return segment(
        run,
        image,
        grid,
        scheme=scheme,
        options=options,
        device=device,
        boxes=boxes,
        progress=progress,
    )
