"""What happens when things go wrong: one test per fault, named for it.

Each fault ends in one clear line (no traceback), leaves no half-written output, and never lets
a diverged or damaged model reach a user. The fault table (docs/reference/faults.md)
lists these together with the older fault tests kept beside the code they cover.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import weakref
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pytest
import torch
from mirror_server import Fault, Mirror, MirrorServer
from phantoms import IMAGES, LUNG, PhantomCase
from stage_paths import train_paths
from tiny import TINY, merge

from covidseg import CovidSegError, stage
from covidseg.cli import main
from covidseg.config import DownloadParams, PrepareParams, SplitParams, parse_params
from covidseg.data.download import fetch_archives, sha256_of
from covidseg.data.intensity import check_encoding
from covidseg.data.prepare import prepare_dataset
from covidseg.data.volumes import grid_spacing
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, load_model, save_model
from covidseg.training.train import train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SPEC = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 64, (-1250.0, 250.0))


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("Unet", "mobilenet_v2", None, 1)
    save_model(tmp_path / "model", model.state_dict(), SPEC)
    return tmp_path / "model"


def write_scan(path: Path, case: PhantomCase) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(case.image), case.affine), path)
    return path


def only_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


# --- checkpoints --------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_damaged_checkpoint_is_set_aside_and_training_starts_afresh(
    prepared, tmp_path: Path, tracked, capsys, damage: str
) -> None:
    params = parse_params(merge(TINY, {"train": {"epochs": 1}}))
    paths = train_paths(tmp_path, prepared)
    paths.checkpoint_dir.mkdir()
    last = paths.checkpoint_dir / "last.pt"
    torch.save({"state": {"epoch": 1}, "model": torch.zeros(1000)}, last)
    last.write_bytes(last.read_bytes()[:300] if damage == "truncated" else b"")
    capsys.readouterr()
    summary = train(params, paths)
    assert summary is not None
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if "cannot be resumed" in line]
    assert len(notes) == 1 and "starting afresh" in notes[0] and "Traceback" not in err
    assert [p.name.split("-")[0] for p in paths.checkpoint_dir.glob("last.pt.corrupt-*")] == [
        "last.pt.corrupt"
    ]
    assert summary["epochs_run"] == 1 and (paths.model_dir / "model.pt").is_file()


class _Planted:
    """Unpickling this would create the file named in `marker`."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


def test_a_checkpoint_that_would_run_code_is_refused_without_running(
    prepared, tmp_path: Path, tracked, capsys
) -> None:
    marker = tmp_path / "pwned"
    probe = tmp_path / "probe.pkl"
    probe.write_bytes(pickle.dumps(_Planted(str(marker))))
    pickle.loads(probe.read_bytes())  # the planted pickle really runs code when unpickled...
    assert marker.exists()
    marker.unlink()
    params = parse_params(merge(TINY, {"train": {"epochs": 1}}))
    paths = train_paths(tmp_path, prepared)
    paths.checkpoint_dir.mkdir()
    torch.save({"state": {}, "payload": _Planted(str(marker))}, paths.checkpoint_dir / "last.pt")
    train(params, paths)
    assert not marker.exists()  # ...but training refused it without running it
    assert "cannot be resumed" in capsys.readouterr().err
    assert list(paths.checkpoint_dir.glob("last.pt.corrupt-*"))


# --- divergence --------------------------------------------------------------------------------


def test_a_diverging_training_stops_with_one_line_and_writes_no_model(
    prepared, tmp_path: Path, tracked
) -> None:
    params = parse_params(merge(TINY, {"train": {"lr": 1e8}}))
    paths = train_paths(tmp_path, prepared)
    with pytest.raises(CovidSegError) as caught:
        train(params, paths)
    message = str(caught.value)
    assert message.startswith("training diverged:") and "epoch 1" in message
    assert "\n" not in message
    assert not paths.model_dir.exists() and not paths.metrics.exists()


