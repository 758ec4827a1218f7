"""What happens when things go wrong: one test per fault, named for it.

Each fault ends in one clear line (no traceback), leaves no half-written output, and never lets
a diverged or damaged model reach a user. The README's "What happens when things go wrong"
lists these together with the older fault tests kept beside the code they cover.
"""

from __future__ import annotations

import json
import os
import pickle
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
from tiny import TINY, merge

from covidseg import CovidSegError, stage
from covidseg.cli import main
from covidseg.config import DownloadParams, PrepareParams, SplitParams, parse_params
from covidseg.data.download import fetch_archives, sha256_of
from covidseg.data.prepare import prepare_dataset
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, load_model, save_model
from covidseg.training.train import TrainPaths, train

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
SPEC = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 64, (-1250.0, 250.0))


def train_paths(tmp_path: Path, prepared: tuple[Path, Path]) -> TrainPaths:
    return TrainPaths(
        data_dir=prepared[0],
        splits=prepared[1],
        model_dir=tmp_path / "model",
        checkpoint_dir=tmp_path / "ckpt",
        metrics=tmp_path / "train.json",
        log=tmp_path / "log.csv",
    )


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
