"""Every dead letter counted once for `pel_dead_letters_total{reason}`, whatever wrote it (a
stream worker, a claim of an expired lease, the intake's JSON check).

The Moderator reads the dead-letter stream from a cursor kept in Redis (`P:deadletter:counted`),
so the dead letters written while it was down or restarting are counted by the next one. The
first Moderator ever starts after the entries that exist (history, not news). A crash between
counting and saving the cursor counts those entries again, in a fresh process whose counters
start from zero anyway.
"""
from __future__ import annotations

from typing import Optional

import redis


def reason_label(fields: dict[str, str]) -> str:
    """The metric's `reason` label of one dead-letter entry."""
    reason = fields.get("reason", "")
    if "lease expired" in reason:
        return "lease_expired"
    if reason.startswith("duplicate job id"):
        return "duplicate_id"
    return "invalid_job" if "raw" in fields else "failed"


class DeadLetterTally:
    def __init__(self, client: redis.Redis, key: str, cursor_key: str, batch: int = 1000):
        self.r, self.key, self.cursor_key, self.batch = client, key, cursor_key, batch
        self.seen: Optional[str] = None
        try:
            self._start()
        except redis.RedisError:  # Redis not up yet: start at the first poll instead
            pass

    def _start(self) -> None:
        saved = self.r.get(self.cursor_key)
        if saved is not None:
            self.seen = _text(saved)
            return
        last = self.r.xrevrange(self.key, count=1)
        self.seen = _text(last[0][0]) if last else "0-0"
        self.r.set(self.cursor_key, self.seen)

    def new_reasons(self) -> list[str]:
        """Labels of the entries written since the cursor; moves the cursor past them."""
        if self.seen is None:
            self._start()
        labels: list[str] = []
        while True:
            rows = self.r.xread({self.key: self.seen}, count=self.batch)
            entries = rows[0][1] if rows else []
            for entry_id, fields in entries:
                self.seen = _text(entry_id)
                labels.append(reason_label({_text(k): _text(v) for k, v in fields.items()}))
            if entries:
                self.r.set(self.cursor_key, self.seen)
            if len(entries) < self.batch:
                return labels


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
