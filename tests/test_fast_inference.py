"""The fast inference path (channels_last, bf16 where it pays, the optional body crop) against
today's fp32 path.

`fp32` must stay exactly the old whole-slice loop; `auto` may pick bf16 only where the hardware
runs it natively and faster; the crop is aligned to the encoder stride and gives background
outside the body; and on a small trained model the fast path's labels agree with fp32's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import AIR, WINDOW
from two_paths import evaluate_and_predict

import covidseg.precision as precision
from covidseg.data.transforms import to_labels
from covidseg.inference.crop import STRIDE, body_boxes, body_level, crop_boxes
from covidseg.inference.paths import predict_scan
from covidseg.inference.segment import InferenceOptions, predict_volume
from covidseg.precision import cpu_bf16_pays, probabilities, uses_bf16
from covidseg.training.model import build_model

CPU = torch.device("cpu")


@pytest.mark.parametrize("pays", [True, False])
def test_auto_picks_bf16_where_it_pays(monkeypatch, pays: bool) -> None:
    monkeypatch.setattr(precision, "cpu_bf16_pays", lambda: pays)
    assert uses_bf16(CPU, "auto") is pays
    assert uses_bf16(torch.device("cuda"), "auto")
    assert uses_bf16(CPU, "bf16") and not uses_bf16(torch.device("cuda"), "fp32")
    with pytest.raises(ValueError, match="precision"):
        uses_bf16(CPU, "fp16")  # type: ignore[arg-type]  # not a precision: refused at run time


@pytest.mark.parametrize(
    ("native", "fp32_s", "bf16_s", "expected"),
    [(False, 1.0, 0.1, False), (True, 1.0, 0.5, True), (True, 1.0, 0.9, False)],
)
def test_bf16_pays_only_where_native_and_measured_faster(
    monkeypatch, native: bool, fp32_s: float, bf16_s: float, expected: bool
) -> None:
    calls: list[bool] = []

    def timed(layer: torch.nn.Module, x: torch.Tensor, bf16: bool) -> float:
        calls.append(bf16)
        return bf16_s if bf16 else fp32_s

    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: native)
    monkeypatch.setattr(precision, "_best_time", timed)
    cpu_bf16_pays.cache_clear()
    try:
        assert cpu_bf16_pays() is expected
        assert sorted(calls) == ([False, True] if native else [])  # no timing without bf16
    finally:
        cpu_bf16_pays.cache_clear()


def test_the_calibration_leaves_the_random_stream_alone(monkeypatch) -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    monkeypatch.setattr(precision, "cpu_runs_bf16", lambda: True)
    cpu_bf16_pays.cache_clear()
    try:
        torch.manual_seed(0)
        cpu_bf16_pays()  # times a freshly initialised layer
        assert torch.equal(torch.rand(3), expected)
    finally:
        cpu_bf16_pays.cache_clear()


def test_the_fast_path_gives_the_model_back_as_it_was() -> None:
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", None, 1)
    image = np.full((2, 64, 64), AIR, np.float16)
    predict_volume(model, image, CPU, options=InferenceOptions(precision="auto"))
    weights = [p for p in model.parameters() if p.dim() == 4]
    assert weights and all(p.is_contiguous() and not p.is_inference() for p in weights)
    model.train()
    model(torch.rand(2, 1, 64, 64)).mean().backward()  # still trainable
    assert all(p.grad is not None for p in weights)


def test_crop_boxes_are_the_body_boxes_when_asked_for() -> None:
    image = np.full((2, 256, 256), AIR, np.float32)
    image[0, 100:140, 70:200] = 0.9
    on, off = InferenceOptions(crop=True), InferenceOptions(precision="bf16")
    assert crop_boxes(image, on, WINDOW)[0].tolist() == [64, 160, 32, 224]  # margin 256/16
    assert crop_boxes(image, on, WINDOW)[1].tolist() == [0, 0, 0, 0]  # all air: not run
    assert (crop_boxes(image, off, WINDOW) == [0, 256, 0, 256]).all()  # off by default
    assert (crop_boxes(image, on, None) == [0, 256, 0, 256]).all()  # no recipe: whole slices


def test_body_boxes_are_aligned_padded_and_clamped() -> None:
    image = np.full((4, 256, 256), AIR, np.float32)
    image[0, 100:140, 70:200] = 0.9  # a body in the middle
    image[1, 0:10, 250:256] = 0.9  # at a corner: the box stays inside the slice
    image[3, 120:121, 120:121] = 0.9  # one voxel: the box is at least min_size
    boxes = body_boxes(image, body_level(WINDOW), margin=4, min_size=64)
    assert boxes[0].tolist() == [96, 160, 64, 224]
    assert boxes[1].tolist() == [0, 64, 192, 256]
    assert boxes[2].tolist() == [0, 0, 0, 0]  # no body: nothing to run
    assert boxes[3].tolist() == [96, 160, 96, 160]
    assert (boxes % STRIDE == 0).all()
    assert body_level(WINDOW) == pytest.approx(0.5)
    assert body_level((-100.0, 200.0)) == 0.0  # a window above -500 HU: anything above its floor


class OldLoop:
    """Today's fp32 path, verbatim: whole slices in order, batch by batch."""

    @staticmethod
    @torch.inference_mode()
    def run(model: torch.nn.Module, image: np.ndarray, batch_size: int) -> np.ndarray:
        model.eval()
        out = []
        for start in range(0, image.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(image[start : start + batch_size]))
            out.append(probabilities(model(batch.float()[:, None])).float())
        return torch.cat(out).permute(1, 0, 2, 3).numpy()


