"""What a fold costs beyond its training steps: the cross-validation's cost stays linear.

Each `train@<k>` is its own process: interpreter and imports, params, model build, store
opening, MLflow run, checkpoints and the model folder. This runs the real stage script for one
fold (`stages/train.py --fold 0`) on synthetic stores and compares it with the same number of
bare training steps in-process, so that `stage - bare` is the per-fold overhead; a 5-fold
experiment pays it 5 times, against hours of training per fold.

Usage: .venv/bin/python bench/fold_overhead.py [--quick] [--arch A] [--encoder E] [--size S]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from _report import load_note, machine_note, table, timed, torch_threads
from _synth import make_phantom, write_case_store
from torch.utils.data import DataLoader

from covidseg.config import parse_params
from covidseg.training.dataset import SliceDataset
from covidseg.training.losses import SegmentationLoss
from covidseg.training.train import build_parts

ROOT = Path(__file__).resolve().parents[1]
SLICES = 40


def write_data(root: Path, size: int) -> tuple[Path, Path]:
    """Three synthetic stores and a one-fold split that trains on all of them (no validation:
    it is a per-epoch cost, not a per-fold one)."""
    data = root / "prepared"
    data.mkdir()
    names = [f"case_{k}" for k in range(3)]
    for k, name in enumerate(names):
        write_case_store(data / f"{name}.h5", make_phantom(SLICES, size, seed=k), size)
    splits = root / "splits.json"
    splits.write_text(json.dumps({"0": {"train": names, "val": [], "test": []}}))
    return data, splits


def stage_fold(root: Path, params: dict, data: Path, splits: Path) -> float:
    """Seconds of `python stages/train.py --fold 0`, as DVC runs it."""
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, str(ROOT / "stages" / "train.py"), "--fold", "0"]
    command += ["--data", str(data), "--splits", str(splits), "--model", str(root / "model")]
    command += ["--checkpoints", str(root / "ckpt"), "--metrics", str(root / "train.json")]
    command += ["--epoch-log", str(root / "log.csv"), "--params", str(root / "params.yaml")]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}
    env["PYTHONPATH"] = str(ROOT)
    seconds, done = timed(
        lambda: subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    )
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return seconds


def bare_fold(params_raw: dict, data: Path, steps: int) -> float:
    """Seconds of `steps` forward/backward/step on in-memory batches (model already built)."""
    params = parse_params(params_raw)
    stores = sorted(data.glob("*.h5"))
    batch = next(iter(DataLoader(SliceDataset(stores), batch_size=params.train.batch_size)))
    parts = build_parts(params, 1, torch.device("cpu"))
    loss_fn = SegmentationLoss(params.train.loss, 1)
    model, optimizer = parts["model"], parts["optimizer"]

    def steps_() -> None:
        model.train()
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(batch[0]), batch[1].long()).backward()
            optimizer.step()

    return timed(steps_)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs of 3 steps")
    parser.add_argument("--arch", default="Unet")
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()
    epochs, steps = (2, 3) if args.quick else (3, 10)
    params = {
        "arch": args.arch,
        "encoder": args.encoder,
        "prepare": {"image_size": args.size},
        "split": {"scheme": "kfold", "n_folds": 3, "folds": [0]},
        "train": {"epochs": epochs, "batch_size": 8, "steps_per_epoch": steps},
        "runtime": {"num_workers": 0, "device": "cpu"},
    }
    torch.set_num_threads(torch_threads())
    note = machine_note()  # the load at the start, as it says
    with tempfile.TemporaryDirectory(prefix="bench-fold-") as tmp:
        root = Path(tmp)
        data, splits = write_data(root, args.size)
        stage = stage_fold(root, params, data, splits)
        bare = bare_fold(params, data, epochs * steps)
    print(note)
    print(
        f"{args.arch}({args.encoder}) at {args.size} px, {epochs} epochs x {steps} steps, batch 8"
    )
    rows = [
        ["stages/train.py --fold 0 (whole process)", f"{stage:.1f}"],
        ["bare steps, same count", f"{bare:.1f}"],
        ["per-fold overhead (difference)", f"{stage - bare:.1f}"],
    ]
    print(table(["path", "seconds"], rows))
    print(f"ratio stage/bare: {stage / bare:.2f}x; the overhead is paid once per fold, so a")
    print("100-epoch fold of the study's recipe (hours) makes it negligible: cost stays linear.")
    print(load_note())


if __name__ == "__main__":
    main()
