"""One preprocessing and one postprocessing path: prepare, evaluate and predict agree exactly.

Also the unit pieces they are made of: the resample round trip, the intensity mapping of both
encodings, the flip-TTA left/right swap and the validation Dice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from two_paths import evaluate_and_predict

from covidseg.data.intensity import HU, UINT8, UINT8_WINDOW_HU, normalise, normalised_min
from covidseg.data.labels import INFECTION, LUNG_INFECTION
from covidseg.data.resample import SLAB_SLICES, to_original_grid, to_square
from covidseg.data.store import read_arrays
from covidseg.data.transforms import Recipe, model_input, recipe_of, scan_input
from covidseg.data.volumes import Volume, find_cases, read_nifti
from covidseg.inference.segment import InferenceOptions, predict_volume
from covidseg.training.modelio import load_model
from covidseg.training.validation import dice, validate

CPU = torch.device("cpu")


def test_stored_slices_are_what_predict_feeds_the_model(raw_dir: Path, stores) -> None:
    out, params = stores
    for files in find_cases(raw_dir):
        data, affine = read_nifti(files.image, files.name)
        fed, _ = scan_input(data, affine, files.name, recipe_of(params))
        stored = read_arrays(out / f"{files.name}.h5", ("image",))["image"]
        assert fed.image.dtype == stored.dtype == np.float16
        assert np.array_equal(fed.image, stored)


def test_evaluate_and_predict_give_identical_labels(raw_dir: Path, stores, model_dir) -> None:
    options = InferenceOptions(batch_size=4, precision="fp32")
    pairs = evaluate_and_predict(raw_dir, stores[0], model_dir, options)
    assert pairs  # not vacuous: raw_dir holds cases
    for evaluated, predicted, volume in pairs:
        assert predicted.labels.shape == volume.data.shape
        assert np.array_equal(evaluated.labels, predicted.labels)
        assert np.array_equal(evaluated.stored, predicted.stored)
        assert len(np.unique(predicted.labels)) > 1  # a real test: more than one label


def test_model_json_carries_the_label_scheme(model_dir: Path) -> None:
    _, spec = load_model(model_dir, CPU)
    assert spec.scheme == LUNG_INFECTION
    assert spec.scheme.names == ("background", "left_lung", "right_lung", "infection")
    assert spec.recipe.image_dtype == "float16"


@pytest.mark.parametrize(("rows", "cols"), [(40, 40), (50, 30), (23, 61)])
def test_labels_survive_the_resample_round_trip(rows: int, cols: int) -> None:
    rng = np.random.default_rng(rows)
    labels = np.zeros((2, rows, cols), np.uint8)
    labels[:, rows // 4 : rows // 2, cols // 3 : 2 * cols // 3] = 1
    labels[1, rng.integers(0, rows, 5), rng.integers(0, cols, 5)] = 2
    up = to_square(labels, 128, labels=True)  # upsampling: every source voxel survives
    assert up.shape == (2, 128, 128)
    assert np.array_equal(to_original_grid(up, rows, cols, labels=True), labels)


def test_images_keep_their_scale_through_the_round_trip() -> None:
    ramp = np.tile(np.linspace(0, 1, 48, dtype=np.float32), (1, 30, 1))  # (1, 30, 48)
    square = to_square(ramp, 96, labels=False)
    assert square[0, 0, 0] == pytest.approx(0.0)  # the padding holds the lowest value (air)
    back = to_original_grid(square, 30, 48, labels=False)
    assert back.shape == ramp.shape
    assert np.abs(back - ramp)[:, 2:-2, 2:-2].max() < 0.02


def at_once(stack: np.ndarray, size: int, labels: bool) -> np.ndarray:
    """The whole stack padded (0, or its minimum) and resized in one call: no slabs."""
    rows, cols = stack.shape[1:]
    side = max(rows, cols)
    top, left = (side - rows) // 2, (side - cols) // 2
    square = np.full((len(stack), side, side), 0 if labels else stack.min(), stack.dtype)
    square[:, top : top + rows, left : left + cols] = stack
    tensor = torch.from_numpy(square)[:, None].float()
    mode = {"mode": "nearest-exact"} if labels else {"mode": "bilinear", "antialias": True}
    out = torch.nn.functional.interpolate(tensor, size=(size, size), **mode)[:, 0].numpy()
    return out.astype(np.uint8) if labels else out


@pytest.mark.parametrize(("encoding", "size"), [(HU, 64), (HU, 32), (UINT8, 48)])
def test_model_input_in_slabs_is_the_whole_volume_at_once(encoding: str, size: int) -> None:
    """Slab by slab, yet the same bytes: the padding is the whole volume's lowest value even
    where it lies in the last slab only."""
    rng = np.random.default_rng(size)
    shape = (2 * SLAB_SLICES + 5, 37, 53)
    if encoding == HU:
        data = rng.integers(-900, 400, shape).astype(np.int16)
        data[-1, 3, 4] = -1200  # inside the window, lower than anything before the last slab
    else:
        data = rng.integers(40, 256, shape).astype(np.uint8)
        data[-1, 3, 4] = 7
    recipe = Recipe(hu_window=(-1250.0, 250.0), image_size=size)
    volume = Volume(data, np.eye(4), shape)
    made = model_input(volume, "case", recipe, dataset=False)
    window = normalise(data, encoding, recipe.hu_window)
    expected = at_once(window, size, labels=False).astype(np.float16)
    assert made.encoding == encoding and made.image.dtype == np.float16
    assert made.image.tobytes() == expected.tobytes()
    assert window[:SLAB_SLICES].min() > window.min()  # a slab's own minimum would differ
    assert normalised_min(data, encoding, recipe.hu_window) == window.min()


@pytest.mark.parametrize(("shape", "size"), [((40, 37, 53), 64), ((21, 64, 50), 32)])
def test_labels_to_square_in_slabs_is_the_whole_stack_at_once(shape, size) -> None:
    labels = np.random.default_rng(1).integers(0, 4, shape).astype(np.uint8)
    square = to_square(labels, size, labels=True)
    assert square.dtype == np.uint8 and shape[0] > SLAB_SLICES
    np.testing.assert_array_equal(square, at_once(labels, size, labels=True))


def test_both_encodings_map_the_same_hu_to_the_same_value() -> None:
    hu = np.array([-1250.0, -1000.0, -500.0, 0.0, 250.0], dtype=np.float32)
    low, high = UINT8_WINDOW_HU
    encoded = np.round((hu - low) / (high - low) * 255).astype(np.uint8)
    window = (-1000.0, 100.0)
    from_hu = normalise(hu.astype(np.int16), HU, window)
    from_uint8 = normalise(encoded, UINT8, window)
    assert from_hu.tolist() == pytest.approx([0.0, 0.0, 500 / 1100, 1000 / 1100, 1.0])
    assert np.abs(from_uint8 - from_hu).max() <= (high - low) / 255 / (window[1] - window[0])


class LeftSideDetector(torch.nn.Module):
    """Four maps; the 'left lung' map fires on the image's right half (where the patient's left
    lies), the 'right lung' map on the left half. Flipping the input must swap them back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right_half = (torch.arange(x.shape[-1]) >= x.shape[-1] // 2).float().expand_as(x)
        return torch.cat([torch.zeros_like(x), 5 * right_half, 5 * (1 - right_half), -5 + 0 * x], 1)


def test_flip_tta_swaps_the_lung_channels_back() -> None:
    image = np.zeros((1, 8, 8), np.float32)
    options = InferenceOptions(tta_flip=True, precision="fp32")
    plain = predict_volume(
        LeftSideDetector(), image, CPU, options=InferenceOptions(precision="fp32")
    )
    tta = predict_volume(LeftSideDetector(), image, CPU, options=options, mirror=(0, 2, 1, 3))
    unswapped = predict_volume(LeftSideDetector(), image, CPU, options=options)
    assert np.allclose(tta, plain, atol=1e-6)  # the mirrored pass agrees once swapped
    assert not np.allclose(unswapped, plain, atol=0.1)  # without the swap the sides blur


class Constant(torch.nn.Module):
    """One logit map: +5 where the input is above 0.5, else -5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x > 0.5, 5.0, -5.0)


def test_validation_dice_of_known_masks() -> None:
    from covidseg.config import LossParams
    from covidseg.training.losses import SegmentationLoss

    image = np.zeros((2, 8, 8), np.float16)
    image[0, :4, :4] = 1  # predicted: 16 voxels
    mask = np.zeros((2, 8, 8), np.uint8)
    mask[0, :4, :2] = 1  # reference: 8 voxels, all inside the prediction
    cases: dict[str, dict[str, np.ndarray]] = {"a": {"image": image, "mask": mask}}
    loss_fn = SegmentationLoss(LossParams(), INFECTION.classes)
    _, dices = validate(
        Constant(),
        cases,
        loss_fn,
        device=CPU,
        batch_size=1,
        bf16=False,
        infection_label=INFECTION.infection,
        threshold=0.5,
    )
    assert dices["a"] == pytest.approx(2 * 8 / (16 + 8))
    _, strict = validate(
        Constant(),
        cases,
        loss_fn,
        device=CPU,
        batch_size=2,
        bf16=False,
        infection_label=INFECTION.infection,
        threshold=0.999,  # sigmoid(5) = 0.9933: nothing passes
    )
    assert strict["a"] == 0.0
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0
