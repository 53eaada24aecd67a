"""Decoding real H.264 video from files, HTTP, HLS and a live RTMP server, with failure modes."""
from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from media import (FFMPEG, corrupt_copy, free_port, make_face_video, make_hls, make_ts,
                   rtmp_server, serve_directory, stalling_http_server, stop_process)
from pel_model.config import StreamConfig, UrlPolicyConfig
from workers.decode import (StreamError, clip_windows, iter_sampled_frames, looks_live,
                            open_container)
from workers.urls import check_url

FAST = StreamConfig(open_timeout_s=3, read_timeout_s=2, stall_timeout_s=2, max_reconnects=3,
                    backoff_initial_s=0.05, backoff_max_s=0.3)
LOOPBACK = UrlPolicyConfig(allow_private_addresses=True)
pytestmark = pytest.mark.timeout(60)  # a hung stream must fail the test, not the whole run


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    make_face_video(root / "four.mp4", seconds=4)
    make_face_video(root / "ten.mp4", seconds=10)
    make_hls(root / "ten.mp4", root / "hls")
    make_ts(root / "ten.mp4", root / "ten.ts")
    corrupt_copy(root / "four.mp4", root / "corrupt.mp4")
    subprocess.run([FFMPEG, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=1", "-c:a", "aac", str(root / "audio.m4a")],
                   check=True, timeout=30)
    return root


@pytest.fixture(scope="module")
def server(media_dir):
    with serve_directory(media_dir) as base:
        yield base


def files_policy(root: Path) -> UrlPolicyConfig:
    return UrlPolicyConfig(allow_files=True, file_roots=(root,))


def decode(url: str, policy: UrlPolicyConfig, cfg: StreamConfig = FAST, **kw):
    counts = {"decoded": 0, "dropped": 0}
    kw.setdefault("on_decoded", lambda n: counts.__setitem__("decoded", counts["decoded"] + n))
    kw.setdefault("on_dropped", lambda n: counts.__setitem__("dropped", counts["dropped"] + n))
    frames = list(iter_sampled_frames(check_url(url, policy), cfg, kw.pop("fps", 2.0), **kw))
    return frames, counts


def assert_sampled(frames, n: int, fps: float = 2.0, src_fps: float = 25.0) -> None:
    assert [f.index for f in frames] == list(range(n))
    for k, f in enumerate(frames):  # first frame at or after each k/fps of media time
        assert k / fps - 1e-6 <= f.pts_s < k / fps + 1 / src_fps + 1e-6, (k, f.pts_s)
        assert f.rgb.shape == (480, 640, 3) and f.rgb.dtype == np.uint8
    assert frames[0].rgb.std() > 20  # a real picture, not a blank canvas


def test_file_sampled_at_2fps(media_dir):
    frames, counts = decode(str(media_dir / "four.mp4"), files_policy(media_dir))
    assert_sampled(frames, 8)
    assert counts == {"decoded": 100, "dropped": 0}  # 4 s at 25 fps, RGB only for 8 of them
    # the moving face photo: consecutive samples differ, but only slightly
    diff = np.abs(frames[1].rgb.astype(int) - frames[0].rgb.astype(int)).mean()
    assert 0 < diff < 40


def test_mp4_over_http(media_dir, server):
    frames, counts = decode(f"{server}/four.mp4", LOOPBACK)
    assert_sampled(frames, 8)
    assert counts["decoded"] == 100


def test_hls_over_http(server):
    frames, counts = decode(f"{server}/hls/index.m3u8", LOOPBACK)
    assert_sampled(frames, 20)
    assert counts["decoded"] == 250


def test_mpegts_timestamps_are_rebased_to_zero(server):
    # MPEG-TS starts at 1.4 s of PTS; media time still starts at 0 and the sized file ends
    frames, _ = decode(f"{server}/ten.ts", LOOPBACK)
    assert_sampled(frames, 20)


def test_live_detection(media_dir, server):
    live_dir = media_dir / "live"
    live_dir.mkdir(exist_ok=True)
    playlist = (media_dir / "hls" / "index.m3u8").read_text()
    (live_dir / "index.m3u8").write_text(
        playlist.replace("#EXT-X-ENDLIST\n", "").replace("#EXT-X-PLAYLIST-TYPE:VOD\n", "")
        .replace("seg0", "../hls/seg0"))
    expectations = {"hls/index.m3u8": False, "four.mp4": False, "ten.ts": False,
                    "live/index.m3u8": True}
    for path, live in expectations.items():
        container = open_container(check_url(f"{server}/{path}", LOOPBACK), FAST)
        try:
            assert looks_live(container) is live, path
        finally:
            container.close()


def test_clip_windows_group_by_media_time(media_dir):
    frames, _ = decode(str(media_dir / "ten.mp4"), files_policy(media_dir))
    clips = list(clip_windows(frames, 4.0, sample_fps=2.0))
    assert [(c.index, c.start_s, c.end_s, len(c.frames)) for c in clips] == [
        (0, 0.0, 4.0, 8), (1, 4.0, 8.0, 8), (2, 8.0, 10.0, 4)]
    assert all(c.start_s <= f.pts_s < c.end_s for c in clips for f in c.frames)
    short = list(clip_windows(frames[:8], 10.0))  # a 4 s file is one clip with its real end
    assert len(short) == 1 and short[0].start_s == 0.0 and 3.9 < short[0].end_s <= 4.1


def test_corrupt_file(media_dir):
    with pytest.raises(StreamError) as info:
        decode(str(media_dir / "corrupt.mp4"), files_policy(media_dir))
    assert info.value.reason == "corrupt"


def test_no_video_stream(media_dir):
    with pytest.raises(StreamError) as info:
        decode(str(media_dir / "audio.m4a"), files_policy(media_dir))
    assert info.value.reason == "no_video"


def test_unreachable_fails_fast(media_dir, server):
    for url, policy, reason in [(f"{server}/missing.mp4", LOOPBACK, "http_error"),  # 404: final
                                (f"http://127.0.0.1:{free_port()}/a.mp4", LOOPBACK, "unreachable"),
                                (f"rtmp://127.0.0.1:{free_port()}/live/s", LOOPBACK, "unreachable"),
                                (str(media_dir / "missing.mp4"), files_policy(media_dir),
                                 "not_found")]:  # a missing file stays missing: final
        start = time.monotonic()
        with pytest.raises(StreamError) as info:
            decode(url, policy)
        assert info.value.reason == reason, url
        assert info.value.transient == (reason == "unreachable"), url
        if reason == "unreachable" and url.startswith("http:"):  # via the guard: no server replied
            assert "cannot connect to 127.0.0.1" in str(info.value), str(info.value)
            assert "5XX" not in str(info.value) and "Server Error" not in str(info.value)
        assert "Errno" not in str(info.value), url  # FFmpeg's error tags are not errnos
        assert time.monotonic() - start < 1.5, url


def test_hls_cannot_reach_local_files_or_concat(media_dir, server):
    """A remote playlist naming a file: segment must not make FFmpeg read local files."""
    evil = media_dir / "evil"
    evil.mkdir(exist_ok=True)
    playlist = (media_dir / "hls" / "index.m3u8").read_text()
    local = (media_dir / "hls" / "seg000.ts").resolve()
    (evil / "index.m3u8").write_text(
        playlist.replace("seg000.ts", f"file://{local}").replace("seg0", "../hls/seg0"))
    frames, counts = decode(f"{server}/evil/index.m3u8", LOOPBACK)
    assert counts["decoded"] == 225  # the 25 frames of the file: segment were never read
    (evil / "list.txt").write_text(f"ffconcat version 1.0\nfile {local}\n")
    with pytest.raises(StreamError) as info:
        decode(f"{server}/evil/list.txt", LOOPBACK)
    assert info.value.reason == "unsupported"


def test_stall_mid_stream_is_detected(media_dir):
    ts = (media_dir / "ten.ts").read_bytes()
    cfg = FAST.model_copy(update={"stall_timeout_s": 1.0, "read_timeout_s": 30.0})
    received = []
    with stalling_http_server(ts[: len(ts) // 3]) as url:
        start = time.monotonic()
        with pytest.raises(StreamError) as info:
            for frame in iter_sampled_frames(check_url(url, LOOPBACK), cfg, 2.0, live=False):
                received.append(frame)
                last_frame_at = time.monotonic()
    assert info.value.reason == "stalled"
    assert len(received) >= 3  # frames flowed before the stall
    assert time.monotonic() - last_frame_at < 1.0 + 1.5
    assert time.monotonic() - start < 8


def test_live_stall_reconnects_then_gives_up(media_dir):
    ts = (media_dir / "ten.ts").read_bytes()
    cfg = FAST.model_copy(update={"stall_timeout_s": 1.0, "open_timeout_s": 1.0,
                                  "max_reconnects": 1})
    reconnects, pts = [], []
    # the first connection gets 3 s of video and then silence, the reconnect only silence
    with stalling_http_server(ts[: len(ts) // 3], prefix_once=True) as url:
        with pytest.raises(StreamError) as info:
            for frame in iter_sampled_frames(check_url(url, LOOPBACK), cfg, 2.0,
                                             on_reconnect=lambda *a: reconnects.append(a)):
                pts.append(frame.pts_s)
    assert info.value.reason == "reconnects_exhausted" and "stalled" in str(info.value)
    assert [r[0] for r in reconnects] == [1]
    assert reconnects[0][1].reason == "stalled"
    assert pts == sorted(pts) and len(set(pts)) == len(pts)  # media time continued


def test_server_that_never_answers_times_out(media_dir):
    cfg = FAST.model_copy(update={"open_timeout_s": 1.0})
    with stalling_http_server(content_type="") as url:
        start = time.monotonic()
        with pytest.raises(StreamError) as info:
            decode(url, LOOPBACK, cfg)
    assert info.value.reason == "stalled"
    assert time.monotonic() - start < 1.0 + 1.5


def test_stop_event_ends_quietly(media_dir):
    stop = threading.Event()
    with stalling_http_server(content_type="") as url:
        threading.Timer(0.3, stop.set).start()
        start = time.monotonic()
        frames, _ = decode(url, LOOPBACK, stop_event=stop)
    assert frames == [] and time.monotonic() - start < 1.0


def test_live_rtmp_reconnects_after_drop(media_dir):
    port = free_port()
    url = f"rtmp://127.0.0.1:{port}/live/s"
    proc = rtmp_server(media_dir / "ten.mp4", port)
    stop, reconnects, frames = threading.Event(), [], []
    try:
        for frame in iter_sampled_frames(check_url(url, LOOPBACK), FAST, 2.0, stop_event=stop,
                                         on_reconnect=lambda *a: reconnects.append(a)):
            frames.append(frame)
            if len(frames) == 3:  # the publisher drops, then comes back
                stop_process(proc)
                proc = rtmp_server(media_dir / "ten.mp4", port)
            if len(frames) == 3 + 4:
                stop.set()
    finally:
        stop_process(proc)
    assert len(frames) == 7 and [f.index for f in frames] == list(range(7))
    assert reconnects and reconnects[0][0] == 1  # the drop was noticed and reconnected
    pts = [f.pts_s for f in frames]
    assert all(b > a for a, b in zip(pts, pts[1:])), pts  # monotonic across the reconnect
    assert frames[-1].rgb.shape == (480, 640, 3)


def test_live_rtmp_reconnects_exhausted(media_dir):
    port = free_port()
    proc = rtmp_server(media_dir / "four.mp4", port)
    reconnects, frames = [], []
    cfg = FAST.model_copy(update={"max_reconnects": 2})
    try:
        with pytest.raises(StreamError) as info:
            for frame in iter_sampled_frames(check_url(f"rtmp://127.0.0.1:{port}/live/s", LOOPBACK),
                                             cfg, 2.0, on_reconnect=lambda *a: reconnects.append(a)):
                frames.append(frame)
                if len(frames) == 2:
                    stop_process(proc)  # gone for good
    finally:
        stop_process(proc)
    assert info.value.reason == "reconnects_exhausted"
    assert [r[0] for r in reconnects] == [1, 2]
    assert all(0 <= r[2] <= cfg.backoff_max_s for r in reconnects)
    assert len(frames) >= 2
