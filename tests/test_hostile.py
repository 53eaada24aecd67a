"""Hostile inputs and faults (`pytest -m hostile`): poison-pill payloads, SSRF through every hop
(redirects, playlists, reconnects, DNS rebinding), credentials in error text, hostile servers
(endless redirects, huge headers, slow-loris playlists, stalls), error reasons, duplicate job
ids, cancellation, live lag, rotated phone video, Redis dying. Real redis-server, real PyAV and
FFmpeg, real HTTP servers on loopback (see `hostile_servers` for the 127.0.0.2 "public" host)."""
from __future__ import annotations

import base64
import json
import logging
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostile_servers import (INTERNAL, PUBLIC, base_url, http_server, huge_headers, redirect_to,
                             status, trickle)
from media import FFMPEG, free_port, make_face_video, make_hls, make_ts, rtmp_server, stop_process
from pel_model.config import FaceConfig, IntakeConfig, RedisConfig, StreamConfig, UrlPolicyConfig
from workers.decode import StreamError, classify_error, clip_windows, iter_sampled_frames
from workers.egress_guard import EgressGuard
from workers.jobs import InvalidJob, Job, parse_job
from workers.queue import JobQueue, Lease
from workers.redact import install_log_redaction, redact_text
from workers.urls import ResolvedSource, UrlRejected, check_url

pytestmark = [pytest.mark.hostile, pytest.mark.timeout(120)]
FAST = StreamConfig(open_timeout_s=3, read_timeout_s=2, stall_timeout_s=3,
                    backoff_initial_s=0.05, backoff_max_s=0.3, reconnect_window_s=5)
# 127.0.0.2 plays a public host; everything else non-public (127.0.0.1 included) is refused.
POLICY = UrlPolicyConfig(allowed_networks=(f"{PUBLIC}/32",))
SECRET = "hunter2-s3cret"


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hostile-media")
    make_face_video(root / "face.mp4", seconds=4)
    make_hls(root / "face.mp4", root / "hls")
    make_ts(root / "face.mp4", root / "face.ts")
    return root


def frames_of(url: str, policy: UrlPolicyConfig = POLICY, cfg: StreamConfig = FAST, **kw):
    return list(iter_sampled_frames(check_url(url, policy), cfg, kw.pop("fps", 2.0), **kw))


def no_secret(text: str) -> None:
    assert SECRET not in text and "tok3n" not in text, text


# ----------------------------------------------------------------------------- payloads
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=3000), st.text(max_size=3000),
                 st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(),
                              lambda c: st.lists(c) | st.dictionaries(st.text(), c),
                              max_leaves=30).map(json.dumps)))
def test_any_payload_is_a_job_or_a_clean_rejection(raw):
    try:
        job = parse_job(raw)
    except InvalidJob as exc:
        assert exc.reason
        return
    assert isinstance(job, Job) and job.url and job.id


@pytest.mark.parametrize("raw", [
    "[" * 50_000, '{"url": "http://a.b/c", "options": ' + "[" * 5000 + "]" * 5000 + "}",
    "{" * 12_000, b"\xff\xfe\x00", "x" * 200_000, '{"url": "' + "a" * 20_000 + '"}',
    '{"url": "http://a.b/", "id": {"$gt": ""}}', '{"url": ["http://a.b"]}', "\x00" * 10,
    '{"url": "http://a.b/", "options": {"sample_fps": 1e309}}',
    '{"url": "http://a.b/", "options": {"clip_seconds": -1}}'])
def test_poison_payloads_are_rejected_with_a_reason(raw):
    with pytest.raises(InvalidJob) as info:
        parse_job(raw)
    assert info.value.reason


URL_PARTS = st.builds(
    lambda scheme, user, host, port, path: f"{scheme}://{user}{host}{port}{path}",
    st.sampled_from(["http", "https", "rtmp", "rtsp", "file", "ftp", "gopher", "HTTP", "data",
                     "concat:http", ""]),
    st.sampled_from(["", "u:p@", "@", "a@b@", "%40@"]),
    st.sampled_from(["127.0.0.1", "0x7f.1", "[::1]", "[::ffff:127.0.0.1]", "169.254.169.254",
                     "10.0.0.1", "2130706433", "0177.0.0.1", "[fe80::1%25lo]", "localhost.",
                     "example.com", "ex\u0430mple.com", "", "a" * 300, "1.1.1.1"]),
    st.sampled_from(["", ":0", ":80", ":99999", ":-1", ":abc"]),
    st.text(max_size=40))


