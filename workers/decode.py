"""Decode a vetted stream into RGB frames sampled by media time, grouped into clip windows.

Each connection ("session") runs in its own daemon thread: it opens the container, demuxes and
decodes, converts only the sampled frames to RGB and hands them over through a small queue. The
generator that consumes the queue is the no-frame watchdog: it never waits longer than
`stall_timeout_s` for decoding progress, whatever FFmpeg is doing. FFmpeg itself is bounded by
PyAV's interrupt-callback timeout (per blocking read) and the `rw_timeout` protocol option, so an
abandoned session thread exits on its own soon after and closes its own container (a container
is never closed from another thread). Live sources reconnect with exponential backoff and full
jitter; media time continues monotonically across reconnects.
"""
from __future__ import annotations

import math
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional

import av
import av.error
import numpy as np

from pel_model.config import StreamConfig
from workers.egress_guard import (GuardSession, describe_connect_failure, describe_refusals,
                                  egress_guard)
from workers.redact import redact_text
from workers.urls import ResolvedSource, UrlRejected, check_url

av.logging.set_level(None)  # PyAV's log bridge can deadlock with threads; we map errors ourselves

# Why a stream ended in error. Transient ones are retried (another attempt may succeed);
# the rest are final at once: the media, the URL or the policy will not change.
REASONS = ("unreachable", "stalled", "truncated", "reconnects_exhausted",  # transient
           "http_error", "not_found", "corrupt", "no_video", "unsupported",  # permanent
           "rejected")
TRANSIENT_REASONS = frozenset(REASONS[:4])
# FFmpeg's HTTP errors by status class: 400/401/403/404 will not change on retry; "other 4xx"
# includes 408 and 429 (FFmpeg does not say which), so it is retried like a 5xx.
_PERMANENT_HTTP = tuple(getattr(av.error, n) for n in (
    "HTTPBadRequestError", "HTTPUnauthorizedError", "HTTPForbiddenError", "HTTPNotFoundError")
    if hasattr(av.error, n))
_OPEN_SLACK_S = 2.0  # the watchdog's grace beyond FFmpeg's own open timeout
_MAX_GAP_S = 60.0  # a timestamp jump larger than this is a discontinuity, not real time
_MAX_BAD_PACKETS = 100  # consecutive undecodable packets before the input counts as corrupt
_QUEUE_FRAMES = 4


@dataclass(frozen=True)
class SampledFrame:
    index: int  # 0, 1, 2... over the whole stream, reconnects included
    pts_s: float  # media time in seconds from the first frame; never decreases
    rgb: Optional[np.ndarray] = field(repr=False)  # HxWx3 uint8, upright; None: dropped

    @property
    def dropped(self) -> bool:
        """A sampled frame a lagging live consumer had no room for (it still counts)."""
        return self.rgb is None


@dataclass(frozen=True)
class Clip:
    index: int  # window number: covers [index * clip_seconds, (index + 1) * clip_seconds)
    start_s: float
    end_s: float
    frames: list[SampledFrame] = field(repr=False)  # the decoded ones
    dropped: int = 0  # sampled frames of this window dropped because the worker lagged
    gap: bool = False  # no frame of this window reached the worker (all dropped, or none)
    cut_by: Optional[str] = None  # the stream broke off in this window: the error, redacted


class StreamError(Exception):
    """A stream could not be (or no longer be) decoded; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str):
        if reason not in REASONS:
            raise ValueError(f"unknown StreamError reason {reason!r}")
        message = redact_text(message)  # FFmpeg echoes raw URLs, credentials included
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    @property
    def transient(self) -> bool:
        return self.reason in TRANSIENT_REASONS


def _text(exc: BaseException) -> str:
    """FFmpeg's message without its errno (an FFERRTAG, e.g. 875574520) and echoed URL."""
    return str(getattr(exc, "strerror", None) or exc)


