"""Egress guard: every HTTP(S) connection FFmpeg makes is vetted at connect time.

Checking a job's URL once is not enough: FFmpeg follows redirects (`302 Location:
http://169.254.169.254/`), HLS playlists name segments on any host, reconnects resolve DNS again
(rebinding). So FFmpeg is given `http_proxy` pointing at this small forward proxy on loopback,
which it uses for the first request, every redirect, every playlist, segment and key, and every
reconnect. For each one the guard resolves the target once, vets it with the job's URL policy
(`urls.vet_host`: allowed hosts, public addresses or `allowed_networks`), and connects to the
address it vetted (pinned: no second lookup). Plain HTTP is forwarded (origin-form request,
`Connection: close`); HTTPS goes through `CONNECT` as an opaque tunnel.

Each job gets a session (`guard.session(policy)`): a random credential in the proxy URL (FFmpeg
answers the guard's 407 challenge with it), so the guard knows which job's policy applies and
records what it allowed and refused (`GuardSession.events`) for the job's error reason. Other
local processes without a credential get 407 and nothing else.
"""
from __future__ import annotations

import base64
import logging
import os
import secrets
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional
from urllib.parse import urlsplit

from pel_model.config import UrlPolicyConfig

from .redact import redact_url
from .urls import UrlRejected, vet_host

log = logging.getLogger(__name__)
MAX_HEAD_BYTES = 32 * 1024
MAX_EVENTS = 200  # per session (a long live HLS stream makes one request per segment)
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class EgressEvent:
    target: str  # host:port (no path, no credentials)
    allowed: bool
    detail: str  # refusal reason, or the address connected to


CONNECT_FAILED = "connect failed: "  # detail of an allowed connection that could not be made


