"""The dataset's two intensity encodings, Hounsfield units, and the normalising window.

coronacases_* volumes hold Hounsfield units (int16). The radiopaedia_* volumes were clipped by
the dataset authors to the lung window [-1250, 250] HU and rescaled to uint8 0-255. Both are
mapped back to HU first, then one window from params maps HU to [0, 1], so that the same
tissue gets the same value whatever the source.
"""

from __future__ import annotations

import numpy as np

from covidseg.errors import CovidSegError

HU = "hu"
UINT8 = "uint8"
UINT8_WINDOW_HU = (-1250.0, 250.0)
_EXPECTED_BY_PREFIX = {"coronacases_": HU, "radiopaedia_": UINT8}


def detect_encoding(data: np.ndarray, case: str) -> str:
    """Tell the encoding from the values: 0..255 is the uint8 window, negatives are HU."""
    low, high = float(np.min(data)), float(np.max(data))
    if low >= 0 and high <= 255:
        return UINT8
    if low < 0:
        return HU
    raise CovidSegError(
        f"{case}: cannot tell the intensity encoding (values {low:g}..{high:g} are neither "
        "Hounsfield units, which reach below 0 in air, nor the 0-255 lung-window encoding)"
    )


def expected_encoding(case: str) -> str | None:
    """The encoding the dataset's naming implies, or None for a name it does not cover."""
    for prefix, encoding in _EXPECTED_BY_PREFIX.items():
        if case.startswith(prefix):
            return encoding
    return None


def check_encoding(data: np.ndarray, case: str, *, dataset: bool = True) -> str:
    """Detect the encoding; a dataset volume (`prepare`) whose values disagree with its name is
    refused. A scan of the user's (`dataset=False`: `predict`) is judged by its values alone,
    whatever its name."""
    found = detect_encoding(data, case)
    expected = expected_encoding(case) if dataset else None
    if expected is not None and expected != found:
        raise CovidSegError(
            f"{case}: values look like the {found!r} encoding but the dataset stores "
            f"{expected!r} for this name (range {np.min(data):g}..{np.max(data):g})"
        )
    return found


def to_hu(data: np.ndarray, encoding: str) -> np.ndarray:
    """Convert stored values to Hounsfield units (float32)."""
    hu = data.astype(np.float32, copy=True)
    if encoding == UINT8:
        low, high = UINT8_WINDOW_HU
        hu *= (high - low) / 255.0
        hu += low
    elif encoding != HU:
        raise ValueError(f"unknown encoding {encoding!r}")
    return hu


def window(hu: np.ndarray, hu_window: tuple[float, float]) -> np.ndarray:
    """Clip HU to the window and scale it to [0, 1], in place where possible (float32)."""
    low, high = hu_window
    out = np.clip(hu, low, high, out=hu if hu.dtype == np.float32 else None)
    out -= low
    out *= 1.0 / (high - low)
    return out


def normalise(data: np.ndarray, encoding: str, hu_window: tuple[float, float]) -> np.ndarray:
    """Stored values -> HU -> [0, 1] under `hu_window`."""
    return window(to_hu(data, encoding), hu_window)


def normalised_min(data: np.ndarray, encoding: str, hu_window: tuple[float, float]) -> float:
    """`normalise(data).min()` without normalising the volume: every step of `normalise` is
    monotone, so the same float32 operations on the stored minimum give the same value."""
    return float(normalise(np.min(data, keepdims=True), encoding, hu_window).min())
