"""Hostile inputs and faults against the running application (`pytest -m hostile`): the Serve
app on a real local Ray cluster, its own redis-server (append-only, restarted mid-job), real
encoded video over HTTP. Poison pills beside innocent jobs, a detector replica killed mid-job,
credentials in failing URLs, cancellation, Redis dying under a running job."""
from __future__ import annotations

import glob
import json
import time
from pathlib import Path

import pytest
import ray
import redis
from ray import serve

from media import astronaut, make_face_video, serve_directory
from model_utils import SMALL
from pel_model.config import AppConfig
from workers.app import build_app
from workers.cli import DEFAULT_CONFIG, FINAL_STATES, load_config
from workers.queue import JobQueue
from workers.redis_server import EmbeddedRedis
from workers.verdicts import VerdictStore

pytestmark = [pytest.mark.hostile, pytest.mark.slow, pytest.mark.timeout(600)]
SECRET = "hunter2-s3cret"
APP = "hostile"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-svc-media")
    make_face_video(root / "face.mp4", [astronaut()], seconds=4.0)
    make_face_video(root / "long.mp4", [astronaut()], seconds=24.0)
    with serve_directory(root) as base:
        yield {"root": root, "base": base}


@pytest.fixture(scope="module")
def app(ray_cluster, media, tmp_path_factory, service_checkpoint):
    data = tmp_path_factory.mktemp("hostile-redis")
    server = EmbeddedRedis(data_dir=data, appendonly=True).start()
    ckpt, art = service_checkpoint
    args = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    args["redis"].update(url=server.url, prefix="hx")
    args["intake"].update(lease_seconds=3.0, max_attempts=2, stream_workers=2,
                          streams_per_worker=2, poll_block_ms=200)
    args["stream"].update(clip_seconds=2.0, open_timeout_s=3.0, read_timeout_s=3.0,
                          stall_timeout_s=5.0, backoff_initial_s=0.5, backoff_max_s=2.0,
                          scoring_retry_s=90.0)
    args["urls"].update(allow_private_addresses=True, file_roots=[str(media["root"])])
    args["detector"].update(checkpoint=str(ckpt), model=SMALL.model_dump(mode="json"),
                            artifacts_dir=str(art), max_batch_size=16)
    serve.run(build_app(args), name=APP, route_prefix="/hostile")
    cfg = AppConfig.model_validate(args)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield {"server": server, "queue": JobQueue(client, cfg.redis, cfg.intake, "test"),
           "store": VerdictStore(client, cfg.redis), "redis": client}
    serve.delete(APP)
    client.close()
    server.close()


def wait_jobs(queue: JobQueue, ids: list[str], timeout: float = 240.0) -> dict[str, dict]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            states = {i: queue.state(i) or {} for i in ids}
        except redis.ConnectionError:  # Redis being restarted by a test
            time.sleep(0.5)
            continue
        if all(s.get("state") in FINAL_STATES for s in states.values()):
            return states
        time.sleep(0.5)
    raise AssertionError(f"jobs did not finish: {json.dumps(states, default=str)[:2000]}")


def wait_clips(queue: JobQueue, job_id: str, n: int, timeout: float = 240.0) -> None:
    deadline = time.time() + timeout
    while int((queue.state(job_id) or {}).get("clips_done", 0)) < n:
        assert time.time() < deadline, queue.state(job_id)
        time.sleep(0.2)


def workers_status() -> list[dict]:
    handle = serve.get_app_handle(APP)
    return handle.status.remote().result(timeout_s=30)["workers"]


