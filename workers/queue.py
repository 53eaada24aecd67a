"""At-least-once job intake on Redis: list -> stream -> consumer group, leases, dead letters.

Keys (``P`` = `RedisConfig.prefix`, default ``pel``; use ``{pel}`` on Redis Cluster):

* ``P:jobs``          LIST users LPUSH onto (see `workers.jobs` for the payload forms).
* ``P:jobs:stream``   STREAM the jobs are moved into by an atomic Lua script (RPOP + XADD in one
                      step, so nothing is lost), read by consumer group ``P:workers``.
* ``P:job:<id>``      HASH job state: state (queued/running/done/partial/cancelled/failed),
                      attempts, url (redacted), consumer, created/started/updated/finished
                      (unix seconds), clips_done, media_seconds, frames_sampled, faces_scored
                      (never decrease), clips_failed, error, ended (how a live stream
                      ended), entry_id, cancel_requested, retry_at (queued again after a
                      failed attempt: not before this time).
* ``P:jobs:active``   ZSET of queued/running job ids (score: time first seen).
* ``P:deadletter``    STREAM of jobs given up on: job_id, url (redacted), reason, attempts,
                      time, entry_id, consumer, raw (redacted payload, invalid jobs only).
* ``P:deadletter:counted`` STRING: the last dead letter the metrics counted (the Moderator's
                      cursor, `workers.dead_letter_tally`).

Semantics: a claimed job is pending on its stream entry. A worker renews its lease with
`JobQueue.keepalive` (the `Lease` thread does it every ``lease_seconds / 3``); an entry idle for
``lease_seconds`` (its worker died) is taken over by the next `claim` via XAUTOCLAIM. Attempts
are the entry's delivery count; an explicit `fail` is redelivered after a backoff
(``retry_backoff_s``, doubling, at most a lease); after ``max_attempts`` failed attempts
(explicit `fail` or lease expiry) the job is dead-lettered and its state becomes ``failed``. Invalid payloads are
dead-lettered on first read. Writes from a worker that lost its lease are refused (fenced).
Resubmitting an existing job id starts a fresh state record for it.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

import redis

from pel_model.config import IntakeConfig, RedisConfig
from workers.jobs import InvalidJob, Job, JobOptions, parse_job, redact_text, redact_url
from workers.redis_client import bytes_twin

log = logging.getLogger(__name__)
T = TypeVar("T")

MOVE_BATCH = 100
POLL_SLICE_MS = 200
PROGRESS_FIELDS = {"clips_done": int, "media_seconds": float, "frames_sampled": int, "faces_scored": int}
_INT_FIELDS = {"attempts", "clips_done", "frames_sampled", "faces_scored", "clips_failed"}
_FLOAT_FIELDS = {"media_seconds", "created", "started", "updated", "finished", "time",
                 "retry_at", "cancel_requested"}
_ID_NAMESPACE = uuid.UUID("6f1c2f7e-5a2b-4c1e-9d0a-3f1b8e2c7a55")

# RPOP (oldest first, users LPUSH) + XADD in one atomic step. Returns [entry, raw, entry, raw...].
_MOVE = """
local out = {}
for i = 1, tonumber(ARGV[1]) do
  local raw = redis.call('RPOP', KEYS[1])
  if not raw then break end
  out[#out + 1] = redis.call('XADD', KEYS[2], '*', 'raw', raw)
  out[#out + 1] = raw
end
return out
"""
# State "queued" for a freshly moved entry, unless a consumer already took it (same entry id).
# entry_id == '' means "pushed by JobQueue.push, not moved yet": keep its created time.
_MARK_QUEUED = """
local cur = redis.call('HGET', KEYS[1], 'entry_id')
if cur == ARGV[1] then return 0 end
local state = redis.call('HGET', KEYS[1], 'state')
if cur and cur ~= '' and (state == 'queued' or state == 'running')
   and #redis.call('XRANGE', KEYS[3], cur, cur) > 0 then return 2 end
if cur ~= '' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'created', ARGV[3])
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'entry_id', ARGV[1], 'url', ARGV[2],
           'attempts', '0', 'updated', ARGV[3])
