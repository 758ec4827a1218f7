"""MLflow tracking: one run per pipeline run, and never a reason for training to stop.

The default store is `<repo root>/mlflow.db` (artifacts in `<repo root>/mlartifacts`), with the
root found even from the temporary copies that `dvc exp run --temp` and `--queue` work in
(`<repo root>/.dvc/tmp/exps/...`), so that every experiment lands in the one real store.
`MLFLOW_TRACKING_URI` points everything at a team server instead. This is the only module that
imports mlflow, and it does so lazily: a broken install is one more tracking failure.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self, TypeVar

import numpy as np
import torch

from covidseg.config import Params, TrackingParams, flatten, redact
from covidseg.errors import CovidSegError

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from mlflow import MlflowClient

T = TypeVar("T")

WARNING = (
    "MLflow tracking failed (%s); continuing without it: the files under metrics/ are the record"
)
MODEL_NAME = "model"  # the model's name inside its run
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests a run under its parent
KEY_TAG = "covidseg.cv_key"  # the cross-validation a parent run stands for
FOLD_TAG = "covidseg.fold"
SPLIT_TAG = "covidseg.split"  # a registered version's evidence: its split scheme,
CASES_TAG = "covidseg.test_cases"  # a digest of its (fold, test case) pairs,
N_CASES_TAG = "covidseg.n_cases"
SCORE_TAG = "covidseg.score."  # + metric: its mean over every out-of-fold test case
DECISION_TAG = "covidseg.promotion"  # why it became `tracking.alias`, or did not
CHALLENGER = "challenger"  # the alias of the newest registered version that was not promoted
# how to run, which folds, and where to record: not what a fold computes (nor params of its
# stages: renaming the experiment or the alias retrains nothing)
NOT_LOGGED = ("runtime.", "split.folds", "tracking.")
GIT_COMMIT_TAG = "mlflow.source.git.commit"
# Set for stage commands by `dvc exp run` (dvc/repo/experiments/queue/base.py).
DVC_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev"}
# An unreachable server costs seconds, not MLflow's default of minutes of retries.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "20",
}


def repo_root(cwd: Path | None = None) -> Path:
    """The real repository root, also from inside DVC's temporary experiment workspaces."""
    here = (cwd or Path.cwd()).absolute()
    parts = here.parts
    for i in range(1, len(parts) - 3):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((p for p in (here, *here.parents) if (p / ".dvc").is_dir()), here)


def default_tracking_uri(root: Path) -> str:
    """`sqlite:////abs/root/mlflow.db`."""
    return f"sqlite:///{(root / 'mlflow.db').absolute()}"


def tracking_uri(root: Path) -> str:
    """`MLFLOW_TRACKING_URI` when set, else the repository's own sqlite store."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(root)


def _use_store(root: Path) -> str:
    """Point MLflow at the store (fail-fast HTTP settings unless the user chose some)."""
    import mlflow

    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    return uri


def _git_commit(cwd: Path) -> str | None:
    """`git rev-parse HEAD` in `cwd`, or None outside a git repository."""
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def _run_tags(stage: str) -> dict[str, str]:
    """Stage, DVC experiment and git commit tags for the run."""
    tags = {"stage": stage}
    tags |= {tag: os.environ[var] for var, tag in DVC_TAGS.items() if os.environ.get(var)}
    if commit := _git_commit(Path.cwd()):
        tags[GIT_COMMIT_TAG] = commit
    return tags


def _run_name(params: Params) -> str:
    name = f"{params.arch}-{params.encoder}"
    exp = os.environ.get("DVC_EXP_NAME")
    return f"{name} ({exp})" if exp else name


def _param_text(value: object) -> str:
    """How a parameter value is stored (and compared when a run is reopened); credentials in
    a URL (`download.base_url`) are never stored: every account can read the params."""
    return redact(str(value))


def run_params(params: Params) -> dict[str, str]:
    """The params a fold's run records: what it computes (no runtime settings, no fold list)."""
    flat = flatten(params).items()
    return {k: _param_text(v) for k, v in flat if not k.startswith(NOT_LOGGED)}


