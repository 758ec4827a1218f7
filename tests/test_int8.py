"""`--precision int8`: post-training quantization calibrated on the scan, checked on the same
slices against the agreement bar, and the fp32 path where it misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import AIR
from torch.ao.quantization.observer import HistogramObserver
from torch.nn import Conv2d

import covidseg.inference.quantize as quantize
from covidseg import CovidSegError
from covidseg.data.transforms import to_labels
from covidseg.inference.paths import predict_scan
from covidseg.inference.segment import InferenceOptions
from covidseg.training.model import build_model

CPU = torch.device("cpu")
pytestmark = [
    pytest.mark.skipif(not quantize.int8_available(), reason="no oneDNN int8 engine"),
    pytest.mark.xdist_group("int8"),  # one fitted model (`trained`) for the module
]
FP32 = InferenceOptions(batch_size=4, precision="fp32")
INT8 = InferenceOptions(batch_size=4, precision="int8")


@pytest.fixture(scope="module")
def trained(
    unetpp_on_lungs: torch.nn.Module, lung_slices: tuple[np.ndarray, np.ndarray]
) -> tuple[torch.nn.Module, np.ndarray, np.ndarray]:
    """(UNet++ / MobileNet-v2 fitted to the phantoms' lungs, its images, its fp32 labels);
    shared by the tests, which must leave the model as it is."""
    model, (images, masks) = unetpp_on_lungs, lung_slices
    ref = to_labels(predict_scan(model, images, CPU, options=FP32), 0.5)
    assert ((ref > 0) == masks).mean() >= 0.99  # the model found the lungs
    return model, images, ref


def test_int8_labels_agree_with_fp32_on_a_trained_model(trained, capsys) -> None:
    model, images, ref = trained
    before = {k: v.clone() for k, v in model.state_dict().items()}
    int8 = predict_scan(model, images, CPU, options=INT8)
    got = to_labels(int8, 0.5)
    assert "warning" not in capsys.readouterr().err  # int8 ran, no fallback
    assert (got == ref).mean() >= 0.995
    assert abs(int(got.sum()) - int(ref.sum())) <= 0.01 * ref.sum()
    # and it is another computation than fp32's
    assert not np.array_equal(int8, predict_scan(model, images, CPU, options=FP32))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is untouched


def test_the_copy_is_int8_but_the_full_resolution_blocks_and_head(trained) -> None:
    model, images, _ = trained
    batch = torch.from_numpy(images[quantize.calibration_slices(images)].astype(np.float32))
    copy = quantize.quantize_int8(
        model, batch[:, None], labeller=lambda x: (x > 0).numpy(), batch_size=4
    )
    assert copy is not None
    convs = {name: type(m) for name, m in copy.named_modules() if "Conv" in type(m).__name__}
    int8 = [name for name, kind in convs.items() if "quantized" in kind.__module__]
    fp32 = [name for name, kind in convs.items() if kind is Conv2d]
    assert any(name.startswith("encoder.") for name in int8)
    assert any(name.startswith("decoder.") for name in int8)
    assert all(n.startswith(("decoder.blocks.x_0_", "segmentation_head")) for n in fp32)
    assert any(n.startswith("decoder.blocks.x_0_") for n in fp32)


def test_int8_falls_back_to_fp32_where_the_bar_is_missed(trained, monkeypatch, capsys) -> None:
    model, images, _ = trained
    monkeypatch.setattr(quantize, "MAX_LABEL_CHANGE", -1.0)  # nothing can pass
    int8 = predict_scan(model, images, CPU, options=INT8)
    assert "running it in fp32" in capsys.readouterr().err
    fp32 = predict_scan(model, images, CPU, options=FP32)
    np.testing.assert_array_equal(int8, fp32)  # exactly fp32, not a half-quantized model


def test_a_decoder_fx_cannot_trace_stays_fp32() -> None:
    """Unet's decoder reads tensor shapes in a loop: only its encoder is quantized."""
    torch.manual_seed(0)
    net = build_model("Unet", "resnet18", None, 1).eval()
    assert quantize.observe(net, torch.rand(1, 1, 64, 64)) == ["encoder"]


def test_int8_runs_on_a_cpu_only() -> None:
    model = build_model("Unet", "resnet18", None, 1)
    image = np.full((2, 64, 64), AIR, np.float32)
    with pytest.raises(CovidSegError, match="int8 runs on a CPU only"):
        predict_scan(model, image, torch.device("cuda"), options=INT8)


def test_the_bar_on_the_calibration_slices() -> None:
    ref = np.zeros((2, 100, 100), np.uint8)
    ref[:, :30] = 1  # 6,000 positives of 20,000
    near = ref.copy()
    near[0, 30, :50] = 1  # +50 voxels: 0.25 % changed, volume +0.8 %
    far = ref.copy()
    far[0, 30:32] = 1  # +200 voxels: 1 % changed
    assert quantize.agrees(ref, near) and not quantize.agrees(ref, far)
    few = np.zeros_like(ref)
    few[0, 0, :5] = 1
    more = few.copy()
    more[0, 0, 5:10] = 1  # 5 voxels against 10: +100 % of almost nothing, 0.025 % changed
    assert quantize.agrees(few, more)
    assert quantize.calibration_slices(np.zeros((300, 2, 2))).tolist() == [
        0, 43, 85, 128, 171, 214, 256, 299
    ]  # fmt: skip
    assert quantize.calibration_slices(np.zeros((3, 2, 2))).tolist() == [0, 1, 2]


def test_the_sampled_histogram_keeps_the_range_and_the_scale() -> None:
    """Every 7th value plus the exact extremes: the range of all values, and nearly the scale
    torch's full histogram picks; a small tensor is observed whole."""
    gen = torch.Generator().manual_seed(0)
    x = torch.relu(torch.randn(2, 64, 128, 128, generator=gen))  # a post-ReLU activation
    full = HistogramObserver(reduce_range=False)
    sampled = quantize.SampledHistogramObserver(reduce_range=False)
    assert sampled(x) is x
    full(x)
    scale_full, scale_sampled = full.calculate_qparams()[0], sampled.calculate_qparams()[0]
    assert abs(float(scale_sampled / scale_full) - 1) < 0.05  # measured: 1.02-1.03
    x.view(-1)[12345] = 9.0  # a new maximum, at a position the stride skips (12345 % 7 != 0)
    sampled = quantize.SampledHistogramObserver(reduce_range=False)
    sampled(x)
    assert float(sampled.max_val) == 9.0
    assert float(sampled.min_val) == 0.0
    small = torch.randn(1000, generator=gen)
    full, sampled = HistogramObserver(), quantize.SampledHistogramObserver()
    full(small)
    sampled(small)
    assert torch.equal(full.histogram, sampled.histogram)


@pytest.mark.parametrize(("vnni", "reduce_range"), [(True, False), (False, True)])
def test_activations_keep_7_bits_on_a_cpu_without_vnni(monkeypatch, vnni, reduce_range) -> None:
    monkeypatch.setattr(quantize, "has_vnni", lambda: vnni)
    qconfig = quantize._default_mapping().global_qconfig
    assert qconfig is not None
    observer = qconfig.activation()
    assert isinstance(observer, quantize.SampledHistogramObserver)
    assert observer.reduce_range is reduce_range
