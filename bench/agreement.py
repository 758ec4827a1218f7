"""Agreement of the fast inference path with the fp32 path, on real scans and a trained model.

For each scan: the labels of `--precision auto` (channels_last, bf16 where it pays; `--fast
bf16` forces bf16, `--fast int8` quantizes per scan; with `--crop`, each slice's body box only)
against `--precision fp32`, both on the scan's grid, through the one inference path of
`predict`: the share of equal voxels, the lesion volume of each, the share of the slice area the
network ran on, the wall time of each, and, where a reference mask is given, the Dice of each
against it. The goal: at least 99.5 % equal voxels and the lesion volume within 1 %.

Usage: .venv/bin/python bench/agreement.py --model models/fold-0 --scans DIR [--masks DIR]
       [--crop] [--fast auto|bf16|int8] [--batch B]
       (DIR: NIfTI files; infection masks under the same names)
       .venv/bin/python bench/agreement.py --quick [--crop] [--fast ...]
       (a smoke run of the script: an untrained Unet(resnet18) at 64 px on two synthetic
       16-slice scans with their masks; its numbers mean nothing)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _report import load_note, machine_note, table
from _synth import HU_WINDOW, make_phantom, write_nifti

from covidseg.data.volumes import read_nifti, reorient
from covidseg.inference.crop import crop_boxes
from covidseg.inference.predict import load_predictor, segment_scan
from covidseg.inference.segment import InferenceOptions
from covidseg.precision import uses_bf16
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, save_model
from covidseg.training.validation import dice

QUICK_SCANS, QUICK_SLICES, QUICK_SIZE = 2, 16, 64


def quick_inputs(folder: Path) -> tuple[str, Path, Path]:
    """(model folder, scans folder, masks folder) of `--quick`: an untrained Unet(resnet18)
    at 64 px, and synthetic 128 x 128 chest scans with their infection masks."""
    scans, masks, model = folder / "scans", folder / "masks", folder / "model"
    for case in range(QUICK_SCANS):
        phantom = make_phantom(QUICK_SLICES, 128, seed=case)
        write_nifti(scans / f"case_{case}.nii.gz", phantom.hu)
        write_nifti(masks / f"case_{case}.nii.gz", phantom.infection)
    torch.manual_seed(0)
    net = build_model("Unet", "resnet18", None, 1)
    save_model(
        model,
        net.state_dict(),
        ModelSpec("Unet", "resnet18", 1, "infection", QUICK_SIZE, HU_WINDOW),
    )
    return str(model), scans, masks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a model folder or models/ (ensemble)")
    parser.add_argument("--scans", type=Path)
    parser.add_argument(
        "--masks", type=Path, help="reference infection-only masks (any value > 0), same names"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop", action="store_true", help="the fast path with the body crop")
    parser.add_argument(
        "--fast", default="auto", choices=("auto", "bf16", "int8"), help="the fast path's precision"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run on synthetic scans and an untrained model"
    )
    args = parser.parse_args()
    if args.quick:
        with tempfile.TemporaryDirectory(prefix="bench-agreement-") as tmp:
            args.model, args.scans, args.masks = quick_inputs(Path(tmp))
            compare(args)
    elif args.model is None or args.scans is None:
        parser.error("--model and --scans are required (or --quick)")
    else:
        compare(args)


def compare(args: argparse.Namespace) -> None:
    """The table of the fast path against fp32 over the scans of `args.scans`."""
    print(machine_note())
    paths = {
        precision: load_predictor(
            args.model,
            "cpu",
            InferenceOptions(
                batch_size=args.batch, precision=precision, crop=args.crop and precision != "fp32"
            ),
        )
        for precision in ("fp32", args.fast)
    }
    spec = paths["fp32"].spec
    value = spec.scheme.infection
    print(
        f"{spec.arch}({spec.encoder}) at {spec.recipe.image_size} px; auto uses bf16 here: "
        f"{uses_bf16(torch.device('cpu'), 'auto')}"
    )
    rows = []
    for scan in sorted(args.scans.glob("*.nii*")):
        name = scan.name.split(".nii")[0]
        data, affine = read_nifti(scan, name)
        results = {}
        for precision, predictor in paths.items():
            start = time.perf_counter()
            seg, image, volume = segment_scan(predictor, data, affine, name)
            results[precision] = (seg.labels, time.perf_counter() - start)
        boxes = crop_boxes(image, paths[args.fast].options, spec.recipe.hu_window)
        area = ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).sum()
        (ref, ref_s), (fast, fast_s) = results["fp32"], results[args.fast]
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000
        ref_ml = (ref == value).sum() * voxel_ml
        fast_ml = (fast == value).sum() * voxel_ml
        row = [
            name,
            f"{(ref == fast).mean():.4%}",
            f"{ref_ml:.1f} / {fast_ml:.1f} ({(fast_ml - ref_ml) / max(ref_ml, 1e-9):+.2%})",
            f"{area / (image.shape[0] * image.shape[1] * image.shape[2]):.0%}",
            f"{ref_s:.0f} / {fast_s:.0f}",
        ]
        if args.masks:
            mask_data, mask_affine = read_nifti(args.masks / scan.name, name)
            truth = reorient(mask_data, mask_affine).data > 0
            scores = [dice(labels == value, truth) for labels in (ref, fast)]
            row.append(f"{scores[0]:.4f} / {scores[1]:.4f}")
        rows.append(tuple(row))
    header = ["case", "voxels equal", "lesion ml, fp32 / fast", "pixels run", "wall s fp32 / fast"]
    if args.masks:
        header.append("Dice vs reference, fp32 / fast")
    print(table(tuple(header), rows))
    print(load_note())


if __name__ == "__main__":
    main()
