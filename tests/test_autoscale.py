"""Autoscaling: the stream-worker policy (workers/autoscale.py) on its own, then a burst through
the real application on the session's Ray cluster: stream workers and detector replicas go up,
every job ends with all its clips (none twice), and both go back down once the queue drains."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import redis
from pydantic import ValidationError
from ray import serve

from media import astronaut, make_face_video
from model_utils import SMALL
from pel_model.config import AppConfig, DetectorAutoscaling, IntakeConfig
from workers.app import build_app
from workers.autoscale import WorkerScaler
from workers.cli import DEFAULT_CONFIG, FINAL_STATES, load_config
from workers.queue import JobQueue

APP, CLIP_S, SECONDS, JOBS = "pel-autoscale", 2.0, 10.0, 6


def test_wanted_workers_cover_waiting_and_running_jobs_within_bounds():
    s = WorkerScaler(min_workers=2, max_workers=5, streams_per_worker=2, scale_down_delay_s=10)
    assert [s.wanted(n) for n in (0, 1, 4, 5, 9, 10, 100)] == [2, 2, 2, 3, 5, 5, 5]


def test_grows_at_once_and_shrinks_after_the_delay():
    s = WorkerScaler(min_workers=1, max_workers=4, streams_per_worker=1, scale_down_delay_s=10)
    assert s.target(current=1, demand=3, now=0.0) == 3  # up: no delay
    assert s.target(current=3, demand=1, now=1.0) == 3  # low since t=1
    assert s.target(current=3, demand=1, now=10.9) == 3
    assert s.target(current=3, demand=1, now=11.0) == 1  # low for the whole delay
    assert s.target(current=3, demand=2, now=12.0) == 2  # still low: the next step at once
    # demand coming back resets the clock
    assert s.target(current=2, demand=2, now=13.0) == 2
    assert s.target(current=2, demand=0, now=14.0) == 2
    assert s.target(current=2, demand=0, now=23.9) == 2
    assert s.target(current=2, demand=0, now=24.0) == 1


def test_fixed_worker_count_without_bounds_and_bounds_validated():
    assert WorkerScaler.from_config(IntakeConfig()) is None
    s = WorkerScaler.from_config(IntakeConfig(stream_workers=2, max_stream_workers=6,
                                              streams_per_worker=3, scale_down_delay_s=5))
    assert (s.min_workers, s.max_workers, s.streams_per_worker, s.scale_down_delay_s) == (2, 6, 3, 5)
    with pytest.raises(ValidationError, match="max_stream_workers"):
        IntakeConfig(stream_workers=3, max_stream_workers=2)
    with pytest.raises(ValidationError, match="max_replicas"):
        DetectorAutoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="look_back_period_s"):
        DetectorAutoscaling(look_back_period_s=5, metrics_interval_s=10)


def test_serve_accepts_the_detector_autoscaling_config():
    from ray.serve.config import AutoscalingConfig
    cfg = AutoscalingConfig(**DetectorAutoscaling().model_dump())  # Ray's own validation
    assert (cfg.min_replicas, cfg.max_replicas) == (1, 4)


def _replicas() -> int:
    app = serve.status().applications.get(APP)
    if app is None or "PELDetector" not in app.deployments:
        return 0
    return app.deployments["PELDetector"].replica_states.get("RUNNING", 0)


def _status() -> dict:
    return serve.get_app_handle(APP).status.remote().result(timeout_s=30)


def _workers(status: dict) -> int:
    return sum(1 for w in status["workers"] if not w.get("draining"))


@pytest.mark.slow
def test_a_burst_scales_workers_and_replicas_up_then_down_losing_nothing(
        ray_cluster, redis_url, service_checkpoint, tmp_path):
    ckpt, art = service_checkpoint
    a = astronaut()
    clips = [make_face_video(tmp_path / f"c{i}.mp4",
                             [a if i % 2 else np.ascontiguousarray(a[:, ::-1])], seconds=SECONDS)
             for i in range(JOBS)]
    args = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    args["redis"].update(url=redis_url, prefix="autoscale")
    args["intake"].update(stream_workers=1, max_stream_workers=3, streams_per_worker=1,
                          scale_down_delay_s=3.0, lease_seconds=5.0, poll_block_ms=200)
    args["stream"].update(clip_seconds=CLIP_S)
    args["urls"].update(file_roots=[str(tmp_path)])
    args["detector"].update(checkpoint=str(ckpt), model=SMALL.model_dump(mode="json"),
                            artifacts_dir=str(art), autoscaling={
                                "min_replicas": 1, "max_replicas": 2,
                                "target_ongoing_requests": 0.25, "upscale_delay_s": 0.0,
                                "downscale_delay_s": 5.0, "look_back_period_s": 5.0,
                                "metrics_interval_s": 1.0})
    cfg = AppConfig.model_validate(args)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = JobQueue(client, cfg.redis, cfg.intake, "test")
    serve.run(build_app(args), name=APP, route_prefix=f"/{APP}")
    try:
        # At rest: the minimums (start-up's own info calls may add a replica for a moment).
        deadline = time.monotonic() + 120
        while not (_workers(_status()) == 1 and _replicas() == 1):
            assert time.monotonic() < deadline, (_status()["workers"], _replicas())
            time.sleep(1.0)

        ids = [queue.push(f"file://{c}") for c in clips]
        t0 = time.monotonic()
        most_workers = most_replicas = 0
        reached: dict[str, float] = {}  # seconds from the push to each peak (printed with -s)
        deadline = t0 + 300
        while True:
            status = _status()
            most_workers = max(most_workers, _workers(status))
            most_replicas = max(most_replicas, _replicas())
            for key, hit in (("3 workers", most_workers == 3), ("2 replicas", most_replicas == 2)):
                if hit:
                    reached.setdefault(key, time.monotonic() - t0)
            states = {i: queue.state(i) or {} for i in ids}
            if all(s.get("state") in FINAL_STATES for s in states.values()):
                break
            assert time.monotonic() < deadline, json.dumps(states)[:2000]
            time.sleep(0.5)
        assert most_workers == 3  # one per waiting job, up to the bound
        assert most_replicas == 2
        assert {s["state"] for s in states.values()} == {"done"}, states
        n_clips = int(SECONDS / CLIP_S)
        for job_id in ids:
            verdicts = client.hgetall(f"autoscale:job:{job_id}:clips")
            assert sorted(int(k) for k in verdicts) == list(range(n_clips)), job_id
        entries = [(f["job_id"], f["clip_index"]) for _, f in client.xrange("autoscale:verdicts")]
        assert len(entries) == len(set(entries)) == JOBS * n_clips  # drained workers lost nothing

        # Queue empty: workers drain back to the minimum, Serve takes the extra replica away.
        reached["all jobs done"] = time.monotonic() - t0
        deadline = time.monotonic() + 120
        while not (len(_status()["workers"]) == 1 and _replicas() == 1):
            assert time.monotonic() < deadline, (_status()["workers"], _replicas())
            time.sleep(1.0)
        reached["back to 1 worker and 1 replica"] = time.monotonic() - t0
        print("autoscale burst:", {k: round(v, 1) for k, v in reached.items()})
    finally:
        serve.delete(APP)
