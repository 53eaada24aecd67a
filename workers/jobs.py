"""Job payloads: what users push onto the Redis job list, parsed and validated.

A job is one of two one-liners pushed onto the LIST ``<prefix>:jobs`` (prefix from
`RedisConfig.prefix`, default ``pel``)::

    redis-cli LPUSH pel:jobs https://example.com/a.mp4
    redis-cli LPUSH pel:jobs '{"id": "cam-7", "url": "rtsp://cam/7", "options": {"live": true}}'

* A bare URL (``scheme://host/...``, a ``file://`` URL or an absolute path) gets an id assigned
  by the queue (stable across redeliveries).
* A JSON object has ``url`` (required), ``id`` (optional, ``[A-Za-z0-9_.-]``, at most 128
  characters) and ``options`` (optional) overriding ``sample_fps``, ``clip_seconds`` or ``live``.
  Unknown keys are an error.

Anything else raises `InvalidJob`; the queue turns that into a dead letter with the reason.
This module checks syntax only; which schemes/hosts/files may be opened is the URL policy's job.
"""
from __future__ import annotations

import json
import math
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional
from urllib.parse import urlsplit

from .redact import redact_text, redact_url  # noqa: F401  (re-exported)

MAX_URL_LENGTH = 4096
MAX_PAYLOAD_BYTES = 16384  # a job is a URL plus a few options
MAX_SAMPLE_FPS = 60.0
MAX_CLIP_SECONDS = 600.0
_ID_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*$")


class InvalidJob(ValueError):
    """A job payload that cannot be run. `reason` says why; `job_id` is set when one was given."""

    def __init__(self, reason: str, job_id: Optional[str] = None):
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


@dataclass(frozen=True)
class JobOptions:
    """Per-job overrides of the stream settings; None means "use the service default"."""

    sample_fps: Optional[float] = None
    clip_seconds: Optional[float] = None
    live: Optional[bool] = None

    @classmethod
    def from_mapping(cls, data: Any) -> "JobOptions":
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidJob(f"options must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {"sample_fps", "clip_seconds", "live"})
        if unknown:
            raise InvalidJob(f"unknown option(s): {', '.join(map(str, unknown))}")
        live = data.get("live")
        if live is not None and not isinstance(live, bool):
            raise InvalidJob(f"option live must be true or false, got {live!r}")
        return cls(
            sample_fps=_positive("sample_fps", data.get("sample_fps"), MAX_SAMPLE_FPS),
            clip_seconds=_positive("clip_seconds", data.get("clip_seconds"), MAX_CLIP_SECONDS),
            live=live,
        )

    def overrides(self) -> dict[str, Any]:
        """Only the options that were set, e.g. ``{"sample_fps": 4.0}``."""
        return {k: v for k, v in vars(self).items() if v is not None}


def _positive(name: str, value: Any, upper: float) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidJob(f"option {name} must be a number, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= upper):
        raise InvalidJob(f"option {name} must be in (0, {upper:g}], got {value!r}")
    return float(value)


@dataclass
class Job:
    """A claimed (or about to be pushed) job. `attempts` is the delivery count of `entry_id`."""

    id: str
    url: str
    options: JobOptions = field(default_factory=JobOptions)
    attempts: int = 0
    entry_id: Optional[str] = None

    def to_json(self) -> str:
        """The payload form accepted by `parse_job` (what `JobQueue.push` sends)."""
        payload: dict[str, Any] = {"id": self.id, "url": self.url}
        if self.options.overrides():
            payload["options"] = self.options.overrides()
        return json.dumps(payload, separators=(",", ":"))


def new_job_id() -> str:
    return uuid.uuid4().hex


def parse_job(raw: str | bytes, default_id: Optional[str] = None) -> Job:
    """Parse a pushed payload. Jobs without an id get `default_id` (or a fresh uuid4 hex).

    Any input either parses or raises `InvalidJob`, never another exception: a hostile payload
    (50,000 nested brackets, megabytes of text, invalid UTF-8) is a dead letter, not a crash."""
    try:
        return _parse_job(raw, default_id)
    except InvalidJob:
        raise
    except Exception as exc:  # RecursionError, MemoryError on huge input, anything unforeseen
        raise InvalidJob(f"unparseable payload ({type(exc).__name__})") from None


def _parse_job(raw: str | bytes, default_id: Optional[str]) -> Job:
    if isinstance(raw, (bytes, str)) and len(raw) > MAX_PAYLOAD_BYTES:
        raise InvalidJob(f"payload larger than {MAX_PAYLOAD_BYTES} bytes")
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidJob(f"payload is not UTF-8: {exc}") from None
    if not isinstance(raw, str):
        raise InvalidJob(f"payload must be text, got {type(raw).__name__}")
    text = raw.strip()
    if not text:
        raise InvalidJob("empty payload")
    if not text.startswith("{"):
        return Job(id=default_id or new_job_id(), url=_check_url(text))
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidJob(f"bad JSON: {exc}") from None
    except RecursionError:
        raise InvalidJob("bad JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidJob("JSON payload must be an object")
    job_id = data.get("id")
    if job_id is not None and (not isinstance(job_id, str) or not _ID_RE.match(job_id)):
        raise InvalidJob(f"id must match {_ID_RE.pattern}, got {str(job_id)[:140]!r}")
    unknown = sorted(set(data) - {"id", "url", "options"})
    if unknown:
        raise InvalidJob(f"unknown key(s): {', '.join(unknown)}", job_id)
    if not isinstance(data.get("url"), str):
        raise InvalidJob("missing or non-string 'url'", job_id)
    try:
        url = _check_url(data["url"].strip())
        options = JobOptions.from_mapping(data.get("options"))
    except InvalidJob as exc:
        raise InvalidJob(exc.reason, job_id) from None
    return Job(id=job_id or default_id or new_job_id(), url=url, options=options)


def _check_url(url: str) -> str:
    """Syntactic check: ``scheme://host...``, ``file:///path`` or an absolute path."""
    if len(url) > MAX_URL_LENGTH:
        raise InvalidJob(f"URL longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise InvalidJob("URL contains whitespace or control characters")
    if url.startswith("/"):
        return url
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise InvalidJob(f"not a URL: {exc}") from None
    if not parts.scheme or not _SCHEME_RE.match(parts.scheme) or "://" not in url:
        raise InvalidJob(f"not a URL (expected scheme://...): {redact_url(url)[:200]!r}")
    if parts.scheme.lower() == "file":
        if not parts.path.startswith("/"):
            raise InvalidJob("file URL needs an absolute path")
    elif not parts.hostname:
        raise InvalidJob(f"URL has no host: {redact_url(url)[:200]!r}")
    return url
