"""MLflow tracking against a throwaway sqlite store laid out like a DVC repository."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from mlflow.entities import Run

from covidseg.config import EvaluateParams, Params, TrackingParams
from covidseg.errors import CovidSegError
from covidseg.tracking import (
    Tracker,
    default_tracking_uri,
    load_model,
    repo_root,
    tracking_uri,
)

ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git repository with `.dvc/`, shared by the tests (each uses its own experiment)."""
    root = tmp_path_factory.mktemp("repo")
    (root / ".dvc").mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=root, check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "init"], cwd=root, check=True)
    return root


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, repo: Path) -> None:
    """No inherited MLflow or DVC settings; what MLflow sets in os.environ is undone after."""
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(repo)


def head(repo: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def params(experiment: str, **sections: object) -> Params:
    """Default params with their own experiment (and registered model) name."""
    tracking = TrackingParams(experiment=experiment, registered_model=experiment)
    return Params.model_validate({"tracking": tracking, **sections})


def runs(repo: Path, experiment: str) -> list[Run]:
    client = MlflowClient(default_tracking_uri(repo))
    found = client.get_experiment_by_name(experiment)
    assert found is not None
    return client.search_runs([found.experiment_id])


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv2d(1, 1, kernel_size=3, padding=1)


def test_run_records_params_metrics_artifact_and_model(repo: Path, tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    report.write_text('{"dice": 0.5}')
    model = tiny_model()
    example = np.random.default_rng(0).random((1, 1, 16, 16), dtype=np.float32)

    with Tracker.start(params("records"), stage="train", root=repo) as tracker:
        tracker.log_metrics({"loss": 1.0, "dice": None}, step=0)
        tracker.log_metrics({"loss": 0.5, "dice": float("nan")}, step=1)
        tracker.log_artifact(report, "reports")
        tracker.log_artifact(tmp_path / "missing.json")
        uri = tracker.log_model(
            model,
            example,
            registered_name="records",
            alias="candidate",
            metadata={"arch": "Conv2d", "classes": 1},
        )
    assert tracker.active is False
    assert tracker.run_id is not None

    client = MlflowClient(default_tracking_uri(repo))
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "UnetPlusPlus-densenet201"
    assert run.data.params["encoder"] == "densenet201"
    assert run.data.params["train.lr"] == "0.0001"
    assert run.data.tags["mlflow.source.git.commit"] == head(repo)
    assert run.data.tags["stage"] == "train"
    history = client.get_metric_history(tracker.run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(0, 1.0), (1, 0.5)]
    assert "dice" not in run.data.metrics
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.artifact_location == (repo / "mlartifacts").as_uri()
    stored = repo / "mlartifacts" / tracker.run_id / "artifacts" / "reports" / "report.json"
    assert stored.read_text() == '{"dice": 0.5}'
    assert [a.path for a in client.list_artifacts(tracker.run_id)] == ["reports"]

    assert uri == "models:/records@candidate"
    version = client.get_model_version_by_alias("records", "candidate")
    assert version.run_id == tracker.run_id
    [logged] = client.search_logged_models([run.info.experiment_id])  # filed with its run
    assert version.source == f"models:/{logged.model_id}"
    assert logged.source_run_id == tracker.run_id
    assert logged.artifact_location.startswith(experiment.artifact_location + "/")
    assert not (repo / "mlruns").exists()
    loaded, metadata = load_model(uri, root=repo)
    assert metadata == {"arch": "Conv2d", "classes": 1}
    batch = torch.rand(3, 1, 16, 16)  # another batch size than the example's
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), model(batch))