def test_poison_pills_do_not_stop_the_fleet(app, media):
    q, r = app["queue"], app["redis"]
    before = {w["consumer"] for w in workers_status()}
    innocent = q.push(f"{media['base']}/long.mp4")
    wait_clips(q, innocent, 1)
    for raw in ("[" * 50_000, '{"id": "p1", "url": "http://a.b/", "options": '
                + "[" * 4000 + "]" * 4000 + "}", "\udcff".encode("utf-8", "surrogatepass")):
        r.lpush("hx:jobs", raw)
    state = wait_jobs(q, [innocent])[innocent]
    assert state["state"] == "done" and state["attempts"] == 1, json.dumps(state)
    assert [c["clip_index"] for c in app["store"].clips(innocent)] == list(range(12))
    reasons = [d["reason"] for d in q.dead_letters(20)]
    assert sum(x.startswith("invalid job") for x in reasons) == 3
    after = workers_status()
    assert {w["consumer"] for w in after} == before  # no worker was restarted
    assert all(w["threads_alive"] == 2 for w in after)


def test_killed_detector_replica_is_waited_for_not_turned_into_errors(app, media):
    q, store = app["queue"], app["store"]
    job_id = q.push(f"{media['base']}/long.mp4")
    wait_clips(q, job_id, 2)
    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "PELDetector" in a["name"] and APP in a["name"]]
    assert replicas, ray.util.list_named_actors(all_namespaces=True)
    for a in replicas:
        ray.kill(ray.get_actor(a["name"], namespace=a["namespace"]), no_restart=False)
    state = wait_jobs(q, [job_id], timeout=300)[job_id]
    clips = store.clips(job_id)
    assert [c["clip_index"] for c in clips] == list(range(12))
    errors = [c for c in clips if c["label"] == "error"]
    assert state["state"] == ("partial" if errors else "done"), state
    assert not errors, [c["warnings"] for c in errors]  # Serve restarted it within the budget
    for c in clips:  # nothing of Ray's internals in what users read
        assert not any("Actor" in w or "pid=" in w for w in c["warnings"]), c["warnings"]


def test_credentials_in_failing_urls_are_never_stored_or_logged(app, media):
    q, r = app["queue"], app["redis"]
    host = media["base"].split("//", 1)[1]
    ids = [q.push(f"http://admin:{SECRET}@{host}/missing.mp4?token={SECRET}&ch=1"),
           q.push(f"http://admin:{SECRET}@127.0.0.1:9/x.mp4?key={SECRET}")]
    states = wait_jobs(q, ids)
    assert all(s["state"] == "failed" for s in states.values()), states
    for key in r.scan_iter("hx:*"):
        kind = r.type(key)
        dump = {"hash": r.hgetall, "stream": lambda k: r.xrange(k), "list": lambda k: r.lrange(k, 0, -1),
                "zset": lambda k: r.zrange(k, 0, -1)}.get(kind, lambda k: "")(key)
        assert SECRET not in json.dumps(dump), key
    assert "admin" not in json.dumps(states)
    time.sleep(2)  # worker logs are flushed to Ray's session log files
    for path in glob.glob("/tmp/ray/session_latest/logs/worker-*"):
        assert SECRET not in Path(path).read_text(errors="replace"), path


def test_a_running_job_can_be_cancelled(app, media):
    q = app["queue"]
    job_id = q.push({"url": f"{media['base']}/long.mp4", "options": {"sample_fps": 1}})
    wait_clips(q, job_id, 1)
    assert q.cancel(job_id) == "running"
    state = wait_jobs(q, [job_id], timeout=60)[job_id]
    assert state["state"] == "cancelled" and state["clips_done"] < 12


def test_redis_restarted_mid_job_loses_nothing(app, media):
    q, store, server = app["queue"], app["store"], app["server"]
    job_id = q.push(f"{media['base']}/long.mp4")
    wait_clips(q, job_id, 2)
    server._terminate()  # redis-server gone (SIGTERM: it flushes its append-only file)
    time.sleep(2)
    server._spawn_and_wait()  # back on the same port with the same data
    state = wait_jobs(q, [job_id], timeout=300)[job_id]
    assert state["state"] in ("done", "partial"), state
    clips = store.clips(job_id)
    assert [c["clip_index"] for c in clips] == list(range(12))
    entries = [e for e in app["redis"].xrange("hx:verdicts") if e[1]["job_id"] == job_id]
    assert len(entries) == len({e[1]["clip_index"] for e in entries}) == 12  # no duplicates
    assert all(w.get("threads_alive") == 2 for w in workers_status())
