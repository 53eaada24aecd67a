"""Prometheus metrics of the moderation service, recorded through `ray.util.metrics`.

Ray exports every metric on each node's metrics export port (``ray start
--metrics-export-port``), prefixed ``ray_`` and with volatile per-process labels (WorkerId,
SessionName, NodeAddress, ...): aggregate with ``sum by (...)`` in queries. Exported names
(`EXPORTED`) and their labels:

=====================================  =========  ==========================================
ray_pel_clips_total                    counter    label (fake/real/no_face/error/gap/untrained), model
ray_pel_faces_scored_total             counter    model
ray_pel_faces_skipped_total            counter    faces found beyond faces.max_faces_per_frame
ray_pel_face_score                     histogram  model; fake probability of each face, 0..1
ray_pel_clip_score                     histogram  model; fake probability of each clip, 0..1
ray_pel_frames_total                   counter    stage (decoded/sampled/dropped)
ray_pel_inference_batch_size           histogram  model; crops per model call
ray_pel_inference_crops_total          counter    model; crops sent through the detector
ray_pel_inference_seconds              histogram  model; time per model call
ray_pel_clip_latency_seconds           histogram  model; end of clip (media time) to verdict
ray_pel_active_streams                 gauge      streams being decoded by this worker
ray_pel_queue_depth                    gauge      jobs waiting in Redis (cluster-wide: use max)
ray_pel_stream_workers                 gauge      stream workers kept by the Moderator (use max)
ray_pel_detector_ready                 gauge      model; 1 per detector replica ready to score
ray_pel_stream_reconnects_total        counter    reconnects of live sources
ray_pel_stream_errors_total            counter    reason (`STREAM_ERROR_REASONS`)
ray_pel_job_redeliveries_total         counter    jobs claimed again after a failed attempt
ray_pel_dead_letters_total             counter    reason (`DEAD_LETTER_REASONS`)
=====================================  =========  ==========================================

Ray 2.60 exports histogram ``_sum`` series approximated from bucket midpoints (counts and
``_bucket`` series are exact), so means are computed from counters instead: the mean batch size
is ``rate(ray_pel_inference_crops_total) / rate(ray_pel_inference_batch_size_count)``.

Ray 2.60 drops a gauge series from the export about 20 s after it was last recorded (its
agent evicts gauges that stop being re-reported, so a dead process's series ages out). A gauge
set once, like ``ray_pel_detector_ready``, would vanish while its process lives on, so each
process re-records its gauges' last values every `GAUGE_REFRESH_S` seconds from a daemon
thread; they still disappear when the process dies.

Ray metric objects must be created in the process that records them, so `metrics()` builds
one `Metrics` per process on first use. Label values are checked against the known sets (no
URL or job id ever becomes a label); an unknown value raises `ValueError`.
"""
from __future__ import annotations

import math
import threading
import time
from typing import Iterable, Optional, Sequence

from workers.decode import REASONS as _DECODE_REASONS

EXPORT_PREFIX = "ray_"  # added by Ray's exporter
VERDICT_LABELS = ("fake", "real", "no_face", "error", "gap", "untrained")
FRAME_STAGES = ("decoded", "sampled", "dropped")
# Decoder reasons plus failures outside decoding (detector calls, anything unexpected).
STREAM_ERROR_REASONS = tuple(_DECODE_REASONS) + ("detector", "internal")
DEAD_LETTER_REASONS = ("invalid_job", "duplicate_id", "lease_expired", "failed")

GAUGE_REFRESH_S = 2.0  # well inside Ray's ~20 s gauge eviction
SCORE_BUCKETS = [round(0.05 * i, 2) for i in range(1, 21)]  # 0.05 .. 1.0 (0 is implicit)
BATCH_SIZE_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
INFERENCE_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
CLIP_LATENCY_BUCKETS = [0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0]

