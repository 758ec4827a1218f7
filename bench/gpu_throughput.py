"""Training throughput of the stage's GPU path: UNet++ (densenet201) at 512 px, bf16, CUDA.

For each batch size: slices/s of the stage's loop (`make_loader` + `train_epoch` over
synthetic slice stores, as the stage runs it on CUDA), of a bare step (forward, BCE + Dice,
backward, Adam on one batch already on the GPU) and of the loader alone (reads + draws for GPU
augmentation, and CPU augmentation for comparison); the share of peak bf16 FLOP/s that
reaches (FLOPs per slice from torch's flop counter; peak from the datasheet and from a
measured bf16 matrix product); 100 epochs of a 16-case fold projected; peak GPU memory.

`--variant compiled` runs the same with `train.compile` (the warm-up column then holds the
compile time). `--cpu-smoke` (or `--quick`) runs every part on the CPU at toy sizes, to check the
script; without it and without CUDA the script stops with one line.

Usage: python bench/gpu_throughput.py [--variant eager|compiled] [--batch 2 16] [--size 512]
       [--json out.json] [--markdown out.md] [--cpu-smoke | --quick]
       python bench/gpu_throughput.py --table a.json b.json   (one markdown table of both)
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from _synth import build_stores
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from covidseg.config import Params, PrepareParams, RuntimeParams, TrainParams
from covidseg.training.checkpoint import Parts
from covidseg.training.dataset import BalancedSampler, SliceDataset
from covidseg.training.losses import SegmentationLoss
from covidseg.training.train import (
    Dist,
    _forward_loss,
    build_parts,
    device_batch,
    forward_loss,
    make_loader,
    seed_everything,
    train_epoch,
)

FOLD_SLICES = 2800  # training slices of a 16-case fold (one pass per epoch)
EPOCHS = 100
DATASHEET_TFLOPS = 989.0  # dense bf16, H100/H200 SXM
CASES, SLICES = 2, 48


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_params(
    args: argparse.Namespace, batch: int, *, workers: int, gpu_augment: bool = True
) -> Params:
    """The stage's params for one measurement (the only place loader workers are set)."""
    train = TrainParams(
        batch_size=batch,
        steps_per_epoch=1,
        compile=args.variant == "compiled",
        gpu_augment=gpu_augment,
    )
    return Params(
        arch=args.arch,
        encoder=args.encoder,
        prepare=PrepareParams(image_size=args.size),
        train=train,
        runtime=RuntimeParams(num_workers=workers),
    )


def sampler_of(loader: DataLoader) -> BalancedSampler:
    """The stage loader's sampler (its `num_samples` sets the length of an epoch)."""
    sampler = loader.sampler
    assert isinstance(sampler, BalancedSampler)
    return sampler


def loader_speed(loader: DataLoader, seconds: float) -> float:
    """Slices/s of the loader alone, after its first batch (worker start-up) is out."""
    sampler_of(loader).num_samples = 10**6
    batches = iter(loader)
    next(batches)
    start, slices = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        slices += len(next(batches)[0])
    speed = slices / (time.perf_counter() - start)
    del batches
    return speed


def timed_epoch(run: Callable[[], object], loader: DataLoader, steps: int) -> float:
    """Seconds of one `train_epoch` of `steps` batches (it reads the loss back at its end)."""
    assert loader.batch_size is not None
    sampler_of(loader).num_samples = steps * loader.batch_size
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def stage_speed(
    parts: Parts, loader: DataLoader, params: Params, device: torch.device, seconds: float
) -> dict:
    """The stage's loop: warm-up (compile, graph capture), calibration, then a timed epoch."""
    loss_fn = SegmentationLoss(params.train.loss, 1)
    model, optimizer = parts["model"], parts["optimizer"]
    epochs = itertools.count(1)

    def run() -> tuple[float, int]:
        epoch = next(epochs)
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            return train_epoch(
                model,
                loader,
                loss_fn,
                optimizer,
                device=device,
                params=params,
                epoch=epoch,
                show=True,
            )

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    warm = timed_epoch(run, loader, 3)
    per_step = timed_epoch(run, loader, 3) / 3
    steps = int(min(max(seconds / per_step, 5), 5000))
    epoch_s = timed_epoch(run, loader, steps)
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {
        "stage": steps * params.train.batch_size / epoch_s,
        "warmup_s": warm,
        "peak_gib": memory,
    }


