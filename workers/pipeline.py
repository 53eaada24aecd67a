"""One job, from URL to verdicts: the path every frame takes.

    check_url -> iter_sampled_frames (PyAV, sampled by media time) -> clip_windows
      -> extract_faces (CenterFace + the training crop) -> detector requests of up to
         `crops_per_request` crops (the Serve deployment merges them across streams)
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
from pel_model.faces import FaceDetector, extract_faces

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


@dataclass
class Hooks:
    """Callbacks for counting; all optional."""

    on_decoded: Optional[Callable[[int], None]] = None
    on_dropped: Optional[Callable[[int], None]] = None
    on_reconnect: Optional[Callable[..., None]] = None
    on_sampled: Optional[Callable[[int], None]] = None
    on_verdict: Optional[Callable[[dict, float], None]] = None  # (verdict, clip end wall time)


def score_clip(clip: Clip, faces: FaceDetector, cfg: AppConfig, info: ModelInfo,
               submit: Callable[[np.ndarray], Pending], timeout_s: float = 120.0) -> list[ScoredFace]:
    crops: list[np.ndarray] = []
    meta: list[tuple[float, Any]] = []
    pending: list[Pending] = []
    sent = 0  # crops[:sent] are already on their way to the detector
    for frame in clip.frames:
        for face, crop in extract_faces(frame.rgb, faces, cfg.faces, info.input_size):
            crops.append(crop)
            meta.append((frame.pts_s, face))
            if len(crops) - sent >= cfg.stream.crops_per_request:
                pending.append(submit(np.stack(crops[sent:])))
                sent = len(crops)
    if len(crops) > sent:
        pending.append(submit(np.stack(crops[sent:])))
    scores = [s for p in pending for s in np.asarray(p.result(timeout_s=timeout_s)).reshape(-1)]
    return [ScoredFace(t, face, float(s)) for (t, face), s in zip(meta, scores)]


def run_job(job: Job, cfg: AppConfig, faces: FaceDetector, info: ModelInfo,
            submit: Callable[[np.ndarray], Pending], hooks: Hooks = Hooks(),
            stop: Optional[threading.Event] = None,
            progress: Optional[Callable[..., None]] = None) -> int:
    """Process one job to its end (or until `stop`); returns the number of clips written.

    Raises `UrlRejected`/`StreamError` for sources that cannot be read."""
    source = check_url(job.url, cfg.urls)
    opts = job.options
    fps = opts.sample_fps or cfg.stream.sample_fps
    clip_s = opts.clip_seconds or cfg.stream.clip_seconds
    frames = iter_sampled_frames(source, cfg.stream, fps, opts.live, stop_event=stop,
                                 on_decoded=hooks.on_decoded, on_dropped=hooks.on_dropped,
                                 on_reconnect=hooks.on_reconnect)
    url = redact_url(job.url)
    totals = {"clips_done": 0, "media_seconds": 0.0, "frames_sampled": 0, "faces_scored": 0}
    for clip in clip_windows(frames, clip_s, fps):
        clip_ready = time.time()
        if hooks.on_sampled:
            hooks.on_sampled(len(clip.frames))
        error = None
        try:
            scored = score_clip(clip, faces, cfg, info, submit)
        except Exception as exc:  # detector unavailable or failing: this clip is an error verdict
            scored, error = [], f"{type(exc).__name__}: {exc}"[:500]
        verdict = make_verdict(
            job_id=job.id, url=url, clip_index=clip.index, start_s=clip.start_s, end_s=clip.end_s,
            frames_sampled=len(clip.frames), scored=scored, threshold=info.threshold,
            model=info.model_id, warnings=info.warnings, top_k=cfg.stream.top_frames,
            latency_s=time.time() - clip_ready, error=error)
        if hooks.on_verdict:
            hooks.on_verdict(verdict, clip_ready)
        totals["clips_done"] += 1
        totals["media_seconds"] = clip.end_s
        totals["frames_sampled"] += len(clip.frames)
        totals["faces_scored"] += verdict["faces_scored"]
        if progress:
            progress(**totals)
        if stop is not None and stop.is_set():
            break
    return totals["clips_done"]
