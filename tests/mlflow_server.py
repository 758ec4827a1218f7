"""`mlflow server` started the way the README tells users to, on a free loopback port.

    server = MlflowServer(tmp_path).start()  # README command, sqlite store under tmp_path
    server.url                               # http://127.0.0.1:<port>
    server.stop()                            # the whole process group, bounded waits

The command line is read from the README's MLflow section, so a flag added there (say
`--allowed-hosts`) is what the tests run; only `$PWD` (the folder it runs in) and the port
change. Artifacts land in `<folder>/mlartifacts`, MLflow's default `--artifacts-destination`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
README_COMMAND = re.compile(r"^\s*(mlflow server .*)$", re.MULTILINE)
# Without the networking switches Chromium keeps calling home, which a closed network turns
# into a flood of failing requests.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
WAIT_MS = 60_000  # the MLflow SPA is heavy on a busy 2-core runner


def readme_command() -> list[str]:
    """The `mlflow server ...` line of the README, split as a shell would (before expansion)."""
    found = README_COMMAND.findall((ROOT / "README.md").read_text())
    assert len(found) == 1, f"expected one `mlflow server` line in README.md, found {found}"
    return shlex.split(found[0])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env() -> dict[str, str]:
    """A user's shell with the virtualenv active: no inherited MLflow settings, no telemetry."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # MLflow's job runner (GenAI features, unused here), off as in deploy/stack.sh: seven
    # processes and ~18 s of CPU less per server
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    return env


class MlflowServer:
    """The README's `mlflow server` command run in `workdir` (its `$PWD`) on a free port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir).absolute()
        self.port = free_port()
        self.log = self.workdir / "mlflow-server.log"
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def command(self) -> list[str]:
        """The README's words with `$PWD` expanded and the port swapped for ours."""
        words = [w.replace("$PWD", str(self.workdir)) for w in readme_command()]
        assert words[:2] == ["mlflow", "server"] and "--port" in words, words
        words[words.index("--port") + 1] = str(self.port)
        return [str(Path(sys.executable).parent / "mlflow"), *words[1:]]

    def start(self, timeout: float = 120.0) -> MlflowServer:
        """Launch it and wait until `/health` answers 200; on failure, stop it and say why."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command,
                cwd=self.workdir,
                env=server_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: uvicorn workers die with it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (code := self.process.poll()) is not None:
                self.stop()
                raise AssertionError(f"mlflow server exited {code}\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        raise AssertionError(f"mlflow server gave no /health within {timeout:.0f} s\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        """The end of the server's output."""
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, wait up to `grace` s for `mlflow server` to exit, then
        SIGKILL the group: uvicorn workers and MLflow's job runners (huey consumers, which
        outlive the server for a while) share it. Uvicorn waits for open keep-alive
        connections (MLflow clients in this process hold some), hence the bound."""
        process, self.process = self.process, None
        if process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5.0)
