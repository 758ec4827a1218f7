"""Cross-validation on Slurm: a real single-host cluster (`deploy/slurm/cluster.sh`) and the team
stack (`deploy/stack.sh`), one array task per fold (`deploy/slurm/submit.sh`).

One scenario, submitted once and read by every test: the tiny three-fold CV of the `cv_repo`
fixture (the same params and code, which that fixture runs locally with `dvc repro`) is
submitted with fold 2's task cancelled: the head fails in one line naming fold 2. Submitted
again, folds 0 and 1 are restored from the run-cache, fold 2 trains, and the head trains
nothing, aggregates and pushes the experiment into the submitting clone, with the local run's
numbers. Two one-fold submissions then lose a service once their task has trained an epoch:
the MLflow server (each stage warns once, all completes) and the object store (the task fails
with DVC's error, the head names the fold). Then `cluster.sh stop` with a job running leaves no
process.

Needs Debian's `slurm-wlm` and `munge`, and what the team stack needs (PostgreSQL, `weed`);
without Slurm the tests skip, unless CI is set: then they fail.
"""

from __future__ import annotations

import contextlib
import csv
import ipaddress
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mirror_server import Mirror
from pipeline_repo import ROOT, CvRepo, cv_params, env, make_repo, run
from team_stack import TeamStack, missing_tools, parse_exports

# the cluster and the stack are the module's: its tests run on one pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.team, pytest.mark.xdist_group("slurm")]