def test_reopening_by_run_id_adds_to_the_same_run(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    workspace = repo / ".dvc" / "tmp" / "exps" / "standalone" / "tmpabc"
    (workspace / ".dvc").mkdir(parents=True)  # a copy of the repository, .dvc/ included
    monkeypatch.chdir(workspace)  # as in `dvc exp run --temp`: the store is the real repo's
    with Tracker.start(params("reopen"), stage="train") as train:
        train.log_metrics({"val.dice": 0.7}, step=3)
    with Tracker.start(params("reopen"), run_id=train.run_id, stage="evaluate") as evaluate:
        evaluate.log_metrics({"test.dice": 0.6})

    assert evaluate.run_id == train.run_id
    assert not (workspace / "mlflow.db").exists()
    [run] = runs(repo, "reopen")
    assert run.info.run_id == train.run_id
    assert run.info.status == "FINISHED"
    assert run.data.metrics == {"val.dice": 0.7, "test.dice": 0.6}
    assert run.data.tags["stage"] == "evaluate"

    # only evaluate reran, with another threshold: its own run, linked to the training run
    changed = params("reopen", evaluate=EvaluateParams(threshold=0.4))
    with Tracker.start(changed, run_id=train.run_id, stage="evaluate") as again:
        again.log_metrics({"test.dice": 0.5})
    assert again.run_id != train.run_id
    linked = {r.info.run_id: r for r in runs(repo, "reopen")}[again.run_id]
    assert linked.data.tags["covidseg.train_run_id"] == train.run_id
    assert linked.data.params["evaluate.threshold"] == "0.4"


def test_a_run_id_the_store_lacks_starts_a_new_run(
    repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "0123456789abcdef0123456789abcdef"
    with Tracker.start(params("lacks"), run_id=missing, stage="evaluate", root=repo) as tracker:
        tracker.log_metrics({"test.dice": 0.6})
    assert tracker.run_id not in (None, missing)
    [run] = runs(repo, "lacks")
    assert run.data.metrics == {"test.dice": 0.6}
    assert "warning" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("error", "status"), [(RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")]
)
def test_leaving_with_an_exception_ends_the_run(
    repo: Path, error: type[BaseException], status: str
) -> None:
    with pytest.raises(error), Tracker.start(params("ends"), stage="train", root=repo) as tracker:
        raise error()
    assert tracker.run_id is not None
    assert MlflowClient(default_tracking_uri(repo)).get_run(tracker.run_id).info.status == status


def test_dvc_experiment_tags(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lads")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    with Tracker.start(params("tags"), stage="train", root=repo) as tracker:
        pass
    assert tracker.run_id is not None
    run = MlflowClient(default_tracking_uri(repo)).get_run(tracker.run_id)
    assert run.data.tags["dvc.exp_name"] == "bushy-lads"
    assert run.data.tags["dvc.baseline_rev"] == "a" * 40
    assert run.info.run_name == "UnetPlusPlus-densenet201 (bushy-lads)"


def test_a_failure_mid_run_warns_once_and_turns_tracking_off(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    note = tmp_path / "note.txt"
    note.write_text("x")
    tracker = Tracker.start(params("midrun"), stage="train", root=repo)
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_metrics({"bad*name": 1.0}, step=1)  # MLflow refuses the name
    tracker.log_metrics({"loss": 0.5}, step=1)
    tracker.log_artifact(note)
    tracker.end()
    assert tracker.run_id is not None

    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith("warning: MLflow tracking failed (")
    assert "bad*name" in err[0]
    assert err[0].endswith("); continuing without it: the files under metrics/ are the record")
    client = MlflowClient(default_tracking_uri(repo))
    assert [m.value for m in client.get_metric_history(tracker.run_id, "loss")] == [1.0]
    assert client.list_artifacts(tracker.run_id) == []


def test_an_unreachable_server_costs_seconds_and_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    (tmp_path / "a.txt").write_text("x")

    began = time.monotonic()
    tracker = Tracker.start(Params(), stage="train", root=tmp_path)
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_artifact(tmp_path / "a.txt")
    uri = tracker.log_model(
        tiny_model(), np.zeros((2, 1, 8, 8), np.float32), registered_name="m", alias="a"
    )
    tracker.end()
    elapsed = time.monotonic() - began

    assert elapsed < 10
    assert uri is None
    assert tracker.run_id is None
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"warning: MLflow tracking failed (http://127.0.0.1:{port}: ")
    assert "ConnectionRefusedError" in err[0]
    assert not (tmp_path / "mlflow.db").exists()


def test_repo_root_from_a_dvc_temporary_workspace(tmp_path: Path) -> None:
    root = tmp_path / "project"
    workspace = root / ".dvc" / "tmp" / "exps" / "run" / "abc"
    workspace.mkdir(parents=True)
    (workspace / ".dvc").mkdir()  # the copy has a .dvc/ of its own
    assert repo_root(workspace) == root
    assert repo_root(workspace / "stages") == root
    assert repo_root(root / "stages" / "deep") == root
    assert repo_root(tmp_path / "elsewhere") == tmp_path / "elsewhere"


def test_tracking_uri_is_absolute_sqlite_unless_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    uri = tracking_uri(tmp_path)
    assert uri == f"sqlite:////{str(tmp_path).lstrip('/')}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert tracking_uri(tmp_path) == "http://mlflow.team:5000"


def test_load_model_errors_are_one_line(repo: Path) -> None:
    with pytest.raises(
        CovidSegError, match=r"^cannot load the model models:/nothing@here: [^\n]+$"
    ):
        load_model("models:/nothing@here", root=repo)
