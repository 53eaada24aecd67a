"""The README's main command: `pel demo` runs `serve run` on a Serve config file with embedded
defaults (its own redis-server), pushes a clip of a real face, and prints the verdicts."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import yaml

from media import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_demo_runs_serve_run_on_embedded_defaults(tmp_path):
    import ray
    if ray.is_initialized():
        pytest.skip("needs a machine without a Ray cluster in this process")
    config = yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())
    args = config["applications"][0]["args"]
    assert args["redis"]["url"] is None  # the embedded default is what ships
    redis_port, http_port = free_port(), free_port()
    config["http_options"]["port"] = http_port
    args["redis"].update(embedded_port=redis_port, embedded_dir=str(tmp_path / "redis"))
    args["urls"]["file_roots"] = [str(tmp_path / "inbox")]
    assert "checkpoint" not in args["detector"]  # what ships: the trained default model
    args["detector"].update(artifacts_dir=str(tmp_path / "art"))
    cfg_path = tmp_path / "app.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    try:
        out = subprocess.run([str(Path(sys.executable).with_name("pel")), "demo", "--config",
                              str(cfg_path), "--seconds", "3", "--timeout", "600"],
                             capture_output=True, text=True, timeout=780, env=env, cwd=tmp_path)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        report = json.loads(out.stdout[out.stdout.index("{\n"):])
        assert report["job"]["state"] == "done"
        assert "TaskCancelledError" not in out.stderr  # polling the status cancels nothing
        clips = report["clips"]
        assert len(clips) == 1 and clips[0]["faces_scored"] >= clips[0]["frames_sampled"] >= 5
        clip = clips[0]
        assert clip["label"] in ("real", "fake") and 0 <= clip["fake_probability"] <= 1
        assert clip["model"].startswith("pel-tf_efficientnet_lite0-224@")  # the shipped model
        assert not any("never" in w for w in clip["warnings"]), clip["warnings"]
    finally:
        try:
            redis.Redis(port=redis_port).shutdown(nosave=True)
        except redis.RedisError:
            pass
