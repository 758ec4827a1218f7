"""Per-slice augmentation: left-right flip, small rotation and scaling, intensity jitter.

Each call takes its own seeded generator, so a slice's augmentation depends only on
(train seed, epoch, draw), never on worker count or scheduling: runs repeat exactly.

On CUDA the same transforms run on whole batches on the device: `dataset.DrawnSlices` makes the
loader read slices and draw each slice's parameters from its seeded generator (same calls,
same order as `augment_slice`), and `augment_batch` applies them to the batch on the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.config import AugmentParams
from covidseg.data.labels import LUNG_INFECTION


def _affine_theta(angle_deg: float, scale: float) -> torch.Tensor:
    """2x3 matrix for `affine_grid`: rotation about the centre and isotropic zoom."""
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)


def _warp(
    image: np.ndarray, mask: np.ndarray, theta: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one affine to image (bilinear, border padding) and mask (nearest, zeros)."""
    img = torch.from_numpy(image)[None, None]
    msk = torch.from_numpy(mask.astype(np.float32))[None, None]
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    msk = F.grid_sample(msk, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img[0, 0].numpy(), msk[0, 0].numpy().astype(mask.dtype)


SIDE_SWAP = np.array(LUNG_INFECTION.mirror, dtype=np.uint8)  # left <-> right lung in a mirror


@dataclass(frozen=True)
class Draw:
    """The random parameters of one slice's augmentation."""

    flip: bool = False
    angle: float = 0.0
    scale: float = 1.0
    contrast: float | None = None
    shift: float = 0.0

    @property
    def warps(self) -> bool:
        return bool(self.angle or self.scale != 1.0)

    def row(self) -> torch.Tensor:
        """float32 `[flip, theta (2x3, row-major), contrast, shift]`, as `augment_batch` reads."""
        theta = _affine_theta(self.angle, self.scale).flatten()
        contrast = 1.0 if self.contrast is None else self.contrast
        ends = torch.tensor([float(self.flip), contrast, self.shift], dtype=torch.float32)
        return torch.cat([ends[:1], theta, ends[1:]])


def draw(params: AugmentParams, rng: np.random.Generator) -> Draw:
    """One slice's parameters, drawn in the order `augment_slice` has always drawn them."""
    flip = bool(params.flip and rng.random() < 0.5)
    angle = rng.uniform(-params.rotate_deg, params.rotate_deg) if params.rotate_deg else 0.0
    scale = rng.uniform(1 - params.scale, 1 + params.scale) if params.scale else 1.0
    contrast, shift = None, 0.0
    if params.intensity:
        contrast = rng.uniform(1 - params.intensity, 1 + params.intensity)
        shift = rng.uniform(-params.intensity, params.intensity) / 2
    return Draw(flip, float(angle), float(scale), contrast, float(shift))


def augment_slice(
    image: np.ndarray,
    mask: np.ndarray,
    params: AugmentParams,
    rng: np.random.Generator,
    *,
    sided: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Randomly transform one (H, W) float32 image in [0, 1] and its (H, W) label mask.

    `sided`: the mask holds left (1) and right (2) lung labels, which a mirror swaps.
    """
    d = draw(params, rng)
    if d.flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
        if sided:
            mask = SIDE_SWAP[mask]
    if d.warps:
        theta = _affine_theta(d.angle, d.scale)
        image, mask = _warp(np.ascontiguousarray(image), np.ascontiguousarray(mask), theta)
    if d.contrast is not None:
        image = np.clip((image - 0.5) * d.contrast + 0.5 + d.shift, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)


def _flip_batch(
    image: torch.Tensor, mask: torch.Tensor, flip: torch.Tensor, sided: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror the slices whose `flip` is set; sided masks swap their labels by the lung scheme's
    mirror map (left <-> right lung)."""
    mirrored = mask.flip(-1)
    if sided:
        swap = torch.as_tensor(SIDE_SWAP, device=mask.device)
        mirrored = swap[mirrored.long()].to(mask.dtype)
    image = torch.where(flip[:, None, None, None], image.flip(-1), image)
    return image, torch.where(flip[:, None, None], mirrored, mask)


def augment_batch(
    image: torch.Tensor,
    mask: torch.Tensor,
    rows: torch.Tensor,
    params: AugmentParams,
    *,
    sided: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`augment_slice` for a (B, 1, H, W) image batch and (B, H, W) masks, on their device.

    `rows` is (B, 9) from `Draw.row`; the same rows give the same transforms as the slices'
    `augment_slice` (image within float rounding, mask exactly). No host synchronisation.
    """
    rows = rows.to(image.device, non_blocking=True)
    if params.flip:
        image, mask = _flip_batch(image, mask, rows[:, 0] > 0.5, sided)
    if params.rotate_deg or params.scale:
        theta = rows[:, 1:7].reshape(-1, 2, 3)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        image = F.grid_sample(
            image, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        warped = F.grid_sample(
            mask[:, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
        )
        mask = warped[:, 0].to(mask.dtype)
    if params.intensity:
        contrast, shift = rows[:, 7, None, None, None], rows[:, 8, None, None, None]
        image = ((image - 0.5) * contrast + 0.5 + shift).clamp(0.0, 1.0)
    return image, mask