@settings(max_examples=400, deadline=None)
@given(st.one_of(URL_PARTS, st.text(max_size=300)))
def test_any_url_is_accepted_or_refused_cleanly(url):
    # allowed_hosts keeps hypothesis away from real DNS lookups of random names
    policy = UrlPolicyConfig(allowed_hosts=("example.com", "1.1.1.1"), allow_files=False)
    try:
        source = check_url(url, policy)
    except UrlRejected as exc:
        assert exc.reason and str(exc)
        return
    assert isinstance(source, ResolvedSource) and source.host in ("example.com", "1.1.1.1")


def _queue(client, consumer="w", **intake) -> JobQueue:
    return JobQueue(client, RedisConfig(prefix="h"), IntakeConfig(poll_block_ms=10, **intake),
                    consumer)


def test_poison_pill_in_the_queue_is_dead_lettered_and_the_next_job_runs(redis_client):
    q = _queue(redis_client)
    hostile = ["[" * 50_000, b"\xff" * 100, '{"url": "x", "id": "evil", "extra": 1}',
               '{"id": "n", "url": "http://a.b/", "options": ' + "[" * 3000 + "]" * 3000 + "}"]
    for raw in hostile:
        redis_client.lpush("h:jobs", raw)
    good = q.push("https://example.com/fine.mp4")
    claimed = []
    while (job := q.claim(block_ms=0)) is not None:  # nothing raises past the intake
        claimed.append(job)
    assert [j.id for j in claimed] == [good]
    dead = q.dead_letters()
    assert len(dead) == len(hostile) and all(d["reason"].startswith("invalid job") for d in dead)
    assert q.stats()["pending"] == 1  # only the good job, running


def test_same_job_id_twice_is_one_job(redis_client):
    q = _queue(redis_client)
    q.push({"id": "cam-1", "url": "https://example.com/a.mp4"})
    first = q.claim(block_ms=0)
    assert q.progress(first, clips_done=2)
    with pytest.raises(InvalidJob, match="already queued or running"):
        q.push({"id": "cam-1", "url": "https://example.com/b.mp4"})
    redis_client.lpush("h:jobs", json.dumps({"id": "cam-1", "url": "https://example.com/b.mp4"}))
    assert q.claim(block_ms=0) is None  # the raw duplicate is dead-lettered, not run
    dead = q.dead_letters()
    assert dead[0]["reason"].startswith("duplicate job id") and dead[0]["job_id"] == "cam-1"
    st_ = q.state("cam-1")  # the running job's record is untouched
    assert st_["state"] == "running" and st_["entry_id"] == first.entry_id and st_["clips_done"] == 2
    assert q.complete(first) and q.state("cam-1")["state"] == "done"
    q.push({"id": "cam-1", "url": "https://example.com/c.mp4"})  # finished: the id is free again
    again = q.claim(block_ms=0)
    assert again.url.endswith("c.mp4") and q.state("cam-1")["clips_done"] == 0


def test_progress_survives_redelivery(redis_client):
    a, b = _queue(redis_client, "a", lease_seconds=0.3), _queue(redis_client, "b", lease_seconds=0.3)
    job_id = a.push("https://example.com/live.ts")
    job = a.claim(block_ms=0)
    assert a.progress(job, clips_done=7, media_seconds=70.0, frames_sampled=140, faces_scored=130)
    time.sleep(0.5)  # a's lease expires (its worker "died")
    again = b.claim(block_ms=0)
    assert again.id == job_id and again.attempts == 2
    assert b.progress(again, clips_done=1, media_seconds=10.0, frames_sampled=20, faces_scored=19)
    st_ = b.state(job_id)
    assert (st_["clips_done"], st_["media_seconds"], st_["frames_sampled"]) == (7, 70.0, 140)
    assert b.progress(again, clips_done=9, media_seconds=90.0)
    assert b.state(job_id)["clips_done"] == 9


def test_cancel_a_queued_and_a_running_job(redis_client):
    q = _queue(redis_client, lease_seconds=0.3)
    queued = q.push("https://example.com/later.mp4")
    assert q.cancel(queued) == "queued"
    assert q.claim(block_ms=0) is None and q.state(queued)["state"] == "cancelled"
    running = q.push("https://example.com/live.ts")
    job = q.claim(block_ms=0)
    stop = threading.Event()
    with Lease(q, job, interval_s=0.1, stop_event=stop) as lease:
        assert q.cancel(running) == "running"
        assert stop.wait(3) and lease.cancelled and not lease.lost
    assert q.finish(job, "cancelled", "cancelled by request")
    assert q.state(running)["state"] == "cancelled" and q.cancel("nope") is None


