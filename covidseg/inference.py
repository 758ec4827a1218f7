"""Slice-by-slice prediction of whole volumes, in batches, with optional flip TTA."""

from __future__ import annotations

from contextlib import nullcontext, suppress

import numpy as np
import torch
from tqdm import tqdm


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; full precision elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output map, softmax over classes otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


@torch.no_grad()
def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    batch_size: int = 8,
    tta_flip: bool = False,
    bf16: bool = True,
    progress: bool = False,
) -> np.ndarray:
    """(slices, H, W) image in [0, 1] -> (C, slices, H, W) float32 probabilities."""
    with suppress(NotImplementedError):  # a torch.export module is already in eval mode
        model.eval()
    out = []
    starts = range(0, image.shape[0], batch_size)
    for start in tqdm(starts, desc="slices", unit="batch", disable=not progress, leave=False):
        batch = torch.from_numpy(np.ascontiguousarray(image[start : start + batch_size]))
        batch = batch.to(device=device, dtype=torch.float32)[:, None]
        if device.type == "cuda":
            batch = batch.contiguous(memory_format=torch.channels_last)
        with autocast(device, bf16):
            prob = probabilities(model(batch))
            if tta_flip:
                mirrored = probabilities(model(batch.flip(-1))).flip(-1)
                if mirrored.shape[1] == 4:  # a mirror swaps the left and right lung channels
                    mirrored = mirrored[:, [0, 2, 1, 3]]
                prob = (prob + mirrored) / 2
        out.append(prob.float().cpu())
    return torch.cat(out).permute(1, 0, 2, 3).numpy()


def to_labels(prob: np.ndarray, threshold: float) -> np.ndarray:
    """(C, ...) probabilities -> uint8 labels: threshold for C == 1, argmax otherwise."""
    if prob.shape[0] == 1:
        return (prob[0] >= threshold).astype(np.uint8)
    return prob.argmax(axis=0).astype(np.uint8)