def test_a_nan_loss_names_epoch_and_step_and_keeps_the_best_model(
    prepared, tmp_path: Path, tracked, monkeypatch: pytest.MonkeyPatch
) -> None:
    from covidseg.training.losses import SegmentationLoss

    params = parse_params(merge(TINY, {"train": {"steps_per_epoch": 2}}))  # 2 epochs of 2 steps
    paths = train_paths(tmp_path, prepared)
    real_forward, calls = SegmentationLoss.forward, []

    def nan_at_epoch_two_step_two(self, logits, target):
        loss = real_forward(self, logits, target)
        if torch.is_grad_enabled():  # a training step, not validation
            calls.append(1)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(SegmentationLoss, "forward", nan_at_epoch_two_step_two)
    with pytest.raises(CovidSegError, match="NaN or infinite at epoch 2, step 2;"):
        train(params, paths)
    best = torch.load(paths.checkpoint_dir / "best.pt", weights_only=True)
    last = torch.load(paths.checkpoint_dir / "last.pt", weights_only=True)
    assert last["state"]["epoch"] == 1 and last["state"]["best_epoch"] == 1
    assert all(torch.equal(best[k], last["model"][k]) for k in best)  # epoch 1's weights
    assert not paths.model_dir.exists()


def test_an_exploding_loss_stops_when_asked(prepared, tmp_path: Path, tracked) -> None:
    from covidseg.training.checkpoint import EpochRow, State
    from covidseg.training.train import Diverged, Run, check_explosion

    params = parse_params(merge(TINY, {"train": {"max_loss_factor": 10}}))
    run = Run.__new__(Run)
    run.params = params
    losses = [cast(EpochRow, {"train_loss": loss}) for loss in (0.5, 0.8)]  # what it reads
    run.state = State(history=losses)
    check_explosion(run, 3, 4.9)  # under 10 x 0.5
    with pytest.raises(Diverged, match=r"epoch 3 \(5.1\) is over train\.max_loss_factor=10"):
        check_explosion(run, 3, 5.1)


# --- model folders ------------------------------------------------------------------------------


def test_truncated_model_weights_are_one_line(model_folder: Path) -> None:
    weights = model_folder / "model.pt"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CovidSegError) as caught:
        load_model(model_folder, CPU)
    assert str(caught.value).startswith(f"{weights}: damaged or not a weights file")
    assert "\n" not in str(caught.value)


def test_metadata_that_does_not_match_the_weights_is_one_line(model_folder: Path) -> None:
    spec = json.loads((model_folder / "model.json").read_text())
    (model_folder / "model.json").write_text(json.dumps({**spec, "encoder": "resnet18"}))
    with pytest.raises(CovidSegError) as caught:
        load_model(model_folder, CPU)
    message = str(caught.value)
    assert "weights do not fit Unet/resnet18" in message and "\n" not in message


def test_model_json_with_a_classes_count_against_its_labels_is_refused(
    model_folder: Path,
) -> None:
    spec = json.loads((model_folder / "model.json").read_text())
    (model_folder / "model.json").write_text(json.dumps({**spec, "classes": 4}))
    with pytest.raises(CovidSegError, match="do not match the label scheme"):
        load_model(model_folder, CPU)


def test_a_model_with_non_finite_weights_is_never_written_nor_loaded(
    model_folder: Path, tmp_path: Path
) -> None:
    weights = torch.load(model_folder / "model.pt", weights_only=True)
    weights[next(iter(weights))].view(-1)[0] = float("nan")
    with pytest.raises(CovidSegError, match="refusing to save a model with 1 non-finite"):
        save_model(tmp_path / "diverged", weights, SPEC)
    assert not (tmp_path / "diverged").exists()
    torch.save(weights, model_folder / "model.pt")  # planted by hand
    with pytest.raises(CovidSegError, match="NaN or infinite; the model diverged"):
        load_model(model_folder, CPU)


# --- predict ------------------------------------------------------------------------------------


def test_predict_refuses_two_inputs_with_one_output_name_before_any_work(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys
) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_scan(tmp_path / folder / "scan.nii.gz", phantom_cases[0])
    out = tmp_path / "out"
    code = main(
        [
            *("predict", str(tmp_path / "a"), str(tmp_path / "b" / "scan.nii.gz")),
            *("--model", str(model_folder), "-o", str(out), "--device", "cpu"),
        ]
    )
    assert code == 1
    line = only_line(capsys.readouterr().err)
    assert "would both write scan_seg.nii.gz" in line and "separate -o folders" in line
    assert not out.exists()