def classify_error(exc: BaseException, source: Optional[ResolvedSource] = None) -> StreamError:
    """Map PyAV/FFmpeg and policy exceptions onto a `StreamError` with a clear reason."""
    where = source.redacted if source is not None else "the stream"
    if isinstance(exc, StreamError):
        return exc
    if isinstance(exc, UrlRejected):
        return StreamError("unreachable" if exc.reason == "dns" else "rejected", str(exc))
    if isinstance(exc, (av.error.ExitError, TimeoutError)):
        return StreamError("stalled", f"no data from {where} within the timeout")
    if isinstance(exc, av.error.InvalidDataError):
        return StreamError("corrupt", f"invalid or unrecognised data in {where}")
    if isinstance(exc, (av.error.ArgumentError, LookupError)):
        return StreamError("unsupported", f"{where} uses a format, codec or nested protocol that "
                                          f"is unsupported or not allowed by the URL policy")
    if isinstance(exc, _PERMANENT_HTTP):
        return StreamError("http_error", f"{where}: {_text(exc)}")
    if isinstance(exc, (av.error.HTTPError, av.error.HTTPClientError, av.error.HTTPServerError)):
        return StreamError("unreachable", f"{where}: {_text(exc)} (retried)")
    if isinstance(exc, FileNotFoundError) and source is not None and not source.is_network:
        return StreamError("not_found", f"{where} does not exist")
    if isinstance(exc, OSError):
        return StreamError("unreachable", f"cannot read {where}: {_text(exc)}")
    if isinstance(exc, av.error.FFmpegError):
        return StreamError("corrupt", f"decoding {where} failed: {_text(exc)}")
    return StreamError("corrupt", f"unexpected {type(exc).__name__} on {where}: {_text(exc)}")


def settle_error(error: StreamError, source: ResolvedSource, frames_seen: bool,
                 guard: Optional[GuardSession]) -> StreamError:
    """The reason a user should see, knowing more than the one exception did: a connection the
    egress guard refused makes the error a policy refusal; media that decoded fine and then
    went bad on a network source was cut off in transit (retried), not corrupt."""
    refused = describe_refusals(guard)
    if refused and error.reason != "rejected":
        return StreamError("rejected", f"{source.redacted}: {refused}")
    unconnected = describe_connect_failure(guard)
    if unconnected and error.reason == "unreachable" and not frames_seen:
        return StreamError("unreachable", f"{source.redacted}: {unconnected} (retried)")
    if error.reason == "corrupt" and frames_seen and source.is_network:
        return StreamError("truncated", f"{source.redacted} broke off after good frames "
                                        f"({error.message})")
    if error.reason == "corrupt" and not frames_seen and _is_playlist(source):
        return StreamError("unsupported", f"{source.redacted}: no segment of the playlist could "
                                          "be read (segments on a protocol the URL policy does "
                                          "not allow, e.g. file:, or missing or corrupt ones)")
    return error


def _is_playlist(source: ResolvedSource) -> bool:
    from urllib.parse import urlsplit

    return urlsplit(source.url).path.lower().endswith((".m3u8", ".m3u"))


def open_container(source: ResolvedSource, cfg: StreamConfig, live: Optional[bool] = None,
                   guard: Optional[GuardSession] = None):
    """Open `source` with our timeouts and whitelists; FFmpeg's own reconnect stays off. With
    a `guard`, every HTTP(S) connection (redirects, playlists, segments) goes through it."""
    options = {
        "protocol_whitelist": source.protocol_whitelist,
        "format_whitelist": source.format_whitelist,
    }
    if guard is not None:
        options["http_proxy"] = guard.proxy_url
        options["protocol_whitelist"] += ",httpproxy"  # CONNECT tunnels for https
        options["http_persistent"] = "0"  # HLS: one request per connection, each one vetted
    if source.is_network:
        options["rw_timeout"] = str(int(cfg.read_timeout_s * 1e6))
        if live is not False:  # live or unknown: start decoding after ~1 s of analysis
            options["analyzeduration"] = "1000000"
    read_s = min(cfg.read_timeout_s, cfg.stall_timeout_s)
    try:
        return av.open(source.url, mode="r", timeout=(cfg.open_timeout_s, read_s),
                       container_options=options)
    except Exception as exc:
        raise classify_error(exc, source) from exc


def looks_live(container) -> bool:
    """No known end: an HLS playlist without ENDLIST, or a stream of unknown size (no
    Content-Length) and duration. HLS VOD, MP4 and sized TS files over HTTP are not live."""
    if container.duration is not None:
        return False
    return "hls" in container.format.name.split(",") or (container.size or 0) <= 0


