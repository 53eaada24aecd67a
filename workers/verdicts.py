"""Per-clip verdicts in Redis, idempotent per (job_id, clip_index).

A redelivered job re-scores clips it already scored; the store keeps that harmless:

* ``P:job:<id>:clips``  HASH clip_index -> verdict JSON; always overwritten (latest wins).
* ``P:verdicts``        STREAM (``XADD MAXLEN ~ verdict_stream_maxlen``) with fields job_id,
                        clip_index, label, fake_probability, verdict (JSON); one entry per
                        (job_id, clip_index), written only the first time that clip is seen.
* channel ``P:verdicts`` PUBLISH of the verdict JSON, also only the first time, when
                        `RedisConfig.publish_verdicts`.

The three steps run in one Lua script, so a crash never leaves them half done. URLs are stored
redacted.
"""
from __future__ import annotations

import json
import math
from typing import Any

import redis

from pel_model.config import RedisConfig
from workers.jobs import redact_url

LABELS = frozenset({"fake", "real", "no_face", "error", "gap", "untrained"})
TRACK_LABELS = frozenset({"fake", "real", "too_few_faces", "untrained"})
REQUIRED_KEYS = (
    "job_id", "url", "clip_index", "start_s", "end_s", "frames_sampled", "faces_scored",
    "fake_probability", "label", "threshold", "model", "top_frames", "latency_s", "warnings",
)

_WRITE = """
local new = redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if new == 1 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[4],
             'clip_index', ARGV[1], 'label', ARGV[5], 'fake_probability', ARGV[6],
             'verdict', ARGV[2])
  if ARGV[7] == '1' then redis.call('PUBLISH', ARGV[8], ARGV[2]) end
end
return new
"""


class InvalidVerdict(ValueError):
    """A verdict dict missing keys or with out-of-range values."""


def validate_verdict(verdict: dict[str, Any]) -> dict[str, Any]:
    """Check required keys and value ranges; returns a copy with the URL redacted."""
    if not isinstance(verdict, dict):
        raise InvalidVerdict(f"verdict must be a dict, got {type(verdict).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in verdict]
    if missing:
        raise InvalidVerdict(f"verdict missing key(s): {', '.join(missing)}")
    job_id, clip, label, prob = (verdict[k] for k in ("job_id", "clip_index", "label",
                                                      "fake_probability"))
    if not isinstance(job_id, str) or not job_id:
        raise InvalidVerdict(f"job_id must be a non-empty string, got {job_id!r}")
    if isinstance(clip, bool) or not isinstance(clip, int) or clip < 0:
        raise InvalidVerdict(f"clip_index must be an int >= 0, got {clip!r}")
    if label not in LABELS:
        raise InvalidVerdict(f"label must be one of {sorted(LABELS)}, got {label!r}")
    if prob is None:
        if label in ("fake", "real"):
            raise InvalidVerdict(f"label {label!r} needs a fake_probability")
    elif isinstance(prob, bool) or not isinstance(prob, (int, float)) or not (
        math.isfinite(prob) and 0.0 <= prob <= 1.0
    ):
        raise InvalidVerdict(f"fake_probability must be in [0, 1] or None, got {prob!r}")
    for t in verdict.get("tracks", []):  # optional: verdicts written before tracks lack it
        _check_track(t)
    out = dict(verdict)
    if isinstance(out["url"], str):
        out["url"] = redact_url(out["url"])
    return out


def _check_track(t: Any) -> None:
    if not isinstance(t, dict) or not {"track_id", "label", "fake_probability",
                                       "faces_scored"} <= set(t):
        raise InvalidVerdict(f"a track needs track_id, label, fake_probability, faces_scored: {t!r}")
    if t["label"] not in TRACK_LABELS:
        raise InvalidVerdict(f"track label must be one of {sorted(TRACK_LABELS)}, got {t['label']!r}")
    p = t["fake_probability"]
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise InvalidVerdict(f"track fake_probability must be in [0, 1], got {p!r}")


class VerdictStore:
    def __init__(self, client: redis.Redis, cfg: RedisConfig):
        self.r = client
        self.cfg = cfg
        self.prefix = cfg.prefix
        self.stream = f"{cfg.prefix}:verdicts"
        self.channel = f"{cfg.prefix}:verdicts"
        self._write = client.register_script(_WRITE)

    def clips_key(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}:clips"

    def write(self, verdict: dict[str, Any]) -> bool:
        """Store a verdict. True when new, False when it replaced one for the same clip."""
        v = validate_verdict(verdict)
        try:
            payload = json.dumps(v, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InvalidVerdict(f"verdict is not JSON-serialisable: {exc}") from None
        prob = "" if v["fake_probability"] is None else repr(float(v["fake_probability"]))
        new = self._write(
            keys=[self.clips_key(v["job_id"]), self.stream],
            args=[str(v["clip_index"]), payload, self.cfg.verdict_stream_maxlen, v["job_id"],
                  v["label"], prob, "1" if self.cfg.publish_verdicts else "0", self.channel],
        )
        return bool(new)

    def clips(self, job_id: str) -> list[dict[str, Any]]:
        """All verdicts of a job, by clip index."""
        rows = self.r.hgetall(self.clips_key(job_id))
        return [json.loads(v) for _k, v in sorted(rows.items(), key=lambda kv: int(kv[0]))]

    def recent(self, count: int = 100) -> list[dict[str, Any]]:
        """The newest verdicts from the stream, newest first."""
        rows = self.r.xrevrange(self.stream, count=count)
        out = []
        for _entry, fields in rows:
            value = fields.get("verdict", fields.get(b"verdict"))
            out.append(json.loads(value))
        return out