redis.call('ZADD', KEYS[2], 'NX', ARGV[3], ARGV[4])
return 1
"""
_OWNER = """
local function owner(stream, group, entry)
  local p = redis.call('XPENDING', stream, group, entry, entry, 1)
  if #p == 0 then return nil end
  return p[1][2]
end
"""
# Renew the lease (reset idle time, no delivery-count increment) only if we still own it.
_KEEPALIVE = _OWNER + """
if owner(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'JUSTID')
if redis.call('HGET', KEYS[2], 'entry_id') == ARGV[3] then
  redis.call('HSET', KEYS[2], 'updated', ARGV[4])
end
return 1
"""
# Counters never go down: a redelivered job starts counting again from its first clip, and
# the record keeps the furthest progress any attempt made.
_PROGRESS = """
if redis.call('HGET', KEYS[1], 'entry_id') ~= ARGV[1]
   or redis.call('HGET', KEYS[1], 'consumer') ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'updated', ARGV[3])
for i = 4, #ARGV, 2 do
  local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > cur then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
"""
# Another delivery of the same job id is still queued or running (its entry is in the stream).
_DUPLICATE = """
local state = redis.call('HGET', KEYS[1], 'state')
local cur = redis.call('HGET', KEYS[1], 'entry_id')
if (state ~= 'queued' and state ~= 'running') or not cur or cur == '' or cur == ARGV[1] then
  return 0 end
if #redis.call('XRANGE', KEYS[2], cur, cur) == 0 then return 0 end
return 1
"""
# Failed attempt that may be retried: keep it pending but make it look idle for a whole lease,
# so the next claim() anywhere takes it over at once (XAUTOCLAIM then counts the new delivery).
_RETRY = _OWNER + """
if owner(KEYS[1], ARGV[1], ARGV[3]) ~= ARGV[2] then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[3], 'IDLE', ARGV[4], 'JUSTID')
if redis.call('HGET', KEYS[2], 'entry_id') == ARGV[3] then
  redis.call('HSET', KEYS[2], 'state', 'queued', 'error', ARGV[6], 'updated', ARGV[5],
             'retry_at', ARGV[7])
end
return 1
"""
# Ack + delete the entry, set the final state, optionally XADD a dead letter: all or nothing.
# ARGV: group, consumer, entry, require_owner, state, now, error, job_id, attempts, dl pairs...
_FINISH = _OWNER + """
local who = owner(KEYS[1], ARGV[1], ARGV[3])
if not who or (ARGV[4] == '1' and who ~= ARGV[2]) then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if redis.call('HGET', KEYS[2], 'entry_id') == ARGV[3] then
  redis.call('HSET', KEYS[2], 'state', ARGV[5], 'finished', ARGV[6], 'updated', ARGV[6],
             'attempts', ARGV[9])
  if ARGV[7] == '' then redis.call('HDEL', KEYS[2], 'error')
  else redis.call('HSET', KEYS[2], 'error', ARGV[7]) end
  redis.call('ZREM', KEYS[3], ARGV[8])
