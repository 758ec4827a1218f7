"""Per-slice augmentation: left-right flip, small rotation and scaling, intensity jitter.

Each call takes its own seeded generator, so a slice's augmentation depends only on
(train seed, epoch, draw), never on worker count or scheduling: runs repeat exactly.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from covidseg.config import AugmentParams
from covidseg.labels import LUNG_INFECTION


def _affine_theta(angle_deg: float, scale: float) -> torch.Tensor:
    """2x3 matrix for `affine_grid`: rotation about the centre and isotropic zoom."""
    angle = math.radians(angle_deg)
    cos, sin = math.cos(angle) / scale, math.sin(angle) / scale
    return torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)


def _warp(image: np.ndarray, mask: np.ndarray, theta: torch.Tensor):
    """Apply one affine to image (bilinear, border padding) and mask (nearest, zeros)."""
    img = torch.from_numpy(image)[None, None]
    msk = torch.from_numpy(mask.astype(np.float32))[None, None]
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    msk = F.grid_sample(msk, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return img[0, 0].numpy(), msk[0, 0].numpy().astype(mask.dtype)


SIDE_SWAP = np.array(LUNG_INFECTION.mirror, dtype=np.uint8)  # left <-> right lung in a mirror


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
    if params.flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
        if sided:
            mask = SIDE_SWAP[mask]
    angle = rng.uniform(-params.rotate_deg, params.rotate_deg) if params.rotate_deg else 0.0
    scale = rng.uniform(1 - params.scale, 1 + params.scale) if params.scale else 1.0
    if angle or scale != 1.0:
        theta = _affine_theta(angle, scale)
        image, mask = _warp(np.ascontiguousarray(image), np.ascontiguousarray(mask), theta)
    if params.intensity:
        contrast = rng.uniform(1 - params.intensity, 1 + params.intensity)
        shift = rng.uniform(-params.intensity, params.intensity) / 2
        image = np.clip((image - 0.5) * contrast + 0.5 + shift, 0.0, 1.0)
    return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(mask)
