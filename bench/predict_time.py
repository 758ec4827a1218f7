"""Time `covidseg predict` on a 300-slice 512 x 512 scan: today's fp32 path against the fast path.

Side by side in one run, on the same synthetic chest scan (an elliptic body with two lungs
inside a round field of view; the README compares its crop with real scans'): the whole command
(read, reorient, normalise, batched inference, resampling back to the scan's grid, writing the
label volume, report JSON and page) with today's settings (`--precision fp32 --batch-size 8`)
and with the new defaults (`--precision auto`: channels_last, and bf16 where it measures faster
than fp32 on this CPU; 2 slices per batch on a CPU). A third run is `--precision int8` (its
check on the calibration slices off: an untrained network sits at 0.5). `--variants` adds the
bare inference of each lever alone; `--rss` measures the peak resident memory of `covidseg
predict` (new defaults, a child process) on one scan and on two scans in one call.
The network is untrained: inference costs the same. `--quick` is a smoke run of the script: 8
slices, and Unet(resnet18) at 128 px unless `--arch`, `--encoder` or `--size` say otherwise.

Usage: .venv/bin/python bench/predict_time.py [--quick] [--variants] [--rss | --rss-only]
       [--rss-one] [--paths fp32,auto,int8] [--arch A]
       [--encoder E] [--size S] [--batch B] [--slices N]
"""

from __future__ import annotations

import argparse
import functools
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from _report import load_note, machine_note, table, timed_cpu, torch_threads
from _synth import make_phantom, window, write_nifti

import covidseg.inference.quantize as quantize
from covidseg.config import Precision
from covidseg.data.resample import to_square
from covidseg.inference.crop import crop_boxes
from covidseg.inference.paths import predict_scan
from covidseg.inference.predict import load_predictor, predict_many
from covidseg.inference.segment import InferenceOptions, default_batch_size
from covidseg.precision import uses_bf16
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, save_model

HU_WINDOW = (-1250.0, 250.0)
RSS_CHILD = """
import resource, sys
from covidseg.cli import main
code = main(sys.argv[1:])
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
sys.exit(code)
"""


