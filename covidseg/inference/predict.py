"""`covidseg predict`: segment new scans with a trained model.

Per scan it writes `<case>_seg.nii.gz` (uint8 labels on the input's exact voxel grid, with the
input's affine, qform/sform and codes, so it overlays the CT in any viewer),
`<case>_report.json` (severity numbers, keys carry their unit) and a one-page
`<case>_report.png`. A scan is a NIfTI file or a DICOM series (`covidseg.data.dicom`), whose
case name is its SeriesInstanceUID and which also gets `<case>_seg.dcm`, a DICOM-SEG.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import NotRequired, TypedDict, cast

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from covidseg.atomic import atomic_file, atomic_files, write_json_atomic
from covidseg.config import DeviceChoice, OutputFormat
from covidseg.data.dicom import DicomVolume, Series, read_series, series_inputs
from covidseg.data.transforms import scan_input
from covidseg.data.volumes import Volume, case_name, read_nifti, to_disk_orientation
from covidseg.errors import CovidSegError
from covidseg.inference import paths
from covidseg.inference.dicomseg import write_seg
from covidseg.inference.ensemble import is_ensemble_folder, load_ensemble
from covidseg.inference.segment import InferenceOptions, Segmentation
from covidseg.precision import uses_bf16
from covidseg.reporting.figures import pick_slices, report_page
from covidseg.reporting.severity import Severity, severity
from covidseg.training.model import resolve_device
from covidseg.training.modelio import ModelSpec, load_model

log = logging.getLogger(__name__)

MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
# a scan's outputs: NIfTI labels, DICOM-SEG, report page, report (written last: the set is whole)
OUTPUT_ENDINGS = ("_seg.nii.gz", "_seg.dcm", "_report.png", "_report.json")
Scan = Path | Series  # a NIfTI file or a DICOM series


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


class SeriesFields(TypedDict):
    """A DICOM input's UIDs and its DICOM-SEG's file name (no other header value)."""

    dicom_seg: NotRequired[str]
    study_instance_uid: NotRequired[str]
    series_instance_uid: NotRequired[str]


class ScanReport(ReportedSeverity, SeriesFields):
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


def scan_files(
    inputs: list[Path], series: frozenset[str] = frozenset()
) -> tuple[list[Scan], list[str]]:
    """(the scans named, folders expanded to their `.nii`/`.nii.gz` files and DICOM series
    (those of `series` where given); problems)."""
    files: list[Scan] = []
    problems = []
    for path in inputs:
        if path.is_dir():
            found = sorted([*path.glob("*.nii.gz"), *path.glob("*.nii")])
            found = [f for f in found if not f.name.endswith("_seg.nii.gz")]  # our own outputs
            dicom, bad = series_inputs(path, series)
            files += [*found, *dicom]
            problems += bad
            if not found and not dicom and not bad:
                problems.append(f"{path}: no .nii or .nii.gz files or DICOM series in this folder")
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


def scan_name(scan: Scan) -> str:
    """The outputs' name: a file's case name, a series' SeriesInstanceUID (never PHI)."""
    return scan.uid if isinstance(scan, Series) else case_name(scan)


def scan_path(scan: Scan) -> Path:
    """The file, or the folder the series was found in."""
    return scan.folder if isinstance(scan, Series) else scan


def load_scan(
    scan: Scan, case: str
) -> tuple[nib.Nifti1Image, np.ndarray, np.ndarray, DicomVolume | None]:
    """(the image whose header the labels take, its array as stored, its affine, the series
    as read for a DICOM input)."""
    if isinstance(scan, Series):
        dicom = read_series(scan)
        return dicom.image, np.asanyarray(dicom.image.dataobj), dicom.image.affine, dicom
    data, affine = read_nifti(scan, case)
    source = nib.load(scan)
    assert isinstance(source, nib.Nifti1Image)  # read_nifti accepted it
    return source, data, affine, None


def label_formats(scan: Scan, output_format: OutputFormat | None) -> tuple[bool, bool]:
    """(write the NIfTI labels, write a DICOM-SEG): both for a series unless told otherwise;
    a NIfTI input has no DICOM to reference, so it gets no SEG."""
    if isinstance(scan, Series):
        chosen = output_format or "both"
        return chosen != "dicom-seg", chosen != "nifti"
    if output_format == "dicom-seg":
        raise CovidSegError(f"{scan}: a DICOM-SEG needs a DICOM series as input, not a NIfTI file")
    if output_format == "both":
        log.info("%s: a NIfTI input gets no DICOM-SEG (it has no DICOM images to reference)", scan)
    return True, False