# ----------------------------------------------------------------------------- SSRF
@pytest.mark.parametrize("internal_target", ["internal", "metadata"])
def test_redirects_to_internal_addresses_are_refused(media, internal_target):
    with http_server(INTERNAL, media) as internal:
        target = (f"{base_url(internal)}/face.mp4" if internal_target == "internal"
                  else "http://169.254.169.254/latest/meta-data/face.mp4")
        with http_server(PUBLIC, media, {"/go": redirect_to(target)}) as public:
            assert len(frames_of(f"{base_url(public)}/face.mp4")) == 8  # the public file is fine
            with pytest.raises(StreamError) as info:
                frames_of(f"{base_url(public)}/go")
            assert info.value.reason == "rejected" and "egress guard refused" in str(info.value)
            assert public.hits[-1] == "/go"
        assert internal.hits == []  # FFmpeg never reached the internal server


def test_hls_segments_on_internal_hosts_are_refused(media, tmp_path):
    evil = tmp_path / "evil"
    evil.mkdir()
    with http_server(INTERNAL, media / "hls") as internal:
        playlist = (media / "hls" / "index.m3u8").read_text()
        lines = [f"{base_url(internal)}/{ln}" if ln.endswith(".ts") else ln
                 for ln in playlist.splitlines()]
        (evil / "index.m3u8").write_text("\n".join(lines) + "\n")
        with http_server(PUBLIC, evil) as public:
            with pytest.raises(StreamError) as info:
                frames_of(f"{base_url(public)}/index.m3u8")
        assert info.value.reason == "rejected"
        assert internal.hits == []


def _raw_proxy_get(guard_port: int, auth: str | None, target: str) -> bytes:
    with socket.create_connection(("127.0.0.1", guard_port), timeout=5) as s:
        head = f"GET {target} HTTP/1.1\r\nHost: x\r\n"
        if auth:
            head += f"Proxy-Authorization: Basic {base64.b64encode(auth.encode()).decode()}\r\n"
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return data


def test_dns_rebinding_gets_the_vetted_address_and_reconnects_are_vetted_again(media):
    """The guard resolves once per connection and connects to what it vetted; a later
    connection (a reconnect) is vetted again and refused once DNS points inside."""
    answers = [(PUBLIC,), (INTERNAL,)]
    guard = EgressGuard(resolve=lambda host, port: answers[0] if host == "cam.example" else ())
    guard.start()
    try:
        with http_server(PUBLIC, media) as public, \
                http_server(INTERNAL, media, port=public.server_address[1]) as internal:
            port = public.server_address[1]  # same port on both: only the address differs
            session = guard.session(POLICY)
            ok = _raw_proxy_get(guard.port, f"{session.user}:{session.token}",
                                f"http://cam.example:{port}/face.mp4")
            assert ok.startswith(b"HTTP/1.0 200") or ok.startswith(b"HTTP/1.1 200")
            assert public.hits == ["/face.mp4"]
            answers.pop(0)  # the attacker's DNS now answers 127.0.0.1
            refused = _raw_proxy_get(guard.port, f"{session.user}:{session.token}",
                                     f"http://cam.example:{port}/face.mp4")
            assert refused.startswith(b"HTTP/1.1 403") and internal.hits == []
            assert [e.allowed for e in session.events] == [True, False]
            # no credential, wrong credential: 407, nothing fetched
            assert _raw_proxy_get(guard.port, None, f"http://cam.example:{port}/x").startswith(
                b"HTTP/1.1 407")
            assert _raw_proxy_get(guard.port, f"{session.user}:wrong",
                                  f"http://cam.example:{port}/x").startswith(b"HTTP/1.1 407")
            assert public.hits == ["/face.mp4"]
    finally:
        guard.close()


# ----------------------------------------------------------------------------- credentials
def test_credentials_never_reach_errors_or_logs(media, caplog):
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    with http_server(PUBLIC, media, {"/gone": status(404), "/go": redirect_to("http://127.0.0.1:9/")}) as public:
        host, port = public.server_address[:2]
        for path in ("/gone", "/go", "/missing.mp4"):
            url = f"http://user:{SECRET}@{host}:{port}{path}?token=tok3n&session=tok3n"
            with pytest.raises(StreamError) as info:
                frames_of(url)
            no_secret(str(info.value))
            logging.getLogger("workers.test").warning("job failed: %s (url %s)", info.value, url)
    no_secret(caplog.text)
    assert "user:" not in caplog.text
    no_secret(redact_text(f"Server returned 404: 'rtsp://admin:{SECRET}@cam/1?auth=tok3n'"))


