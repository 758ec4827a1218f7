"""Where the tests point the stages' functions: their outputs in one folder per run."""

from __future__ import annotations

from pathlib import Path

from covidseg.training.train import TrainPaths


def train_paths(out: Path, prepared: tuple[Path, Path]) -> TrainPaths:
    """`train` reading the prepared data and splits, writing its outputs under `out`."""
    return TrainPaths(
        data_dir=prepared[0],
        splits=prepared[1],
        model_dir=out / "model",
        checkpoint_dir=out / "ckpt",
        metrics=out / "train.json",
        log=out / "log.csv",
    )
