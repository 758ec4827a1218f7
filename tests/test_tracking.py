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
    Evidence,
    Tracker,
    default_tracking_uri,
    judge,
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


# --- promotion by evidence ----------------------------------------------------------------------


def judged(
    scores: dict[str, float], cases: str = "abc", split: str = "kfold, 3 folds, seed 0"
) -> Evidence:
    return Evidence(scores=scores, split=split, cases=cases, n_cases=4)


@pytest.mark.parametrize(
    ("champion", "promote", "moves", "says"),
    [
        (None, "if_better", True, "version 2 is now champion: dice 0.5000, the first to compare"),
        (("1", {"dice": 0.4}), "if_better", True, "dice 0.5000 vs 0.4000 of champion version 1"),
        (("1", {"dice": 0.6}), "if_better", False, "dice 0.5000 does not beat 0.6000 of"),
        (("1", {"dice": 0.5}), "if_better", False, "does not beat 0.5000"),  # a tie keeps it
        (("1", {"dice": 0.6}), "always", True, "(tracking.promote: always)"),
        (("1", {"dice": 0.4}), "never", False, "(tracking.promote: never)"),
        (("1", None), "if_better", False, "has no recorded dice to compare with"),
        (("1", {"nsd": 0.4}), "if_better", False, "has no recorded dice to compare with"),
    ],
)
def test_judge_promotes_only_on_a_better_headline(
    champion: tuple[str, dict[str, float] | None] | None, promote: str, moves: bool, says: str
) -> None:
    held = None
    if champion is not None:
        held = (champion[0], None if champion[1] is None else judged(champion[1]))
    tracking = TrackingParams.model_validate({"promote": promote})
    decision = judge(judged({"dice": 0.5}), "2", held, tracking)
    assert decision.promote is moves
    assert says in decision.line and "\n" not in decision.line


def test_judge_never_compares_other_test_cases_or_an_undefined_score() -> None:
    tracking = TrackingParams()
    other = judge(judged({"dice": 0.9}), "2", ("1", judged({"dice": 0.1}, cases="xyz")), tracking)
    assert not other.promote and "was scored on other test cases" in other.line
    scheme = ("1", judged({"dice": 0.1}, split="benchmark 16_4"))
    assert not judge(judged({"dice": 0.9}), "2", scheme, tracking).promote
    undefined = judge(judged({}), "2", None, tracking)
    assert not undefined.promote and "its dice undefined" in undefined.line
    hd95 = TrackingParams(promote_metric="hd95", promote_direction="lower")
    champion = ("1", judged({"hd95": 9.0}))
    assert judge(judged({"hd95": 4.0}), "2", champion, hd95).promote  # a shorter distance wins


CV_CASES = {0: ("a", "b"), 1: ("c", "d")}


def write_cv(folds_dir: Path, dice: float, *, val_dice: float = 0.5) -> None:
    """Two folds' per-case results (every case at `dice`) and training logs."""
    for fold, cases in CV_CASES.items():
        (folds_dir / str(fold)).mkdir(parents=True, exist_ok=True)
        lines = ["case,dice,nsd,hd95"] + [f"{case},{dice},{dice},5.0" for case in cases]
        (folds_dir / str(fold) / "per_case.csv").write_text("\n".join(lines) + "\n")
        (folds_dir / "logs").mkdir(exist_ok=True)
        log = ["epoch,train_loss,val_loss,val_dice,lr,seconds"]
        log += [f"{e},0.9,0.8,{val_dice if e == 2 else 0},0.001,1" for e in (1, 2)]
        (folds_dir / "logs" / f"fold-{fold}.csv").write_text("\n".join(log) + "\n")


