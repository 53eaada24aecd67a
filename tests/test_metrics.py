"""Metrics end to end: a Ray actor records every metric through workers/metrics.py, a real
Prometheus (configured from deploy/prometheus/prometheus.yml) scrapes Ray's metrics export port,
and every Grafana dashboard query, recording rule and counter value is checked against it."""
from __future__ import annotations

import json
import math
import subprocess
import urllib.request
from typing import Any, Iterator

import pytest
import yaml

from workers import metrics as wm

from prom import (DASHBOARD, PROM_CONFIG, PROM_RULES, PROMTOOL, ROOT, _wait, load_checker,
                  running_prometheus)

PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
MODEL = "metrics-test"  # model label used only by this file

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")


cd = load_checker()


# ---- what the actor records (one "round"; recorded twice so rates are non-zero) -------------
CLIPS = [("fake", 0.93, 4.2), ("fake", 0.81, 6.0), ("fake", 0.66, 12.5), ("real", 0.05, 3.1),
         ("real", 0.12, 2.2), ("real", 0.31, 1.4), ("real", 0.02, 0.9), ("real", 0.44, 7.7),
         ("no_face", None, 0.6), ("error", None, None)]
FACE_SCORES = [0.01, 0.04, 0.2, 0.35, 0.5, 0.52, 0.77, 0.9, 0.97, 1.0]
BATCHES = [(8, 0.031), (3, 0.012), (32, 0.21)]
FRAMES = {"decoded": 250, "sampled": 20, "dropped": 230}
ERRORS = ["stalled", "unreachable"]
DEAD = ["lease_expired", "invalid_job"]
RECONNECTS, REDELIVERIES, ACTIVE, QUEUED, WORKERS = 2, 1, 3, 4, 5
PLAN = {"model": MODEL, "clips": CLIPS, "faces": FACE_SCORES, "batches": BATCHES,
        "frames": FRAMES, "errors": ERRORS, "dead": DEAD, "reconnects": RECONNECTS,
        "redeliveries": REDELIVERIES, "active": ACTIVE, "queued": QUEUED,
        "workers": WORKERS}


# ---- fixtures: Ray, the recording actor, Prometheus ----------------------------------------
@pytest.fixture(scope="module")
def ray_metrics_port(ray_cluster) -> int:
    return ray_cluster["metrics_port"]


@pytest.fixture(scope="module")
def recorder(ray_metrics_port: int):
    import ray

    @ray.remote(num_cpus=0)
    class Recorder:
        """Records metrics in its own process, as the stream workers do."""

        def worker_id(self) -> str:
            return ray.get_runtime_context().get_worker_id()

        def set_detector_ready(self, model: str, ready: bool) -> None:
            wm.metrics().set_detector_ready(model, ready)

        def preregister(self, model: str) -> None:
            wm.metrics().preregister(models=[model])

        def record_round(self, plan: dict) -> None:
            m, model = wm.metrics(), plan["model"]
            for label, score, latency in plan["clips"]:
                m.clip(label, model, fake_probability=score, latency_s=latency)
            m.faces(model, plan["faces"])
            for size, seconds in plan["batches"]:
                m.inference(model, size, seconds)
            for stage, n in plan["frames"].items():
                m.frames(stage, n)
            for _ in range(plan["reconnects"]):
                m.reconnect()
            for _ in range(plan["redeliveries"]):
                m.redelivery()
            for reason in plan["errors"]:
                m.stream_error(reason)
            for reason in plan["dead"]:
                m.dead_letter(reason)
            m.set_active_streams(plan["active"])
            m.set_queue_depth(plan["queued"])
            m.set_stream_workers(plan["workers"])
            m.set_detector_ready(model, True)

    actor = Recorder.remote()
    yield actor, ray.get(actor.worker_id.remote())
    ray.kill(actor)


@pytest.fixture(scope="module")
def prometheus_url(ray_metrics_port: int, tmp_path_factory) -> Iterator[str]:
    with running_prometheus(tmp_path_factory.mktemp("prometheus"), ray_metrics_port) as url:
        yield url


def _bucket_bounds(values: list[float], buckets: list[float]) -> tuple[float, float]:
    """Sums of the lower and upper bounds of the histogram buckets holding `values`."""
    edges = [0.0] + list(buckets)
    low = sum(max([e for e in edges if e < v], default=0.0) for v in values)
    high = sum(min([e for e in edges if e >= v]) for v in values)
    return low, high


def _value(url: str, promql: str) -> float | None:
    result = cd.query(url, promql)
    return float(result[0]["value"][1]) if result else None


def _by(url: str, promql: str, label: str) -> dict[str, float]:
    return {s["metric"][label]: float(s["value"][1]) for s in cd.query(url, promql)}