@pytest.mark.timeout(30)  # the quadratic patterns took minutes on these; linear ones take ms
@pytest.mark.parametrize("text", ["[" * 200_000, "key" * 70_000, "a:" * 100_000 + "@h",
                                  "http://" + "a" * 200_000, "x " * 100_000])
def test_redaction_of_hostile_text_is_bounded(text):
    # Poison-pill payloads are redacted into dead letters and logs while the worker's lease
    # thread waits for the GIL: redaction must stay linear and its output capped.
    out = redact_text(f"http://u:{SECRET}@h/?token={SECRET} " + text)
    assert len(out) <= 20_100 and SECRET not in out
    tail = "a " * 9_990 + f"user:{SECRET}@host.example" + " b" * 100  # cut inside a secret
    assert SECRET[:4] not in redact_text(tail)


# ----------------------------------------------------------------------------- hostile servers
def test_endless_redirects_huge_headers_and_slow_loris_end_cleanly(media):
    body = (media / "hls" / "index.m3u8").read_bytes()
    routes = {"/loop": None, "/huge": huge_headers(), "/slow": trickle(body, 2.0)}
    with http_server(PUBLIC, media, routes) as public:
        routes["/loop"] = redirect_to(f"{base_url(public)}/loop")  # to itself, forever
        for path, reasons in (("/loop", {"unreachable", "http_error", "corrupt"}),
                              ("/huge", {"unreachable", "corrupt", "http_error"}),
                              ("/slow", {"stalled"})):
            start = time.monotonic()
            with pytest.raises(StreamError) as info:
                frames_of(f"{base_url(public)}{path}")
            assert info.value.reason in reasons, (path, info.value)
            assert time.monotonic() - start < 20, path
        assert public.hits.count("/loop") <= 10  # FFmpeg's redirect limit, no loop