def bare_speed(
    parts: Parts, batch: tuple[torch.Tensor, torch.Tensor], params: Params, seconds: float
) -> float:
    """Forward, loss, backward, Adam on one batch on the device, no host sync per step."""
    model, optimizer = parts["model"], parts["optimizer"]
    image, target = batch
    loss_fn = SegmentationLoss(params.train.loss, 1)
    step_fn = forward_loss(params.train.compile, image.device)
    graphs = params.train.compile and image.device.type == "cuda"

    def steps(n: int) -> float:
        sync(image.device)
        start = time.perf_counter()
        for _ in range(n):
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            optimizer.zero_grad(set_to_none=True)
            step_fn(model, loss_fn, image, target, bf16=params.train.bf16).backward()
            optimizer.step()
        sync(image.device)
        return time.perf_counter() - start

    model.train()
    steps(3)
    n = int(min(max(seconds / (steps(3) / 3), 5), 5000))
    return n * len(image) / steps(n)


def flops_per_slice(model: torch.nn.Module, size: int, device: torch.device) -> float:
    """Forward + backward FLOPs of one slice (torch's flop counter, batch 1, bf16 autocast)."""
    image = torch.rand(1, 1, size, size, device=device)
    target = (torch.rand(1, size, size, device=device) > 0.9).long()
    loss_fn = SegmentationLoss(Params().train.loss, 1)
    with FlopCounterMode(display=False) as counter:
        _forward_loss(model, loss_fn, image, target, bf16=True).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def matmul_tflops(device: torch.device, n: int = 8192, reps: int = 50) -> float | None:
    """Measured bf16 matrix-product rate (random data), the practical ceiling."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


def attempt(row: dict, key: str, fn: Callable[[], object]) -> None:
    """`row[key] = fn()`, or the error recorded (one failure must not end the run)."""
    try:
        value = fn()
        if isinstance(value, dict):
            row.update(value)
        else:
            row[key] = value
    except Exception as error:
        traceback.print_exc()
        row.setdefault("errors", []).append(f"{key}: {type(error).__name__}: {error}"[:300])


def loader_row(args: argparse.Namespace, dataset: SliceDataset, batch: int) -> dict:
    """Slices/s of the stage's loader: GPU augmentation (reads + draws), then CPU augmentation."""
    row: dict = {}
    runs = [("loader", args.workers, True)]
    runs += [(f"loader_cpu_aug_w{w}", w, False) for w in args.cpu_aug_workers]
    for key, workers, gpu_augment in runs:
        params = make_params(args, batch, workers=workers, gpu_augment=gpu_augment)

        def speed(p: Params = params) -> float:
            return loader_speed(make_loader(dataset, p, Dist(), args.device), args.seconds)

        attempt(row, key, speed)
    return row


def batch_row(args: argparse.Namespace, dataset: SliceDataset, parts: Parts, batch: int) -> dict:
    """Every measurement at one batch size."""
    row: dict = {"variant": args.variant, "batch": batch}
    if args.loader:
        row.update(loader_row(args, dataset, batch))
    params = make_params(args, batch, workers=args.workers)
    loader = make_loader(dataset, params, Dist(), args.device)
    attempt(row, "stage", lambda: stage_speed(parts, loader, params, args.device, args.seconds))
    first = lambda: device_batch(next(iter(loader)), loader, args.device)  # noqa: E731
    attempt(row, "bare", lambda: bare_speed(parts, first(), params, args.seconds))
    print(json.dumps(row), flush=True)
    return row


def measure(args: argparse.Namespace, root: Path) -> dict:
    """The header facts and one row per batch size."""
    seed_everything(0)
    stores = build_stores(root, args.size, cases=CASES, slices=SLICES)
    dataset = SliceDataset(stores, Params().train.augment)
    parts = build_parts(make_params(args, args.batch[0], workers=args.workers), 1, args.device)
    name = torch.cuda.get_device_name() if args.device.type == "cuda" else "cpu"
    head = {
        "device": name,
        "torch": torch.__version__,
        "model": f"{args.arch}({args.encoder})",
        "size": args.size,
        "workers": args.workers,
        "variant": args.variant,
        "batches": args.batch,
        "flops_per_slice": flops_per_slice(parts["model"], args.size, args.device),
        "matmul_tflops": matmul_tflops(args.device),
    }
    print(json.dumps(head), flush=True)
    results: dict = {"head": head, "rows": []}
    for batch in args.batch:
        results["rows"].append(batch_row(args, dataset, parts, batch))
        if args.json:  # after every row: a timeout keeps what was measured
            args.json.write_text(json.dumps(results, indent=1))
    return results


