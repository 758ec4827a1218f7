"""The `covidseg` command: `covidseg predict CT [CT ...] --model MODEL -o OUTDIR`."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from covidseg import __version__
from covidseg.config import (
    CPU_BATCH_SIZE,
    DEVICE_CHOICES,
    GPU_BATCH_SIZE,
    OUTPUT_FORMATS,
    PRECISIONS,
    one_of,
)
from covidseg.errors import CovidSegError
from covidseg.log import configure

log = logging.getLogger(__name__)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="covidseg", description=__doc__)
    root.add_argument("--version", action="version", version=f"covidseg {__version__}")
    commands = root.add_subparsers(dest="command", required=True)
    predict = commands.add_parser(
        "predict", help="segment new CT scans and write label volumes and severity reports"
    )
    predict.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="CT",
        help=".nii/.nii.gz scan, a folder of them, or a folder holding a DICOM CT series (any "
        "file names, nested folders)",
    )
    predict.add_argument(
        "--model",
        required=True,
        help="the folds' models (models: their probabilities averaged), one fold's model "
        "folder (models/fold-0) or an MLflow URI (models:/<name>@<alias>, runs:/<run id>/model)",
    )
    predict.add_argument("-o", "--output", type=Path, required=True, help="output folder")
    predict.add_argument(
        "--series",
        action="append",
        default=[],
        metavar="UID",
        help="segment the DICOM series of this SeriesInstanceUID (repeat for several); needed "
        "where a folder holds more than one CT series",
    )
    predict.add_argument(
        "--output-format",
        choices=OUTPUT_FORMATS,
        help="label output: NIfTI, DICOM-SEG or both (default: both for a DICOM series, nifti "
        "for a NIfTI scan)",
    )
    predict.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    predict.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"slices per forward pass (default: {CPU_BATCH_SIZE} on a CPU, the fastest per "
        f"slice there; {GPU_BATCH_SIZE} on a GPU)",
    )
    predict.add_argument("--threshold", type=_probability, default=0.5)
    predict.add_argument("--tta", action="store_true", help="average with a left-right flip")
    predict.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: channels_last, and bf16 where it measures faster; fp32: the reference path; "
        "int8 (CPU): quantized on the scan's own slices and checked there, fp32 where the check "
        "fails; much faster on a long scan, lesion volumes within 1 %% on a trained UNet++ "
        "(docs/how-to/fast-inference.md)",
    )
    predict.add_argument(
        "--crop",
        action="store_true",
        help="run each slice's body box only: faster where the field of view is mostly air; "
        "lesion volumes moved by up to 0.9 %% on a trained model (docs/how-to/fast-inference.md)",
    )
    return root


def run_predict(args: argparse.Namespace) -> int:
    from covidseg.inference.predict import load_predictor, predict_many
    from covidseg.inference.segment import InferenceOptions, default_batch_size
    from covidseg.training.model import resolve_device

    device = one_of(args.device, DEVICE_CHOICES, "--device")  # argparse checked the choices
    options = InferenceOptions(
        batch_size=args.batch_size or default_batch_size(resolve_device(device)),
        tta_flip=args.tta,
        threshold=args.threshold,
        precision=one_of(args.precision, PRECISIONS, "--precision"),
        crop=args.crop,
    )
    predictor = load_predictor(args.model, device, options)
    fmt = args.output_format  # argparse checked the choices
    failures = predict_many(
        predictor,
        args.inputs,
        args.output,
        on_result=show_result,
        series=frozenset(args.series),
        output_format=None if fmt is None else one_of(fmt, OUTPUT_FORMATS, "--output-format"),
    )
    return 1 if failures else 0


def show_result(report: Mapping[str, object]) -> None:
    """One scan's result line: its case and the headline of its severity report."""
    summary = {k: report[k] for k in ("lesion_volume_ml", "slices_involved")}
    tqdm.write(f"{report['case']}: {json.dumps(summary)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    configure()
    try:
        return run_predict(args)
    except CovidSegError as error:
        log.error("%s", error)
        return 1
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