@pytest.fixture(scope="module")
def scraped(recorder, prometheus_url: str) -> dict[str, Any]:
    """Record a round, wait until Prometheus has it, record a second round, wait again."""
    import ray

    actor, worker_id = recorder
    ray.get(actor.preregister.remote(MODEL))
    sel = f'WorkerId="{worker_id}"'
    clips = f"sum(ray_pel_clips_total{{{sel}}})"
    for n in (1, 2):
        ray.get(actor.record_round.remote(PLAN))
        _wait(f"round {n} in Prometheus",
              lambda: _value(prometheus_url, clips) == n * len(CLIPS)
              and _value(prometheus_url, f"sum(ray_pel_face_score_count{{{sel}}})")
              == n * len(FACE_SCORES), timeout=40)
    return {"url": prometheus_url, "sel": sel, "rounds": 2}


# ---- static checks (no Ray) -----------------------------------------------------------------
@needs_promtool
def test_promtool_accepts_prometheus_config_and_rules():
    config = subprocess.run([PROMTOOL, "check", "config", str(PROM_CONFIG)], capture_output=True,
                            text=True)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "rules.yml" in config.stdout + config.stderr or "1 rule files found" in config.stdout
    rules = subprocess.run([PROMTOOL, "check", "rules", str(PROM_RULES)], capture_output=True,
                           text=True)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    names = {r.get("alert") for g in yaml.safe_load(PROM_RULES.read_text())["groups"]
             for r in g["rules"]}
    assert {"PelHighDeadLetterRate", "PelNoVerdictsWhileQueued", "PelDetectorDown"} <= names


def test_prometheus_config_uses_ray_service_discovery():
    cfg = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "ray")
    files = job["file_sd_configs"][0]["files"]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    assert "static_configs" in PROM_CONFIG.read_text()  # documented alternative


@needs_promtool
def test_checker_reports_promtool_errors_per_query():
    good = cd.DashboardQuery("p", "A", "sum(up)", "sum(up)")
    bad = cd.DashboardQuery("p", "B", "sum(rate(up[5m])", "sum(rate(up[5m])")
    errors = cd.promtool_check([good, bad], PROMTOOL)
    assert list(errors) == [bad] and "parse" in errors[bad].lower()
    assert cd.promtool_check([good], PROMTOOL) == {}


def test_checker_substitutes_grafana_variables():
    assert cd.substitute('rate(x{m=~"$model"}[$__rate_interval]) + ${model:regex} + [[model]]',
                         {"model": ".*", "__rate_interval": "1m"}) == \
        'rate(x{m=~".*"}[1m]) + .* + .*'
    with pytest.raises(cd.DashboardError, match=r"\$nope"):
        cd.substitute("sum(x{a=\"$nope\"})", {})
    with pytest.raises(cd.DashboardError, match="panels"):
        cd.extract_queries({"title": "no panels"})


@needs_promtool
def test_dashboard_structure_and_queries_parse():
    dash = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["model"]["query"]["query"] == "label_values(ray_pel_clips_total, model)"
    assert dash["schemaVersion"] >= 38  # Grafana 10+
    queries = cd.extract_queries(DASHBOARD)
    exprs = " ".join(q.expr for q in queries)
    for name in wm.EXPORTED.values():  # every exported metric is on the dashboard
        assert name in exprs, name
    for q in queries:
        assert q.expr.lstrip().startswith(("sum", "max", "histogram_quantile")), q
    for p in cd.iter_panels(dash["panels"]):
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${DS_PROMETHEUS}", p["title"]
            assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in p["targets"])
    assert cd.syntax_report(DASHBOARD, PROMTOOL) == {}


def test_grafana_provisioning_files():
    ds = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yaml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((PROVISIONING / "dashboards" / "pel-moderation.yaml").read_text())
    assert prov["providers"][0]["type"] == "file" and prov["providers"][0]["options"]["path"]


def test_metrics_reject_bad_label_values():
    m = wm.Metrics(enabled=False)  # validation only, no Ray needed
    with pytest.raises(ValueError, match="unknown label"):
        m.clip("maybe", MODEL)
    with pytest.raises(ValueError, match="model label"):
        m.clip("fake", "https://cdn.example.com/model.onnx")
    with pytest.raises(ValueError, match="fake probability"):
        m.faces(MODEL, [0.5, 1.5])
    with pytest.raises(ValueError, match="unknown stage"):
        m.frames("skipped", 3)
    with pytest.raises(ValueError, match="unknown reason"):
        m.dead_letter("lease expired on attempt 3/3")
    with pytest.raises(ValueError, match="batch_size"):
        m.inference(MODEL, 0, 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        m.set_queue_depth(-1)
    m.clip("fake", MODEL, fake_probability=0.9, latency_s=1.0)  # valid input is accepted


# ---- against Ray + Prometheus ---------------------------------------------------------------
@pytest.mark.slow
def test_exported_names_and_types(scraped, ray_metrics_port: int):
    with urllib.request.urlopen(f"http://127.0.0.1:{ray_metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE ray_pel_")}
    expected = {wm.EXPORTED[name]: kind for name, (kind, _, _) in wm._SPECS.items()}
    assert types == expected


