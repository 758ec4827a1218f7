"""Report figures: PNG sizes, what the overlays draw where, slice picks, bar order, best epoch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from covidseg.reporting.figures import (
    BAR_HEIGHT_INCHES,
    CURVES_INCHES,
    DPI,
    OVERLAY_EXTRA_INCHES,
    PANEL_INCHES,
    overlay_slices,
    per_case_bar,
    pick_slices,
    training_curves,
)


def _png(path: Path) -> np.ndarray:
    assert path.stat().st_size > 0
    return imread(path)[..., :3]


def _size(inches: tuple[float, float]) -> tuple[int, int]:
    """(rows, cols) of a PNG of `inches` (width, height) at DPI."""
    return round(inches[1] * DPI), round(inches[0] * DPI)


def _near(pixels: np.ndarray, colour: str, tol: float = 0.03) -> np.ndarray:
    return np.all(np.abs(pixels - np.array(to_rgb(colour))) < tol, axis=-1)


def _phantom() -> tuple[np.ndarray, np.ndarray]:
    image = np.full((3, 64, 64), 0.3, dtype=np.float16)
    mask = np.zeros((3, 64, 64), np.uint8)
    mask[1, 36:60, 4:26] = 1  # lower left quarter of slice 1
    return image, mask


@pytest.mark.parametrize("n_slices", [1, 3])
def test_overlay_has_one_panel_width_per_slice(tmp_path: Path, n_slices: int) -> None:
    image, mask = _phantom()
    path = overlay_slices(
        image, mask, mask, slices=list(range(n_slices)), title="case", path=tmp_path / "o.png"
    )
    expected = _size((PANEL_INCHES * n_slices, PANEL_INCHES + OVERLAY_EXTRA_INCHES))
    assert _png(path).shape[:2] == expected


@pytest.mark.parametrize("which", ["reference", "prediction"])
def test_overlay_draws_a_mask_only_where_it_is(tmp_path: Path, which: str) -> None:
    image, mask = _phantom()
    empty = np.zeros_like(mask)

    def render(m: np.ndarray, name: str) -> np.ndarray:
        reference, prediction = (m, None) if which == "reference" else (None, m)
        return _png(
            overlay_slices(
                image, reference, prediction, slices=[1], title="t", path=tmp_path / name
            )
        )

    diff = np.any(np.abs(render(mask, "with.png") - render(empty, "without.png")) > 0.05, axis=-1)
    rows, cols = diff.shape
    body = diff[rows // 5 :]  # below the title and the caption (whose counts differ)
    assert body[:, : cols // 2].sum() > 100  # the mask, left half of the panel
    assert body[:, cols // 2 :].sum() == 0
    assert body[: rows // 2 - rows // 5].sum() == 0  # nothing in the upper half of the slice


def test_overlay_accepts_multi_label_and_missing_masks(tmp_path: Path) -> None:
    image, mask = _phantom()
    labels = mask * 3
    labels[:, 10:50, 2:30] = np.where(labels[:, 10:50, 2:30] == 0, 2, labels[:, 10:50, 2:30])
    overlay_slices(image, labels, None, slices=[1], title="ref only", path=tmp_path / "a.png")
    overlay_slices(image, None, labels, slices=[1], title="pred only", path=tmp_path / "b.png")
    plain = _png(
        overlay_slices(image, None, None, slices=[1], title="image", path=tmp_path / "c.png")
    )
    assert not np.array_equal(_png(tmp_path / "a.png"), plain)
    with pytest.raises(ValueError, match="no slices"):
        overlay_slices(image, mask, None, slices=[], title="none", path=tmp_path / "d.png")


def test_pick_slices_most_and_least_infected() -> None:
    areas = [0, 5, 0, 50, 20, 1, 0]
    mask = np.zeros((len(areas), 10, 10), bool)
    for k, area in enumerate(areas):
        mask[k].flat[:area] = True
    assert pick_slices(mask) == [3, 5]
    assert pick_slices(mask, n=1) == [3]
    assert pick_slices(mask, n=3) == [3, 1, 5]  # ranks 0, 2, 3 of 50, 20, 5, 1
    assert pick_slices(mask, n=10) == [3, 4, 1, 5]
    assert pick_slices(np.zeros((7, 4, 4), bool)) == [3]


def test_per_case_bar_sorts_cases_and_leaves_nan_unfilled(tmp_path: Path) -> None:
    values = [0.2, float("nan"), 0.9, 0.5, 0.7]
    rows = [{"case": f"case_{i}", "dice": v} for i, v in enumerate(values)]
    pixels = _png(per_case_bar(rows, "dice", tmp_path / "bar.png", title="Dice"))
    assert pixels.shape[:2] == _size((max(6.0, 0.45 * len(rows) + 2.0), BAR_HEIGHT_INCHES))
    blue = _near(pixels, "#4c72b0")
    columns = blue.sum(axis=0)
    starts = np.flatnonzero(np.diff((columns > 0).astype(int)) == 1) + 1
    heights = [int(columns[s + 5]) for s in starts]
    assert len(heights) == 4  # the NaN case gets no filled bar
    assert heights == sorted(heights, reverse=True)
    assert heights[0] / heights[-1] == pytest.approx(0.9 / 0.2, rel=0.05)


def test_training_curves_marks_the_best_dice_epoch(tmp_path: Path) -> None:
    dice = [0.1, 0.3, 0.8, 0.6, 0.5]
    log = [
        {"epoch": str(e + 1), "train_loss": 1 / (e + 1), "val_loss": "", "val_dice": d}
        for e, d in enumerate(dice)
    ]
    pixels = _png(training_curves(log, tmp_path / "curves.png"))
    assert pixels.shape[:2] == _size(CURVES_INCHES)
    curve_cols = np.flatnonzero(_near(pixels, "#55a868").any(axis=0))
    star_cols = np.flatnonzero(_near(pixels, "#c44e52").any(axis=0))
    position = (star_cols.mean() - curve_cols[0]) / (curve_cols[-1] - curve_cols[0])
    assert position == pytest.approx(2 / 4, abs=0.05)  # epoch 3 of 1..5


def test_lung_model_overlay_is_labelled_as_lungs_even_with_one_label(tmp_path: Path) -> None:
    from covidseg.data.labels import INFECTION, LUNG_INFECTION
    from covidseg.reporting.figures import REF_LUNG_COLOUR, guess_scheme

    image = np.full((2, 64, 64), 0.3, dtype=np.float16)
    only_left = np.zeros((2, 64, 64), np.uint8)
    only_left[0, 20:44, 8:28] = 1  # a left lung and no other label
    assert guess_scheme(only_left) is INFECTION  # the guess from the values alone is wrong
    told = overlay_slices(
        image,
        only_left,
        None,
        slices=[0],
        title="t",
        path=tmp_path / "a.png",
        scheme=LUNG_INFECTION,
    )
    guessed = overlay_slices(image, only_left, None, slices=[0], title="t", path=tmp_path / "b.png")
    assert _near(_png(told), REF_LUNG_COLOUR, 0.08).sum() > 20  # the lung outline is drawn
    assert _near(_png(guessed), REF_LUNG_COLOUR, 0.08).sum() == 0
