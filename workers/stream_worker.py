"""Stream workers: Ray actors that claim jobs from Redis and run them to verdicts.

Each actor runs `streams_per_worker` job threads, so one slow or broken stream never blocks the
others. A job's lease is kept alive while it runs; if the actor dies, another worker reclaims
the job after the lease expires (at-least-once; verdicts are idempotent per clip). Errors end
as retries or dead letters with a reason; the actor survives them.
"""
from __future__ import annotations

import logging
import os
import threading
import time

import ray

from pel_model.config import AppConfig, IntakeConfig
from pel_model.faces import make_detector

from .decode import StreamError, classify_error
from .evidence import EvidenceRecorder
from .jobs import Job
from .metrics import metrics
from .pipeline import Hooks, ModelInfo, run_job
from .queue import JobQueue, Lease, consumer_name
from .redact import install_log_redaction, redact_text
from .redis_client import connect
from .urls import UrlRejected
from .verdicts import VerdictStore

log = logging.getLogger(__name__)
INFO_TIMEOUT_S = 30.0  # one ask for the detector's ModelInfo; asked again after it


def worker_runtime_env(intake: IntakeConfig) -> dict:
    """The stream worker processes' runtime_env: glibc's mmap threshold fixed (see
    `IntakeConfig.worker_malloc_mmap_threshold`), read by malloc when the process starts."""
    if intake.worker_malloc_mmap_threshold is None:
        return {}
    return {"env_vars": {"MALLOC_MMAP_THRESHOLD_": str(intake.worker_malloc_mmap_threshold)}}


