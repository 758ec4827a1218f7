"""DVC stage `evaluate`: per-case 3D metrics of the best model on the test cases, and figures."""

import argparse
from pathlib import Path

from covidseg.config import load_params
from covidseg.evaluation.evaluate import EvalPaths, evaluate
from covidseg.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fold", type=int, default=0, help="which fold of splits.json")
    parser.add_argument("--data", type=Path, required=True, help="prepared stores")
    parser.add_argument("--raw", type=Path, required=True, help="extracted archives (references)")
    parser.add_argument("--splits", type=Path, required=True, help="splits.json")
    parser.add_argument("--model", type=Path, required=True, help="trained model folder")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate.json to write")
    parser.add_argument("--per-case", type=Path, required=True, help="per_case.csv to write")
    parser.add_argument("--reports", type=Path, required=True, help="figures folder to write")
    parser.add_argument("--train-log", type=Path, default=None, help="per-epoch CSV to plot")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    paths = EvalPaths(
        data_dir=args.data,
        raw_dir=args.raw,
        splits=args.splits,
        model_dir=args.model,
        metrics=args.metrics,
        per_case=args.per_case,
        reports=args.reports,
        train_log=args.train_log,
    )
    evaluate(params, paths, fold=args.fold)


if __name__ == "__main__":
    run_stage(main)