@dataclass
class GuardSession:
    """One job's use of the guard: its policy, its proxy URL, what was allowed and refused."""

    guard: "EgressGuard"
    policy: UrlPolicyConfig
    user: str
    token: str
    events: list[EgressEvent] = field(default_factory=list)

    @property
    def proxy_url(self) -> str:
        return f"http://{self.user}:{self.token}@127.0.0.1:{self.guard.port}"

    @property
    def refusals(self) -> list[EgressEvent]:
        return [e for e in self.events if not e.allowed]

    def record(self, event: EgressEvent) -> None:
        if len(self.events) >= MAX_EVENTS:
            del self.events[: MAX_EVENTS // 2]
        self.events.append(event)

    def close(self) -> None:
        self.guard._sessions.pop(self.user, None)

    def __enter__(self) -> "GuardSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def _read_head(conn: socket.socket) -> tuple[bytes, bytes]:
    """(request head up to the blank line, bytes read past it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD_BYTES:
            raise _Refused(431, "request head too large")
        chunk = conn.recv(4096)
        if not chunk:
            raise _Refused(400, "connection closed before the request head ended")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head, rest


class EgressGuard:
    """The proxy (see module doc). `start()` once per process; thread-safe."""

    def __init__(self, connect_timeout_s: float = 10.0, idle_timeout_s: float = 60.0,
                 resolve: Optional[Callable[[str, int], tuple[str, ...]]] = None):
        self.connect_timeout_s, self.idle_timeout_s = connect_timeout_s, idle_timeout_s
        self._resolve = resolve  # tests inject a resolver (e.g. to play a DNS rebinding attack)
        self._sessions: dict[str, GuardSession] = {}
        self._listener: Optional[socket.socket] = None
        self._closed = threading.Event()
        self.port = 0

    def start(self) -> "EgressGuard":
        if self._listener is None:
            self._listener = socket.create_server(("127.0.0.1", 0), backlog=64)
            self.port = self._listener.getsockname()[1]
            threading.Thread(target=self._accept_loop, name="egress-guard", daemon=True).start()
        return self

    def session(self, policy: UrlPolicyConfig) -> GuardSession:
        s = GuardSession(self, policy, "s" + secrets.token_hex(6), secrets.token_urlsafe(18))
        self._sessions[s.user] = s
        return s

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.close()

    # ---- connections -----------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:
                if self._closed.is_set():
                    return
                time.sleep(0.05)
                continue
            threading.Thread(target=self._handle, args=(conn,), name="egress-conn",
                             daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        upstream = None
        try:
            client.settimeout(self.connect_timeout_s)
            head, rest = _read_head(client)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = (lines[0].split(" ") + ["", ""])[:3]
            headers = [ln for ln in lines[1:] if ln]
            session = self._authenticate(headers)
            if session is None:
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                               b"Proxy-Authenticate: Basic realm=\"pel-egress\"\r\n"
                               b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                return
            if method == "CONNECT":
                host, port = self._host_port(target, 443)
                upstream = self._connect(session, host, port)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            elif target.lower().startswith("http://"):
                parts = urlsplit(target)
                host, port = parts.hostname or "", parts.port or 80
                upstream = self._connect(session, host, port)
                path = parts.path or "/"
                if parts.query:
                    path += "?" + parts.query
                kept = [h for h in headers if h.split(":", 1)[0].strip().lower()
                        not in ("proxy-authorization", "proxy-connection", "connection")]
                request = f"{method} {path} HTTP/1.1\r\n" + "".join(h + "\r\n" for h in kept) \
                    + "Connection: close\r\n\r\n"
                upstream.sendall(request.encode("latin-1") + rest)
                rest = b""
            else:
                raise _Refused(405, f"method {method!r} to {target[:60]!r} is not proxied")
            if rest:
                upstream.sendall(rest)
            self._pump(client, upstream)
        except _Refused as exc:
            try:
                client.sendall(f"HTTP/1.1 {exc.status} Refused\r\nX-Pel-Egress: refused\r\n"
                               f"Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
            except OSError:
                pass
        except (OSError, ValueError, UnicodeError) as exc:
            log.debug("egress connection ended: %s", exc)
        finally:
            for s in (client, upstream):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass

    def _authenticate(self, headers: list[str]) -> Optional[GuardSession]:
        for h in headers:
            name, _, value = h.partition(":")
            if name.strip().lower() != "proxy-authorization":
                continue
            scheme, _, cred = value.strip().partition(" ")
            if scheme.lower() != "basic":
                return None
            try:
                user, _, token = base64.b64decode(cred.strip()).decode().partition(":")
            except (ValueError, UnicodeError):
                return None
            session = self._sessions.get(user)
            if session is not None and secrets.compare_digest(session.token, token):
                return session
        return None

    @staticmethod
    def _host_port(target: str, default: int) -> tuple[str, int]:
        host, sep, port = target.rpartition(":")
        if not sep or not port.isdigit():
            return target.strip("[]"), default
        return host.strip("[]"), int(port)

    def _connect(self, session: GuardSession, host: str, port: int) -> socket.socket:
        where = f"{host}:{port}"
        try:
            kwargs = {"resolve": self._resolve} if self._resolve else {}
            addresses = vet_host(host, port, session.policy, **kwargs)
        except UrlRejected as exc:
            session.record(EgressEvent(where, False, f"{exc.reason}: {exc}"))
            log.warning("egress guard refused %s: %s", where, exc)
            raise _Refused(403, str(exc)) from None
        last: Optional[OSError] = None
        for address in addresses:  # the vetted addresses, never a fresh lookup
            try:
                upstream = socket.create_connection((address, port), timeout=self.connect_timeout_s)
                session.record(EgressEvent(where, True, address))
                return upstream
            except OSError as exc:
                last = exc
        why = getattr(last, "strerror", None) or str(last)  # "Connection refused", no errno
        session.record(EgressEvent(where, True, CONNECT_FAILED + why))
        raise _Refused(502, f"cannot connect to {where}: {last}")

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until either side closes or both are idle too long."""
        sel = selectors.DefaultSelector()
        for s in (a, b):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        peer = {a: b, b: a}
        try:
            while True:
                ready = sel.select(timeout=self.idle_timeout_s)
                if not ready:
                    return
                for key, _ in ready:
                    src = key.fileobj
                    try:
                        data = src.recv(_CHUNK)
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    dst = peer[src]
                    dst.setblocking(True)
                    dst.settimeout(self.idle_timeout_s)
                    dst.sendall(data)
                    dst.setblocking(False)
        finally:
            sel.close()


_GUARD: Optional[EgressGuard] = None
_GUARD_LOCK = threading.Lock()


def egress_guard() -> EgressGuard:
    """The process's guard, started on first use. FFmpeg skips `http_proxy` for hosts listed
    in `no_proxy`, so that variable is removed from this process's environment."""
    global _GUARD
    with _GUARD_LOCK:
        if _GUARD is None:
            for name in ("no_proxy", "NO_PROXY"):
                os.environ.pop(name, None)
            _GUARD = EgressGuard().start()
        return _GUARD


def describe_connect_failure(session: Optional[GuardSession]) -> Optional[str]:
    """The last connection the guard allowed but could not make (nothing listening, a
    timeout), in one line, if it was the session's last event: FFmpeg only sees the guard's
    502 and would report a server error that no server sent."""
    if session is None or not session.events:
        return None
    e = session.events[-1]
    if not (e.allowed and e.detail.startswith(CONNECT_FAILED)):
        return None
    why = e.detail[len(CONNECT_FAILED):]
    return f"cannot connect to {redact_url('http://' + e.target)[7:]}: {why}"


def describe_refusals(session: Optional[GuardSession]) -> Optional[str]:
    """The last refusal of a session in one line, or None."""
    if session is None or not session.refusals:
        return None
    e = session.refusals[-1]
    return f"egress guard refused a connection to {redact_url('http://' + e.target)[7:]} ({e.detail})"
