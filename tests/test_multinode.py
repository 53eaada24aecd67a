"""A real multi-node Ray cluster on this machine: a head and three raylets (`ray start --head`,
`ray start --address ...`), two "stream" nodes and one "detector" node told apart by custom
resources. The application runs on it through `serve run`, as users run it; one stream node's
raylet is killed (by PID) mid-job and every job still ends with all its clips, once each."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import redis
import yaml

from media import free_port, stop_process
from model_utils import SMALL
from pel_model.config import AppConfig
from workers.cli import DEFAULT_CONFIG, load_config
from workers.queue import JobQueue
from workers.sample_media import astronaut, make_face_video

BIN = Path(sys.executable).parent
CLIP_S, SECONDS, JOBS = 2.0, 8.0, 8
OBJECT_STORE_BYTES = 256 * 2**20


class LocalCluster:
    """Ray processes started here, in their own temp dir; stopped by killing exactly those."""

    def __init__(self):
        self.temp = tempfile.mkdtemp(prefix="/tmp/pelmn")  # short: Ray's socket paths
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        self.env["RAY_AUTH_MODE"] = "disabled"

    def _ray(self, *args: str) -> subprocess.Popen:
        # A small object store per node: five raylets on one machine each default to 30% of RAM.
        return subprocess.Popen([str(BIN / "ray"), "start", "--disable-usage-stats",
                                 "--object-store-memory", str(OBJECT_STORE_BYTES), *args],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)

    def start(self, nodes: list[tuple[int, dict]]) -> None:
        head = self._ray("--head", "--port", str(self.port), "--num-cpus", "1",
                         "--temp-dir", self.temp, "--include-dashboard", "false")
        out, _ = head.communicate(timeout=120)
        assert head.returncode == 0, out[-2000:]
        for cpus, res in nodes:  # one at a time: raylets joining at once can time out
            p = self._ray("--address", self.address, "--num-cpus", str(cpus),
                          "--resources", json.dumps(res))
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0, out[-2000:]

    def nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address=%r, log_to_driver=False); "
                "print(json.dumps([{'id': n['NodeID'], 'alive': n['Alive'], "
                "'resources': n['Resources']} for n in ray.nodes()]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def _pids(self, needle: str) -> list[int]:
        pids = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if needle in cmd and int(pid) != os.getpid():
                pids.append(int(pid))
        return pids

    def raylet_pid(self, node_id: str) -> int:
        [pid] = [p for p in self._pids(f"--node_id={node_id}")
                 if "raylet" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode()]
        return pid

    def log_tails(self, chars: int = 1500) -> str:
        """The end of the Serve controller's and replicas' logs: where a start-up stalls."""
        out = []
        for path in sorted(Path(self.temp).glob("session_latest/logs/serve/*.log")):
            out.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(out)[-12000:]

    def stop(self) -> None:
        for pid in self._pids(self.temp):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _status(url: str) -> dict:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except Exception:
        return {}


def _wait(check, what: str, timeout: float):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster()
    try:
        c.start([(2, {"streams": 4}), (2, {"streams": 4}), (2, {"detector": 1})])
        yield c
    finally:
        c.stop()


def test_app_across_nodes_survives_a_killed_raylet(cluster, redis_url, service_checkpoint,
                                                   tmp_path):
    ckpt, art = service_checkpoint
    media = tmp_path / "media"
    media.mkdir()
    a = astronaut()
    clips = [make_face_video(media / f"c{i}.mp4", [a if i % 2 else np.ascontiguousarray(a[:, ::-1])],
                             seconds=SECONDS) for i in range(JOBS)]
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    http = free_port()
    config.update(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": http})
    args = load_config(DEFAULT_CONFIG).model_dump(mode="json")
    args["redis"].update(url=redis_url, prefix="mn")
    args["intake"].update(stream_workers=4, streams_per_worker=2, worker_resources={"streams": 1},
                          lease_seconds=3.0, max_attempts=3, poll_block_ms=200)
    args["stream"].update(clip_seconds=CLIP_S)
    args["urls"].update(file_roots=[str(media)])
    args["detector"].update(checkpoint=str(ckpt), model=SMALL.model_dump(mode="json"),
                            artifacts_dir=str(art), resources={"detector": 1}, num_cpus=1.0)
    config["applications"][0]["args"] = args
    cfg_path = tmp_path / "app.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cfg = AppConfig.model_validate(args)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    queue = JobQueue(client, cfg.redis, cfg.intake, "test")

    nodes = {n["id"]: n["resources"] for n in cluster.nodes() if n["alive"]}
    assert len(nodes) == 4
    streams = sorted(i for i, r in nodes.items() if "streams" in r)
    [detector_node] = [i for i, r in nodes.items() if "detector" in r]
    log_path = tmp_path / "serve-run.log"  # a file, not a pipe: nobody reads a pipe, it fills
    log_file = log_path.open("wb")
    proc = subprocess.Popen([str(BIN / "serve"), "run", str(cfg_path)], cwd=tmp_path,
                            env={**cluster.env, "RAY_ADDRESS": cluster.address},
                            stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http}/pel"
    last: dict = {}

    def app_up() -> dict:
        assert proc.poll() is None, f"serve run exited ({proc.returncode})"
        last.update(s := _status(url))
        return s if s.get("model") and all("node_id" in w for w in s["workers"]) else {}

    try:
        try:
            up = _wait(app_up, "the app", 420)
        except AssertionError as exc:  # say why: serve run's log, the status, Ray's view
            tail = log_path.read_text(errors="replace")[-6000:]
            raise AssertionError(f"{exc}\nlast status: {json.dumps(last)[:3000]}\n"
                                 f"nodes: {cluster.nodes()}\nserve run log tail:\n{tail}"
                                 f"\n{cluster.log_tails()}") from None
        # Placement by resources: replicas on the detector node, workers spread over both
        # stream nodes, nothing of either on the head.
        assert up["model"]["node_id"] == detector_node
        assert {w["node_id"] for w in up["workers"]} == set(streams)

        ids = [queue.push(f"file://{c}") for c in clips]
        moderator = up["node_id"]
        victim = next((n for n in streams if n != moderator), streams[0])

        def busy_victim() -> bool:  # the victim's workers are in the middle of their jobs
            s = _status(url)
            running = [j for w in s.get("workers", []) if w.get("node_id") == victim
                       for j in w.get("active_jobs", [])]
            return bool(running) and any(
                (queue.state(j) or {}).get("clips_done", 0) >= 1 for j in running)

        _wait(busy_victim, "a job half done on the victim node", 120)
        os.kill(cluster.raylet_pid(victim), signal.SIGKILL)  # the node is gone, not stopped

        def finished() -> dict:
            states = {i: queue.state(i) or {} for i in ids}
            return states if all(s.get("state") in ("done", "partial", "failed")
                                 for s in states.values()) else {}

        states = _wait(finished, "every job to end", 300)
        assert {s["state"] for s in states.values()} == {"done"}, states
        assert any(s["attempts"] >= 2 for s in states.values())  # jobs of the lost node resumed
        n_clips = int(SECONDS / CLIP_S)
        for job_id in ids:
            verdicts = client.hgetall(f"mn:job:{job_id}:clips")
            assert sorted(int(k) for k in verdicts) == list(range(n_clips)), job_id
            assert all(json.loads(v)["faces_scored"] > 0 for v in verdicts.values())
        entries = [(f["job_id"], f["clip_index"]) for _, f in client.xrange("mn:verdicts")]
        assert len(entries) == len(set(entries)) == JOBS * n_clips  # no clip twice
        # The lost node's workers are restarted by Ray on the surviving stream node.
        survivor = next(n for n in streams if n != victim)
        _wait(lambda: [w.get("node_id") for w in _status(url).get("workers", [])]
              == [survivor] * 4, "the workers back on the surviving node", 120)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            stop_process(proc)
        log_file.close()
