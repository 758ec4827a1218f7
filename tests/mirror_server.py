"""A loopback HTTP mirror of a folder, honouring `Range`, that can fail on demand.

    server = MirrorServer(folder).start()
    server.fail("Lung_Mask.zip", Fault(cut_after=1000), Fault(status=503))
    ...  # GET {server.url}/Lung_Mask.zip: first reply cut after 1000 body bytes, then a 503
    server.seen  # every request: file name, Range header, status
    server.stop()

Each queued fault is used by exactly one request for that file, in order; later requests are
served normally. `server.ranges = False` makes it ignore `Range` (200 with the whole file).
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

from phantoms import PhantomCase

PREFIX = "/records/3757476/files"


@dataclass(frozen=True)
class Mirror:
    """A folder holding the archives, their sha256 and the cases inside them."""

    dir: Path
    sha256: dict[str, str]
    cases: list[PhantomCase]


@dataclass(frozen=True)
class Fault:
    """One misbehaving reply: stall first, then an error status or a body cut short."""

    status: int | None = None  # reply with this status and an empty body
    cut_after: int | None = None  # send the headers, this many body bytes, then drop the line
    stall_s: float = 0.0  # wait this long before replying (to trip a client's timeout)


@dataclass(frozen=True)
class Seen:
    """One request as the server saw it."""

    name: str
    range: str | None
    status: int


class MirrorServer:
    """Serves the files of `root` at `{url}/<name>` on 127.0.0.1 (a free port)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.ranges = True
        self.seen: list[Seen] = []
        self._faults: dict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.mirror = self
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        """The base URL to put in `download.base_url`."""
        return f"http://127.0.0.1:{self._server.server_address[1]}{PREFIX}"

    def start(self) -> MirrorServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def fail(self, name: str, *faults: Fault) -> None:
        """Queue faults for the next requests of file `name`, one per request."""
        with self._lock:
            self._faults[name].extend(faults)

    def requests_for(self, name: str) -> list[Seen]:
        """The requests seen for one file, in order."""
        with self._lock:
            return [seen for seen in self.seen if seen.name == name]

    def _next_fault(self, name: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(name)
            return queue.popleft() if queue else None

    def _record(self, name: str, range_: str | None, status: int) -> None:
        with self._lock:
            self.seen.append(Seen(name, range_, status))

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        """Answer one GET: maybe a fault, else the file (or the asked-for range of it)."""
        name = unquote(urlparse(request.path).path).removeprefix(PREFIX + "/")
        range_ = request.headers.get("Range")
        fault = self._next_fault(name) or Fault()
        time.sleep(fault.stall_s)
        if fault.status is not None:
            return self._reply(request, name, range_, fault.status, b"", {})
        path = self.root / name
        if "/" in name or not path.is_file():
            return self._reply(request, name, range_, 404, b"", {})
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", range_ or "") if self.ranges else None
        if match is None:
            return self._reply(request, name, range_, 200, data, {}, fault.cut_after)
        first = int(match.group(1))
        last = min(int(match.group(2) or len(data) - 1), len(data) - 1)
        if first >= len(data):
            headers = {"Content-Range": f"bytes */{len(data)}"}
            return self._reply(request, name, range_, 416, b"", headers)
        headers = {"Content-Range": f"bytes {first}-{last}/{len(data)}"}
        body = data[first : last + 1]
        return self._reply(request, name, range_, 206, body, headers, fault.cut_after)

    def _reply(
        self,
        request: BaseHTTPRequestHandler,
        name: str,
        range_: str | None,
        status: int,
        body: bytes,
        headers: dict[str, str],
        cut_after: int | None = None,
    ) -> None:
        """Send a reply; with `cut_after`, only that many body bytes before dropping the line."""
        self._record(name, range_, status)
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            request.send_header(key, value)
        request.send_header("Accept-Ranges", "bytes" if self.ranges else "none")
        request.end_headers()
        if cut_after is None:
            request.wfile.write(body)
            return
        request.wfile.write(body[:cut_after])
        request.wfile.flush()
        request.close_connection = True
        request.connection.shutdown(socket.SHUT_RDWR)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mirror: MirrorServer

    def handle_error(self, request: object, client_address: object) -> None:
        """A client that gave up (timeout test) is expected: stay quiet."""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self.server.mirror.handle(self)

    def log_message(self, format: str, *args: object) -> None:
        """No access log on the test output."""
