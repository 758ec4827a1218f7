"""int8 inference on a CPU, tried and not adopted: speed and agreement with fp32, per scan.

Post-training static quantization by torch's FX graph mode (x86 engine: int8 convolutions with
per-channel weights, per-tensor activations) of a copy of the model's encoder and decoder (the
segmentation head stays fp32), calibrated on 8 evenly spaced slices of the scan itself (a part
FX cannot trace, such as Unet's decoder, stays fp32). For each scan: labels on the scan's grid
of the quantized copy against `--precision fp32` (voxels equal, lesion volume), the wall time
of each, and how the calibration slices alone agreed (what a per-scan guard would see).
`--speed` instead times fp32 (channels_last) against int8 on random 512 px slices of the
default model, untrained.

Not adopted (README, "Fast inference"): 4.3x faster than fp32 with channels_last on the default
model, but on a trained model the lesion volume moved by about 3 %, over the 1 % bar; and
torch has deprecated the quantized tensors this path runs on.

Usage: .venv/bin/python bench/int8_trial.py --model models/fold-0 --scans DIR
       [--calibration N]
       .venv/bin/python bench/int8_trial.py --speed
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _report import load_note, machine_note, table
from segmentation_models_pytorch.base import SegmentationModel
from torch.ao.quantization import get_default_qconfig_mapping
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.fx.proxy import TraceError

from covidseg.inference import InferenceOptions, predict_volume, segment
from covidseg.model import build_model
from covidseg.predict import load_predictor
from covidseg.transforms import scan_input
from covidseg.volumes import read_nifti

ENGINE = "x86"
CALIBRATION_SLICES = 8
KEPT_ATTRIBUTES = ("output_stride", "out_channels")  # encoder attributes SMP's forward reads
CPU = torch.device("cpu")


def calibration_slices(image: np.ndarray, count: int = CALIBRATION_SLICES) -> np.ndarray:
    """Indices of `count` evenly spaced slices of an (slices, H, W) volume (all if fewer)."""
    return np.unique(np.linspace(0, len(image) - 1, min(count, len(image))).round().astype(int))


def _keep_attributes(graph: torch.nn.Module, part: torch.nn.Module) -> torch.nn.Module:
    """Carry over what the network reads from its encoder besides calling it."""
    for attribute in KEPT_ATTRIBUTES:
        if hasattr(part, attribute):
            setattr(graph, attribute, getattr(part, attribute))
    return graph


def _observe(net: SegmentationModel, example: torch.Tensor) -> list[str]:
    """Replace `net`'s encoder and decoder by observed copies where FX traces them."""
    with torch.no_grad():
        features = net.encoder(example)
    done = []
    for name, example_input in (("encoder", example), ("decoder", features)):
        part = getattr(net, name)
        try:
            mapping = get_default_qconfig_mapping(ENGINE)
            prepared = prepare_fx(part, mapping, example_inputs=(example_input,))
        except (TraceError, TypeError, NotImplementedError):
            continue
        setattr(net, name, _keep_attributes(prepared, part))
        done.append(name)
    return done


def quantize_int8(
    model: torch.nn.Module, calibration: torch.Tensor
) -> tuple[torch.nn.Module, np.ndarray, np.ndarray, list[str]]:
    """(int8 copy, fp32 and int8 labels of the calibration slices, the parts quantized)."""
    torch.backends.quantized.engine = ENGINE
    quantized = copy.deepcopy(model).float().cpu().eval()
    nets = [m for m in quantized.modules() if isinstance(m, SegmentationModel)]
    parts = [(net, name) for net in nets for name in _observe(net, calibration[:1])]
    batches = torch.split(calibration, 2)
    with torch.no_grad():
        before = np.concatenate([(quantized(b) > 0).numpy() for b in batches])
        for net, name in parts:
            observed = getattr(net, name)
            setattr(net, name, _keep_attributes(convert_fx(observed), observed))
        after = np.concatenate([(quantized(b) > 0).numpy() for b in batches])
    return quantized, before, after, [name for _, name in parts]