def test_fp32_is_todays_whole_slice_path() -> None:
    torch.manual_seed(0)
    model = build_model("Unet", "resnet18", None, 4)
    image = np.full((5, 64, 64), AIR, np.float16)
    image[:, 20:40, 24:44] = 0.9
    options = InferenceOptions(batch_size=2, precision="fp32")
    got = predict_scan(model, image, CPU, options=options, hu_window=WINDOW)
    assert np.array_equal(got, OldLoop.run(model, image, 2))


class Pointwise(torch.nn.Module):
    """Logits from each voxel alone (a 1x1 convolution): cropping cannot change them."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, classes, 1)
        with torch.no_grad():
            slope = torch.tensor([20.0]) if classes == 1 else torch.linspace(-20, 20, classes)
            self.conv.weight.copy_(slope.view(classes, 1, 1, 1))  # air: background wins
            assert self.conv.bias is not None
            self.conv.bias.copy_(-slope / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


@pytest.mark.parametrize("classes", [1, 4])
def test_crop_gives_the_whole_slice_answer_inside_and_background_outside(classes: int) -> None:
    rng = np.random.default_rng(0)
    image = np.full((3, 128, 128), AIR, np.float32)
    image[0, 40:90, 30:100] = rng.uniform(0.2, 1.0, (50, 70))
    image[2, 70:80, 10:20] = 0.9  # slice 1 stays empty: skipped, all background
    model = Pointwise(classes)
    whole = InferenceOptions(precision="fp32", crop=False, batch_size=2)
    cropped = InferenceOptions(precision="fp32", crop=True, batch_size=2)
    full = predict_scan(model, image, CPU, options=whole, hu_window=WINDOW)
    fast = predict_scan(model, image, CPU, options=cropped, hu_window=WINDOW)
    boxes = crop_boxes(image, cropped, WINDOW)
    inside = np.zeros(image.shape, bool)
    for z, (r0, r1, c0, c1) in enumerate(boxes):
        inside[z, r0:r1, c0:c1] = True
    assert 0 < inside.mean() < 0.5  # the crop did something
    assert np.allclose(fast[:, inside], full[:, inside], atol=1e-6)
    background = np.zeros(classes, np.float32)
    background[0] = 0.0 if classes == 1 else 1.0
    assert (fast[:, ~inside] == background[:, None]).all()
    assert np.array_equal(to_labels(fast, 0.5), to_labels(full, 0.5))  # air is background


def test_evaluate_and_predict_agree_on_the_fast_path(raw_dir: Path, stores, model_dir) -> None:
    options = InferenceOptions(batch_size=4, precision="bf16", crop=True)
    pairs = evaluate_and_predict(raw_dir, stores[0], model_dir, options)
    assert pairs  # not vacuous: raw_dir holds cases
    for evaluated, predicted, _ in pairs:
        assert np.array_equal(evaluated.labels, predicted.labels)


def test_fast_path_labels_agree_with_fp32_on_a_trained_model(
    unet_on_lungs: torch.nn.Module, lung_slices: tuple[np.ndarray, np.ndarray]
) -> None:
    """The phantoms' lesions are a few dozen voxels, too few to resolve 1 %: the tiny model
    segments the lungs with their lesions (thousands of voxels) instead."""
    model, (images, masks) = unet_on_lungs, lung_slices
    whole = InferenceOptions(precision="fp32")
    fp32 = predict_volume(model, images, CPU, options=whole)
    ref = to_labels(fp32, 0.5)
    assert ((ref > 0) == masks).mean() >= 0.99  # a real test: the model found the lungs
    fast = predict_scan(
        model, images, CPU, options=InferenceOptions(precision="bf16", crop=True), hu_window=WINDOW
    )
    got = to_labels(fast, 0.5)
    assert (ref == got).mean() >= 0.995
    assert abs(int(got.sum()) - int(ref.sum())) <= 0.01 * ref.sum()
    # The same slices inside a 192 px field of air, at the same pixel scale: the crop bites,
    # the answer outside each slice's box is background, and inside it is the network's
    # answer on that box alone (placed where it belongs).
    wide = np.full((len(images), 192, 192), AIR, np.float16)
    wide[:, 64:128, 64:128] = images
    boxes = crop_boxes(wide, InferenceOptions(crop=True), WINDOW)
    assert ((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2]) < 192**2).all()
    fast = predict_scan(
        model, wide, CPU, options=InferenceOptions(precision="bf16", crop=True), hu_window=WINDOW
    )
    wide_labels = to_labels(fast, 0.5)
    inside = np.zeros(wide.shape, bool)
    for z, (r0, r1, c0, c1) in enumerate(boxes):
        inside[z, r0:r1, c0:c1] = True
        alone = predict_volume(model, wide[z : z + 1, r0:r1, c0:c1], CPU, options=whole)
        assert (to_labels(alone, 0.5)[0] == wide_labels[z, r0:r1, c0:c1]).mean() >= 0.995
    assert not wide_labels[~inside].any() and wide_labels[inside].any()