def run_cv(
    tmp_path: Path, name: str, dice: float, *, val_dice: float = 0.5, **tracking: str
) -> None:
    """`aggregate` over fabricated fold results of a CV whose ensemble scores `dice` (the
    ensemble itself a tiny network: what is judged is the evidence)."""
    from covidseg.evaluation import aggregate as stage
    from covidseg.training.modelio import ModelSpec

    spec = ModelSpec("Unet", "mobilenet_v2", 1, "infection", 16, (-1250.0, 250.0))
    folds_dir = tmp_path / f"cv-{dice}-{val_dice}" / "folds"
    write_cv(folds_dir, dice, val_dice=val_dice)
    cv = Params.model_validate(
        {
            "encoder": f"resnet{18 if dice > 0.5 else 34}",  # another CV each time
            "train": {"lr": dice + val_dice},
            "split": {"scheme": "kfold", "n_folds": 3, "folds": [0, 1]},
            "tracking": {"experiment": name, "registered_model": name, **tracking},
        }
    )
    out = folds_dir.parent
    paths = stage.AggregatePaths(
        folds_dir=folds_dir,
        models_dir=out / "models",
        metrics=out / "evaluate.json",
        per_case=out / "per_case.csv",
        per_fold=out / "per_fold.csv",
        report_dir=out / "benchmark",
    )
    real = stage.load_ensemble
    stage.load_ensemble = lambda *_: (tiny_model(), spec)  # type: ignore[assignment]
    try:
        stage.aggregate(cv, paths)
    finally:
        stage.load_ensemble = real


def aliases(repo: Path, name: str) -> dict[str, str]:
    model = MlflowClient(default_tracking_uri(repo)).get_registered_model(name)
    return {alias: str(version) for alias, version in model.aliases.items()}


def promotion_lines(capsys: pytest.CaptureFixture[str]) -> list[str]:
    err = capsys.readouterr().err.splitlines()
    return [line for line in err if line.startswith(("note: version", "warning: the ensemble"))]


def test_a_worse_cross_validation_becomes_challenger_and_champion_stays(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cv(tmp_path, "worse", 0.54)
    assert aliases(repo, "worse") == {"champion": "1"}
    capsys.readouterr()
    run_cv(tmp_path, "worse", 0.29)
    assert aliases(repo, "worse") == {"champion": "1", "challenger": "2"}
    assert promotion_lines(capsys) == [
        "note: version 2 registered as challenger: dice 0.2900 does not beat 0.5400 of "
        "champion version 1 on the same 4 test cases"
    ]
    client = MlflowClient(default_tracking_uri(repo))
    second = client.get_model_version("worse", "2")
    assert second.tags["covidseg.score.dice"] == "0.29"
    assert second.tags["covidseg.n_cases"] == "4"
    assert second.tags["covidseg.promotion"].startswith("version 2 registered as challenger")
    parents = [r for r in runs(repo, "worse") if r.info.status != "FINISHED"]
    assert parents == []  # both parent runs ended

    run_cv(tmp_path, "worse", 0.6)  # a better one moves it
    assert aliases(repo, "worse") == {"champion": "3", "challenger": "2"}
    assert "version 3 is now champion: dice 0.6000 vs 0.5400" in capsys.readouterr().err


def test_promote_always_moves_the_alias_and_never_never_does(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cv(tmp_path, "policy", 0.54, promote="never")
    assert aliases(repo, "policy") == {"challenger": "1"}  # not even the first
    run_cv(tmp_path, "policy", 0.6)
    assert aliases(repo, "policy") == {"champion": "2", "challenger": "1"}
    run_cv(tmp_path, "policy", 0.7, promote="never")  # better, but never
    assert aliases(repo, "policy") == {"champion": "2", "challenger": "3"}
    capsys.readouterr()
    run_cv(tmp_path, "policy", 0.29, promote="always")  # worse, but always
    assert aliases(repo, "policy") == {"champion": "4", "challenger": "3"}
    assert promotion_lines(capsys) == [
        "note: version 4 is now champion: dice 0.2900 vs 0.6000 of champion version 2 "
        "(tracking.promote: always)"
    ]


def test_a_diverged_cross_validation_is_never_registered(
    repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_cv(tmp_path, "diverged", 0.54)
    capsys.readouterr()
    run_cv(tmp_path, "diverged", 0.8, val_dice=0.0, promote="always")
    client = MlflowClient(default_tracking_uri(repo))
    assert [str(v.version) for v in client.search_model_versions("name='diverged'")] == ["1"]
    assert aliases(repo, "diverged") == {"champion": "1"}
    assert promotion_lines(capsys) == [
        "warning: the ensemble is not registered: fold 0 diverged (validation Dice 0 on every "
        "validation case at every epoch); champion stays where it was"
    ]
    tagged = [r for r in runs(repo, "diverged") if "covidseg.diverged" in r.data.tags]
    assert len(tagged) == 1 and tagged[0].info.status == "FINISHED"
