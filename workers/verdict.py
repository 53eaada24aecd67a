"""From the scored faces of one clip to its verdict.

Clip score: for every sampled frame with faces, the most suspicious face's calibrated fake
probability; the clip's `fake_probability` is the mean of those per-frame maxima (one fake face
among real ones still raises its frames, a single outlier frame does not decide a clip alone).
Label: `fake` if that mean >= threshold, else `real`; `no_face` when no face was scored;
`error` when scoring failed (the reason is in `warnings`); `gap` when no frame of the window
reached the worker (`frames_dropped` says how many were dropped because the worker lagged
behind a live source); `untrained` instead of `fake`/`real` when the model was never trained
(`checkpoint: null`): its scores are shown but decide nothing. `faces_skipped` counts faces
beyond `faces.max_faces_per_frame` that were found but not scored. The last clip of a stream
that broke off (or of a live stream that ended) covers the frames decoded until then and says so
in `warnings`.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from pel_model.faces import Face


@dataclass(frozen=True)
class ScoredFace:
    time_s: float
    face: Face
    score: float


def make_verdict(*, job_id: str, url: str, clip_index: int, start_s: float, end_s: float,
                 frames_sampled: int, scored: list[ScoredFace], threshold: float, model: str,
                 warnings: list[str], top_k: int, latency_s: float,
                 error: Optional[str] = None, trained: bool = True, frames_dropped: int = 0,
                 faces_skipped: int = 0, cut_by: Optional[str] = None) -> dict:
    per_frame: dict[float, float] = defaultdict(float)
    for s in scored:
        per_frame[s.time_s] = max(per_frame[s.time_s], s.score)
    prob = sum(per_frame.values()) / len(per_frame) if per_frame and error is None else None
    if error is not None:
        label = "error"
    elif frames_sampled == 0:
        label = "gap"
    elif prob is None:
        label = "no_face"
    elif not trained:
        label = "untrained"
    else:
        label = "fake" if prob >= threshold else "real"
    top = sorted(scored, key=lambda s: s.score, reverse=True)[:top_k]
    return {
        "job_id": job_id, "url": url, "clip_index": clip_index,
        "start_s": round(start_s, 3), "end_s": round(end_s, 3),
        "frames_sampled": frames_sampled, "frames_dropped": frames_dropped,
        "faces_scored": 0 if error else len(scored), "faces_skipped": faces_skipped,
        "fake_probability": None if prob is None else round(float(prob), 6),
        "label": label, "threshold": threshold, "model": model,
        "top_frames": [{"time_s": round(s.time_s, 3), "box": [round(v, 1) for v in s.face.as_list()[:4]],
                        "score": round(float(s.score), 6)} for s in top] if not error else [],
        "latency_s": round(latency_s, 4),
        "warnings": list(warnings) + ([f"scoring failed: {error}"] if error else [])
        + ([f"{frames_dropped} sampled frame(s) dropped: the worker fell behind the stream"]
           if frames_dropped else [])
        + ([f"{faces_skipped} face(s) beyond max_faces_per_frame were not scored"]
           if faces_skipped else [])
        + ([f"the stream broke off in this clip ({cut_by})"] if cut_by else []),
    }
