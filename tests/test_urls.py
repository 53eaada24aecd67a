"""URL policy: schemes, nested FFmpeg protocols, files, hosts and non-public addresses.

Only literal IPs and "localhost" are resolved, so no test touches the network.
"""
from __future__ import annotations

import ipaddress
import os

import pytest
from pydantic import ValidationError

from pel_model.config import UrlPolicyConfig
from workers.urls import UrlRejected, check_url, host_allowed, is_public_address, redact

DEFAULT = UrlPolicyConfig()
PUBLIC_V4 = "93.184.215.14"
PUBLIC_V6 = "2606:4700:4700::1111"


def rejected(url: str, policy: UrlPolicyConfig = DEFAULT) -> UrlRejected:
    with pytest.raises(UrlRejected) as info:
        check_url(url, policy)
    assert str(info.value)  # every refusal explains itself
    return info.value


@pytest.mark.parametrize("scheme,whitelist,live", [
    ("http", "http,https,tcp,tls,crypto", None),
    ("https", "http,https,tcp,tls,crypto", None),
    ("rtmp", "rtmp,tcp", True),
    ("rtsp", "rtsp,rtp,udp,tcp", True),
])
def test_public_urls_are_accepted_with_their_protocol_whitelist(scheme, whitelist, live):
    src = check_url(f"{scheme}://{PUBLIC_V4}:8080/live/stream", DEFAULT)
    assert (src.scheme, src.protocol_whitelist, src.live) == (scheme, whitelist, live)
    assert src.host == PUBLIC_V4 and src.addresses == (PUBLIC_V4,)
    assert "hls" in src.format_whitelist.split(",")
    assert "concat" not in src.format_whitelist.split(",")
    v6 = check_url(f"{scheme}://[{PUBLIC_V6}]/x", DEFAULT)
    assert v6.addresses == (PUBLIC_V6,)


def test_hls_demuxer_only_when_policy_allows_it():
    policy = UrlPolicyConfig(allowed_schemes=("http", "https"))
    assert "hls" not in check_url(f"http://{PUBLIC_V4}/a.m3u8", policy).format_whitelist.split(",")


@pytest.mark.parametrize("url", [
    "concat:/etc/passwd|/etc/hosts", "subfile:,start,0,end,0,:/etc/passwd", "data:text/plain,hi",
    "pipe:0", "tcp://93.184.215.14:80", "udp://93.184.215.14:5000", "ftp://93.184.215.14/a",
    "gopher://93.184.215.14/", "hls+http://93.184.215.14/a.m3u8", "crypto+http://93.184.215.14/a",
    "cache:http://93.184.215.14/a", "async:http://93.184.215.14/a", "unix:/run/x.sock",
    "smb://93.184.215.14/share", "just-a-word", "//93.184.215.14/no-scheme",
])
def test_nested_and_unknown_protocols_are_refused(url):
    assert rejected(url).reason == "scheme"


def test_scheme_must_be_in_policy():
    policy = UrlPolicyConfig(allowed_schemes=("https",))
    assert rejected(f"http://{PUBLIC_V4}/a.mp4", policy).reason == "scheme"
    assert check_url(f"HTTPS://{PUBLIC_V4}/a.mp4", policy).scheme == "https"


def test_policy_rejects_unsupported_scheme_names():
    with pytest.raises(ValidationError, match="unsupported schemes"):
        UrlPolicyConfig(allowed_schemes=("http", "file"))


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.8.8.8", "localhost", "10.1.2.3", "172.16.0.1", "192.168.1.1",
    "169.254.169.254", "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255",
    "[::1]", "[::]", "[fe80::1]", "[fc00::1]", "[fd12:3456::1]", "[ff02::1]", "[fec0::1]",
    "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[64:ff9b::a00:1]", "[2002:a00:1::1]",
    "[2001:db8::1]",
])
def test_non_public_addresses_are_refused(host):
    assert rejected(f"http://{host}:8000/a.mp4").reason == "address"
    # ...unless the operator explicitly allows them (e.g. a camera on the LAN), except
    # link-local addresses, where cloud metadata services live
    allow = UrlPolicyConfig(allow_private_addresses=True)
    if host in ("169.254.169.254", "[fe80::1]"):
        assert rejected(f"http://{host}/latest/", allow).reason == "address"
    else:
        assert check_url(f"rtsp://{host}:8554/cam", allow).live is True


@pytest.mark.parametrize("host, net", [
    ("169.254.169.254", "169.254.0.0/16"), ("[::ffff:169.254.169.254]", "::ffff:0:0/96"),
    ("[fe80::1]", "fe80::/10"), ("[fd00:ec2::254]", "fd00:ec2::/64"),
    ("100.100.100.200", "100.64.0.0/10")])
