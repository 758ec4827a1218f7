"""DVC stage `train`: fit the segmentation model on the prepared slice stores (resumable)."""

import argparse
from pathlib import Path

from covidseg.config import load_params
from covidseg.stage import run_stage
from covidseg.training.train import TrainPaths, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fold", type=int, default=0, help="which fold of splits.json")
    parser.add_argument("--data", type=Path, required=True, help="prepared stores")
    parser.add_argument("--splits", type=Path, required=True, help="splits.json")
    parser.add_argument("--model", type=Path, required=True, help="model folder to write")
    parser.add_argument("--checkpoints", type=Path, required=True, help="resumable state")
    parser.add_argument("--metrics", type=Path, required=True, help="train.json to write")
    parser.add_argument("--epoch-log", type=Path, required=True, help="per-epoch CSV to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    paths = TrainPaths(
        data_dir=args.data,
        splits=args.splits,
        model_dir=args.model,
        checkpoint_dir=args.checkpoints,
        metrics=args.metrics,
        log=args.epoch_log,
    )
    train(params, paths, fold=args.fold)


if __name__ == "__main__":
    run_stage(main)
