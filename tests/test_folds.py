"""Cross-validation pieces that need no DVC: the fold ensemble and the aggregate tables."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from phantoms import PhantomCase

from covidseg import CovidSegError
from covidseg.config import parse_params
from covidseg.evaluation.aggregate import benchmark_report, read_fold_rows, summary_of
from covidseg.inference.ensemble import FoldEnsemble, load_ensemble
from covidseg.inference.predict import load_predictor, predict_scan
from covidseg.inference.segment import InferenceOptions, predict_volume
from covidseg.training.model import build_model
from covidseg.training.modelio import ModelSpec, save_model

CPU = torch.device("cpu")
SPEC = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 64, (-1250.0, 250.0))
FP32 = InferenceOptions(precision="fp32", batch_size=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`models/fold-0` and `models/fold-1`: two different untrained U-Nets, outputs scaled so
    that their probabilities spread over (0, 1)."""
    root = tmp_path_factory.mktemp("cv") / "models"
    for fold in (0, 1):
        torch.manual_seed(fold)
        model = build_model("Unet", "mobilenet_v2", None, 1).eval()
        with torch.no_grad():
            for parameter in model.get_submodule("segmentation_head").parameters():
                parameter.mul_(30.0)
        spec = replace(SPEC, folds=[fold], run_id=f"run-{fold}")
        save_model(root / f"fold-{fold}", model.state_dict(), spec)
    return root


def test_the_ensemble_is_the_mean_of_the_fold_probabilities(models: Path) -> None:
    image = np.random.default_rng(0).random((3, 64, 64), dtype=np.float32)
    ensemble, spec = load_ensemble(models, CPU)
    assert isinstance(ensemble, FoldEnsemble) and spec.folds == [0, 1] and spec.run_id is None
    together = predict_volume(ensemble, image, CPU, options=FP32)
    apart = [predict_volume(m, image, CPU, options=FP32) for m in ensemble.members]
    assert not np.allclose(apart[0], apart[1], atol=0.05)  # the folds really differ
    np.testing.assert_allclose(together, (apart[0] + apart[1]) / 2, atol=1e-5)


def test_predict_with_the_models_folder_uses_every_fold_and_says_so(
    models: Path, phantom_cases: list[PhantomCase], tmp_path: Path
) -> None:
    case = phantom_cases[0]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(case.image), case.affine), scan)
    ensemble = load_predictor(str(models), "cpu", FP32)
    single = load_predictor(str(models / "fold-1"), "cpu", FP32)
    both = predict_scan(ensemble, scan, tmp_path / "both")
    one = predict_scan(single, scan, tmp_path / "one")
    assert both["model"]["folds"] == [0, 1] and one["model"]["folds"] == [1]
    assert both["model"]["source"] == str(models)
    assert both["lesion_volume_ml"] != one["lesion_volume_ml"]


