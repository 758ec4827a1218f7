"""The `evaluate` stage: per-case 3D metrics on the original voxel grid, figures, tracking.

Each test case is predicted slice by slice on the stored grid; probabilities are resampled
back to the case's original grid (undoing the resize and square padding) before
thresholding, and compared there with the reference mask read from the raw NIfTI, using the
header spacing.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from covidseg.atomic import atomic_dir, write_json_atomic, write_text_atomic
from covidseg.config import Params
from covidseg.data.labels import LEFT_LUNG, RIGHT_LUNG, LabelScheme, target_mask
from covidseg.data.splits import load_splits
from covidseg.data.store import CaseMeta, read_arrays, read_meta
from covidseg.data.transforms import Grid
from covidseg.data.volumes import CaseFiles, find_cases, load_case
from covidseg.errors import CovidSegError
from covidseg.evaluation.metrics import CaseMetrics, Spacing, Summary, case_metrics, summarise
from covidseg.inference.segment import InferenceOptions, Segmentation, segment
from covidseg.reporting.figures import overlay_slices, per_case_bar, pick_slices, training_curves
from covidseg.reporting.severity import severity
from covidseg.tracking import Tracker
from covidseg.training.model import resolve_device
from covidseg.training.modelio import ModelSpec, load_model


class LungInfectionMetrics(CaseMetrics):
    """`score_case` of a lung + infection model: the infection's `CaseMetrics`, each lung's
    Dice and NSD, and the share of each lung infected in the reference and the prediction."""

    left_lung_dice: float
    left_lung_nsd: float
    right_lung_dice: float
    right_lung_nsd: float
    left_lung_infected_pct_ref: float
    right_lung_infected_pct_ref: float
    left_lung_infected_pct_pred: float
    right_lung_infected_pct_pred: float


class CaseRow(CaseMetrics):
    """One test case's row of `per_case.csv`, `case` first (a lung + infection model's rows
    hold `LungInfectionMetrics`)."""

    case: str


@dataclass(frozen=True)
class EvalPaths:
    data_dir: Path
    raw_dir: Path
    splits: Path
    model_dir: Path
    metrics: Path
    per_case: Path
    reports: Path
    train_log: Path | None = None


def inference_options(params: Params) -> InferenceOptions:
    """How evaluate runs the model: `evaluate` params and the runtime batch size."""
    ep = params.evaluate
    return InferenceOptions(
        batch_size=params.runtime.eval_batch_size,
        tta_flip=ep.tta_flip,
        threshold=ep.threshold,
        precision=ep.precision,
    )


def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Spacing, scheme: LabelScheme, *, params: Params
) -> CaseMetrics | LungInfectionMetrics:
    """Infection metrics as the headline; per-class metrics too for the lung + infection model."""
    ep = params.evaluate
    row = case_metrics(
        pred == scheme.infection, ref == scheme.infection, spacing, ep.nsd_tolerance_mm
    )
    if not scheme.multi:
        return row
    # the lung labels of the one multi-label scheme, `labels.LUNG_INFECTION`
    left, right = (
        case_metrics(pred == label, ref == label, spacing, ep.lung_nsd_tolerance_mm)
        for label in (LEFT_LUNG, RIGHT_LUNG)
    )
    ref_left, ref_right = involvement(ref, spacing, scheme)
    pred_left, pred_right = involvement(pred, spacing, scheme)
    return {
        **row,
        "left_lung_dice": left["dice"],
        "left_lung_nsd": left["nsd"],
        "right_lung_dice": right["dice"],
        "right_lung_nsd": right["nsd"],
        "left_lung_infected_pct_ref": ref_left,
        "right_lung_infected_pct_ref": ref_right,
        "left_lung_infected_pct_pred": pred_left,
        "right_lung_infected_pct_pred": pred_right,
    }


def involvement(labels: np.ndarray, spacing: Spacing, scheme: LabelScheme) -> tuple[float, float]:
    """Percentage of the left and of the right lung infected."""
    report = severity(labels, spacing, scheme)
    return report["left_lung_infected_pct"], report["right_lung_infected_pct"]


def write_per_case(path: Path, rows: list[CaseRow]) -> None:
    """`metrics/per_case.csv`: one row per test case, `case` first."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if _missing(v) else v for k, v in row.items()})
    write_text_atomic(path, buffer.getvalue())


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def reference_files(raw_dir: Path, cases: list[str]) -> dict[str, CaseFiles]:
    """The raw files of each test case (its reference mask is read when it is scored)."""
    files = {c.name: c for c in find_cases(raw_dir)}
    missing = [case for case in cases if case not in files]
    if missing:
        raise CovidSegError(f"test cases missing from {raw_dir}: {', '.join(missing)}")
    return {case: files[case] for case in cases}


