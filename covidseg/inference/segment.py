"""Slice-by-slice prediction of whole volumes, in batches, with optional flip TTA.

`segment` is the one inference path of `evaluate` and `predict`: the same model and scan give
the same labels in both.

Three paths, chosen by `InferenceOptions.precision`:
- `fp32`: full precision, on a CPU in the contiguous layout (the reference);
- the fast path, `auto` and `bf16`: channels_last (oneDNN's faster convolutions); `bf16`
  autocasts to bf16, `auto` does so on CUDA, and on a CPU only where bf16 measures faster than
  fp32 (`cpu_bf16_pays`);
- `int8` (CPU only): a copy of the model quantized and checked on the scan's own slices
  (`covidseg.inference.quantize`), or the `fp32` path where that check fails.
`InferenceOptions.crop` (off by default, any precision) runs each slice's body box only
(`body_boxes`: the voxels above -500 HU, widened by S/16, aligned to the encoder stride),
background outside: fewer pixels, but the network's answer moves with its field of view (README).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from covidseg.config import CPU_BATCH_SIZE, GPU_BATCH_SIZE, PRECISIONS
from covidseg.data.labels import LabelScheme
from covidseg.data.transforms import Grid, body_boxes, body_level, labels_on_grid, to_labels
from covidseg.errors import CovidSegError
from covidseg.inference.quantize import calibration_slices, int8_available, quantize_int8, quiet

NCHW = ("fp32", "int8")  # contiguous on a CPU: the reference, and oneDNN's int8 kernels
BF16_MIN_GAIN = 1.2  # `auto` takes bf16 on a CPU only where it is at least this much faster
CALIBRATION_CALLS = 5
CPU = torch.device("cpu")
CROP_MARGIN_PARTS = 16  # the body box is widened by S / 16 (32 px at 512): a narrower margin
# moved a trained model's lesion volume by up to 2.8 % (README, "Fast inference")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo flags of native bf16 arithmetic


@dataclass(frozen=True)
class InferenceOptions:
    """How to run a model on a volume (none of these change what the model is)."""

    batch_size: int = GPU_BATCH_SIZE
    tta_flip: bool = False
    threshold: float = 0.5
    precision: str = "auto"  # auto | fp32 | bf16
    crop: bool = False  # run on each slice's body box only (changes the answer a little)


@dataclass(frozen=True)
class Segmentation:
    """Labels on the model's grid (for figures) and on the scan's grid (scored, written)."""

    stored: np.ndarray
    labels: np.ndarray


def autocast(device: torch.device, bf16: bool) -> AbstractContextManager[object]:
    """bf16 autocast on CUDA when asked (the training recipe); full precision elsewhere."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@lru_cache(maxsize=1)
