"""From the scored faces of one clip to its verdict.

Clip score: for every sampled frame with faces, the most suspicious face's calibrated fake
probability; the clip's `fake_probability` is the mean of those per-frame maxima (one fake face
among real ones still raises its frames, a single outlier frame does not decide a clip alone).
Label: `fake` if that mean >= threshold, else `real`; `no_face` when no face was scored;
`error` when scoring failed (the reason is in `warnings`).
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
                 error: Optional[str] = None) -> dict:
    per_frame: dict[float, float] = defaultdict(float)
    for s in scored:
        per_frame[s.time_s] = max(per_frame[s.time_s], s.score)
    prob = sum(per_frame.values()) / len(per_frame) if per_frame and error is None else None
    if error is not None:
        label = "error"
    elif prob is None:
        label = "no_face"
    else:
        label = "fake" if prob >= threshold else "real"
    top = sorted(scored, key=lambda s: s.score, reverse=True)[:top_k]
    return {
        "job_id": job_id, "url": url, "clip_index": clip_index,
        "start_s": round(start_s, 3), "end_s": round(end_s, 3),
        "frames_sampled": frames_sampled, "faces_scored": 0 if error else len(scored),
        "fake_probability": None if prob is None else round(float(prob), 6),
        "label": label, "threshold": threshold, "model": model,
        "top_frames": [{"time_s": round(s.time_s, 3), "box": [round(v, 1) for v in s.face.as_list()[:4]],
                        "score": round(float(s.score), 6)} for s in top] if not error else [],
        "latency_s": round(latency_s, 4),
        "warnings": list(warnings) + ([f"scoring failed: {error}"] if error else []),
    }
