"""Shared fixtures. Redis: one real redis-server per test session, flushed before each test."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import pytest
import redis

from workers.redis_server import EmbeddedRedis


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    # PEL_TEST_REDIS_SERVER=/path/to/redis-server runs the suite against another binary.
    with EmbeddedRedis(binary=os.environ.get("PEL_TEST_REDIS_SERVER") or None) as server:
        yield server.url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    """One local Ray cluster (with Serve) per test session; yields its metrics export port."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from media import free_port

    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, _metrics_export_port=port,
             _system_config={"metrics_report_interval_ms": 1000},
             ignore_reinit_error=True, log_to_driver=False,
             runtime_env={"env_vars": {"PEL_ORT_THREADS": "2"}})
    yield {"metrics_port": port}
    from ray import serve
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def model():
    """A small PEL (b0@224) whose outputs depend on its input; one per test module."""
    from model_utils import small_model

    return small_model(seed=1)


@pytest.fixture(scope="module")
def onnx_path(model, tmp_path_factory):
    """`model` exported to ONNX (dynamic batch, uint8 input)."""
    from pel_model.export import export_onnx

    return export_onnx(model, tmp_path_factory.mktemp("onnx") / "pel.onnx")


@pytest.fixture(scope="session")
def service_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint, artifacts folder) for the service tests: a random b0@224 network marked
    trained. One folder for the session, so the replicas of every test app reuse one export."""
    from model_utils import SMALL, small_model
    from pel_model.checkpoint import CheckpointMeta, save_checkpoint

    art = tmp_path_factory.mktemp("service-artifacts")
    ckpt = save_checkpoint(art / "small.safetensors", small_model(),
                           CheckpointMeta(model=SMALL, trained=True))
    return ckpt, art
