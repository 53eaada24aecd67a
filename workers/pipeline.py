"""One job, from URL to verdicts: the path every frame takes.

    check_url -> iter_sampled_frames (PyAV, sampled by media time)
      -> detect_frames (CenterFace + the training crop as each frame arrives, faces linked
         into tracks by face_tracks.py; the frame's pixels are dropped, its crops go to the
         detector in requests of up to `crops_per_request`, merged across streams by the
         Serve deployment)
      -> clip_windows -> score_clip (collects the clip's scores; retried while a replica
         restarts) -> make_verdict (tracks decide the label) -> callbacks (the stream worker
         stores flagged tracks' faces as evidence, evidence.py, then stores the verdict and
         counts it)

Decoding, face detection and inference overlap: while the detector scores a request, the next
frames are decoded (in the decoder's thread) and searched for faces (in the job's thread).
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from pel_model.config import AppConfig
from pel_model.faces import FaceDetector

from .decode import Clip, StreamError, clip_windows, iter_sampled_frames
from .frame_faces import Pending, detect_frames
from .jobs import Job, redact_url
from .urls import check_url
from .verdict import ScoredFace, make_verdict


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
    # (verdict, its scored faces): may add evidence references before the verdict is stored
    on_scored: Optional[Callable[[dict, list[ScoredFace]], None]] = None
    on_verdict: Optional[Callable[[dict, float], None]] = None  # (verdict, clip end wall time)


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


def score_clip(clip: Clip, cfg: AppConfig, submit: Callable[[np.ndarray], Pending],
               stop: Optional[threading.Event] = None) -> tuple[list[ScoredFace], int]:
    """(scored faces, faces skipped) of a clip from `detect_frames`, whose requests are already
    on their way. A failed request is retried with backoff (a replica that died is being
    restarted by Serve) for up to `stream.scoring_retry_s`; after that the last error is raised."""
    if not clip.frames:
        return [], 0
    req = clip.frames[0].requests
    pending = req.pending
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
        pending = [submit(np.stack(req.crops[i:i + n])) for i in range(0, len(req.crops), n)]
    return [ScoredFace(t, face, s, track, crop) for (t, face, track), s, crop
            in zip(req.meta, scores, req.crops)], req.skipped


@dataclass
class JobTotals:
    """Progress of one job (also what the job record shows)."""

    clips_done: int = 0
    media_seconds: float = 0.0
    frames_sampled: int = 0
    faces_scored: int = 0
    clips_failed: int = 0  # clips whose faces could not be scored (their verdicts say error)
    ended: str = ""  # how a live stream ended, when it did not simply reach its end

    def progress(self) -> dict:
        return {"clips_done": self.clips_done, "media_seconds": self.media_seconds,
                "frames_sampled": self.frames_sampled, "faces_scored": self.faces_scored}


def run_job(job: Job, cfg: AppConfig, faces: FaceDetector, info: ModelInfo,
            submit: Callable[[np.ndarray], Pending], hooks: Hooks = Hooks(),
            stop: Optional[threading.Event] = None,
            progress: Optional[Callable[..., None]] = None) -> JobTotals:
    """Process one job to its end (or until `stop`); returns its totals.

    A live source that delivered frames and then stayed away for the whole reconnect window
    (`stream.reconnect_window_s`) has ended: the job returns normally, its last clip scored and
    `totals.ended` saying so. Raises `UrlRejected`/`StreamError` for sources that cannot be
    read; clips decoded before such an error still get their verdicts first."""
    source = check_url(job.url, cfg.urls)
    opts = job.options
    fps = opts.sample_fps or cfg.stream.sample_fps
    clip_s = opts.clip_seconds or cfg.stream.clip_seconds
    frames = iter_sampled_frames(source, cfg.stream, fps, opts.live, stop_event=stop,
                                 on_decoded=hooks.on_decoded, on_dropped=hooks.on_dropped,
                                 on_reconnect=hooks.on_reconnect)
    faces_found = detect_frames(frames, faces, cfg, info.input_size, clip_s, submit)
    url = redact_url(job.url)
    totals = JobTotals()
    try:
        _score_clips(job, url, clip_windows(faces_found, clip_s, fps), cfg, info, submit, hooks,
                  stop, progress, totals)
    except StreamError as exc:
        if exc.reason != "reconnects_exhausted":  # raised only after frames were seen
            raise
        totals.ended = f"the live stream ended: {exc.message}"
    return totals


def _score_clips(job: Job, url: str, clips, cfg: AppConfig, info: ModelInfo,
              submit: Callable[[np.ndarray], Pending], hooks: Hooks,
              stop: Optional[threading.Event], progress: Optional[Callable[..., None]],
              totals: JobTotals) -> None:
    for clip in clips:
        clip_ready = time.time()
        if hooks.on_sampled:
            hooks.on_sampled(len(clip.frames))
        error, scored, skipped = None, [], 0
        try:
            scored, skipped = score_clip(clip, cfg, submit, stop)
        except Exception as exc:  # detector gone for longer than the retry budget
            error = scoring_error(exc)
        verdict = make_verdict(
            job_id=job.id, url=url, clip_index=clip.index, start_s=clip.start_s, end_s=clip.end_s,
            frames_sampled=len(clip.frames), scored=scored, threshold=info.threshold,
            model=info.model_id, warnings=info.warnings, top_k=cfg.stream.top_frames,
            latency_s=time.time() - clip_ready, error=error, trained=info.trained,
            frames_dropped=clip.dropped, faces_skipped=skipped, cut_by=clip.cut_by,
            min_track_faces=cfg.tracks.min_faces)
        if hooks.on_scored and scored:
            hooks.on_scored(verdict, scored)
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
