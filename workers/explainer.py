"""Heatmaps off the hot path: a thin Ray Serve deployment that draws Grad-CAM maps.

`PELExplainer` loads the detector's checkpoint into PyTorch (Grad-CAM needs gradients, which the
ONNX/TensorRT engines of the detector do not give), and for each request (a face crop and an
evidence key, sent by workers/evidence.py) writes the face with the combined Grad-CAM map of both
streams blended over it (pel_model/grad_cam.py) to the evidence store. It scales to zero
replicas when idle, so it costs nothing until a track is flagged.
"""
from __future__ import annotations

import asyncio
import logging
import time

import numpy as np
from ray import serve

from pel_model.config import DetectorConfig, EvidenceConfig
from pel_model.preprocess import validate_crops

from .evidence_store import EvidenceStore, png_bytes

log = logging.getLogger(__name__)


@serve.deployment(name="PELExplainer", max_ongoing_requests=4)
class PELExplainer:
    def __init__(self, detector: dict, evidence: dict):
        import torch

        from pel_model.checkpoint import load_checkpoint
        from pel_model.scorer import untrained_network

        t0 = time.perf_counter()
        cfg = DetectorConfig.model_validate(detector)
        torch.set_num_threads(1)  # one request at a time per CPU it was given
        self.model = (load_checkpoint(cfg.checkpoint)[0] if cfg.checkpoint is not None
                      else untrained_network(cfg.model)).eval()
        self.size = self.model.cfg.input_size
        self.store = EvidenceStore(EvidenceConfig.model_validate(evidence))
        self._lock = asyncio.Lock()
        log.info("PELExplainer ready in %.1f s", time.perf_counter() - t0)

    def _draw(self, crop: np.ndarray, key: str) -> dict:
        from pel_model.grad_cam import overlay, pel_heatmaps

        maps = pel_heatmaps(self.model, crop[None])
        self.store.put(key, png_bytes(overlay(crop, maps["combined"][0])))
        return {"key": key, "shape": list(maps["combined"].shape[1:])}

    async def explain(self, crop: np.ndarray, key: str) -> dict:
        validate_crops(crop[None], self.size)
        self.store.path(key)  # a bad key fails here, before any work
        async with self._lock:  # Grad-CAM hooks are per model: one map at a time
            return await asyncio.to_thread(self._draw, crop, key)
