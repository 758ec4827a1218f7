"""`covidseg predict` on DICOM series: the reader's geometry, the DICOM-SEG, and bad series.

Series are written with pydicom from a seeded phantom (`dicom_series`), in several layouts
that all describe the same voxels in physical space; the reader must rebuild that volume
exactly, predict must give the NIfTI input's labels and numbers, dcm2niix (an independent
reader) must agree on the grid, and the DICOM-SEG read back with highdicom must hold the labels
frame by frame. Each bad series is one error line; the other inputs of the call go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from dicom_series import (
    PHI,
    encapsulated_copy,
    localizer,
    multi_frame,
    new_study,
    oriented,
    save,
    write_series,
)
from oracles import LungOracle, oracle
from phantoms import PhantomCase, load_nifti, make_case
from tiny import WINDOW

from covidseg import CovidSegError, __version__
from covidseg.cli import main
from covidseg.data.dicom import Series, read_series, series_inputs
from covidseg.data.labels import LUNG_INFECTION, SCHEMES, SEGMENT_CODES
from covidseg.inference.predict import predict_many
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, save_model

DCM2NIIX = Path(sys.executable).with_name("dcm2niix")
SEVERITY_KEYS = (
    "lesion_volume_ml",
    "slices_involved",
    "slices_total",
    "left_lung_volume_ml",
    "left_lung_infected_pct",
    "right_lung_volume_ml",
    "right_lung_infected_pct",
    "total_grade",
    "voxel_spacing_mm",
)
# layout -> (array axes, file names, rescale slope, intercept (NaN: varies by slice))
LAYOUTS: dict[str, tuple[tuple[str, str, str], str, float, float]] = {
    "head_first": (("L", "P", "I"), "ordered", 1.0, -1024.0),
    "feet_first": (("L", "P", "S"), "ordered", 1.0, -1024.0),
    "reversed_file_order": (("L", "P", "I"), "reversed", 1.0, -1024.0),
    "flipped_in_plane_shuffled_names": (("R", "A", "S"), "shuffled", 1.0, -1024.0),
    "rows_and_columns_swapped": (("P", "L", "I"), "shuffled", 1.0, -1024.0),
    "coronal": (("L", "S", "P"), "reversed", 1.0, -1024.0),
    "slope_half_intercept_fraction": (("L", "P", "S"), "ordered", 0.5, -1024.5),
    "intercept_varies_by_slice": (("L", "P", "I"), "shuffled", 1.0, float("nan")),
    "signed_pixels": (("R", "P", "I"), "ordered", 1.0, 0.0),
}
COMPRESSED = {
    "rle": "1.2.840.10008.1.2.5",
    "jpeg_lossless_sv1": "1.2.840.10008.1.2.4.70",
    "jpeg_ls_lossless": "1.2.840.10008.1.2.4.80",
    "jpeg_2000_lossless": "1.2.840.10008.1.2.4.90",
}


def canonical(image: nib.Nifti1Image) -> tuple[np.ndarray, np.ndarray]:
    """(array, affine) in nibabel's closest canonical (RAS) orientation."""
    ras = nib.as_closest_canonical(image)
    return np.asanyarray(ras.dataobj), ras.affine


@pytest.fixture(scope="module")
def phantom() -> PhantomCase:
    """A 64 x 64 x 36 HU phantom (0.8 x 0.8 x 2.0 mm) with lungs and lesions."""
    return make_case(
        "dicom",
        encoding="hu",
        shape=(64, 64, 36),
        axcodes=("L", "A", "S"),
        spacing=(0.8, 0.8, 2.0),
        seed=5,
    )


def write_layout(folder: Path, case: PhantomCase, layout: str, **kwargs: Any) -> tuple[str, list]:
    axcodes, names, slope, intercept = LAYOUTS[layout]
    array, affine = oriented(np.asarray(case.hu), case.affine, axcodes)
    study = kwargs.pop("study", None) or new_study()
    return write_series(
        folder, array, affine, study=study, names=names, slope=slope, intercept=intercept, **kwargs
    )


def only_series(folder: Path) -> Series:
    chosen, problems = series_inputs(folder, frozenset())
    assert problems == [] and len(chosen) == 1, problems
    return chosen[0]