def agreement(args: argparse.Namespace) -> None:
    """Each scan: int8 (calibrated on it) against fp32, on the scan's grid."""
    predictor = load_predictor(args.model, "cpu", InferenceOptions(batch_size=2, precision="fp32"))
    spec, rows = predictor.spec, []
    for scan in sorted(args.scans.glob("*.nii*")):
        name = scan.name.split(".nii")[0]
        data, affine = read_nifti(scan, name)
        prepared, volume = scan_input(data, affine, name, spec.recipe)
        image = prepared.image
        labels, seconds = {}, {}
        start = time.perf_counter()
        picked = image[calibration_slices(image, args.calibration)].astype(np.float32)
        picked = torch.from_numpy(picked)[:, None]
        int8, before, after, parts = quantize_int8(predictor.model, picked)
        calibration_s = time.perf_counter() - start
        for key, model in (("fp32", predictor.model), ("int8", int8)):
            start = time.perf_counter()
            seg = segment(
                model,
                image,
                prepared.grid,
                scheme=spec.scheme,
                options=predictor.options,
                device=CPU,
            )
            labels[key], seconds[key] = (
                seg.labels == spec.scheme.infection,
                time.perf_counter() - start,
            )
        voxel_ml = abs(float(np.linalg.det(volume.affine[:3, :3]))) / 1000
        ref_ml, int8_ml = labels["fp32"].sum() * voxel_ml, labels["int8"].sum() * voxel_ml
        rows.append(
            (
                name,
                "+".join(parts),
                f"{(labels['fp32'] == labels['int8']).mean():.4%}",
                f"{ref_ml:.1f} / {int8_ml:.1f} ({(int8_ml - ref_ml) / max(ref_ml, 1e-9):+.2%})",
                f"{(before == after).mean():.4%}, {before.sum()} -> {after.sum()}",
                f"{seconds['fp32']:.0f} / {calibration_s:.0f} + {seconds['int8']:.0f}",
            )
        )
    print(f"{spec.arch}({spec.encoder}) at {spec.recipe.image_size} px")
    header = ("case", "quantized", "voxels equal", "lesion ml, fp32 / int8")
    print(
        table((*header, "calibration slices: equal, positives", "wall s fp32 / calib + int8"), rows)
    )


def speed(slices: int) -> None:
    """The default model, untrained: fp32 channels_last against int8, alternating."""
    torch.manual_seed(0)
    model = build_model("UnetPlusPlus", "densenet201", None, 1).eval()
    image = np.random.default_rng(0).random((slices, 512, 512)).astype(np.float32)
    picked = torch.from_numpy(image[calibration_slices(image)])[:, None]
    start = time.perf_counter()
    int8, _, _, parts = quantize_int8(model, picked)
    print(
        f"UnetPlusPlus(densenet201) at 512 px; quantized: {'+'.join(parts)}; "
        f"calibration {time.perf_counter() - start:.0f} s"
    )
    rows = []
    for key, net, precision in (("fp32, channels_last", model, "auto"), ("int8", int8, "fp32")):
        options = InferenceOptions(batch_size=2, precision=precision)
        start = time.perf_counter()
        predict_volume(net, image, CPU, options=options)
        rows.append((key, (time.perf_counter() - start) / slices))
    print(table(("path", "wall s / slice"), rows))
    print(f"ratio fp32 / int8: {rows[0][1] / rows[1][1]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="a model folder (or models/ for the ensemble)")
    parser.add_argument("--scans", type=Path, help="a folder of NIfTI scans")
    parser.add_argument("--speed", action="store_true", help="time the default model instead")
    parser.add_argument("--slices", type=int, default=6, help="slices for --speed")
    parser.add_argument(
        "--calibration", type=int, default=CALIBRATION_SLICES, help="calibration slices per scan"
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # torch's deprecation and quantized-cat warnings
    print(machine_note())
    if args.speed:
        speed(args.slices)
    elif args.model and args.scans:
        agreement(args)
    else:
        parser.error("give --model and --scans, or --speed")
    print(load_note())


if __name__ == "__main__":
    main()
