"""deploy/kubernetes: every manifest is valid against the Kubernetes API's own schemas (kubernetes-validate
bundles them, so this runs offline), and agrees with the image and the server it deploys: the port, the
probes, the drain, the user, the metric the autoscaler reads.

Only built-in kinds are shipped: a custom resource (KEDA's ScaledObject, a ServiceMonitor) has no bundled
schema, and kubernetes-validate fails it with SchemaNotFoundError, which this test would report.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from server.settings import ServerSettings
from server.worker.telemetry import ServerMetrics
from tests.server.server_harness import REPO_ROOT

kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[test]'")

MANIFESTS = sorted((REPO_ROOT / "deploy" / "kubernetes").glob("*.yaml"))
# The oldest and the newest Kubernetes release whose schemas kubernetes-validate bundles (1.25, 1.37 in 1.37.0).
VERSIONS = (kubernetes_validate.utils.all_versions()[0], kubernetes_validate.latest_version())
DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()


def documents() -> dict[str, dict]:
    """Every manifest document by kind (each kind is shipped once)."""
    docs = [doc for path in MANIFESTS for doc in yaml.safe_load_all(path.read_text()) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs)
    return by_kind


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
def test_manifest_is_valid(path: Path, version: str):
    for doc in yaml.safe_load_all(path.read_text()):
        kubernetes_validate.validate(doc, version, strict=True)  # strict: an unknown field is an error too


def test_the_deployment_matches_the_image_and_the_server():
    docs = documents()
    assert set(docs) == {"Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "Job"}
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["ports"] == [{"name": "http", "containerPort": 8000}] and "EXPOSE 8000" in DOCKERFILE
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert f"--uid {pod['securityContext']['runAsUser']} " in DOCKERFILE

    # Probes: /health, with a start-up allowance no shorter than the image's HEALTHCHECK start period.
    startup, ready = container["startupProbe"], container["readinessProbe"]
    assert startup["httpGet"]["path"] == ready["httpGet"]["path"] == "/health"
    start_period = int(re.search(r"--start-period=(\d+)s", DOCKERFILE).group(1))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period
    assert container["livenessProbe"]["exec"]["command"] == ["subspec-healthcheck", "--live"]
    assert "docker/healthcheck.py /usr/local/bin/subspec-healthcheck" in DOCKERFILE

    # Shutdown: the pause before SIGTERM and the server's drain both fit in the grace period.
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + ServerSettings().shutdown_timeout_s

    claim = docs["PersistentVolumeClaim"]["metadata"]["name"]
    for workload in (pod, docs["Job"]["spec"]["template"]["spec"]):
        assert workload["volumes"] == [{"name": "models", "persistentVolumeClaim": {"claimName": claim}}]
    assert docs["Service"]["spec"]["selector"] == docs["Deployment"]["spec"]["selector"]["matchLabels"]


def test_the_autoscaler_reads_the_servers_queue_gauge():
    hpa = documents()["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == documents()["Deployment"]["metadata"]["name"]
    [metric] = hpa["metrics"]
    assert metric["pods"]["metric"]["name"] == ServerMetrics().queue_depth._name == "subspec_queue_depth"