def test_predict_keeps_the_result_of_another_input_of_the_same_name(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_scan(tmp_path / folder / "scan.nii", phantom_cases[0])
    args = ["--model", str(model_folder), "-o", str(out), "--device", "cpu"]
    assert main(["predict", str(tmp_path / "a" / "scan.nii"), *args]) == 0
    first = (out / "scan_seg.nii.gz").read_bytes()
    assert main(["predict", str(tmp_path / "a" / "scan.nii"), *args]) == 0  # same input: fine
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "b" / "scan.nii"), *args]) == 1
    assert "already holds the result of another scan" in capsys.readouterr().err
    assert (out / "scan_seg.nii.gz").read_bytes() == first
    report = json.loads((out / "scan_report.json").read_text())
    assert report["input"] == str((tmp_path / "a" / "scan.nii").resolve())


def test_predict_output_naming_a_file_is_one_line(model_folder: Path, tmp_path: Path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    code = main(["predict", str(tmp_path), "--model", str(model_folder), "-o", str(target)])
    assert code == 1
    assert only_line(capsys.readouterr().err) == (
        f"error: -o {target}: is a file; name a folder for the outputs"
    )


def test_predict_with_an_mlflow_uri_outside_a_repository_creates_no_store(
    tmp_path: Path, phantom_cases: list[PhantomCase]
) -> None:
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_cases[0])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [
            *(Path(sys.executable).with_name("covidseg"), "predict", str(scan)),
            *("--model", "models:/covidseg@champion", "-o", "out"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    line = only_line(done.stderr)
    assert "no MLflow store at" in line and "MLFLOW_TRACKING_URI" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.nii.gz"]


# --- predict: outputs it does not own, geometry, metadata, headers ----------------------------


def predict_args(model: Path, out: Path) -> list[str]:
    return ["--model", str(model), "-o", str(out), "--device", "cpu"]


def error_lines(stderr: str) -> list[str]:
    """The `error:` lines among the progress bars."""
    return [part.strip() for part in re.split(r"[\r\n]", stderr) if part.startswith("error:")]


def the_error(stderr: str) -> str:
    """The one error line of a run (its progress bars aside); no traceback."""
    lines = error_lines(stderr)
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def everything_in(folder: Path) -> dict[str, bytes]:
    """Every file in `folder`, hidden temporaries included, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.mark.parametrize("ending", ["_seg.nii.gz", "_report.png", "_report.json"])
def test_predict_refuses_to_overwrite_an_output_it_did_not_write(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys, ending: str
) -> None:
    """E.g. reference masks kept in the -o folder: refused before any work, file untouched."""
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_cases[0])
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f"scan{ending}"
    theirs.write_bytes(b'{"note": "a reference mask, not ours"}')
    assert main(["predict", str(scan), *predict_args(model_folder, out)]) == 1
    why = (
        "is no predict report (it names no input)"
        if ending == "_report.json"
        else "no scan_report.json says predict wrote it"
    )
    assert the_error(capsys.readouterr().err) == (
        f"error: {scan}: {theirs} exists and {why}; refusing to overwrite it, move it or "
        "choose another -o folder"
    )
    assert everything_in(out) == {theirs.name: b'{"note": "a reference mask, not ours"}'}


# a fault between a scan's output files: (exit status, error line, outputs renamed into place
# before it); the labels, page and report are written as temporaries, then renamed in that order
OUTPUT_FAULTS = {
    "disk-full-writing-the-page": (
        1,
        "error: {scan}: OSError: [Errno 28] No space left on device",
        [],
    ),
    "ctrl-c-renaming-the-report": (
        130,
        "error: interrupted",
        ["scan_seg.nii.gz", "scan_report.png"],
    ),
}


@pytest.mark.parametrize("fault", OUTPUT_FAULTS)
def test_predict_fault_between_output_files_leaves_no_set_or_the_previous_one(
    fault: str,
    model_folder: Path,
    phantom_cases: list[PhantomCase],
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import covidseg.atomic as atomic_module
    import covidseg.inference.predict as predict_module

    status, error, placed_first = OUTPUT_FAULTS[fault]
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_cases[0])
    out = tmp_path / "out"
    real_replace = os.replace
    renamed: list[str] = []  # the outputs os.replace put in place, in order
    before_fault: list[list[str]] = []  # what was renamed when the fault fell

    def disk_full(*args: object, **kwargs: object) -> None:
        before_fault.append(list(renamed))
        raise OSError(errno.ENOSPC, "No space left on device")

    def recorded_replace(src: str | Path, dst: str | Path) -> None:
        name = Path(dst).name
        if fault.startswith("ctrl-c") and name == "scan_report.json" and name not in renamed:
            before_fault.append(list(renamed))
            renamed.append(name)
            raise KeyboardInterrupt  # the labels and the page are in place already
        if not name.startswith("."):  # not a temporary
            renamed.append(name)
        real_replace(src, dst)

    def faulty_predict() -> None:
        renamed.clear()
        with monkeypatch.context() as patch:
            patch.setattr(atomic_module.os, "replace", recorded_replace)
            if fault.startswith("disk-full"):
                patch.setattr(predict_module, "report_page", disk_full)  # the 2nd of 3 files
            assert main(["predict", str(scan), *predict_args(model_folder, out)]) == status
        assert the_error(capsys.readouterr().err) == error.format(scan=scan)
        assert before_fault == [placed_first]  # the fault fell where it was meant to
        before_fault.clear()

    faulty_predict()
    assert everything_in(out) == {}  # neither the labels nor the report, no temporaries
    assert main(["predict", str(scan), *predict_args(model_folder, out)]) == 0
    assert sorted(everything_in(out)) == ["scan_report.json", "scan_report.png", "scan_seg.nii.gz"]
    for name in ("scan_seg.nii.gz", "scan_report.png"):  # told apart from the rerun's
        (out / name).write_bytes(b"the earlier run's " + name.encode())
    complete = everything_in(out)
    faulty_predict()
    assert everything_in(out) == complete  # the earlier set, whole, and nothing else


def sheared(affine: np.ndarray, factor: float) -> np.ndarray:
    """`affine` with its slice axis (the largest step) tilted along another axis by `factor`
    of its length, keeping the voxel volume |det| (a tilted gantry)."""
    out = np.array(affine, dtype=np.float64)
    slice_axis = int(np.argmax(np.linalg.norm(out[:3, :3], axis=0)))
    other = (slice_axis + 1) % 3
    step = np.linalg.norm(out[:3, slice_axis])
    out[:3, slice_axis] += factor * step * out[:3, other] / np.linalg.norm(out[:3, other])
    return out


def test_a_sheared_affine_gives_the_volume_of_the_orthogonal_grid(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path
) -> None:
    """Voxel volume is |det| of the affine's 3x3, not the product of its column norms."""
    case = phantom_cases[0]
    tilted = sheared(case.affine, 0.7)
    det = abs(np.linalg.det(case.affine[:3, :3]))
    assert abs(np.linalg.det(tilted[:3, :3])) == pytest.approx(det)
    norms = np.prod(np.linalg.norm(tilted[:3, :3], axis=0))
    assert norms > 1.2 * det  # column norms would inflate every volume by over 20 %
    reports = {}
    for name, affine in (("straight", case.affine), ("tilted", tilted)):
        scan = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(case.image), affine), scan)
        assert main(["predict", str(scan), *predict_args(model_folder, tmp_path / name)]) == 0
        reports[name] = json.loads((tmp_path / name / f"{name}_report.json").read_text())
    assert reports["straight"]["lesion_volume_ml"] > 1  # something to compare
    tilted_ml, straight_ml = (reports[k]["lesion_volume_ml"] for k in ("tilted", "straight"))
    assert tilted_ml == pytest.approx(straight_ml, abs=1.5e-3)  # both rounded to 0.001 mL
    assert np.prod(reports["tilted"]["voxel_spacing_mm"]) == pytest.approx(det, rel=1e-3)
    spacing = grid_spacing(tilted[:, [2, 1, 0, 3]])  # the slice axis first, as after reorient
    assert spacing[1:] == pytest.approx((0.8, 0.8)) and np.prod(spacing) == pytest.approx(det)