# Ray-side name -> (kind, description, tag keys). Ray appends `_total` to counters that lack
# it, so counters carry it here already: the exported name is EXPORT_PREFIX + key.
_SPECS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pel_clips_total": ("counter", "Clips given a verdict, by verdict label", ("label", "model")),
    "pel_faces_scored_total": ("counter", "Face crops scored by the detector", ("model",)),
    "pel_faces_skipped_total": ("counter", "Faces found beyond max_faces_per_frame, not scored",
                                ()),
    "pel_face_score": ("histogram", "Fake probability of each scored face (0..1)", ("model",)),
    "pel_clip_score": ("histogram", "Fake probability of each clip verdict (0..1)", ("model",)),
    "pel_frames_total": ("counter", "Video frames by stage: decoded, sampled, dropped",
                         ("stage",)),
    "pel_inference_batch_size": ("histogram", "Face crops per model call (a merged batch is split into calls of at most detector.cpu_batch_size on CPU)", ("model",)),
    "pel_inference_crops_total": ("counter", "Face crops sent through the detector",
                                  ("model",)),
    "pel_inference_seconds": ("histogram", "Detector inference time per model call, seconds",
                              ("model",)),
    "pel_clip_latency_seconds": ("histogram", "End of clip (media time) to verdict written, "
                                 "seconds", ("model",)),
    "pel_active_streams": ("gauge", "Streams being decoded by this worker", ()),
    "pel_queue_depth": ("gauge", "Jobs waiting in the Redis queue (cluster-wide value)", ()),
    "pel_stream_workers": ("gauge", "Stream worker actors kept by the Moderator (draining "
                           "ones excluded)", ()),
    "pel_detector_ready": ("gauge", "1 while this detector replica can score", ("model",)),
    "pel_stream_reconnects_total": ("counter", "Reconnects of live stream sources", ()),
    "pel_stream_errors_total": ("counter", "Stream failures by reason", ("reason",)),
    "pel_job_redeliveries_total": ("counter", "Jobs delivered again after a failed attempt", ()),
    "pel_dead_letters_total": ("counter", "Jobs given up on, by reason", ("reason",)),
}
_BUCKETS = {
    "pel_face_score": SCORE_BUCKETS,
    "pel_clip_score": SCORE_BUCKETS,
    "pel_inference_batch_size": BATCH_SIZE_BUCKETS,
    "pel_inference_seconds": INFERENCE_BUCKETS,
    "pel_clip_latency_seconds": CLIP_LATENCY_BUCKETS,
}
EXPORTED: dict[str, str] = {name: EXPORT_PREFIX + name for name in _SPECS}


def _check(kind: str, value: str, allowed: Sequence[str]) -> dict[str, str]:
    if value not in allowed:
        raise ValueError(f"unknown {kind} {value!r}: expected one of {list(allowed)}")
    return {kind: value}


def _model(model: str) -> dict[str, str]:
    if not isinstance(model, str) or not model or len(model) > 64 or "/" in model:
        raise ValueError(f"model label must be a short name (no path/URL), got {model!r}")
    return {"model": model}


def _count(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0:
        raise ValueError(f"{what} must be a finite number >= 0, got {value!r}")
    return float(value)


def _probability(value: float) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"fake probability must be in [0, 1], got {value!r}")
    return float(value)


