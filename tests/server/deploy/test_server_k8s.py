"""deploy/k8s without a cluster: kustomize renders the base and the GPU overlay (kubectl), every
object passes the Kubernetes schema (kubernetes-validate, strict, offline), and the rendered
objects keep the promises docs/DEPLOYMENT.md makes: probes on /healthz and /readyz, a grace
period that covers the preStop and the server's drain, secrets as mounted files, every XPEFT_*
variable a real setting, an HPA on a gauge the server exports, Redis with AOF and a password and
reachable only from the server and trainer pods, predictions routed by profile id.

Skipped only where kubectl is missing; .ci/run installs it (Debian's kubernetes-client).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from xpeft.server.metrics import Metrics
from xpeft.server.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
K8S = ROOT / "deploy" / "k8s"
KUBE_VERSION = "1.30.0"

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="the dev extra installs kubernetes-validate"
)


def kustomize(path: Path) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed (.ci/run installs Debian's kubernetes-client)")
    done = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


@pytest.fixture(scope="module")
def base() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S / "base")}


@pytest.fixture(scope="module")
def gpu() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S / "overlays" / "gpu")}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = obj["spec"]["template"]["spec"]["containers"]
    return only


def env(obj: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(obj)["env"]}


def test_every_rendered_object_passes_the_schema_strictly(base, gpu) -> None:
    for objects in (base, gpu):
        for key, obj in objects.items():
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            assert obj["metadata"]["namespace"] == "xpeft", key
    kinds = {kind for kind, _ in base}
    assert {
        "Deployment",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
    } <= kinds


def test_the_validator_and_kustomize_refuse_broken_manifests(base, tmp_path: Path) -> None:
    broken = yaml.safe_load(yaml.safe_dump(base[("Deployment", "xpeft-server")]))
    container(broken)["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)
    typo = yaml.safe_load(yaml.safe_dump(base[("Service", "xpeft-server")]))
    typo["spec"]["portz"] = typo["spec"].pop("ports")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBE_VERSION, strict=True)
    (tmp_path / "kustomization.yaml").write_text("resources:\n  - missing.yaml\n")
    done = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0


def test_server_probes_and_drain_timing(base) -> None:
    server = base[("Deployment", "xpeft-server")]
    c = container(server)
    assert c["args"] == ["xpeft", "serve"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    settings = env(server)
    delay, timeout = float(settings["XPEFT_DRAIN_DELAY_S"]), float(settings["XPEFT_DRAIN_TIMEOUT_S"])
    assert delay > 0  # new arrivals still get 503 shutting_down (retried elsewhere) after SIGTERM
    # docs/DEPLOYMENT.md: the stop timeout covers delay + timeout + 5 s, after the preStop.
    grace = server["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= float(pre_stop[1]) + delay + timeout + 5
    strategy = server["spec"]["strategy"]["rollingUpdate"]
    assert strategy["maxUnavailable"] == 0


@pytest.mark.parametrize("name", ["xpeft-server", "xpeft-trainer"])
def test_xpeft_pods_read_real_settings_and_secrets_from_files(base, gpu, name: str) -> None:
    for objects in (base, gpu):
        obj = objects[("Deployment", name)]
        variables = env(obj)
        mounted = {m["name"]: m["mountPath"] for m in container(obj)["volumeMounts"]}
        volumes = {v["name"]: v for v in obj["spec"]["template"]["spec"]["volumes"]}
        for key, value in variables.items():
            field = key.removeprefix("XPEFT_").lower()
            assert field in Settings.model_fields, key  # no variable the server would ignore
            assert not re.search(r"(TOKEN|PASSWORD)$", key), f"{key}: secrets only as *_FILE"
            if key.endswith("_FILE"):
                secret_mount = mounted["secrets"]
                assert value.startswith(secret_mount + "/"), key
                items = {i["path"] for i in volumes["secrets"]["secret"]["items"]}
                assert value.rsplit("/", 1)[1] in items, key
        settings = Settings(
            **{
                k.removeprefix("XPEFT_").lower(): v
                for k, v in variables.items()
                if not k.endswith("_FILE") and k != "XPEFT_DEVICE"
            }
        )
        assert settings.redis_url == "redis://xpeft-redis:6379/0"
        assert "XPEFT_REDIS_PASSWORD_FILE" in variables


def test_pods_are_locked_down_and_sized(base, gpu) -> None:
    for objects in (base, gpu):
        for (kind, name), obj in objects.items():
            if kind not in ("Deployment", "StatefulSet"):
                continue
            pod = obj["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True, name
            assert pod["automountServiceAccountToken"] is False, name
            c = container(obj)
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), name
            assert "memory" in c["resources"]["limits"], name
            assert "livenessProbe" in c, name


def test_disruption_budget_and_autoscaler_target_the_server(base) -> None:
    labels = base[("Deployment", "xpeft-server")]["spec"]["template"]["metadata"]["labels"]
    pdb = base[("PodDisruptionBudget", "xpeft-server")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    hpa = base[("HorizontalPodAutoscaler", "xpeft-server")]
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "xpeft-server",
    }
    assert hpa["spec"]["minReplicas"] >= pdb["spec"]["maxUnavailable"] + 1
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods, "scales on a per-pod queue metric"
    exported = {metric.name for metric in Metrics().registry.collect()}
    for metric in pods:
        assert metric["metric"]["name"] in exported  # a gauge the server really exports


def test_redis_keeps_an_aof_has_a_password_and_is_private(base) -> None:
    redis = base[("StatefulSet", "xpeft-redis")]
    script = " ".join(container(redis)["command"])
    assert "--appendonly yes" in script and "--appendfsync everysec" in script
    assert "requirepass" in script and "/run/secrets/" in script  # from the Secret, not the command line
    assert "--protected-mode yes" in script
    data = {m["name"]: m["mountPath"] for m in container(redis)["volumeMounts"]}["data"]
    assert "--dir " + data in script
    assert [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]] == ["data"]

    policy = base[("NetworkPolicy", "xpeft-redis")]["spec"]
    assert (
        policy["podSelector"]["matchLabels"].items()
        <= redis["spec"]["template"]["metadata"]["labels"].items()
    )
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"} and policy["egress"] == []
    (rule,) = policy["ingress"]
    (source,) = rule["from"]
    assert set(source) == {"podSelector"}  # no namespaceSelector, no ipBlock: this namespace's clients only
    client_label = source["podSelector"]["matchLabels"]
    clients = {
        name
        for (kind, name), obj in base.items()
        if kind in ("Deployment", "StatefulSet")
        and client_label.items() <= obj["spec"]["template"]["metadata"]["labels"].items()
    }
    assert clients == {"xpeft-server", "xpeft-trainer"}
    service = base[("Service", "xpeft-redis")]
    assert not service["spec"].get("type") or service["spec"]["type"] == "ClusterIP"


def test_ingress_routes_predictions_by_profile_id_and_keeps_ops_pages_private(base) -> None:
    predict = base[("Ingress", "xpeft-predict")]
    train = base[("Ingress", "xpeft-train")]
    api = base[("Ingress", "xpeft-api")]
    for ingress, verb in ((predict, "predict"), (train, "train")):
        notes = ingress["metadata"]["annotations"]
        assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$uri"
        (path,) = ingress["spec"]["rules"][0]["http"]["paths"]
        pattern = re.compile(path["path"])
        assert pattern.match(f"/profiles/p-1/{verb}") and not pattern.match("/profiles/p-1")
        assert not pattern.match(f"/profiles/a/b/{verb}")  # one id, the one in the path
    assert (
        "non_idempotent"
        in predict["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    )
    assert (
        "non_idempotent"
        not in train["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-next-upstream"]
    )
    routed = [p["path"] for i in (predict, train, api) for p in i["spec"]["rules"][0]["http"]["paths"]]
    for private in ("/metrics", "/docs", "/openapi.json", "/redoc"):
        assert not any(private.startswith(p) and p != "/" for p in routed), private
        assert "/" not in routed
    for ingress in (predict, train, api):
        assert ingress["spec"]["ingressClassName"] == "nginx"
        for path in ingress["spec"]["rules"][0]["http"]["paths"]:
            assert path["backend"]["service"]["name"] == "xpeft-server"


def test_gpu_overlay_asks_for_a_gpu_and_the_cuda_image(base, gpu) -> None:
    for name in ("xpeft-server", "xpeft-trainer"):
        c = container(gpu[("Deployment", name)])
        assert c["image"].endswith(":cuda"), name
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1", name
        assert container(base[("Deployment", name)])["image"].endswith(":cpu"), name
    assert env(gpu[("Deployment", "xpeft-server")])["XPEFT_DTYPE"] == "bfloat16"
    # the overlay changes only what it says: probes and drain stay the base's
    for key in ("livenessProbe", "readinessProbe", "lifecycle"):
        assert (
            container(gpu[("Deployment", "xpeft-server")])[key]
            == container(base[("Deployment", "xpeft-server")])[key]
        )


def test_trainer_runs_the_worker_command() -> None:
    trainer = yaml.safe_load((K8S / "base" / "trainer.yaml").read_text())
    assert container(trainer)["args"] == ["xpeft", "worker"]
    done = subprocess.run(
        [sys.executable, "-m", "xpeft.cli", "worker", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr


def test_redis_cluster_overlay_points_servers_and_trainers_at_the_cluster(base) -> None:
    cluster = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(K8S / "overlays" / "redis-cluster")}
    for name in ("xpeft-server", "xpeft-trainer"):
        settings = env(cluster[("Deployment", name)])
        assert settings["XPEFT_REDIS_CLUSTER"] == "true", name
        assert settings["XPEFT_REDIS_URL"] == "redis://redis-cluster:6379/0"
        assert settings["XPEFT_JOBS_REDIS_URL"] == env(base[("Deployment", name)])["XPEFT_REDIS_URL"]
    for obj in cluster.values():
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


def test_monitoring_ships_with_the_base(base) -> None:
    """Prometheus finds the server pods by their scrape annotations (on the container's port, at
    /metrics), and the alert rules and dashboard ride along as ConfigMaps: the repository's files,
    byte for byte, the dashboard labelled for Grafana's sidecar."""
    server = base[("Deployment", "xpeft-server")]
    annotations = server["spec"]["template"]["metadata"]["annotations"]
    ports = {p["containerPort"] for p in container(server)["ports"]}
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) in ports
    rules = base[("ConfigMap", "xpeft-prometheus-rules")]
    assert rules["data"] == {"alerts.yml": (ROOT / "deploy" / "prometheus" / "alerts.yml").read_text()}
    dashboard = base[("ConfigMap", "xpeft-grafana-dashboard")]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["data"] == {"xpeft.json": (ROOT / "deploy" / "grafana" / "xpeft.json").read_text()}