def predict_stored(
    model: torch.nn.Module,
    image: np.ndarray,
    meta: CaseMeta,
    *,
    spec: ModelSpec,
    options: InferenceOptions,
    device: torch.device,
) -> Segmentation:
    """Labels of one prepared case's stored image, through the inference path of `predict`
    (`evaluate` never crops; under `evaluate.precision: int8` it takes predict's int8 path,
    imported only then: see `covidseg.inference.paths`)."""
    _, rows, cols = meta.original_shape
    grid = Grid(rows, cols)
    if options.precision == "int8":
        from covidseg.inference.paths import segment_scan

        return segment_scan(model, image, grid, scheme=spec.scheme, options=options, device=device)
    return segment(model, image, grid, scheme=spec.scheme, options=options, device=device)


def evaluate_case(
    case: str,
    model: torch.nn.Module,
    spec: ModelSpec,
    *,
    params: Params,
    paths: EvalPaths,
    files: CaseFiles,
    device: torch.device,
) -> CaseRow:
    """Predict, score and draw one test case."""
    store = paths.data_dir / f"{case}.h5"
    if not store.exists():
        raise CovidSegError(f"no prepared store for test case {case} in {paths.data_dir}")
    arrays, meta = read_arrays(store), read_meta(store)
    options = inference_options(params)
    seg = predict_stored(model, arrays["image"], meta, spec=spec, options=options, device=device)
    scheme = spec.scheme
    ref = target_mask(load_case(files).masks, scheme, case)[0]
    if ref.shape != seg.labels.shape:
        raise CovidSegError(
            f"{case}: store and raw volume disagree ({seg.labels.shape} vs {ref.shape})"
        )
    scores = score_case(seg.labels, ref, meta.original_spacing, scheme, params=params)
    row: CaseRow = {"case": case, **scores}
    overlay_slices(
        arrays["image"].astype(np.float32),
        arrays["mask"],
        seg.stored,
        slices=pick_slices(arrays["mask"] == scheme.infection),
        title=f"{case}: Dice {row['dice']:.3f}, NSD {row['nsd']:.3f}",
        path=paths.reports / "overlays" / f"{case}.png",
        scheme=scheme,
    )
    return row


def evaluate(params: Params, paths: EvalPaths, *, fold: int = 0) -> Summary:
    """Score every test case of `fold`; write metrics JSON, per-case CSV and figures; track the
    fold's run (its model logged there; `aggregate` registers the ensemble of all folds)."""
    test = load_splits(paths.splits, fold).get("test") or []
    if not test:
        raise CovidSegError(f"{paths.splits}: no test cases in fold {fold}")
    device = resolve_device(params.runtime.device)
    model, spec = load_model(paths.model_dir, device)
    files = reference_files(paths.raw_dir, test)
    rows: list[CaseRow] = []
    with atomic_dir(paths.reports) as reports:
        (reports / "overlays").mkdir()
        tmp_paths = EvalPaths(**{**paths.__dict__, "reports": reports})
        for case in tqdm(test, desc="evaluate", unit="case"):
            rows.append(
                evaluate_case(
                    case,
                    model,
                    spec,
                    params=params,
                    paths=tmp_paths,
                    files=files[case],
                    device=device,
                )
            )
        per_case_bar(rows, "dice", reports / "per_case_dice.png", "Per-case 3D Dice (test)")
        if paths.train_log and paths.train_log.exists():
            training_curves(read_log(paths.train_log), reports / "training_curves.png")
    keys = tuple(k for k in rows[0] if k != "case")
    summary: Summary = {
        "fold": fold,
        **summarise(rows, keys),
        "threshold": params.evaluate.threshold,
        "nsd_tolerance_mm": params.evaluate.nsd_tolerance_mm,
    }
    write_json_atomic(paths.metrics, summary)
    write_per_case(paths.per_case, rows)
    track(params, paths, spec, model, summary=summary, fold=fold)
    return summary


def read_log(path: Path) -> list[dict[str, float | None]]:
    """The per-epoch CSV written by training, numbers parsed (empty cells -> None)."""
    with path.open() as f:
        return [{k: float(v) if v else None for k, v in row.items()} for row in csv.DictReader(f)]


def track(
    params: Params,
    paths: EvalPaths,
    spec: ModelSpec,
    model: torch.nn.Module,
    *,
    summary: Summary,
    fold: int,
) -> None:
    """Add test metrics, artifacts and the fold's model to the fold's training run."""
    tracker = Tracker.start(params, run_id=spec.run_id, stage="evaluate", fold=fold)
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))})
    for path, folder in (
        (Path("params.yaml"), None),
        (paths.per_case, "evaluation"),
        (paths.metrics, "evaluation"),
        (paths.reports, "evaluation"),
    ):
        if path.exists():
            tracker.log_artifact(path, folder)
    example = np.zeros((1, 1, spec.image_size, spec.image_size), dtype=np.float32)
    tracker.log_model(
        model.cpu(), example, registered_name=None, alias=None, metadata=spec.to_json()
    )
    tracker.end()
