"""Redaction: no credential leaves the process, whoever wrote the text.

Stream URLs carry secrets (`rtsp://user:pass@cam/...`, `?token=...`) and FFmpeg, Ray and Python
all echo them back in error messages. `redact_url` cleans one URL; `redact_text` cleans every URL
and every `secret-like-name=value` pair in free text (stored errors, dead letters, verdict
warnings); `install_log_redaction` applies it to every log record a process creates. What counts as secret: userinfo, the fragment, and query or text parameters
whose names look like credentials (`_SECRET_NAME`).
"""
from __future__ import annotations

import logging
import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
_SECRET_NAME = r"token|secret|passw|pwd|sig|key|auth|credential|session|jwt|cookie|access|private"
_SECRET_PARAM_RE = re.compile(_SECRET_NAME, re.I)
# Quantifiers are bounded and texts capped (`MAX_TEXT`) so that hostile input (a 50 KB payload
# of one character) costs linear time: the regex engine holds the GIL while it matches.
_URL_IN_TEXT_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,31}://[^\s\"'<>]{1,4096}")
# name=value outside URLs, e.g. FFmpeg echoing a query string or a header
_PAIR_IN_TEXT_RE = re.compile(
    r"((?<![\w.\-])(?:[\w.\-]{0,128}?(?:%s)[\w.\-]{0,128})\s{0,8}[=:]\s{0,8})([^\s&\"'<>,;]{1,4096})" % _SECRET_NAME, re.I)
_USERINFO_RE = re.compile(r"(?<![\w/])[^\s/@:\"'<>]{1,256}:[^\s/@\"'<>]{0,256}@(?=[\w.\-\[])")
MAX_TEXT = 20_000  # longer texts are cut (at a token boundary) before redaction


def redact_url(url: str) -> str:
    """Drop userinfo and the fragment, mask query values whose names look like secrets.

    ``rtsp://u:p@cam/x?token=abc&ch=1`` -> ``rtsp://cam/x?token=REDACTED&ch=1``.
    """
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    if not parts.scheme or not parts.netloc and not parts.query:
        return url  # a plain path: nothing to redact
    netloc = parts.netloc
    if "@" in netloc:
        netloc = host or ""
        if ":" in netloc:  # IPv6 literal
            netloc = f"[{netloc}]"
        if port is not None:
            netloc += f":{port}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_PARAM_RE.search(k) for k, _ in pairs):
        query = urlencode(
            [(k, REDACTED if _SECRET_PARAM_RE.search(k) else v) for k, v in pairs], safe="/:"
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _cap(text: str) -> str:
    """At most MAX_TEXT characters; a cut drops the token it falls in (no half secret stays)."""
    if len(text) <= MAX_TEXT:
        return text
    head = text[:MAX_TEXT]
    cut = max(head.rfind(c) for c in " \n\t")
    head = head[:cut] if cut > MAX_TEXT - 4096 else head[:MAX_TEXT - 4096]
    return head + f" [{len(text) - len(head)} characters cut]"


def redact_text(text: object) -> str:
    """`text` with every URL redacted, secret-looking `name=value` pairs masked and stray
    `user:password@` prefixes dropped (see module doc)."""
    text = _cap(str(text))
    if "://" in text:
        text = _URL_IN_TEXT_RE.sub(lambda m: redact_url(m.group(0)), text)
    if _SECRET_PARAM_RE.search(text):
        text = _PAIR_IN_TEXT_RE.sub(lambda m: m.group(1) + REDACTED, text)
    return _USERINFO_RE.sub("", text) if "@" in text else text


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # a broken format string: keep the raw text, redacted
        message = str(record.msg)
    record.msg, record.args = redact_text(message), ()
    if record.exc_info and not record.exc_text:
        record.exc_text = logging.Formatter().formatException(record.exc_info)
    if record.exc_text:
        record.exc_text = redact_text(record.exc_text)
    if record.stack_info:
        record.stack_info = redact_text(record.stack_info)
    return record


def install_log_redaction() -> None:
    """Redact every log record of this process when it is created (a log-record factory, so
    it covers every logger and handler, Ray's and FFmpeg's bridges included). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "pel_redacting", False):
        return

    def redacting_factory(*args, **kwargs) -> logging.LogRecord:
        return _redact_record(factory(*args, **kwargs))

    redacting_factory.pel_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