@ray.remote(max_restarts=-1, max_task_retries=0)
class StreamWorker:
    def __init__(self, cfg: dict, redis_url: str, detector, worker_index: int = 0,
                 explainer=None):
        install_log_redaction()  # stream URLs carry credentials; FFmpeg echoes them
        self.cfg = AppConfig.model_validate(cfg)
        self.redis = connect(redis_url, self.cfg.redis)
        self.queue = JobQueue(self.redis, self.cfg.redis, self.cfg.intake,
                              consumer_name(f"w{worker_index}"))
        self.verdicts = VerdictStore(self.redis, self.cfg.redis)
        self.faces = make_detector(self.cfg.faces)
        self.detector = detector
        self.evidence = EvidenceRecorder(self.cfg.evidence, explainer)
        self.metrics = metrics(self.cfg.metrics.enabled)
        self.info: ModelInfo | None = None  # asked for by the job threads, not here: see _model_info
        self._info_lock = threading.Lock()
        self.stop = threading.Event()
        self.draining = threading.Event()  # claim nothing new, finish what runs (autoscale.py)
        self.active: dict[str, str] = {}
        self.threads = [threading.Thread(target=self._loop, name=f"job-{i}", daemon=True)
                        for i in range(self.cfg.intake.streams_per_worker)]
        for t in self.threads:
            t.start()

    def status(self) -> dict:
        return {"consumer": self.queue.consumer, "active_jobs": sorted(self.active),
                "threads_alive": sum(t.is_alive() for t in self.threads),
                "draining": self.draining.is_set(), "model_ready": self.info is not None,
                "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid(),
                "worker_id": ray.get_runtime_context().get_worker_id()}  # metrics' WorkerId

    def drain(self) -> None:
        """Stop claiming jobs; running ones finish. Idle once `threads_alive` is 0."""
        self.draining.set()

    def shutdown(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=10)

    def _model_info(self) -> ModelInfo | None:
        """The detector's input size and threshold, asked once with a timeout and asked again
        until it answers. Not in the constructor: a first request that never returns would leave
        the actor unable to answer `status` (seen once on a loaded multi-node cluster)."""
        with self._info_lock:
            while self.info is None and not self.stop.is_set():
                try:
                    info = self.detector.info.remote().result(timeout_s=INFO_TIMEOUT_S)
                    self.info = ModelInfo(**{k: v for k, v in info.items()
                                             if k in ModelInfo.__dataclass_fields__})
                    # zero series of this process, so rate() sees its first events
                    self.metrics.preregister([self.info.model_id])
                except Exception as exc:  # replica starting, or the request was lost: ask again
                    log.warning("detector info not available yet (%s: %s); asking again",
                                type(exc).__name__, exc)
                    self.stop.wait(1.0)
            return self.info

    def _loop(self) -> None:
        while not (self.stop.is_set() or self.draining.is_set()):
            if self._model_info() is None:
                return  # stopping
            try:
                job = self.queue.claim(self.cfg.intake.poll_block_ms)
            except Exception as exc:  # Redis down, or anything else: this thread must live on
                log.warning("claim failed (%s): %s", type(exc).__name__, exc)
                time.sleep(1.0)
                continue
            if job is not None:
                try:
                    self._run(job)
                except Exception:  # e.g. Redis gone while recording the failure: the lease expires
                    log.exception("job %s could not be settled; it will be redelivered", job.id)

    def _hooks(self) -> Hooks:
        m = self.metrics

        def on_verdict(verdict: dict, clip_ready: float) -> None:
            new = self.verdicts.write(verdict)
            if new:  # replays overwrite and are not counted twice
                m.clip(verdict["label"], verdict["model"], verdict["fake_probability"],
                       time.time() - clip_ready)
                if verdict["label"] == "error":  # the detector failed past its retry budget
                    m.stream_error("detector")
                m.faces_skipped(verdict.get("faces_skipped", 0))

        def on_scored(verdict: dict, scored: list) -> None:
            try:
                self.evidence.attach(verdict, scored)
            except Exception:  # evidence is an extra: the verdict goes out without it
                log.exception("evidence of clip %s failed", verdict.get("clip_index"))

        return Hooks(on_scored=on_scored, on_decoded=lambda n: m.frames("decoded", n),
                     on_dropped=lambda n: m.frames("dropped", n),
                     on_sampled=lambda n: m.frames("sampled", n),
                     on_reconnect=lambda *a: m.reconnect(), on_verdict=on_verdict)

    def _run(self, job: Job) -> None:
        if job.attempts > 1:
            self.metrics.redelivery()
        self.active[job.id] = job.url
        self.metrics.set_active_streams(len(self.active))
        job_stop = threading.Event()  # set by shutdown, a lost lease or a cancel request
        lease = Lease(self.queue, job, stop_event=job_stop, also=self.stop).start()
        try:
            totals = run_job(job, self.cfg, self.faces, self.info, self.detector.remote,
                             self._hooks(), stop=job_stop,
                             progress=lambda **p: self.queue.progress(job, **p))
            if lease.cancelled:
                self.queue.finish(job, "cancelled", "cancelled by request")
            elif self.stop.is_set() or lease.lost:
                return  # left pending: redelivered after the lease
            else:
                self.queue.complete(job, clips_failed=totals.clips_failed,
                                    ended=redact_text(totals.ended)[:1000])
        except (StreamError, UrlRejected) as exc:
            err = exc if isinstance(exc, StreamError) else classify_error(exc)
            if lease.cancelled:
                self.queue.finish(job, "cancelled", "cancelled by request")
            else:
                self._failed(job, lease, str(err), err.transient, err.reason)
        except Exception as exc:
            log.exception("job %s failed", job.id)
            self._failed(job, lease, f"internal: {type(exc).__name__}: {exc}", True, "internal")
        finally:
            lease.stop()
            self.active.pop(job.id, None)
            self.metrics.set_active_streams(len(self.active))

    def _failed(self, job: Job, lease: Lease, message: str, retry: bool, reason: str) -> None:
        # Dead letters are counted by the Moderator from the dead-letter stream (all causes).
        self.metrics.stream_error(reason)
        lease.stop()  # a renewal after `fail` would undo its retry backoff
        self.queue.fail(job, redact_text(message)[:1000], retry=retry)
