"""`pel push`, `pel verdicts`, `pel status`, `pel demo`, `pel feedback export`: the service
from a shell.

Each reads the same `deploy/app.yaml` the service runs with (`--config`), so the Redis URL and
key prefix always match. With no Redis URL configured, they talk to the embedded server.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import redis
import yaml

from pel_model.config import AppConfig

from .redis_client import connect

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "app.yaml"
FINAL_STATES = ("done", "partial", "cancelled", "failed")


def load_config(path: str | Path = DEFAULT_CONFIG) -> AppConfig:
    data = yaml.safe_load(Path(path).read_text())
    apps = data.get("applications") if isinstance(data, dict) else None
    args = apps[0].get("args", {}) if apps else data
    return AppConfig.model_validate(args or {})


def status_url(path: str | Path = DEFAULT_CONFIG) -> str:
    """The Moderator's HTTP status endpoint as configured in a Serve config file."""
    data = yaml.safe_load(Path(path).read_text())
    http = data.get("http_options") or {}
    prefix = (data.get("applications") or [{}])[0].get("route_prefix", "/pel")
    return f"http://{http.get('host', '127.0.0.1')}:{http.get('port', 8000)}{prefix}"


def _redis(cfg: AppConfig) -> redis.Redis:
    from .redis_server import configured_redis_url

    url = configured_redis_url(cfg.redis) or f"redis://127.0.0.1:{cfg.redis.embedded_port}/0"
    return connect(url, cfg.redis, decode_responses=True)


def _queue(cfg: AppConfig, client: redis.Redis | None = None):
    from .queue import JobQueue
    return JobQueue(client or _redis(cfg), cfg.redis, cfg.intake, "cli")


def _push(args) -> int:
    cfg = load_config(args.config)
    payload = {"url": args.url}
    if args.id:
        payload["id"] = args.id
    options = {k: v for k, v in (("sample_fps", args.sample_fps), ("clip_seconds", args.clip_seconds),
                                 ("live", args.live)) if v is not None}
    if options:
        payload["options"] = options
    print(_queue(cfg).push(payload))
    return 0


def _verdicts(args) -> int:
    from .verdicts import VerdictStore
    cfg = load_config(args.config)
    r = _redis(cfg)
    queue, store = _queue(cfg, r), VerdictStore(r, cfg.redis)
    deadline = time.time() + args.wait
    while True:
        state = queue.state(args.job_id) or {}
        if state.get("state") in FINAL_STATES or time.time() >= deadline:
            break
        time.sleep(1.0)
    print(json.dumps({"job": state, "clips": store.clips(args.job_id)}, indent=2))
    return 0 if state.get("state") == "done" else 1


def _cancel(args) -> int:
    cfg = load_config(args.config)
    state = _queue(cfg).cancel(args.job_id)
    if state is None:
        print(f"pel cancel: no job {args.job_id!r}", file=sys.stderr)
        return 2
    if state in ("queued", "running"):
        print(f"cancel requested for {args.job_id} ({state}); it stops within "
              f"{cfg.intake.lease_seconds / 3:.0f} s and ends 'cancelled'")
        return 0
    print(f"job {args.job_id} already ended: {state}")
    return 0


def _status(args) -> int:
    cfg = load_config(args.config)
    queue = _queue(cfg)
    print(json.dumps({"queue": queue.stats(), "dead_letters": queue.dead_letters(args.dead)}, indent=2))
    return 0


def _feedback(args) -> int:
    from .feedback import export_feedback
    cfg = load_config(args.config)
    print(json.dumps(export_feedback(_redis(cfg), cfg, Path(args.out)), indent=2))
    return 0


def _wait_http(url: str, timeout_s: float, proc: subprocess.Popen) -> dict:
    import urllib.request
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"serve run exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=30) as resp:
                status = json.loads(resp.read())
                if status.get("model"):
                    return status
        except OSError:
            pass
        time.sleep(2.0)
    raise TimeoutError(f"the service did not come up at {url} within {timeout_s:.0f} s")


def _demo(args) -> int:
    """Start `serve run`, push a clip of a real face photo, print its verdicts, stop."""
    from .sample_media import make_face_video
    cfg = load_config(args.config)
    inbox = next(iter(cfg.urls.file_roots), None)
    if not (cfg.urls.allow_files and inbox):
        raise ValueError(f"{args.config} must allow files from an inbox folder for the demo")
    Path(inbox).mkdir(parents=True, exist_ok=True)
    clip = make_face_video(Path(inbox) / "astronaut.mp4", seconds=args.seconds)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    serve_bin = Path(sys.executable).with_name("serve")
    proc = subprocess.Popen([str(serve_bin), "run", str(args.config)], env=env)
    try:
        status = _wait_http(status_url(args.config), args.timeout, proc)
        print("service up:", json.dumps(status["model"]), flush=True)
        job_id = _queue(cfg).push({"url": f"file://{clip}"})
        print(f"pushed job {job_id}: file://{clip}", flush=True)
        args.job_id, args.wait = job_id, args.timeout
        return _verdicts(args)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()


def add_commands(sub: argparse._SubParsersAction) -> None:
    def cmd(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the service's app.yaml")
        p.set_defaults(func=func)
        return p

    p = cmd("push", _push, "push a stream URL onto the job queue; prints the job id")
    p.add_argument("url")
    p.add_argument("--id")
    p.add_argument("--sample-fps", type=float)
    p.add_argument("--clip-seconds", type=float)
    p.add_argument("--live", action=argparse.BooleanOptionalAction, default=None)
    p = cmd("verdicts", _verdicts, "print a job's state and per-clip verdicts")
    p.add_argument("job_id")
    p.add_argument("--wait", type=float, default=0.0, help="seconds to wait for the job to end")
    p = cmd("cancel", _cancel, "stop a queued or running job (live streams included)")
    p.add_argument("job_id")
    p = cmd("status", _status, "queue statistics and recent dead letters")
    p.add_argument("--dead", type=int, default=10)
    p = sub.add_parser("feedback", help="moderators' decisions as data")
    fsub = p.add_subparsers(dest="feedback_command", required=True)
    p = fsub.add_parser("export", help="reviewed faces as a CSV dataset for `pel prepare`")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the service's app.yaml")
    p.add_argument("--out", required=True, help="folder for index.csv and faces/")
    p.set_defaults(func=_feedback)
    p = cmd("demo", _demo, "start the service, push a clip of a real face, print its verdicts")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--timeout", type=float, default=600.0)