# --- the reader ---------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_reads_as_the_same_volume_in_physical_space(
    layout: str, phantom: PhantomCase, tmp_path: Path
) -> None:
    write_layout(tmp_path / "series", phantom, layout)
    volume = read_series(only_series(tmp_path / "series"))
    data, affine = canonical(volume.image)
    want, want_affine = canonical(nib.Nifti1Image(np.asarray(phantom.hu), phantom.affine))
    np.testing.assert_array_equal(data, want)
    np.testing.assert_allclose(affine, want_affine, atol=1e-4)
    slope, intercept = LAYOUTS[layout][2:]
    fractional = slope != 1 or not (np.isnan(intercept) or intercept.is_integer())
    assert volume.image.get_data_dtype() == (np.float32 if fractional else np.int16)
    # image k of the NIfTI's third axis is source k: the one frame <-> image map the SEG uses
    positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in volume.sources])
    lps_origins = (np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.image.affine)[:3, 3]
    np.testing.assert_allclose(positions[0], lps_origins, atol=1e-4)


@pytest.mark.parametrize("syntax", sorted(COMPRESSED))
def test_compressed_transfer_syntaxes_decode_losslessly(
    syntax: str, phantom: PhantomCase, tmp_path: Path
) -> None:
    array, affine = oriented(np.asarray(phantom.hu)[:, :, :8], phantom.affine, ("L", "P", "S"))
    write_series(tmp_path, array, affine, study=new_study(), syntax=COMPRESSED[syntax])
    files = sorted(tmp_path.glob("*.dcm"))
    assert {str(pydicom.dcmread(f).file_meta.TransferSyntaxUID) for f in files} == {
        COMPRESSED[syntax]
    }
    volume = read_series(only_series(tmp_path))
    np.testing.assert_array_equal(
        canonical(volume.image)[0], canonical(nib.Nifti1Image(array, affine))[0]
    )


# --- predict on NIfTI and DICOM -----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One DICOM layout predicted beside the NIfTI file of the same phantom."""

    folder: Path
    uid: str
    datasets: list
    out: Path
    report: dict[str, Any]


@pytest.fixture(scope="module")
def nifti_run(phantom: PhantomCase, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("nifti")
    scan = folder / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(phantom.hu), phantom.affine), scan)
    reports: list[Any] = []
    predictor = oracle(LungOracle(), 4, 64)
    assert predict_many(predictor, [scan], folder / "out", on_result=reports.append) == 0
    return {"report": reports[0], "labels": load_nifti(folder / "out" / "phantom_seg.nii.gz")}


@pytest.fixture(
    scope="module",
    params=["head_first", "flipped_in_plane_shuffled_names", "slope_half_intercept_fraction"],
)
def dicom_run(
    request: pytest.FixtureRequest, phantom: PhantomCase, tmp_path_factory: pytest.TempPathFactory
) -> Run:
    folder = tmp_path_factory.mktemp(request.param)
    uid, datasets = write_layout(folder / "series", phantom, request.param)
    reports: list[Any] = []
    out = folder / "out"
    predictor = oracle(LungOracle(), 4, 64)
    assert predict_many(predictor, [folder / "series"], out, on_result=reports.append) == 0
    return Run(folder / "series", uid, datasets, out, reports[0])


def test_series_gives_the_nifti_inputs_labels_and_numbers(
    dicom_run: Run, nifti_run: dict[str, Any], phantom: PhantomCase
) -> None:
    report, want = dicom_run.report, nifti_run["report"]
    assert {k: report[k] for k in SEVERITY_KEYS} == {k: want[k] for k in SEVERITY_KEYS}
    assert report["lesion_volume_ml"] > 0 and report["left_lung_volume_ml"] > 0
    labels, affine = canonical(load_nifti(dicom_run.out / report["segmentation"]))
    want_labels, want_affine = canonical(nifti_run["labels"])
    np.testing.assert_array_equal(labels, want_labels)
    np.testing.assert_allclose(affine, want_affine, atol=1e-4)
    assert set(np.unique(labels)) == {0, 1, 2, 3}  # every label: the comparison means something