SLURM = ROOT / "deploy" / "slurm"
CLIENT_ENV = ("MLFLOW_", "AWS_", "DVC_", "SLURM_")
DAEMONS = ("munged", "slurmctld", "slurmd")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def fail_or_skip(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def slurm_installed() -> bool:
    return any(shutil.which("slurmctld", path=p) for p in (None, "/usr/sbin:/sbin"))


@dataclass
class Cluster:
    """One `cluster.sh` folder and the environment its `start` printed."""

    dir: Path
    env: dict[str, str]

    def script(self, action: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["bash", str(SLURM / "cluster.sh"), action, str(self.dir)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert done.returncode == 0, f"cluster.sh {action}: {done.stderr}"
        return done

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            args, env=env() | self.env, capture_output=True, text=True, timeout=60
        )
        assert not check or done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
        return done

    def jobs(self, job: str) -> dict[str, tuple[str, str]]:
        """`scontrol show job` of a job or an array: {task or "-": (state, exit code)}."""
        out = {}
        for line in self.run("scontrol", "show", "job", "-o", job).stdout.splitlines():
            fields = dict(re.findall(r"(\w+)=(\S*)", line))
            out[fields.get("ArrayTaskId", "-")] = (fields["JobState"], fields["ExitCode"])
        return out


def processes_of(cluster_dir: Path, pids: list[int]) -> list[str]:
    """Live processes of the cluster: `pids`, their sessions, anything naming the folder, and
    any slurmstepd working in it."""
    out = []
    listing = subprocess.run(
        ["ps", "-eo", "pid=,sid=,stat=,comm=,args="], capture_output=True, text=True
    ).stdout
    for line in listing.splitlines():
        pid, sid, stat, comm, *args = line.split(maxsplit=4)
        if stat.startswith("Z"):
            continue  # gone, waiting to be reaped
        cwd = ""
        if comm == "slurmstepd":
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
        named = str(cluster_dir) in (args[0] if args else "") or cwd.startswith(str(cluster_dir))
        if named or {int(pid), int(sid)} & set(pids):
            out.append(line.strip())
    return out


def listening(pids: list[int]) -> set[str]:
    """The TCP addresses these processes listen on, as `address:port` (from /proc)."""
    inodes = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").glob("*"):
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    out = set()
    for table, size in (("tcp", 4), ("tcp6", 16)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                if size == 4:
                    raw = raw[::-1]
                else:  # four little-endian 32-bit words
                    raw = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                out.add(f"{ipaddress.ip_address(raw)}:{int(port, 16)}")
    return out


def recorded_pids(cluster_dir: Path) -> list[int]:
    """The daemons `cluster.sh start` started, by the pid files it wrote."""
    files = [cluster_dir / "run" / f"{name}.pid" for name in DAEMONS]
    return [int(f.read_text().split()[0]) for f in files if f.exists()]


@dataclass
class Submission:
    """One `submit.sh --wait`: its exit status, output and jobs."""

    returncode: int
    stdout: str
    stderr: str
    name: str
    prepare: str
    folds: str
    head: str
    logs: Path

    def log(self, kind: str, fold: int | None = None) -> str:
        if kind == "fold":
            return (self.logs / f"fold-{fold}-{self.folds}.out").read_text()
        job = self.prepare if kind == "prepare" else self.head
        return (self.logs / f"{kind}-{job}.out").read_text()


@dataclass
class Scenario:
    repo: Path  # the submitting clone
    scratch: Path  # the jobs' clones (kept)
    first: Submission  # fold 2 cancelled
    second: Submission  # resubmitted: completes


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    if not slurm_installed():
        fail_or_skip("Slurm is not installed (apt-get install slurm-wlm munge)")
    folder = Path(tempfile.mkdtemp(prefix="covidseg-slurm-"))
    started = subprocess.run(
        ["bash", str(SLURM / "cluster.sh"), "start", str(folder)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert started.returncode == 0, started.stderr
    try:
        yield Cluster(folder, parse_exports(started.stdout.splitlines()))
    finally:
        pids = recorded_pids(folder)
        subprocess.run(["bash", str(SLURM / "cluster.sh"), "stop", str(folder)], env=env())
        left = processes_of(folder, pids)
        shutil.rmtree(folder, ignore_errors=True)
        assert left == [], f"processes left after cluster.sh stop: {left}"


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamStack]:
    if need := missing_tools():
        fail_or_skip(f"the team stack needs {', '.join(need)}")
    team = TeamStack.create()
    try:
        team.start()
        yield team
    finally:
        left = team.stop()
        team.remove()
    assert left == [], f"processes left after stack.sh stop: {left}"


def user_env(stack: TeamStack, cluster: Cluster) -> dict[str, str]:
    """A user's shell after `eval "$(deploy/stack.sh start ...)"` and `eval "$(cluster.sh
    start ...)"`, with the thread count of the `cv_repo` run."""
    out = {k: v for k, v in env().items() if not k.startswith(CLIENT_ENV)}
    return out | stack.env | cluster.env | {"MLFLOW_DISABLE_TELEMETRY": "true"}


def first_epoch_logged(scratch: Path, name: str, fold: int) -> bool:
    """Whether a kept task of `fold` of the submission `name` under `scratch` has logged an
    epoch of training."""
    pattern = f"covidseg-slurm/{name}/fold-{fold}-*/metrics/folds/logs/fold-{fold}.csv"
    for log in scratch.glob(pattern):
        with contextlib.suppress(OSError):
            if len(log.read_text().splitlines()) >= 2:  # the header and epoch 1
                return True
    return False


def submit(
    repo: Path,
    environ: dict[str, str],
    *args: str,
    cancel_fold: int | None = None,
    fault: Callable[[], None] | None = None,
    scratch: Path | None = None,
) -> Submission:
    """`submit.sh --wait ARGS`; with `cancel_fold`, that fold's task is cancelled as soon as the
    jobs are submitted (it waits behind `prepare`, so it never starts); with `fault`, it is
    called once fold 0's task (kept under `scratch`) has trained an epoch."""
    command = ["bash", str(SLURM / "submit.sh"), "--wait", *args]
    process = subprocess.Popen(
        command, cwd=repo, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None
    printed: dict[str, str] = {}
    lines = []
    for line in process.stdout:
        lines.append(line)
        key, _, value = line.strip().partition("=")
        printed[key] = value
        if key == "LOGS":
            break
    if cancel_fold is not None and "FOLD_JOB" in printed:
        scancel = ["scancel", f"{printed['FOLD_JOB']}_{cancel_fold}"]
        subprocess.run(scancel, env=environ, check=True, timeout=30)
    if fault is not None:
        assert scratch is not None
        deadline = time.monotonic() + 600
        while not first_epoch_logged(scratch, printed["NAME"], 0) and process.poll() is None:
            assert time.monotonic() < deadline, "fold 0 trained no epoch in 600 s"
            time.sleep(0.1)
        fault()
    out, err = process.communicate(timeout=1200)
    assert "HEAD_JOB" in printed, err
    return Submission(
        returncode=process.returncode,
        stdout="".join(lines) + out,
        stderr=err,
        name=printed["NAME"],
        prepare=printed["PREPARE_JOB"],
        folds=printed["FOLD_JOB"],
        head=printed["HEAD_JOB"],
        logs=Path(printed["LOGS"]),
    )


@pytest.fixture(scope="module")
def scenario(
    cluster: Cluster,
    stack: TeamStack,
    mirror: Mirror,
    tmp_path_factory: pytest.TempPathFactory,
) -> Scenario:
    """The pipeline commit that `cv_repo` reproduces (`cv_params`; made here, so that the
    submissions need not wait for that run), with the stack's DVC remote committed; submitted
    with fold 2 cancelled, then again."""
    root = tmp_path_factory.mktemp("slurm")
    repo, scratch = make_repo(root / "clone", cv_params(mirror)), root / "scratch"
    remote_lines = [line for line in stack.lines if line.startswith("dvc remote ")]
    run(repo, "bash", "-c", "set -e; " + "; ".join(remote_lines))
    run(repo, "git", "add", ".dvc/config")
    run(repo, "git", "commit", "-qm", "the team's DVC remote")
    environ = user_env(stack, cluster)
    options = ("--keep", "--scratch", str(scratch))
    first = submit(repo, environ, *options, cancel_fold=2)
    second = submit(repo, environ, *options)
    return Scenario(repo, scratch, first, second)


def exp_ref(repo: Path, name: str) -> str:
    """The git ref of the experiment `name`."""
    refs = run(repo, "git", "for-each-ref", "--format=%(refname)", "refs/exps").stdout.split()
    (ref,) = [r for r in refs if r.endswith(f"/{name}")]
    return ref


def kept(scenario: Scenario, submission: Submission, tag: str, job: str) -> Path:
    return scenario.scratch / "covidseg-slurm" / submission.name / f"{tag}-{job}"


# --- tests ---------------------------------------------------------------------------------


def test_a_cancelled_fold_fails_the_head_in_one_line_and_only_it_runs_again(
    scenario: Scenario, cluster: Cluster
) -> None:
    first, second = scenario.first, scenario.second
    assert first.returncode == 1, first.stderr
    last = first.stderr.strip().splitlines()[-1]
    expected = rf"error: folds 2 of {first.name} did not finish \(fold 2 never ran\): .*"
    assert re.fullmatch(expected, last), last
    assert "Traceback" not in first.stderr
    # without accounting, a task cancelled while pending leaves no record of its own
    states = {task: state for task, (state, _) in cluster.jobs(first.folds).items()}
    assert states == {"0": "COMPLETED", "1": "COMPLETED"}
    assert cluster.jobs(first.head) == {"-": ("FAILED", "1:0")}
    assert last in first.log("head")
    assert second.name == first.name  # the same commit and params: the same experiment

    # resubmitted: folds 0 and 1 come from the run-cache, fold 2 alone trains
    for fold in (0, 1):
        log = second.log("fold", fold)
        for stage in (f"train@{fold}", f"evaluate@{fold}"):
            assert f"Stage '{stage}' is cached - skipping run" in log, log[-3000:]
            assert f"Running stage '{stage}'" not in log
    log = second.log("fold", 2)
    assert "Running stage 'train@2'" in log and "Running stage 'evaluate@2'" in log, log[-3000:]
    fold_jobs = {fold: re.search(r": job (\d+) on", second.log("fold", fold)) for fold in (0, 1, 2)}
    for fold, match in fold_jobs.items():
        assert match is not None
        folder = kept(scenario, second, f"fold-{fold}", match.group(1))
        assert (folder / "models" / f"fold-{fold}" / "model.pt").is_file()
        trained = (folder / "models" / "checkpoints").exists()
        assert trained == (fold == 2), folder


def test_the_cluster_run_is_an_experiment_with_the_numbers_of_the_local_run(
    scenario: Scenario, cluster: Cluster, cv_repo: CvRepo
) -> None:
    second = scenario.second
    assert second.returncode == 0, second.stderr[-3000:]
    assert cluster.jobs(second.prepare) == {"-": ("COMPLETED", "0:0")}
    assert cluster.jobs(second.folds) == {str(k): ("COMPLETED", "0:0") for k in range(3)}
    assert cluster.jobs(second.head) == {"-": ("COMPLETED", "0:0")}
    logs = [second.log("prepare"), second.log("head"), *(second.log("fold", k) for k in range(3))]
    for log in logs:
        assert f"(uid {os.getuid()})" in log  # every job ran as the submitting user

    # the head trained and evaluated nothing: every fold restored from the run-cache
    head_log = second.log("head")
    for fold in range(3):
        for stage in (f"train@{fold}", f"evaluate@{fold}"):
            assert f"Stage '{stage}' is cached - skipping run" in head_log, head_log[-3000:]
    assert not re.search(r"^Running stage '(train|evaluate)@", head_log, re.MULTILINE)
    assert "Running stage 'aggregate'" in head_log
    head = kept(scenario, second, "head", second.head)
    assert all((head / "models" / f"fold-{k}" / "model.pt").is_file() for k in range(3))
    assert not (head / "models" / "checkpoints").exists()

    # the experiment, in the submitting clone, beside its baseline; the workspace untouched
    repo = scenario.repo
    assert run(repo, "git", "status", "--porcelain").stdout == ""
    shown = json.loads(run(repo, "dvc", "exp", "show", "--json").stdout)
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]
    (exp,) = [rev for group in baseline["experiments"] or [] for rev in group["revs"]]
    assert exp["name"] == second.name
    local = json.loads((cv_repo.path / "metrics" / "evaluate.json").read_text())
    assert exp["data"]["metrics"]["metrics/evaluate.json"]["data"] == local  # number for number
    ref = exp_ref(repo, second.name)
    for name in ("metrics/evaluate.json", "metrics/per_case.csv", "metrics/per_fold.csv"):
        theirs = run(repo, "git", "show", f"{ref}:{name}").stdout
        assert theirs == (cv_repo.path / name).read_text(), name
    with (cv_repo.path / "metrics" / "per_case.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 3  # one test case per fold


def test_mlflow_holds_one_parent_run_with_a_child_per_fold(
    scenario: Scenario, stack: TeamStack, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    for name in list(os.environ):
        if name.startswith(CLIENT_ENV):
            monkeypatch.delenv(name)
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(stack.env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("covidseg")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["covidseg.fold"] for r in children) == ["0", "1", "2"]
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    assert {r.data.tags.get("dvc.exp_name") for r in runs} == {scenario.second.name}
    ref = exp_ref(scenario.repo, scenario.second.name)
    summary = json.loads(run(scenario.repo, "git", "show", f"{ref}:metrics/evaluate.json").stdout)
    assert parent.data.metrics["dice"] == pytest.approx(summary["dice"])
    version = client.get_model_version_by_alias("covidseg", "champion")
    assert version.run_id == parent.info.run_id  # the fold ensemble, registered by the head


def test_submit_refuses_uncommitted_changes_and_bad_params_before_any_job(
    scenario: Scenario, stack: TeamStack, cluster: Cluster
) -> None:
    environ = user_env(stack, cluster)
    before = cluster.run("squeue", "-h", "-o", "%i").stdout
    script = ["bash", str(SLURM / "submit.sh")]
    refused = subprocess.run(
        [*script, "-S", "train.lr=-1"],
        cwd=scenario.repo,
        env=environ,
        capture_output=True,
        text=True,
    )
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1 and "train.lr" in refused.stderr, refused.stderr
    (scenario.repo / "notes.txt").write_text("draft")
    try:
        dirty = subprocess.run(
            script, cwd=scenario.repo, env=environ, capture_output=True, text=True
        )
    finally:
        (scenario.repo / "notes.txt").unlink()
    assert dirty.returncode == 1
    assert "uncommitted changes (notes.txt" in dirty.stderr and dirty.stderr.count("\n") == 1
    assert cluster.run("squeue", "-h", "-o", "%i").stdout == before  # nothing submitted


# one fold, four epochs (new params, so it trains; a name of its own): a service is killed once
# the task has trained an epoch
FAULT_RUN = ("-S", "split.folds=[0]", "-S", "train.epochs=4")
TRACKING_WARNING = "warning: MLflow tracking failed"


def submit_losing(
    scenario: Scenario, stack: TeamStack, cluster: Cluster, part: str, *sets: str
) -> tuple[Submission, str]:
    """A `FAULT_RUN` submission (plus `sets`) whose `part` of the stack is killed once fold 0
    has trained an epoch; the stack is started again afterwards. Returns the submission and
    what that restart printed on stderr."""
    options = ("--keep", "--scratch", str(scenario.scratch))
    try:
        done = submit(
            scenario.repo,
            user_env(stack, cluster),
            *options,
            *FAULT_RUN,
            *sets,
            fault=lambda: stack.kill(part),
            scratch=scenario.scratch,
        )
    finally:
        restarted = stack.script("start")
    return done, restarted.stderr


def test_a_task_whose_tracking_server_dies_finishes_with_one_warning_per_stage(
    scenario: Scenario, stack: TeamStack, cluster: Cluster
) -> None:
    done, restarted = submit_losing(scenario, stack, cluster, "mlflow")
    assert "starting mlflow server" in restarted  # it was dead until the end
    # as with a local `dvc repro`: each stage process warns once and carries on
    assert done.returncode == 0, done.stderr[-3000:]
    fold_log, head_log = done.log("fold", 0), done.log("head")
    for log, stages in ((fold_log, 2), (head_log, 1)):  # train + evaluate; aggregate
        warned = [line for line in log.splitlines() if line.startswith(TRACKING_WARNING)]
        assert len(warned) == stages, log[-3000:]
        assert "Traceback" not in log
    assert cluster.jobs(done.folds) == {"0": ("COMPLETED", "0:0")}
    # the experiment landed with its own params and numbers: metrics/ is the record
    ref = exp_ref(scenario.repo, done.name)
    params = yaml.safe_load(run(scenario.repo, "git", "show", f"{ref}:params.yaml").stdout)
    assert params["train"]["epochs"] == 4 and params["split"]["folds"] == [0]
    summary = json.loads(run(scenario.repo, "git", "show", f"{ref}:metrics/evaluate.json").stdout)
    assert 0.0 <= summary["dice"] <= 1.0


def test_a_task_whose_object_store_dies_fails_and_the_head_names_its_fold(
    scenario: Scenario, stack: TeamStack, cluster: Cluster
) -> None:
    done, restarted = submit_losing(scenario, stack, cluster, "weed", "-S", "train.seed=1")
    assert "starting the object store" in restarted
    assert done.returncode == 1
    assert cluster.jobs(done.folds) == {"0": ("FAILED", "1:0")}
    fold_log = done.log("fold", 0)
    assert "Traceback" not in fold_log, fold_log[-3000:]
    (error,) = [line for line in fold_log.splitlines() if line.lower().startswith("error")]
    assert "failed to push data to the cloud" in error, fold_log[-3000:]
    assert "Could not connect to the endpoint URL" in error
    last = done.stderr.strip().splitlines()[-1]
    expected = rf"error: folds 0 of {done.name} did not finish \(fold 0 FAILED\): .*"
    assert re.fullmatch(expected, last), last
    assert "Traceback" not in done.stderr


def test_cluster_stop_leaves_no_process_even_with_a_job_running(cluster: Cluster) -> None:
    where = (f"--chdir={cluster.dir}", "--output=/dev/null")
    job = cluster.run("sbatch", "--parsable", *where, "--wrap", "sleep 300").stdout.strip()
    deadline = time.monotonic() + 60
    while cluster.jobs(job)["-"][0] != "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert cluster.jobs(job)["-"][0] == "RUNNING"
    pids = recorded_pids(cluster.dir)
    assert len(pids) == len(DAEMONS)
    ports = listening(pids)
    assert len(ports) == 2 and all(p.startswith("127.0.0.1:") for p in ports), ports
    assert any("slurmstepd" in line for line in processes_of(cluster.dir, pids))
    stopped = cluster.script("stop")
    assert f"cancelling jobs: {job}" in stopped.stderr
    assert processes_of(cluster.dir, pids) == []
    assert recorded_pids(cluster.dir) == []