@pytest.mark.slow
def test_counters_match_what_was_recorded(scraped):
    url, sel, n = scraped["url"], scraped["sel"], scraped["rounds"]
    clips = _by(url, f"sum by (label) (ray_pel_clips_total{{{sel}}})", "label")
    want = {label: n * sum(1 for c in CLIPS if c[0] == label) for label in wm.VERDICT_LABELS}
    assert clips == want
    assert _value(url, f"sum(ray_pel_faces_scored_total{{{sel}}})") == n * len(FACE_SCORES)
    assert _by(url, f"sum by (stage) (ray_pel_frames_total{{{sel}}})", "stage") == \
        {k: n * v for k, v in FRAMES.items()}
    errors = _by(url, f"sum by (reason) (ray_pel_stream_errors_total{{{sel}}})", "reason")
    assert errors == {r: float(n if r in ERRORS else 0) for r in wm.STREAM_ERROR_REASONS}
    dead = _by(url, f"sum by (reason) (ray_pel_dead_letters_total{{{sel}}})", "reason")
    assert dead == {r: float(n if r in DEAD else 0) for r in wm.DEAD_LETTER_REASONS}
    assert _value(url, f"sum(ray_pel_stream_reconnects_total{{{sel}}})") == n * RECONNECTS
    assert _value(url, f"sum(ray_pel_job_redeliveries_total{{{sel}}})") == n * REDELIVERIES
    assert _value(url, f"sum(ray_pel_active_streams{{{sel}}})") == ACTIVE
    assert _value(url, f"max(ray_pel_queue_depth{{{sel}}})") == QUEUED
    assert _value(url, f"max(ray_pel_stream_workers{{{sel}}})") == WORKERS
    assert _value(url, f'sum(ray_pel_detector_ready{{{sel},model="{MODEL}"}})') == 1


@pytest.mark.slow
def test_histograms_match_what_was_recorded(scraped):
    url, sel, n = scraped["url"], scraped["sel"], scraped["rounds"]
    faces = _by(url, f"sum by (le) (ray_pel_face_score_bucket{{{sel}}})", "le")
    for le in ("0.05", "0.5", "0.95", "1.0"):
        assert faces[le] == n * sum(1 for s in FACE_SCORES if s <= float(le)), le
    assert faces["+Inf"] == n * len(FACE_SCORES)
    # Ray 2.60 rebuilds `_sum` from bucket midpoints: it lies within each value's bucket.
    low, high = _bucket_bounds(FACE_SCORES, wm.SCORE_BUCKETS)
    assert n * low <= _value(url, f"sum(ray_pel_face_score_sum{{{sel}}})") <= n * high
    scored = [c for c in CLIPS if c[1] is not None]
    assert _value(url, f"sum(ray_pel_clip_score_count{{{sel}}})") == n * len(scored)
    timed = [c[2] for c in CLIPS if c[2] is not None]
    lat = _by(url, f"sum by (le) (ray_pel_clip_latency_seconds_bucket{{{sel}}})", "le")
    assert lat["5.0"] == n * sum(1 for t in timed if t <= 5.0)
    assert lat["+Inf"] == n * len(timed)
    assert _value(url, f"sum(ray_pel_inference_batch_size_count{{{sel}}})") == n * len(BATCHES)
    assert _value(url, f"sum(ray_pel_inference_crops_total{{{sel}}})") == \
        n * sum(b for b, _ in BATCHES)
    inference = _by(url, f"sum by (le) (ray_pel_inference_seconds_bucket{{{sel}}})", "le")
    assert inference["0.05"] == n * sum(1 for _, s in BATCHES if s <= 0.05)


@pytest.mark.slow
def test_every_dashboard_query_returns_data(scraped):
    report = cd.check_dashboard(DASHBOARD, scraped["url"], PROMTOOL, wait_s=15)
    assert not report.failed, "\n".join(r.describe() for r in report.failed)
    assert len(report.results) == len(cd.extract_queries(DASHBOARD))
    assert MODEL in report.variables["model"]
    # Per-model detection rate for this test's model: fake / all = 3 / 10 (rounds recorded
    # alike, so any window covering both gives the same ratio).
    by_model = next(r.query.promql for r in report.results
                    if r.query.panel == "Detection rate by model")
    rate = _by(scraped["url"], by_model, "model")
    assert math.isclose(rate[MODEL], 3 / len(CLIPS), rel_tol=1e-6)


