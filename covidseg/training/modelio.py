"""A trained model folder: `model.pt` (weights) and `model.json` (how to rebuild and feed it).

`model.json` carries the architecture, the preprocessing recipe and the label scheme, so that
everything downstream (evaluate, predict, MLflow) reads them from the model itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from covidseg.atomic import atomic_dir
from covidseg.config import PrepareParams, parse_section
from covidseg.data.labels import LabelScheme, scheme_for
from covidseg.data.transforms import Recipe
from covidseg.errors import CovidSegError
from covidseg.training.model import build_model


@dataclass(frozen=True)
class ModelSpec:
    """What a trained model is and how it must be fed."""

    arch: str
    encoder: str
    classes: int
    target: str
    image_size: int
    hu_window: tuple[float, float]
    image_dtype: str = "float16"
    labels: dict[str, Any] = field(default_factory=dict)
    folds: list[int] = field(default_factory=list)  # the cross-validation folds it was made on
    run_id: str | None = None
    best_epoch: int = 0
    val_dice: float | None = None

    @property
    def scheme(self) -> LabelScheme:
        """The label scheme (from `labels`; models saved before it existed: from `target`)."""
        return LabelScheme.from_json(self.labels) if self.labels else scheme_for(self.target)

    @property
    def infection_label(self) -> int:
        return self.scheme.infection

    @property
    def recipe(self) -> Recipe:
        return Recipe(self.hu_window, self.image_size, self.image_dtype)

    def to_json(self) -> dict[str, Any]:
        """Plain data for `model.json` and MLflow metadata."""
        return asdict(self)

    @classmethod
    def from_json(cls, raw: object, source: str) -> ModelSpec:
        """Check and read `to_json`'s form; every problem is one line naming `source`."""
        if not isinstance(raw, dict):
            raise CovidSegError(f"{source}: model metadata is not a mapping")
        unknown = sorted(set(raw) - {f.name for f in fields(cls)})
        if unknown:
            raise CovidSegError(f"{source}: unknown model metadata keys {unknown}")
        try:
            spec = cls(**raw)
            scheme = spec.scheme
        except (TypeError, KeyError, ValueError, CovidSegError) as error:
            raise CovidSegError(f"{source}: bad model metadata ({error})") from None
        spec = _checked_recipe(spec, source)
        if spec.classes != scheme.classes or spec.target != scheme.target:
            raise CovidSegError(
                f"{source}: classes {spec.classes} and target {spec.target!r} do not match the "
                f"label scheme {scheme.target!r} ({scheme.classes} output maps)"
            )
        return spec


def _checked_recipe(spec: ModelSpec, source: str) -> ModelSpec:
    """The recipe fields validated as `prepare`'s params are (an inverted or non-numeric
    window, an unsupported dtype or size would give wrong volumes); one line naming `source`."""
    recipe = parse_section(
        PrepareParams,
        {
            "hu_window": spec.hu_window,
            "image_size": spec.image_size,
            "image_dtype": spec.image_dtype,
        },
        source,
    )
    return replace(
        spec,
        hu_window=recipe.hu_window,
        image_size=recipe.image_size,
        image_dtype=recipe.image_dtype,
    )


def non_finite_count(weights: dict[str, torch.Tensor]) -> int:
    """How many floating-point weights are NaN or infinite."""
    return sum(
        int((~torch.isfinite(t)).sum()) for t in weights.values() if torch.is_floating_point(t)
    )


def save_model(folder: Path, weights: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    """Write the model folder whole, or not at all; non-finite weights are refused."""
    if bad := non_finite_count(weights):
        raise CovidSegError(f"{folder}: refusing to save a model with {bad} non-finite weights")
    with atomic_dir(folder) as tmp:
        with (tmp / "model.pt").open("wb") as f:  # a full disk: an OSError naming no zip offset
            torch.save(weights, f)
        (tmp / "model.json").write_text(json.dumps(spec.to_json(), indent=2) + "\n")


def read_spec(folder: Path) -> ModelSpec:
    """The `model.json` of a model folder."""
    path = folder / "model.json"
    try:
        raw = json.loads(path.read_text())
    except OSError as error:
        raise CovidSegError(f"{path}: cannot read ({error.strerror or error})") from None
    except json.JSONDecodeError as error:
        raise CovidSegError(f"{path}: not valid JSON ({error})") from None
    return ModelSpec.from_json(raw, str(path))


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """`model.pt` as plain tensors (nothing in it can run code); damage is one line."""
    try:
        weights = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CovidSegError(f"{path}: no such file") from None
    except Exception as error:  # truncated zip, unpickling refused, ...
        reason = " ".join(str(error).split())[:160] or type(error).__name__
        raise CovidSegError(f"{path}: damaged or not a weights file ({reason})") from None
    if not isinstance(weights, dict):
        raise CovidSegError(f"{path}: not a state dict")
    if bad := non_finite_count(weights):
        raise CovidSegError(f"{path}: {bad} weights are NaN or infinite; the model diverged")
    return weights


def load_model(folder: Path, device: torch.device) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild the network (no weight download) and load the trained weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CovidSegError(f"{folder}: no such model folder")
    spec = read_spec(folder)
    weights = read_weights(folder / "model.pt")
    model = build_model(spec.arch, spec.encoder, None, spec.classes)
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        first = str(error).splitlines()[0]
        raise CovidSegError(
            f"{folder / 'model.pt'}: weights do not fit {spec.arch}/{spec.encoder} with "
            f"{spec.classes} output maps as model.json says ({first})"
        ) from None
    return model.to(device).eval(), spec
