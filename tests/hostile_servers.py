"""Hostile HTTP servers for the hostile-input suite, all on loopback.

127.0.0.2 (any 127/8 address reaches the loopback interface on Linux) plays a *public* host:
the tests allow it with `urls.allowed_networks: [127.0.0.2/32]`, while 127.0.0.1 stays what it
is, an internal address the policy must keep FFmpeg away from. No real private network is used.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import threading
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

PUBLIC = "127.0.0.2"
INTERNAL = "127.0.0.1"


class Recorder(http.server.SimpleHTTPRequestHandler):
    """Serves a directory; `routes` maps a path prefix to a handler(self) for hostile answers;
    every request is recorded on the server (`server.hits`)."""

    routes: dict[str, Callable[["Recorder"], None]] = {}

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        self.server.hits.append(self.path)  # type: ignore[attr-defined]
        for prefix, handler in self.routes.items():
            if self.path.startswith(prefix):
                return handler(self)
        return super().do_GET()


@contextlib.contextmanager
def http_server(host: str, directory: Path, routes: Optional[dict] = None, port: int = 0) -> Iterator:
    """A threaded server of `directory` on host:port; `routes` (shared: may be filled in after
    the server started, e.g. with its own URL) override paths with hostile answers."""
    handler = type("Handler", (Recorder,), {"routes": routes if routes is not None else {}})
    server = http.server.ThreadingHTTPServer((host, port),
                                             functools.partial(handler, directory=str(directory)))
    server.daemon_threads = True
    server.hits = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def base_url(server) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def redirect_to(location: str, status: int = 302) -> Callable[[Recorder], None]:
    def handle(req: Recorder) -> None:
        req.send_response(status)
        req.send_header("Location", location)
        req.send_header("Content-Length", "0")
        req.end_headers()
    return handle


def status(code: int) -> Callable[[Recorder], None]:
    def handle(req: Recorder) -> None:
        req.send_response(code)
        req.send_header("Content-Length", "0")
        req.end_headers()
    return handle


def huge_headers(n_bytes: int = 1 << 20) -> Callable[[Recorder], None]:
    def handle(req: Recorder) -> None:
        req.send_response(200)
        for i in range(n_bytes // 1000):
            req.send_header(f"X-Junk-{i}", "x" * 990)
        req.end_headers()
    return handle


def trickle(body: bytes, bytes_per_s: float) -> Callable[[Recorder], None]:
    """Slow-loris answer: a valid body, one byte at a time."""
    def handle(req: Recorder) -> None:
        req.send_response(200)
        req.send_header("Content-Type", "application/vnd.apple.mpegurl")
        req.send_header("Content-Length", str(len(body)))
        req.end_headers()
        try:
            for b in body:
                req.wfile.write(bytes([b]))
                req.wfile.flush()
                time.sleep(1.0 / bytes_per_s)
        except OSError:
            pass
    return handle