class _Session(threading.Thread):
    """One connection: open, decode, sample, convert, enqueue. Owns and closes its container."""

    def __init__(self, source: ResolvedSource, cfg: StreamConfig, fps: float,
                 live: Optional[bool], start_t: float, next_target: float,
                 guard: Optional[GuardSession] = None):
        super().__init__(name=f"decode-{source.scheme}", daemon=True)
        self.source, self.cfg, self.fps, self.live = source, cfg, fps, live
        self.guard = guard
        self.events: queue.Queue = queue.Queue(maxsize=_QUEUE_FRAMES)
        self.cancelled = threading.Event()
        self.decoded = 0
        self.dropped = 0
        self.last_progress = time.monotonic()
        self.start_t = start_t  # global media time given to this session's first frame
        self.next_target = next_target
        self.last_t: Optional[float] = None
        self.drops: list[float] = []  # media times of sampled frames dropped since the last put
        self.frame_dur = 1 / 25
        self._origin: Optional[float] = None  # raw time that maps to global time 0

    def cancel(self) -> None:
        self.cancelled.set()

    def run(self) -> None:
        container = None
        try:
            container = open_container(self.source, self.cfg, self.live, self.guard)
            if not container.streams.video:
                raise StreamError("no_video", f"{self.source.redacted} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            if rate and 1 <= float(rate) <= 240:
                self.frame_dur = 1 / float(rate)
            if self.live is None:
                self.live = self.source.live
            if self.live is None:
                self.live = looks_live(container)
            self._put(("opened", self.live))
            self.last_progress = time.monotonic()
            self._decode(container, stream)
            self._put(("drops", self.drops))
            self._put(("end", None))
        except BaseException as exc:  # everything goes to the consumer, classified
            self._put(("drops", self.drops))
            self._put(("error", classify_error(exc, self.source)))
        finally:
            if container is not None:
                container.close()

    def _decode(self, container, stream) -> None:
        bad = 0
        for packet in container.demux(stream):
            if self.cancelled.is_set():
                return
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                if isinstance(exc, (av.error.ExitError, av.error.EOFError)):
                    raise
                self.dropped += 1
                bad += 1
                if bad > _MAX_BAD_PACKETS:
                    raise StreamError("corrupt", f"{bad} consecutive undecodable packets in "
                                                 f"{self.source.redacted}") from exc
                continue
            bad = 0
            for frame in frames:
                self.decoded += 1
                self.last_progress = time.monotonic()
                t = self._media_time(frame.time)
                if t + 1e-6 >= self.next_target:
                    self.next_target = (math.floor(t * self.fps + 1e-6) + 1) / self.fps
                    if self.live and self.events.full():  # lagging: drop it, keep a trace
                        self.dropped += 1
                        self.drops.append(t)
                        continue
                    rgb = upright(frame)
                    drops, self.drops = self.drops, []
                    if not self._put(("frame", (t, rgb, drops)), drop_when_full=bool(self.live)):
                        self.dropped += 1
                        self.drops = drops + [t]

    def _media_time(self, raw: Optional[float]) -> float:
        """Global media time: starts at `start_t`, never decreases, survives odd timestamps."""
        expected = self.start_t if self.last_t is None else self.last_t + self.frame_dur
        if raw is None:
            t = expected
        else:
            if self._origin is None:
                self._origin = raw - self.start_t
            t = raw - self._origin
            if self.last_t is not None and (t < self.last_t - 1e-6 or t - self.last_t > _MAX_GAP_S):
                self._origin = raw - expected  # discontinuity: continue from where we were
                t = expected
        self.last_t = t
        return t

    def _put(self, item, drop_when_full: bool = False) -> bool:
        """Enqueue unless cancelled; a live source drops frames rather than fall behind."""
        while not self.cancelled.is_set():
            try:
                self.events.put(item, timeout=0 if drop_when_full else 0.1)
                return True
            except queue.Full:
                if drop_when_full:
                    return False
        return False


def upright(frame) -> np.ndarray:
    """RGB pixels of a decoded frame turned to display orientation: phone videos store them
    sideways with a display matrix (PyAV's `rotation`: degrees counterclockwise)."""
    rgb = frame.to_ndarray(format="rgb24")
    k = (-int(round((frame.rotation or 0) / 90.0))) % 4
    return np.ascontiguousarray(np.rot90(rgb, k)) if k else rgb


def _backoff_s(attempt: int, cfg: StreamConfig, rng: random.Random) -> float:
    """Exponential backoff with full jitter: uniform(0, min(max, initial * 2^(attempt-1)))."""
    return rng.uniform(0, min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (attempt - 1)))