@pytest.mark.slow
def test_rules_load_and_evaluate(scraped):
    url = scraped["url"]

    def evaluated():
        groups = cd.api_get(url, "/api/v1/rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r.get("lastEvaluation", "").startswith("20")
                                      for r in rules) else None

    rules = _wait("rules evaluated", evaluated, timeout=15)
    assert len(rules) == sum(len(g["rules"]) for g in
                             yaml.safe_load(PROM_RULES.read_text())["groups"])
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError"))
                                                      for r in rules]
    # Our replica reports ready, the target is up, jobs are queued and verdicts flowing. Rule
    # state lags the scrape by one evaluation, so poll until an evaluation saw round 2.
    quiet = ("PelDetectorDown", "PelMetricsTargetDown", "PelNoVerdictsWhileQueued")

    def alerts_quiet():
        groups = cd.api_get(url, "/api/v1/rules")["groups"]
        state = {r["name"]: r["state"] for g in groups for r in g["rules"]
                 if r["type"] == "alerting"}
        return all(state[name] == "inactive" for name in quiet)

    _wait("alerts inactive", alerts_quiet, timeout=15)
    # NaN (0/0) until a rule evaluation sees the second round's increase.
    ratio = _wait("detection-rate recording rule", lambda: {
        k: v for k, v in _by(url, f'pel:detection_rate:ratio5m{{model="{MODEL}"}}',
                             "model").items() if not math.isnan(v)}, timeout=15)
    assert math.isclose(ratio[MODEL], 3 / len(CLIPS), rel_tol=1e-6)


@pytest.mark.slow
def test_checker_flags_leaky_empty_and_invalid_queries(scraped):
    def target(expr: str, ref: str) -> dict:
        return {"refId": ref, "expr": expr}

    bad = {"panels": [{"title": "bad", "targets": [
        target('ray_pel_clips_total{model=~"$model"}', "A"),  # no sum: leaks WorkerId...
        target("sum(ray_pel_no_such_metric_total)", "B"),
        target("sum(rate(ray_pel_clips_total[5m])", "C"),
        target("sum(ray_pel_clips_total)", "D"),
    ]}], "templating": {"list": [{"name": "model", "type": "query", "includeAll": True,
                                  "query": "label_values(ray_pel_clips_total, model)"}]}}
    report = cd.check_dashboard(bad, scraped["url"], PROMTOOL)
    a, b, c, d = report.results
    assert {"WorkerId", "SessionName"} <= a.leaked and not a.ok
    assert b.error is None and b.series == 0 and not b.ok
    assert c.error and "parse" in c.error.lower()
    assert d.ok and not report.ok
    assert MODEL in report.variables["model"]
    assert cd.main([str(DASHBOARD), "--prometheus", scraped["url"], "--promtool", PROMTOOL]) == 0


@pytest.mark.slow
def test_gauges_set_once_outlive_rays_eviction(scraped, recorder):
    """Ray 2.60 stops exporting a gauge ~20 s after it was last recorded; a replica sets
    `detector_ready` once, at start. Each gauge must still be scraped 30 s after its last set,
    with its value (workers/metrics.py re-records gauges)."""
    import time

    import ray

    url, sel = scraped["url"], scraped["sel"]
    ray.get(recorder[0].set_detector_ready.remote(MODEL, True))  # the last set of any gauge here
    time.sleep(30)
    expected = {"ray_pel_detector_ready": 1, "ray_pel_active_streams": ACTIVE,
                "ray_pel_queue_depth": QUEUED, "ray_pel_stream_workers": WORKERS}
    for name, value in expected.items():
        assert _value(url, f"sum({name}{{{sel}}})") == value, name


@pytest.mark.slow
def test_detector_down_alert_fires_on_real_data(scraped, recorder):
    """Runs last: turns this actor's detector gauge off and evaluates the alert expression,
    restricted to this actor's series (other tests may run detectors on a shared cluster)."""
    import ray

    url, sel = scraped["url"], scraped["sel"]
    rule = next(r for g in yaml.safe_load(PROM_RULES.read_text())["groups"] for r in g["rules"]
                if r.get("alert") == "PelDetectorDown")
    expr = rule["expr"].replace("ray_pel_detector_ready", f"ray_pel_detector_ready{{{sel}}}")
    assert expr != rule["expr"]
    assert cd.query(url, expr) == []  # ready: the alert condition is false
    ray.get(recorder[0].set_detector_ready.remote(MODEL, False))
    _wait("PelDetectorDown condition", lambda: cd.query(url, expr), timeout=40)
