"""Slice-by-slice prediction of whole volumes, in batches, with optional flip TTA.

`segment` is the one inference path of `evaluate` and `predict`: the same model and scan give
the same labels in both.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext, suppress
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from covidseg.config import PRECISIONS
from covidseg.labels import LabelScheme
from covidseg.transforms import Grid, labels_on_grid, to_labels


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model on a volume (none of these change what the model is)."""

    batch_size: int = 8
    tta_flip: bool = False
    threshold: float = 0.5
    precision: str = "auto"  # auto | fp32 | bf16


@dataclass(frozen=True)
class Segmentation:
    """Labels on the model's grid (for figures) and on the scan's grid (scored, written)."""

    stored: np.ndarray
    labels: np.ndarray


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA when asked (the training recipe); full precision elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether inference runs in bf16: `auto` picks it on CUDA."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def inference_autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """bf16 autocast on the device when `precision` selects it, else full precision."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output map, softmax over classes otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


@torch.inference_mode()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(slices, H, W) image in [0, 1] -> (C, slices, H, W) float32 probabilities.

    `mirror` (the label scheme's left-right map) reorders the channels of the flipped pass of
    flip TTA for a multi-label model, whose lung channels swap in a mirror.
    """
    with suppress(NotImplementedError):  # a torch.export module is already in eval mode
        model.eval()
    out = []
    starts = range(0, image.shape[0], options.batch_size)
    for start in tqdm(starts, desc="slices", unit="batch", disable=not progress, leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(image[start : start + options.batch_size]))
        batch = batch.to(device=device, dtype=torch.float32)[:, None]
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with inference_autocast(device, options.precision):
            prob = probabilities(model(batch))
            if options.tta_flip:
                mirrored = probabilities(model(batch.flip(-1))).flip(-1)
                if mirror is not None and mirrored.shape[1] > 1:
                    mirrored = mirrored[:, list(mirror)]
                prob = (prob + mirrored) / 2
        out.append(prob.float().cpu())
    return torch.cat(out).permute(1, 0, 2, 3).numpy()


def segment(
    model: torch.nn.Module,
    image: np.ndarray,
    grid: Grid,
    *,
    scheme: LabelScheme,
    options: InferenceOptions,
    device: torch.device,
    progress: bool = False,
) -> Segmentation:
    """Model input (slices, S, S) -> labels on the model's grid and on the scan's grid."""
    prob = predict_volume(
        model, image, device, options=options, mirror=scheme.mirror, progress=progress
    )
    stored = to_labels(prob, options.threshold)
    return Segmentation(stored=stored, labels=labels_on_grid(prob, grid, options.threshold))