end
if #ARGV > 9 then redis.call('XADD', KEYS[4], '*', unpack(ARGV, 10)) end
return 1
"""


def _s(value: Any) -> Any:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def consumer_name(tag: str = "") -> str:
    """A unique consumer name, ``host:pid[:tag]:random``."""
    parts = [socket.gethostname(), str(os.getpid()), tag, uuid.uuid4().hex[:6]]
    return ":".join(p for p in parts if p)


@dataclass(frozen=True)
class QueueKeys:
    prefix: str

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:jobs:stream"

    @property
    def group(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def active(self) -> str:
        return f"{self.prefix}:jobs:active"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}:deadletter"

    @property
    def deadletter_counted(self) -> str:
        return f"{self.prefix}:deadletter:counted"

    def job(self, job_id: str) -> str:
        return f"{self.prefix}:job:{job_id}"


class JobQueue:
    """One consumer's view of the queue. Thread-safe as long as the redis client is."""

    def __init__(
        self, client: redis.Redis, cfg_redis: RedisConfig, cfg_intake: IntakeConfig, consumer: str
    ):
        if not consumer:
            raise ValueError("consumer name must be non-empty")
        self.r = bytes_twin(client)
        self.cfg = cfg_intake
        self.keys = QueueKeys(cfg_redis.prefix)
        self.consumer = consumer
        self.lease_ms = max(1, int(cfg_intake.lease_seconds * 1000))
        self._move = self.r.register_script(_MOVE)
        self._mark_queued = self.r.register_script(_MARK_QUEUED)
        self._keepalive = self.r.register_script(_KEEPALIVE)
        self._progress = self.r.register_script(_PROGRESS)
        self._retry = self.r.register_script(_RETRY)
        self._finish = self.r.register_script(_FINISH)
        self._duplicate = self.r.register_script(_DUPLICATE)
        self._ensure_group()

    # ---- setup -----------------------------------------------------------------------------
    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _grouped(self, fn: Callable[[], T]) -> T:
        """Run fn, recreating the consumer group once if it vanished (e.g. FLUSHALL)."""
        try:
            return fn()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group()
            return fn()

    def job_id_for_entry(self, entry_id: str) -> str:
        """The stable id of a job pushed without one (same on every redelivery)."""
        return uuid.uuid5(_ID_NAMESPACE, f"{self.keys.stream}/{entry_id}").hex

    # ---- producer side ---------------------------------------------------------------------
    def push(self, job: str | dict | Job) -> str:
        """LPUSH a validated job (URL, JSON text, dict or Job); returns its id. Raises InvalidJob."""
        if isinstance(job, dict):
            job = parse_job(json.dumps(job))
        elif isinstance(job, Job):
            job = parse_job(job.to_json())  # validate hand-made Jobs too
        else:
            job = parse_job(job)
        now = str(time.time())
        key = self.keys.job(job.id)
        if _s(self.r.hget(key, "state")) in ("queued", "running"):
            raise InvalidJob(f"job id {job.id!r} is already queued or running", job.id)
        pipe = self.r.pipeline(transaction=True)
        pipe.delete(key)
        pipe.hset(key, mapping={"state": "queued", "entry_id": "", "url": redact_url(job.url),
                                "attempts": 0, "created": now, "updated": now})
        pipe.zadd(self.keys.active, {job.id: float(now)})
        pipe.lpush(self.keys.jobs, job.to_json())
        pipe.execute()
        return job.id

    # ---- consumer side ---------------------------------------------------------------------
    def claim(self, block_ms: Optional[int] = None) -> Optional[Job]:
        """Next job for this consumer, or None after `block_ms` (default `poll_block_ms`).

        Order: move the list into the stream, take over an expired lease (dead-lettering jobs
        past max_attempts), then read a new entry. Invalid payloads are dead-lettered on the
        way and never returned.
        """
        block_ms = self.cfg.poll_block_ms if block_ms is None else block_ms
        deadline = time.monotonic() + max(0, block_ms) / 1000
        while True:
            self.move_pending_jobs()
            job = self._grouped(self._reclaim)
            if job is not None:
                return job
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            wait = min(remaining_ms, POLL_SLICE_MS) if remaining_ms > 0 else None
            job = self._grouped(lambda: self._read_new(wait))
            if job is not None:
                return job
            if time.monotonic() >= deadline:
                return None

    def move_pending_jobs(self) -> int:
        """Move everything on the list into the stream (atomically per batch); returns count."""
        moved = 0
        while True:
            flat = self._move(keys=[self.keys.jobs, self.keys.stream], args=[MOVE_BATCH])
            now = str(time.time())
            for entry_id, raw in zip(flat[::2], flat[1::2]):
                entry_id = _s(entry_id)
                try:
                    job = parse_job(raw, default_id=self.job_id_for_entry(entry_id))
                except InvalidJob:
                    continue  # dead-lettered by whoever reads it
                self._mark_queued(
                    keys=[self.keys.job(job.id), self.keys.active, self.keys.stream],
                    args=[entry_id, redact_url(job.url), now, job.id],
                )
            moved += len(flat) // 2
            if len(flat) // 2 < MOVE_BATCH:
                return moved

    def _read_new(self, block_ms: Optional[int]) -> Optional[Job]:
        """Read new entries until a valid job (invalid ones are dead-lettered) or none left."""
        while True:
            reply = self.r.xreadgroup(
                self.keys.group, self.consumer, {self.keys.stream: ">"}, count=1, block=block_ms
            )
            entries = [e for _stream, batch in (reply or []) for e in batch]
            if not entries:
                return None
            for entry_id, fields in entries:
                job = self._accept(_s(entry_id), fields, attempts=1)
                if job is not None:
                    return job
            block_ms = None  # something was there: look again without waiting

    def _reclaim(self) -> Optional[Job]:
        """Take over the oldest entry idle for a whole lease (its worker stopped renewing)."""
        for _ in range(100):
            oldest = self.r.xpending_range(
                self.keys.stream, self.keys.group, "-", "+", 1, idle=self.lease_ms
            )
            if not oldest:
                return None
            # XAUTOCLAIM re-checks the idle time atomically, so two claimers cannot both win.
            # Redis 6.2 replies [cursor, entries]; 7.0+ adds a third element (deleted ids).
            reply = self.r.xautoclaim(
                self.keys.stream, self.keys.group, self.consumer, min_idle_time=self.lease_ms,
                start_id=_s(oldest[0]["message_id"]), count=1,
            )
            for entry_id, fields in reply[1]:
                if entry_id is None:  # 6.2: entry deleted while pending; nothing to run
                    continue
                entry_id = _s(entry_id)
                attempts = self._delivery_count(entry_id)
                if attempts > self.cfg.max_attempts:
                    self._give_up(entry_id, fields, attempts - 1)
                    continue
                job = self._accept(entry_id, fields, attempts)
                if job is not None:
                    return job
        return None

    def _delivery_count(self, entry_id: str) -> int:
        rows = self.r.xpending_range(self.keys.stream, self.keys.group, entry_id, entry_id, 1)
        return int(rows[0]["times_delivered"]) if rows else 1

    def _parse_entry(self, entry_id: str, fields: dict) -> Job:
        raw = {_s(k): v for k, v in (fields or {}).items()}.get("raw")
        if raw is None:
            raise InvalidJob("stream entry has no 'raw' field")
        return parse_job(raw, default_id=self.job_id_for_entry(entry_id))

    def _accept(self, entry_id: str, fields: dict, attempts: int) -> Optional[Job]:
        """Record a delivery as running; dead-letter it instead when the payload is invalid."""
        try:
            job = self._parse_entry(entry_id, fields)
        except InvalidJob as exc:
            job_id = exc.job_id or self.job_id_for_entry(entry_id)
            raw = _s({_s(k): v for k, v in (fields or {}).items()}.get("raw", b""))
            self._write_running(Job(job_id, "", JobOptions(), attempts, entry_id))
            self._dead_letter(job_id, entry_id, "", f"invalid job: {exc.reason}", attempts,
                              raw=redact_text(str(raw))[:2000])
            return None
        job.attempts, job.entry_id = attempts, entry_id
        if self._duplicate(keys=[self.keys.job(job.id), self.keys.stream], args=[entry_id]):
            self._dead_letter(job.id, entry_id, job.url, f"duplicate job id {job.id!r}: a job with "
                              "this id is already queued or running (push it again once it "
                              "has finished, or use another id)", attempts)
            return None
        if self.cancel_requested(job.id):
            self._write_running(job)
            self.finish(job, "cancelled", "cancelled before it started")
            return None
        self._write_running(job)
        return job

    def _write_running(self, job: Job) -> None:
        now = str(time.time())
        key = self.keys.job(job.id)
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(key, mapping={
            "state": "running", "entry_id": job.entry_id, "consumer": self.consumer,
            "attempts": job.attempts, "url": redact_url(job.url), "started": now,
            "updated": now,
        })
        for name in PROGRESS_FIELDS:  # kept across redeliveries (see _PROGRESS)
            pipe.hsetnx(key, name, 0)
        pipe.hsetnx(key, "created", now)
        pipe.hdel(key, "finished", "retry_at")
        pipe.zadd(self.keys.active, {job.id: float(now)}, nx=True)
        pipe.execute()

    def _give_up(self, entry_id: str, fields: dict, attempts: int) -> None:
        """Dead-letter an entry whose last attempt ended with an expired lease."""
        try:
            job = self._parse_entry(entry_id, fields)
        except InvalidJob:  # cannot happen for entries we accepted before; handle anyway
            self._accept(entry_id, fields, attempts)
            return
        prev = {_s(k): _s(v) for k, v in self.r.hgetall(self.keys.job(job.id)).items()}
        reason = (f"lease expired on attempt {attempts}/{self.cfg.max_attempts} "
                  f"(worker {prev.get('consumer', '?')} stopped renewing it)")
        if prev.get("error"):
            reason += f"; earlier error: {prev['error']}"
        job.attempts, job.entry_id = attempts, entry_id
        if prev.get("entry_id") != entry_id:  # mover/claimer crashed before recording it
            self._write_running(job)
        self._dead_letter(job.id, entry_id, job.url, reason, attempts)

    def _dead_letter(self, job_id: str, entry_id: str, url: str, reason: str, attempts: int,
                     raw: Optional[str] = None) -> bool:
        now = str(time.time())
        record = {"job_id": job_id, "url": redact_url(url), "reason": reason,
                  "attempts": str(attempts), "time": now, "entry_id": entry_id,
                  "consumer": self.consumer}
        if raw is not None:
            record["raw"] = raw
        flat = [x for pair in record.items() for x in pair]
        # A duplicate id's record belongs to the other delivery: the finish script only
        # touches a record whose entry_id is this entry's.
        done = self._run_finish(job_id, entry_id, "failed", reason, attempts, flat, owner=True)
        if done:
            log.warning("job %s dead-lettered after %d attempt(s): %s", job_id, attempts, reason)
        return done

    def _run_finish(self, job_id: str, entry_id: str, state: str, error: str, attempts: int,
                    dead_letter: list[str], owner: bool) -> bool:
        keys = [self.keys.stream, self.keys.job(job_id), self.keys.active, self.keys.deadletter]
        args = [self.keys.group, self.consumer, entry_id, "1" if owner else "0", state,
                str(time.time()), error, job_id, str(attempts), *dead_letter]
        return bool(self._grouped(lambda: self._finish(keys=keys, args=args)))

    # ---- running a job ---------------------------------------------------------------------
    def keepalive(self, job: Job) -> bool:
        """Renew the lease on `job`; False when another consumer took it over (stop working)."""
        entry = _claimed(job)
        return bool(self._grouped(lambda: self._keepalive(
            keys=[self.keys.stream, self.keys.job(job.id)],
            args=[self.keys.group, self.consumer, entry, str(time.time())],
        )))

    def progress(self, job: Job, **fields: float) -> bool:
        """Set progress counters (clips_done, media_seconds, frames_sampled, faces_scored)."""
        entry = _claimed(job)
        unknown = sorted(set(fields) - set(PROGRESS_FIELDS))
        if unknown:
            raise ValueError(f"unknown progress field(s): {', '.join(unknown)}")
        flat: list[str] = []
        for name, value in fields.items():
            flat += [name, str(PROGRESS_FIELDS[name](value))]
        return bool(self._progress(keys=[self.keys.job(job.id)],
                                   args=[entry, self.consumer, str(time.time()), *flat]))

    def complete(self, job: Job, clips_failed: int = 0, ended: str = "") -> bool:
        """Ack the job as done, or `partial` when some clips could not be scored (their
        verdicts say `error`); `ended` (how a live stream ended) goes in the record's `ended`
        field. False if it was no longer pending (finished elsewhere)."""
        if ended:
            self.r.hset(self.keys.job(job.id), "ended", ended)
        if clips_failed:
            self.r.hset(self.keys.job(job.id), "clips_failed", clips_failed)
            return self.finish(job, "partial", f"{clips_failed} clip(s) could not be scored")
        return self._run_finish(job.id, _claimed(job), "done", "", job.attempts, [], owner=False)

    def finish(self, job: Job, state: str, note: str) -> bool:
        """End a claimed job in a final state other than done/failed (`partial`, `cancelled`)."""
        return self._run_finish(job.id, _claimed(job), state, note, job.attempts, [], owner=False)

    def cancel(self, job_id: str) -> Optional[str]:
        """Ask for a job to stop (queued, running or live); returns its state, None if unknown.
        A running job stops within a lease renewal (`lease_seconds / 3`) and ends `cancelled`."""
        key = self.keys.job(job_id)
        state = _s(self.r.hget(key, "state"))
        if state is None:
            return None
        if state in ("queued", "running"):
            self.r.hset(key, "cancel_requested", str(time.time()))
        return state

    def cancel_requested(self, job_id: str) -> bool:
        return bool(self.r.hexists(self.keys.job(job_id), "cancel_requested"))

    def retry_delay_s(self, attempts: int) -> float:
        """How long a job waits before its next attempt after `attempts` failed ones:
        `retry_backoff_s` doubling per attempt, at most one lease."""
        return min(self.cfg.retry_backoff_s * 2 ** (attempts - 1), self.cfg.lease_seconds)

    def fail(self, job: Job, reason: str, retry: bool = True) -> bool:
        """Record a failed attempt. With `retry` and attempts left, any consumer may take it
        over after `retry_delay_s` (its entry is made to look idle for a lease less that
        delay, so the normal lease takeover redelivers it); otherwise dead-letter it now.
        False if we no longer held the lease."""
        entry = _claimed(job)
        if retry and job.attempts < self.cfg.max_attempts:
            delay_s = self.retry_delay_s(job.attempts)
            now = time.time()
            return bool(self._grouped(lambda: self._retry(
                keys=[self.keys.stream, self.keys.job(job.id)],
                args=[self.keys.group, self.consumer, entry,
                      max(0, self.lease_ms - int(delay_s * 1000)), str(now), reason,
                      str(now + delay_s)],
            )))
        if retry:
            reason = f"failed {job.attempts}/{self.cfg.max_attempts} attempts; last error: {reason}"
        return self._dead_letter(job.id, entry, job.url, reason, job.attempts)

    # ---- inspection ------------------------------------------------------------------------
    def state(self, job_id: str) -> Optional[dict[str, Any]]:
        """The job's state hash with numbers converted, or None for an unknown id."""
        raw = self.r.hgetall(self.keys.job(job_id))
        return _typed({_s(k): _s(v) for k, v in raw.items()}) if raw else None

    def active_jobs(self) -> list[str]:
        return [_s(x) for x in self.r.zrange(self.keys.active, 0, -1)]

    def dead_letters(self, count: int = 100) -> list[dict[str, Any]]:
        """Newest first: the dead-letter fields plus dl_id (the dead-letter stream entry id)."""
        rows = self.r.xrevrange(self.keys.deadletter, count=count)
        return [_typed({"dl_id": _s(i), **{_s(k): _s(v) for k, v in f.items()}}) for i, f in rows]

    def stats(self) -> dict[str, int]:
        """listed (on the list), undelivered and pending (in the stream), active, dead_letters."""
        pipe = self.r.pipeline(transaction=True)
        pipe.llen(self.keys.jobs)
        pipe.xlen(self.keys.stream)
        pipe.zcard(self.keys.active)
        pipe.xlen(self.keys.deadletter)
        pipe.xpending(self.keys.stream, self.keys.group)
        listed, in_stream, active, dead, pending = pipe.execute(raise_on_error=False)
        pending = int(pending["pending"]) if isinstance(pending, dict) else 0
        # Acked entries are deleted, so the stream holds only undelivered + pending ones.
        return {"listed": int(listed), "undelivered": max(0, int(in_stream) - pending),
                "pending": pending, "active": int(active), "dead_letters": int(dead)}

    def forget_consumer(self, consumer: str) -> bool:
        """Drop a retired worker's consumer from the group, only if it holds no pending job
        (XGROUP DELCONSUMER would drop those entries too)."""
        for c in self.r.xinfo_consumers(self.keys.stream, self.keys.group):
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            if name == consumer:
                if int(c["pending"]):
                    return False
                self.r.xgroup_delconsumer(self.keys.stream, self.keys.group, consumer)
                return True
        return False

    def queue_depth(self) -> int:
        """Jobs waiting for a worker: still on the list plus in the stream, never delivered."""
        s = self.stats()
        return s["listed"] + s["undelivered"]