def test_a_singular_affine_is_one_line(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys
) -> None:
    case = phantom_cases[0]
    affine = np.array(case.affine)
    affine[:3, 2] = affine[:3, 0]  # two voxel axes along one line: no volume
    scan = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(case.image), affine), scan)
    assert main(["predict", str(scan), *predict_args(model_folder, tmp_path / "out")]) == 1
    assert the_error(capsys.readouterr().err) == (
        "error: flat: flat.nii.gz: the affine is singular (|det| of its 3x3 is 0 mm^3: its "
        "voxel axes span no volume); the header's geometry is broken"
    )
    assert not list((tmp_path / "out").iterdir())


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"hu_window": [250, -1250]}, "hu_window: needs low < high, got [250.0, -1250.0]"),
        ({"image_dtype": "uint8"}, "image_dtype: Input should be 'float16' or 'float32'"),
        (
            {"hu_window": ["low", -1250]},
            "hu_window.0: Input should be a valid number, unable to parse string as a number",
        ),
        (
            {"hu_window": [-1e39, 1e39]},
            "hu_window: needs both ends within [-100000, 100000] HU and at least 1 HU apart, "
            "got [-1e+39, 1e+39]",
        ),
        ({"image_size": 50}, "image_size: must be a multiple of 32 (encoder strides), got 50"),
    ],
    ids=["inverted_window", "other_dtype", "non_numeric_window", "overflowing_window", "size"],
)
def test_model_json_with_a_recipe_params_would_refuse_is_one_line_naming_it(
    model_folder: Path,
    phantom_cases: list[PhantomCase],
    tmp_path: Path,
    capsys,
    change: dict[str, object],
    reason: str,
) -> None:
    """Checked by `prepare`'s own validation: no silent wrong volume, no traceback."""
    path = model_folder / "model.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    scan = write_scan(tmp_path / "scan.nii.gz", phantom_cases[0])
    out = tmp_path / "out"
    assert main(["predict", str(scan), *predict_args(model_folder, out)]) == 1
    assert the_error(capsys.readouterr().err) == f"error: {path}: {reason}"
    assert not out.exists()


