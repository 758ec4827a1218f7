"""DVC stage `aggregate`: every fold's out-of-fold results as the experiment's headline."""

import argparse
from pathlib import Path

from covidseg.config import load_params
from covidseg.evaluation.aggregate import AggregatePaths, aggregate
from covidseg.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=Path, required=True, help="per-fold metrics folders")
    parser.add_argument("--models", type=Path, required=True, help="fold-<k> model folders")
    parser.add_argument("--metrics", type=Path, required=True, help="evaluate.json to write")
    parser.add_argument("--per-case", type=Path, required=True, help="per_case.csv to write")
    parser.add_argument("--per-fold", type=Path, required=True, help="per_fold.csv to write")
    parser.add_argument("--reports", type=Path, required=True, help="benchmark report folder")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    paths = AggregatePaths(
        folds_dir=args.folds,
        models_dir=args.models,
        metrics=args.metrics,
        per_case=args.per_case,
        per_fold=args.per_fold,
        report_dir=args.reports,
    )
    aggregate(params, paths)


if __name__ == "__main__":
    run_stage(main)
