"""Evidence of a clip's tracks, recorded by the stream worker before the verdict is stored.

For each track that `evidence.tracks` selects (`flagged`: tracks labelled `fake`; `all`: every
track with a label), the crop of its most suspicious face (the track's `top_frame`) goes to the
evidence store as `face.png`, and the track in the verdict gets
`evidence: {"face": key, "heatmap": key | null}`. The heatmap is drawn off the hot path: a
request to the `PELExplainer` deployment (workers/explainer.py), not awaited; until it is done
the review page shows "heatmap pending". Storing evidence never fails a clip: an error is logged
and the track goes without.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Optional

from pel_model.config import EvidenceConfig

from .evidence_store import EvidenceStore, png_bytes, track_key
from .verdict import ScoredFace

log = logging.getLogger(__name__)
MAX_PENDING = 256  # heatmap requests in flight per worker; older ones are no longer followed


class EvidenceRecorder:
    def __init__(self, cfg: EvidenceConfig, explainer: Any = None):
        self.cfg = cfg
        self.store = EvidenceStore(cfg)
        self.explainer = explainer if cfg.heatmaps else None
        self._pending: deque = deque()

    def wanted(self, track: dict) -> bool:
        if self.cfg.tracks == "off":
            return False
        if self.cfg.tracks == "flagged":
            return track["label"] == "fake"
        return track["label"] != "too_few_faces"

    def attach(self, verdict: dict, scored: list[ScoredFace]) -> None:
        """Store the evidence of `verdict`'s selected tracks and reference it in the verdict."""
        for track in verdict.get("tracks", []):
            if not self.wanted(track):
                continue
            faces = [s for s in scored if s.track == track["track_id"] and s.crop is not None]
            if not faces:
                continue
            top = max(faces, key=lambda s: s.score)
            key = track_key(verdict["job_id"], verdict["clip_index"], track["track_id"])
            try:
                face_key = self.store.put(f"{key}/face.png", png_bytes(top.crop))
            except Exception as exc:  # a full or unmounted disk must not cost the verdict
                log.warning("evidence for %s not stored: %s", key, exc)
                continue
            heatmap_key = self._request_heatmap(top.crop, f"{key}/heatmap.png")
            track["evidence"] = {"face": face_key, "heatmap": heatmap_key}

    def _request_heatmap(self, crop, key: str) -> Optional[str]:
        if self.explainer is None:
            return None
        self._follow_up()
        try:
            self._pending.append((key, self.explainer.explain.remote(crop, key)))
        except Exception as exc:
            log.warning("heatmap %s not requested: %s", key, exc)
            return None
        while len(self._pending) > MAX_PENDING:
            self._pending.popleft()
        return key

    def _follow_up(self) -> None:
        """Log heatmap requests that failed; forget the finished ones."""
        still = deque()
        for key, response in self._pending:
            try:
                response.result(timeout_s=0)
            except TimeoutError:
                still.append((key, response))
            except Exception as exc:
                log.warning("heatmap %s failed: %s: %s", key, type(exc).__name__, exc)
        self._pending = still