class Metrics:
    """All service metrics of one process. `enabled=False` validates inputs but records nothing
    (`MetricsConfig.enabled`)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._m: dict[str, object] = {}
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], tuple[float, Optional[dict]]] = {}
        self._gauge_lock = threading.Lock()
        self._refresher: Optional[threading.Thread] = None
        if enabled:
            from ray.util import metrics as rm

            for name, (kind, desc, tags) in _SPECS.items():
                if kind == "counter":
                    self._m[name] = rm.Counter(name, desc, tag_keys=tags)
                elif kind == "gauge":
                    self._m[name] = rm.Gauge(name, desc, tag_keys=tags)
                else:
                    self._m[name] = rm.Histogram(name, desc, boundaries=_BUCKETS[name],
                                                 tag_keys=tags)

    # ---- low level --------------------------------------------------------------------------
    def _inc(self, name: str, value: float, tags: Optional[dict[str, str]] = None) -> None:
        if self.enabled and value > 0:
            self._m[name].inc(value, tags=tags)  # type: ignore[attr-defined]

    def _observe(self, name: str, value: float, tags: Optional[dict[str, str]] = None) -> None:
        if self.enabled:
            self._m[name].observe(value, tags=tags)  # type: ignore[attr-defined]

    def _set(self, name: str, value: float, tags: Optional[dict[str, str]] = None) -> None:
        if not self.enabled:
            return
        with self._gauge_lock:
            self._m[name].set(value, tags=tags)  # type: ignore[attr-defined]
            self._gauges[(name, tuple(sorted((tags or {}).items())))] = (value, tags)
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_gauges, daemon=True,
                                                   name="pel-gauge-refresh")
                self._refresher.start()

    def _refresh_gauges(self) -> None:
        """Re-record every gauge's last value, so Ray keeps exporting it (module docstring)."""
        while True:
            time.sleep(GAUGE_REFRESH_S)
            with self._gauge_lock:
                for (name, _), (value, tags) in self._gauges.items():
                    self._m[name].set(value, tags=tags)  # type: ignore[attr-defined]

    # ---- recording --------------------------------------------------------------------------
    def clip(self, label: str, model: str, fake_probability: Optional[float] = None,
             latency_s: Optional[float] = None) -> None:
        """One clip verdict: counts it, and observes its score and latency when given."""
        tags = {**_check("label", label, VERDICT_LABELS), **_model(model)}
        score = None if fake_probability is None else _probability(fake_probability)
        latency = None if latency_s is None else _count(latency_s, "clip latency")
        self._inc("pel_clips_total", 1, tags)
        if score is not None:
            self._observe("pel_clip_score", score, {"model": model})
        if latency is not None:
            self._observe("pel_clip_latency_seconds", latency, {"model": model})

    def faces(self, model: str, scores: Iterable[float]) -> None:
        """Face crops scored by the detector, with their fake probabilities."""
        tags = _model(model)
        values = [_probability(s) for s in scores]
        self._inc("pel_faces_scored_total", len(values), tags)
        for v in values:
            self._observe("pel_face_score", v, tags)

    def inference(self, model: str, batch_size: int, seconds: float) -> None:
        """One detector batch: its size and wall time."""
        tags = _model(model)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        seconds = _count(seconds, "inference seconds")
        self._observe("pel_inference_batch_size", batch_size, tags)
        self._inc("pel_inference_crops_total", batch_size, tags)
        self._observe("pel_inference_seconds", seconds, tags)

    def frames(self, stage: str, n: int = 1) -> None:
        """`n` frames decoded, sampled (kept for scoring) or dropped."""
        self._inc("pel_frames_total", _count(n, "frame count"), _check("stage", stage,
                                                                        FRAME_STAGES))

    def faces_skipped(self, n: int) -> None:
        if n:
            self._inc("pel_faces_skipped_total", _count(n, "skipped faces"))

    def reconnect(self) -> None:
        self._inc("pel_stream_reconnects_total", 1)

    def stream_error(self, reason: str) -> None:
        self._inc("pel_stream_errors_total", 1, _check("reason", reason, STREAM_ERROR_REASONS))

    def redelivery(self) -> None:
        self._inc("pel_job_redeliveries_total", 1)

    def dead_letter(self, reason: str) -> None:
        self._inc("pel_dead_letters_total", 1, _check("reason", reason, DEAD_LETTER_REASONS))

    def set_active_streams(self, n: int) -> None:
        self._set("pel_active_streams", _count(n, "active streams"))

    def set_queue_depth(self, n: int) -> None:
        self._set("pel_queue_depth", _count(n, "queue depth"))

    def set_stream_workers(self, n: int) -> None:
        self._set("pel_stream_workers", _count(n, "stream workers"))

    def set_detector_ready(self, model: str, ready: bool) -> None:
        self._set("pel_detector_ready", 1.0 if ready else 0.0, _model(model))

    def preregister(self, models: Sequence[str] = ()) -> None:
        """Export zero-valued series for every known label value (and each of `models`), so
        dashboards and `rate()` have series before the first event."""
        if not self.enabled:
            return
        zero: list[tuple[str, Optional[dict[str, str]]]] = [
            ("pel_stream_reconnects_total", None), ("pel_job_redeliveries_total", None),
            ("pel_faces_skipped_total", None)]
        zero += [("pel_frames_total", {"stage": s}) for s in FRAME_STAGES]
        zero += [("pel_stream_errors_total", {"reason": r}) for r in STREAM_ERROR_REASONS]
        zero += [("pel_dead_letters_total", {"reason": r}) for r in DEAD_LETTER_REASONS]
        for model in models:
            _model(model)
            zero += [("pel_clips_total", {"label": v, "model": model}) for v in VERDICT_LABELS]
            zero.append(("pel_faces_scored_total", {"model": model}))
            zero.append(("pel_inference_crops_total", {"model": model}))
        for name, tags in zero:
            # Counter.inc refuses 0; recording a 0 increment creates the series at 0.
            self._m[name]._record(0, tags=tags)  # type: ignore[attr-defined]


_lock = threading.Lock()
_instance: Optional[Metrics] = None


def metrics(enabled: bool = True) -> Metrics:
    """This process's `Metrics`, created on first call (inside the Ray actor/replica)."""
    global _instance
    with _lock:
        if _instance is None:
            _instance = Metrics(enabled=enabled)
        elif _instance.enabled != enabled:
            raise ValueError(f"metrics() already created with enabled={_instance.enabled}")
        return _instance