def predict_scan(
    predictor: Predictor, path: Scan, out_dir: Path, *, output_format: OutputFormat | None = None
) -> ScanReport:
    """Segment one scan and write its label volume(s), report JSON and report page."""
    start = time.perf_counter()
    case = scan_name(path)
    nifti, dicom_seg = label_formats(path, output_format)
    seg_path, dcm_path, page_path, report_path = output_paths(out_dir, case)
    check_owner(report_path, scan_path(path), [seg_path, dcm_path, page_path])
    source, data, affine, dicom = load_scan(path, case)
    seg, image, volume = segment_scan(predictor, data, affine, case)
    labels = to_disk_orientation(seg.labels, affine)
    outputs: list[tuple[Path, Callable[[Path], object]]] = []  # written together, in order
    if nifti:
        outputs.append((seg_path, lambda tmp: write_labels(tmp, labels, source)))
    spec = predictor.spec
    report: ScanReport = {
        "case": case,
        "input": str(scan_path(path).resolve()),
        "segmentation": seg_path.name if nifti else f"{case}_seg.dcm",
        **json_safe(severity(seg.labels, volume.spacing, spec.scheme)),
        "voxel_spacing_mm": [round(s, 4) for s in volume.spacing],
        "model": _identity(predictor),
        "seconds": round(time.perf_counter() - start, 2),
        **series_fields(dicom),
    }
    if dicom is not None and dicom_seg:
        model = {k: v for k, v in report["model"].items() if v is not None}
        outputs.append(
            (dcm_path, lambda tmp: write_seg(tmp, labels, dicom, scheme=spec.scheme, model=model))
        )
        report["dicom_seg"] = dcm_path.name
    slices = pick_slices(seg.stored == spec.infection_label, n=3)
    page = partial(report_page, report, image, seg.stored, slices=slices, scheme=spec.scheme)
    outputs.append((page_path, lambda tmp: page(path=tmp)))
    outputs.append((report_path, lambda tmp: write_json_atomic(tmp, report)))
    write_together(outputs)
    return report


def series_fields(dicom: DicomVolume | None) -> SeriesFields:
    """The series' Study and Series Instance UIDs for its report; nothing for a NIfTI input."""
    if dicom is None:
        return {}
    return {"study_instance_uid": dicom.study_uid, "series_instance_uid": dicom.series_uid}


def output_paths(out_dir: Path, case: str) -> tuple[Path, Path, Path, Path]:
    """A scan's outputs in `out_dir`: NIfTI labels, DICOM-SEG, report page and report."""
    seg, dcm, page, report = (out_dir / f"{case}{end}" for end in OUTPUT_ENDINGS)
    return seg, dcm, page, report


def write_together(outputs: list[tuple[Path, Callable[[Path], object]]]) -> None:
    """Each (path, writer) writes a temporary; they are renamed into place as a set, in order
    (the report last): an interrupt or a full disk leaves the old set or the new one."""
    with atomic_files([path for path, _ in outputs]) as temporaries:
        for tmp, (_, write) in zip(temporaries, outputs, strict=True):
            write(tmp)


def check_owner(report: Path, scan: Path, outputs: Sequence[Path] = ()) -> None:
    """Replace only what predict wrote for this same scan: the report beside the outputs must
    record it as its input. Without a report, an existing output is someone else's file."""
    if not (report.exists() or report.is_symlink()):
        if taken := [path for path in outputs if path.exists() or path.is_symlink()]:
            raise CovidSegError(
                f"{scan}: {taken[0]} exists and no {report.name} says predict wrote it; "
                "refusing to overwrite it, move it or choose another -o folder"
            )
        return
    try:
        previous = json.loads(report.read_text()).get("input")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous == str(scan.resolve()):
        return
    if not isinstance(previous, str) or not previous:
        raise CovidSegError(
            f"{scan}: {report} exists and is no predict report (it names no input); "
            "refusing to overwrite it, move it or choose another -o folder"
        )
    raise CovidSegError(
        f"{scan}: {report.parent} already holds the result of another scan of the same "
        f"name ({previous}); refusing to overwrite it, choose another -o folder"
    )


def check_names(files: list[Scan]) -> None:
    """Two inputs that would write the same output names are an error before any work."""
    by_case: dict[str, list[Scan]] = {}
    for path in files:
        by_case.setdefault(scan_name(path), []).append(path)
    clashes = [paths for paths in by_case.values() if len({_key(p) for p in paths}) > 1]
    if clashes:
        first = clashes[0]
        raise CovidSegError(
            f"{first[0]} and {first[1]} would both write {scan_name(first[0])}_seg.nii.gz; "
            "predict them into separate -o folders"
            + (f" ({len(clashes) - 1} more such clashes)" if len(clashes) > 1 else "")
        )


def _key(scan: Scan) -> object:
    return scan.key if isinstance(scan, Series) else scan.resolve()


def make_output_folder(out_dir: Path) -> None:
    """Create `-o` (and its parents) and check that it takes files; one line otherwise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        blocker = next((p for p in out_dir.parents if p.exists() and not p.is_dir()), None)
        reason = f"{blocker} is a file" if blocker else error.strerror or str(error)
        raise CovidSegError(f"-o {out_dir}: cannot create the folder ({reason})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise CovidSegError(f"-o {out_dir}: the folder is not writable")


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
    series: frozenset[str] = frozenset(),
    output_format: OutputFormat | None = None,
) -> int:
    """Segment every scan; a bad input is one error line and the others go on; `on_result`
    sees each scan's report as it is written. `series` picks DICOM series by UID;
    `output_format`: NIfTI labels, DICOM-SEG or both (default: both for a series, NIfTI for a
    file).
    The number of failures."""
    if out_dir.exists() and not out_dir.is_dir():
        raise CovidSegError(f"-o {out_dir}: is a file; name a folder for the outputs")
    files, problems = scan_files(inputs, series)
    files = list(dict.fromkeys(files))  # a scan named twice is segmented once
    check_names(files)
    for problem in problems:
        log.error("%s", problem)
    failures = len(problems)
    if not files:
        return failures
    make_output_folder(out_dir)
    for path in tqdm(files, desc="scans", unit="scan"):
        try:
            report = predict_scan(predictor, path, out_dir, output_format=output_format)
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
