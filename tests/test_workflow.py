"""The whole workflow with DVC and MLflow: repro, exp run, metrics diff, queue, resume."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_repo import CvRepo, copy_repo, dvc, env
from tiny import merge

pytestmark = pytest.mark.slow


def mlflow_runs(repo: Path) -> list:
    """Every run in the repository's default MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidseg")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def read_log(repo: Path, fold: int = 0) -> list[dict[str, str]]:
    with (repo / "metrics" / "folds" / "logs" / f"fold-{fold}.csv").open() as f:
        return list(csv.DictReader(f))


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def run_env(repo: Path, environ: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=repo, env=environ, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def set_params(repo: Path, changes: dict) -> None:
    path = repo / "params.yaml"
    path.write_text(
        yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes), sort_keys=False)
    )


EXP_SHOW = (
    *("--no-pager", "--only-changed", "--drop"),
    "Created|State|Executor|.*/.*|folds\\..*|counts\\..*|iou.*|sensitivity.*|precision.*|.*volume.*",
)

ONE_FOLD = ("-S", "split.folds=[0]", "-S", "train.epochs=1")


def wait_for_queue(repo: Path, timeout: float = 900) -> str:
    """Poll `dvc queue status` until nothing is queued or running."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    raise AssertionError(f"queue still busy after {timeout} s:\n{status}")


@pytest.fixture
def repo(tmp_path: Path, cv_repo: CvRepo) -> Path:
    """A copy of the reproduced three-fold CV, the test's own."""
    return copy_repo(cv_repo.path, tmp_path / "repo")


def test_cross_validation_repro_table_folds_mlflow_and_exp_diff(
    cv_repo: CvRepo, repo: Path
) -> None:
    # an interrupted CV (`dvc repro train@0 train@1`), then the whole pipeline: see `cv_repo`
    first = [line for line in cv_repo.first.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'train@0':" in first and "Running stage 'train@1':" in first
    assert not any("'train@2'" in line or "evaluate" in line for line in first), first
    ran = [line for line in cv_repo.second.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'train@2':" in ran
    assert not any("'train@0'" in line or "'train@1'" in line for line in ran), ran
    for stage in ("evaluate@0", "evaluate@1", "evaluate@2", "aggregate"):
        assert f"Running stage '{stage}':" in ran

    per_case = read_csv(repo / "metrics" / "per_case.csv")
    assert list(per_case[0])[:5] == ["case", "fold", "dice", "nsd", "hd95"]
    cases = sorted(r["case"] for r in per_case)
    assert len(cases) == len(set(cases)) == 3  # kfold over 3 cases: each tested exactly once
    summary = json.loads((repo / "metrics" / "evaluate.json").read_text())
    dices = [float(r["dice"]) for r in per_case]
    assert summary["n_cases"] == 3
    assert summary["dice"] == pytest.approx(sum(dices) / 3)
    assert summary["dice_std"] == pytest.approx(float(np.std(dices)))
    assert sorted(summary["folds"]) == ["0", "1", "2"]
    table = (repo / "reports" / "benchmark" / "benchmark.md").read_text()
    for fold, values in summary["folds"].items():
        assert float(next(r["dice"] for r in per_case if r["fold"] == fold)) == pytest.approx(
            values["dice"]
        )  # one case per fold: the fold's mean is that case
        assert f"| Fold{fold} | {values['dice']:.4f} ± 0.0000 |" in table  # one case: std 0
    assert f"| Avg | {summary['dice']:.4f} ± {summary['dice_std']:.4f} |" in table
    assert (repo / "reports" / "benchmark" / "benchmark.png").stat().st_size > 0
    assert len(read_csv(repo / "metrics" / "per_fold.csv")) == 3

    runs = mlflow_runs(repo)
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["covidseg.fold"] for r in children) == ["0", "1", "2"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.metrics["dice"] == pytest.approx(summary["dice"])
    assert all("dice" in r.data.metrics and "val_dice" in r.data.metrics for r in children)
    assert parent.data.tags.get("mlflow.source.git.commit")

    dvc(repo, "exp", "run", "-S", "encoder=efficientnet-b0")
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    dice = diff["metrics/evaluate.json"]["dice"]
    assert isinstance(dice["old"], float) and isinstance(dice["new"], float)
    screen = {**env(), "COLUMNS": "120"}  # a terminal of 120 columns
    shown = run_env(repo, screen, sys.executable, "-m", "dvc", "exp", "show", *EXP_SHOW).stdout
    assert "efficientnet-b0" in shown and "dice_std" in shown and "hd95" in shown, shown
    assert "…" not in shown, shown  # nothing cut off: it fits
    rows = dvc(repo, "metrics", "diff").stdout.splitlines()
    assert len(rows) <= 40 and not any("counts." in row for row in rows), rows
    assert len(mlflow_runs(repo)) == 8  # a second parent with three folds


def test_queued_single_fold_experiments_land_in_the_real_store(repo: Path) -> None:
    before = {r.info.run_id for r in mlflow_runs(repo)}
    for seed in ("1", "2"):
        dvc(repo, "exp", "run", "--queue", *ONE_FOLD, "-S", f"train.seed={seed}")
    dvc(repo, "queue", "start")
    status = wait_for_queue(repo)
    assert status.count("Success") == 2, status
    runs = [r for r in mlflow_runs(repo) if r.info.run_id not in before]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)  # 2 x (CV + fold)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len({r.data.tags.get("dvc.exp_name") for r in parents}) == 2
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))  # all in the real store


def test_interrupted_repro_resumes_and_matches_an_uninterrupted_run(
    repo: Path, tmp_path: Path, cv_repo: CvRepo
) -> None:
    longer = {"train": {"epochs": 3}}
    set_params(repo, longer)
    shutil.rmtree(repo / "models" / "checkpoints")  # a fold never trained in this workspace
    before = {r.info.run_id for r in mlflow_runs(repo)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train@0"],
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    checkpoint = repo / "models" / "checkpoints" / "fold-0" / "last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), process.communicate()[0][-3000:]
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output[-2000:]
    done = len(read_log(repo))
    assert 1 <= done < 3

    resumed = dvc(repo, "repro", "train@0")
    assert f"resuming after epoch {done}" in resumed.stdout + resumed.stderr
    log = read_log(repo)
    assert [int(float(r["epoch"])) for r in log] == [1, 2, 3]
    new = [r for r in mlflow_runs(repo) if r.info.run_id not in before]
    assert len(new) == 2  # the resumed fold kept its run (and its CV parent)

    reference = copy_repo(cv_repo.path, tmp_path / "reference")
    set_params(reference, longer)
    shutil.rmtree(reference / "models" / "checkpoints")
    dvc(reference, "repro", "train@0")
    assert [r["train_loss"] for r in read_log(reference)] == [r["train_loss"] for r in log]
    assert [r["val_dice"] for r in read_log(reference)] == [r["val_dice"] for r in log]
