"""Report figures: CT overlays, per-case metric bars and training curves, written as PNG.

Figures are drawn on `matplotlib.figure.Figure` objects with the Agg canvas and never through
pyplot, so no display is needed, the process-wide backend is left alone and nothing stays
open after saving. Sizes are fixed at `DPI` dots per inch (see each function), so the PNGs of
a rerun have the same pixel size.

Overlays follow the canonical orientation (slice, row, col) = (Superior, Posterior, Left): an
axial slice is shown as radiologists read it, anterior at the top and the patient's right on
the viewer's left (marked R / L).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from covidseg.atomic import atomic_file
from covidseg.data.labels import INFECTION, LUNG_INFECTION, LabelScheme

DPI = 100
PANEL_INCHES = 4.0  # overlay panel side
OVERLAY_EXTRA_INCHES = 0.8  # overlay title, captions and legend
BAR_HEIGHT_INCHES = 4.5
CURVES_INCHES = (11.0, 4.2)

REF_COLOUR, PRED_COLOUR = "#2ca02c", "#e377c2"
REF_LUNG_COLOUR, PRED_LUNG_COLOUR = "#17becf", "#ff7f0e"
BAR_COLOUR, TRAIN_COLOUR, VAL_COLOUR = "#4c72b0", "#4c72b0", "#dd8452"
DICE_COLOUR, BEST_COLOUR = "#55a868", "#c44e52"
FILL_ALPHA = 0.35
METRIC_LABELS = {
    "dice": "Dice",
    "iou": "IoU",
    "nsd": "NSD",
    "hd95": "HD95 (mm)",
    "sensitivity": "Sensitivity",
    "precision": "Precision",
    "ref_volume_ml": "Reference volume (mL)",
    "pred_volume_ml": "Predicted volume (mL)",
}


def _save(fig: Figure, path: Path) -> Path:
    """Write `fig` as PNG at `DPI` (parents created) and release it."""
    try:
        with atomic_file(path) as tmp, tmp.open("wb") as f:  # never half a picture
            FigureCanvasAgg(fig).print_png(f, metadata={"Software": None})
    finally:
        fig.clear()
    return path


def guess_scheme(*masks: np.ndarray | None) -> LabelScheme:
    """For masks of unknown origin only: lungs + infection when a value above 1 is present.
    Callers that know the model pass its scheme instead."""
    top = max((int(m.max()) for m in masks if m is not None and m.size), default=0)
    return LUNG_INFECTION if top > 1 else INFECTION


def pick_slices(reference: np.ndarray, n: int = 2) -> list[int]:
    """Slices to show, most infected first: for n=2 the most and the least (non-zero) infected.

    `reference` is read as a boolean (slices, H, W) infection mask; more than two picks spread
    evenly over the infected slices ranked by area. Without infection: the middle slice.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    area = np.count_nonzero(reference.reshape(reference.shape[0], -1), axis=1)
    infected = np.flatnonzero(area)
    if infected.size == 0:
        return [reference.shape[0] // 2]
    ranked = infected[np.argsort(-area[infected], kind="stable")]
    ranks = np.round(np.linspace(0, ranked.size - 1, min(n, ranked.size))).astype(int)
    return [int(ranked[r]) for r in dict.fromkeys(ranks.tolist())]


def _fill(ax: Axes, mask: np.ndarray, colour: str) -> None:
    """Translucent filled overlay of a boolean slice."""
    rgba = np.zeros((*mask.shape, 4), dtype=np.float32)
    rgba[mask] = to_rgba(colour, FILL_ALPHA)
    ax.imshow(rgba, interpolation="nearest")


def _outline(
    ax: Axes, mask: np.ndarray, colour: str, width: float, *, style: str = "solid"
) -> None:
    """Contour of a boolean slice (nothing when it is empty)."""
    if mask.any():
        ax.contour(
            mask.astype(np.float32),
            levels=[0.5],
            colors=[colour],
            linewidths=width,
            linestyles=style,
        )


def _draw_masks(ax: Axes, mask: np.ndarray, scheme: LabelScheme, reference: bool) -> None:
    """Reference: infection filled + outlined; prediction: outlined. Lung fields thin, dashed."""
    infection = mask == scheme.infection
    lungs = mask > 0 if scheme.multi else np.zeros_like(infection)
    if reference:
        _fill(ax, infection, REF_COLOUR)
        _outline(ax, infection, REF_COLOUR, 1.2)
        _outline(ax, lungs, REF_LUNG_COLOUR, 0.8, style="dashed")
    else:
        _outline(ax, infection, PRED_COLOUR, 1.4)
        _outline(ax, lungs, PRED_LUNG_COLOUR, 0.8, style="dotted")


def _legend_handles(has_ref: bool, has_pred: bool, multi: bool) -> list[Artist]:
    """Legend entries for what the overlay shows."""
    handles: list[Artist] = []
    if has_ref:
        handles.append(
            Patch(
                facecolor=to_rgba(REF_COLOUR, FILL_ALPHA),
                edgecolor=REF_COLOUR,
                label="reference infection",
            )
        )
    if has_pred:
        handles.append(Line2D([], [], color=PRED_COLOUR, lw=1.4, label="predicted infection"))
    if multi and has_ref:
        handles.append(
            Line2D([], [], color=REF_LUNG_COLOUR, lw=0.8, ls="--", label="reference lungs")
        )
    if multi and has_pred:
        handles.append(
            Line2D([], [], color=PRED_LUNG_COLOUR, lw=0.8, ls=":", label="predicted lungs")
        )
    return handles


def _caption(k: int, masks: Mapping[str, np.ndarray | None], infection: int) -> str:
    """'slice k: ref N px, pred M px' (infection pixels; absent masks left out)."""
    counts = [
        f"{name} {int(np.count_nonzero(m[k] == infection))} px"
        for name, m in masks.items()
        if m is not None
    ]
    return f"slice {k}: " + ", ".join(counts) if counts else f"slice {k}"


def _panel(
    ax: Axes,
    image: np.ndarray,
    masks: Mapping[str, np.ndarray | None],
    k: int,
    *,
    scheme: LabelScheme,
) -> None:
    """One axial slice: grey CT, masks on top, side markers and caption."""
    ax.imshow(image[k].astype(np.float32), cmap="gray", vmin=0.0, vmax=1.0)
    for name, mask in masks.items():
        if mask is not None:
            _draw_masks(ax, mask[k], scheme, reference=name == "ref")
    for x, side in ((0.02, "R"), (0.98, "L")):
        ax.text(
            x,
            0.5,
            side,
            transform=ax.transAxes,
            ha="center",
            va="center",
            color="white",
            fontsize=11,
            fontweight="bold",
            alpha=0.8,
        )
    ax.set_title(_caption(k, masks, scheme.infection), fontsize=10)
    ax.set_axis_off()


def overlay_slices(
    image: np.ndarray,
    reference: np.ndarray | None,
    prediction: np.ndarray | None,
    *,
    slices: list[int],
    title: str,
    path: Path,
    scheme: LabelScheme | None = None,
) -> Path:
    """One panel per slice index: CT in grey, reference filled + outlined, prediction outlined.

    `image` is (slices, H, W) in [0, 1]; masks are uint8 labels of `scheme` (guessed from the
    values when None); either mask may be None. Pixel
    size: (PANEL_INCHES x len(slices), PANEL_INCHES + OVERLAY_EXTRA_INCHES) x DPI.
    """
    if not slices:
        raise ValueError("no slices to show")
    masks = {"ref": reference, "pred": prediction}
    scheme = scheme or guess_scheme(reference, prediction)
    size = (PANEL_INCHES * len(slices), PANEL_INCHES + OVERLAY_EXTRA_INCHES)
    fig = Figure(figsize=size, dpi=DPI, layout="constrained")
    for ax, k in zip(fig.subplots(1, len(slices), squeeze=False)[0], slices, strict=True):
        _panel(ax, image, masks, k, scheme=scheme)
    fig.suptitle(title, fontsize=13, fontweight="bold")
    handles = _legend_handles(reference is not None, prediction is not None, scheme.multi)
    if handles:
        fig.legend(
            handles=handles,
            loc="outside lower center",
            ncols=len(handles),
            frameon=False,
            fontsize=10,
        )
    return _save(fig, path)


def _value(row: Mapping[str, object], key: str) -> float:
    """row[key] as a float; NaN when missing, empty or None."""
    raw = row.get(key)
    if raw is None or raw == "":
        return math.nan
    return float(raw) if isinstance(raw, int | float | str) else math.nan


def _missing_bars(ax: Axes, start: int, count: int, height: float) -> None:
    """Hatched empty bars labelled n/a for cases without a value."""
    x = range(start, start + count)
    bars = ax.bar(x, [height] * count, width=0.7, fill=False, hatch="///", edgecolor="0.6")
    ax.bar_label(bars, labels=["n/a"] * count, fontsize=8, padding=2)


def per_case_bar(
    rows: Sequence[Mapping[str, object]], metric: str, path: Path, title: str = ""
) -> Path:
    """Bars of `metric` per case, highest first, value labels, the mean as a dashed line.

    Cases without a value (NaN) come last as hatched empty bars labelled n/a. Pixel size:
    (max(6, 0.45 x cases + 2), BAR_HEIGHT_INCHES) x DPI.
    """
    if not rows:
        raise ValueError("no cases to plot")
    pairs = [(str(row["case"]), _value(row, metric)) for row in rows]
    finite = sorted((p for p in pairs if not math.isnan(p[1])), key=lambda p: -p[1])
    missing = sorted(p for p in pairs if math.isnan(p[1]))
    width = max(6.0, 0.45 * len(pairs) + 2.0)
    fig = Figure(figsize=(width, BAR_HEIGHT_INCHES), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    values = [v for _, v in finite]
    top = max(values, default=1.0) or 1.0
    fmt = "{:.3f}" if top <= 1.5 else "{:.1f}"
    bars = ax.bar(range(len(values)), values, color=BAR_COLOUR, width=0.7)
    for text in ax.bar_label(bars, fmt=fmt, fontsize=8, padding=2):
        text.set_bbox({"facecolor": "white", "edgecolor": "none", "pad": 0.5})  # over the mean
    if missing:
        _missing_bars(ax, len(values), len(missing), top)
    if values:
        mean = float(np.mean(values))
        ax.axhline(
            mean, color="0.2", ls="--", lw=1.2, label=f"mean {fmt.format(mean)} (n={len(values)})"
        )
        ax.legend(frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0))
    label = METRIC_LABELS.get(metric, metric)
    ax.set_xticks(range(len(pairs)), [c for c, _ in finite + missing], rotation=45, ha="right")
    ax.set_ylim(0.0, top * 1.12)
    ax.set_ylabel(label)
    ax.set_title(title or f"{label} per case", fontsize=12, fontweight="bold", loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    return _save(fig, path)


def _series(log: Sequence[Mapping[str, object]], key: str) -> np.ndarray:
    """Column `key` of the log as floats, NaN where missing."""
    return np.array([_value(row, key) for row in log], dtype=float)


def _mark_best(axes: Sequence[Axes], epochs: np.ndarray, dice: np.ndarray) -> str:
    """Star the best validation Dice, dot its epoch on every panel; returns a caption."""
    best = int(np.nanargmax(dice))
    for ax in axes:
        ax.axvline(epochs[best], color="0.4", ls=":", lw=1.2)
    axes[-1].plot(epochs[best], dice[best], marker="*", ms=15, color=BEST_COLOUR, ls="none")
    return f"best {dice[best]:.3f} at epoch {epochs[best]:g}"


def training_curves(log: Sequence[Mapping[str, object]], path: Path) -> Path:
    """Losses (left) and validation Dice (right) per epoch, the best-Dice epoch marked.

    Rows look like {"epoch": 1, "train_loss": .., "val_loss": .., "val_dice": ..} (values may
    be strings, as read from CSV; missing ones are skipped). Pixel size: CURVES_INCHES x DPI.
    """
    if not log:
        raise ValueError("empty training log")
    epochs = _series(log, "epoch")
    fig = Figure(figsize=CURVES_INCHES, dpi=DPI, layout="constrained")
    ax_loss, ax_dice = fig.subplots(1, 2)
    style = {"marker": "o" if len(log) <= 40 else None, "ms": 3, "lw": 1.5}
    for key, name, colour in (
        ("train_loss", "train", TRAIN_COLOUR),
        ("val_loss", "validation", VAL_COLOUR),
    ):
        values = _series(log, key)
        if np.isfinite(values).any():
            ax_loss.plot(epochs, values, color=colour, label=name, **style)
    dice, dice_title = _series(log, "val_dice"), "Validation Dice"
    if np.isfinite(dice).any():
        ax_dice.plot(epochs, dice, color=DICE_COLOUR, **style)
        ax_dice.margins(y=0.1)
        dice_title += f" ({_mark_best((ax_loss, ax_dice), epochs, dice)})"
    for ax, name, ylabel in ((ax_loss, "Loss", "loss"), (ax_dice, dice_title, "Dice")):
        ax.set(xlabel="epoch", ylabel=ylabel)
        ax.set_title(name, fontsize=12, fontweight="bold")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
    if ax_loss.get_legend_handles_labels()[0]:
        ax_loss.legend(frameon=False, loc="best")
    return _save(fig, path)


REPORT_INCHES = (8.27, 8.5)  # A4 width
SERIES_UIDS = (
    ("study_instance_uid", "Study Instance UID "),
    ("series_instance_uid", "Series Instance UID"),
)
REPORT_ROWS = (
    ("lesion_volume_ml", "Lesion volume", "{:.1f} mL"),
    ("slices_involved", "Slices with infection", "{:d}"),
    ("left_lung_volume_ml", "Left lung volume", "{:.0f} mL"),
    ("left_lung_infected_pct", "Left lung infected", "{:.1f} %"),
    ("left_lung_grade", "Left lung extent grade (0-4)", "{:d}"),
    ("right_lung_volume_ml", "Right lung volume", "{:.0f} mL"),
    ("right_lung_infected_pct", "Right lung infected", "{:.1f} %"),
    ("right_lung_grade", "Right lung extent grade (0-4)", "{:d}"),
    ("total_grade", "Total extent grade (0-8)", "{:d}"),
)


def _report_lines(report: Mapping[str, object]) -> list[tuple[str, str]]:
    """(label, formatted value) for each severity number the report holds."""
    lines = []
    for key, label, fmt in REPORT_ROWS:
        value = report.get(key)
        if value is None:
            continue
        is_nan = isinstance(value, float) and math.isnan(value)
        lines.append((label, "n/a" if is_nan else fmt.format(value)))
    return lines


def _cell(value: object) -> str:
    """A table cell: floats to 3 decimals, missing values as n/a."""
    if value is None:
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def report_page(
    report: Mapping[str, object],
    image: np.ndarray,
    labels: np.ndarray,
    *,
    slices: list[int],
    path: Path,
    scheme: LabelScheme,
) -> Path:
    """One page: title, severity table, model identity and prediction overlays."""
    fig = Figure(figsize=REPORT_INCHES, dpi=DPI, layout="constrained")
    top, bottom = cast(np.ndarray, fig.subfigures(2, 1, height_ratios=(0.75, 1.0)))
    uids = [f"{label} {report[key]}" for key, label in SERIES_UIDS if report.get(key)]
    title = "Infection report" + ("" if uids else f": {report.get('case', '')}")
    top.suptitle(title, fontsize=15, fontweight="bold")
    if uids:  # a DICOM input: its series named at the foot, nothing else of its header
        fig.supxlabel("\n".join(uids), fontsize=8, family="monospace")
    ax = top.subplots()
    ax.set_axis_off()
    model = report.get("model")
    identity = model.items() if isinstance(model, Mapping) else ()
    rows = _report_lines(report) + [("", "")] + [(f"Model {k}", _cell(v)) for k, v in identity]
    table = ax.table(
        cellText=[[a, b] for a, b in rows],
        colWidths=(0.55, 0.45),
        loc="upper center",
        cellLoc="left",
        edges="horizontal",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    table.scale(1, 1.3)
    axes = bottom.subplots(1, len(slices), squeeze=False)[0]
    for axis, k in zip(axes, slices, strict=True):
        _panel(axis, image, {"pred": labels}, k, scheme=scheme)
    handles = _legend_handles(False, True, scheme.multi)
    bottom.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)
    bottom.suptitle("Predicted infection on the most and least involved slices", fontsize=11)
    return _save(fig, path)


BENCHMARK_INCHES = (9.0, 4.2)
PUBLISHED_COLOUR = "#c44e52"


def benchmark_figure(
    folds: Mapping[str, Mapping[str, float | None]],
    published: Mapping[str, object] | None,
    path: Path,
) -> Path:
    """Per-fold Dice and NSD (mean ± std over the fold's cases) as bars, the published per-fold
    means as red diamonds where the protocol has them. Pixel size: BENCHMARK_INCHES x DPI."""
    fig = Figure(figsize=BENCHMARK_INCHES, dpi=DPI, layout="constrained")
    reference = published.get("folds", {}) if published else {}
    assert isinstance(reference, Mapping)
    names = list(folds)
    for ax, metric, label in zip(fig.subplots(1, 2), ("dice", "nsd"), ("Dice", "NSD"), strict=True):
        means = [_value(folds[k], metric) for k in names]
        stds = [_value(folds[k], f"{metric}_std") for k in names]
        x = np.arange(len(names))
        ax.bar(
            x,
            np.nan_to_num(means),
            yerr=np.nan_to_num(stds),
            color=BAR_COLOUR,
            width=0.6,
            capsize=4,
            label="this run (mean ± std)",
        )
        pub = [reference.get(k, {}).get(metric, [math.nan])[0] for k in names]
        if any(not math.isnan(v) for v in pub):
            ax.plot(x, pub, "D", color=PUBLISHED_COLOUR, ms=8, label="published 3D U-Net")
        ax.set_xticks(x, [f"Fold{k}" for k in names])
        ax.set_ylim(0.0, 1.2)  # room for the legend above a bar near 1
        ax.set_title(f"Infection {label} per fold", fontsize=12, fontweight="bold", loc="left")
        ax.spines[["top", "right"]].set_visible(False)
        ax.legend(frameon=False, loc="upper right", fontsize=8)
    return _save(fig, path)
