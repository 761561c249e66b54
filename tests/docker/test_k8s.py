"""Kubernetes manifests (docker/k8s/): rendered for the GPU base, the CPU overlay and the vLLM tensor-parallel overlay, validated against the
Kubernetes 1.30 schemas (kubernetes-validate, when installed) and checked for what a deployment needs:
GPU resources, probes on /health and /ready, a termination grace period that covers preStop plus the
server's drain, an HPA on agentprm_queue_depth through the custom metrics API, a PDB that lets a node
drain proceed, a ServiceMonitor that scrapes the Service's port, and the PrometheusRule equal to alerts.yml.
Rendering uses the pure-Python renderer; where kubectl is installed its `kustomize` must agree with it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess

import pytest
import yaml

from service.settings import ServerSettings
from tests.conftest import REPO
from tests.docker import kustomize

K8S = REPO / "docker" / "k8s"
OVERLAYS = {"gpu": K8S / "base", "cpu": K8S / "overlays" / "cpu", "vllm-tp": K8S / "overlays" / "vllm-tp"}
EXPECTED = {
    ("apps/v1", "Deployment"), ("v1", "Service"), ("autoscaling/v2", "HorizontalPodAutoscaler"),
    ("policy/v1", "PodDisruptionBudget"), ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
# The server's drain setting (SIGTERM -> stop taking work -> finish in-flight requests).
DRAIN_ENV = "AGENTPRM_DRAIN_TIMEOUT_S"


def by_kind(resources: list[dict]) -> dict[str, dict]:
    kinds = [r["kind"] for r in resources]
    assert len(kinds) == len(set(kinds)), kinds
    return {r["kind"]: r for r in resources}


@pytest.fixture(scope="module", params=sorted(OVERLAYS))
def rendered(request) -> tuple[str, dict[str, dict]]:
    return request.param, by_kind(kustomize.render(OVERLAYS[request.param]))


def container(resources: dict[str, dict]) -> dict:
    (c,) = resources["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def env(c: dict) -> dict[str, str | None]:
    return {e["name"]: e.get("value") for e in c["env"]}


def test_every_resource_kind_is_rendered(rendered):
    _, resources = rendered
    assert {(r["apiVersion"], r["kind"]) for r in resources.values()} == EXPECTED


def test_gpu_resources_in_the_base_and_none_in_the_cpu_overlay(rendered):
    variant, resources = rendered
    c = container(resources)
    limits, requests = c["resources"]["limits"], c["resources"]["requests"]
    if variant == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and requests["nvidia.com/gpu"] == 1
        assert env(c)["AGENTPRM_DEVICE"] == "cuda" and c["image"].endswith(":gpu")
    elif variant == "vllm-tp":  # one vLLM engine split over every GPU of the pod
        gpus = limits["nvidia.com/gpu"]
        assert gpus == requests["nvidia.com/gpu"] > 1
        assert env(c)["AGENTPRM_BACKEND"] == "vllm" and env(c)["AGENTPRM_VLLM_TENSOR_PARALLEL_SIZE"] == str(gpus)
        assert c["image"].endswith(":gpu-vllm")
        shm = {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
        (volume,) = [v for v in resources["Deployment"]["spec"]["template"]["spec"]["volumes"] if v["name"] in shm]
        assert volume["emptyDir"]["medium"] == "Memory"
    else:
        assert "nvidia.com/gpu" not in limits and "nvidia.com/gpu" not in requests
        assert "tolerations" not in resources["Deployment"]["spec"]["template"]["spec"]
        assert env(c)["AGENTPRM_DEVICE"] == "cpu" and c["image"].endswith(":cpu")
    assert "memory" in limits and "cpu" in requests


def test_probes_and_graceful_shutdown(rendered):
    _, resources = rendered
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    c = container(resources)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000}
    for probe, path in (("livenessProbe", "/health"), ("readinessProbe", "/ready"), ("startupProbe", "/health")):
        assert c[probe]["httpGet"]["path"] == path and c[probe]["httpGet"]["port"] in ("http", 8000), probe
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(env(c)[DRAIN_ENV])
    assert pod["terminationGracePeriodSeconds"] > float(command[1]) + drain


def test_pod_runs_as_the_image_user_and_reads_only_known_settings(rendered):
    _, resources = rendered
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    dockerfile = (REPO / "Dockerfile").read_text()
    (user,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    known = {f"AGENTPRM_{name.upper()}" for name in ServerSettings.model_fields}
    assert set(env(container(resources))) <= known


def test_api_keys_come_from_an_optional_secret_and_metrics_stay_scrapable(rendered):
    _, resources = rendered
    (key,) = [e for e in container(resources)["env"] if e["name"] == "AGENTPRM_API_KEY"]
    ref = key["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True and ref["name"] and ref["key"]
    # With keys set, /metrics needs one unless metrics auth is off; the ServiceMonitor sends none.
    monitor = resources["ServiceMonitor"]["spec"]["endpoints"][0]
    if "authorization" not in monitor and "bearerTokenSecret" not in monitor:
        assert ServerSettings(metrics_auth=env(container(resources))["AGENTPRM_METRICS_AUTH"]).metrics_auth is False


def test_service_hpa_pdb_and_servicemonitor_point_at_the_deployment(rendered):
    _, r = rendered
    deployment, service = r["Deployment"], r["Service"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] in {p["name"] for p in container(r)["ports"]}

    hpa = r["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": deployment["metadata"]["name"]}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "agentprm_queue_depth"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 1 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    adapter = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    assert metric["pods"]["metric"]["name"] in {rule["name"]["as"] for rule in adapter["rules"]["custom"]}

    pdb = r["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()
    # Fewer pods must be required than the HPA keeps, or a node drain could never evict one.
    assert pdb["minAvailable"] < hpa["minReplicas"]

    monitor = r["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"


def test_prometheus_rule_is_alerts_yml(rendered):
    _, r = rendered
    alerts = yaml.safe_load((REPO / "docker" / "prometheus" / "alerts.yml").read_text())
    assert r["PrometheusRule"]["spec"]["groups"] == alerts["groups"], \
        "run `python docker/k8s/make_prometheusrule.py` after editing docker/prometheus/alerts.yml"


def test_renderer_rejects_what_it_cannot_render(tmp_path):
    (tmp_path / "kustomization.yaml").write_text("resources: [a.yaml]\nnamePrefix: x-\n")
    with pytest.raises(kustomize.Unsupported):
        kustomize.render(tmp_path)


def test_manifests_validate_against_the_kubernetes_schemas(rendered):
    validator = pytest.importorskip("kubernetes_validate", reason="the kubernetes-validate package is not installed")
    _, resources = rendered
    for resource in resources.values():
        if resource["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # Prometheus Operator CRDs: no schema shipped; their fields are checked above
        validator.validate(resource, "1.30.0", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
@pytest.mark.parametrize("variant", sorted(OVERLAYS))
def test_kubectl_kustomize_renders_the_same(variant):
    run = subprocess.run(["kubectl", "kustomize", str(OVERLAYS[variant])], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    theirs = by_kind([doc for doc in yaml.safe_load_all(run.stdout) if doc])
    assert theirs == by_kind(kustomize.render(OVERLAYS[variant]))


AFFINITY = K8S / "overlays" / "affinity"


def test_affinity_overlay_puts_the_shipped_nginx_config_in_front_of_headless_pods():
    spec = importlib.util.spec_from_file_location("make_affinity_config", K8S / "make_affinity_config.py")
    make_affinity_config = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_affinity_config)  # a script beside the manifests, not a package

    resources = kustomize.render(AFFINITY)
    named = {(r["kind"], r["metadata"]["name"]): r for r in resources}
    base = {(r["kind"], r["metadata"]["name"]) for r in kustomize.render(K8S / "base")}
    assert base <= set(named)  # the servers, HPA, PDB and monitoring as in the base
    server = named[("Deployment", "agentprm")]
    pod_labels = server["spec"]["template"]["metadata"]["labels"]

    headless = named[("Service", "agentprm-pods")]["spec"]
    assert headless["clusterIP"] == "None" and headless["selector"].items() <= pod_labels.items()
    (port,) = headless["ports"]
    assert port["port"] == 8000 and port["targetPort"] in {p["name"] for p in container({"Deployment": server})["ports"]}

    proxy = named[("Deployment", "agentprm-proxy")]
    proxy_pod = proxy["spec"]["template"]
    assert proxy["spec"]["replicas"] >= 2
    assert not proxy_pod["metadata"]["labels"].items() <= server["spec"]["selector"]["matchLabels"].items()
    (nginx,) = proxy_pod["spec"]["containers"]
    image, tag = nginx["image"].split(":")
    assert image == "nginx" and tuple(int(x) for x in tag.split("-")[0].split(".")) >= (1, 27, 3)  # `resolve`
    assert nginx["readinessProbe"]["httpGet"]["path"] == "/nginx-health"
    (mount,) = nginx["volumeMounts"]
    (volume,) = proxy_pod["spec"]["volumes"]
    assert mount["name"] == volume["name"] and mount["mountPath"] == "/etc/nginx/templates"
    front = named[("Service", "agentprm-proxy")]["spec"]
    assert front["selector"].items() <= proxy_pod["metadata"]["labels"].items()
    assert front["ports"][0]["targetPort"] == nginx["ports"][0]["name"]

    # The ConfigMap is docker/nginx/agentprm.conf with the cluster's resolver and the headless Service.
    config = named[("ConfigMap", volume["configMap"]["name"])]
    (template_name, text), = config["data"].items()
    assert template_name.endswith(".template")
    source = (REPO / "docker" / "nginx" / "agentprm.conf").read_text()
    assert text == make_affinity_config.cluster_config(source), \
        "run `python docker/k8s/make_affinity_config.py` after editing docker/nginx/agentprm.conf"
    assert "kube-dns.kube-system" in text and text.count("agentprm-pods.${POD_NAMESPACE}.svc.cluster.local:8000") == 2
    assert {e["name"] for e in nginx["env"]} >= {"POD_NAMESPACE"}
    assert "hash $http_x_episode_id consistent;" in text and "least_conn;" in text

    validator = pytest.importorskip("kubernetes_validate", reason="the kubernetes-validate package is not installed")
    for resource in resources:
        if not resource["apiVersion"].startswith("monitoring.coreos.com/"):
            validator.validate(resource, "1.30.0", strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kubectl_kustomize_renders_the_affinity_overlay_the_same():
    run = subprocess.run(["kubectl", "kustomize", str(AFFINITY)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    key = lambda r: (r["kind"], r["metadata"]["name"])  # noqa: E731
    theirs = sorted((doc for doc in yaml.safe_load_all(run.stdout) if doc), key=key)
    assert theirs == sorted(kustomize.render(AFFINITY), key=key)