def cpu_runs_bf16() -> bool:
    """Whether this CPU does bf16 arithmetic natively (AVX-512 BF16 or AMX), as oneDNN uses it.

    Elsewhere bf16 on a CPU is emulated and slower than fp32."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: no cheap way to know, stay in fp32
        return False
    flags = {
        flag
        for line in cpuinfo.splitlines()
        if line.startswith("flags")
        for flag in line.partition(":")[2].split()
    }
    return any(flag in flags for flag in BF16_CPU_FLAGS)


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
    convolutions measured slower than its fp32 ones (README, "Fast inference")."""
    if not cpu_runs_bf16():
        return False
    with torch.random.fork_rng(devices=[]):  # the layer's initialisation leaves no trace
        torch.manual_seed(0)
        layer = torch.nn.Conv2d(128, 32, 3, padding=1).eval()  # a DenseNet layer's convolution
        x = torch.rand(2, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    layer = layer.to(memory_format=torch.channels_last)
    fp32, bf16 = _best_time(layer, x, bf16=False), _best_time(layer, x, bf16=True)
    return fp32 >= BF16_MIN_GAIN * bf16


def uses_bf16(device: torch.device, precision: str) -> bool:
    """Whether inference runs in bf16: `auto` picks it on CUDA and on CPUs where it pays."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_bf16_pays())
    return precision == "bf16"


def inference_autocast(device: torch.device, precision: str) -> AbstractContextManager[object]:
    """bf16 autocast on the device when `precision` selects it, else full precision."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output map, softmax over classes otherwise."""
    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def crop_boxes(
    image: np.ndarray, options: InferenceOptions, hu_window: tuple[float, float] | None
) -> np.ndarray:
    """Each slice's box: its body box when the crop is on, else the whole slice."""
    size = image.shape[1:]
    whole = np.tile(np.array([0, size[0], 0, size[1]], np.int64), (image.shape[0], 1))
    if hu_window is None or not options.crop:
        return whole
    boxes = body_boxes(
        image,
        body_level(hu_window),
        margin=max(min(size) // CROP_MARGIN_PARTS, 2),
        min_size=min(size) // 4,
    )
    if (boxes[:, 0] == boxes[:, 1]).all():  # nothing above air anywhere: let the model decide
        return whole
    return boxes


def _batches(boxes: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, tuple[int, ...]]]:
    """(slice indices, box) of each batch: the slices of one box together, in slice order;
    slices without a body are skipped."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, box in enumerate(boxes.tolist()):
        if box[0] < box[1]:
            groups.setdefault(tuple(box), []).append(index)
    for box, indices in groups.items():
        for start in range(0, len(indices), batch_size):
            yield np.asarray(indices[start : start + batch_size]), box


def default_batch_size(device: torch.device) -> int:
    """Slices per forward pass when none is asked for: fewer on a CPU, where larger batches
    measured slower per slice (README, "Fast inference")."""
    return CPU_BATCH_SIZE if device.type == "cpu" else GPU_BATCH_SIZE


def _layout(device: torch.device, options: InferenceOptions) -> torch.memory_format:
    """channels_last on CUDA and on a CPU's fast path (oneDNN's faster convolutions); the
    fp32 path on a CPU (and MPS) keeps the contiguous layout of earlier versions."""
    fast = device.type == "cuda" or (device.type == "cpu" and options.precision not in NCHW)
    return torch.channels_last if fast else torch.contiguous_format


@contextmanager
def _laid_out(model: torch.nn.Module, layout: torch.memory_format) -> Iterator[None]:
    """The model's weights in `layout` for the duration, contiguous again after (outside
    inference mode, so they stay ordinary tensors that training can use)."""
    if layout == torch.contiguous_format:
        yield
        return
    model.to(memory_format=layout)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


def _forward(
    model: torch.nn.Module,
    batch: torch.Tensor,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None,
) -> torch.Tensor:
    """(N, 1, h, w) batch -> (N, C, h, w) float32 probabilities (flip TTA averaged in)."""
    batch = batch.contiguous(memory_format=_layout(device, options))
    with inference_autocast(device, options.precision):
        prob = probabilities(model(batch))
        if options.tta_flip:
            mirrored = probabilities(model(batch.flip(-1))).flip(-1)
            if mirror is not None and mirrored.shape[1] > 1:
                mirrored = mirrored[:, list(mirror)]
            prob = (prob + mirrored) / 2
    return prob.float().cpu()


def predict_volume(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None = None,
    hu_window: tuple[float, float] | None = None,
    progress: bool = False,
) -> np.ndarray:
    """(slices, H, W) image in [0, 1] -> (C, slices, H, W) float32 probabilities.

    `mirror` (the label scheme's left-right map) reorders the channels of the flipped pass of
    flip TTA for a multi-label model, whose lung channels swap in a mirror. `hu_window` (the
    model's recipe) places the body's outline for `options.crop`; without it every slice is
    run whole. The model comes back as it went in (eval mode aside).
    """
    with suppress(NotImplementedError):  # a torch.export module is already in eval mode
        model.eval()
    boxes = crop_boxes(image, options, hu_window)
    if options.precision == "int8":
        model = _int8(model, image, device, options)
    with _laid_out(model, _layout(device, options)), torch.inference_mode(), quiet():
        return _predict_boxes(
            model, image, device, options=options, mirror=mirror, progress=progress, boxes=boxes
        )


def _int8(
    model: torch.nn.Module, image: np.ndarray, device: torch.device, options: InferenceOptions
) -> torch.nn.Module:
    """An int8 copy of `model` calibrated on a few slices of `image`; `model` itself (then run
    exactly as `fp32`) where that missed the agreement bar on those slices."""
    if device.type != "cpu":
        raise CovidSegError(f"precision int8 runs on a CPU only, not on {device.type}")
    if not int8_available():
        raise CovidSegError("precision int8: this torch has no oneDNN int8 engine")
    picked = np.asarray(image[calibration_slices(image)], np.float32)

    def labeller(logits: torch.Tensor) -> np.ndarray:
        return to_labels(probabilities(logits).permute(1, 0, 2, 3).numpy(), options.threshold)

    quantized = quantize_int8(
        model, torch.from_numpy(picked)[:, None], labeller=labeller, batch_size=options.batch_size
    )
    if quantized is None:
        print(
            "warning: int8 missed the agreement bar on this scan's calibration slices (or the "
            "model has no part it can quantize); running it in fp32",
            file=sys.stderr,
        )
        return model
    return quantized


def _predict_boxes(
    model: torch.nn.Module,
    image: np.ndarray,
    device: torch.device,
    *,
    options: InferenceOptions,
    mirror: tuple[int, ...] | None,
    progress: bool,
    boxes: np.ndarray,
) -> np.ndarray:
    """`predict_volume`'s loop: each batch of slices of one box through the network."""
    batches = list(_batches(boxes, options.batch_size))
    out: np.ndarray | None = None
    for indices, (r0, r1, c0, c1) in tqdm(
        batches, desc="slices", unit="batch", disable=not progress, leave=False
    ):
        batch = torch.from_numpy(np.ascontiguousarray(image[indices, r0:r1, c0:c1]))
        batch = batch.to(device=device, dtype=torch.float32)[:, None]
        prob = _forward(model, batch, device, options=options, mirror=mirror)
        if out is None:  # background outside the boxes: 0, or class 0 of a softmax
            out = np.zeros((prob.shape[1], *image.shape), np.float32)
            if prob.shape[1] > 1:
                out[0] = 1.0
        out[:, indices, r0:r1, c0:c1] = prob.permute(1, 0, 2, 3).numpy()
    assert out is not None  # `crop_boxes` leaves at least one slice to run
    return out


def segment(
    model: torch.nn.Module,
    image: np.ndarray,
    grid: Grid,
    *,
    scheme: LabelScheme,
    options: InferenceOptions,
    device: torch.device,
    hu_window: tuple[float, float] | None = None,
    progress: bool = False,
) -> Segmentation:
    """Model input (slices, S, S) -> labels on the model's grid and on the scan's grid.

    `hu_window` is the model's (its recipe's): where the body crop (`options.crop`) starts."""
    prob = predict_volume(
        model,
        image,
        device,
        options=options,
        mirror=scheme.mirror,
        hu_window=hu_window,
        progress=progress,
    )
    stored = to_labels(prob, options.threshold)
    return Segmentation(stored=stored, labels=labels_on_grid(prob, grid, options.threshold))