def test_folds_of_different_models_are_refused(models: Path, tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    for fold, encoder in ((0, "mobilenet_v2"), (1, "resnet18")):
        model = build_model("Unet", encoder, None, 1)
        spec = replace(SPEC, encoder=encoder, folds=[fold])
        save_model(mixed / f"fold-{fold}", model.state_dict(), spec)
    with pytest.raises(CovidSegError, match="differ in more than their training runs"):
        load_ensemble(mixed, CPU)


def write_fold(root: Path, fold: int, rows: list[tuple[str, float, float]]) -> None:
    folder = root / str(fold)
    folder.mkdir(parents=True)
    with (folder / "per_case.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["case", "dice", "nsd", "hd95"])
        for case, dice, nsd in rows:
            writer.writerow([case, dice, nsd, "" if dice == 0 else 5.0])


def test_aggregate_means_are_over_all_cases_and_per_fold(tmp_path: Path) -> None:
    write_fold(tmp_path, 0, [("a", 0.8, 0.9), ("b", 0.6, 0.7)])
    write_fold(tmp_path, 2, [("c", 0.1, 0.2), ("d", 0.0, 0.1)])
    rows = read_fold_rows(tmp_path, 0) + read_fold_rows(tmp_path, 2)
    summary = summary_of(rows, [0, 2])
    assert summary.overall["n_cases"] == 4
    assert summary.overall["dice"] == pytest.approx(0.375)
    assert summary.overall["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.1, 0.0]))
    assert summary.folds["0"]["dice"] == pytest.approx(0.7)
    assert summary.folds["2"]["nsd"] == pytest.approx(0.15)
    assert summary.overall["hd95_n"] == 3  # the empty prediction's HD95 is undefined
    json.dumps(summary.to_json(), allow_nan=False)  # strict JSON


def test_the_report_sets_each_fold_beside_the_published_numbers(tmp_path: Path) -> None:
    write_fold(tmp_path, 4, [("a", 0.5, 0.6), ("b", 0.7, 0.8)])
    summary = summary_of(read_fold_rows(tmp_path, 4), [4])
    params = parse_params({"split": {"scheme": "benchmark", "protocol": "16_4", "folds": [4]}})
    report = benchmark_report(summary, params, multi=False)
    assert "| Fold4 | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | 0.6575 ± 0.4195 | 0.6886 ± 0.4232 |" in (
        report
    )
    assert "| Avg | 0.6000 ± 0.1000 | 0.7000 ± 0.1000 | 0.7769 ± 0.1868 | 0.8083 ± 0.1985 |" in (
        report
    )
    kfold = parse_params({"split": {"scheme": "kfold", "n_folds": 5, "folds": [4]}})
    assert "No published numbers for this split" in benchmark_report(summary, kfold, multi=False)


@pytest.mark.parametrize(
    ("split", "per_fold", "note"),
    [
        ({"scheme": "kfold", "n_folds": 5}, [3, 1], "1 to 3 test cases per fold make"),
        ({"scheme": "benchmark", "protocol": "4_16"}, [16, 16], "16 test cases per fold make"),
        ({"scheme": "kfold", "n_folds": 20}, [1, 1], "1 test case per fold makes"),
        (
            {"scheme": "benchmark", "protocol": "16_4"},
            [4, 4],
            "4 test cases per fold make single-fold numbers noisy (published fold 4: 0.66 ± 0.42",
        ),
    ],
)
def test_the_report_notes_the_runs_own_test_cases_per_fold(
    tmp_path: Path, split: dict[str, object], per_fold: list[int], note: str
) -> None:
    for fold, count in enumerate(per_fold):
        write_fold(tmp_path, fold, [(f"case_{fold}_{i}", 0.5, 0.5) for i in range(count)])
    rows = [row for fold in range(len(per_fold)) for row in read_fold_rows(tmp_path, fold)]
    params = parse_params({"split": {**split, "folds": list(range(len(per_fold)))}})
    report = benchmark_report(summary_of(rows, [0, 1]), params, multi=False)
    (line,) = [line for line in report.splitlines() if "per fold" in line]
    assert line.startswith(f"- {note}") and line.endswith(": compare experiments on Avg."), line
    assert ("published fold 4" in line) == (split.get("protocol") == "16_4")


def test_a_missing_fold_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(CovidSegError, match="run evaluate for fold 3"):
        read_fold_rows(tmp_path, 3)


def test_the_logged_ensemble_predicts_through_its_mlflow_uri(
    models: Path,
    phantom_cases: list[PhantomCase],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from covidseg.config import Params
    from covidseg.tracking import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)
    ensemble, spec = load_ensemble(models, CPU)
    tracker = Tracker.start_parent(Params(), root=tmp_path)
    uri = tracker.log_model(
        ensemble,
        np.zeros((1, 1, 64, 64), np.float32),
        registered_name="covidseg",
        alias="champion",
        metadata=spec.to_json(),
    )
    tracker.end()
    assert uri == "models:/covidseg@champion"
    case = phantom_cases[0]
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(case.image), case.affine), scan)
    logged = load_predictor(uri, "cpu", InferenceOptions())  # default precision: auto
    report = predict_scan(logged, scan, tmp_path / "out")
    folder = predict_scan(load_predictor(str(models), "cpu", FP32), scan, tmp_path / "folder")
    assert report["model"]["folds"] == [0, 1] and report["model"]["source"] == uri
    assert report["lesion_volume_ml"] == pytest.approx(folder["lesion_volume_ml"], rel=0.01)
