"""Time `covidseg predict` on one 300-slice 512 x 512 scan on this machine.

The whole command path (read, reorient, normalise, batched inference, resampling back to the
scan's grid, writing the label volume, report JSON and page) against the bare model's
inference on the same slices. The network is untrained: inference costs the same.

Usage: .venv/bin/python bench/predict_time.py [--quick] [--arch A] [--encoder E] [--size S]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from _report import load_note, machine_note, table, timed
from _synth import make_phantom, window, write_nifti

from covidseg.inference import InferenceOptions, predict_volume
from covidseg.model import build_model
from covidseg.modelio import ModelSpec, save_model
from covidseg.predict import load_predictor, predict_many
from covidseg.resample import to_square


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="40 slices instead of 300")
    parser.add_argument("--arch", default="UnetPlusPlus")
    parser.add_argument("--encoder", default="densenet201")
    parser.add_argument("--size", type=int, default=512, help="model input size")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(2)
    slices = 40 if args.quick else 300
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        phantom = make_phantom(slices, 512, seed=0)
        write_nifti(folder / "scan" / "case_001.nii.gz", phantom.hu)
        model = build_model(args.arch, args.encoder, None, 1)
        spec = ModelSpec(args.arch, args.encoder, 1, "infection", args.size, (-1250.0, 250.0))
        save_model(folder / "model", model.state_dict(), spec)
        options = InferenceOptions(batch_size=args.batch, precision="fp32")
        predictor = load_predictor(str(folder / "model"), "cpu", options)
        command, _ = timed(lambda: predict_many(predictor, [folder / "scan"], folder / "out"))
        image = to_square(window(phantom.hu), args.size, labels=False)
        bare, _ = timed(
            lambda: predict_volume(predictor.model, image, predictor.device, options=options)
        )
    print(machine_note())
    print(load_note())
    print(
        f"{args.arch}({args.encoder}) at {args.size} px, {slices} slices of 512 x 512, batch "
        f"{args.batch}, CPU"
    )
    rows = [
        ("covidseg predict (whole command)", f"{command:.1f}", f"{slices / command:.2f}"),
        ("bare inference, same slices", f"{bare:.1f}", f"{slices / bare:.2f}"),
    ]
    print(table(("path", "seconds", "slices/s"), rows))
    print(f"ratio command / bare inference: {command / bare:.2f}x")


if __name__ == "__main__":
    main()
