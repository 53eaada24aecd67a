"""The whole service on CPU: efficiency vs the bare model, speed-up vs a naive loop, scaling.

    python -m bench.bench_pipeline --out pipeline.json                    # 640x480, 1/2/4/8 streams
    python -m bench.bench_pipeline --resolution 1920x1080 --streams 2,8 --no-baselines

One run on this machine, one model (default: the shipped checkpoint on the CPU profile), the
same clips (H.264, two real face photos per frame) and the same sampling (2 frames/s):
1. stack: the application of deploy/app.yaml on a local Ray cluster (4 stream workers x 2
   streams, one detector replica), jobs pushed onto the Redis queue.
   - throughput: 8 file streams at once (decoded as fast as the machine goes): faces/s from
     the first push to the last job done;
   - real time: N = 1, 2, 4, 8 live streams, each an ffmpeg RTMP server publishing a clip at
     its real rate (`-re`): clip latency (a clip's end in media time -> its verdict, p50/p95),
     busy CPU of the whole machine (/proc/stat) per stream, frames dropped; a machine keeps up
     with N streams while latency stays bounded and nothing is dropped;
   - cost per faces on screen: one file stream with 1, 2 and 4 faces per frame (1280x480);
   - start-up of the detector replica with its ONNX export cached, and peak resident memory
     (VmHWM) of the replica and of each stream worker process.
2. bare model: the replica's ONNX graph in ONNX Runtime alone, at the replica's model batch,
   on all cores (one call on every core, and one single-threaded call per core at once: the
   better of the two counts) and on one replica call's thread budget;
3. naive loop: decode every frame to RGB, keep frames at the same rate, detect faces, score one
   face at a time with PyTorch eager.
Pipeline efficiency = (1, throughput) / (2, best on all cores); speed-up = (1, throughput) / (3).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import av
import numpy as np

from bench.common import machine_info, markdown_table, time_interleaved

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
SAMPLE_FPS = 2.0


def make_clips(root: Path, n: int, seconds: float, size: tuple[int, int], faces: int = 2,
               slots: int | None = None, tag: str = "clip") -> list[Path]:
    """`n` clips of `faces` face photos side by side (in `slots` slots; the rest blank)."""
    from workers.sample_media import astronaut, make_face_video
    a = astronaut()
    photos = [a if k % 2 == 0 else np.ascontiguousarray(a[:, ::-1]) for k in range(faces)]
    photos += [np.full_like(a, 90)] * ((slots or faces) - faces)
    return [make_face_video(root / f"{tag}{faces}f{i}.mp4", photos, seconds=seconds, size=size)
            for i in range(n)]


def rtmp_server(clip: Path, port: int) -> subprocess.Popen:
    """ffmpeg publishing `clip` once, in real time, to its one client at rtmp://127.0.0.1:port."""
    ffmpeg = shutil.which("ffmpeg") or "/usr/bin/ffmpeg"
    proc = subprocess.Popen([ffmpeg, "-nostdin", "-loglevel", "error", "-re", "-i", str(clip),
                             "-c", "copy", "-f", "flv", "-listen", "1",
                             f"rtmp://127.0.0.1:{port}/live/s"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    suffix, deadline = f":{port:04X} ", time.monotonic() + 10
    while not any(suffix in line and " 0A " in line for line in open("/proc/net/tcp")):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"ffmpeg did not listen on port {port}")
        time.sleep(0.02)
    return proc


def free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def app_args(checkpoint: str, root: Path, redis_url: str, overrides: dict | None = None) -> dict:
    from workers.cli import DEFAULT_CONFIG, load_config
    cfg = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    cfg["redis"]["url"] = redis_url
    cfg["stream"]["sample_fps"] = SAMPLE_FPS
    cfg["urls"].update(allow_files=True, file_roots=[str(root)], allowed_networks=["127.0.0.0/8"])
    cfg["intake"].update(stream_workers=4, streams_per_worker=2)  # up to 8 streams at once
    # A live stream ends when its publisher has been gone for the reconnect window: 2 s here
    # (300 s by default), so a live run ends soon after ffmpeg has published its clip.
    cfg["stream"].update(reconnect_window_s=2.0, backoff_initial_s=0.2, backoff_max_s=0.5)
    cfg["detector"].update(checkpoint=checkpoint)
    for key, value in (overrides or {}).items():  # --set section.field=value
        section, name = key.split(".", 1)
        cfg[section][name] = value
    return cfg


def busy_cpu_s() -> float:
    """Busy CPU seconds of the whole machine so far (all cores, /proc/stat)."""
    fields = [float(v) for v in open("/proc/stat").readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def memory_mb(title: str, field: str = "VmHWM") -> list[float]:
    """`field` of /proc/PID/status (VmHWM: peak resident set; VmRSS: resident now) of every
    process whose command line contains `title`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if title not in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith(f"{field}:"):
                    out.append(int(line.split()[1]) / 1024)
        except OSError:
            continue
    return out


def run_stack(args_dict: dict, burst: list[Path], live: dict[int, list[Path]],
              per_face: dict[int, Path]) -> dict:
    import ray
    from ray import serve
    import redis

    from pel_model.config import AppConfig
    from workers.app import build_app
    from workers.queue import JobQueue
    from workers.verdicts import VerdictStore

    cfg = AppConfig.model_validate(args_dict)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        t0 = time.perf_counter()
        serve.run(build_app(args_dict), name="pel", route_prefix="/pel")
        app_start_s = time.perf_counter() - t0
        info = serve.get_deployment_handle("PELDetector", "pel").info.remote().result()

        def workers_ready() -> bool:  # constructed (CenterFace loaded), no job run yet
            ws = serve.get_app_handle("pel").status.remote().result()["workers"]
            return len(ws) >= cfg.intake.stream_workers and all("pid" in w for w in ws)

        deadline = time.monotonic() + 120
        while not workers_ready():
            if time.monotonic() > deadline:
                raise RuntimeError("stream workers not ready 120 s after the app started")
            time.sleep(0.5)
        worker_ready_mb = memory_mb("StreamWorker", "VmRSS")
        client = redis.Redis.from_url(cfg.redis.url, decode_responses=True)
        queue, store = JobQueue(client, cfg.redis, cfg.intake, "bench"), VerdictStore(client, cfg.redis)

        def run(urls: list[str], options: dict | None = None) -> dict:
            cpu0, t0 = busy_cpu_s(), time.perf_counter()
            ids = [queue.push({"url": u, "options": options or {}}) for u in urls]
            while not all((queue.state(i) or {}).get("state") in ("done", "failed") for i in ids):
                time.sleep(0.05)
            wall, cpu = time.perf_counter() - t0, busy_cpu_s() - cpu0
            verdicts = [c for i in ids for c in store.clips(i)]
            faces = sum(v["faces_scored"] for v in verdicts)
            media = sum(v["end_s"] - v["start_s"] for v in verdicts)
            lat = sorted(v["latency_s"] for v in verdicts) or [float("nan")]
            return {"streams": len(urls), "faces": faces, "seconds": wall,
                    "frames": sum(v["frames_sampled"] for v in verdicts),
                    "frames_dropped": sum(v["frames_dropped"] for v in verdicts),
                    "faces_per_s": faces / wall, "media_s": media, "busy_cpu_s": cpu,
                    "busy_cores": cpu / wall, "cores_per_stream": cpu / wall / len(urls),
                    "latency_p50_s": float(np.percentile(lat, 50)),
                    "latency_p95_s": float(np.percentile(lat, 95)),
                    "failed_jobs": sum(queue.state(i)["state"] != "done" for i in ids),
                    "errors": sum(v["label"] == "error" for v in verdicts)}

        def run_live(clips: list[Path]) -> dict:
            ports = [free_port() for _ in clips]
            servers = [rtmp_server(c, port) for c, port in zip(clips, ports)]
            try:  # paced by ffmpeg; the live job ends when the publisher has gone (done)
                return run([f"rtmp://127.0.0.1:{port}/live/s" for port in ports], {"live": True})
            finally:
                for proc in servers:
                    proc.kill()
                    proc.wait()

        files = lambda paths: [f"file://{c}" for c in paths]  # noqa: E731
        run(files(burst[:1]))  # warm-up: sessions warm, first requests merged
        idle0, t0 = busy_cpu_s(), time.perf_counter()
        time.sleep(5)
        idle_cores = (busy_cpu_s() - idle0) / (time.perf_counter() - t0)
        throughput = run(files(burst))
        scaling = [run_live(clips) for _, clips in sorted(live.items())]
        faces_curve = [dict(run(files([path])), faces_per_frame=k) for k, path in sorted(per_face.items())]
        return {"app_start_s": app_start_s, "replica_start_s": info["started_s"],
                "model_batch": info["model_batch"], "model_runs": info.get("model_runs", 1),
                "backend": info["backend"],
                "idle_busy_cores": idle_cores, "throughput": throughput, "scaling": scaling,
                "faces_per_frame": faces_curve,
                "replica_peak_rss_mb": memory_mb("PELDetector"),
                "worker_peak_rss_mb": memory_mb("StreamWorker"), "worker_ready_rss_mb": worker_ready_mb,
                "streams_per_worker": cfg.intake.streams_per_worker}
    finally:
        serve.shutdown()
        ray.shutdown()


def run_bare(onnx_path: Path, input_size: int, batch: int, budget: int, repeats: int = 7) -> dict:
    """The model alone: one call on every core and one call on a replica call's thread budget,
    interleaved; then one single-threaded call per core at once (the replica's `cpu_runs` way of
    using the cores), on its own. The better all-core variant is the bare model of the
    efficiency ratio."""
    from bench.common import face_crops, time_calls_per_core
    from pel_model.backends import OnnxRuntimeBackend
    crops = face_crops(batch, input_size)
    cores = os.cpu_count() or 1
    variants = {"all_cores": OnnxRuntimeBackend(onnx_path, input_size),
                "replica_budget": OnnxRuntimeBackend(onnx_path, input_size, threads=budget)}
    timings = time_interleaved({k: (lambda b=b: b.logits(crops)) for k, b in variants.items()},
                               warmup=2, repeats=repeats)
    one_thread = OnnxRuntimeBackend(onnx_path, input_size, threads=1)
    timings["calls_per_core"] = time_calls_per_core(lambda: one_thread.logits(crops), cores,
                                                    warmup=2, repeats=repeats)
    faces = {"all_cores": batch, "replica_budget": batch, "calls_per_core": batch * cores}
    out = {k: {"batch": batch, "seconds_per_batch": t.median, "faces_per_s": faces[k] / t.median,
               **t.as_dict()} for k, t in timings.items()}
    best = max(("all_cores", "calls_per_core"), key=lambda k: out[k]["faces_per_s"])
    return out | {"replica_threads": budget, "cores": cores, "best_all_cores": best}


def run_naive(checkpoint: str, face_cfg, clips: list[Path]) -> dict:
    from pel_model.backends import TorchBackend
    from pel_model.checkpoint import load_checkpoint
    from pel_model.faces import extract_faces, make_detector

    model, meta = load_checkpoint(checkpoint)
    backend, detector = TorchBackend(model), make_detector(face_cfg)
    faces, t0 = 0, time.perf_counter()
    for path in clips:
        next_t = 0.0
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                rgb = frame.to_ndarray(format="rgb24")  # every frame converted
                if frame.time is None or frame.time + 1e-6 < next_t:
                    continue
                next_t += 1.0 / SAMPLE_FPS
                for _, crop in extract_faces(rgb, detector, face_cfg, meta.model.input_size):
                    backend.logits(crop[None])  # one face at a time
                    faces += 1
    wall = time.perf_counter() - t0
    return {"faces": faces, "seconds": wall, "faces_per_s": faces / wall}


def render(r: dict) -> str:
    s = r["stack"]
    t = s["throughput"]
    out = [f"throughput, {t['streams']} file streams at once: {t['faces']} faces in "
           f"{t['seconds']:.1f} s = {t['faces_per_s']:.2f} faces/s ({t['busy_cores']:.2f} cores busy; "
           f"{s['idle_busy_cores']:.2f} when idle)"]
    rows = [{"streams": x["streams"], "faces": x["faces"], "fps": f"{x['faces_per_s']:.2f}",
             "p50": f"{x['latency_p50_s']:.2f}", "p95": f"{x['latency_p95_s']:.2f}",
             "cores": f"{x['busy_cores']:.2f}", "cps": f"{x['cores_per_stream']:.3f}",
             "drop": x["frames_dropped"], "err": x["errors"] + x["failed_jobs"]}
            for x in s["scaling"]]
    out.append(markdown_table(rows, [("streams", "live streams"), ("faces", "faces"),
                                     ("fps", "faces/s"), ("p50", "clip latency p50 (s)"),
                                     ("p95", "p95 (s)"), ("cores", "busy cores"),
                                     ("cps", "busy cores per stream"), ("drop", "frames dropped"),
                                     ("err", "failed")]))
    rows = [{"k": x["faces_per_frame"], "fps": f"{x['faces_per_s']:.2f}",
             "ms": f"{1000 * x['seconds'] / max(x['frames'], 1):.0f}",
             "cpu": f"{1000 * x['busy_cpu_s'] / max(x['frames'], 1):.0f}"} for x in s["faces_per_frame"]]
    out.append(markdown_table(rows, [("k", "faces per frame"), ("fps", "faces/s"),
                                     ("ms", "wall ms per frame"), ("cpu", "busy CPU ms per frame")]))
    out.append(f"detector replica: ready {s['replica_start_s']:.1f} s after its constructor started "
               f"(whole app {s['app_start_s']:.1f} s), model batch {s['model_batch']} x {s.get('model_runs', 1)} "
               f"call(s) at once, {s['backend']}; "
               f"peak RSS {max(s['replica_peak_rss_mb'], default=0):.0f} MB; stream workers peak RSS "
               f"{', '.join(f'{v:.0f}' for v in s['worker_peak_rss_mb'])} MB ({s['streams_per_worker']} streams each; "
               f"{', '.join(f'{v:.0f}' for v in s.get('worker_ready_rss_mb', []))} MB when ready, before any job)")
    if "bare_model" in r:
        b, n = r["bare_model"], r["naive_loop"]
        out.append(f"bare model, batch {b['all_cores']['batch']}: {b['all_cores']['faces_per_s']:.2f} "
                   f"faces/s on all cores in one call, {b['calls_per_core']['faces_per_s']:.2f} with "
                   f"{b['cores']} one-thread calls at once, {b['replica_budget']['faces_per_s']:.2f} on "
                   f"{b['replica_threads']} thread(s); naive loop {n['faces_per_s']:.2f} faces/s")
        out.append(f"pipeline efficiency (stack throughput / bare model, best on all cores): "
                   f"{r['pipeline_efficiency']:.2f}; speed-up over the naive loop: {r['speedup_vs_naive']:.2f}x")
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="default: the shipped model")
    p.add_argument("--streams", default="1,2,4,8", help="concurrent streams per run (at most 8)")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each clip")
    p.add_argument("--resolution", default="640x480")
    p.add_argument("--no-baselines", action="store_true", help="stack only (no bare model, naive loop)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=JSON",
                   help="override an app setting, e.g. --set detector.threads=2")
    p.add_argument("--out", type=Path)
    a = p.parse_args(argv)
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in a.set)}

    from pel_model.checkpoint import read_meta
    from pel_model.config import DEFAULT_CHECKPOINT, AppConfig
    from pel_model.scorer import cpu_threads, load_scorer, onnx_artifact
    from workers.redis_server import EmbeddedRedis

    checkpoint = str(a.checkpoint or DEFAULT_CHECKPOINT)
    size = tuple(int(v) for v in a.resolution.lower().split("x"))
    streams = sorted({int(v) for v in a.streams.split(",")})
    if not streams or min(streams) < 1 or max(streams) > 8:
        p.error("--streams takes 1 to 8 concurrent streams")
    root = Path(tempfile.mkdtemp(prefix="pel-bench-"))
    burst = make_clips(root, 8, a.seconds, size, tag="burst")
    live = {n: make_clips(root, n, 2 * a.seconds, size, tag=f"live{n}-") for n in streams}
    per_face = {k: make_clips(root, 1, a.seconds, (1280, 480), faces=k, slots=4, tag="pf")[0]
                for k in (1, 2, 4)}
    with EmbeddedRedis() as server:
        args_dict = app_args(checkpoint, root, server.url, overrides)
        cfg = AppConfig.model_validate(args_dict)
        load_scorer(cfg.detector, device="cpu")  # exports if not cached: replicas then start fast
        onnx = onnx_artifact(cfg.detector)
        stack = run_stack(args_dict, burst, live, per_face)
    result = {"machine": machine_info(), "checkpoint": checkpoint, "resolution": a.resolution,
              "overrides": overrides, "seconds_each": a.seconds, "sample_fps": SAMPLE_FPS,
              "stack": stack}
    if not a.no_baselines:
        input_size = read_meta(checkpoint).model.input_size
        result["bare_model"] = run_bare(onnx, input_size, stack["model_batch"], cpu_threads(cfg.detector))
        result["naive_loop"] = run_naive(checkpoint, cfg.faces, burst[:2])
        best = stack["throughput"]["faces_per_s"]
        bare = result["bare_model"]
        result["pipeline_efficiency"] = best / bare[bare["best_all_cores"]]["faces_per_s"]
        result["speedup_vs_naive"] = best / result["naive_loop"]["faces_per_s"]
    print(render(result))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
