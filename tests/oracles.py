"""Oracle modules: stand-ins for trained networks in the `predict` tests.

Their logits are high where the normalised intensity is that of a phantom tissue, so their
prediction is the phantom's mask and any error in the orientation, padding or resizing round
trip shows up voxel for voxel.
"""

from __future__ import annotations

import torch
from phantoms import LESION_HU, LUNG_HU
from tiny import WINDOW

from covidseg.inference.predict import Predictor
from covidseg.training.modelio import ModelSpec

LESION = (LESION_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])  # ~0.567
LUNG = (LUNG_HU - WINDOW[0]) / (WINDOW[1] - WINDOW[0])  # ~0.287
BAND = 0.08  # ten noise sigmas, far from every other tissue


class LesionOracle(torch.nn.Module):
    """One logit map: high where the intensity is the lesion's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where((x - LESION).abs() < BAND, 10.0, -10.0)


class LungOracle(torch.nn.Module):
    """Four logit maps: background, left lung (patient's left = high columns), right, infection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lung = (x - LUNG).abs() < BAND
        left_half = torch.arange(x.shape[-1]) >= x.shape[-1] // 2
        maps = (lung & left_half, lung & ~left_half, (x - LESION).abs() < BAND)
        return torch.cat([torch.full_like(x, 0.5), *(20.0 * m.float() for m in maps)], dim=1)


def oracle(model: torch.nn.Module, classes: int, image_size: int) -> Predictor:
    """A Predictor around an oracle, fed like a trained model of that size."""
    target = "infection" if classes == 1 else "lung_infection"
    spec = ModelSpec("oracle", "intensity", classes, target, image_size, WINDOW)
    return Predictor(model=model, spec=spec, source="oracle", device=torch.device("cpu"))
