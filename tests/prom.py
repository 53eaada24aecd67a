"""A real Prometheus for tests: configured from deploy/prometheus/prometheus.yml (1 s intervals,
the repo's rules) and pointed at a Ray node's metrics export port; plus the dashboard checker."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "pel-moderation.json"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
PROM_RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def load_checker():
    spec = importlib.util.spec_from_file_location("check_dashboard",
                                                  ROOT / "deploy" / "check_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, fn: Callable[[], Any], timeout: float = 30.0, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def _ray_sd_file(path: Path, port: int) -> None:
    """The same format Ray's dashboard writes to prom_metrics_service_discovery.json."""
    path.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [f"127.0.0.1:{port}"]}]))


def derive_config(tmp: Path, metrics_port: int) -> Path:
    """deploy/prometheus/prometheus.yml, with 1 s intervals, the repo rules by absolute path and
    its file-SD job pointed at a discovery file listing the local Ray node."""
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s", scrape_timeout="1s")
    cfg["rule_files"] = [str(PROM_RULES)]
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    sd_file = tmp / "prom_metrics_service_discovery.json"
    _ray_sd_file(sd_file, metrics_port)
    job["file_sd_configs"][0]["files"] = [str(sd_file)]
    job["file_sd_configs"][0]["refresh_interval"] = "1s"
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path



@contextlib.contextmanager
def running_prometheus(tmp: Path, metrics_port: int) -> Iterator[str]:
    """Start Prometheus scraping `metrics_port`; yields its base URL."""
    if PROMETHEUS is None or PROMTOOL is None:
        pytest.skip("prometheus/promtool not installed")
    config = derive_config(tmp, metrics_port)
    subprocess.run([PROMTOOL, "check", "config", str(config)], check=True, capture_output=True)
    port = _free_port()
    log = open(tmp / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited: {(tmp / 'prometheus.log').read_text()}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        _wait("prometheus ready", ready, timeout=20)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
