"""DVC reruns only what changed: code that only `predict` runs and MLflow settings retrain and
re-evaluate no fold (dvc.yaml's deps and params, kept honest by test_stage_deps)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from pipeline_repo import CvRepo, copy_repo, dvc, run
from tiny import merge

pytestmark = pytest.mark.slow
FOLD_STAGES = {f"{stage}@{fold}" for stage in ("train", "evaluate") for fold in range(3)}


def changed(repo: Path) -> set[str]:
    """The stages `dvc status` says are not up to date."""
    return set(json.loads(dvc(repo, "status", "--json").stdout))


def set_params(repo: Path, changes: dict[str, object]) -> None:
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), changes)))


def ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


def test_predict_code_and_mlflow_settings_rerun_no_fold(tmp_path: Path, cv_repo: CvRepo) -> None:
    repo = copy_repo(cv_repo.path, tmp_path / "repo")  # the three-fold CV, reproduced
    assert changed(repo) == set()

    # (a) the int8 module, the crop and predict: no stage runs them under the default params
    for module in ("quantize", "crop", "predict", "paths"):
        with (repo / "covidseg" / "inference" / f"{module}.py").open("a") as f:
            f.write("# a comment\n")
    assert changed(repo) == set()
    run(repo, "git", "checkout", "--", "covidseg")

    # (b) renaming the MLflow experiment: only aggregate records it anew
    set_params(repo, {"tracking": {"experiment": "other"}})
    assert changed(repo) == {"aggregate"}
    # (c) another alias: the same
    set_params(repo, {"tracking": {"experiment": "covidseg", "alias": "other"}})
    assert changed(repo) == {"aggregate"}

    # the control: a change to what a fold computes does rerun it
    set_params(repo, {"tracking": {"alias": "champion"}, "evaluate": {"tta_flip": True}})
    assert changed(repo) == {"evaluate@0", "evaluate@1", "evaluate@2"}  # aggregate follows
    run(repo, "git", "checkout", "--", "params.yaml")

    # a real experiment with another alias runs aggregate alone and registers the ensemble
    result = dvc(repo, "exp", "run", "-S", "tracking.alias=other")
    assert ran(result.stdout) == ["aggregate"], result.stdout
    assert not FOLD_STAGES & set(ran(result.stdout))
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    other = client.get_model_version_by_alias("covidseg", "other")
    assert int(other.version) > int(
        client.get_model_version_by_alias("covidseg", "champion").version
    )
