"""The study's loss: BCE + Dice (binary), or cross-entropy + Dice for several labels."""

from __future__ import annotations

import torch
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from covidseg.config import LossParams


class SegmentationLoss(nn.Module):
    """Weighted sum of a pixel-wise term and a soft Dice term on logits."""

    def __init__(self, params: LossParams, classes: int) -> None:
        super().__init__()
        self.binary = classes == 1
        self.pixel = nn.BCEWithLogitsLoss() if self.binary else nn.CrossEntropyLoss()
        mode = "binary" if self.binary else "multiclass"
        self.dice: nn.Module = DiceLoss(mode=mode, from_logits=True)  # SMP is untyped
        self.weights = (params.bce_weight, params.dice_weight)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`logits` (B, C, H, W); `target` (B, H, W) integer labels."""
        logits = logits.float()
        pixel: torch.Tensor  # what the loss modules return (`Module.__call__` is untyped)
        dice: torch.Tensor
        if self.binary:
            pixel = self.pixel(logits[:, 0], target.float())
            dice = self.dice(logits, target[:, None])
        else:
            pixel = self.pixel(logits, target)
            dice = self.dice(logits, target)
        return self.weights[0] * pixel + self.weights[1] * dice