def test_metadata_services_stay_refused_with_private_addresses_allowed(host, net):
    allow = UrlPolicyConfig(allow_private_addresses=True)
    err = rejected(f"http://{host}/latest/meta-data/", allow)
    assert err.reason == "address" and "allowed_networks" in str(err)
    # an operator who really means it lists the network
    explicit = UrlPolicyConfig(allow_private_addresses=True, allowed_networks=(net,))
    assert check_url(f"http://{host}/latest/", explicit).host


def test_numeric_host_forms_cannot_smuggle_loopback():
    for url in ("http://2130706433/", "http://0x7f000001/", "http://0177.0.0.1/"):
        assert rejected(url).reason in ("address", "dns")


def test_is_public_address_examples():
    assert is_public_address(ipaddress.ip_address(PUBLIC_V4))
    assert is_public_address(ipaddress.ip_address(PUBLIC_V6))
    assert not is_public_address(ipaddress.ip_address("::ffff:169.254.169.254"))


def test_allowed_hosts_are_enforced_before_resolution():
    policy = UrlPolicyConfig(allowed_hosts=(PUBLIC_V4, "*.cdn.example"))
    assert check_url(f"https://{PUBLIC_V4}/a.m3u8", policy).host == PUBLIC_V4
    err = rejected("https://evil.example/a.m3u8", policy)
    assert err.reason == "host" and "evil.example" in str(err)
    assert rejected("http://93.184.215.15/a.mp4", policy).reason == "host"
    # allow-listing a host does not bypass the address check
    assert rejected("http://127.0.0.1/a", UrlPolicyConfig(allowed_hosts=("127.0.0.1",))).reason == "address"


def test_host_allowed_matching():
    allowed = ("video.example.com", "*.cdn.example", ".edge.example")
    assert host_allowed("video.example.com", allowed)
    assert host_allowed("a.b.cdn.example", allowed) and host_allowed("x.edge.example", allowed)
    assert not host_allowed("cdn.example.evil", allowed)
    assert not host_allowed("evilvideo.example.com", allowed)
    assert not host_allowed("xcdn.example", allowed)


@pytest.mark.parametrize("url", [
    "http://93.184.215.14/a b.mp4", "http://93.184.215.14/a\n.mp4", "http://93.184.215.14\\@127.0.0.1/",
    "http://a@b@93.184.215.14/", "http:///nohost.mp4", "http://93.184.215.14:99999/",
    "http://93.184.215.14/\u00e9.mp4", "",
])
def test_malformed_urls_are_refused(url):
    assert rejected(url).reason == "syntax"


def test_files_are_refused_by_default(tmp_path):
    video = tmp_path / "a.mp4"
    video.write_bytes(b"x")
    assert rejected(str(video)).reason == "scheme"
    assert rejected(f"file://{video}").reason == "scheme"


def test_files_inside_roots_only(tmp_path):
    root = tmp_path / "media"
    root.mkdir()
    (root / "a.mp4").write_bytes(b"x")
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"x")
    os.symlink(outside, root / "link.mp4")
    policy = UrlPolicyConfig(allow_files=True, file_roots=(root,))
    for url in (str(root / "a.mp4"), f"file://{root / 'a.mp4'}", f"file://localhost{root / 'a.mp4'}"):
        src = check_url(url, policy)
        assert src.url == f"file:{root.resolve() / 'a.mp4'}"
        assert (src.scheme, src.protocol_whitelist, src.live) == ("file", "file", False)
    assert rejected(str(outside), policy).reason == "file"
    assert rejected(f"{root}/../secret.mp4", policy).reason == "file"
    assert rejected(str(root / "link.mp4"), policy).reason == "file"  # symlink escapes the root
    err = rejected("media/a.mp4", policy)  # relative: no scheme, not a path
    assert err.reason == "scheme" and "file (under file_roots)" in str(err)
    assert "file" not in str(rejected("media/a.mp4"))  # not offered where files are off
    assert rejected(f"file://otherhost{root / 'a.mp4'}", policy).reason == "file"
    assert rejected(str(root / "a.mp4"), UrlPolicyConfig(allow_files=True)).reason == "file"


def test_redact_strips_credentials_and_tokens():
    url = "rtsp://user:pw@93.184.215.14:554/cam?token=abc123&channel=2"
    shown = redact(url)
    assert "pw" not in shown and "abc123" not in shown and "user" not in shown
    assert "channel=2" in shown and "93.184.215.14:554" in shown
    assert check_url(url, DEFAULT).redacted == shown
