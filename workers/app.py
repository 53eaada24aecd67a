"""The Serve application: `serve run deploy/app.yaml` -> `build_app(args)`.

Three deployments, all thin:
- `PELDetector` (workers/detector.py): the network, on GPU replicas when the cluster has GPUs.
- `PELExplainer` (workers/explainer.py): heatmaps of flagged tracks, 0 replicas when idle.
- `Moderator` (ingress, FastAPI): resolves Redis (starting an embedded redis-server when no URL
  is configured), starts the `StreamWorker` actors and keeps them running (and sized to the
  queue, workers/autoscale.py), exports the queue gauges, applies the evidence retention, and
  answers `GET /` with the service status and `/review` (+ `/api/...`, `/evidence/...`) with
  the moderators' review page (workers/review.py).

No `from __future__ import annotations` here: FastAPI reads the route methods' annotations
(`request: Request`) as real types.
"""

import asyncio
import logging
import time

import ray
from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse

from pel_model.config import AppConfig

from .autoscale import WorkerScaler
from .dead_letter_tally import DeadLetterTally
from .detector import PELDetector
from .explainer import PELExplainer
from .metrics import metrics
from .queue import JobQueue
from .redact import install_log_redaction, redact_url
from .redis_client import connect
from .redis_server import ensure_embedded_redis, resolve_redis_url
from .review import COOKIE, ReviewDesk, ReviewError
from .stream_worker import StreamWorker, worker_runtime_env

log = logging.getLogger(__name__)
MONITOR_INTERVAL_S = 2.0
STATUS_TIMEOUT_S = 3.0
WEDGED_S = 180.0  # a worker silent this long is restarted (Ray recreates the actor)
SWEEP_INTERVAL_S = 60.0  # evidence retention
ENDPOINTS_INTERVAL_S = 10.0  # metrics endpoints looked up again
api = FastAPI(title="pel-moderation", docs_url=None, redoc_url=None, openapi_url=None)


def metrics_endpoints() -> list[str]:
    """`host:port` of every live Ray node's metrics export (Ray's, Serve's and `ray_pel_*`):
    what Prometheus scrapes. `serve run` on a fresh machine picks a random port; `ray start
    --metrics-export-port 8080` fixes it, and the head's dashboard also writes these targets
    to a Prometheus file-SD file (see deploy/prometheus/prometheus.yml)."""
    return sorted(f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
                  if n.get("Alive") and n.get("MetricsExportPort"))