def test_an_overflowing_hu_window_is_a_params_error() -> None:
    with pytest.raises(CovidSegError) as caught:
        parse_params({"prepare": {"hu_window": [-1e39, 1e39]}}, "params.yaml")
    assert str(caught.value) == (
        "params.yaml: prepare.hu_window: needs both ends within [-100000, 100000] HU and at "
        "least 1 HU apart, got [-1e+39, 1e+39]"
    )


def test_the_datasets_naming_rule_never_applies_to_a_users_scan(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys
) -> None:
    """A HU scan named `radiopaedia_*` is predicted (by its values); the dataset still holds
    that name to its uint8 encoding; values that are neither encoding are one line."""
    hu = np.asarray(phantom_cases[0].image)
    low, high = int(hu.min()) + 2000, int(hu.max()) + 2000
    with pytest.raises(CovidSegError, match="the dataset stores 'uint8' for this name"):
        check_encoding(hu, "radiopaedia_mine")
    mine = write_scan(tmp_path / "radiopaedia_mine.nii.gz", phantom_cases[0])
    odd = tmp_path / "odd.nii.gz"
    nib.save(nib.Nifti1Image((hu + 2000).astype(np.int16), phantom_cases[0].affine), odd)
    out = tmp_path / "out"
    assert main(["predict", str(mine), str(odd), *predict_args(model_folder, out)]) == 1
    assert [the_error(capsys.readouterr().err)] == [
        f"error: odd: cannot tell the intensity encoding (values {low}..{high} are neither "
        "Hounsfield units, which reach below 0 in air, nor the 0-255 lung-window encoding)"
    ]
    assert sorted(p.name for p in out.iterdir()) == [
        "radiopaedia_mine_report.json",
        "radiopaedia_mine_report.png",
        "radiopaedia_mine_seg.nii.gz",
    ]


def header_only(path: Path, shape: tuple[int, ...], dtype: type = np.int16) -> Path:
    """A NIfTI header claiming `shape` x `dtype`, followed by a few zero bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw, mtime=0) if path.name.endswith(".gz") else raw)
    return path


# the peak resident memory of this process (VmHWM; `ru_maxrss` would carry over the peak of a
# large parent such as a pytest-xdist worker, since it survives fork and exec)
READ_AND_MEASURE = """
import sys
from pathlib import Path
from covidseg import CovidSegError
from covidseg.data.volumes import read_nifti
try:
    read_nifti(Path(sys.argv[1]), "case")
