"""A CPU detector replica's model calls: how a merged batch is split (`cpu_batch_size`,
`cpu_runs`), that the calls run at once, and that the crops' probabilities come back in order."""
from __future__ import annotations

import threading

import numpy as np

from pel_model.config import DetectorConfig
from workers.detector import model_calls


def _sizes(n, max_batch, runs):
    calls = model_calls(n, max_batch, runs)
    assert calls == sorted(calls, key=lambda s: s.start) and (not calls or calls[-1].stop == n)
    assert all(a.stop == b.start for a, b in zip(calls, calls[1:]))  # contiguous, nothing lost
    return [s.stop - s.start for s in calls]


def test_model_calls_split_evenly_within_the_batch_limit():
    assert _sizes(0, 8, 2) == []
    assert _sizes(1, 8, 2) == [1]
    assert _sizes(8, 8, 1) == [8]
    assert _sizes(8, 8, 2) == [4, 4]          # two calls at once beat one of 8
    assert _sizes(10, 8, 2) == [5, 5]
    assert _sizes(13, 4, 2) == [4, 3, 3, 3]   # the batch limit holds
    assert _sizes(32, 8, 2) == [8, 8, 8, 8]
    assert _sizes(3, 8, 4) == [1, 1, 1]


def test_cpu_replica_runs_its_calls_at_once_and_keeps_the_order(ray_cluster, service_checkpoint):
    from workers.detector import PELDetector

    ckpt, art = service_checkpoint
    cfg = DetectorConfig(checkpoint=ckpt, artifacts_dir=art, backend="onnxruntime",
                         cpu_batch_size=4, cpu_runs=2)
    replica = PELDetector.func_or_class(cfg.model_dump(mode="json"))
    assert replica.info()["model_runs"] == 2 and replica.info()["model_batch"] == 4
    crops = np.random.default_rng(0).integers(0, 256, (13, 224, 224, 3), dtype=np.uint8)
    expected = np.concatenate([replica.scorer.probabilities(crops[i:i + 1]) for i in range(13)])

    both_in_flight = threading.Barrier(2, timeout=60)  # broken (an error) unless 2 calls overlap
    seen, score = [], replica.scorer.probabilities

    def probabilities(chunk):
        seen.append(len(chunk))
        if len(seen) <= 2:
            both_in_flight.wait()
        return score(chunk)

    replica.scorer.probabilities = probabilities
    got = replica._infer(crops)
    assert sorted(seen) == [3, 3, 3, 4]
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert got.dtype == np.float32 and got.shape == (13,)

