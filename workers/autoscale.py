"""Stream-worker autoscaling on the Redis queue.

Serve autoscales detector replicas on their requests in flight (`detector.autoscaling`), but it
knows nothing of a Redis queue, so the Moderator sizes its `StreamWorker` actors itself:

    wanted = ceil((jobs waiting + jobs running) / intake.streams_per_worker),
             clamped to [intake.stream_workers, intake.max_stream_workers]

It grows at once (a waiting job is a stream nobody watches) and shrinks only after `wanted` has
stayed below the current count for `intake.scale_down_delay_s`. Shrinking never interrupts a
stream: a worker told to drain claims no new job, finishes the ones it runs, and is removed
once idle.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from pel_model.config import IntakeConfig


@dataclass
class WorkerScaler:
    min_workers: int
    max_workers: int
    streams_per_worker: int
    scale_down_delay_s: float
    _low_since: Optional[float] = None

    @classmethod
    def from_config(cls, intake: IntakeConfig) -> Optional["WorkerScaler"]:
        """None when the worker count is fixed (no `max_stream_workers`)."""
        if intake.max_stream_workers is None:
            return None
        return cls(intake.stream_workers, intake.max_stream_workers, intake.streams_per_worker,
                   intake.scale_down_delay_s)

    def wanted(self, demand: int) -> int:
        """Workers that `demand` jobs (waiting + running) need, within the bounds."""
        need = math.ceil(max(0, demand) / self.streams_per_worker)
        return min(self.max_workers, max(self.min_workers, need))

    def target(self, current: int, demand: int, now: float) -> int:
        """The worker count to move to now, from `current` (draining workers excluded)."""
        wanted = self.wanted(demand)
        if wanted >= current:
            self._low_since = None
            return wanted
        if self._low_since is None:
            self._low_since = now
        return wanted if now - self._low_since >= self.scale_down_delay_s else current
