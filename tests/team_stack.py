"""The team stack (`deploy/stack.sh`) driven from tests: started, faulted and stopped.

    stack = TeamStack.create()      # a fresh folder under /tmp
    lines = stack.start()           # the `export ...` / `dvc remote ...` lines it prints
    stack.env                       # those exports as a dict
    stack.kill("weed")              # a fault: SIGKILL one part's process group
    stack.stop()                    # `deploy/stack.sh stop`, then: nothing of it still runs

The folder is made with `tempfile.mkdtemp` in /tmp and opened to traversal (mode 711), since
PostgreSQL runs as the `postgres` account when the tests run as root.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline_repo import ROOT, env

SCRIPT = ROOT / "deploy" / "stack.sh"
PARTS = ("weed", "mlflow")  # run by pid files; postgres keeps its own postmaster.pid


def missing_tools() -> list[str]:
    """What the stack needs and this machine lacks."""
    path = env()["PATH"]
    need = [name for name in ("mlflow", "weed", "runuser") if not shutil.which(name, path=path)]
    if not shutil.which("pg_ctl", path=path) and not list(
        Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
    ):
        need.append("postgresql (apt-get install postgresql)")
    return need


def parse_exports(lines: list[str]) -> dict[str, str]:
    """`export NAME='value'` lines as {NAME: value}."""
    out = {}
    for line in lines:
        words = shlex.split(line)
        if words and words[0] == "export":
            name, _, value = words[1].partition("=")
            out[name] = value
    return out


class TeamStack:
    """One `deploy/stack.sh` folder."""

    def __init__(self, folder: Path) -> None:
        self.dir = Path(folder)
        self.lines: list[str] = []

    @classmethod
    def create(cls) -> TeamStack:
        folder = Path(tempfile.mkdtemp(prefix="covidseg-stack-"))
        folder.chmod(0o711)
        return cls(folder)

    def script(
        self, action: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess:
        """`deploy/stack.sh ACTION DIR` in a user's shell; on failure the assertion says why."""
        done = subprocess.run(
            ["bash", str(SCRIPT), action, str(self.dir)],
            env=env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"stack.sh {action} exited {done.returncode}\n{done.stderr}")
        return done

    def start(self) -> list[str]:
        """Start what is not running; the lines printed on standard output."""
        self.lines = self.script("start").stdout.splitlines()
        return self.lines

    @property
    def env(self) -> dict[str, str]:
        return parse_exports(self.lines)

    def pid(self, part: str) -> int | None:
        """The recorded process (group) id of `weed` or `mlflow`, postgres's postmaster."""
        if part == "postgres":
            file = self.dir / "postgres" / "data" / "postmaster.pid"
        else:
            file = self.dir / "run" / f"{part}.pid"
        try:
            return int(file.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def processes(self, pids: list[int]) -> list[str]:
        """`ps` lines of these processes, their children, and every process in their process
        groups or sessions (PostgreSQL's backends start sessions of their own)."""
        if not pids:
            return []
        listing = subprocess.run(
            ["ps", "-eo", "pid=,ppid=,pgid=,sid=,stat=,args="], capture_output=True, text=True
        ).stdout
        out = []
        for line in listing.splitlines():
            pid, ppid, pgid, sid, stat, *_ = line.split(maxsplit=5)
            if stat.startswith("Z"):
                continue  # already gone, waiting for a parent to reap it
            if {int(pid), int(ppid), int(pgid), int(sid)} & set(pids):
                out.append(line.strip())
        return out

    def kill(self, part: str) -> None:
        """A fault: SIGKILL the process group of `weed` or `mlflow` and wait until it is gone."""
        pid = self.pid(part)
        assert pid is not None, f"{part} is not running"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while self.processes([pid]) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.processes([pid]), self.processes([pid])

    def stop(self) -> list[str]:
        """`deploy/stack.sh stop`; the processes of the stack still running after it."""
        pids = [pid for part in (*PARTS, "postgres") if (pid := self.pid(part)) is not None]
        self.script("stop")
        return self.processes(pids)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
