"""Face tracks: the faces of one stream's sampled frames linked into one track per person.

Frame to frame, greedily (best pairs first, as in IoU trackers such as Bochinski et al., "High-
Speed Tracking-by-Detection Without Using Image Information", AVSS 2017):

- each live track predicts where its face is now from its last two sightings (constant
  velocity), so two people crossing keep their tracks;
- a face and a track match when the face overlaps that prediction by IoU >= `tracks.min_iou`,
  or, for a face that moved further between two sampled frames, when its centre lies within
  `tracks.max_center_shift` face widths of the predicted centre;
- each track takes at most one face of a frame and each face at most one track;
- an unmatched face starts a new track; a track not seen for `tracks.max_gap_s` of media time
  ends (a person who leaves and comes back later is a new track).

With `tracks.detect_every` = k > 1, only every k-th sampled frame is detected; `follow` says
where the faces are on the frames in between (workers/frame_faces.py crops them there).
The tracker lives for the whole job, so tracks carry across clip boundaries; `workers/verdict.py`
scores each clip's tracks and lets them decide the clip's label.
"""
from __future__ import annotations

from dataclasses import dataclass

from pel_model.config import TrackConfig
from pel_model.faces import Face


def iou(a: Face, b: Face) -> float:
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    if w <= 0 or h <= 0:
        return 0.0
    inter = w * h
    return inter / (a.width * a.height + b.width * b.height - inter)


def center_shift(a: Face, b: Face) -> float:
    """Distance between the centres, in units of the larger face width."""
    (ax, ay), (bx, by) = a.center, b.center
    return ((ax - bx) ** 2 + (ay - by) ** 2) ** 0.5 / max(a.width, b.width)


@dataclass
class _Track:
    id: int
    face: Face
    last_s: float
    velocity: tuple[float, float] = (0.0, 0.0)  # centre pixels per second of media time

    def predicted(self, time_s: float) -> Face:
        dt = time_s - self.last_s
        dx, dy = self.velocity[0] * dt, self.velocity[1] * dt
        f = self.face
        return Face(f.x0 + dx, f.y0 + dy, f.x1 + dx, f.y1 + dy, f.score)

    def update(self, face: Face, time_s: float) -> None:
        dt = time_s - self.last_s
        if dt > 0:
            (x0, y0), (x1, y1) = self.face.center, face.center
            self.velocity = ((x1 - x0) / dt, (y1 - y0) / dt)
        self.face, self.last_s = face, time_s


class FaceTracker:
    """Call `assign` with each sampled frame's faces, in media-time order."""

    def __init__(self, cfg: TrackConfig):
        self.cfg = cfg
        self._live: list[_Track] = []
        self._next_id = 1
        self._last_detection_s: float | None = None

    def _affinity(self, guess: Face, face: Face) -> float:
        """> 1 for overlapping boxes (1 + IoU), in (0, 1] for a near centre, 0 for no match."""
        overlap = iou(guess, face)
        if overlap >= self.cfg.min_iou:
            return 1.0 + overlap
        shift = center_shift(guess, face)
        return 1.0 - shift / self.cfg.max_center_shift if shift < self.cfg.max_center_shift else 0.0

    def follow(self, time_s: float) -> list[tuple[int, Face]]:
        """(track id, where its face is now) for the tracks seen on the last detected frame: the
        faces of a frame that skips detection (`tracks.detect_every`). Leaves the tracks as
        they are: only detections update them."""
        return [(t.id, t.predicted(time_s)) for t in self._live
                if t.last_s == self._last_detection_s]

    def assign(self, time_s: float, faces: list[Face]) -> list[int]:
        """The track id of each face of the frame at `time_s`."""
        self._last_detection_s = time_s
        self._live = [t for t in self._live if time_s - t.last_s <= self.cfg.max_gap_s]
        guesses = [t.predicted(time_s) for t in self._live]
        pairs = sorted(((a, ti, fi) for ti, g in enumerate(guesses)
                        for fi, f in enumerate(faces) if (a := self._affinity(g, f)) > 0),
                       reverse=True)
        ids: list[int] = [0] * len(faces)
        used: set[int] = set()
        for _, ti, fi in pairs:
            if ti in used or ids[fi]:
                continue
            used.add(ti)
            ids[fi] = self._live[ti].id
            self._live[ti].update(faces[fi], time_s)
        for fi, face in enumerate(faces):
            if not ids[fi]:
                ids[fi] = self._next_id
                self._next_id += 1
                self._live.append(_Track(ids[fi], face, time_s))
        return ids