def test_error_reasons_say_what_happened(media):
    ts = (media / "face.ts").read_bytes()
    routes = {"/404": status(404), "/403": status(403), "/503": status(503), "/429": status(429)}
    with http_server(PUBLIC, media, routes) as public:
        base = base_url(public)
        expect = {"/404": ("http_error", False), "/403": ("http_error", False),
                  "/503": ("unreachable", True), "/429": ("unreachable", True)}
        for path, (reason, transient) in expect.items():
            with pytest.raises(StreamError) as info:
                frames_of(base + path)
            assert (info.value.reason, info.value.transient) == (reason, transient), path
            assert "Errno" not in str(info.value)
    with pytest.raises(UrlRejected) as refused:  # refused by the policy: final, named as such
        frames_of(f"http://{INTERNAL}:9/x.mp4")
    err = classify_error(refused.value)
    assert err.reason == "rejected" and not err.transient
    from media import stalling_http_server
    with stalling_http_server(ts[: len(ts) // 2]) as url:  # stall after the first bytes
        with pytest.raises(StreamError) as info:
            frames_of(url, UrlPolicyConfig(allow_private_addresses=True),
                      FAST.model_copy(update={"stall_timeout_s": 1.5}), live=False)
    assert info.value.reason in ("stalled", "truncated") and info.value.transient


# ----------------------------------------------------------------------------- streams
def test_rotated_phone_video_is_decoded_upright(media, tmp_path):
    from pel_model.faces import make_detector

    sideways = tmp_path / "sideways.mp4"
    subprocess.run([FFMPEG, "-nostdin", "-y", "-loglevel", "error", "-i", str(media / "face.mp4"),
                    "-vf", "transpose=clock", "-c:v", "libx264", str(sideways)], check=True)
    phone = tmp_path / "phone.mp4"  # pixels stored sideways, display matrix turns them back
    subprocess.run([FFMPEG, "-nostdin", "-y", "-loglevel", "error", "-i", str(sideways), "-c",
                    "copy", "-metadata:s:v:0", "rotate=270", str(phone)], check=True)
    policy = UrlPolicyConfig(allow_files=True, file_roots=(tmp_path,))
    frames = frames_of(str(phone), policy)
    raw = frames_of(str(sideways), policy)  # the same pixels without the display matrix
    assert frames[0].rgb.shape == (480, 640, 3) and raw[0].rgb.shape == (640, 480, 3)
    for f, r in zip(frames, raw):
        np.testing.assert_array_equal(f.rgb, np.rot90(r.rgb, 1))  # turned back, losslessly
    detector = make_detector(FaceConfig())
    upright = [max(x.score for x in detector.detect(f.rgb)) for f in frames[:4]]
    assert min(upright) > 0.8


def test_a_lagging_live_worker_leaves_traced_gaps_not_missing_clips(media):
    port = free_port()
    proc = rtmp_server(media / "face.mp4", port, loop=True)
    try:
        stop = threading.Event()
        frames = []

        def slow():
            for f in iter_sampled_frames(check_url(f"rtmp://127.0.0.1:{port}/live/s",
                                                   UrlPolicyConfig(allow_private_addresses=True)),
                                         FAST, 8.0, live=True, stop_event=stop):
                frames.append(f)
                if not f.dropped:
                    time.sleep(0.6)  # a worker far slower than 8 sampled frames per second
                if len(frames) >= 60:
                    stop.set()

        slow()
        clips = list(clip_windows(iter(frames), 1.0, 8.0))
        assert [c.index for c in clips] == list(range(clips[0].index, clips[-1].index + 1))
        assert sum(c.dropped for c in clips) > 0
        assert sum(len(c.frames) + c.dropped for c in clips) == len(frames)
    finally:
        stop_process(proc)


def test_live_reconnect_budget_is_time_based(media):
    from media import stalling_http_server

    ts = (media / "face.ts").read_bytes()
    cfg = FAST.model_copy(update={"stall_timeout_s": 0.8, "open_timeout_s": 0.8,
                                  "reconnect_window_s": 4.0, "backoff_max_s": 0.2})
    reconnects = []
    with stalling_http_server(ts[: len(ts) // 3], prefix_once=True) as url:
        start = time.monotonic()
        with pytest.raises(StreamError) as info:
            for _ in iter_sampled_frames(check_url(url, UrlPolicyConfig(allow_private_addresses=True)),
                                         cfg, 2.0, live=True,
                                         on_reconnect=lambda *a: reconnects.append(a)):
                pass
    took = time.monotonic() - start
    assert info.value.reason == "reconnects_exhausted" and "no frame for" in str(info.value)
    assert len(reconnects) >= 2 and 4.0 <= took < 12  # many attempts, one time budget


# ----------------------------------------------------------------------------- Redis
def test_embedded_redis_is_restarted_with_its_data(tmp_path):
    import redis as redis_lib

    from workers import redis_server as rs

    cfg = RedisConfig(embedded_port=free_port(), embedded_dir=tmp_path / "data")
    url = rs.resolve_redis_url(cfg)
    client = redis_lib.Redis.from_url(url)
    try:
        client.lpush("pel:jobs", "https://example.com/kept.mp4")
        assert rs.ensure_embedded_redis(cfg) is False  # alive: nothing to do
        rs._singleton.process.kill()
        rs._singleton.process.wait()
        assert rs.ensure_embedded_redis(cfg) is True
        assert client.lrange("pel:jobs", 0, -1) == [b"https://example.com/kept.mp4"]  # AOF
        assert rs.ensure_embedded_redis(RedisConfig(url="redis://127.0.0.1:1/0")) is False
    finally:
        client.close()
        rs._singleton.close()
        rs._singleton = None


def test_no_proxy_cannot_bypass_the_guard(media, monkeypatch):
    import workers.egress_guard as eg

    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    monkeypatch.setattr(eg, "_GUARD", None)  # a fresh process's first use
    guard = eg.egress_guard()
    try:
        import os
        assert "no_proxy" not in os.environ and "NO_PROXY" not in os.environ
        with http_server(INTERNAL, media) as internal:
            with http_server(PUBLIC, media, {"/go": redirect_to(f"{base_url(internal)}/face.mp4")}) as public:
                with pytest.raises(StreamError) as info:
                    frames_of(f"{base_url(public)}/go")
        assert info.value.reason == "rejected" and internal.hits == []
    finally:
        guard.close()


def test_a_playlist_of_refused_protocols_is_not_called_corrupt(media, tmp_path):
    local = (media / "hls" / "seg000.ts").resolve()
    lines = [f"file://{local}" if ln.endswith(".ts") else ln
             for ln in (media / "hls" / "index.m3u8").read_text().splitlines()]
    (tmp_path / "index.m3u8").write_text("\n".join(lines) + "\n")
    with http_server(PUBLIC, tmp_path) as public:
        with pytest.raises(StreamError) as info:
            frames_of(f"{base_url(public)}/index.m3u8")
    assert info.value.reason == "unsupported" and "protocol" in str(info.value)
    assert not info.value.transient
