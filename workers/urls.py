"""Vetting stream URLs that arrive from the job queue before FFmpeg ever sees them.

`check_url` accepts only the configured schemes, enforces the host allow-list, resolves the host
and refuses non-public addresses (SSRF), and returns a `ResolvedSource` carrying the FFmpeg
`protocol_whitelist` / `format_whitelist` that keep FFmpeg from following nested protocols
(`file:` segments inside an HLS playlist, `concat:`, `subfile:`, `data:`...).

After this first check, every HTTP(S) connection FFmpeg makes (redirects, HLS playlists,
segments and keys, reconnects) goes through the egress guard (`workers.egress_guard`), which
vets each target with `vet_host` at connect time and connects to the address it vetted: no
redirect, playlist or DNS answer can take FFmpeg to an address this policy refuses.

Residual risks (also in the README's security section):
- RTSP and RTMP do not go through the guard: FFmpeg resolves their host again when it
  connects (DNS rebinding window of milliseconds), follows RTSP redirects itself, and RTSP may
  negotiate RTP over UDP from other addresses. Use `allowed_hosts` for cameras, or leave
  `rtsp`/`rtmp` out of `allowed_schemes`, where that matters.
- TLS certificates are not verified by PyAV's FFmpeg (its default); a network attacker between
  the worker and a stream host can substitute media. That affects verdicts, not reachability.
- The guard sees hosts and ports, not what a public server returns: a public host may still
  serve hostile media (the decoder's own robustness applies).
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from pel_model.config import UrlPolicyConfig
from workers.redact import redact_text, redact_url as redact  # one rule for the whole service

# The FFmpeg protocols each accepted scheme may use, nested protocols included.
PROTOCOL_WHITELISTS = {
    "http": "http,https,tcp,tls,crypto",  # HLS segments may switch to https / AES (crypto)
    "https": "http,https,tcp,tls,crypto",
    "rtmp": "rtmp,tcp",
    "rtsp": "rtsp,rtp,udp,tcp",
    "file": "file",
}
# Demuxers we accept (FFmpeg `format_whitelist`); keeps e.g. concat, image2, tty out of reach.
_DEMUXERS = "mov,mp4,m4a,3gp,3g2,mj2,mpegts,flv,live_flv,matroska,webm,rtsp,rtp,sdp,h264,hevc"
_LIVE_SCHEMES = {"rtmp", "rtsp"}
DEFAULT_PORTS = {"http": 80, "https": 443, "rtmp": 1935, "rtsp": 554}
_SAFE_URL = re.compile(r"^[\x21-\x7e]+$")  # printable ASCII, no spaces or controls


class UrlRejected(ValueError):
    """The URL is not allowed by the policy. `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str):
        super().__init__(redact_text(message))
        self.reason = reason


@dataclass(frozen=True)
class ResolvedSource:
    """A URL that passed the policy, with what FFmpeg needs to open it safely."""

    url: str  # what to hand to FFmpeg (files become "file:/abs/path")
    scheme: str  # http, https, rtmp, rtsp or file
    protocol_whitelist: str
    format_whitelist: str
    live: Optional[bool]  # True: rtmp/rtsp; False: files; None: decide after open (HLS, TS)
    host: Optional[str] = None
    addresses: tuple[str, ...] = ()
    policy: Optional[UrlPolicyConfig] = field(default=None, repr=False, compare=False)

    @property
    def is_network(self) -> bool:
        return self.scheme != "file"

    @property
    def redacted(self) -> str:
        return redact(self.url)


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """False for private, loopback, link-local, multicast, reserved, unspecified, CGNAT and
    site-local addresses, including IPv4 embedded in IPv6 (mapped, 6to4, Teredo, NAT64)."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if ip in ipaddress.ip_network("64:ff9b::/96"):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(e is not None and not is_public_address(e) for e in embedded):
            return False
        if ip.is_site_local:
            return False
    bad = (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
           or ip.is_reserved or ip.is_unspecified)
    return ip.is_global and not bad


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Exact match, or "*.example.com" / ".example.com" for subdomains of example.com."""
    for entry in (a.lower().rstrip(".") for a in allowed):
        if entry.startswith("*."):
            entry = entry[1:]
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


def _check_file(raw: str, path_text: str, policy: UrlPolicyConfig) -> ResolvedSource:
    if not policy.allow_files:
        raise UrlRejected("scheme", f"local files are not allowed: {raw!r}")
    path = Path(path_text)
    if not path.is_absolute():
        raise UrlRejected("file", f"file paths must be absolute: {raw!r}")
    resolved = path.resolve()  # follows symlinks and "..": the root check sees the real target
    roots = [Path(r).expanduser().resolve() for r in policy.file_roots]
    if not any(resolved.is_relative_to(root) for root in roots):
        raise UrlRejected("file", f"{resolved} is outside the allowed file_roots")
    return ResolvedSource(
        url=f"file:{resolved}", scheme="file", protocol_whitelist=PROTOCOL_WHITELISTS["file"],
        format_whitelist=_DEMUXERS, live=False, policy=policy,
    )


def _resolve(host: str, port: int) -> tuple[str, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError) as exc:
        raise UrlRejected("dns", f"cannot resolve host {host!r}: {exc}") from exc
    addresses = tuple(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise UrlRejected("dns", f"host {host!r} has no addresses")
    return addresses


def vet_host(host: str, port: int, policy: UrlPolicyConfig,
             resolve: Callable[[str, int], tuple[str, ...]] = _resolve) -> tuple[str, ...]:
    """The addresses `host:port` may be reached at under `policy` (host allow-list, then every
    resolved address public or in `allowed_networks`); raises UrlRejected. Used for the job's
    URL and, by the egress guard, for every connection FFmpeg makes after it."""
    host = host.lower().rstrip(".")
    if not host:
        raise UrlRejected("syntax", "no host")
    if policy.allowed_hosts is not None and not host_allowed(host, policy.allowed_hosts):
        raise UrlRejected("host", f"host {host!r} is not in allowed_hosts")
    addresses = resolve(host, port)
    networks = [ipaddress.ip_network(n, strict=False) for n in policy.allowed_networks]
    for text in addresses:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
        if any(ip in n for n in networks):
            continue
        if not policy.allow_private_addresses and not is_public_address(ip):
            raise UrlRejected("address", f"host {host!r} resolves to non-public address {ip}")
        if policy.allow_private_addresses and _metadata_service(ip):
            raise UrlRejected("address", f"host {host!r} resolves to {ip}, link-local or a cloud "
                                         "metadata address: refused even with "
                                         "allow_private_addresses; list it in allowed_networks")
    return addresses


# Instance metadata services outside link-local: AWS over IPv6, Alibaba Cloud.
_METADATA = {ipaddress.ip_address("fd00:ec2::254"), ipaddress.ip_address("100.100.100.200")}


def _metadata_service(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """169.254/16 and fe80::/10 (169.254.169.254 serves AWS, GCP and Azure credentials), the
    other metadata addresses, and their IPv4-mapped forms."""
    mapped = getattr(ip, "ipv4_mapped", None)
    return any(a is not None and (a.is_link_local or a in _METADATA) for a in (ip, mapped))


def check_url(url: str, policy: UrlPolicyConfig) -> ResolvedSource:
    """Validate `url` against `policy`; raise `UrlRejected` with a reason, else describe it."""
    if not isinstance(url, str) or not url:
        raise UrlRejected("syntax", "the stream URL must be a non-empty string")
    if len(url) > 4096 or not _SAFE_URL.match(url) or "\\" in url:
        raise UrlRejected("syntax", "the URL has spaces, control, backslash or non-ASCII characters, "
                                    "or is longer than 4096 characters")
    if url.startswith("/"):
        return _check_file(url, url, policy)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRejected("syntax", f"malformed URL {redact(url)!r}: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or parts.fragment:
            raise UrlRejected("file", f"file URLs must be file:///absolute/path, got {url!r}")
        return _check_file(url, parts.path, policy)
    if scheme not in PROTOCOL_WHITELISTS or scheme not in policy.allowed_schemes:
        shown = scheme or "(none)"
        allowed = [s for s in policy.allowed_schemes if s != "hls"]
        allowed += ["file (under file_roots)"] if policy.allow_files else []
        raise UrlRejected("scheme", f"scheme {shown!r} is not allowed (allowed: "
                                    f"{', '.join(allowed)})")
    if parts.netloc.count("@") > 1:
        raise UrlRejected("syntax", "more than one '@' in the URL authority")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise UrlRejected("syntax", f"no host in {redact(url)!r}")
    addresses = vet_host(host, port or DEFAULT_PORTS[scheme], policy)
    demuxers = _DEMUXERS + (",hls" if "hls" in policy.allowed_schemes else "")
    return ResolvedSource(
        url=url, scheme=scheme, protocol_whitelist=PROTOCOL_WHITELISTS[scheme],
        format_whitelist=demuxers, live=True if scheme in _LIVE_SCHEMES else None,
        host=host, addresses=addresses, policy=policy,
    )
