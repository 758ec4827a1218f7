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
import ipaddress
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass
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


def bindable(address: str) -> bool:
    """Whether this machine has the local address (Linux routes all of 127.0.0.0/8)."""
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
        return True
    except OSError:
        return False


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
        self.starts: list[subprocess.CompletedProcess] = []  # of start_together

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

    def start_together(self, count: int = 2, timeout: float = 300, **settings: str) -> list[str]:
        """`count` starts at once (with STACK_* `settings`): each one's result in `starts`; the
        lines of the first one that succeeded (AssertionError if none did)."""
        command = ["bash", str(SCRIPT), "start", str(self.dir)]
        runs = [
            subprocess.Popen(
                command,
                env=env() | settings,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(count)
        ]
        self.starts = []
        try:
            for process in runs:
                out, err = process.communicate(timeout=timeout)
                done = subprocess.CompletedProcess(command, process.returncode, out, err)
                self.starts.append(done)
        finally:
            for process in runs:
                if process.poll() is None:
                    process.kill()
                    process.wait()
        good = [done for done in self.starts if done.returncode == 0]
        assert good, "\n".join(done.stderr for done in self.starts)
        self.lines = good[0].stdout.splitlines()
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


# --- the doors: every listening socket of the stack, tried without credentials ---------------

REFUSED_HTTP = (401, 403)
NO_PGPASS = "/nonexistent/covidseg-no-pgpass"  # libpq: no password file


@dataclass(frozen=True)
class Door:
    """One listening TCP port of the stack and what an unauthenticated request got."""

    address: str
    port: int
    name: str  # its setting in ports.env (S3_PORT, WEED_FILER_PORT, ...) or the process
    request: str
    answer: str
    refused: bool


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process `pid` holds open."""
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(int(link[8:-1]))
    return out


def _address(hex_address: str) -> str:
    """An address of /proc/net/tcp{,6}: 32-bit words in host (little-endian) order, in hex."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


def tcp_listeners() -> dict[int, tuple[str, int]]:
    """{socket inode: (address, port)} of every listening TCP socket in this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    host, port = fields[1].split(":")
                    out[int(fields[9])] = (_address(host), int(port, 16))
    return out


def unix_listeners() -> dict[int, str]:
    """{socket inode: path} of every listening unix socket bound to a path."""
    out = {}
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 8 and fields[5] == "01" and fields[7].startswith("/"):
                out[int(fields[6])] = fields[7]
    return out


def _exchange(host: str, port: int, payload: bytes, tls: bool = False, h2: bool = False) -> bytes:
    """Send `payload`, read until the peer closes, goes quiet or (`h2`) sends HTTP/2 HEADERS;
    over TLS without a client certificate if `tls`. OSError (ssl.SSLError too) if refused."""
    with socket.create_connection((host, port), timeout=3) as raw:
        sock = raw
        if tls:
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2", "http/1.1"])
            sock = context.wrap_socket(raw)
        sock.sendall(payload)
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError):
            while len(chunks) < 64 and (chunk := sock.recv(65536)):
                chunks.append(chunk)
                if h2 and 1 in _frame_kinds(b"".join(chunks)):
                    break  # a HEADERS frame: answer enough
        return b"".join(chunks)


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    head = len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big")
    return head + payload


def _frame_kinds(data: bytes) -> list[int]:
    """The types of the HTTP/2 frames in `data` (a server's bytes, after its preface)."""
    kinds, at = [], 0
    while at + 9 <= len(data):
        kinds.append(data[at + 3])
        at += 9 + int.from_bytes(data[at : at + 3], "big")
    return kinds


def grpc_call(host: str, port: int, tls: bool = False) -> list[int]:
    """An HTTP/2 connection carrying one gRPC call without credentials (the method need not
    exist: a server that answers at all serves strangers): the frame types sent back."""
    fields = (
        (":method", "POST"),
        (":scheme", "https" if tls else "http"),
        (":path", "/grpc.health.v1.Health/Check"),
        (":authority", f"{host}:{port}"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    )
    # HPACK: each field a literal without indexing, new name, no Huffman coding
    block = b"".join(
        b"\x00" + bytes([len(name)]) + name.encode() + bytes([len(value)]) + value.encode()
        for name, value in fields
    )
    payload = (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        + _frame(4, 0, 0, b"")  # SETTINGS
        + _frame(1, 4, 1, block)  # HEADERS, END_HEADERS
        + _frame(0, 1, 1, bytes(5))  # DATA, END_STREAM: one empty message
    )
    return _frame_kinds(_exchange(host, port, payload, tls=tls, h2=True))


def _why(error: Exception) -> str:
    if isinstance(error, ssl.SSLError) and error.reason:
        return f"TLS error {error.reason}"
    return (str(error) or type(error).__name__).splitlines()[0][:80]


def _status(reply: bytes) -> int:
    """The status code of an HTTP/1 reply; 0 if it is none."""
    words = reply.split(b"\r\n", 1)[0].split()
    return int(words[1]) if len(words) > 1 and words[0].startswith(b"HTTP/") else 0


def _http(host: str, port: int, method: str, tls: bool = False) -> bytes:
    path, body = ("/", b"") if method == "GET" else ("/covidseg-door-probe", b"probe")
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return _exchange(host, port, head.encode() + body, tls=tls)


def try_http(host: str, port: int) -> tuple[str, str, bool] | None:
    """GET /, PUT and DELETE /covidseg-door-probe in HTTP/1.1, over TLS without a client
    certificate where the port asks for TLS; None if the port does not answer HTTP/1.1."""
    try:
        first = _http(host, port, "GET")
    except OSError:
        return None
    if not _status(first):
        return None
    tls = _status(first) == 400 and b"HTTPS server" in first
    answers, refused = [], True
    for method in ("GET", "PUT", "DELETE"):
        try:
            code = _status(_http(host, port, method, tls=tls))
            answers.append(f"{method} {code or 'no answer'}")
            refused &= code in (*REFUSED_HTTP, 0)
        except OSError as error:
            answers.append(f"{method}: {_why(error)}")
    request = "HTTPS without client certificate:" if tls else "HTTP:"
    return f"{request} GET, PUT, DELETE", ", ".join(answers), refused


def try_grpc(host: str, port: int) -> tuple[str, str, bool]:
    """A gRPC call in clear (h2c); if the port will not have it, over TLS without a client
    certificate."""
    for tls in (False, True):
        request = f"gRPC call over {'TLS without client certificate' if tls else 'h2c'}"
        try:
            kinds = grpc_call(host, port, tls=tls)
        except OSError as error:
            if tls:
                return request, _why(error), True
            continue
        if 1 in kinds:  # a HEADERS frame: the call was served
            return request, "answered (HTTP/2 HEADERS)", False
    return "gRPC call over h2c, then TLS", "closed without an answer", True


def try_postgres(host: str, port: int, user: str) -> tuple[str, str, bool]:
    """A connection as the stack's own database user without a password, then a wrong one."""
    import psycopg2

    answers, refused = [], True
    for password in ("", "wrong-password"):
        try:
            psycopg2.connect(
                host=host,
                port=port,
                user=user,
                password=password,
                dbname="postgres",
                connect_timeout=5,
                passfile=NO_PGPASS,
            ).close()
            answers.append("connected")
            refused = False
        except psycopg2.OperationalError as error:
            answers.append(str(error).strip().splitlines()[0].split("failed: ")[-1])
    return f"libpq as {user}: no password, wrong password", " / ".join(answers), refused


def settings(folder: Path) -> dict[str, str]:
    """DIR/ports.env and DIR/secrets/stack.env as {NAME: value}."""
    out = {}
    for file in (folder / "ports.env", folder / "secrets" / "stack.env"):
        for line in file.read_text().splitlines():
            name, _, value = line.partition("=")
            out[name] = value
    return out


def stack_pids(stack: TeamStack) -> list[int]:
    """Every process of the stack: its parts, their children, groups and sessions."""
    roots = [pid for part in (*PARTS, "postgres") if (pid := stack.pid(part)) is not None]
    return [int(line.split()[0]) for line in stack.processes(roots)]


def _owners(pids: list[int]) -> dict[int, str]:
    """{socket inode: command name} of the sockets these processes hold."""
    out: dict[int, str] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            out |= dict.fromkeys(socket_inodes(pid), name)
    return out


def scan(stack: TeamStack) -> list[Door]:
    """Every listening TCP port of the stack's processes, tried without credentials."""
    owners = _owners(stack_pids(stack))
    known = settings(stack.dir)
    names = {int(v): k for k, v in known.items() if k.endswith("_PORT") and v.isdigit()}
    doors, seen = [], set()
    for inode, (address, port) in sorted(tcp_listeners().items(), key=lambda item: item[1]):
        if inode not in owners or (address, port) in seen:
            continue
        seen.add((address, port))
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address, address)
        if owners[inode].startswith("postgres"):
            request, answer, refused = try_postgres(host, port, known["PG_USER"])
        else:
            request, answer, refused = try_http(host, port) or try_grpc(host, port)
        doors.append(Door(address, port, names.get(port, owners[inode]), request, answer, refused))
    return doors


def open_to_others(path: str) -> bool:
    """Whether an account other than the owner may connect to this unix socket: that takes
    write permission on it and search permission on every folder above it."""
    try:
        if not os.stat(path).st_mode & 0o002:
            return False
        return all(os.stat(folder).st_mode & 0o001 for folder in Path(path).parents)
    except OSError:
        return False


def unix_doors(stack: TeamStack) -> dict[str, bool]:
    """{path: open to other accounts} of every unix socket the stack listens on."""
    owners = _owners(stack_pids(stack))
    return {
        path: open_to_others(path) for inode, path in unix_listeners().items() if inode in owners
    }


def table(doors: list[Door], unix: dict[str, bool] | None = None) -> str:
    """The scan as a Markdown table."""
    rows = [
        "| address:port | setting | unauthenticated request | answer | refused |",
        "|---" * 5 + "|",
    ]
    for door in doors:
        where, refused = f"{door.address}:{door.port}", "yes" if door.refused else "**NO**"
        rows.append(f"| {where} | {door.name} | {door.request} | {door.answer} | {refused} |")
    for path, open_ in (unix or {}).items():
        mode = f"{os.stat(path).st_mode & 0o777:o}"
        refused = "**NO**" if open_ else "yes"
        rows.append(f"| unix {path} | | connect as another account | mode {mode} | {refused} |")
    return "\n".join(rows)
