"""Numeric precision: training's autocast, inference's precision policy, logits to
probabilities, and what this CPU can do (one read of /proc/cpuinfo).

Shared by training (autocast, probabilities) and inference (the policy of `auto`, `bf16` and the
int8 engine's activation range), so that neither phase imports the other.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from functools import lru_cache
from pathlib import Path

import torch

from covidseg.config import PRECISIONS, Precision

BF16_MIN_GAIN = 1.2  # `auto` takes bf16 on a CPU only where it is at least this much faster
CALIBRATION_CALLS = 5
CPU = torch.device("cpu")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # 8-bit products without int16 overflow


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo; empty off Linux (no cheap way to know)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(
        flag
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    )


def cpu_runs_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX-512 BF16 or AMX), as oneDNN uses it.

    Elsewhere bf16 on a CPU is emulated and slower than fp32."""
    return torch.backends.mkldnn.is_available() and bool(cpu_flags() & set(BF16_CPU_FLAGS))


def has_vnni() -> bool:
    """Whether the CPU multiplies 8-bit integers without an int16 intermediate (VNNI or AMX);
    without it (AVX2, AVX-512F) full-range 8-bit activations saturate, so they keep 7 bits."""
    return bool(cpu_flags() & set(VNNI_FLAGS))


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA when asked (the training recipe); full precision elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _best_time(layer: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
    """The fastest of a few timed calls of `layer` (after one warm-up), in bf16 or fp32."""
    times = []
    with torch.inference_mode(), inference_autocast(CPU, "bf16" if bf16 else "fp32"):
        for _ in range(1 + CALIBRATION_CALLS):
            start = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - start)
    return min(times[1:])


@lru_cache(maxsize=1)
def cpu_bf16_pays() -> bool:
    """Whether bf16 beats fp32 on this CPU: native bf16 arithmetic (`cpu_runs_bf16`) and, timed
    once per process on a layer shaped like the network's, at least BF16_MIN_GAIN faster.

    Native bf16 alone does not say it: on some AVX-512 BF16 machines oneDNN's bf16
    convolutions measured slower than its fp32 ones (docs/how-to/fast-inference.md)."""
    if not cpu_runs_bf16():
        return False
    with torch.random.fork_rng(devices=[]):  # the layer's initialisation leaves no trace
        torch.manual_seed(0)
        layer = torch.nn.Conv2d(128, 32, 3, padding=1).eval()  # a DenseNet layer's convolution
        x = torch.rand(2, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    layer = layer.to(memory_format=torch.channels_last)
    fp32, bf16 = _best_time(layer, x, bf16=False), _best_time(layer, x, bf16=True)
    return fp32 >= BF16_MIN_GAIN * bf16


def uses_bf16(device: torch.device, precision: Precision) -> bool:
    """Whether inference runs in bf16: `auto` picks it on CUDA and on CPUs where it pays."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays())
    return precision == "bf16"


def inference_autocast(
    device: torch.device, precision: Precision
) -> AbstractContextManager[object]:
    """bf16 autocast on the device when `precision` selects it, else full precision."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output map, softmax over classes otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
