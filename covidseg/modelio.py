"""A trained model folder: `model.pt` (weights) and `model.json` (how to rebuild and feed it)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from covidseg.atomic import atomic_dir
from covidseg.errors import CovidSegError
from covidseg.model import build_model


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    encoder: str
    classes: int
    target: str
    image_size: int
    hu_window: tuple[float, float]
    run_id: str | None = None
    best_epoch: int = 0
    val_dice: float | None = None

    @property
    def infection_label(self) -> int:
        return 1 if self.classes == 1 else 3


def save_model(folder: Path, weights: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Write the model folder whole, or not at all."""
    with atomic_dir(folder) as tmp:
        torch.save(weights, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_model(folder: Path, device: torch.device) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the network (no weight download) and load the trained weights."""
    try:
        raw = json.loads((folder / "model.json").read_text())
        spec = ModelSpec(**{**raw, "hu_window": tuple(raw["hu_window"])})
        weights = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as error:
        raise CovidSegError(f"{folder}: not a trained model folder ({error})") from None
    model = build_model(spec.arch, spec.encoder, None, spec.classes)
    model.load_state_dict(weights)
    return model.to(device).eval(), spec
