"""DVC stage `prepare`: NIfTI volumes -> normalised HDF5 slice stores and a patient-level split."""

import argparse
from pathlib import Path

from covidseg.config import load_params
from covidseg.data.prepare import prepare_dataset
from covidseg.stage import run_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--raw", type=Path, required=True, help="extracted archives (data/raw)")
    parser.add_argument("--out", type=Path, required=True, help="one <case>.h5 per case")
    parser.add_argument("--splits", type=Path, required=True, help="splits.json to write")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    params = load_params(args.params)
    prepare_dataset(
        params.prepare,
        params.split,
        raw_dir=args.raw,
        out_dir=args.out,
        splits_path=args.splits,
        dataset=params.dataset,
        workers=params.runtime.prepare_workers,
    )


if __name__ == "__main__":
    run_stage(main)
