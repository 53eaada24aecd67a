"""End to end: the application built from deploy/app.yaml on a real local Ray cluster, a real
redis-server, real encoded videos served over HTTP and HLS from a local server."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import redis
from ray import serve

from model_utils import SMALL
from media import (astronaut, corrupt_copy, free_port, make_face_video, make_hls, rtmp_server,
                   serve_directory, stop_process)
from workers.app import build_app
from workers.cli import DEFAULT_CONFIG, FINAL_STATES, load_config
from workers.queue import JobQueue
from workers.verdicts import VerdictStore

pytestmark = pytest.mark.slow
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    make_face_video(root / "face.mp4", [astronaut()], seconds=5.0)
    make_face_video(root / "long.mp4", [astronaut()], seconds=24.0)
    make_hls(root / "face.mp4", root / "hls", segment_s=1.0)
    corrupt_copy(root / "face.mp4", root / "corrupt.mp4")
    with serve_directory(root) as base:
        yield {"root": root, "base": base}


@pytest.fixture(scope="module")
def service(ray_cluster, redis_url, media, service_checkpoint):
    # a random network marked trained: these tests are about the plumbing, and real/fake
    # labels are what a trained model's verdicts carry (untrained ones say "untrained")
    ckpt, art = service_checkpoint
    base = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    base["redis"].update(url=redis_url, prefix="e2e")
    base["intake"].update(lease_seconds=3.0, max_attempts=2, stream_workers=2,
                          streams_per_worker=2, poll_block_ms=200)
    base["stream"].update(clip_seconds=2.0, open_timeout_s=3.0, read_timeout_s=3.0,
                          stall_timeout_s=5.0, max_reconnects=4, backoff_initial_s=0.5,
                          backoff_max_s=2.0)
    base["urls"].update(allow_private_addresses=True,
                        file_roots=[str(media["root"]), str(SHARED / "videos")])
    base["detector"].update(checkpoint=str(ckpt), model=SMALL.model_dump(mode="json"),
                            artifacts_dir=str(art), max_batch_size=16)
    serve.run(build_app(base), name="pel", route_prefix="/pel")
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    from pel_model.config import AppConfig
    app_cfg = AppConfig.model_validate(base)
    queue = JobQueue(client, app_cfg.redis, app_cfg.intake, "test")
    yield {"queue": queue, "store": VerdictStore(client, app_cfg.redis), "redis": client,
           "cfg": app_cfg, "args": base}
    serve.delete("pel")


def wait_jobs(queue: JobQueue, ids: list[str], timeout: float = 240.0) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        states = {i: queue.state(i) or {} for i in ids}
        if all(s.get("state") in FINAL_STATES for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"jobs did not finish: {json.dumps(states, default=str)[:2000]}")


def _sum_by(url: str, metric: str, label: str) -> dict[str, float]:
    from prom import load_checker
    rows = load_checker().query(url, f"sum by ({label}) ({metric})")
    return {r["metric"][label]: float(r["value"][1]) for r in rows}


def _clips_by_label(url: str) -> dict[str, float]:
    return _sum_by(url, "ray_pel_clips_total", "label")


def _increase(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    return {k: round(v - before.get(k, 0)) for k, v in after.items() if round(v - before.get(k, 0))}


def test_prometheus_answers_every_dashboard_query_and_counts_match_redis(
        service, media, ray_cluster, tmp_path):
    """A real Prometheus scraping the running application (this test runs first in the module,
    so no process that recorded verdicts has died)."""
    from prom import DASHBOARD, load_checker, running_prometheus
    q, store = service["queue"], service["store"]
    with running_prometheus(tmp_path, ray_cluster["metrics_port"]) as url:
        deadline = time.time() + 30
        while not load_checker().query(url, "sum(ray_pel_stream_errors_total)"):
            assert time.time() < deadline, "no app series scraped"
            time.sleep(1)
        time.sleep(3)
        before = _clips_by_label(url)
        dead_before = _sum_by(url, "ray_pel_dead_letters_total", "reason")
        ids = [q.push(f"{media['base']}/face.mp4"), q.push(f"{media['base']}/hls/index.m3u8"),
               q.push("file:///nonexistent/outside-roots.mp4")]
        service["redis"].lpush("e2e:jobs", "{not json")
        wait_jobs(q, ids)
        redis_counts: dict[str, int] = {}
        for job_id in ids:
            for clip in store.clips(job_id):
                redis_counts[clip["label"]] = redis_counts.get(clip["label"], 0) + 1
        assert sum(redis_counts.values()) == 6
        deadline = time.time() + 30
        while True:
            after = _clips_by_label(url)
            delta = {k: round(after.get(k, 0) - before.get(k, 0)) for k in after}
            if {k: v for k, v in delta.items() if v} == redis_counts or time.time() > deadline:
                break
            time.sleep(1)
        assert {k: v for k, v in delta.items() if v} == redis_counts
        # dead letters as the Moderator counts them: the rejected URL and the bad JSON
        deadline = time.time() + 30
        while (dead := _increase(dead_before, _sum_by(url, "ray_pel_dead_letters_total",
                                                      "reason"))) != {"failed": 1, "invalid_job": 1}:
            assert time.time() < deadline, dead
            time.sleep(1)
        # The status endpoint says where to scrape: the port this Prometheus scrapes is listed.
        status = serve.get_app_handle("pel").status.remote().result(timeout_s=30)
        # Every stream worker exports its counters from zero (preregistered), so rate() and
        # increase() see a worker's first redelivery or stream error.
        for w in status["workers"]:
            sel = f'WorkerId="{w["worker_id"]}"'
            for metric in ("ray_pel_job_redeliveries_total", "ray_pel_stream_errors_total"):
                assert load_checker().query(url, f"{metric}{{{sel}}}"), (metric, w)
        assert any(e.endswith(f":{ray_cluster['metrics_port']}")
                   for e in status["metrics_endpoints"]), status["metrics_endpoints"]
        report = load_checker().check_dashboard(DASHBOARD, url, wait_s=30)
        assert report.ok, "\n".join(r.describe() for r in report.failed) + str(report.empty_variables)


def test_jobs_over_http_hls_and_file_yield_clips_with_faces(service, media):
    q, store = service["queue"], service["store"]
    ids = [q.push(f"{media['base']}/face.mp4"),
           q.push({"url": f"{media['base']}/hls/index.m3u8", "id": "hls-job"}),
           q.push(f"file://{media['root'] / 'face.mp4'}")]
    states = wait_jobs(q, ids)
    for job_id in ids:
        assert states[job_id]["state"] == "done", states[job_id]
        clips = store.clips(job_id)
        assert [c["clip_index"] for c in clips] == [0, 1, 2]  # 5 s in 2 s clips
        assert clips[-1]["end_s"] == pytest.approx(5.0, abs=0.6)
        for c in clips:
            assert c["faces_scored"] >= c["frames_sampled"] >= 2, c  # a face in every frame
            assert c["label"] in ("real", "fake") and 0 <= c["fake_probability"] <= 1
            assert c["model"].startswith("pel-efficientnet_b0-224@")
            assert not any("never trained" in w for w in c["warnings"])  # trained=True
            box = c["top_frames"][0]["box"]
            assert 150 < (box[0] + box[2]) / 2 < 500 and box[2] - box[0] > 40
        assert states[job_id]["clips_done"] == 3 and states[job_id]["faces_scored"] >= 10


def test_stream_worker_processes_start_with_the_configured_mmap_threshold(service):
    from workers.stream_worker import worker_runtime_env
    want = str(service["cfg"].intake.worker_malloc_mmap_threshold)
    workers = serve.get_app_handle("pel").status.remote().result(timeout_s=30)["workers"]
    pids = [w["pid"] for w in workers if "pid" in w]
    assert len(pids) == service["cfg"].intake.stream_workers >= 2, workers
    for pid in pids:  # glibc reads it from the environment the process started with
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"MALLOC_MMAP_THRESHOLD_={want}".encode() in env, pid
    off = service["cfg"].intake.model_copy(update={"worker_malloc_mmap_threshold": None})
    assert worker_runtime_env(off) == {}


def test_bad_jobs_end_as_dead_letters_while_others_finish(service, media):
    q = service["queue"]
    port = free_port()  # nothing listens there
    bad = {
        "corrupt": q.push(f"{media['base']}/corrupt.mp4"),
        "unreachable": q.push(f"http://127.0.0.1:{port}/none.mp4"),
        "rejected": q.push("file:///etc/passwd"),
    }
    service["redis"].lpush("e2e:jobs", "{not json")
    good = q.push(f"{media['base']}/face.mp4")
    states = wait_jobs(q, [good, *bad.values()])
    assert states[good]["state"] == "done"
    letters = {d["job_id"]: d for d in q.dead_letters(50)}
    for reason, job_id in bad.items():
        assert states[job_id]["state"] == "failed"
        assert reason in letters[job_id]["reason"], letters[job_id]
    assert letters[bad["unreachable"]]["attempts"] == 2  # retried, then given up
    assert any("JSON" in d["reason"] or "json" in d["reason"] for d in letters.values())
    # the workers survived: a new job still completes
    again = q.push(f"{media['base']}/face.mp4")
    assert wait_jobs(q, [again])[again]["state"] == "done"


def push_long_job_and_wait_for_first_clip(q: JobQueue, media) -> str:
    job_id = q.push({"url": f"{media['base']}/long.mp4", "options": {"sample_fps": 6}})
    deadline = time.time() + 60
    while (q.state(job_id) or {}).get("clips_done", 0) < 1:
        assert time.time() < deadline, q.state(job_id)
        time.sleep(0.2)
    return job_id


def test_worker_killed_mid_stream_does_not_lose_its_job(service, media):
    q, store = service["queue"], service["store"]
    job_id = push_long_job_and_wait_for_first_clip(q, media)
    holder = q.state(job_id)["consumer"]  # host:pid:tag:random
    os.kill(int(holder.split(":")[1]), signal.SIGKILL)  # Ray restarts the actor; the job must survive
    state = wait_jobs(q, [job_id])[job_id]
    assert state["state"] == "done" and state["attempts"] == 2
    clips = store.clips(job_id)
    assert [c["clip_index"] for c in clips] == list(range(12))  # 24 s in 2 s clips, no gaps
    entries = service["redis"].xrange("e2e:verdicts")
    per_clip = [(e[1]["job_id"], e[1]["clip_index"]) for e in entries if e[1]["job_id"] == job_id]
    assert len(per_clip) == len(set(per_clip)) == 12  # replayed clips overwrote, never duplicated


def test_job_survives_the_death_of_the_whole_application(service, media):
    q, store = service["queue"], service["store"]
    job_id = push_long_job_and_wait_for_first_clip(q, media)
    serve.delete("pel")  # every replica and stream worker is gone, the job is still pending
    assert q.state(job_id)["state"] == "running"
    serve.run(build_app(service["args"]), name="pel", route_prefix="/pel")
    state = wait_jobs(q, [job_id])[job_id]
    assert state["state"] == "done" and state["attempts"] == 2
    assert [c["clip_index"] for c in store.clips(job_id)] == list(range(12))


def test_live_rtmp_source_that_drops_and_comes_back_is_reconnected(service, media):
    q, store = service["queue"], service["store"]
    port = free_port()
    src = media["root"] / "face.mp4"
    server = rtmp_server(src, port)
    job_id = q.push({"url": f"rtmp://127.0.0.1:{port}/live/s", "options": {"live": True}})

    def clips_done() -> int:
        return int((q.state(job_id) or {}).get("clips_done", 0))

    def wait_clips(n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while clips_done() < n:
            assert time.time() < deadline, q.state(job_id)
            time.sleep(0.2)

    try:
        wait_clips(2)
        stop_process(server)  # the publisher drops ...
        server = rtmp_server(src, port)  # ... and comes back
        before = clips_done()
        wait_clips(before + 3)
        assert q.state(job_id)["state"] == "running" and q.state(job_id)["attempts"] == 1
        decoded = clips_done()
    finally:
        stop_process(server)  # gone for good: the broadcast is over
    state = wait_jobs(q, [job_id], timeout=120)[job_id]
    # The live stream ended: the job is done (not retried, not a dead letter), and the frames
    # decoded since the last full clip still got a verdict that says the stream broke off.
    assert state["state"] == "done" and state["attempts"] == 1, state
    assert "the live stream ended" in state["ended"] and "no frame for" in state["ended"]
    assert not any(d["job_id"] == job_id for d in q.dead_letters(50))
    clips = store.clips(job_id)
    assert [c["clip_index"] for c in clips] == list(range(len(clips)))  # media time kept going
    assert len(clips) > decoded >= 5 and all(c["faces_scored"] > 0 for c in clips[:-1])
    assert any("broke off" in w for w in clips[-1]["warnings"]), clips[-1]


@pytest.mark.skipif(not (SHARED / "videos").is_dir(), reason="needs ../shared/data")
def test_shared_dfdc_clips_have_faces_found(service):
    q, store = service["queue"], service["store"]
    ids = [q.push({"url": f"file://{p}", "options": {"clip_seconds": 10, "sample_fps": 1}})
           for p in sorted((SHARED / "videos").glob("*.mp4"))]
    states = wait_jobs(q, ids, timeout=400)
    for job_id in ids:
        assert states[job_id]["state"] == "done", states[job_id]
        clips = store.clips(job_id)
        assert clips and all(c["faces_scored"] >= c["frames_sampled"] * 0.8 for c in clips), clips
