"""One job, from URL to verdicts: the path every frame takes.

    check_url -> iter_sampled_frames (PyAV, sampled by media time) -> clip_windows
      -> detect_clip (CenterFace + the training crop) -> detector requests of up to
         `crops_per_request` crops (the Serve deployment merges them across streams; retried
         while a replica restarts)
      -> make_verdict -> callback (the stream worker stores it and counts it)

Requests for a clip are sent as crops accumulate, so decoding and face detection of later
frames overlap with inference of earlier ones.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import numpy as np

from pel_model.config import AppConfig
from pel_model.faces import FaceDetector, extract_faces_counted

from .decode import Clip, clip_windows, iter_sampled_frames
from .jobs import Job, redact_url
from .urls import check_url
from .verdict import ScoredFace, make_verdict


class Pending(Protocol):
    def result(self, timeout_s: Optional[float] = None) -> Any: ...


@dataclass
class ModelInfo:
    input_size: int
    threshold: float
    model_id: str
    warnings: list[str] = field(default_factory=list)
    trained: bool = True  # False: the untrained network, whose scores decide nothing


@dataclass
class Hooks:
    """Callbacks for counting; all optional."""

    on_decoded: Optional[Callable[[int], None]] = None
    on_dropped: Optional[Callable[[int], None]] = None
    on_reconnect: Optional[Callable[..., None]] = None
    on_sampled: Optional[Callable[[int], None]] = None
    on_verdict: Optional[Callable[[dict, float], None]] = None  # (verdict, clip end wall time)


def detect_clip(clip: Clip, faces: FaceDetector, cfg: AppConfig, size: int,
                send: Optional[Callable[[np.ndarray], None]] = None
                ) -> tuple[list[np.ndarray], list[tuple[float, Any]], int]:
    """(crops, (time, face) of each crop, faces found beyond max_faces_per_frame). With
    `send`, every `crops_per_request` new crops are handed over as they accumulate, so the
    detector works on earlier frames while later ones are decoded and searched."""
    crops: list[np.ndarray] = []
    meta: list[tuple[float, Any]] = []
    skipped, sent = 0, 0
    for frame in clip.frames:
        found, extra = extract_faces_counted(frame.rgb, faces, cfg.faces, size)
        skipped += extra
        for face, crop in found:
            crops.append(crop)
            meta.append((frame.pts_s, face))
            if send and len(crops) - sent >= cfg.stream.crops_per_request:
                send(np.stack(crops[sent:]))
                sent = len(crops)
    if send and len(crops) > sent:
        send(np.stack(crops[sent:]))
    return crops, meta, skipped


def _collect(pending: list[Pending], timeout_s: float) -> list[float]:
    return [float(s) for p in pending for s in np.asarray(p.result(timeout_s=timeout_s)).reshape(-1)]


def scoring_error(exc: BaseException) -> str:
    """What a verdict says about a scoring failure: the kind of failure, never Ray internals
    (actor ids, pids, node addresses) or a traceback."""
    name = type(exc).__name__
    if "ActorDied" in name or "ActorError" in name or "ActorUnavailable" in name:
        return "the detector replica died or is restarting"
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return "the detector did not answer in time"
    if "BackPressure" in name:
        return "the detector is overloaded (back-pressure)"
    return f"the detector failed ({name})"


def score_clip(clip: Clip, faces: FaceDetector, cfg: AppConfig, info: ModelInfo,
               submit: Callable[[np.ndarray], Pending], stop: Optional[threading.Event] = None
               ) -> tuple[list[ScoredFace], int]:
    """(scored faces, faces skipped). A failed request is retried with backoff (a replica that
    died is being restarted by Serve) for up to `stream.scoring_retry_s`; after that the last
    error is raised."""
    pending: list[Pending] = []
    crops, meta, skipped = detect_clip(clip, faces, cfg, info.input_size,
                                       lambda batch: pending.append(submit(batch)))
    timeout = cfg.stream.scoring_timeout_s
    deadline = time.monotonic() + cfg.stream.scoring_retry_s
    delay = 0.5
    while True:
        try:
            scores = _collect(pending, timeout)
            break
        except Exception:
            if time.monotonic() + delay > deadline or (stop is not None and stop.is_set()):
                raise
        if stop is not None:
            stop.wait(delay)
        else:
            time.sleep(delay)
        delay = min(delay * 2, 10.0)
        n = cfg.stream.crops_per_request
        pending = [submit(np.stack(crops[i:i + n])) for i in range(0, len(crops), n)]
    return [ScoredFace(t, face, s) for (t, face), s in zip(meta, scores)], skipped


@dataclass
class JobTotals:
    """Progress of one job (also what the job record shows)."""

    clips_done: int = 0
    media_seconds: float = 0.0
    frames_sampled: int = 0
    faces_scored: int = 0
    clips_failed: int = 0  # clips whose faces could not be scored (their verdicts say error)

    def progress(self) -> dict:
        return {"clips_done": self.clips_done, "media_seconds": self.media_seconds,
                "frames_sampled": self.frames_sampled, "faces_scored": self.faces_scored}


def run_job(job: Job, cfg: AppConfig, faces: FaceDetector, info: ModelInfo,
            submit: Callable[[np.ndarray], Pending], hooks: Hooks = Hooks(),
            stop: Optional[threading.Event] = None,
            progress: Optional[Callable[..., None]] = None) -> JobTotals:
    """Process one job to its end (or until `stop`); returns its totals.

    Raises `UrlRejected`/`StreamError` for sources that cannot be read."""
    source = check_url(job.url, cfg.urls)
    opts = job.options
    fps = opts.sample_fps or cfg.stream.sample_fps
    clip_s = opts.clip_seconds or cfg.stream.clip_seconds
    frames = iter_sampled_frames(source, cfg.stream, fps, opts.live, stop_event=stop,
                                 on_decoded=hooks.on_decoded, on_dropped=hooks.on_dropped,
                                 on_reconnect=hooks.on_reconnect)
    url = redact_url(job.url)
    totals = JobTotals()
    for clip in clip_windows(frames, clip_s, fps):
        clip_ready = time.time()
        if hooks.on_sampled:
            hooks.on_sampled(len(clip.frames))
        error, scored, skipped = None, [], 0
        try:
            scored, skipped = score_clip(clip, faces, cfg, info, submit, stop)
        except Exception as exc:  # detector gone for longer than the retry budget
            error = scoring_error(exc)
        verdict = make_verdict(
            job_id=job.id, url=url, clip_index=clip.index, start_s=clip.start_s, end_s=clip.end_s,
            frames_sampled=len(clip.frames), scored=scored, threshold=info.threshold,
            model=info.model_id, warnings=info.warnings, top_k=cfg.stream.top_frames,
            latency_s=time.time() - clip_ready, error=error, trained=info.trained,
            frames_dropped=clip.dropped, faces_skipped=skipped)
        if hooks.on_verdict:
            hooks.on_verdict(verdict, clip_ready)
        totals.clips_done += 1
        totals.clips_failed += error is not None
        totals.media_seconds = clip.end_s
        totals.frames_sampled += len(clip.frames)
        totals.faces_scored += verdict["faces_scored"]
        if progress:
            progress(**totals.progress())
        if stop is not None and stop.is_set():
            break
    return totals
