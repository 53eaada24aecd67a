"""Faces found as frames arrive: a clip keeps its crops, never its frames.

Each sampled frame goes through CenterFace and the training crop as soon as the decoder hands it
over, and its pixels are dropped at once: a 10 s clip at 2 frames/s holds at most
`20 x max_faces_per_frame` crops (150 KB each at 224 px) instead of 20 full frames (6 MB each at
1080p), and detection overlaps decoding. With `tracks.detect_every` = k > 1, CenterFace runs on
every k-th sampled frame; the frames in between are cropped where the last detected faces have
moved along their tracks (a new face waits for the next detected frame). Crops go to the detector in requests of
`crops_per_request` as they fill; a clip's last request leaves when its window closes, so the
time from a clip's end to its verdict is about one request, not the whole clip.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol

import numpy as np

from pel_model.config import AppConfig
from pel_model.faces import Face, FaceDetector, crop_face, extract_faces_counted

from .face_tracks import FaceTracker


class Pending(Protocol):
    def result(self, timeout_s: Optional[float] = None) -> Any: ...


class _Failed:
    """A request that could not even be sent: its error surfaces when the clip collects."""

    def __init__(self, exc: BaseException):
        self.exc = exc

    def result(self, timeout_s: Optional[float] = None) -> Any:
        raise self.exc


class ClipRequests:
    """Crops of one clip window, in frame order, and the detector requests carrying them."""

    def __init__(self, submit: Optional[Callable[[np.ndarray], Pending]], per_request: int):
        self.submit, self.per_request = submit, per_request
        self.crops: list[np.ndarray] = []
        self.meta: list[tuple[float, Any, int]] = []  # (media time, face, track id) per crop
        self.pending: list[Pending] = []
        self.skipped = 0  # faces found beyond max_faces_per_frame
        self._sent = 0

    def add(self, pts_s: float, found: list, skipped: int, tracks: list[int]) -> None:
        self.skipped += skipped
        for (face, crop), track in zip(found, tracks, strict=True):
            self.crops.append(crop)
            self.meta.append((pts_s, face, track))
        while len(self.crops) - self._sent >= self.per_request:
            self._send(self._sent + self.per_request)

    def flush(self) -> None:
        """Send the crops not yet sent (the window closed)."""
        if len(self.crops) > self._sent:
            self._send(len(self.crops))

    def _send(self, end: int) -> None:
        start, self._sent = self._sent, end
        if self.submit is None:  # crops only (training, tests): nothing to send
            return
        batch = np.stack(self.crops[start:end])
        try:
            self.pending.append(self.submit(batch))
        except Exception as exc:  # e.g. no replica yet: the clip's retries deal with it
            self.pending.append(_Failed(exc))


@dataclass(frozen=True)
class FrameFaces:
    """A sampled frame after face detection: when it was, and the requests of its window."""

    index: int
    pts_s: float
    requests: ClipRequests = field(repr=False)
    dropped: bool = False  # a sampled frame a lagging live consumer had no room for


def _inside(face: Face, shape: tuple[int, ...], min_px: float = 8.0) -> Optional[Face]:
    """A followed face box clipped to the frame; None when (almost) nothing of it is left."""
    h, w = shape[:2]
    x0, y0, x1, y1 = max(face.x0, 0.0), max(face.y0, 0.0), min(face.x1, w), min(face.y1, h)
    if x1 - x0 < min_px or y1 - y0 < min_px:
        return None
    return Face(x0, y0, x1, y1, face.score, face.landmarks)


def _follow(tracker: FaceTracker, pts_s: float, shape: tuple[int, ...]) -> list[tuple[int, Face]]:
    """The tracks' faces moved on to `pts_s`, clipped to the frame; faces gone from it dropped."""
    moved = ((tid, _inside(f, shape)) for tid, f in tracker.follow(pts_s))
    return [(tid, f) for tid, f in moved if f is not None]


def detect_frames(frames: Iterable, faces: FaceDetector, cfg: AppConfig, size: int,
                  clip_seconds: float, submit: Optional[Callable[[np.ndarray], Pending]] = None
                  ) -> Iterator[FrameFaces]:
    """Detect and crop each sampled frame as it arrives (see the module doc). Frames of one
    window `[i * clip_seconds, (i + 1) * clip_seconds)` share one `ClipRequests`; it is flushed
    when the first frame of a later window arrives or the stream ends (or breaks off), before
    `clip_windows` emits the clip. Faces are linked into tracks across the whole stream."""
    window, requests = None, None
    tracker = FaceTracker(cfg.tracks)
    seen = 0  # sampled frames searched so far (detect_every counts these)
    try:
        for frame in frames:
            i = math.floor(frame.pts_s / clip_seconds + 1e-9)
            if i != window:
                if requests is not None:
                    requests.flush()
                window, requests = i, ClipRequests(submit, cfg.stream.crops_per_request)
            if frame.dropped:
                yield FrameFaces(frame.index, frame.pts_s, requests, dropped=True)
                continue
            followed = (_follow(tracker, frame.pts_s, frame.rgb.shape)
                        if seen % cfg.tracks.detect_every else [])
            seen += 1
            if followed:  # no detection on this frame: the last detected faces, moved on
                found = [(f, crop_face(frame.rgb, f, size, cfg.faces.margin)) for _, f in followed]
                requests.add(frame.pts_s, found, 0, [tid for tid, _ in followed])
            else:
                found, extra = extract_faces_counted(frame.rgb, faces, cfg.faces, size)
                requests.add(frame.pts_s, found, extra, tracker.assign(frame.pts_s,
                                                                       [f for f, _ in found]))
            yield FrameFaces(frame.index, frame.pts_s, requests)
    except Exception:  # the stream broke off: its last window is still scored
        if requests is not None:
            requests.flush()
        raise
    if requests is not None:
        requests.flush()
