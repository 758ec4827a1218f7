"""The whole workflow with DVC and MLflow: repro, exp run, metrics diff, queue, resume."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_repo import TINY, dvc, env, make_repo, merge, run

pytestmark = pytest.mark.slow


def mlflow_runs(repo: Path) -> list:
    """Every run in the repository's default MLflow store."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("covidseg")
    return client.search_runs([experiment.experiment_id]) if experiment else []


def read_log(repo: Path) -> list[dict[str, str]]:
    with (repo / "metrics" / "train_log.csv").open() as f:
        return list(csv.DictReader(f))


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
def repo(tmp_path: Path, mirror) -> Path:
    params = {**TINY, "download": {"base_url": str(mirror.dir), "sha256": mirror.sha256}}
    return make_repo(tmp_path / "repo", params)


def test_repro_exp_run_metrics_diff_and_queue(repo: Path) -> None:
    result = dvc(repo, "repro")
    for stage in ("download", "prepare", "train", "evaluate"):
        assert f"Running stage '{stage}'" in result.stdout
    summary = json.loads((repo / "metrics" / "evaluate.json").read_text())
    assert {"dice", "nsd", "hd95", "dice_std", "n_cases"} <= set(summary)
    assert summary["n_cases"] == 1 and 0.0 <= summary["dice"] <= 1.0
    header = (repo / "metrics" / "per_case.csv").read_text().splitlines()[0].split(",")
    assert header[:4] == ["case", "dice", "nsd", "hd95"]
    assert list((repo / "reports" / "overlays").glob("*.png"))
    assert [int(float(r["epoch"])) for r in read_log(repo)] == [1, 2]

    (first,) = mlflow_runs(repo)
    assert first.data.params["encoder"] == "mobilenet_v2"
    assert "dice" in first.data.metrics and "val_dice" in first.data.metrics
    assert first.info.status == "FINISHED"
    assert first.data.tags.get("mlflow.source.git.commit")

    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "baseline results")
    dvc(repo, "exp", "run", "-S", "encoder=efficientnet-b0")
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)
    dice = diff["metrics/evaluate.json"]["dice"]
    assert isinstance(dice["old"], float) and isinstance(dice["new"], float)
    assert len(mlflow_runs(repo)) == 2

    dvc(repo, "exp", "run", "--queue", "-S", "train.seed=1", "-S", "train.epochs=1")
    dvc(repo, "exp", "run", "--queue", "-S", "train.seed=2", "-S", "train.epochs=1")
    dvc(repo, "queue", "start")
    status = wait_for_queue(repo)
    assert status.count("Success") == 2, status
    runs = mlflow_runs(repo)
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    queued = [r for r in runs if r.data.tags.get("dvc.exp_name")]
    assert len(queued) >= 2
    assert not list((repo / ".dvc" / "tmp" / "exps").rglob("mlflow.db"))  # all in the real store


def test_interrupted_repro_resumes_and_matches_an_uninterrupted_run(
    repo: Path, tmp_path: Path, mirror
) -> None:
    longer = {"train": {"epochs": 3}}
    dvc(repo, "repro", "prepare")
    params_path = repo / "params.yaml"
    params = merge(yaml.safe_load(params_path.read_text()), longer)
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    process = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "train"],
        cwd=repo,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    checkpoint = repo / "models" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert checkpoint.exists(), process.communicate()[0][-3000:]
    os.killpg(process.pid, signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0, output[-2000:]
    done = len(read_log(repo))
    assert 1 <= done < 3

    resumed = dvc(repo, "repro", "train")
    assert f"resuming after epoch {done}" in resumed.stdout + resumed.stderr
    log = read_log(repo)
    assert [int(float(r["epoch"])) for r in log] == [1, 2, 3]
    assert len(mlflow_runs(repo)) == 1  # the resumed training kept its MLflow run

    reference = make_repo(
        tmp_path / "reference",
        merge({**TINY, "download": {"base_url": str(mirror.dir), "sha256": mirror.sha256}}, longer),
    )
    dvc(reference, "repro", "train")
    assert [r["train_loss"] for r in read_log(reference)] == [r["train_loss"] for r in log]
    assert [r["val_dice"] for r in read_log(reference)] == [r["val_dice"] for r in log]
