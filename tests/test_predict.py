"""`covidseg predict`: label volumes on the input's grid, severity reports, model folders and URIs.

Most tests use oracle modules instead of trained networks: their logits are high where the
normalised intensity is that of a phantom tissue, so their prediction is the phantom's mask
and any error in the orientation, padding or resizing round trip shows up voxel for voxel.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from oracles import LesionOracle, LungOracle, oracle
from phantoms import AIR_HU, BODY_HU, PhantomCase, hu_to_uint8, load_nifti
from PIL import Image
from tiny import WINDOW

import covidseg.precision as precision_module
from covidseg import CovidSegError
from covidseg.cli import main
from covidseg.config import Params
from covidseg.inference.predict import Predictor, load_predictor, predict_scan
from covidseg.inference.segment import InferenceOptions
from covidseg.tracking import Tracker
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, save_model

CLI = Path(sys.executable).with_name("covidseg")
MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
)
UNET_SPEC = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 64, WINDOW)
SNAKE = re.compile(r"^[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def write_scan(path: Path, array: np.ndarray, affine: np.ndarray, codes: tuple[int, int]) -> Path:
    """A NIfTI scan with the given (qform_code, sform_code)."""
    image = nib.Nifti1Image(np.asarray(array), affine)
    image.set_qform(affine, code=codes[0])
    image.set_sform(affine, code=codes[1])
    image.header.set_xyzt_units("mm")
    nib.save(image, path)
    return path


def read_labels(path: Path) -> np.ndarray:
    """A label volume's array as on disk."""
    return np.asarray(load_nifti(path).dataobj)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks (non-zero = inside)."""
    a, b = a > 0, b > 0
    return 2.0 * int((a & b).sum()) / int(a.sum() + b.sum())


def grade(percent: float) -> int:
    """The 0-4 extent grade, written out independently of the package."""
    if percent == 0:
        return 0
    return 1 if percent < 25 else 2 if percent < 50 else 3 if percent < 75 else 4


@dataclass(frozen=True)
class Run:
    """One scan segmented: the phantom, the scan file, the output folder and the report."""

    case: PhantomCase
    scan: Path
    out: Path
    report: dict[str, Any]

    @property
    def name(self) -> str:
        """The case name the outputs carry."""
        return self.seg.name.removesuffix("_seg.nii.gz")

    @property
    def seg(self) -> Path:
        """The written label volume."""
        return self.out / self.report["segmentation"]


# (phantom index, file name, (qform_code, sform_code)): the dataset's two encodings and
# orientations, and a plain HU scan outside the dataset's naming (uncompressed, qform only).
SCANS = {
    "hu": (0, "coronacases_001.nii.gz", (1, 1)),
    "uint8": (1, "radiopaedia_4_85506_1.nii.gz", (1, 2)),
    "plain_hu": (2, "patient_a.nii", (2, 0)),
}


def run_oracle(
    predictor: Predictor, case: PhantomCase, name: str, codes: tuple[int, int], folder: Path
) -> Run:
    """Write the phantom as `name` with the given codes and segment it with `predictor`."""
    scan = write_scan(folder / name, case.image, case.affine, codes)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    return Run(case, scan, out, dict(predict_scan(predictor, scan, out)))


@pytest.fixture(scope="module", params=list(SCANS))
def predicted(
    request: pytest.FixtureRequest,
    phantom_cases: list[PhantomCase],
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """A scan segmented by the lesion oracle at 64 px (nothing resized, only padded)."""
    index, name, codes = SCANS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return run_oracle(oracle(LesionOracle(), 1, 64), phantom_cases[index], name, codes, folder)


@pytest.fixture(scope="module", params=["hu", "uint8"])
def lung_predicted(
    request: pytest.FixtureRequest,
    phantom_cases: list[PhantomCase],
    tmp_path_factory: pytest.TempPathFactory,
) -> Run:
    """A scan segmented by the four-class lung oracle at 64 px."""
    index, name, codes = SCANS[request.param]
    folder = tmp_path_factory.mktemp(f"lung_{request.param}")
    return run_oracle(oracle(LungOracle(), 4, 64), phantom_cases[index], name, codes, folder)


def test_labels_lie_on_the_input_grid(predicted: Run) -> None:
    """Shape, affine, qform/sform and codes, units and SimpleITK geometry are the input's."""
    ct, seg = load_nifti(predicted.scan), load_nifti(predicted.seg)
    assert seg.shape == ct.shape
    np.testing.assert_allclose(seg.affine, ct.affine, rtol=0, atol=1e-6)
    for code in ("qform_code", "sform_code"):
        assert int(seg.header[code]) == int(ct.header[code])
    np.testing.assert_allclose(seg.header.get_qform(), ct.header.get_qform(), atol=1e-6)
    np.testing.assert_allclose(seg.header.get_sform(), ct.header.get_sform(), atol=1e-6)
    assert seg.header.get_zooms() == ct.header.get_zooms()
    assert seg.header.get_xyzt_units() == ct.header.get_xyzt_units()
    assert seg.get_data_dtype() == np.uint8
    assert read_labels(predicted.seg).dtype == np.uint8

    ct_itk, seg_itk = sitk.ReadImage(str(predicted.scan)), sitk.ReadImage(str(predicted.seg))
    assert seg_itk.GetSize() == ct_itk.GetSize()
    assert seg_itk.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_allclose(seg_itk.GetOrigin(), ct_itk.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(seg_itk.GetSpacing(), ct_itk.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(seg_itk.GetDirection(), ct_itk.GetDirection(), atol=1e-6)


def test_oracle_labels_equal_the_phantom_mask_on_disk(predicted: Run) -> None:
    """Reoriented, padded, predicted and brought back: voxel for voxel the phantom's mask."""
    labels = read_labels(predicted.seg)
    assert predicted.case.lesion_voxels > 0
    np.testing.assert_array_equal(labels, predicted.case.infection)


def test_report_json_numbers_units_and_model(predicted: Run) -> None:
    case = predicted.case
    path = predicted.out / f"{predicted.name}_report.json"
    text = path.read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in {path.name}"))
    assert report == predicted.report

    keys = [*report, *report["model"]]
    assert all(SNAKE.match(key) for key in keys), keys
    voxel_ml = math.prod(case.spacing) / 1000.0
    assert report["lesion_volume_ml"] == pytest.approx(case.lesion_voxels * voxel_ml, abs=5e-4)
    assert report["slices_involved"] == int(case.infection.any(axis=(0, 1)).sum())
    assert report["slices_total"] == case.image.shape[2]
    assert sorted(report["voxel_spacing_mm"]) == pytest.approx(sorted(case.spacing))
    assert report["segmentation"] == predicted.seg.name
    assert report["model"]["source"] == "oracle"
    assert report["model"]["arch"] == "oracle"
    assert report["model"]["image_size"] == 64
    assert report["model"]["target"] == "infection"
    assert not any(key.startswith(("left_", "right_")) for key in report)


def test_report_page_is_a_png(predicted: Run) -> None:
    path = predicted.out / f"{predicted.name}_report.png"
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400 and height >= 500
    assert len(data) > 20_000
    with Image.open(path) as image:
        image.verify()


@pytest.mark.parametrize("key", ["hu", "uint8"])
def test_resizing_down_and_back_keeps_lesions_in_place(
    key: str, phantom_cases: list[PhantomCase], tmp_path: Path
) -> None:
    """At 32 px the slices are resized down and the labels back: Dice with the truth > 0.7.

    The body is replaced by air so that the intensity oracle is not fooled by partial-volume
    pixels between lung and body, whose blend of the two lands on the lesion value.
    """
    index, name, codes = SCANS[key]
    case = phantom_cases[index]
    hu = np.where(case.hu > -200, AIR_HU, case.hu).astype(np.int16)
    image = hu if case.encoding == "hu" else hu_to_uint8(hu)
    scan = write_scan(tmp_path / name, image, case.affine, codes)
    report = predict_scan(oracle(LesionOracle(), 1, 32), scan, tmp_path)

    labels = read_labels(tmp_path / report["segmentation"])
    assert labels.shape == case.infection.shape
    assert dice(labels, case.infection) > 0.7


def test_lung_oracle_labels_equal_the_phantom_lungs(lung_predicted: Run) -> None:
    """Left (1) and right (2) come back on the patient's own sides, infection (3) on top."""
    np.testing.assert_array_equal(
        read_labels(lung_predicted.seg), lung_predicted.case.lung_and_infection
    )


def test_lung_report_per_lung_volume_share_and_grade(lung_predicted: Run) -> None:
    """Numbers computed from the phantom's arrays: a lung's volume includes its infected part."""
    case, report = lung_predicted.case, lung_predicted.report
    voxel_ml = math.prod(case.spacing) / 1000.0
    infected = case.infection > 0
    grades = 0
    for side, name in ((1, "left"), (2, "right")):
        lung = case.lung == side
        percent = 100.0 * int((lung & infected).sum()) / int(lung.sum())
        assert report[f"{name}_lung_volume_ml"] == pytest.approx(lung.sum() * voxel_ml, abs=5e-4)
        assert report[f"{name}_lung_infected_pct"] == pytest.approx(percent, abs=5e-4)
        assert report[f"{name}_lung_grade"] == grade(percent)
        grades += grade(percent)
    assert report["total_grade"] == grades
    assert report["lesion_volume_ml"] == pytest.approx(case.lesion_voxels * voxel_ml, abs=5e-4)
    assert report["model"]["target"] == "lung_infection"
    path = lung_predicted.out / f"{lung_predicted.name}_report.json"
    assert json.loads(path.read_text()) == report


def test_lung_report_of_a_scan_without_lungs_is_strict_json(
    phantom_cases: list[PhantomCase], tmp_path: Path
) -> None:
    """No lung found (e.g. an abdominal scan): zero volumes and grades, and no NaN in the JSON."""
    case = phantom_cases[0]
    image = np.where(case.lung > 0, BODY_HU, case.hu).astype(np.int16)
    scan = write_scan(tmp_path / "patient_b.nii.gz", image, case.affine, (1, 1))
    predict_scan(oracle(LungOracle(), 4, 64), scan, tmp_path)

    text = (tmp_path / "patient_b_report.json").read_text()
    report = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON: {text}"))
    assert report["lesion_volume_ml"] == 0
    assert report["left_lung_volume_ml"] == report["right_lung_volume_ml"] == 0
    assert report["left_lung_grade"] == report["right_lung_grade"] == report["total_grade"] == 0


@pytest.fixture(scope="module")
def unet_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small untrained model folder; its output layer scaled so that labels are decisive."""
    torch.manual_seed(0)
    model = build_model("Unet", "mobilenet_v2", None, 1).eval()
    with torch.no_grad():
        for parameter in model.get_submodule("segmentation_head").parameters():
            parameter.mul_(100.0)
    folder = tmp_path_factory.mktemp("models") / "model"
    save_model(folder, model.state_dict(), UNET_SPEC)
    return folder


def clean_env() -> dict[str, str]:
    """The environment without MLflow settings."""
    return {k: v for k, v in os.environ.items() if k not in MLFLOW_ENV}


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines among the progress bars."""
    return [part.strip() for part in re.split(r"[\r\n]", stderr) if "error:" in part]


def test_cli_with_a_model_folder_refuses_bad_files_and_carries_on(
    unet_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path
) -> None:
    """A folder of scans and a single file; a 4D volume and a text file are one error line each."""
    scans = tmp_path / "scans"
    scans.mkdir()
    hu_case, uint8_case = phantom_cases[2], phantom_cases[1]
    write_scan(scans / "patient_a.nii", hu_case.image, hu_case.affine, (1, 1))
    four_d = np.stack([hu_case.image, hu_case.image], axis=-1)
    write_scan(scans / "dynamic.nii.gz", four_d, hu_case.affine, (1, 1))
    (scans / "notes.nii.gz").write_text("not a scan\n")
    single = write_scan(
        tmp_path / "radiopaedia_4_85506_1.nii.gz", uint8_case.image, uint8_case.affine, (1, 1)
    )
    out = tmp_path / "out"
    command = [str(CLI), "predict", str(scans), str(single), "--model", str(unet_folder)]

    done = subprocess.run(
        [*command, "-o", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        env={**clean_env(), "OMP_NUM_THREADS": "1"},  # a small model: threads only contend
        cwd=tmp_path,
        timeout=300,
    )

    assert done.returncode == 1, done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 2, errors
    assert any("dynamic.nii.gz" in line and "3D" in line for line in errors), errors
    assert any("notes.nii.gz" in line for line in errors), errors
    for case, scan in (("patient_a", scans / "patient_a.nii"), (single.name[:-7], single)):
        for suffix in ("_seg.nii.gz", "_report.json", "_report.png"):
            assert (out / f"{case}{suffix}").is_file()
        seg = load_nifti(out / f"{case}_seg.nii.gz")
        assert seg.shape == load_nifti(scan).shape
        report = json.loads((out / f"{case}_report.json").read_text())
        assert report["model"]["source"] == str(unet_folder)
        assert report["model"]["encoder"] == "mobilenet_v2"
    assert not list(out.glob("dynamic*")) and not list(out.glob("notes*"))


def test_cli_missing_input_is_a_one_line_error(
    unet_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A CT path that does not exist stops the command with one line naming it."""
    missing = tmp_path / "nowhere.nii.gz"
    code = main(["predict", str(missing), "--model", str(unet_folder), "-o", str(tmp_path / "o")])
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: {missing}: no such file or folder"


def test_mlflow_model_uri_gives_the_folder_models_labels(
    unet_folder: Path,
    phantom_cases: list[PhantomCase],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    empty_mlflow_db: Path,
) -> None:
    """The same weights logged to a temporary store, loaded by `models:/covidseg@champion`."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    shutil.copyfile(empty_mlflow_db, repo / "mlflow.db")  # the repository's store, still empty
    for name in MLFLOW_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(repo)
    model = build_model("Unet", "mobilenet_v2", None, 1)
    model.load_state_dict(torch.load(unet_folder / "model.pt", weights_only=True))
    with Tracker.start(Params(), stage="evaluate", root=repo) as tracker:
        uri = tracker.log_model(
            model.eval(),
            np.zeros((1, 1, 64, 64), np.float32),
            registered_name="covidseg",
            alias="champion",
            metadata=asdict(UNET_SPEC),
        )
    assert uri == "models:/covidseg@champion"
    case = phantom_cases[1]
    scan = write_scan(tmp_path / "radiopaedia_4_85506_1.nii.gz", case.image, case.affine, (1, 1))

    # a logged (exported) model never runs bf16; `auto` without bf16 gives it channels_last
    monkeypatch.setattr(precision_module, "cpu_bf16_pays", lambda: False)
    runs = ((str(unet_folder), "folder", "fp32"), (uri, "mlflow", "fp32"), (uri, "fast", "auto"))
    for model_ref, out, precision in runs:
        args = ["--model", model_ref, "-o", out, "--device", "cpu", "--precision", precision]
        code = main(["predict", str(scan), *args])
        assert code == 0
    assert load_predictor(uri, "cpu").options.precision == "auto"
    monkeypatch.setattr(precision_module, "cpu_bf16_pays", lambda: True)
    assert load_predictor(uri, "cpu").options.precision == "fp32"
    with pytest.raises(CovidSegError, match="int8 needs a model folder"):
        load_predictor(uri, "cpu", InferenceOptions(precision="int8"))

    folder_labels = read_labels(repo / "folder" / "radiopaedia_4_85506_1_seg.nii.gz")
    mlflow_labels = read_labels(repo / "mlflow" / "radiopaedia_4_85506_1_seg.nii.gz")
    assert 0 < folder_labels.mean() < 1  # both labels occur: the comparison means something
    np.testing.assert_array_equal(mlflow_labels, folder_labels)
    fast_labels = read_labels(repo / "fast" / "radiopaedia_4_85506_1_seg.nii.gz")
    np.testing.assert_array_equal(fast_labels, folder_labels)
    report = json.loads((repo / "mlflow" / "radiopaedia_4_85506_1_report.json").read_text())
    assert report["model"]["source"] == uri
    assert report["model"]["arch"] == "Unet"
    assert report["model"]["image_size"] == 64
