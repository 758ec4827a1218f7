"""Evaluation on the original voxel grid, for the infection and the lung + infection models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from phantoms import canonical
from tiny import TINY, merge

from covidseg.config import parse_params
from covidseg.data.labels import whole_lungs
from covidseg.data.prepare import prepare_dataset
from covidseg.evaluation.evaluate import EvalPaths, evaluate
from covidseg.training.train import TrainPaths, train

# the lung + infection model, trained for one epoch of 2 steps
LUNG_INFECTION = merge(
    TINY, {"prepare": {"target": "lung_infection"}, "train": {"epochs": 1, "steps_per_epoch": 2}}
)


def percent_infected(labels: np.ndarray, side: int) -> float:
    """Independent count: infected share of one whole lung (infection given the nearest side)."""
    lung = whole_lungs(labels) == side
    return 100.0 * float((lung & (labels == 3)).sum()) / float(lung.sum())


@pytest.mark.slow
def test_lung_infection_model_reports_per_class_and_per_lung(
    raw_dir: Path, tmp_path: Path, tracked: Path, phantom_cases
) -> None:
    params = parse_params(LUNG_INFECTION)
    data, splits = tmp_path / "prepared", tmp_path / "splits.json"
    prepare_dataset(params.prepare, params.split, raw_dir=raw_dir, out_dir=data, splits_path=splits)
    model = tmp_path / "model"
    train(
        params,
        TrainPaths(
            data, splits, model, tmp_path / "ckpt", tmp_path / "train.json", tmp_path / "log.csv"
        ),
    )
    paths = EvalPaths(
        data,
        raw_dir,
        splits,
        model,
        tmp_path / "evaluate.json",
        tmp_path / "per_case.csv",
        tmp_path / "reports",
        tmp_path / "log.csv",
    )
    summary = evaluate(params, paths)
    with paths.per_case.open() as f:
        (row,) = list(csv.DictReader(f))
    for key in (
        "left_lung_dice",
        "right_lung_dice",
        "left_lung_nsd",
        "right_lung_nsd",
        "left_lung_infected_pct_ref",
        "right_lung_infected_pct_pred",
    ):
        assert key in row and key in summary
    case = next(c for c in phantom_cases if c.name == row["case"])
    reference = canonical(case.lung_and_infection, case.affine)
    for side, name in ((1, "left"), (2, "right")):
        expected = percent_infected(reference, side)
        assert float(row[f"{name}_lung_infected_pct_ref"]) == pytest.approx(expected, abs=1e-3)
    assert json.loads(paths.metrics.read_text())["n_cases"] == 1
    assert (paths.reports / "overlays" / f"{case.name}.png").exists()
    assert (paths.reports / "training_curves.png").exists()
