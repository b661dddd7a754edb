"""Loopback HTTP server for download tests: real sockets, scripted faults, nothing off-machine.

Import the ``http_server`` fixture into a test module (``from http_server import http_server``);
it yields a started ``LoopbackServer`` and stops it when the test ends.
"""

from __future__ import annotations

import io
import re
import socket
import zipfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


@dataclass
class Seen:
    """One request as the server saw it, for assertions about retries and Range headers."""

    path: str
    range: str | None
    status: int = 0


@dataclass
class LoopbackServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with faults switched on per test.

    ``drop_after``: close the connection after this many body bytes, once. ``ignore_range``: always
    answer 200 with the whole body. ``wrong_bytes``: serve corrupted bytes of the right length.
    ``fail_once``: answer this status once before serving normally. Unknown paths get 404.
    """

    files: dict[str, bytes] = field(default_factory=dict)
    drop_after: int | None = None
    ignore_range: bool = False
    wrong_bytes: bool = False
    fail_once: int | None = None
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


_RANGE = re.compile(r"bytes=(\d+)-$")


def _handler_for(state: LoopbackServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"  # one request per connection: dropping one is unambiguous

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
            pass

        def _reply(self, seen: Seen, status: int, headers: dict[str, str], body: bytes = b"") -> None:
            seen.status = status
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            with state._lock:
                drop, state.drop_after = state.drop_after, None
            if drop is not None and drop < len(body):
                self.wfile.write(body[:drop])
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)
                self.close_connection = True
                return
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 - stdlib naming
            path = self.path.split("?", 1)[0].lstrip("/")
            seen = Seen(path, self.headers.get("Range"))
            with state._lock:
                state.requests.append(seen)
                fail, state.fail_once = state.fail_once, None
            if fail is not None:
                self._reply(seen, fail, {"Content-Length": "0"})
                return
            if path not in state.files:
                self._reply(seen, 404, {"Content-Length": "0"})
                return
            body = state.files[path]
            if state.wrong_bytes:
                body = bytes(b ^ 0xFF for b in body)
            m = _RANGE.match(seen.range or "")
            if m and not state.ignore_range:
                start = int(m.group(1))
                if start >= len(body):
                    self._reply(seen, 416, {"Content-Range": f"bytes */{len(body)}", "Content-Length": "0"})
                    return
                chunk = body[start:]
                headers = {
                    "Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}",
                    "Content-Length": str(len(chunk)),
                }
                self._reply(seen, 206, headers, chunk)
                return
            self._reply(seen, 200, {"Content-Length": str(len(body))}, body)

    return Handler


@pytest.fixture
def http_server() -> Iterator[LoopbackServer]:
    server = LoopbackServer()
    try:
        yield server
    finally:
        server.stop()


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hang_up_server() -> tuple[socket.socket, int]:
    """A loopback server that accepts each connection and closes it before sending a byte.

    Close the returned socket to stop it.
    """
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def zip_bytes(members: dict[str, bytes]) -> bytes:
    """A zip archive of `members` (name -> bytes), in memory, for a loopback server to serve."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()
