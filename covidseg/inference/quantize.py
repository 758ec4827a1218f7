"""int8 inference on a CPU (`--precision int8`): post-training static quantization, calibrated
on the scan itself and checked on it.

A copy of the model gets its encoder and decoder quantized by torch's FX graph-mode quantization
for the oneDNN engine (int8 convolutions, per-channel weights, 8-bit per-tensor activations, 7-bit
on a CPU without VNNI, whose int16 intermediates saturate otherwise);
the decoder's full-resolution blocks (UNet++'s `x_0_*` column), the segmentation head and the
sigmoid or softmax stay fp32: quantizing those moved a trained model's lesion volume by 2-3 %
(docs/how-to/fast-inference.md). A part that FX cannot trace (a decoder whose loop reads tensor
shapes, such as Unet's) stays fp32. Observers see a few evenly spaced slices of the volume being
segmented, so the activation ranges are that scan's; their histograms sample every
`HISTOGRAM_STRIDE`-th value (and the exact extremes), which halves the calibration's time.

The same slices then check the result: where the int8 labels of the calibration slices differ
from the fp32 labels on more than `MAX_LABEL_CHANGE` of their voxels, or the positive volume
moves by more than `MAX_VOLUME_CHANGE`, `quantize_int8` returns None and the caller runs fp32.
Written here because no well-kept library quantizes a segmentation network per scan; the
quantization itself is torch's.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from segmentation_models_pytorch.base import SegmentationModel
from torch.ao.quantization import QConfig, QConfigMapping, get_default_qconfig_mapping
from torch.ao.quantization.observer import HistogramObserver
from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
from torch.fx.proxy import TraceError

from covidseg.data.transforms import to_labels
from covidseg.errors import CovidSegError
from covidseg.inference.segment import InferenceOptions
from covidseg.precision import has_vnni, probabilities

log = logging.getLogger(__name__)

ENGINE = "onednn"  # 8-bit activations where the CPU has VNNI, 7 bits without (`has_vnni`)
CALIBRATION_SLICES = 8
FP32_DECODER_BLOCKS = "blocks.x_0_"  # UNet++'s full-resolution column stays fp32
KEPT_ATTRIBUTES = ("output_stride", "out_channels")  # encoder attributes SMP's forward reads
MAX_LABEL_CHANGE = 0.005  # the documented bar: 99.5 % of voxels equal ...
MAX_VOLUME_CHANGE = 0.01  # ... and the positive volume within 1 %
HISTOGRAM_STRIDE = 7  # the histogram sees every 7th activation (odd: no aliasing with rows)
QUIET = ("quantize_per_tensor", "cat operator", "reduce_range", "quant_min")  # torch's warnings

Labeller = Callable[[torch.Tensor], np.ndarray]  # logits -> labels


def int8_available() -> bool:
    """Whether this torch has the oneDNN int8 engine."""
    return ENGINE in torch.backends.quantized.supported_engines


@contextmanager
def quiet() -> Iterator[None]:
    """Without torch's deprecation and quantized-`cat` warnings (explained in
    docs/how-to/fast-inference.md)."""
    with warnings.catch_warnings():
        for text in QUIET:
            warnings.filterwarnings("ignore", message=f".*{text}")
        yield


def calibration_slices(image: np.ndarray, count: int = CALIBRATION_SLICES) -> np.ndarray:
    """Indices of `count` evenly spaced slices of an (slices, H, W) volume (all if fewer)."""
    return np.unique(np.linspace(0, len(image) - 1, min(count, len(image))).round().astype(int))


class SampledHistogramObserver(HistogramObserver):
    """torch's histogram observer (the engine's default) fed every `HISTOGRAM_STRIDE`-th value
    and the exact minimum and maximum: the same range, an estimate of the same distribution,
    and a seventh of `torch.histc`'s time, which otherwise costs as much as the network's
    convolutions (an 8-slice calibration at 512 px: 45 s whole, 24 s sampled)."""

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:
        values = x_orig.detach().flatten()
        if values.numel() > HISTOGRAM_STRIDE * self.bins:
            low, high = torch.aminmax(values)
            values = torch.cat([values[::HISTOGRAM_STRIDE], low[None], high[None]])
        super().forward(values)
        return x_orig


def _default_mapping() -> QConfigMapping:
    """The engine's default configuration with the sampled histogram observer."""
    mapping = get_default_qconfig_mapping(ENGINE)
    default = mapping.global_qconfig
    assert default is not None  # every engine's default mapping has one
    sampled = QConfig(
        activation=SampledHistogramObserver.with_args(reduce_range=not has_vnni()),
        weight=default.weight,
    )
    mapping.set_global(sampled)
    for kind, qconfig in list(mapping.object_type_qconfigs.items()):
        if qconfig is default:
            mapping.set_object_type(kind, sampled)
    return mapping


