"""Monitoring as deployed: every metric and label that the alerts, the Grafana dashboard and the HPA's
adapter rule query is exported by a live `agentprm serve`; the compose file, the Prometheus config, the
alert rules and the dashboard are well-formed and wired to each other; promtool (when installed) accepts
the config and passes the alert unit tests in docker/prometheus/alerts_test.yml.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.settings import ServerSettings
from tests.conftest import REPO, trajectory_json
from tests.docker import promql

DOCKER = REPO / "docker"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "agentprm.json"
COMPOSE = DOCKER / "compose.yaml"
ADAPTER = DOCKER / "k8s" / "prometheus-adapter" / "values.yaml"

# Series that Prometheus makes itself for every target, and the labels it attaches to every sample.
PROMETHEUS_SYNTHETIC = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}
TARGET_LABELS = {"job", "instance"}
# Labels that the Prometheus Operator's ServiceMonitor adds (used by the adapter rule).
KUBERNETES_TARGET_LABELS = TARGET_LABELS | {"namespace", "pod", "service", "container", "endpoint"}


def alert_rules() -> list[dict]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for panel in dashboard()["panels"] for t in panel.get("targets", [])]


def adapter_series_queries() -> list[str]:
    return [rule["seriesQuery"] for rule in yaml.safe_load(ADAPTER.read_text())["rules"]["custom"]]


@pytest.fixture(scope="module")
def exported(live_server) -> dict[str, set[str]]:
    """Sample name -> label names, scraped from a live server after a score request and a rejected one
    (labelled series appear only once something was counted)."""
    with httpx.Client(base_url=live_server, timeout=60) as client:
        ok = client.post("/v1/score", json={"trajectories": [trajectory_json("go to the red ball", 3)]})
        assert ok.status_code == 200, ok.text
        assert client.post("/v1/score", json={"trajectories": []}).status_code == 422
        text = client.get("/metrics").text
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def check_expression(expr: str, exported: dict[str, set[str]], target_labels: set[str]) -> list[str]:
    problems = []
    used_labels: set[str] = set(target_labels)
    for metric, labels in promql.selectors(expr):
        if metric in PROMETHEUS_SYNTHETIC:
            used_labels |= labels
            continue
        if metric not in exported:
            problems.append(f"{metric} is not exported by /metrics (in {expr!r})")
            continue
        unknown = labels - exported[metric] - target_labels
        if unknown:
            problems.append(f"{metric} has no label(s) {sorted(unknown)} (in {expr!r})")
        used_labels |= exported[metric]
    unknown_grouping = promql.grouping_labels(expr) - used_labels
    if unknown_grouping:
        problems.append(f"grouping by label(s) {sorted(unknown_grouping)} that no queried series has (in {expr!r})")
    return problems


def test_every_queried_metric_and_label_is_exported_by_a_live_server(exported):
    problems = []
    for rule in alert_rules():
        problems += check_expression(rule["expr"], exported, TARGET_LABELS)
    for expr in dashboard_exprs():
        expr = expr.replace("$__rate_interval", "1m")
        problems += check_expression(expr, exported, TARGET_LABELS)
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            metric, labels, label = promql.grafana_label_values(variable["query"]["query"])
            problems += check_expression(f"{metric}", exported, TARGET_LABELS)
            if not ({label} | labels) <= exported.get(metric, set()) | TARGET_LABELS:
                problems.append(f"variable {variable['name']}: {metric} lacks a label of {sorted({label} | labels)}")
    for query in adapter_series_queries():
        problems += check_expression(query, exported, KUBERNETES_TARGET_LABELS)
    assert not problems, "\n".join(problems)


def test_histogram_queries_use_the_exported_suffixes(exported):
    # A query on a bare histogram name returns nothing; the dashboard must use _bucket/_sum/_count.
    histograms = {name[: -len("_bucket")] for name in exported if name.endswith("_bucket")}
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    bare = {m for e in exprs for m in promql.metric_names(e) if m in histograms}
    assert not bare, f"histograms queried without a suffix: {sorted(bare)}"
    quantiles = [e for e in exprs if "histogram_quantile" in e]
    assert quantiles and all("_bucket" in e and "le" in promql.grouping_labels(e) for e in quantiles)


def test_the_checker_catches_a_metric_or_label_the_server_does_not_export(exported):
    assert check_expression("rate(agentprm_requests_total[5m])", exported, TARGET_LABELS) == []
    assert check_expression("rate(agentprm_request_total[5m])", exported, TARGET_LABELS)
    assert check_expression('sum(rate(agentprm_errors_total{status="500"}[5m]))', exported, TARGET_LABELS)
    assert check_expression("sum by (model) (agentprm_queue_depth)", exported, TARGET_LABELS)


def test_promql_extraction():
    expr = ('sum by (route, le) (rate(foo_bucket{a="x{y}", instance=~"$instance"}[$__rate_interval])) '
            '/ on (instance) group_left bar_total offset 5m > 1e-3 and up{job="agentprm"} == bool 0')
    assert promql.metric_names(expr) == {"foo_bucket", "bar_total", "up"}
    assert dict(promql.selectors(expr))["foo_bucket"] == {"a", "instance"}
    assert promql.grouping_labels(expr) == {"route", "le", "instance"}


def test_dashboard_covers_what_an_operator_needs():
    queried = {m for e in dashboard_exprs() for m in promql.metric_names(e)}
    required = {
        "agentprm_requests_total",  # request rate by route and status
        "agentprm_request_duration_seconds_bucket",  # p50 / p99 latency
        "agentprm_queue_depth",
        "agentprm_batch_size_bucket", "agentprm_batch_tokens_bucket",
        "agentprm_tokens_computed_total", "agentprm_tokens_cached_total",
        "agentprm_steps_scored_total",
        "agentprm_errors_total",
        "process_resident_memory_bytes",
    }
    assert required <= queried, f"missing panels for {sorted(required - queried)}"
    rate_by = [promql.grouping_labels(e) for e in dashboard_exprs() if "agentprm_requests_total" in e]
    assert {"route", "status"} in rate_by
    assert any("histogram_quantile(0.99" in e for e in dashboard_exprs())
    assert any("histogram_quantile(0.50" in e or "histogram_quantile(0.5," in e for e in dashboard_exprs())


def test_dashboard_is_loadable_and_its_panels_do_not_overlap():
    dash = dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"] for v in dash["templating"]["list"]}
    occupied: dict[tuple[int, int], int] = {}
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}" and "datasource" in variables
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"])
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        g = panel["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps panel {occupied[(x, y)]}"
                occupied[(x, y)] = panel["id"]
        for expr in (t["expr"] for t in panel["targets"]):
            assert set(_variables_in(expr)) <= variables | {"__rate_interval"}, expr


def _variables_in(expr: str) -> list[str]:
    return re.findall(r"\$\{?(\w+)", expr)


def test_alerts_cover_errors_latency_queue_and_readiness():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    uses = {name: promql.metric_names(rule["expr"]) for name, rule in rules.items()}
    assert any("agentprm_requests_total" in m and '"5.."' in rules[n]["expr"] for n, m in uses.items())
    assert any("agentprm_request_duration_seconds_bucket" in m and "histogram_quantile(0.99" in rules[n]["expr"]
               for n, m in uses.items())
    assert any("agentprm_queue_depth" in m for m in uses.values())
    assert any("agentprm_ready" in m for m in uses.values())
    for name, rule in rules.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        assert rule["for"], name


def test_compose_wires_the_service_prometheus_and_grafana():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    gpu, cpu = services["agentprm"], services["agentprm-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert "resources" not in cpu["deploy"]  # no GPU reservation on the CPU profile
    dockerfile = (REPO / "Dockerfile").read_text()
    declared_args = {line.split()[1].split("=")[0] for line in dockerfile.splitlines() if line.startswith("ARG ")}
    for service in (gpu, cpu):
        assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
        assert set(service["build"].get("args", {})) <= declared_args
        assert any(v.split(":")[-1] == "/models" for v in service["volumes"])
        # Replicas are reached through nginx only: none publishes a host port, each runs AGENTPRM_REPLICAS copies.
        assert "ports" not in service and service["expose"] == ["8000"]
        assert int(service["deploy"]["replicas"].split(":-")[-1].rstrip("}")) >= 2
        grace = float(service["stop_grace_period"].rstrip("s"))
        drain = float(service["environment"]["AGENTPRM_DRAIN_TIMEOUT_S"].split(":-")[-1].rstrip("}"))
        assert grace > drain
    assert cpu["environment"]["AGENTPRM_DEVICE"] == "cpu" and gpu["environment"]["AGENTPRM_DEVICE"] == "cuda"
    known = {f"AGENTPRM_{name.upper()}" for name in ServerSettings.model_fields}
    for service in (gpu, cpu):
        assert set(service["environment"]) <= known
        # Prometheus scrapes without a key, so /metrics must stay open by default even when keys are set.
        default = service["environment"]["AGENTPRM_METRICS_AUTH"].split(":-")[-1].rstrip("}")
        assert ServerSettings(metrics_auth=default).metrics_auth is False
    assert cpu["build"]["args"]["TORCH_VERSION"].endswith("+cpu")

    # nginx publishes the API and runs the shipped affinity config.
    proxy = services["nginx"]
    assert proxy["ports"] == ["8000:8000"] and "profiles" not in proxy
    (conf,) = [v for v in proxy["volumes"] if v.endswith(":/etc/nginx/conf.d/default.conf:ro")]
    assert (DOCKER / conf.split(":")[0]).resolve() == DOCKER / "nginx" / "agentprm.conf"

    # Prometheus scrapes every replica (DNS service discovery of the name both server variants answer to).
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "agentprm"]
    (discovery,) = job["dns_sd_configs"]
    (host,), port = discovery["names"], discovery["port"]
    assert discovery["type"] == "A" and port == 8000 and "EXPOSE 8000" in dockerfile
    assert host in gpu.get("hostname", "agentprm") and host in cpu["networks"]["default"]["aliases"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"] if v.startswith("./")}
    assert {Path(p).name for p in prometheus["rule_files"]} == {"alerts.yml"}
    for rule_file in prometheus["rule_files"]:
        assert (DOCKER / mounts[rule_file]).resolve() == ALERTS
    for source in mounts.values():
        assert (DOCKER / source).exists(), source

    # Grafana: provisioned datasource (uid the dashboard's default) and the dashboard folder.
    grafana = services["grafana"]
    g_mounts = {v.split(":")[1]: DOCKER / v.split(":")[0] for v in grafana["volumes"] if v.startswith("./")}
    provisioning = g_mounts["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "agentprm.yml").read_text())["providers"]
    assert g_mounts[provider["options"]["path"]].resolve() == DASHBOARD.parent
    default_ds = [v for v in dashboard()["templating"]["list"] if v["name"] == "datasource"][0]
    assert default_ds["current"]["value"] == datasource["uid"]
    for service in services.values():
        if "image" in service and "build" not in service:
            assert ":" in service["image"] and not service["image"].endswith(":latest"), service["image"]


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")


@needs_promtool
def test_promtool_accepts_the_config_and_the_rules(tmp_path):
    config = yaml.safe_load(PROMETHEUS.read_text())
    config["rule_files"] = [str(ALERTS)]  # the container path /etc/prometheus/alerts.yml, here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    for args in (["check", "config", str(tmp_path / "prometheus.yml")], ["check", "rules", str(ALERTS)]):
        run = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert run.returncode == 0, run.stdout + run.stderr


@needs_promtool
def test_alerts_fire_for_a_troubled_instance_and_not_a_healthy_one():
    run = subprocess.run([PROMTOOL, "test", "rules", str(DOCKER / "prometheus" / "alerts_test.yml")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    tested = {t["alertname"] for case in yaml.safe_load((DOCKER / "prometheus" / "alerts_test.yml").read_text())["tests"]
              for t in case["alert_rule_test"]}
    assert tested == {rule["alert"] for rule in alert_rules()}


def test_metrics_reference_lists_exactly_the_exported_metrics(exported):
    # The "Metrics reference" subsection of README.md's Deploy section, up to the next section.
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### Metrics reference"):]
    section = section.split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(agentprm_\w+)`", section, flags=re.M))
    families = {_family(name, exported) for name in exported if name.startswith("agentprm_")}
    assert documented == families, (f"undocumented: {sorted(families - documented)}, "
                                    f"documented but not exported: {sorted(documented - families)}")


def _family(sample: str, exported: dict[str, set[str]]) -> str:
    """The name a user queries: a histogram without its suffixes, a counter with _total."""
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        base = sample[: -len(suffix)]
        if sample.endswith(suffix) and f"{base}_bucket" in exported:
            return base
    if sample.endswith("_created") and f"{sample[: -len('_created')]}_total" in exported:
        return f"{sample[: -len('_created')]}_total"
    return sample