except CovidSegError as error:
    print(error)
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


@pytest.mark.parametrize(
    ("name", "shape", "claim"),
    [
        (
            "bomb.nii.gz",
            (1024, 1024, 2048),
            "claims 1024x1024x2048 int16 voxels (4.29 GB) but holds {size} bytes, more than "
            "gzip can compress into that (1100:1); damaged or not a scan",
        ),
        (
            "huge.nii.gz",
            (30000, 30000, 1000),
            "claims 30000x30000x1000 int16 voxels (1.8 TB), over the limit of 2147483648 voxels",
        ),
        (
            "short.nii",
            (512, 512, 300),
            "claims 512x512x300 int16 voxels (157 MB) but the file has {size} bytes; truncated?",
        ),
    ],
    ids=["gz_claiming_4GB", "30000x30000x1000", "short_nii"],
)
def test_a_header_claiming_more_than_the_file_holds_is_refused_before_allocating(
    model_folder: Path, tmp_path: Path, capsys, name: str, shape: tuple[int, ...], claim: str
) -> None:
    path = header_only(tmp_path / name, shape)
    size = path.stat().st_size
    assert size < 500
    expected = f"{path.name.split('.')[0]}: {name} " + claim.format(size=size)
    assert main(["predict", str(path), *predict_args(model_folder, tmp_path / "out")]) == 1
    assert the_error(capsys.readouterr().err) == f"error: {expected}"
    done = subprocess.run(
        [sys.executable, "-c", READ_AND_MEASURE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    message, peak = done.stdout.splitlines()
    assert message == expected.replace(path.name.split(".")[0], "case", 1)
    assert int(peak) < 2**30  # the header's claim was never allocated


@pytest.mark.parametrize("kind", ["rgb24", "three_channels"])
def test_a_colour_nifti_is_one_line_and_the_other_scans_go_on(
    model_folder: Path, phantom_cases: list[PhantomCase], tmp_path: Path, capsys, kind: str
) -> None:
    case = phantom_cases[0]
    if kind == "rgb24":
        colour = np.zeros(case.image.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
        reason = "photo.nii.gz holds RGB voxels, not CT intensities"
    else:
        colour = np.stack([np.asarray(case.image)] * 3, axis=-1)
        reason = "photo.nii.gz is not a 3D volume (shape (64, 64, 12, 3): colour channels?)"
    nib.save(nib.Nifti1Image(colour, case.affine), tmp_path / "photo.nii.gz")
    scan = write_scan(tmp_path / "scan.nii.gz", case)
    out = tmp_path / "out"
    photo = tmp_path / "photo.nii.gz"
    assert main(["predict", str(photo), str(scan), *predict_args(model_folder, out)]) == 1
    assert [the_error(capsys.readouterr().err)] == [f"error: photo: {reason}"]
    assert sorted(p.name for p in out.iterdir()) == [
        "scan_report.json",
        "scan_report.png",
        "scan_seg.nii.gz",
    ]


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_an_output_folder_that_cannot_be_made_or_written_is_one_line(
    model_folder: Path,
    phantom_cases: list[PhantomCase],
    tmp_path: Path,
    capsys,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    import covidseg.inference.predict as predict_module

    scan = write_scan(tmp_path / "scan.nii.gz", phantom_cases[0])
    (tmp_path / "taken").write_text("x")
    if where == "under_a_file":
        out = tmp_path / "taken" / "out"
        expected = f"error: -o {out}: cannot create the folder ({tmp_path / 'taken'} is a file)"
    else:  # root may write anywhere: the permission check is what is simulated
        out = tmp_path / "out"
        monkeypatch.setattr(predict_module.os, "access", lambda path, mode: Path(path) != out)
        expected = f"error: -o {out}: the folder is not writable"
    assert main(["predict", str(scan), *predict_args(model_folder, out)]) == 1
    assert the_error(capsys.readouterr().err) == expected


# --- prepare ------------------------------------------------------------------------------------


def test_a_killed_prepare_leaves_no_temporary_folder_after_the_next_run(
    raw_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "data" / "prepared"
    stale = tmp_path / "data" / ".prepared.tmp-abc123"  # what a killed run leaves
    (stale / "deep").mkdir(parents=True)
    (stale / "deep" / "big.h5").write_bytes(b"\0" * 1000)
    prepare_dataset(
        PrepareParams(image_size=64),
        SplitParams(scheme="kfold", n_folds=2, folds=(0, 1)),
        raw_dir=raw_dir,
        out_dir=out,
        splits_path=tmp_path / "data" / "splits.json",
    )
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["prepared", "splits.json"]


# --- download -----------------------------------------------------------------------------------


def test_a_corrupt_leftover_part_is_downloaded_again_once(
    http_mirror: MirrorServer, mirror: Mirror, tmp_path: Path, capsys
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    size = (mirror.dir / IMAGES).stat().st_size
    (cache / f"{IMAGES}.part").write_bytes(b"\x55" * (size // 2))  # garbage to resume on top of
    params = DownloadParams(base_url=http_mirror.url, sha256=mirror.sha256, backoff_s=0)
    fetch_archives(params, cache_dir=cache, raw_dir=tmp_path / "raw")
    assert sha256_of(cache / IMAGES) == mirror.sha256[IMAGES]
    assert [r.range is not None for r in http_mirror.requests_for(IMAGES)] == [True, False]
    assert "partial download left by an earlier run was corrupt" in capsys.readouterr().err


def test_a_download_that_keeps_dropping_but_progresses_completes(
    http_mirror: MirrorServer, mirror: Mirror, tmp_path: Path
) -> None:
    size = (mirror.dir / IMAGES).stat().st_size
    cuts = [Fault(cut_after=size // 8) for _ in range(6)]  # 6 drops, each after new bytes
    http_mirror.fail(IMAGES, *cuts)
    params = DownloadParams(base_url=http_mirror.url, sha256=mirror.sha256, retries=2, backoff_s=0)
    fetch_archives(params, cache_dir=tmp_path / "cache", raw_dir=tmp_path / "raw")
    assert len(http_mirror.requests_for(IMAGES)) == 7  # more attempts than the 2 retries
    assert sha256_of(tmp_path / "cache" / IMAGES) == mirror.sha256[IMAGES]


def test_a_download_without_progress_gives_up_after_the_retries(
    http_mirror: MirrorServer, mirror: Mirror, tmp_path: Path
) -> None:
    http_mirror.fail(LUNG, *[Fault(status=503)] * 3)
    params = DownloadParams(base_url=http_mirror.url, sha256=mirror.sha256, retries=2, backoff_s=0)
    with pytest.raises(CovidSegError, match="failed after 3 attempts without progress"):
        fetch_archives(params, cache_dir=tmp_path / "cache", raw_dir=tmp_path / "raw")


def test_a_terminated_stage_stops_like_ctrl_c(tmp_path: Path) -> None:
    """SIGTERM (a timeout, `dvc queue kill`) is handled as Ctrl-C: runs end as KILLED."""
    import signal
    import time

    params = {"download": {"base_url": "http://127.0.0.1:9/x", "retries": 20, "backoff_s": 5}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    stage = subprocess.Popen(
        [sys.executable, str(ROOT / "stages" / "download.py"), "--cache", "c", "--out", "raw"],
        cwd=tmp_path,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(4)  # inside the retry loop
    stage.send_signal(signal.SIGTERM)
    _, stderr = stage.communicate(timeout=60)
    assert stage.returncode == 130
    assert stderr.strip().splitlines()[-1] == "error: interrupted"
    assert not (tmp_path / "raw").exists()


def test_a_ctrl_c_swallowed_by_a_finalizer_is_raised_at_the_next_check() -> None:
    """Python only prints a KeyboardInterrupt raised while a weakref callback runs; the
    training loop checks for it at every step, so the stage still stops."""

    class Thing:
        pass

    thing = Thing()
    weakref.finalize(thing, stage._interrupt, signal.SIGINT, None)
    try:
        del thing  # the finalizer runs and its KeyboardInterrupt is swallowed
        with pytest.raises(KeyboardInterrupt):
            stage.check_interrupt()
    finally:
        stage.INTERRUPTED.clear()
    stage.check_interrupt()  # cleared: nothing raised
