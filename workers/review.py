"""The review desk: what the Moderator's review page (`GET /pel/review`) shows and records.

- `flagged()`: the newest clips labelled `fake` (from the verdict stream), each with its job's
  state, redacted URL, scores and tracks; a track that has evidence links its face crop and
  heatmap (`evidence/<key>`, served from the evidence store) and any decision already made.
- `mark()`: a moderator's decision on one track, `confirmed` or `false_positive`, stored in the
  HASH `<prefix>:reviews` (field `<job>:<clip>:<track>`, JSON with the decision, the time, the
  scores and the evidence key), which `pel feedback export` (workers/feedback.py) reads.
- `authorize()`: without `review.token` only loopback clients are served; with one, every
  request carries it (`Authorization: Bearer`, or `?token=` once, which sets an HttpOnly
  cookie). Writes also need the `X-PEL-Review` header, which a cross-site form cannot send.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Optional

from pel_model.config import AppConfig

from .evidence_store import EvidenceStore
from .queue import JobQueue
from .redact import redact_url
from .redis_client import connect
from .verdicts import VerdictStore

PAGE = Path(__file__).with_name("review_page.html")
COOKIE = "pel_review_token"
DECISIONS = ("confirmed", "false_positive")
_JOB_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
SCAN_LIMIT = 5000  # verdict-stream entries read at most to find the flagged clips


class ReviewError(ValueError):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def review_token(cfg: AppConfig) -> Optional[str]:
    r = cfg.review
    token = r.token or (os.environ.get(r.token_env) if r.token_env else None)
    if r.token_env and not token:
        raise ValueError(f"review.token_env names {r.token_env}, which is not set")
    return token


class ReviewDesk:
    def __init__(self, cfg: AppConfig, redis_url: str, queue: Optional[JobQueue] = None):
        self.cfg = cfg
        self.r = connect(redis_url, cfg.redis, decode_responses=True)
        self.queue = queue or JobQueue(connect(redis_url, cfg.redis), cfg.redis, cfg.intake,
                                       "review")
        self.verdicts = VerdictStore(self.r, cfg.redis)
        self.store = EvidenceStore(cfg.evidence)
        self.token = review_token(cfg)
        self.reviews_key = f"{cfg.redis.prefix}:reviews"

    def authorize(self, client_host: str, headers: dict, query: dict, cookies: dict,
                  write: bool = False) -> None:
        if not self.cfg.review.enabled:
            raise ReviewError(404, "the review page is disabled (review.enabled: false)")
        if write and headers.get("x-pel-review") != "1":
            raise ReviewError(403, "writes need the X-PEL-Review: 1 header")
        if self.token is None:
            if not _loopback(client_host):
                raise ReviewError(403, "the review page answers loopback clients only; set "
                                       "review.token (or review.token_env) to open it to others")
            return
        auth = headers.get("authorization", "")
        supplied = (auth[7:] if auth.lower().startswith("bearer ") else
                    query.get("token") or cookies.get(COOKIE) or "")
        if not hmac.compare_digest(supplied.encode(), self.token.encode()):
            raise ReviewError(401, "a review token is required")

    def page(self) -> str:
        return PAGE.read_text()

    def _decisions(self) -> dict[str, dict]:
        return {k: json.loads(v) for k, v in self.r.hgetall(self.reviews_key).items()}

    def flagged(self) -> dict[str, Any]:
        want = self.cfg.review.recent_clips
        clips, last, scanned = [], "+", 0
        while len(clips) < want and scanned < SCAN_LIMIT:
            rows = self.r.xrevrange(self.verdicts.stream, max=last, count=500)
            if last != "+":
                rows = rows[1:]  # the entry `last` itself was seen
            if not rows:
                break
            for entry, fields in rows:
                scanned += 1
                if fields.get("label") == "fake" and len(clips) < want:
                    clips.append(json.loads(fields["verdict"]))
            last = rows[-1][0]
        decisions = self._decisions()
        states: dict[str, Optional[str]] = {}
        out = []
        for v in clips:
            job = v["job_id"]
            if job not in states:
                states[job] = (self.queue.state(job) or {}).get("state")
            out.append(self._clip(v, states[job], decisions))
        return {"clips": out, "grafana_url": self.cfg.review.grafana_url,
                "threshold_rule": "a clip is fake if any track with enough faces is"}

    def _clip(self, v: dict, state: Optional[str], decisions: dict) -> dict:
        tracks = []
        for t in v.get("tracks", []):
            ev = t.get("evidence") or {}
            face, heat = ev.get("face"), ev.get("heatmap")
            tracks.append({
                "track_id": t["track_id"], "label": t["label"],
                "fake_probability": t["fake_probability"], "faces_scored": t["faces_scored"],
                "first_s": t.get("first_s"), "last_s": t.get("last_s"),
                "face": f"evidence/{face}" if face and self.store.exists(face) else None,
                "heatmap": f"evidence/{heat}" if heat and self.store.exists(heat) else None,
                "heatmap_pending": bool(heat) and not self.store.exists(heat),
                "review": decisions.get(f"{v['job_id']}:{v['clip_index']}:{t['track_id']}"),
            })
        return {"job_id": v["job_id"], "clip_index": v["clip_index"], "start_s": v["start_s"],
                "end_s": v["end_s"], "fake_probability": v["fake_probability"],
                "threshold": v["threshold"], "label": v["label"], "model": v["model"],
                "url": redact_url(v["url"]) if isinstance(v.get("url"), str) else None,
                "job_state": state, "faces_scored": v.get("faces_scored"), "tracks": tracks}

    def mark(self, body: Any) -> dict:
        if not isinstance(body, dict):
            raise ReviewError(400, "expected a JSON object")
        job, clip, track = body.get("job_id"), body.get("clip_index"), body.get("track_id")
        decision, note = body.get("decision"), body.get("note") or ""
        if not isinstance(job, str) or not _JOB_ID.match(job):
            raise ReviewError(400, "job_id must be a job id")
        for name, value in (("clip_index", clip), ("track_id", track)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ReviewError(400, f"{name} must be an integer >= 0")
        if decision not in DECISIONS:
            raise ReviewError(400, f"decision must be one of {', '.join(DECISIONS)}")
        if not isinstance(note, str) or len(note) > 500:
            raise ReviewError(400, "note must be a string of at most 500 characters")
        raw = self.r.hget(self.verdicts.clips_key(job), str(clip))
        verdict = json.loads(raw) if raw else {}
        tracks = {t["track_id"]: t for t in verdict.get("tracks", [])}
        if track not in tracks:
            raise ReviewError(404, f"no track {track} in clip {clip} of job {job}")
        t = tracks[track]
        record = {"job_id": job, "clip_index": clip, "track_id": track, "decision": decision,
                  "note": note, "reviewed_at": round(time.time(), 3),
                  "fake_probability": t["fake_probability"],
                  "face": (t.get("evidence") or {}).get("face"),
                  "model": verdict.get("model")}
        self.r.hset(self.reviews_key, f"{job}:{clip}:{track}", json.dumps(record))
        return record

    def evidence_file(self, key: str) -> Path:
        try:
            path = self.store.path(key)
        except ValueError as exc:
            raise ReviewError(400, str(exc)) from None
        if not path.is_file():
            raise ReviewError(404, "no such evidence (expired, or not drawn yet)")
        return path
