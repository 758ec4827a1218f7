"""Evaluation time for one case against the bare model's inference on the same slices.

`covidseg.evaluation.evaluate.predict_case` (batched prediction, resampling of the probabilities
back to the original grid, thresholding) and `covidseg.evaluation.metrics.case_metrics` on a
300-slice case stored at 128 px whose original grid is 512 x 512, against a bare `model(batch)`
loop under `torch.no_grad`. The model is untrained (it marks ~90 % of voxels), so the metrics are
timed on a realistic prediction instead: the reference mask shifted in-plane by a few voxels (its
Dice is printed).

Usage: .venv/bin/python bench/evaluate_time.py [--quick] [--size 512] [--arch A] [--encoder E]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from _report import (
    load_note,
    machine_note,
    median,
    model_args,
    spread,
    table,
    timed,
    timed_cpu,
    torch_threads,
)
from _synth import make_phantom, write_case_store

from covidseg.config import Params, RuntimeParams
from covidseg.data.labels import INFECTION
from covidseg.data.resample import to_original_grid
from covidseg.data.store import read_arrays, read_meta
from covidseg.data.transforms import to_labels
from covidseg.evaluation.evaluate import inference_options, predict_stored
from covidseg.evaluation.metrics import case_metrics
from covidseg.inference.segment import predict_volume
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec

DEVICE = torch.device("cpu")
ORIGINAL = 512
ORDER = ("predict_case", "bare model(batch) loop", "bare, channels_last", "case_metrics")


def realistic_prediction(ref: np.ndarray) -> np.ndarray:
    """The reference moved 2 rows and 3 columns: surfaces and overlap like a trained model's."""
    return np.roll(ref, shift=(2, 3), axis=(1, 2))


def bare_inference(
    model: torch.nn.Module, image: np.ndarray, batch: int, channels_last: bool
) -> None:
    """`model(batch)` over every slice, tensors ready in memory, no post-processing."""
    x = torch.from_numpy(image.astype(np.float32))[:, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for start in range(0, len(x), batch):
            model(x[start : start + batch])


def breakdown(model: torch.nn.Module, image: np.ndarray, shape: tuple, params: Params) -> dict:
    """Seconds of each step of `predict_case`, called one by one in its order."""
    ep = params.evaluate
    t: dict[str, float] = {}
    options = inference_options(params)
    t["predict"], prob = timed(lambda: predict_volume(model, image, DEVICE, options=options))
    t["labels (stored grid)"], _ = timed(lambda: to_labels(prob, ep.threshold))
    t["resample"], original = timed(
        lambda: np.stack([to_original_grid(p, shape[1], shape[2], labels=False) for p in prob])
    )
    t["threshold"], _ = timed(lambda: to_labels(original, ep.threshold))
    return t


def run(args: argparse.Namespace, root: Path) -> tuple[dict, dict, dict, str]:
    """Wall and CPU seconds per repeat of every measured path, the breakdown, a note."""
    phantom = make_phantom(args.slices, ORIGINAL, seed=0)
    store = root / "coronacases_001.h5"
    write_case_store(store, phantom, args.size)
    read_s, (arrays, meta) = timed(lambda: (read_arrays(store), read_meta(store)))
    params = Params(arch=args.arch, encoder=args.encoder, runtime=RuntimeParams(device="cpu"))
    torch.manual_seed(0)
    model = build_model(args.arch, args.encoder, None, 1).eval()
    image, shape, batch = arrays["image"], meta.original_shape, params.runtime.eval_batch_size
    spec = ModelSpec(
        arch=args.arch,
        encoder=args.encoder,
        classes=1,
        target=INFECTION.target,
        image_size=args.size,
        hu_window=params.prepare.hu_window,
    )
    options = inference_options(params)
    ref = phantom.infection.astype(bool)
    pred = realistic_prediction(ref)
    bare_inference(model, image[:batch], batch, False)  # warm-up
    times: dict[str, list[float]] = {}
    cpu_times: dict[str, list[float]] = {}
    parts: list[dict] = []
    paths = [
        (
            "predict_case",
            lambda: predict_stored(model, image, meta, spec=spec, options=options, device=DEVICE),
        ),
        ("bare model(batch) loop", lambda: bare_inference(model, image, batch, False)),
        ("bare, channels_last", lambda: bare_inference(model, image, batch, True)),
        ("case_metrics", lambda: case_metrics(pred, ref, meta.original_spacing, 3.0)),
    ]
    for r in range(args.repeats):
        for name, fn in paths[r % 4 :] + paths[: r % 4]:  # rotate: no path is always first
            wall, cpu, _ = timed_cpu(fn)
            times.setdefault(name, []).append(wall)
            cpu_times.setdefault(name, []).append(cpu)
        parts.append(breakdown(model, image, shape, params))
    med_parts = {k: median([p[k] for p in parts]) for k in parts[0]}
    dice = case_metrics(pred, ref, meta.original_spacing, 3.0)["dice"]
    note = f"read store {read_s:.2f} s; metrics on a prediction with Dice {dice:.2f}"
    return times, cpu_times, med_parts, note


def parse_args() -> argparse.Namespace:
    def slices(parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--slices", type=int, default=None, help="default 300 (64 with --quick)"
        )

    args = model_args(__doc__.splitlines()[0], "64 slices, 2 repeats", slices)
    args.slices = args.slices or (64 if args.quick else 300)
    return args


def main() -> None:
    args = parse_args()
    threads = torch_threads()
    torch.set_num_threads(threads)
    print(machine_note(), f"| torch threads {threads}")
    print(
        f"{args.arch}({args.encoder}), {args.slices} slices stored at {args.size} px, original"
        f" grid {args.slices}x{ORIGINAL}x{ORIGINAL}; median of {args.repeats} repeats"
    )
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        times, cpu_times, parts, note = run(args, Path(tmp))
    med = {k: median(v) for k, v in times.items()}
    cpu = {k: median(v) for k, v in cpu_times.items()}
    rows = [[k, med[k], spread(times[k]), args.slices / med[k], cpu[k]] for k in ORDER]
    print(table(["path", "wall s", "range", "slices/s", f"CPU s ({threads} threads)"], rows))
    print("\npredict_case broken down (s):")
    print(table(["step", "s"], [[k, v] for k, v in parts.items()]))
    print(note)
    for label, m in (("wall", med), ("CPU", cpu)):
        bare = m["bare model(batch) loop"]
        total = m["predict_case"] + m["case_metrics"]
        print(
            f"{label} ratios vs bare inference: predict_case {m['predict_case'] / bare:.2f}x, "
            f"predict_case + case_metrics {total / bare:.2f}x, "
            f"bare channels_last {m['bare, channels_last'] / bare:.2f}x"
        )
    post = sum(v for k, v in parts.items() if k != "predict")
    print(f"breakdown: steps after prediction add {post / parts['predict']:.1%} to it")
    print(load_note())


if __name__ == "__main__":
    main()