def _claimed(job: Job) -> str:
    if not job.entry_id:
        raise ValueError(f"job {job.id} was not claimed from the queue (no entry_id)")
    return job.entry_id


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    for key, value in row.items():
        if value in (None, ""):
            continue
        if key in _INT_FIELDS:
            row[key] = int(float(value))
        elif key in _FLOAT_FIELDS:
            row[key] = float(value)
    return row


class Lease:
    """Keeps a claimed job's lease alive from a daemon thread every ``lease_seconds / 3``.

    ``with Lease(queue, job) as lease: ... if lease.lost: stop``. `lost` turns True when another
    consumer took the job over, `cancelled` when someone asked for the job to stop (`pel
    cancel`); either sets `stop_event`, as does `also` (e.g. the worker's shutdown) when set.
    Transient Redis errors are logged and retried.
    """

    def __init__(self, queue: JobQueue, job: Job, interval_s: Optional[float] = None,
                 stop_event: Optional[threading.Event] = None,
                 also: Optional[threading.Event] = None):
        self.queue = queue
        self.job = job
        self.interval_s = interval_s or queue.cfg.lease_seconds / 3
        self.stop_event = stop_event
        self.also = also
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._cancelled = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def start(self) -> "Lease":
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name=f"lease-{self.job.id}", daemon=True
            )
            self._thread.start()
        return self

    def _signal(self, flag: threading.Event) -> None:
        flag.set()
        if self.stop_event is not None:
            self.stop_event.set()

    def _run(self) -> None:
        tick = min(self.interval_s, 0.5)  # notice shutdown quickly; renew every interval_s
        last = time.monotonic()
        while not self._stop.wait(tick):
            if self.also is not None and self.also.is_set() and self.stop_event is not None:
                self.stop_event.set()
            if time.monotonic() - last < self.interval_s:
                continue
            last = time.monotonic()
            try:
                if not self.queue.keepalive(self.job):
                    log.warning("lease on job %s lost to another consumer", self.job.id)
                    self._signal(self._lost)
                    return
                if self.queue.cancel_requested(self.job.id):
                    log.info("job %s cancelled by request", self.job.id)
                    self._signal(self._cancelled)
                    return
            except redis.RedisError as exc:
                log.warning("keepalive for job %s failed (will retry): %s", self.job.id, exc)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "Lease":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