def peak_rss_mib(model: Path, scans: list[Path], out: Path, batch: int) -> float:
    """Peak resident memory (MiB) of one `covidseg predict` process over `scans`."""
    command = [sys.executable, "-c", RSS_CHILD, "predict", *map(str, scans)]
    command += ["--model", str(model), "-o", str(out), "--device", "cpu"]
    command += ["--batch-size", str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    line = next(x for x in done.stdout.splitlines() if x.startswith("maxrss_kib"))
    return int(line.split()[1]) / 1024


def timing(
    args: argparse.Namespace,
    folder: Path,
    scan: Path,
    slices: int,
    *,
    model: torch.nn.Module,
    image: np.ndarray,
) -> None:
    """The whole command with today's settings and with the new defaults, side by side (and
    the bare inference of each lever)."""
    cpu = torch.device("cpu")
    fast_batch = default_batch_size(cpu)
    rows: list[tuple[str, float, float, float]] = []
    results: dict[str, tuple[float, float]] = {}
    runs: tuple[tuple[str, str, Precision, int], ...] = (
        ("fp32", f"--precision fp32 --batch-size {args.batch} (today)", "fp32", args.batch),
        ("auto", f"defaults: --precision auto, batch {fast_batch} on a CPU", "auto", fast_batch),
        ("int8", f"--precision int8, batch {fast_batch} (check off: timing)", "int8", fast_batch),
    )
    # the untrained network's labels sit at 0.5, where int8's check on the calibration slices
    # falls back to fp32: it is off for the timing (bench/agreement.py --fast int8 measures
    # the agreement on a trained model)
    quantize.MAX_LABEL_CHANGE, quantize.MAX_VOLUME_CHANGE = 1.0, float("inf")
    runs = tuple(run for run in runs if run[0] in args.paths.split(","))
    for key, name, precision, batch in runs:
        options = InferenceOptions(batch_size=batch, precision=precision)
        predictor = load_predictor(str(folder / "model"), "cpu", options)
        run = functools.partial(predict_many, predictor, [scan], folder / f"out_{key}")
        wall, cpu_s, _ = timed_cpu(run)
        results[key] = (wall, cpu_s)
        rows.append((f"covidseg predict, {name}", wall, cpu_s, wall / slices))
    if args.variants:
        variants: tuple[tuple[Precision, int, bool], ...] = (
            ("fp32", args.batch, False),
            ("fp32", fast_batch, False),
            ("auto", args.batch, False),
            ("auto", fast_batch, False),
            ("bf16", fast_batch, False),
            ("auto", fast_batch, True),
            ("int8", fast_batch, False),
        )
        for precision, batch, crop in variants:
            options = InferenceOptions(batch_size=batch, precision=precision, crop=crop)
            bare = functools.partial(
                predict_scan, model, image, cpu, options=options, hu_window=HU_WINDOW
            )
            wall, cpu_s, _ = timed_cpu(bare)
            name = f"bare {precision}, batch {batch}" + (", body crop" if crop else "")
            rows.append((name, wall, cpu_s, wall / slices))
    print(table(("path", "wall s", "CPU s", "wall s/slice"), rows))
    fp32_wall, fp32_cpu = results["fp32"]
    for key, name in (("auto", "new defaults"), ("int8", "--precision int8")):
        if key not in results:
            continue
        wall, cpu_s = results[key]
        print(
            f"ratio today / {name} (whole command): {fp32_wall / wall:.2f}x wall, "
            f"{fp32_cpu / cpu_s:.2f}x CPU time; projected for 300 slices: "
            f"{wall / slices * 300 / 60:.1f} min (today {fp32_wall / slices * 300 / 60:.1f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 8 slices, Unet(resnet18) at 128 px"
    )
    parser.add_argument("--slices", type=int, help="scan slices (overrides --quick)")
    parser.add_argument("--arch", help="default UnetPlusPlus (Unet with --quick)")
    parser.add_argument("--encoder", help="default densenet201 (resnet18 with --quick)")
    parser.add_argument("--size", type=int, help="model input size, default 512 (128 with --quick)")
    parser.add_argument("--batch", type=int, default=8, help="batch of today's path")
    parser.add_argument("--variants", action="store_true", help="bare inference of each lever")
    parser.add_argument(
        "--paths", default="fp32,auto,int8", help="whole-command runs (fp32, today's, is needed)"
    )
    parser.add_argument("--rss", action="store_true", help="peak RSS of predict, 1 vs 2 scans")
    parser.add_argument("--rss-only", action="store_true", help="only the peak RSS, no timing")
    parser.add_argument("--rss-one", action="store_true", help="the peak RSS of one scan only")
    args = parser.parse_args()
    args.arch = args.arch or ("Unet" if args.quick else "UnetPlusPlus")
    args.encoder = args.encoder or ("resnet18" if args.quick else "densenet201")
    args.size = args.size or (128 if args.quick else 512)
    torch.set_num_threads(torch_threads())
    slices = args.slices or (8 if args.quick else 300)
    cpu = torch.device("cpu")
    print(machine_note())
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        phantom = make_phantom(slices, 512, seed=0)
        scan = folder / "scan" / "case_001.nii.gz"
        write_nifti(scan, phantom.hu)
        torch.manual_seed(0)
        model = build_model(args.arch, args.encoder, None, 1)
        spec = ModelSpec(args.arch, args.encoder, 1, "infection", args.size, HU_WINDOW)
        save_model(folder / "model", model.state_dict(), spec)
        image = to_square(window(phantom.hu), args.size, labels=False).astype(np.float16)
        boxes = crop_boxes(image, InferenceOptions(crop=True), HU_WINDOW)
        area = float(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).mean())
        print(
            f"{args.arch}({args.encoder}) at {args.size} px, {slices} slices of 512 x 512, "
            f"batch {args.batch}, CPU, {torch_threads()} threads; auto uses bf16 here: "
            f"{uses_bf16(cpu, 'auto')}; body boxes (--crop): {area / args.size**2:.0%} of the slice"
        )
        if not args.rss_only:
            timing(args, folder, scan, slices, model=model, image=image)
        if args.rss or args.rss_only:
            second = folder / "scan2" / "case_002.nii.gz"
            second.parent.mkdir()
            shutil.copy(scan, second)
            batch = default_batch_size(cpu)
            one = peak_rss_mib(folder / "model", [scan], folder / "rss1", batch)
            print(f"peak RSS of covidseg predict (defaults): one scan {one:.0f} MiB")
            if not args.rss_one:
                two = peak_rss_mib(folder / "model", [scan, second], folder / "rss2", batch)
                print(f"peak RSS of covidseg predict (defaults): two scans {two:.0f} MiB")
    print(load_note())


if __name__ == "__main__":
    main()
