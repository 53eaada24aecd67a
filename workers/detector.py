"""The detector: a thin Ray Serve deployment around `pel_model.scorer.Scorer`.

Callers send uint8 crop batches (N, S, S, 3); `@serve.batch` merges concurrent requests from all
streams, and the merged crops run in model batches of at most `max_batch_size` faces on a GPU,
`cpu_batch_size` on CPU (batching by faces, not by requests), where `cpu_runs` calls run at
once on even shares of the merged batch (`model_calls`). A CPU replica imports no PyTorch
and loads the cached ONNX export (`pel export --for-service` makes it ahead), so it starts in
seconds and holds well under 1 GB (see docs/benchmarks.md). `max_ongoing_requests` is set above the batch size, since it caps
what `@serve.batch` can merge. Inference runs in a thread so the replica's event loop (and its
health checks) never blocks.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve

from pel_model.config import DetectorConfig
from pel_model.preprocess import validate_crops
from pel_model.scorer import load_scorer

from .metrics import metrics

log = logging.getLogger(__name__)


def model_calls(n: int, max_batch: int, runs: int = 1) -> list[slice]:
    """Slices of a merged batch of `n` crops, one per model call: at most `max_batch` crops each,
    at least `runs` calls while there are crops for them, sizes as even as possible."""
    if n <= 0:
        return []
    k = max(math.ceil(n / max_batch), min(runs, n))
    size, extra = divmod(n, k)
    bounds = [0]
    for i in range(k):
        bounds.append(bounds[-1] + size + (i < extra))
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


@serve.deployment(name="PELDetector")
class PELDetector:
    def __init__(self, detector: dict, metrics_enabled: bool = True):
        t0 = time.perf_counter()
        cfg = DetectorConfig.model_validate(detector)
        self.scorer = load_scorer(cfg)
        cpu = self.scorer.backend.device == "cpu"
        self.max_batch = cfg.cpu_batch_size if cpu else cfg.max_batch_size
        self.runs = cfg.cpu_runs if cpu else 1
        self.pool = ThreadPoolExecutor(self.runs, thread_name_prefix="pel-model") if self.runs > 1 else None
        self.started_s = time.perf_counter() - t0
        log.info("PELDetector ready in %.1f s (%s, model batch %d, %d call(s) at once)",
                 self.started_s, self.scorer.backend.describe(), self.max_batch, self.runs)
        self.score.set_max_batch_size(cfg.max_batch_size)
        self.score.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.metrics = metrics(metrics_enabled)
        self.metrics.preregister([self.scorer.model_id])
        self.metrics.set_detector_ready(self.scorer.model_id, True)

    def info(self) -> dict:
        s = self.scorer
        return {"input_size": s.input_size, "threshold": s.threshold, "model_id": s.model_id,
                "warnings": list(s.warnings), "backend": s.backend.describe(),
                "trained": s.meta.trained, "model_batch": self.max_batch, "model_runs": self.runs,
                "started_s": round(self.started_s, 2),
                "node_id": ray.get_runtime_context().get_node_id()}

    def _call(self, chunk: np.ndarray) -> np.ndarray:
        t0 = time.perf_counter()
        probs = self.scorer.probabilities(chunk)
        model = self.scorer.model_id
        self.metrics.inference(model, len(chunk), time.perf_counter() - t0)
        self.metrics.faces(model, probs.tolist())
        return probs

    def _infer(self, crops: np.ndarray) -> np.ndarray:
        chunks = [crops[s] for s in model_calls(len(crops), self.max_batch, self.runs)]
        if self.pool is None or len(chunks) == 1:
            return np.concatenate([self._call(c) for c in chunks])
        return np.concatenate(list(self.pool.map(self._call, chunks)))  # in order

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)
    async def score(self, requests: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(r) for r in requests]
        probs = await asyncio.to_thread(self._infer, np.concatenate(requests))
        return list(np.split(probs, np.cumsum(sizes)[:-1]))

    async def __call__(self, crops: np.ndarray) -> np.ndarray:
        validate_crops(crops, self.scorer.input_size)  # a bad request fails alone, not its batch
        return await self.score(crops)
