"""Idempotent verdict storage against a real redis-server."""
from __future__ import annotations

import json
import time

import pytest
import redis

from pel_model.config import RedisConfig
from workers.verdicts import InvalidVerdict, VerdictStore


def verdict(job_id: str = "job1", clip: int = 0, prob: float | None = 0.9,
            label: str = "fake") -> dict:
    return {
        "job_id": job_id, "url": "https://u:pw@cdn/x.m3u8?token=t&q=1", "clip_index": clip,
        "start_s": clip * 10.0, "end_s": clip * 10.0 + 10.0, "frames_sampled": 20,
        "faces_scored": 18, "fake_probability": prob, "label": label, "threshold": 0.5,
        "model": "pel-b4", "top_frames": [{"t": 1.5, "p": 0.97}], "latency_s": 0.8,
        "warnings": [],
    }


def test_write_is_idempotent_and_latest_wins(redis_client):
    store = VerdictStore(redis_client, RedisConfig(prefix="t"))
    assert store.write(verdict(prob=0.9)) is True
    assert store.write(verdict(prob=0.2, label="real")) is False
    assert redis_client.xlen("t:verdicts") == 1
    assert redis_client.hlen("t:job:job1:clips") == 1
    [stored] = store.clips("job1")
    assert stored["fake_probability"] == 0.2 and stored["label"] == "real"
    assert stored["url"] == "https://cdn/x.m3u8?token=REDACTED&q=1"
    [entry] = store.recent(10)
    assert entry["fake_probability"] == 0.9  # the stream keeps the first occurrence
    [(_, fields)] = redis_client.xrange("t:verdicts")
    assert (fields["job_id"], fields["clip_index"], fields["label"]) == ("job1", "0", "fake")


def test_clips_sorted_and_recent_newest_first(redis_client):
    store = VerdictStore(redis_client, RedisConfig(prefix="t"))
    for clip in (10, 2, 1):
        store.write(verdict(clip=clip))
    store.write(verdict(job_id="other", clip=0, prob=None, label="no_face"))
    assert [v["clip_index"] for v in store.clips("job1")] == [1, 2, 10]
    assert [(v["job_id"], v["clip_index"]) for v in store.recent(2)] == [("other", 0), ("job1", 1)]
    assert store.clips("missing") == []


@pytest.mark.parametrize("change, reason", [
    ({"label": "maybe"}, "label"),
    ({"clip_index": -1}, "clip_index"),
    ({"clip_index": True}, "clip_index"),
    ({"fake_probability": 1.5}, "fake_probability"),
    ({"fake_probability": float("nan")}, "fake_probability"),
    ({"fake_probability": None}, "needs a fake_probability"),
    ({"job_id": ""}, "job_id"),
    ({"warnings": {1, 2}}, "JSON"),
])
def test_invalid_verdicts_rejected(redis_client, change, reason):
    store = VerdictStore(redis_client, RedisConfig(prefix="t"))
    with pytest.raises(InvalidVerdict, match=reason):
        store.write({**verdict(), **change})
    assert redis_client.keys("t:*") == []


def test_missing_key_rejected(redis_client):
    bad = verdict()
    del bad["end_s"]
    with pytest.raises(InvalidVerdict, match="end_s"):
        VerdictStore(redis_client, RedisConfig(prefix="t")).write(bad)


def test_stream_trimmed_roughly_to_maxlen(redis_client):
    store = VerdictStore(redis_client, RedisConfig(prefix="t", verdict_stream_maxlen=100))
    for clip in range(450):
        store.write(verdict(clip=clip))
    assert 100 <= redis_client.xlen("t:verdicts") <= 250
    assert redis_client.hlen("t:job:job1:clips") == 450
    assert store.recent(1)[0]["clip_index"] == 449


def test_publish_only_new_verdicts(redis_client, redis_url):
    listener = redis.Redis.from_url(redis_url)  # bytes client on purpose
    pubsub = listener.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("t:verdicts")
    deadline = time.monotonic() + 2
    while redis_client.pubsub_numsub("t:verdicts")[0][1] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    store = VerdictStore(redis_client, RedisConfig(prefix="t"))
    quiet = VerdictStore(listener, RedisConfig(prefix="t", publish_verdicts=False))
    store.write(verdict(clip=0))
    store.write(verdict(clip=0, prob=0.1, label="real"))  # replacement: not published
    store.write(verdict(clip=1))
    assert quiet.write(verdict(clip=2)) is True  # bytes client, publishing off
    got = []
    deadline = time.monotonic() + 1
    while time.monotonic() < deadline and len(got) < 3:
        msg = pubsub.get_message(timeout=0.1)
        if msg:
            got.append(json.loads(msg["data"]))
    assert [v["clip_index"] for v in got] == [0, 1]
    assert got[0]["label"] == "fake"
    assert [v["clip_index"] for v in quiet.clips("job1")] == [0, 1, 2]
    pubsub.close()
    listener.close()