@api.exception_handler(ReviewError)
async def _review_error(_request: Request, exc: ReviewError) -> JSONResponse:
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@serve.deployment(name="Moderator", ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Moderator:
    def __init__(self, cfg: dict, detector: DeploymentHandle,
                 explainer: DeploymentHandle | None = None):
        install_log_redaction()
        self.cfg = AppConfig.model_validate(cfg)
        self.redis_url = resolve_redis_url(self.cfg.redis)
        self.queue = JobQueue(connect(self.redis_url, self.cfg.redis), self.cfg.redis,
                              self.cfg.intake, "moderator")
        self.detector = detector
        self.explainer = explainer
        self.desk = ReviewDesk(self.cfg, self.redis_url, self.queue)
        self._swept = 0.0
        self._endpoints: list[str] = []  # metrics endpoints, last known (GCS calls can be slow)
        self._endpoints_at = 0.0
        self.metrics = metrics(self.cfg.metrics.enabled)
        self.metrics.preregister()
        self.dead_letters = DeadLetterTally(self.queue.r, self.queue.keys.deadletter,
                                            self.queue.keys.deadletter_counted)
        self.workers = [self._spawn(i) for i in range(self.cfg.intake.stream_workers)]
        self.draining: list = []  # told to drain; removed once idle (autoscale.py)
        self._next_index = len(self.workers)
        self._silent_since: dict[int, float] = {}  # id(worker) -> first unanswered status
        self.scaler = WorkerScaler.from_config(self.cfg.intake)
        self.model = None
        self._monitor = asyncio.get_event_loop().create_task(self._watch())

    def _spawn(self, index: int):
        intake = self.cfg.intake
        return StreamWorker.options(num_cpus=intake.worker_num_cpus,  # spread: a node lost
                                    resources=dict(intake.worker_resources),  # takes few streams
                                    scheduling_strategy="SPREAD",
                                    runtime_env=worker_runtime_env(intake)).remote(
            self.cfg.model_dump(mode="json"), self.redis_url, self.detector, index, self.explainer)

    async def _watch(self) -> None:
        while True:
            try:
                await asyncio.to_thread(ensure_embedded_redis, self.cfg.redis)
                self.metrics.set_queue_depth(await asyncio.to_thread(self.queue.queue_depth))
                for reason in await asyncio.to_thread(self.dead_letters.new_reasons):
                    self.metrics.dead_letter(reason)
                if self.model is None:
                    self.model = await asyncio.wait_for(self.detector.info.remote(), 30)
                await self._restart_stuck_workers()
                if time.monotonic() - self._endpoints_at > ENDPOINTS_INTERVAL_S:
                    self._endpoints_at = time.monotonic()
                    self._refresh = asyncio.ensure_future(self._refresh_endpoints())
                if time.monotonic() - self._swept > SWEEP_INTERVAL_S:
                    self._swept = time.monotonic()
                    await asyncio.to_thread(self.desk.store.sweep)
                if self.scaler is not None:
                    await self._autoscale()
                self.metrics.set_stream_workers(len(self.workers))
            except Exception as exc:  # Redis or detector briefly unavailable: keep watching
                log.warning("monitor: %s", exc)
            await asyncio.sleep(MONITOR_INTERVAL_S)

    async def _refresh_endpoints(self) -> None:
        try:
            self._endpoints = await asyncio.wait_for(asyncio.to_thread(metrics_endpoints), 30)
        except Exception as exc:  # the GCS is busy: keep the last known ones
            log.warning("metrics endpoints not refreshed: %s", type(exc).__name__)

    async def _restart_stuck_workers(self) -> None:
        """A worker whose job threads died, or that has not answered for WEDGED_S, is
        restarted (Ray recreates the actor; its jobs come back after their leases)."""
        now = time.monotonic()
        for w in self.workers:
            try:
                status = await asyncio.wait_for(w.status.remote(), timeout=10)
                self._silent_since.pop(id(w), None)
            except ray.exceptions.RayActorError:
                continue  # being restarted by Ray
            except asyncio.TimeoutError:  # starting, busy, or wedged
                if now - self._silent_since.setdefault(id(w), now) > WEDGED_S:
                    log.warning("restarting a stream worker silent for %.0f s", WEDGED_S)
                    self._silent_since.pop(id(w))
                    ray.kill(w, no_restart=False)
                continue
            if status["threads_alive"] < self.cfg.intake.streams_per_worker:
                log.warning("restarting stream worker %s: job threads died", status["consumer"])
                ray.kill(w, no_restart=False)

    async def _autoscale(self) -> None:
        s = await asyncio.to_thread(self.queue.stats)
        demand = s["listed"] + s["undelivered"] + s["pending"]  # waiting + running jobs
        target = self.scaler.target(len(self.workers), demand, time.monotonic())
        if target > len(self.workers):
            log.info("autoscale: %d -> %d stream workers (%d jobs)", len(self.workers), target,
                     demand)
        while len(self.workers) < target:
            self.workers.append(self._spawn(self._next_index))
            self._next_index += 1
        if target < len(self.workers):  # drain the least busy; none of their streams stops
            statuses = await asyncio.gather(*(self._worker_status(w) for w in self.workers))
            busy = {id(w): len(st["active_jobs"]) if "active_jobs" in st else 1 << 20
                    for w, st in zip(self.workers, statuses)}
            leaving = sorted(self.workers, key=lambda w: busy[id(w)])[:len(self.workers) - target]
            log.info("autoscale: %d -> %d stream workers (%d jobs), draining %d",
                     len(self.workers), target, demand, len(leaving))
            for w in leaving:
                self.workers.remove(w)
                self.draining.append(w)
                w.drain.remote()
        await self._reap_drained()

    async def _reap_drained(self) -> None:
        for w in list(self.draining):
            st = await self._worker_status(w)
            if "error" in st:
                continue  # starting or restarting: ask again next round
            if not st["draining"]:  # Ray restarted it (its node was lost): tell it again
                w.drain.remote()
            elif st["threads_alive"] == 0 and not st["active_jobs"]:
                ray.kill(w, no_restart=True)
                self.draining.remove(w)
                await asyncio.to_thread(self.queue.forget_consumer, st["consumer"])

    def check_health(self) -> None:
        if self._monitor.done():
            raise RuntimeError(f"monitor loop ended: {self._monitor.exception()!r}")

    async def _worker_status(self, w) -> dict:
        try:
            return await asyncio.wait_for(w.status.remote(), timeout=STATUS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return {"error": "not answering (starting or busy)"}
        except ray.exceptions.RayActorError:
            return {"error": "restarting"}

    async def status(self) -> dict:
        """Service status; answers within a few seconds even when Redis or a worker is down."""
        workers = await asyncio.gather(*(self._worker_status(w)
                                         for w in self.workers + self.draining))
        try:
            stats = await asyncio.wait_for(asyncio.to_thread(self.queue.stats), STATUS_TIMEOUT_S)
            redis_ok = True
        except Exception as exc:  # Redis down: say so instead of failing the request
            stats, redis_ok = {"error": f"redis unavailable ({type(exc).__name__})"}, False
        scrape = self._endpoints  # refreshed by the monitor loop
        if not scrape:
            try:
                scrape = await asyncio.wait_for(asyncio.to_thread(metrics_endpoints),
                                                STATUS_TIMEOUT_S)
            except Exception:  # the GCS is busy or restarting: the rest still answers
                scrape = []
        return {"redis_url": redact_url(self.redis_url), "redis_ok": redis_ok,
                "prefix": self.cfg.redis.prefix, "queue": stats, "workers": list(workers),
                "model": self.model, "metrics_endpoints": scrape,
                "node_id": ray.get_runtime_context().get_node_id()}

    @api.get("/")
    async def service_status(self):
        status = await self.status()
        return JSONResponse(status, status_code=200 if status["redis_ok"] else 503)

    def _authorize(self, request: Request, write: bool = False) -> None:
        self.desk.authorize(request.client.host if request.client else "", dict(request.headers),
                            dict(request.query_params), dict(request.cookies), write)

    @api.get("/review")
    async def review_page(self, request: Request):
        self._authorize(request)
        page = HTMLResponse(self.desk.page(), headers={"Cache-Control": "no-store"})
        token = request.query_params.get("token")
        if token:  # later requests of the page carry it as a cookie, not in its URLs
            page.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        return page

    @api.get("/api/flagged")
    async def flagged(self, request: Request):
        self._authorize(request)
        return JSONResponse(await asyncio.to_thread(self.desk.flagged))

    @api.post("/api/review")
    async def review(self, request: Request):
        self._authorize(request, write=True)
        try:
            body = await request.json()
        except ValueError:
            raise ReviewError(400, "expected a JSON body") from None
        return JSONResponse(await asyncio.to_thread(self.desk.mark, body))

    @api.get("/evidence/{key:path}")
    async def evidence_file(self, key: str, request: Request):
        self._authorize(request)
        return FileResponse(self.desk.evidence_file(key), media_type="image/png")


def build_app(args: dict | None = None) -> serve.Application:
    """Typed app builder: `args` are validated into `AppConfig` (see pel_model/config.py)."""
    cfg = AppConfig.model_validate(args or {})
    d = cfg.detector
    num_gpus = d.num_gpus
    if num_gpus is None:  # GPU replicas when the cluster has GPUs, CPU otherwise
        num_gpus = 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1 else 0.0
    if d.autoscaling is not None:  # Serve sizes the replicas on their requests in flight
        scale = {"autoscaling_config": d.autoscaling.model_dump()}
        log.info("detector: %d-%d replica(s), %g GPU(s) each", d.autoscaling.min_replicas,
                 d.autoscaling.max_replicas, num_gpus)
    else:
        scale = {"num_replicas": d.num_replicas}
        log.info("detector: %d replica(s), %g GPU(s) each", d.num_replicas, num_gpus)
    detector = PELDetector.options(
        **scale, max_ongoing_requests=max(d.max_ongoing_requests, 2 * d.max_batch_size),
        ray_actor_options={"num_cpus": d.num_cpus, "num_gpus": num_gpus,
                           "resources": dict(d.resources)},
    ).bind(d.model_dump(mode="json"), cfg.metrics.enabled)
    ev = cfg.evidence
    explainer = None
    if ev.heatmaps and ev.tracks != "off":  # scales from zero when a track is flagged
        explainer = PELExplainer.options(
            autoscaling_config={"min_replicas": 0, "initial_replicas": 0,
                                "max_replicas": ev.explainer_max_replicas,
                                "target_ongoing_requests": 2, "downscale_delay_s": 300},
            ray_actor_options={"num_cpus": ev.explainer_num_cpus, "num_gpus": 0},
        ).bind(d.model_dump(mode="json"), ev.model_dump(mode="json"))
    return Moderator.bind(cfg.model_dump(mode="json"), detector, explainer)
