"""Training progress a user can follow: step, loss, throughput and ETA, as a tqdm bar on a
terminal and as log lines otherwise (Ray Train workers, CI, `nohup`)."""
from __future__ import annotations

import sys
import time
from typing import Optional


class Progress:
    """`step(loss, crops)` after each optimiser step of a run of `total` planned steps, of
    which `done` were finished before (a resumed run)."""

    def __init__(self, total: int, done: int = 0, every: int = 20, label: str = "train",
                 enabled: bool = True, tty: Optional[bool] = None):
        self.total, self.done, self.every, self.label, self.enabled = total, done, every, label, enabled
        self.t0, self.steps, self.seen, self.loss = time.time(), 0, 0, float("nan")
        self.bar = None
        if enabled and (sys.stderr.isatty() if tty is None else tty):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, desc=label, unit="step")

    def step(self, loss: float, crops: int) -> None:
        self.done, self.steps, self.seen = self.done + 1, self.steps + 1, self.seen + crops
        self.loss = loss if self.steps == 1 else 0.9 * self.loss + 0.1 * loss  # smoothed
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss:.4f}", crops_s=f"{self.rate:.1f}")
            self.bar.update(1)
        elif self.done % self.every == 0 or self.done == self.total:
            print(self.line(), flush=True)

    @property
    def rate(self) -> float:
        return self.seen / max(time.time() - self.t0, 1e-9)

    @property
    def eta_s(self) -> float:
        return (self.total - self.done) * (time.time() - self.t0) / max(1, self.steps)

    def line(self) -> str:
        eta = self.eta_s
        return (f"{self.label} step {self.done}/{self.total} loss {self.loss:.4f} "
                f"{self.rate:.1f} crops/s eta {int(eta // 60)}m{int(eta % 60):02d}s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
