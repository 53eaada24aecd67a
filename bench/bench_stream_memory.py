"""Where a stream worker's memory per stream goes: decode, decode + face detection, glibc malloc.

    python -m bench.bench_stream_memory                          # 1920x1080, 1 and 4 streams
    python -m bench.bench_stream_memory --resolution 1280x720 --streams 1,2,8

No Ray and no model: each variant runs in a fresh process with N threads, one per stream, as a
stream worker's job threads do: `iter_sampled_frames` (PyAV, 2 frames/s) alone, then followed
by `detect_frames` (CenterFace, crops; scoring left out: the replica does it), over the same
H.264 clips of two face photos, read as files (decoded as fast as the machine goes, so each
decode queue fills up: the worst case). Peak resident memory (VmRSS sampled every 20 ms) above
the process's memory after loading everything and detecting once; per stream = that / N.
Each variant also runs with `MALLOC_MMAP_THRESHOLD_` fixed, as stream workers start by default
(`intake.worker_malloc_mmap_threshold`); detection runs with CenterFace unbounded and with at most
`faces.detector_concurrency` runs at once (the default, 2).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def child(stage: str, concurrency: int | None, clips: list[str]) -> dict:
    """Run len(clips) streams at once in this process; memory above the loaded baseline."""
    import numpy as np

    from pel_model.config import AppConfig
    from pel_model.faces import make_detector
    from workers.decode import iter_sampled_frames
    from workers.frame_faces import detect_frames
    from workers.urls import check_url

    cfg = AppConfig.model_validate({"urls": {"allow_files": True,
                                             "file_roots": sorted({str(Path(c).parent) for c in clips})},
                                    "faces": {"detector_concurrency": concurrency}})
    faces = make_detector(cfg.faces)
    faces.detect(np.zeros((1080, 1920, 3), np.uint8))  # the session's first run allocates
    base = _rss_mb()
    peak = base
    sampled = [0] * len(clips)

    def stream(i: int) -> None:
        frames = iter_sampled_frames(check_url(f"file://{clips[i]}", cfg.urls), cfg.stream,
                                     cfg.stream.sample_fps, False)
        items = frames if stage == "decode" else detect_frames(
            frames, faces, cfg, 224, cfg.stream.clip_seconds, None)
        for _ in items:
            sampled[i] += 1

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(clips))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        peak = max(peak, _rss_mb())
        time.sleep(0.02)
    return {"base_mb": base, "peak_mb": peak, "frames_sampled": sum(sampled),
            "seconds": time.perf_counter() - t0}


def run_variant(stage: str, clips: list[Path], mmap_threshold: int | None,
                concurrency: int | None) -> dict:
    env = dict(os.environ)
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    cmd = [sys.executable, "-m", "bench.bench_stream_memory", "--child", stage,
           json.dumps(concurrency), *map(str, clips)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    n = len(clips)
    return {"stage": stage, "streams": n,
            "detections_at_once": "-" if stage == "decode" else concurrency or "unbounded",
            "malloc": "glibc default" if mmap_threshold is None else f"mmap >= {mmap_threshold >> 10} KiB",
            **r, "per_stream_mb": (r["peak_mb"] - r["base_mb"]) / n}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resolution", default="1920x1080")
    p.add_argument("--streams", default="1,4")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--mmap-threshold", type=int, default=1 << 20)
    p.add_argument("--out", type=Path)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], json.loads(a.child[1]), a.child[2:])))
        return
    from bench.bench_pipeline import make_clips  # imports torch: not in the children
    from bench.common import machine_info, markdown_table
    from pel_model.config import AppConfig

    bounded = AppConfig().faces.detector_concurrency
    size = tuple(int(v) for v in a.resolution.lower().split("x"))
    counts = [int(n) for n in a.streams.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        clips = make_clips(Path(tmp), max(counts), a.seconds, size)
        variants = [("decode", None, None), ("decode", a.mmap_threshold, None),
                    ("decode+detect", None, None), ("decode+detect", a.mmap_threshold, None),
                    ("decode+detect", a.mmap_threshold, bounded)]
        for stage, threshold, concurrency in variants:
            for n in counts:
                if concurrency and n <= concurrency:
                    continue  # the bound changes nothing
                rows.append(run_variant(stage, clips[:n], threshold, concurrency))
                print(json.dumps(rows[-1]), flush=True)
    print(markdown_table(rows, [("stage", "stage"), ("streams", "streams"), ("malloc", "malloc"),
                                ("detections_at_once", "CenterFace runs at once"),
                                ("base_mb", "base MB"), ("peak_mb", "peak MB"),
                                ("per_stream_mb", "MB per stream"), ("seconds", "s")]))
    if a.out:
        a.out.write_text(json.dumps({"machine": machine_info(), "resolution": a.resolution,
                                     "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