def iter_sampled_frames(source: ResolvedSource, cfg: StreamConfig, *args, **kwargs
                        ) -> Iterator[SampledFrame]:
    """`_sampled_frames` (see there) with every HTTP(S) connection through the egress guard
    and the final error settled with what the guard saw (`settle_error`)."""
    guard = None
    if source.scheme in ("http", "https") and source.policy is not None:
        guard = egress_guard().session(source.policy)
    seen = [False]
    try:
        for frame in _sampled_frames(source, cfg, *args, guard=guard, **kwargs):
            seen[0] = True
            yield frame
    except StreamError as exc:
        raise settle_error(exc, source, seen[0], guard) from exc
    finally:
        if guard is not None:
            guard.close()


def _sampled_frames(
    source: ResolvedSource,
    cfg: StreamConfig,
    sample_fps: Optional[float] = None,
    live: Optional[bool] = None,
    stop_event: Optional[threading.Event] = None,
    on_decoded: Optional[Callable[[int], None]] = None,
    on_dropped: Optional[Callable[[int], None]] = None,
    on_reconnect: Optional[Callable[[int, Optional[StreamError], float], None]] = None,
    guard: Optional[GuardSession] = None,
) -> Iterator[SampledFrame]:
    """Yield frames sampled every 1/sample_fps s of media time (first frame at t=0).

    `live=None` decides from the source (rtmp/rtsp live, files not, HTTP by whether the
    container has a known duration). Files end at their last frame; live sources reconnect
    after a drop or stall, with backoff, until no frame has come for `cfg.reconnect_window_s`
    (an outage budget in time, not in attempts; `cfg.max_reconnects`, if set, also caps the
    consecutive failed attempts). Failing before the first frame raises the real reason.
    Callbacks run in the caller's thread: `on_decoded(n)` / `on_dropped(n)` with counts of
    decoded frames and of dropped packets/frames (undecodable, or a live consumer lagging),
    `on_reconnect(attempt, error, delay_s)` before each reconnect. `stop_event` ends the
    iteration quietly within ~50 ms.
    """
    fps = float(sample_fps or cfg.sample_fps)
    if fps <= 0:
        raise ValueError(f"sample_fps must be > 0, got {fps}")
    rng = random.Random()
    index, failures, total_decoded = 0, 0, 0
    start_t, next_target = 0.0, 0.0
    ever_frames = False
    last_frame_at = time.monotonic()
    while True:
        session = _Session(source, cfg, fps, live, start_t, next_target, guard)
        session.start()
        error: Optional[StreamError] = None
        opened, seen_decoded, seen_dropped = False, 0, 0
        waiting_since = time.monotonic()
        try:
            while True:
                if stop_event is not None and stop_event.is_set():
                    return
                try:
                    kind, payload = session.events.get(timeout=0.05)
                except queue.Empty:
                    kind, payload = None, None
                if on_decoded and session.decoded > seen_decoded:
                    on_decoded(session.decoded - seen_decoded)
                if on_dropped and session.dropped > seen_dropped:
                    on_dropped(session.dropped - seen_dropped)
                seen_decoded, seen_dropped = session.decoded, session.dropped
                now = time.monotonic()
                if kind is None:
                    limit = cfg.stall_timeout_s if opened else cfg.open_timeout_s + _OPEN_SLACK_S
                    idle = now - max(waiting_since, session.last_progress)
                    if idle > limit:
                        phase = "frame" if opened else "open"
                        error = StreamError("stalled", f"no {phase} from {source.redacted} "
                                                       f"for {idle:.1f} s")
                        break
                    continue
                if kind == "opened":
                    opened = True
                elif kind in ("frame", "drops"):
                    t, rgb, drops = payload if kind == "frame" else (None, None, payload)
                    for dt in drops:
                        yield SampledFrame(index, dt, None)
                        index += 1
                    if kind == "frame":
                        ever_frames, failures, last_frame_at = True, 0, time.monotonic()
                        yield SampledFrame(index, t, rgb)
                        index += 1
                elif kind == "error":
                    error = payload
                    break
                else:  # "end"
                    break
                waiting_since = time.monotonic()  # time spent in the consumer is not a stall
        finally:
            session.cancel()
            total_decoded += session.decoded
        if session.last_t is not None:
            start_t = max(start_t, session.last_t + session.frame_dur)
        next_target = max(next_target, session.next_target)
        if session.live is not None:  # learnt on open; a failed reconnect keeps the old answer
            live = session.live
        if not live or not ever_frames:
            if error is not None:
                raise error
            if total_decoded == 0:
                raise StreamError("corrupt", f"{source.redacted} ended without a decodable frame")
            return
        if error is not None and error.reason == "rejected":
            raise error
        failures += 1
        outage = time.monotonic() - last_frame_at
        if outage > cfg.reconnect_window_s or (cfg.max_reconnects is not None
                                                and failures > cfg.max_reconnects):
            raise StreamError("reconnects_exhausted",
                              f"{source.redacted}: no frame for {outage:.0f} s after {failures - 1} "
                              f"reconnect(s); last: {error or 'the stream ended'}")
        delay = _backoff_s(failures, cfg, rng)
        if on_reconnect:
            on_reconnect(failures, error, delay)
        if stop_event is not None:
            if stop_event.wait(delay):
                return
        else:
            time.sleep(delay)
        if source.policy is not None:  # DNS may have changed: vet the host again
            try:
                source = check_url(source.url, source.policy)
            except UrlRejected as exc:
                if exc.reason != "dns":
                    raise classify_error(exc, source) from exc