def test_outputs_are_named_by_series_uid_and_report_names_the_series(dicom_run: Run) -> None:
    uid = dicom_run.uid
    assert sorted(p.name for p in dicom_run.out.iterdir()) == sorted(
        f"{uid}{end}" for end in ("_seg.nii.gz", "_seg.dcm", "_report.json", "_report.png")
    )
    report = dicom_run.report
    assert report["case"] == report["series_instance_uid"] == uid
    assert report["study_instance_uid"] == dicom_run.datasets[0].StudyInstanceUID
    assert report["dicom_seg"] == f"{uid}_seg.dcm"
    assert report["input"] == str(dicom_run.folder.resolve())


def test_no_patient_identifier_leaves_the_headers(dicom_run: Run) -> None:
    text = "\n".join(p.name for p in dicom_run.out.iterdir())
    text += (dicom_run.out / f"{dicom_run.uid}_report.json").read_text()
    assert not [value for value in PHI.values() if value.split("^")[0] in text]


def test_dcm2niix_agrees_on_the_grid(dicom_run: Run, tmp_path: Path) -> None:
    done = subprocess.run(
        [
            str(DCM2NIIX),
            "-z",
            "n",
            "-b",
            "n",
            "-f",
            "converted",
            "-o",
            str(tmp_path),
            str(dicom_run.folder),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    converted = load_nifti(next(tmp_path.glob("converted*.nii")))
    ours = load_nifti(dicom_run.out / f"{dicom_run.uid}_seg.nii.gz")
    theirs_data, theirs_affine = canonical(converted)
    ours_data, ours_affine = canonical(ours)
    assert ours_data.shape == theirs_data.shape
    np.testing.assert_allclose(ours_affine, theirs_affine, atol=1e-3)


def test_dicom_seg_holds_the_labels_frame_by_frame(dicom_run: Run) -> None:
    seg = hd.seg.segread(dicom_run.out / f"{dicom_run.uid}_seg.dcm")
    labels = np.asanyarray(load_nifti(dicom_run.out / f"{dicom_run.uid}_seg.nii.gz").dataobj)
    volume = read_series(only_series(dicom_run.folder))
    uids = [str(h.SOPInstanceUID) for h in volume.sources]
    frames = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, assert_missing_frames_are_empty=True
    )
    for k, frame in enumerate(frames):
        np.testing.assert_array_equal(frame, labels[:, :, k].T, err_msg=f"frame of image {k}")
    written = {str(ds.SOPInstanceUID) for ds in dicom_run.datasets}
    referenced = {
        str(item.ReferencedSOPInstanceUID)
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == written
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == dicom_run.uid
    source = dicom_run.datasets[0]
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != dicom_run.uid
    non_empty = [(labels[:, :, k] == s).any() for k in range(labels.shape[2]) for s in (1, 2, 3)]
    assert seg.NumberOfFrames == sum(non_empty)  # one frame per image and segment present


def test_dicom_seg_segments_carry_the_schemes_codes(dicom_run: Run) -> None:
    seg = hd.seg.segread(dicom_run.out / f"{dicom_run.uid}_seg.dcm")
    assert list(seg.get_segment_numbers()) == [1, 2, 3]
    for number in (1, 2, 3):
        description = seg.get_segment_description(number)
        code = SEGMENT_CODES[LUNG_INFECTION.names[number]]
        assert description.segment_label == LUNG_INFECTION.display[number]
        assert description.segmented_property_category.value == code.category[0]
        assert description.segmented_property_type.value == code.type[0]
        assert description.segmented_property_type.scheme_designator == "SCT"
        item = description.SegmentedPropertyTypeCodeSequence[0]
        modifiers = [m.CodeValue for m in item.get("SegmentedPropertyTypeModifierCodeSequence", [])]
        assert modifiers == ([code.modifier[0]] if code.modifier else [])
        algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("covidseg", __version__)
        assert "lung_infection" in algorithm.AlgorithmParameters


def test_every_foreground_label_of_every_scheme_has_a_code() -> None:
    for scheme in SCHEMES.values():
        for value in scheme.display:
            code = scheme.code(value)
            assert code.category[0].isdigit() and code.type[0].isdigit()
    assert SEGMENT_CODES["left_lung"].modifier != SEGMENT_CODES["right_lung"].modifier


# --- bad series ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained four-class Unet / MobileNet-v2 at 64 px."""
    torch.manual_seed(0)
    model = build_model("Unet", "mobilenet_v2", None, LUNG_INFECTION.classes)
    spec = ModelSpec(
        "Unet", "mobilenet_v2", 4, "lung_infection", 64, WINDOW, labels=LUNG_INFECTION.to_json()
    )
    folder = tmp_path_factory.mktemp("models") / "model"
    save_model(folder, model.state_dict(), spec)
    return folder


def small(case: PhantomCase, count: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """The phantom's first `count` slices, head first."""
    array, affine = oriented(np.asarray(case.hu), case.affine, ("L", "P", "I"))
    return array[:, :, :count], affine


def edit(path: Path, **values: Any) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def bad_series(root: Path, case: PhantomCase) -> dict[str, str]:
    """Folder name -> the words its one error line must hold."""
    array, affine = small(case)
    study = new_study()
    expect = {}

    def series(name: str, count: int = 8) -> tuple[Path, str, list]:
        uid, datasets = write_series(root / name, array[:, :, :count], affine, study=study)
        return root / name, uid, datasets

    folder, first, _ = series("two_series")
    second, _ = write_series(folder / "later", array, affine, study=study)
    expect["two_series"] = (
        f"2 CT series; pick one with --series UID: {first} (series 3, 8 images, 1 mm, kernel "
        f"B70f); {second} (series 3, 8 images"
    )
    folder, _, _ = series("missing_slice")
    (folder / "IM0005.dcm").unlink()
    expect["missing_slice"] = (
        "missing slice or uneven spacing: 4.00 mm between instance 6 and instance 4"
    )
    folder, _, _ = series("mixed_orientation")
    edit(folder / "IM0003.dcm", ImageOrientationPatient=[1, 0, 0, 0, 0.9950042, -0.0998334])
    expect["mixed_orientation"] = "mixed orientations"
    folder, _, _ = series("mixed_spacing")
    edit(folder / "IM0003.dcm", PixelSpacing=[0.9, 0.9])
    expect["mixed_spacing"] = "mixed pixel spacings (0.8x0.8, 0.9x0.9 mm)"
    folder, _, datasets = series("gantry_tilt")
    for k, path in enumerate(sorted(folder.glob("*.dcm"))):
        position = [float(v) for v in datasets[k].ImagePositionPatient]
        position[1] += 2.0 * k * np.tan(np.radians(15))  # 15 degrees along y per 2 mm in z
        edit(path, ImagePositionPatient=position)
    expect["gantry_tilt"] = "gantry tilt or sheared geometry"
    multi_frame(root / "multi_frame", study)
    expect["multi_frame"] = "a multi-frame (enhanced) CT object"
    folder, _, _ = series("not_dicom_among_slices")
    (folder / "IM0009.dcm").write_text("exported by hand\n")
    expect["not_dicom_among_slices"] = "IM0009.dcm among its slices is not a readable DICOM file"
    folder, _, _ = series("damaged_header")
    damaged = folder / "IM0006.dcm"
    damaged.write_bytes(damaged.read_bytes()[:400])
    expect["damaged_header"] = "IM0006.dcm among its slices is not a readable DICOM file"
    folder, _, _ = series("truncated_pixels")
    damaged = folder / "IM0004.dcm"
    damaged.write_bytes(damaged.read_bytes()[:-2000])
    expect["truncated_pixels"] = "cannot decode IM0004.dcm"
    series("too_small", count=3)
    expect["too_small"] = "too small to be a CT volume (3 images of 64x64"
    folder, _, datasets = series("unsupported_syntax", count=6)
    for path in folder.glob("*.dcm"):
        path.unlink()
    for k, ds in enumerate(datasets):
        encapsulated_copy(ds, folder / f"IM{k:04d}.dcm", "1.2.840.10008.1.2.4.50")
    expect["unsupported_syntax"] = (
        "transfer syntax JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)"
    )
    folder, _, datasets = series("same_position_twice")
    copy = datasets[2].copy()
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    save(copy, folder / "IM0099.dcm")
    expect["same_position_twice"] = "two images at the same position"
    localizer(root / "only_a_scout", study)
    expect["only_a_scout"] = "no CT series to segment (skipped: "
    return expect


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error: ")]


def test_each_bad_series_is_one_line_and_the_other_inputs_go_on(
    model_folder: Path, phantom: PhantomCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    inputs = tmp_path / "inputs"
    expect = bad_series(inputs, phantom)
    good = inputs / "good"
    study = new_study()
    uid, _ = write_layout(good / "CT", phantom, "reversed_file_order", study=study)
    scout = localizer(good / "SCOUT", study)
    nifti = inputs / "plain.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(phantom.hu), phantom.affine), nifti)
    out = tmp_path / "out"
    folders = [inputs / name for name in sorted(expect)]
    capsys.readouterr()

    code = main(
        [
            "predict",
            *map(str, [*folders, good, nifti]),
            "--model",
            str(model_folder),
            "-o",
            str(out),
            "--device",
            "cpu",
        ]
    )

    err = capsys.readouterr().err
    assert code == 1
    errors = error_lines(err)
    assert len(errors) == len(expect), "\n".join(errors)
    for name, words in expect.items():
        mine = [line for line in errors if f"{inputs / name}:" in line]
        assert len(mine) == 1 and words in mine[0], (name, mine)
    assert "Traceback" not in err
    assert f"note: {good}: skipped series {scout} (localizer, 2 images)" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{uid}{end}" for end in ("_seg.nii.gz", "_seg.dcm", "_report.json", "_report.png")]
        + [f"plain{end}" for end in ("_seg.nii.gz", "_report.json", "_report.png")]
    )
    assert not [value for value in PHI.values() if value.split("^")[0] in err]


def test_series_picks_one_of_several_and_output_format_chooses_the_labels(
    model_folder: Path, phantom: PhantomCase, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    array, affine = small(phantom)
    study = new_study()
    folder = tmp_path / "study"
    first, _ = write_series(folder / "a", array, affine, study=study)
    second, _ = write_series(folder / "b", array[:, :, :6], affine, study=study)
    nifti = tmp_path / "plain.nii.gz"
    nib.save(nib.Nifti1Image(array, affine), nifti)
    model = ["--model", str(model_folder), "--device", "cpu"]

    code = main(
        [
            "predict",
            str(folder),
            *model,
            "-o",
            str(tmp_path / "o1"),
            "--series",
            second,
            "--output-format",
            "dicom-seg",
        ]
    )
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "o1").iterdir()) == sorted(
        f"{second}{end}" for end in ("_seg.dcm", "_report.json", "_report.png")
    )
    report = json.loads((tmp_path / "o1" / f"{second}_report.json").read_text())
    assert report["segmentation"] == report["dicom_seg"] == f"{second}_seg.dcm"
    assert report["slices_total"] == 6

    capsys.readouterr()
    code = main(
        [
            "predict",
            str(folder),
            str(nifti),
            *model,
            "-o",
            str(tmp_path / "o2"),
            "--series",
            "1.2.3",
        ]
    )
    errors = error_lines(capsys.readouterr().err)
    assert code == 1
    assert len(errors) == 1 and f"{folder}: no series named by --series here" in errors[0]
    assert first in errors[0] and second in errors[0]  # its series listed to pick from
    assert (tmp_path / "o2" / "plain_seg.nii.gz").is_file()

    code = main(
        [
            "predict",
            str(folder),
            *model,
            "-o",
            str(tmp_path / "o3"),
            "--series",
            first,
            "--output-format",
            "nifti",
        ]
    )
    assert code == 0
    assert not list((tmp_path / "o3").glob("*.dcm"))

    capsys.readouterr()
    code = main(
        ["predict", str(nifti), *model, "-o", str(tmp_path / "o4"), "--output-format", "dicom-seg"]
    )
    assert code == 1
    assert error_lines(capsys.readouterr().err) == [
        f"error: {nifti}: a DICOM-SEG needs a DICOM series as input, not a NIfTI file"
    ]


def test_a_series_problem_is_a_covidseg_error(phantom: PhantomCase, tmp_path: Path) -> None:
    array, affine = small(phantom)
    write_series(tmp_path, array, affine, study=new_study())
    (tmp_path / "IM0002.dcm").unlink()
    with pytest.raises(CovidSegError, match="missing slice"):
        read_series(only_series(tmp_path))
