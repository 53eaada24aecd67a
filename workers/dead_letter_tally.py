"""Every dead letter counted once for `pel_dead_letters_total{reason}`, whatever wrote it (a
stream worker, a claim of an expired lease, the intake's JSON check).

The Moderator reads the dead-letter stream from where it last stopped. It starts after the
entries that already exist when it starts (they were counted by the process that came
before, or are history), so a restart neither re-counts nor misses what arrives later.
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
    def __init__(self, client: redis.Redis, key: str, batch: int = 1000):
        self.r, self.key, self.batch = client, key, batch
        self.seen: Optional[str] = None
        try:
            self._start()
        except redis.RedisError:  # Redis not up yet: start at the first poll instead
            pass

    def _start(self) -> None:
        last = self.r.xrevrange(self.key, count=1)
        self.seen = _text(last[0][0]) if last else "0-0"

    def new_reasons(self) -> list[str]:
        """Labels of the entries written since the last call (or since the tally started)."""
        if self.seen is None:
            self._start()
            return []
        labels: list[str] = []
        while True:
            rows = self.r.xread({self.key: self.seen}, count=self.batch)
            entries = rows[0][1] if rows else []
            for entry_id, fields in entries:
                self.seen = _text(entry_id)
                labels.append(reason_label({_text(k): _text(v) for k, v in fields.items()}))
            if len(entries) < self.batch:
                return labels


def _text(v) -> str:
    return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
