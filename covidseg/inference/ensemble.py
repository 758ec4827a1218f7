"""The cross-validation's fold models as one model: the mean of their probabilities.

As nnU-Net does by default, a new scan is segmented by every fold's model and the probabilities
are averaged before thresholding. `FoldEnsemble` is an ordinary module that returns the logits
of that mean (the inverse sigmoid for one output map, the log for softmax maps), so everything
downstream (`inference.probabilities`, thresholds, MLflow's model logging) treats it as one
model; `probabilities` of its output is the members' mean probability.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from covidseg.errors import CovidSegError
from covidseg.training.modelio import ModelSpec, load_model

FOLD_PREFIX = "fold-"
EPS = 1e-7
# what may differ between the folds of one cross-validation
PER_FOLD = ("run_id", "best_epoch", "val_dice", "folds")


class FoldEnsemble(nn.Module):
    """Mean probability of the member models, returned as logits."""

    def __init__(self, members: list[nn.Module], classes: int) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.binary = classes == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = [member(x).float() for member in self.members]
        if self.binary:
            mean = torch.stack([torch.sigmoid(o) for o in outputs]).mean(0)
            return torch.logit(mean.clamp(EPS, 1 - EPS))
        mean = torch.stack([torch.softmax(o, dim=1) for o in outputs]).mean(0)
        return torch.log(mean.clamp_min(EPS))


def fold_folders(folder: Path, folds: list[int] | None = None) -> list[Path]:
    """The `fold-<k>` model folders inside `folder` (only `folds`, when given), by number."""
    found = [
        p
        for p in folder.glob(f"{FOLD_PREFIX}*")
        if (p / "model.json").is_file() and p.name.removeprefix(FOLD_PREFIX).isdigit()
    ]
    if folds is not None:
        found = [p for p in found if int(p.name.removeprefix(FOLD_PREFIX)) in folds]
    return sorted(found, key=lambda p: int(p.name.removeprefix(FOLD_PREFIX)))


def is_ensemble_folder(folder: Path) -> bool:
    """A folder of fold model folders (`models/`), not a model folder itself."""
    return folder.is_dir() and not (folder / "model.json").exists() and bool(fold_folders(folder))


def ensemble_spec(specs: list[ModelSpec], source: str) -> ModelSpec:
    """The members' common spec, with every member's folds; members must agree."""
    first = specs[0]
    for spec in specs[1:]:
        if replace(spec, **{k: getattr(first, k) for k in PER_FOLD}) != first:
            raise CovidSegError(
                f"{source}: the fold models differ in more than their training runs "
                f"(e.g. {first.arch}/{first.encoder} at {first.image_size} px vs "
                f"{spec.arch}/{spec.encoder} at {spec.image_size} px); retrain them together"
            )
    folds = sorted(f for spec in specs for f in spec.folds)
    return replace(first, run_id=None, best_epoch=0, val_dice=None, folds=folds)


def load_ensemble(
    folder: Path, device: torch.device, folds: list[int] | None = None
) -> tuple[FoldEnsemble, ModelSpec]:
    """Every `fold-<k>` model in `folder` (or those of `folds`) as one ensemble."""
    loaded = [load_model(path, device) for path in fold_folders(folder, folds)]
    if not loaded:
        raise CovidSegError(f"{folder}: no fold-<k> model folders")
    spec = ensemble_spec([s for _, s in loaded], str(folder))
    return FoldEnsemble([m for m, _ in loaded], spec.classes).to(device).eval(), spec
