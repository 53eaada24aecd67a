"""The KubeRay material: manifests parse, serveConfigV2 is a valid Serve config and pel config,
and the pods' resources carry what the application asks of Ray."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from pel_model.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "deploy" / "kuberay"


def _k8s_quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.fixture(scope="module")
def rayservice() -> dict:
    docs = list(yaml.safe_load_all((KUBERAY / "rayservice.yaml").read_text()))
    assert len(docs) == 1 and docs[0]["kind"] == "RayService" and docs[0]["apiVersion"] == "ray.io/v1"
    return docs[0]


def _groups(rs: dict) -> dict[str, dict]:
    cluster = rs["spec"]["rayClusterConfig"]
    groups = {"head": cluster["headGroupSpec"]}
    groups.update({g["groupName"]: g for g in cluster["workerGroupSpecs"]})
    return groups


def test_serve_config_validates_and_matches_app_yaml(rayservice):
    serve_cfg = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(serve_cfg)  # Ray's own schema, as the operator applies it
    local = yaml.safe_load((ROOT / "deploy" / "app.yaml").read_text())
    ServeDeploySchema.model_validate(local)
    [app], [local_app] = serve_cfg["applications"], local["applications"]
    for key in ("name", "route_prefix", "import_path"):
        assert app[key] == local_app[key], key
    cfg = AppConfig.model_validate(app["args"])  # pel's config, as build_app validates it
    assert cfg.redis.url_env == "PEL_REDIS_URL" and cfg.redis.url is None
    assert cfg.redis.prefix == "{pel}"  # valid on Redis Cluster too
    AppConfig.model_validate({**app["args"], "redis": {**app["args"]["redis"], "cluster": True}})
    assert not cfg.urls.allow_files  # no local files inside a cluster's pods
    assert set(app["args"]) <= set(local_app["args"])  # no section app.yaml does not show


def test_pod_resources_carry_the_application(rayservice):
    app = AppConfig.model_validate(
        yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"])
    groups = _groups(rayservice)
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"  # no actors on the head
    for name, group in groups.items():
        params = group["rayStartParams"]
        assert params["metrics-export-port"] == "8080", name  # the PodMonitor's port
        [container] = group["template"]["spec"]["containers"]
        res = container["resources"]
        assert res["requests"] == res["limits"], name  # Guaranteed QoS: Ray sees what it gets
        if name != "head":  # Ray's CPU count = the pod's CPU limit
            assert float(params["num-cpus"]) == _k8s_quantity(res["limits"]["cpu"]), name
        gpus = int(res["limits"].get("nvidia.com/gpu", 0))
        assert gpus == int(params.get("num-gpus", 0)), name
        assert any(p["containerPort"] == 8080 and p["name"] == "metrics" for p in container["ports"])
        env = {e["name"]: e for e in container["env"]}
        assert env["PEL_REDIS_URL"]["valueFrom"]["secretKeyRef"]["name"] == "pel-redis"
        image = container["image"]
        assert image.endswith(":cuda" if gpus else ":cpu"), (name, image)

    gpu = [g for g in groups.values() if g["rayStartParams"].get("num-gpus")]
    cpu = [g for n, g in groups.items() if n != "head" and g not in gpu]
    d = app.detector
    assert d.num_gpus == 1 and gpu, "replicas ask for a GPU: a GPU group must exist"
    per_gpu_node = min(int(g["rayStartParams"]["num-gpus"]) // math.ceil(d.num_gpus) for g in gpu)
    assert per_gpu_node >= 1
    assert all(float(g["rayStartParams"]["num-cpus"]) >= d.num_cpus * per_gpu_node for g in gpu)
    gpu_slots = sum(g["maxReplicas"] * per_gpu_node for g in gpu)
    lo, hi = ((d.autoscaling.min_replicas, d.autoscaling.max_replicas) if d.autoscaling
              else (d.num_replicas, d.num_replicas))
    assert lo <= sum(g["replicas"] * per_gpu_node for g in gpu) and hi <= gpu_slots
    # Stream workers (and the Moderator, 0.1 CPU) fit on the CPU group at its initial size,
    # and as many as the Moderator may scale to fit it at its largest.
    cpus = [float(g["rayStartParams"]["num-cpus"]) for g in cpu]
    need = app.intake.stream_workers * app.intake.worker_num_cpus + 0.1
    have = sum(g["replicas"] * c for g, c in zip(cpu, cpus))
    assert need <= have, (need, have)
    most = (app.intake.max_stream_workers or app.intake.stream_workers) * app.intake.worker_num_cpus
    assert most + 0.1 <= sum(g["maxReplicas"] * c for g, c in zip(cpu, cpus))
    assert all(g["minReplicas"] <= g["replicas"] <= g["maxReplicas"] for g in cpu + gpu)


def test_podmonitor_and_container_image_definitions():
    [pm] = list(yaml.safe_load_all((KUBERAY / "podmonitor.yaml").read_text()))
    assert pm["kind"] == "PodMonitor"
    assert pm["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # the rules (PelMetricsTargetDown: up{job="ray"}) select job="ray"; the Operator's default
    # job label would be <namespace>/pel-moderation
    assert {"targetLabel": "job", "replacement": "ray"} in \
        pm["spec"]["podMetricsEndpoints"][0]["relabelings"]
    assert 'job="ray"' in (ROOT / "deploy" / "prometheus" / "rules.yml").read_text()
    assert pm["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    containerfile = (ROOT / "deploy" / "container" / "Containerfile").read_text()
    import ray
    assert f"rayproject/ray:{ray.__version__}-" in containerfile  # the Ray the project pins
    rs = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    assert rs["spec"]["rayClusterConfig"]["rayVersion"] == ray.__version__
    assert "pel export --for-service --artifacts-dir /opt/pel-moderation/artifacts" in containerfile
    for copied in ("pel_model", "workers", "models", "deploy", "pyproject.toml"):
        assert f"COPY {copied}" in containerfile and (ROOT / copied).exists()


def test_every_pod_mounts_the_evidence_folder_and_gets_the_review_token(rayservice):
    app = AppConfig.model_validate(
        yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]["args"])
    assert app.review.token_env  # the page is served beyond loopback: a token is required
    for name, group in _groups(rayservice).items():
        spec = group["template"]["spec"]
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in spec.get("volumes", []) if "persistentVolumeClaim" in v}
        for container in spec["containers"]:
            mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
            assert str(app.evidence.dir) in mounts and mounts[str(app.evidence.dir)] in claims, name
            env = {e["name"]: e for e in container["env"]}
            assert "secretKeyRef" in env[app.review.token_env]["valueFrom"], name
