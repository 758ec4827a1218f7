"""Validation during training: loss and per-case 3D Dice on the stored grid."""

from __future__ import annotations

import numpy as np
import torch

from covidseg.data.transforms import to_labels
from covidseg.precision import autocast, probabilities
from covidseg.training.losses import SegmentationLoss


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """3D Dice of two boolean arrays; two empty masks agree perfectly (1.0)."""
    denominator = int(pred.sum()) + int(ref.sum())
    return 1.0 if denominator == 0 else 2.0 * int((pred & ref).sum()) / denominator


@torch.no_grad()
def validate(
    model: torch.nn.Module,
    cases: dict[str, dict[str, np.ndarray]],
    loss_fn: SegmentationLoss,
    *,
    device: torch.device,
    batch_size: int,
    bf16: bool,
    infection_label: int,
    threshold: float,
) -> tuple[float, dict[str, float]]:
    """(mean slice loss, {case: infection Dice}) over whole validation volumes; labels as
    `evaluate` makes them (`threshold` for one output map, argmax otherwise)."""
    model.eval()
    total: torch.Tensor | float = 0.0
    count, dices = 0, {}
    for case, arrays in cases.items():
        labels = []
        for start in range(0, len(arrays["image"]), batch_size):
            image = torch.from_numpy(arrays["image"][start : start + batch_size].astype(np.float32))
            target = torch.from_numpy(arrays["mask"][start : start + batch_size].astype(np.int64))
            image, target = image[:, None].to(device), target.to(device)
            with autocast(device, bf16):
                logits = model(image)
            # slice by slice: a batch's Dice term pools its slices, so the mean of per-batch
            # losses would depend on the batch size, a runtime setting
            total += sum(loss_fn(logits[i : i + 1], target[i : i + 1]) for i in range(len(image)))
            count += len(image)
            prob = probabilities(logits).permute(1, 0, 2, 3).cpu().numpy()
            labels.append(to_labels(prob, threshold))
        pred = np.concatenate(labels) == infection_label
        dices[case] = dice(pred, arrays["mask"] == infection_label)
    return float(total) / max(count, 1), dices