def _mapping(part: str, module: torch.nn.Module) -> QConfigMapping:
    """The engine's default configuration, the decoder's full-resolution blocks left out."""
    mapping = _default_mapping()
    if part == "decoder":
        for name, _ in module.named_modules():
            if name.startswith(FP32_DECODER_BLOCKS) and "." not in name[len("blocks.") :]:
                mapping.set_module_name(name, None)
    return mapping


def _keep_attributes(graph: torch.nn.Module, part: torch.nn.Module) -> torch.nn.Module:
    """Carry over what the network reads from its encoder besides calling it."""
    for attribute in KEPT_ATTRIBUTES:
        if hasattr(part, attribute):
            setattr(graph, attribute, getattr(part, attribute))
    return graph


def observe(net: SegmentationModel, example: torch.Tensor) -> list[str]:
    """Replace `net`'s encoder and decoder by observed copies where FX traces them; their
    names."""
    with torch.no_grad():
        features = net.encoder(example)
    done = []
    for name, example_input in (("encoder", example), ("decoder", features)):
        part = getattr(net, name)
        try:
            prepared = prepare_fx(part, _mapping(name, part), example_inputs=(example_input,))
        except (TraceError, TypeError, NotImplementedError):
            continue
        setattr(net, name, _keep_attributes(prepared, part))
        done.append(name)
    return done


def agrees(reference: np.ndarray, labels: np.ndarray) -> bool:
    """The documented agreement bar, on the calibration slices."""
    changed = float((reference != labels).mean())
    ref_volume, volume = int((reference > 0).sum()), int((labels > 0).sum())
    moved = abs(volume - ref_volume) / max(ref_volume, 1)
    small = max(ref_volume, volume) < 0.001 * reference.size  # a few voxels: no % to speak of
    return changed <= MAX_LABEL_CHANGE and (small or moved <= MAX_VOLUME_CHANGE)


def quantize_int8(
    model: torch.nn.Module, calibration: torch.Tensor, *, labeller: Labeller, batch_size: int
) -> torch.nn.Module | None:
    """An int8 copy of `model` calibrated on the (N, 1, H, W) `calibration` slices, or None
    where no part could be quantized or its labels on those slices miss the bar. `model`
    itself is left as it was."""
    torch.backends.quantized.engine = ENGINE  # process-wide: the int8 copy runs on it
    quantized = copy.deepcopy(model).float().cpu().eval()
    nets = [m for m in quantized.modules() if isinstance(m, SegmentationModel)]
    with quiet(), torch.no_grad():
        parts = [(net, name) for net in nets for name in observe(net, calibration[:1])]
        if not parts:
            return None
        batches = torch.split(calibration, batch_size)
        reference = np.concatenate([labeller(quantized(batch)) for batch in batches])
        for net, name in parts:
            observed = getattr(net, name)
            setattr(net, name, _keep_attributes(convert_fx(observed), observed))
        labels = np.concatenate([labeller(quantized(batch)) for batch in batches])
    return quantized if agrees(reference, labels) else None


class Quiet(torch.nn.Module):
    """An int8 network that runs without torch's warnings about quantized tensors."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with quiet():
            out: torch.Tensor = self.net(x)
        return out


def int8_model(
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
        log.warning(
            "int8 missed the agreement bar on this scan's calibration slices (or the model has "
            "no part it can quantize); running it in fp32"
        )
        return model
    return Quiet(quantized)
