"""End-to-end throughput of the moderation service vs the bare model and a naive loop.

    python -m bench.bench_pipeline --videos 3 --seconds 10 --out /tmp/pipeline.json

Measured in one run on this machine, on the same clips (H.264 640x480 of two real face photos)
with the same model and sampling rate:
1. stack: faces/s through the whole service built from deploy/app.yaml (Redis queue -> Ray stream
   workers -> PyAV -> CenterFace -> Ray Serve detector -> verdicts in Redis), from the first push
   to the last job done;
2. bare model: faces/s of the same backend alone at the stack's mean request size;
3. naive loop: decode every frame to RGB, keep frames at the same rate, detect faces, score one
   face at a time with PyTorch eager.
Pipeline efficiency = (1) / (2); speed-up = (1) / (3).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from bench.common import machine_info, markdown_table

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def make_clips(root: Path, n: int, seconds: float) -> list[Path]:
    from workers.sample_media import astronaut, make_face_video
    a = astronaut()
    return [make_face_video(root / f"clip{i}.mp4", [a, np.ascontiguousarray(a[:, ::-1])],
                            seconds=seconds) for i in range(n)]


def app_args(model: dict, root: Path, redis_url: str, fps: float, art: Path) -> dict:
    from workers.cli import DEFAULT_CONFIG, load_config
    cfg = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    cfg["redis"]["url"] = redis_url
    cfg["stream"]["sample_fps"] = fps
    cfg["urls"].update(allow_files=True, file_roots=[str(root)])
    # the architecture under test, untrained (speed does not depend on the weights)
    cfg["detector"].update(checkpoint=None, model=model, artifacts_dir=str(art))
    return cfg


def run_stack(args_dict: dict, clips: list[Path]) -> dict:
    import ray
    import redis
    from ray import serve

    from pel_model.config import AppConfig
    from workers.app import build_app
    from workers.queue import JobQueue
    from workers.verdicts import VerdictStore

    cfg = AppConfig.model_validate(args_dict)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.run(build_app(args_dict), name="pel", route_prefix="/pel")
        client = redis.Redis.from_url(cfg.redis.url, decode_responses=True)
        queue, store = JobQueue(client, cfg.redis, cfg.intake, "bench"), VerdictStore(client, cfg.redis)

        def wait(ids: list[str]) -> None:
            while not all((queue.state(i) or {}).get("state") in ("done", "failed") for i in ids):
                time.sleep(0.1)

        wait([queue.push(f"file://{clips[0]}")])  # warm-up: model loaded, sessions warm
        t0 = time.perf_counter()
        ids = [queue.push(f"file://{c}") for c in clips]
        wait(ids)
        wall = time.perf_counter() - t0
        clip_faces = [c["faces_scored"] for i in ids for c in store.clips(i)]
        per_req = cfg.stream.crops_per_request
        requests = sum(math.ceil(f / per_req) for f in clip_faces if f)
        faces = sum(clip_faces)
        failed = [i for i in ids if queue.state(i)["state"] != "done"]
        return {"faces": faces, "seconds": wall, "faces_per_s": faces / wall, "failed_jobs": len(failed),
                "mean_request_size": faces / max(requests, 1)}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_bare(detector_cfg, batch: int, repeats: int = 5) -> dict:
    from bench.common import face_crops
    from pel_model.scorer import load_scorer
    scorer = load_scorer(detector_cfg, device="cpu")
    crops = face_crops(batch, scorer.input_size)
    scorer.probabilities(crops)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        scorer.probabilities(crops)
        times.append(time.perf_counter() - t0)
    best = float(np.median(times))
    return {"batch": batch, "seconds_per_batch": best, "faces_per_s": batch / best,
            "backend": scorer.backend.describe()}


def run_naive(model_cfg, face_cfg, clips: list[Path], fps: float) -> dict:
    import torch
    from pel_model.backends import TorchBackend
    from pel_model.faces import extract_faces, make_detector
    from pel_model.pel import PEL

    torch.manual_seed(0)
    backend = TorchBackend(PEL(model_cfg, load_pretrained=False))
    detector = make_detector(face_cfg)
    faces, t0 = 0, time.perf_counter()
    for path in clips:
        next_t = 0.0
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                rgb = frame.to_ndarray(format="rgb24")  # every frame converted
                if frame.time is None or frame.time + 1e-6 < next_t:
                    continue
                next_t += 1.0 / fps
                for _, crop in extract_faces(rgb, detector, face_cfg, model_cfg.input_size):
                    backend.logits(crop[None])  # one face at a time
                    faces += 1
    wall = time.perf_counter() - t0
    return {"faces": faces, "seconds": wall, "faces_per_s": faces / wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="efficientnet_b4")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--fps", type=float, default=2.0)
    p.add_argument("--out", type=Path)
    a = p.parse_args()

    from pel_model.config import AppConfig, ModelConfig
    from workers.redis_server import EmbeddedRedis

    model = ModelConfig(backbone=a.backbone, input_size=a.size, pretrained=False)
    root = Path(tempfile.mkdtemp(prefix="pel-bench-"))
    clips = make_clips(root, a.videos, a.seconds)
    with EmbeddedRedis() as server:
        args_dict = app_args(model.model_dump(mode="json"), root, server.url, a.fps, root / "art")
        stack = run_stack(args_dict, clips)
    cfg = AppConfig.model_validate(args_dict)
    batch = max(1, round(stack["mean_request_size"]))
    bare = run_bare(cfg.detector, batch)
    naive = run_naive(model, cfg.faces, clips, a.fps)
    result = {"machine": machine_info(), "model": f"{a.backbone}@{a.size}", "videos": a.videos,
              "seconds_each": a.seconds, "sample_fps": a.fps, "stack": stack, "bare_model": bare,
              "naive_loop": naive,
              "pipeline_efficiency": stack["faces_per_s"] / bare["faces_per_s"],
              "speedup_vs_naive": stack["faces_per_s"] / naive["faces_per_s"]}
    rows = [{"what": "stack (Redis -> Ray workers -> Serve detector -> Redis)",
             "faces": stack["faces"], "s": f"{stack['seconds']:.1f}", "faces/s": f"{stack['faces_per_s']:.2f}"},
            {"what": f"bare model, batch {batch} ({bare['backend']})", "faces": batch,
             "s": f"{bare['seconds_per_batch']:.3f}", "faces/s": f"{bare['faces_per_s']:.2f}"},
            {"what": "naive loop (every frame decoded, PyTorch, 1 face/call)", "faces": naive["faces"],
             "s": f"{naive['seconds']:.1f}", "faces/s": f"{naive['faces_per_s']:.2f}"}]
    print(markdown_table(rows, [("what", "what"), ("faces", "faces"), ("s", "seconds"), ("faces/s", "faces/s")]))
    print(f"\npipeline efficiency (stack / bare model): {result['pipeline_efficiency']:.2f}")
    print(f"speed-up over the naive loop: {result['speedup_vs_naive']:.2f}x")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
