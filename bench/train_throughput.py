"""Training throughput of the stage's code path against the bare model step.

Stage: `make_loader` + `train_epoch` from `covidseg.training.train` (real `SliceDataset` over
synthetic stores, augmentation and `BalancedSampler` on, 1 DataLoader worker, the progress bar
drawn to /dev/null). Bare: the same model, loss and optimizer doing forward, loss, backward and
step on one batch of the same shape already in memory. One warm-up step precedes each; the stage's
warm-up epoch is cut to one batch, which also starts its persistent worker.

Usage: .venv/bin/python bench/train_throughput.py [--quick] [--arch A] [--encoder E]
       [--size S] [--batch B] [--steps N] [--workers W]
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import tempfile
from pathlib import Path

import torch
from _report import (
    load_note,
    machine_note,
    median,
    model_args,
    spread,
    table,
    timed,
    torch_threads,
    verdict,
)
from _synth import build_stores
from torch.utils.data import DataLoader

from covidseg.config import Params, PrepareParams, RuntimeParams, TrainParams
from covidseg.training.checkpoint import Parts
from covidseg.training.dataset import BalancedSampler, SliceDataset
from covidseg.training.losses import SegmentationLoss
from covidseg.training.train import Dist, build_parts, make_loader, seed_everything, train_epoch

GOAL = 1.10
CASES, SLICES = 3, 80
DEVICE = torch.device("cpu")


def make_params(args: argparse.Namespace) -> Params:
    """The stage's params for this run (CPU, defaults otherwise)."""
    train = TrainParams(batch_size=args.batch, steps_per_epoch=args.steps)
    runtime = RuntimeParams(num_workers=args.workers, device="cpu")
    prepare = PrepareParams(image_size=args.size)
    return Params(
        arch=args.arch, encoder=args.encoder, prepare=prepare, train=train, runtime=runtime
    )


def stage_epoch(
    parts: Parts, loader: DataLoader, loss_fn: SegmentationLoss, params: Params, epoch: int
) -> tuple[float, int]:
    """`train_epoch` as the stage calls it on the main rank (progress bar on, sent nowhere)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        return train_epoch(
            parts["model"],
            loader,
            loss_fn,
            parts["optimizer"],
            device=DEVICE,
            params=params,
            epoch=epoch,
            show=True,
        )


def bare_steps(parts: Parts, batch: tuple, loss_fn: SegmentationLoss, steps: int) -> None:
    """Forward, loss, backward and optimizer step on one in-memory batch, `steps` times."""
    model, optimizer = parts["model"], parts["optimizer"]
    model.train()
    image, target = batch
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(image), target)
        loss.backward()
        optimizer.step()


def run(args: argparse.Namespace, root: Path) -> tuple[list[float], list[float], float]:
    """(stage slices/s per repeat, bare slices/s per repeat, stage warm-up seconds)."""
    params = make_params(args)
    seed_everything(params.train.seed)
    stores = build_stores(root, args.size, cases=CASES, slices=SLICES)
    dataset = SliceDataset(stores, params.train.augment)
    loader = make_loader(dataset, params, Dist(), DEVICE)
    parts = build_parts(params, 1, DEVICE)
    loss_fn = SegmentationLoss(params.train.loss, 1)
    sampler = loader.sampler
    assert isinstance(sampler, BalancedSampler)
    full = sampler.num_samples
    sampler.num_samples = args.batch  # warm-up epoch: one batch, starts the worker
    warm, _ = timed(lambda: stage_epoch(parts, loader, loss_fn, params, epoch=1))
    sampler.num_samples = full
    batch = next(iter(DataLoader(dataset, batch_size=args.batch)))
    bare_steps(parts, batch, loss_fn, 1)
    stage, bare = [], []
    for r in range(args.repeats):
        epoch = functools.partial(stage_epoch, parts, loader, loss_fn, params, r + 2)
        seconds, (_, seen) = timed(epoch)
        stage.append(seen / seconds)
        seconds, _ = timed(lambda: bare_steps(parts, batch, loss_fn, args.steps))
        bare.append(args.steps * args.batch / seconds)
    return stage, bare, warm


def parse_args() -> argparse.Namespace:
    def steps(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--steps", type=int, default=None, help="steps per timed epoch")
        parser.add_argument("--workers", type=int, default=1, help="DataLoader workers")

    args = model_args(__doc__.splitlines()[0], "10 steps, 2 repeats", steps)
    args.steps = args.steps or (10 if args.quick else 15)
    return args


def main() -> None:
    args = parse_args()
    threads = torch_threads()
    torch.set_num_threads(threads)
    print(machine_note(), f"| torch threads {threads}, {args.workers} loader worker(s)")
    print(
        f"{args.arch}({args.encoder}) at {args.size} px, batch {args.batch}, {args.steps} steps"
        f" per timed epoch, median of {args.repeats} repeats (stage and bare interleaved)"
    )
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        stage, bare, warm = run(args, Path(tmp))
    rows = [
        ["stage: make_loader + train_epoch", median(stage), spread(stage)],
        ["bare: forward+loss+backward+step", median(bare), spread(bare)],
    ]
    print(table(["path", "slices/s", "range"], rows))
    print(f"stage warm-up epoch (1 batch, worker start included): {warm:.2f} s")
    ratios = [b / s for s, b in zip(stage, bare, strict=True)]
    print(f"time ratio stage/bare (median of per-repeat ratios): {verdict(median(ratios), GOAL)}")
    print(load_note())


if __name__ == "__main__":
    main()