def _num(value: object, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "-"


def _share(speed: object, flops: float, tflops: float | None) -> str:
    if not isinstance(speed, float) or not tflops:
        return "-"
    return f"{100 * speed * flops / (tflops * 1e12):.1f} %"


def markdown(results: list[dict]) -> str:
    """One markdown table of every row of every results file."""
    head = results[0]["head"]
    flops, measured = head["flops_per_slice"], head["matmul_tflops"]
    lines = [
        f"{head['device']}, torch {head['torch']}: {head['model']} at {head['size']} px, bf16, "
        f"{flops / 1e9:.0f} GFLOP per slice (forward + backward, torch's flop counter); "
        f"peak bf16 {DATASHEET_TFLOPS:.0f} TFLOP/s (datasheet) and "
        f"{_num(measured, 0)} TFLOP/s (measured 8192^3 matmul); stage loader "
        f"{head['workers']} worker(s); projection: {EPOCHS} epochs x {FOLD_SLICES} slices, "
        "validation not included.",
        "",
        "| variant | batch | stage slices/s | bare slices/s | stage/bare time | loader: reads "
        "(GPU aug) | loader: CPU aug | % peak (stage, datasheet / measured) | % peak (bare, "
        "measured) | 100 epochs | peak GPU memory | warm-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for row in result["rows"]:
            stage, bare = row.get("stage"), row.get("bare")
            ratio = f"{bare / stage:.2f}x" if stage and bare else "-"
            cpu_aug = ", ".join(
                f"{_num(v)} ({k.rsplit('_', 1)[1]})"
                for k, v in row.items()
                if k.startswith("loader_cpu_aug")
            )
            hours = f"{EPOCHS * FOLD_SLICES / stage / 3600:.1f} h" if stage else "-"
            memory = f"{_num(row.get('peak_gib'))} GiB" if row.get("peak_gib") else "-"
            lines.append(
                f"| {row['variant']} | {row['batch']} | {_num(stage)} | {_num(bare)} | {ratio} "
                f"| {_num(row.get('loader'))} | {cpu_aug or '-'} "
                f"| {_share(stage, flops, DATASHEET_TFLOPS)} / {_share(stage, flops, measured)} "
                f"| {_share(bare, flops, measured)} | {hours} | {memory} "
                f"| {_num(row.get('warmup_s'))} s |"
            )
    errors = [e for r in results for row in r["rows"] for e in row.get("errors", [])]
    for result in results:
        done = {row["batch"] for row in result["rows"]}
        missing = [b for b in result["head"].get("batches", []) if b not in done]
        if missing:
            variant = result["head"].get("variant", "?")
            errors.append(f"{variant}: batch {missing} not measured (cut off)")
    return "\n".join(lines + [f"\nerror: {e}" for e in errors]) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=("eager", "compiled"), default="eager")
    parser.add_argument("--arch", default="UnetPlusPlus")
    parser.add_argument("--encoder", default="densenet201")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--workers", type=int, default=1, help="stage loader workers")
    parser.add_argument("--cpu-aug-workers", type=int, nargs="*", default=[1, 4])
    parser.add_argument("--seconds", type=float, default=8.0, help="per timed measurement")
    parser.add_argument("--no-loader", dest="loader", action="store_false")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of these files")
    parser.add_argument(
        "--cpu-smoke", "--quick", action="store_true", help="CPU, Unet(resnet18), 64 px"
    )
    args = parser.parse_args()
    if args.cpu_smoke:
        args.arch, args.encoder, args.size, args.seconds = "Unet", "resnet18", 64, 1.0
        args.batch = [b // 4 or 1 for b in args.batch]
    args.device = torch.device("cpu" if args.cpu_smoke else "cuda")
    return args


def main() -> None:
    args = parse_args()
    if args.table:
        print(markdown([json.loads(p.read_text()) for p in args.table]))
        return
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (or --cpu-smoke)")
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        results = measure(args, Path(tmp))
    table = markdown([results])
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
