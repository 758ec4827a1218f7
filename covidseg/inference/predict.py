"""`covidseg predict`: segment new scans with a trained model.

Per scan it writes `<case>_seg.nii.gz` (uint8 labels on the input's exact voxel grid, with the
input's affine, qform/sform and codes, so it overlays the CT in any viewer),
`<case>_report.json` (severity numbers, keys carry their unit) and a one-page
`<case>_report.png`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NotRequired, TypedDict, cast

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from covidseg.atomic import atomic_file, write_json_atomic
from covidseg.config import DeviceChoice
from covidseg.data.transforms import scan_input
from covidseg.data.volumes import Volume, case_name, read_nifti, to_disk_orientation
from covidseg.errors import CovidSegError
from covidseg.inference import paths
from covidseg.inference.ensemble import is_ensemble_folder, load_ensemble
from covidseg.inference.segment import InferenceOptions, Segmentation
from covidseg.precision import uses_bf16
from covidseg.reporting.figures import pick_slices, report_page
from covidseg.reporting.severity import Severity, severity
from covidseg.training.model import resolve_device
from covidseg.training.modelio import ModelSpec, load_model

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


class ReportedSeverity(TypedDict):
    """`Severity` as a report holds it: NaN (e.g. a lung that was not found) as null."""

    lesion_volume_ml: float | None
    slices_involved: int
    slices_total: int
    left_lung_volume_ml: NotRequired[float | None]
    left_lung_infected_pct: NotRequired[float | None]
    left_lung_grade: NotRequired[int]
    right_lung_volume_ml: NotRequired[float | None]
    right_lung_infected_pct: NotRequired[float | None]
    right_lung_grade: NotRequired[int]
    total_grade: NotRequired[int]


class ModelIdentity(TypedDict):
    """Which model made a report: where it came from and what its `ModelSpec` says."""

    source: str
    arch: str
    encoder: str
    target: str
    image_size: int
    folds: list[int]
    run_id: str | None
    best_epoch: int
    val_dice: float | None


class ScanReport(ReportedSeverity):
    """`<case>_report.json`: the scan, its severity numbers, the model and the time taken."""

    case: str
    input: str
    segmentation: str
    voxel_spacing_mm: list[float]
    model: ModelIdentity
    seconds: float


@dataclass(frozen=True)
class Predictor:
    """A model ready to run, with how to feed it and where it came from."""

    model: torch.nn.Module
    spec: ModelSpec
    source: str
    device: torch.device
    options: InferenceOptions = field(default_factory=InferenceOptions)


def load_predictor(
    ref: str, device: DeviceChoice = "auto", options: InferenceOptions | None = None
) -> Predictor:
    """A model folder, or an MLflow model URI (`models:/<name>@<alias>`, `runs:/...`)."""
    target = resolve_device(device)
    options = options or InferenceOptions()
    if ref.startswith(MLFLOW_SCHEMES):
        from covidseg.tracking import load_model as load_logged

        module, metadata = load_logged(ref)
        if not metadata:
            raise CovidSegError(f"{ref}: logged without covidseg metadata (image size, labels)")
        spec = ModelSpec.from_json(metadata, ref)
        if options.precision == "int8":
            raise CovidSegError(
                f"{ref}: precision int8 needs a model folder (a logged model is a torch.export "
                "graph, which it cannot quantize)"
            )
        if uses_bf16(target, options.precision):
            # a logged model is a torch.export graph, fixed to the fp32 it was exported in
            # (autocast cannot rewrite its dtypes); channels_last it can take
            options = replace(options, precision="fp32")
        return Predictor(module.to(target), spec, ref, target, options)
    folder = Path(ref)
    if is_ensemble_folder(folder):  # models/: every fold-<k> model, probabilities averaged
        ensemble, spec = load_ensemble(folder, target)
        return Predictor(ensemble, spec, str(ref), target, options)
    model, spec = load_model(folder, target)
    return Predictor(model, spec, str(ref), target, options)


def scan_files(inputs: list[Path]) -> tuple[list[Path], list[str]]:
    """(the scans named, folders expanded to their `.nii`/`.nii.gz` files; problems)."""
    files, problems = [], []
    for path in inputs:
        if path.is_dir():
            found = sorted([*path.glob("*.nii.gz"), *path.glob("*.nii")])
            found = [f for f in found if not f.name.endswith("_seg.nii.gz")]  # our own outputs
            files += found
            if not found:
                problems.append(f"{path}: no .nii or .nii.gz files in this folder")
        elif path.exists():
            files.append(path)
        else:
            problems.append(f"{path}: no such file or folder")
    return files, problems


def segment_scan(
    predictor: Predictor, data: np.ndarray, affine: np.ndarray, case: str
) -> tuple[Segmentation, np.ndarray, Volume]:
    """(labels on both grids, the model input, the canonical volume) of a scan read from disk."""
    prepared, volume = scan_input(data, affine, case, predictor.spec.recipe)
    seg = paths.segment_scan(
        predictor.model,
        prepared.image,
        prepared.grid,
        scheme=predictor.spec.scheme,
        options=predictor.options,
        device=predictor.device,
        hu_window=predictor.spec.recipe.hu_window,
        progress=True,
    )
    return seg, prepared.image, volume


def write_labels(path: Path, labels: np.ndarray, source: nib.Nifti1Image) -> None:
    """uint8 labels with the source's header, affine, qform and sform (codes included)."""
    header = source.header.copy()
    out = nib.Nifti1Image(labels.astype(np.uint8), source.affine, header=header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    out.set_qform(source.header.get_qform(), code=int(source.header["qform_code"]))
    out.set_sform(source.header.get_sform(), code=int(source.header["sform_code"]))
    out.header["cal_min"], out.header["cal_max"] = 0, max(int(labels.max()), 1)
    with atomic_file(path, suffix=".nii.gz") as tmp:  # nibabel picks the format by name
        nib.save(out, tmp)


def predict_scan(predictor: Predictor, path: Path, out_dir: Path) -> ScanReport:
    """Segment one scan and write its label volume, report JSON and report page."""
    start = time.perf_counter()
    case = case_name(path)
    check_owner(out_dir / f"{case}_report.json", path)
    data, affine = read_nifti(path, case)
    seg, image, volume = segment_scan(predictor, data, affine, case)
    seg_path = out_dir / f"{case}_seg.nii.gz"
    source = nib.load(path)
    assert isinstance(source, nib.Nifti1Image)  # read_nifti accepted it
    write_labels(seg_path, to_disk_orientation(seg.labels, affine), source)
    spec = predictor.spec
    report: ScanReport = {
        "case": case,
        "input": str(path.resolve()),
        "segmentation": seg_path.name,
        **json_safe(severity(seg.labels, volume.spacing, spec.scheme)),
        "voxel_spacing_mm": [round(s, 4) for s in volume.spacing],
        "model": _identity(predictor),
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json_atomic(out_dir / f"{case}_report.json", report)
    slices = pick_slices(seg.stored == spec.infection_label, n=3)
    report_page(
        report,
        image,
        seg.stored,
        slices=slices,
        path=out_dir / f"{case}_report.png",
        scheme=spec.scheme,
    )
    return report


def check_owner(report: Path, scan: Path) -> None:
    """Refuse to replace the outputs of another input that had the same name."""
    try:
        previous = json.loads(report.read_text()).get("input")
    except (OSError, ValueError, AttributeError):
        return  # nothing there (or not ours to read): nothing to protect
    if previous and previous != str(scan.resolve()):
        raise CovidSegError(
            f"{scan}: {report.parent} already holds the result of another scan of the same "
            f"name ({previous}); refusing to overwrite it, choose another -o folder"
        )


def check_names(files: list[Path]) -> None:
    """Two inputs that would write the same output names are an error before any work."""
    by_case: dict[str, list[Path]] = {}
    for path in files:
        by_case.setdefault(case_name(path), []).append(path)
    clashes = [paths for paths in by_case.values() if len({p.resolve() for p in paths}) > 1]
    if clashes:
        first = clashes[0]
        raise CovidSegError(
            f"{first[0]} and {first[1]} would both write {case_name(first[0])}_seg.nii.gz; "
            "predict them into separate -o folders"
            + (f" ({len(clashes) - 1} more such clashes)" if len(clashes) > 1 else "")
        )


def json_safe(values: Severity) -> ReportedSeverity:
    """NaN (e.g. the share infected of a lung that was not found) becomes JSON null."""
    safe = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}
    return cast(ReportedSeverity, safe)  # the same keys, NaN floats turned into None


def _identity(predictor: Predictor) -> ModelIdentity:
    spec = predictor.spec
    return {
        "source": predictor.source,
        "arch": spec.arch,
        "encoder": spec.encoder,
        "target": spec.target,
        "image_size": spec.image_size,
        "folds": list(spec.folds),
        "run_id": spec.run_id,
        "best_epoch": spec.best_epoch,
        "val_dice": spec.val_dice,
    }


def predict_many(
    predictor: Predictor,
    inputs: list[Path],
    out_dir: Path,
    *,
    on_result: Callable[[ScanReport], None] | None = None,
) -> int:
    """Segment every scan; a bad input is one error line and the others go on; `on_result`
    sees each scan's report as it is written. The number of failures."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CovidSegError(f"-o {out_dir}: is a file; name a folder for the outputs")
    files, problems = scan_files(inputs)
    files = list(dict.fromkeys(files))  # a scan named twice is segmented once
    check_names(files)
    for problem in problems:
        log.error("%s", problem)
    failures = len(problems)
    if not files:
        return failures
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc="scans", unit="scan"):
        try:
            report = predict_scan(predictor, path, out_dir)
        except CovidSegError as error:
            log.error("%s", error)
            failures += 1
            continue
        except (RuntimeError, ValueError, OSError, MemoryError) as error:  # e.g. out of memory
            log.error("%s", f"{path}: {type(error).__name__}: {error}".splitlines()[0])
            failures += 1
            continue
        if on_result is not None:
            on_result(report)
    return failures
