"""From the scored faces of one clip to its verdict.

Tracks decide (faces linked per person by workers/face_tracks.py). Each track of the clip gets
the mean calibrated fake probability of its faces in the clip, and a label when it has at least
`tracks.min_faces` faces there (`fake` if that mean >= threshold, else `real`; fewer faces:
`too_few_faces`, which decides nothing). The clip's `fake_probability` is the highest of its
deciding tracks' (one forged person among real ones makes the clip `fake`; a single bad frame,
a track of one face, does not). With no deciding track (every person seen too briefly) or faces
that were not tracked, the clip falls back to the frame rule: for every sampled frame with
faces, the most suspicious face's probability, averaged over the frames.
Label: `fake` if the clip's probability >= threshold, else `real`; `no_face` when no face was scored;
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
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from pel_model.faces import Face


@dataclass(frozen=True)
class ScoredFace:
    time_s: float
    face: Face
    score: float
    track: Optional[int] = None  # None: not tracked (the frame rule decides)
    crop: Optional[np.ndarray] = field(default=None, compare=False, repr=False)  # evidence


def _frame(s: ScoredFace) -> dict:
    return {"time_s": round(s.time_s, 3), "box": [round(v, 1) for v in s.face.as_list()[:4]],
            "score": round(float(s.score), 6)}


def track_summaries(scored: list[ScoredFace], threshold: float, min_faces: int,
                    trained: bool = True) -> list[dict]:
    """One entry per track of the clip, in track-id order (untracked faces are left out)."""
    by_track: dict[int, list[ScoredFace]] = defaultdict(list)
    for s in scored:
        if s.track is not None:
            by_track[s.track].append(s)
    out = []
    for track_id, faces in sorted(by_track.items()):
        prob = sum(f.score for f in faces) / len(faces)
        label = ("too_few_faces" if len(faces) < min_faces else
                 "untrained" if not trained else "fake" if prob >= threshold else "real")
        out.append({"track_id": track_id, "first_s": round(min(f.time_s for f in faces), 3),
                    "last_s": round(max(f.time_s for f in faces), 3),
                    "faces_scored": len(faces), "fake_probability": round(float(prob), 6),
                    "label": label, "top_frame": _frame(max(faces, key=lambda f: f.score))})
    return out


def make_verdict(*, job_id: str, url: str, clip_index: int, start_s: float, end_s: float,
                 frames_sampled: int, scored: list[ScoredFace], threshold: float, model: str,
                 warnings: list[str], top_k: int, latency_s: float,
                 error: Optional[str] = None, trained: bool = True, frames_dropped: int = 0,
                 faces_skipped: int = 0, cut_by: Optional[str] = None,
                 min_track_faces: int = 3) -> dict:
    tracks = [] if error else track_summaries(scored, threshold, min_track_faces, trained)
    deciding = [t["fake_probability"] for t in tracks if t["faces_scored"] >= min_track_faces]
    per_frame: dict[float, float] = defaultdict(float)
    for s in scored:
        per_frame[s.time_s] = max(per_frame[s.time_s], s.score)
    if error is not None or not per_frame:
        prob = None
    else:
        prob = max(deciding) if deciding else sum(per_frame.values()) / len(per_frame)
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
        "top_frames": [_frame(s) for s in top] if not error else [],
        "tracks": tracks,
        "latency_s": round(latency_s, 4),
        "warnings": list(warnings) + ([f"scoring failed: {error}"] if error else [])
        + ([f"{frames_dropped} sampled frame(s) dropped: the worker fell behind the stream"]
           if frames_dropped else [])
        + ([f"{faces_skipped} face(s) beyond max_faces_per_frame were not scored"]
           if faces_skipped else [])
        + ([f"the stream broke off in this clip ({cut_by})"] if cut_by else []),
    }