def cv_key(params: Params) -> str:
    """What identifies one cross-validation: its params and DVC experiment, not its folds."""
    blob = json.dumps([run_params(params), os.environ.get("DVC_EXP_NAME")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _short(error: BaseException, uri: str | None = None) -> str:
    """One short line naming the failure (for network or disk trouble, its root cause)."""
    root = error
    while (cause := root.__cause__ or root.__context__) is not None:
        root = cause
    if isinstance(root, OSError) and root is not error:
        text = f"{uri}: {type(root).__name__}: {root}" if uri else f"{type(root).__name__}: {root}"
    else:
        text = str(error) or type(error).__name__
    text = " ".join(text.split())
    return text if len(text) <= 200 else text[:197] + "..."


def _requirements() -> list[str]:
    """What loading the exported model needs; given explicitly, so nothing is inferred."""
    version = importlib.metadata.version("torch").split("+")[0]
    return [f"torch=={version}"]


def _example_batch(example: np.ndarray) -> np.ndarray:
    """float32, and at least two items so that the exported batch size stays free."""
    example = np.asarray(example, dtype=np.float32)
    return example if example.shape[0] > 1 else np.concatenate([example, example])


@dataclass(frozen=True)
class Evidence:
    """What a cross-validation's registered ensemble is judged by, kept as version tags."""

    scores: dict[str, float]  # metric -> mean over every out-of-fold test case (finite only)
    split: str  # the split scheme, e.g. "kfold, 5 folds, seed 0"
    cases: str  # a digest of the (fold, test case) pairs scored
    n_cases: int

    def tags(self) -> dict[str, str]:
        """As registered model version tags."""
        tags = {SPLIT_TAG: self.split, CASES_TAG: self.cases, N_CASES_TAG: str(self.n_cases)}
        return tags | {f"{SCORE_TAG}{k}": repr(v) for k, v in self.scores.items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> Evidence | None:
        """What `tags` wrote; None for a version registered without evidence."""
        if not all(k in tags for k in (SPLIT_TAG, CASES_TAG, N_CASES_TAG)):
            return None
        scores = {
            k.removeprefix(SCORE_TAG): float(v) for k, v in tags.items() if k.startswith(SCORE_TAG)
        }
        return cls(scores, tags[SPLIT_TAG], tags[CASES_TAG], int(tags[N_CASES_TAG]))


@dataclass(frozen=True)
class Decision:
    """Whether a new version becomes `tracking.alias`, and the line that says why."""

    promote: bool
    line: str


def judge(
    new: Evidence,
    version: str,
    champion: tuple[str, Evidence | None] | None,
    tracking: TrackingParams,
) -> Decision:
    """Promote `version` over the `champion` (its version and evidence, None if there is
    none) as `tracking.promote` says: `if_better` only on a better headline, measured on the
    same split and the same test cases."""
    alias, metric = tracking.alias, tracking.promote_metric
    mine = new.scores.get(metric)
    said = f"{metric} {mine:.4f}" if mine is not None else f"{metric} undefined"
    held = f"{alias} version {champion[0]}" if champion else f"no {alias}"
    theirs = champion[1].scores.get(metric) if champion and champion[1] else None
    vs = f"{said} vs {theirs:.4f} of {held}" if theirs is not None else f"{said}; {held}"
    stays = f"version {version} registered as {CHALLENGER}: "
    if tracking.promote == "never":
        return Decision(False, f"{stays}{vs} (tracking.promote: never)")
    if tracking.promote == "always":
        return Decision(True, f"version {version} is now {alias}: {vs} (tracking.promote: always)")
    if mine is None:
        return Decision(False, f"{stays}its {said}")
    if champion is None:
        return Decision(True, f"version {version} is now {alias}: {said}, the first to compare")
    old = champion[1]
    always = "; tracking.promote: always would replace it"
    if old is None or theirs is None:
        return Decision(False, f"{stays}{held} has no recorded {metric} to compare with{always}")
    if (old.split, old.cases) != (new.split, new.cases):
        other = f"{old.split}, {old.n_cases} cases vs {new.split}, {new.n_cases} cases"
        return Decision(False, f"{stays}{held} was scored on other test cases ({other}){always}")
    same = f" on the same {new.n_cases} test case" + ("s" if new.n_cases != 1 else "")
    better = mine > theirs if tracking.promote_direction == "higher" else mine < theirs
    if better:
        return Decision(True, f"version {version} is now {alias}: {vs}{same}")
    return Decision(False, f"{stays}{said} does not beat {theirs:.4f} of {held}{same}")


class Tracker:
    """One MLflow run. No method raises: the first failure prints one warning and turns it off."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self._parent_id: str | None = None  # a fold's cross-validation run
        self._client: MlflowClient | None = None
        self._uri: str | None = None
        self._off = False

    @classmethod
    def start(
        cls,
        params: Params,
        *,
        run_id: str | None = None,
        stage: str,
        fold: int | None = None,
        root: Path | None = None,
    ) -> Tracker:
        """Open a new run (params logged), or reopen `run_id` to add to it. A `fold`'s run is
        nested under the cross-validation's parent run (see `start_parent`)."""
        tracker = cls()
        where = root or repo_root()
        tracker._attempt(lambda: tracker._open(params, run_id, stage, fold=fold, root=where), None)
        return tracker

    @classmethod
    def start_parent(cls, params: Params, *, root: Path | None = None) -> Tracker:
        """Open the parent run of this cross-validation (made by its first fold if need be)."""
        tracker = cls()
        tracker._attempt(lambda: tracker._open_parent(params, root or repo_root()), None)
        return tracker

    @property
    def active(self) -> bool:
        """Whether calls still reach MLflow."""
        return not self._off and self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None) -> None:
        """Log values at `step` (0 if None); None and NaN values are skipped."""
        self._attempt(lambda: self._log_metrics(metrics, step), None)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Upload a file or a folder; a path that does not exist is skipped."""
        self._attempt(lambda: self._log_artifact(Path(path), artifact_path), None)

    def log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        *,
        registered_name: str | None,
        alias: str | None,
        metadata: dict[str, Any] | None = None,
    ) -> str | None:
        """Log `model` (torch.export on the CPU in float32; any batch size, the example's other
        dimensions) with `metadata` (how to feed it), register it and alias it. Its URI, or
        None if that failed."""
        return self._attempt(
            lambda: self._log_model(
                model, input_example, registered_name, alias, metadata=metadata
            ),
            None,
        )

    def tag(self, tags: Mapping[str, str]) -> None:
        """Set tags on the run."""
        self._attempt(lambda: self._tag(tags), None)

    def register(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        *,
        metadata: dict[str, Any],
        evidence: Evidence,
        tracking: TrackingParams,
    ) -> str | None:
        """Log `model` as `log_model` does, register it with `evidence` as version tags, and
        move `tracking.alias` to it only as `tracking.promote` says (see `judge`), else alias
        it `challenger`; one line says which. Its URI, or None if that failed."""
        return self._attempt(
            lambda: self._register(
                model, input_example, metadata=metadata, evidence=evidence, tracking=tracking
            ),
            None,
        )

    def end(self, status: str = "FINISHED") -> None:
        """Close the run with `status`; later calls do nothing. A fold's run that ends
        FAILED or KILLED ends its cross-validation's parent run so too: none stays RUNNING."""
        self._attempt(lambda: self._end(status), None)
        self._off = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        if kind is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _attempt(self, action: Callable[[], T], default: T) -> T:
        """Run `action` unless turned off; on failure warn once and turn off."""
        if self._off:
            return default
        try:
            return action()
        except Exception as error:
            self._off = True
            reason = _short(error, self._uri)
            log.warning(WARNING, reason)
            return default

    def _end(self, status: str) -> None:
        client, run_id = self._target()
        client.set_terminated(run_id, status)
        if status != "FINISHED" and self._parent_id:
            client.set_terminated(self._parent_id, status)

    def _tag(self, tags: Mapping[str, str]) -> None:
        client, run_id = self._target()
        for key, value in tags.items():
            client.set_tag(run_id, key, value)

    def _target(self) -> tuple[MlflowClient, str]:
        if self._client is None or self.run_id is None:
            raise RuntimeError("no MLflow run is open")
        return self._client, self.run_id

    def _open(
        self, params: Params, run_id: str | None, stage: str, *, fold: int | None, root: Path
    ) -> None:
        self._connect(root)
        tags = _run_tags(stage)
        if run_id and self._reopen(run_id, params, tags):
            return
        experiment_id = self._experiment(params, root)
        name = _run_name(params)
        if fold is not None:
            self._parent_id = self._parent(params, experiment_id)
            tags |= {PARENT_TAG: self._parent_id, FOLD_TAG: str(fold)}
            name = f"{name} fold {fold}"
        self._create(params, tags, experiment_id, name=name)
        self._resume_parent()

    def _resume_parent(self) -> None:
        """Mark the parent run RUNNING again while one of its folds works (a fold that failed
        before ended it FAILED or KILLED)."""
        from mlflow.entities import RunStatus

        client = self._client
        assert client is not None
        if self._parent_id and client.get_run(self._parent_id).info.status != "RUNNING":
            client.update_run(self._parent_id, status=RunStatus.to_string(RunStatus.RUNNING))

    def _connect(self, root: Path) -> None:
        from mlflow import MlflowClient

        self._uri = _use_store(root)
        self._client = MlflowClient(self._uri)

    def _experiment(self, params: Params, root: Path) -> str:
        """The experiment's id; a local store keeps its artifacts in `<root>/mlartifacts`."""
        assert self._uri is not None
        location = (root / "mlartifacts").absolute().as_uri()
        # a server keeps its own artifacts; any local store (sqlite, a folder) gets ours, so
        # runs from DVC's temporary experiment copies never land in a folder that is deleted
        remote = self._uri.startswith(("http://", "https://", "databricks"))
        return self._experiment_id(params.tracking.experiment, None if remote else location)

    def _open_parent(self, params: Params, root: Path) -> None:
        self._connect(root)
        self.run_id = self._parent(params, self._experiment(params, root))

    def _parent(self, params: Params, experiment_id: str) -> str:
        """The id of the cross-validation's parent run, created by whichever fold comes first
        (of two made in a race, the older one wins and the other is deleted)."""
        client = self._client
        assert client is not None
        key = cv_key(params)
        query = f"tags.`{KEY_TAG}` = '{key}'"
        order = ["attributes.start_time ASC"]
        found = client.search_runs([experiment_id], query, order_by=order, max_results=1)
        if found:
            first: str = found[0].info.run_id  # MLflow's `RunInfo` properties are untyped
            return first
        mine = self._new_run(
            params, _run_tags("cv") | {KEY_TAG: key}, experiment_id, name=_run_name(params)
        )
        client.log_param(mine, "split.folds", _param_text(list(params.split.folds)))
        oldest = client.search_runs([experiment_id], query, order_by=order, max_results=1)
        if oldest and oldest[0].info.run_id != mine:
            client.delete_run(mine)
            winner: str = oldest[0].info.run_id
            return winner
        return mine

    def _experiment_id(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, created (with `artifact_location`) if need be."""
        from mlflow.exceptions import MlflowException

        client = self._client
        assert client is not None
        if found := client.get_experiment_by_name(name):
            return found.experiment_id
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # a parallel queued experiment may have won the race
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            found = client.get_experiment_by_name(name)
            assert found is not None
            return found.experiment_id

    def _create(
        self, params: Params, tags: dict[str, str], experiment_id: str, *, name: str
    ) -> None:
        self.run_id = self._new_run(params, tags, experiment_id, name=name)

    def _new_run(
        self, params: Params, tags: dict[str, str], experiment_id: str, *, name: str
    ) -> str:
        """A new run with `tags` and the run params; its id."""
        from mlflow.entities import Param
        from mlflow.tracking.context.registry import resolve_tags

        client = self._client
        assert client is not None
        run = client.create_run(experiment_id, tags=resolve_tags(tags), run_name=name)
        values = [Param(key, value) for key, value in run_params(params).items()]
        client.log_batch(run.info.run_id, params=values)
        return str(run.info.run_id)

    def _reopen(self, run_id: str, params: Params, tags: dict[str, str]) -> bool:
        """Reopen `run_id`; False when the store does not hold it (a new run is made instead)."""
        from mlflow.entities import Param, RunStatus, RunTag
        from mlflow.exceptions import MlflowException

        client = self._client
        assert client is not None
        try:
            run = client.get_run(run_id)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            log.info("MLflow run %s is not in this store; starting a new one", run_id)
            return False
        flat = run_params(params)
        known = run.data.params
        diverged = any(known.get(k, v) != v for k, v in flat.items())
        exp_name = tags.get("dvc.exp_name")
        if diverged or (exp_name and run.data.tags.get("dvc.exp_name", exp_name) != exp_name):
            # e.g. only evaluate reran, in another experiment: a run of its own, linked back
            log.info(
                "MLflow run %s was made with other params; starting a new run linked to it", run_id
            )
            tags["covidseg.train_run_id"] = run_id
            return False
        client.update_run(run_id, status=RunStatus.to_string(RunStatus.RUNNING))
        self.run_id = run_id
        self._parent_id = run.data.tags.get(PARENT_TAG)
        self._resume_parent()
        new = [Param(key, value) for key, value in flat.items() if key not in known]
        client.log_batch(run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
        return True

    def _log_metrics(self, metrics: Mapping[str, float | None], step: int | None) -> None:
        from mlflow.entities import Metric

        client, run_id = self._target()
        now = int(time.time() * 1000)
        values = {key: float(value) for key, value in metrics.items() if value is not None}
        batch = [Metric(k, v, now, step or 0) for k, v in values.items() if not math.isnan(v)]
        if batch:
            client.log_batch(run_id, metrics=batch)

    def _log_artifact(self, path: Path, artifact_path: str | None) -> None:
        client, run_id = self._target()
        if path.is_dir():
            client.log_artifacts(run_id, str(path), artifact_path)
        elif path.exists():
            client.log_artifact(run_id, str(path), artifact_path)

    def _log_model(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        registered_name: str | None,
        alias: str | None,
        *,
        metadata: dict[str, Any] | None,
    ) -> str:
        client, _ = self._target()
        info = self._export(model, input_example, registered_name, metadata)
        if registered_name is None:
            uri: str = info.model_uri  # MLflow's `ModelInfo` is untyped
            return uri
        version = str(info.registered_model_version)
        if alias is None:
            return f"models:/{registered_name}/{version}"
        client.set_registered_model_alias(registered_name, alias, version)
        return f"models:/{registered_name}@{alias}"

    def _export(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        registered_name: str | None,
        metadata: dict[str, Any] | None,
    ) -> Any:  # MLflow's `ModelInfo`
        import mlflow.pytorch
        from mlflow.models import infer_signature

        client, run_id = self._target()
        # MLflow files a logged model under the active experiment, not under its run's
        mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
        example = _example_batch(input_example)
        cpu_model = copy.deepcopy(model).float().cpu().eval()
        with torch.no_grad():
            output = cpu_model(torch.from_numpy(example)).numpy()
        return mlflow.pytorch.log_model(
            cpu_model,
            name=MODEL_NAME,
            signature=infer_signature(example, output),
            input_example=example,  # pt2 export needs it
            pip_requirements=_requirements(),
            metadata=metadata,
            registered_model_name=registered_name,
            serialization_format="pt2",
            run_id=run_id,
            # MLflow's own check reloads and reruns the model (~100 s and ~1 GB for a 5-fold
            # ensemble) and only warns on failure; `load_predictor`'s tests check the reload
            validate_serving_input=False,
        )

    def _register(
        self,
        model: torch.nn.Module,
        input_example: np.ndarray,
        *,
        metadata: dict[str, Any],
        evidence: Evidence,
        tracking: TrackingParams,
    ) -> str:
        client, run_id = self._target()
        name = tracking.registered_model
        info = self._export(model, input_example, name, metadata)
        version = str(info.registered_model_version)
        for key, value in evidence.tags().items():
            client.set_model_version_tag(name, version, key, value)
        decision = judge(evidence, version, self._champion(name, tracking.alias), tracking)
        client.set_model_version_tag(name, version, DECISION_TAG, decision.line)
        client.set_tag(run_id, DECISION_TAG, decision.line)
        alias = tracking.alias if decision.promote else CHALLENGER
        client.set_registered_model_alias(name, alias, version)
        log.info("%s", decision.line)
        return f"models:/{name}@{alias}"

    def _champion(self, name: str, alias: str) -> tuple[str, Evidence | None] | None:
        """The version `alias` names and the evidence it was registered with, if any."""
        from mlflow.exceptions import MlflowException

        client = self._client
        assert client is not None
        try:
            held = client.get_model_version_by_alias(name, alias)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return str(held.version), Evidence.from_tags(held.tags)


def load_model(uri: str, *, root: Path | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a logged model (`models:/<name>@<alias>`, `runs:/...`) on the CPU, with the
    metadata it was logged with."""
    try:
        import mlflow.models
        import mlflow.pytorch

        _check_store(root or repo_root())
        _use_store(root or repo_root())
        metadata = mlflow.models.get_model_info(uri).metadata or {}
        return mlflow.pytorch.load_model(uri), metadata
    except CovidSegError:
        raise
    except Exception as error:
        raise CovidSegError(f"cannot load the model {uri}: {_short(error)}") from None


def _check_store(root: Path) -> None:
    """Reading a model must not create an empty store: without `MLFLOW_TRACKING_URI`, the
    repository's `mlflow.db` must already exist."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return
    store = root / "mlflow.db"
    if not store.is_file():
        raise CovidSegError(
            f"no MLflow store at {store} (looked from {Path.cwd()} up to the repository root); "
            "run this inside the covidseg repository that trained the model, or set "
            "MLFLOW_TRACKING_URI to your tracking server"
        )
