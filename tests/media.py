"""Real test media and real local servers: encoded H.264 video, HLS, HTTP, RTMP.

Everything here produces genuinely encoded streams (PyAV + libx264, Debian's ffmpeg for HLS and
RTMP) and serves them on 127.0.0.1 only. Shared by the decode tests and the end-to-end tests.
"""
from __future__ import annotations

import contextlib
import functools
import http.server
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from workers.sample_media import astronaut, make_face_video  # noqa: F401 (re-exported)

FFMPEG = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"


def make_hls(src_mp4: str | Path, out_dir: str | Path, segment_s: float = 1.0) -> Path:
    """Segment an MP4 into a VOD HLS playlist (with ENDLIST) with ffmpeg; returns the playlist."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    playlist = out_dir / "index.m3u8"
    subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(src_mp4), "-c", "copy",
         "-f", "hls", "-hls_time", str(segment_s), "-hls_playlist_type", "vod",
         "-hls_segment_filename", str(out_dir / "seg%03d.ts"), str(playlist)],
        check=True, timeout=60,
    )
    return playlist


def make_ts(src_mp4: str | Path, out_path: str | Path) -> Path:
    """Remux an MP4 into MPEG-TS (a format that can be streamed without an index)."""
    subprocess.run(
        [FFMPEG, "-nostdin", "-loglevel", "error", "-y", "-i", str(src_mp4), "-c", "copy",
         "-f", "mpegts", str(out_path)],
        check=True, timeout=60,
    )
    return Path(out_path)


def corrupt_copy(path: str | Path, out_path: Optional[str | Path] = None) -> Path:
    """Write a copy that keeps a few header bytes, then garbage, then truncates."""
    src = Path(path).read_bytes()
    out = Path(out_path) if out_path else Path(path).with_name(Path(path).stem + "-corrupt.mp4")
    rng = np.random.default_rng(0)
    garbage = rng.integers(0, 256, size=len(src) // 3, dtype=np.uint8).tobytes()
    out.write_bytes(src[:16] + garbage)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass


@contextlib.contextmanager
def serve_directory(directory: str | Path) -> Iterator[str]:
    """Serve `directory` over HTTP on a free 127.0.0.1 port; yields the base URL."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def stalling_http_server(prefix: bytes = b"", content_type: str = "video/mp2t",
                         prefix_once: bool = False) -> Iterator[str]:
    """An HTTP server that sends a 200 header and `prefix`, then never sends another byte.

    With `content_type=""` it accepts and sends nothing at all; with `prefix_once` only the
    first connection gets `prefix`. Yields the URL; connections stay open until the exit.
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    done = threading.Event()
    held: list[socket.socket] = []

    def run() -> None:
        while not done.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            held.append(conn)
            if content_type:
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(65536)  # the request
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type.encode()
                        + b"\r\nConnection: close\r\n\r\n"
                        + (prefix if len(held) == 1 or not prefix_once else b"")
                    )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/live.ts"
    finally:
        done.set()
        thread.join(timeout=2)
        for conn in held:
            conn.close()
        listener.close()


def _listening(port: int) -> bool:
    """True once something listens on 127.0.0.1:port (read from /proc, without connecting:
    ffmpeg's RTMP listen server serves exactly one client, so a probe would use it up), or has
    already accepted its client (a reconnecting worker can be quicker than this poll)."""
    suffix = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(suffix) and fields[3] in ("0A", "01"):  # LISTEN, ESTABLISHED
                    return True
    return False


def rtmp_server(src_mp4: str | Path, port: int, loop: bool = True, wait_s: float = 10.0) -> subprocess.Popen:
    """Start ffmpeg as a one-client RTMP listen server at rtmp://127.0.0.1:port/live/s.

    It publishes `src_mp4` in real time (`-re`), looping forever when `loop`. Returns once the
    port listens. Stop it with `stop_process`.
    """
    cmd = [FFMPEG, "-nostdin", "-loglevel", "error", "-re"]
    if loop:
        cmd += ["-stream_loop", "-1"]
    cmd += ["-i", str(src_mp4), "-c", "copy", "-f", "flv", "-listen", "1",
            f"rtmp://127.0.0.1:{port}/live/s"]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + wait_s
    while not _listening(port):
        if proc.poll() is not None:
            raise RuntimeError(f"ffmpeg RTMP server exited: {proc.stderr.read().decode(errors='replace')}")
        if time.monotonic() > deadline:
            stop_process(proc)
            raise TimeoutError(f"ffmpeg RTMP server did not listen on port {port} in {wait_s} s")
        time.sleep(0.02)
    return proc


def stop_process(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """Kill a server process started here and reap it."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    if proc.stderr:
        proc.stderr.close()


def make_moving_face_video(path: str | Path, seconds: float = 6.0, fps: int = 25,
                           speed_px_s: tuple[float, float] = (40.0, 10.0),
                           size: tuple[int, int] = (640, 480)) -> Path:
    """A face photo gliding across the frame at a constant speed (H.264): smooth motion, as a
    person walking or a camera panning, for tracking between detected frames."""
    from skimage.transform import resize

    from workers.sample_media import encode_video

    width, height = size
    tile = (resize(astronaut()[0:260, 120:360], (208, 192), anti_aliasing=True,
                   preserve_range=True)).astype(np.uint8)
    th, tw = tile.shape[:2]

    def frames():
        for i in range(round(seconds * fps)):
            canvas = np.full((height, width, 3), 60, np.uint8)
            x = int(round(40 + speed_px_s[0] * i / fps))
            y = int(round(80 + speed_px_s[1] * i / fps))
            canvas[y:y + th, x:x + tw] = tile
            yield canvas

    return encode_video(path, frames(), fps, size, crf=20)