def clip_windows(frames: Iterable[SampledFrame], clip_seconds: float,
                 sample_fps: Optional[float] = None) -> Iterator[Clip]:
    """Group frames into windows [i*clip_seconds, (i+1)*clip_seconds) of media time.

    Every window index from the first to the last appears once: a window whose sampled frames
    were all dropped, or that no frame fell into, is a `gap` clip (its verdict says so), so a
    missing index never goes without a trace. The last window ends one sampling step after its
    last frame (on the 1/sample_fps grid when given, else the mean spacing), never past the
    window, so a short file is one clip with its real length. When the frames end in an error
    (`StreamError`), the window decoded so far is still emitted (`cut_by` says why) before the
    error is raised: every frame that reached the worker ends in a verdict.
    """
    if clip_seconds <= 0:
        raise ValueError(f"clip_seconds must be > 0, got {clip_seconds}")
    current: list[SampledFrame] = []
    dropped = 0
    window: Optional[int] = None
    first_pts, count = None, 0

    def emit(w: int) -> Clip:
        return Clip(w, w * clip_seconds, (w + 1) * clip_seconds, current, dropped, not current)

    cut: Optional[StreamError] = None
    frames = iter(frames)
    while True:
        try:
            frame = next(frames)
        except StopIteration:
            break
        except StreamError as exc:
            cut = exc
            break
        i = math.floor(frame.pts_s / clip_seconds + 1e-9)
        if window is not None and i != window:
            yield emit(window)
            for missing in range(window + 1, i):
                yield Clip(missing, missing * clip_seconds, (missing + 1) * clip_seconds, [], 0, True)
            current, dropped = [], 0
        window = i
        if frame.dropped:
            dropped += 1
            continue
        current.append(frame)
        first_pts = frame.pts_s if first_pts is None else first_pts
        count += 1
    if window is not None:
        yield _last_clip(window, clip_seconds, current, dropped, first_pts, count, sample_fps,
                         None if cut is None else str(cut))
    if cut is not None:
        raise cut


def _last_clip(window: int, clip_seconds: float, frames: list[SampledFrame], dropped: int,
               first_pts: Optional[float], count: int, sample_fps: Optional[float],
               cut_by: Optional[str]) -> Clip:
    """The stream's last window: it ends one sampling step after its last frame."""
    start, full_end = window * clip_seconds, (window + 1) * clip_seconds
    if not frames:
        return Clip(window, start, full_end, frames, dropped, True, cut_by)
    last = frames[-1].pts_s
    if sample_fps:
        end = (math.floor(last * sample_fps + 1e-6) + 1) / sample_fps
    else:
        end = last + ((last - first_pts) / (count - 1) if count > 1 else 0.0)
    return Clip(window, start, max(last, min(end, full_end)), frames, dropped, False, cut_by)
