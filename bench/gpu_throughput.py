"""Training throughput of UNet++ (densenet201) at 512 px on a GPU, bf16 and channels_last.

Slices per second of the real training step (forward, BCE + Dice, backward, Adam) and the
fraction of the GPU's peak bf16 throughput that reaches, with FLOPs per slice from torch's
flop counter. Needs CUDA; pass the card's dense bf16 peak (e.g. 989 TFLOP/s for an H100 SXM).

Usage: python bench/gpu_throughput.py [--peak-tflops 989] [--batch 2 8 16] [--size 512]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from covidseg.config import LossParams
from covidseg.losses import SegmentationLoss
from covidseg.model import build_model


def step_fn(
    model: torch.nn.Module,
    loss_fn: SegmentationLoss,
    optimizer: torch.optim.Optimizer,
    image: torch.Tensor,
    target: torch.Tensor,
) -> Callable[[], None]:
    """One training step as the stage runs it on CUDA."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(image), target)
        loss.backward()
        optimizer.step()

    return step


def flops_per_slice(model: torch.nn.Module, loss_fn: SegmentationLoss, size: int) -> float:
    """Forward + backward FLOPs of one slice (torch's flop counter, batch 1)."""
    image = torch.rand(1, 1, size, size, device="cuda")
    target = torch.zeros(1, size, size, dtype=torch.long, device="cuda")
    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model(image), target)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def measure(step: Callable[[], None], batch: int, seconds: float = 10.0) -> float:
    """Slices per second over `seconds` after a warm-up."""
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start, steps = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="UnetPlusPlus")
    parser.add_argument("--encoder", default="densenet201")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, nargs="+", default=[2, 8, 16])
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    model = build_model(args.arch, args.encoder, None, 1).cuda()
    model = model.to(memory_format=torch.channels_last)
    loss_fn = SegmentationLoss(LossParams(), 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    flops = flops_per_slice(model, loss_fn, args.size)
    print(
        f"{torch.cuda.get_device_name()}: {args.arch}({args.encoder}) at {args.size} px, "
        f"{flops / 1e9:.0f} GFLOP per slice (forward + backward)"
    )
    for batch in args.batch:
        image = torch.rand(batch, 1, args.size, args.size, device="cuda")
        image = image.contiguous(memory_format=torch.channels_last)
        target = (torch.rand(batch, args.size, args.size, device="cuda") > 0.9).long()
        torch.cuda.reset_peak_memory_stats()
        speed = measure(step_fn(model, loss_fn, optimizer, image, target), batch)
        share = speed * flops / (args.peak_tflops * 1e12)
        memory = torch.cuda.max_memory_allocated() / 2**30
        print(
            f"batch {batch:3d}: {speed:7.1f} slices/s, {100 * share:5.1f} % of peak bf16, "
            f"{memory:5.1f} GiB peak memory"
        )


if __name__ == "__main__":
    main()
