"""The deploy files: Prometheus and Grafana query only metrics the stack exports; compose.yaml
fits together; the Helm chart renders (Helm's own engine) to manifests valid for Kubernetes."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helm_python as helm
import httpx
import kubernetes_validate
import pytest
import yaml
from helpers import start_gateway
from prometheus_client.parser import text_string_to_metric_families

from qwenstack.engine import roles
from qwenstack.gateway import gpu_metrics
from qwenstack.settings.engine import EngineSettings

DEPLOY = Path(__file__).parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "qwenstack.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

# Exported by parts other agents own (names and labels as agreed for the project), only where
# a GPU is, or by Prometheus itself: none of these can appear on this test's gateway page.
ELSEWHERE: dict[str, set[str]] = {
    "qwenstack_rate_limited_total": {"key", "limit"},
    "qwenstack_requests_queued": set(),
    "qwenstack_admission_rejected_total": {"reason"},
    "qwenstack_engine_circuit_open": {"replica"},
    "qwenstack_cache_lookups_total": {"result"},
    "qwenstack_cache_bytes": set(),
    "qwenstack_cache_entries": set(),
    **{name: {"gpu"} for name in gpu_metrics.METRICS},
    "up": {"job", "instance"},
}

PROMQL_WORDS = set(
    "by without on ignoring group_left group_right and or unless bool offset".split()
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads.

    Not a PromQL parser (none is packaged for Python): strings, label matchers, ranges and
    grouping clauses are cut out, then every name that is not a function call or keyword is a
    metric. Good enough for the expressions in these files, which the assertions below pin down.
    """
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values, regexes)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(\s*\()?", expr):
        name, call = match.groups()
        if not call and name not in PROMQL_WORDS:
            names.add(name)
    return names


def label_names(expr: str) -> set[str]:
    """The label names an expression matches on or groups by."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    matched = {
        label
        for matchers in re.findall(r"\{([^}]*)\}", expr)
        for label in re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers)
    }
    grouped = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
    return matched | {
        label.strip() for labels in grouped for label in labels.split(",") if label.strip()
    }


def test_metric_names_are_read_from_promql():
    expr = (
        "histogram_quantile(0.95, sum by (le, model) ("
        'rate(qwenstack_request_duration_seconds_bucket{status=~"5..", model="x"}[5m])))'
        " > 60 and deriv(sum(vllm:num_requests_waiting)[10m:1m]) > 0"
    )
    assert metric_names(expr) == {
        "qwenstack_request_duration_seconds_bucket",
        "vllm:num_requests_waiting",
    }
    assert label_names(expr) == {"le", "model", "status"}


def _dashboard_queries(dashboard: dict) -> Iterator[str]:
    def panels(items: list[dict]) -> Iterator[dict]:
        for item in items:
            yield item
            yield from panels(item.get("panels", []))

    for panel in panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(metric, label): only the metric is a metric.
            yield variable["definition"].split(",")[0] + ")"


def _alert_queries(rules: dict) -> Iterator[str]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def test_prometheus_config_scrapes_the_gateway_and_loads_the_rules():
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    # /metrics needs a key by default (auth.protect_metrics): Prometheus sends its own.
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"].startswith("/run/secrets/")


def test_limiter_outage_is_alerted_whichever_way_it_fails():
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    assert metric_names(alerts["QwenstackLimiterFailing"]["expr"]) == {
        "qwenstack_limiter_errors_total"}


def test_alert_rules_cover_what_the_issue_asks_for():
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name in (
        "QwenstackHighErrorRatio",
        "QwenstackHighLatencyP95",
        "QwenstackEngineDown",
        "QwenstackKvCacheNearFull",
        "QwenstackEngineQueueGrowing",
        "QwenstackLimiterFailing",
    ):
        assert alerts[name]["annotations"]["summary"]
        assert alerts[name]["labels"]["severity"] in ("critical", "warning")


def test_grafana_dashboard_and_provisioning_parse():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in dashboard["panels"] if p["type"] != "row"}
    for title in (
        "Requests per second by status",
        "End-to-end latency",
        "Time to first token",
        "Tokens per second",
        "Error ratio",
        "Answer cache hit ratio",
        "KV-cache usage",
        "GPU utilisation",
        "Engines up",
    ):
        assert title in titles
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    provisioning = DEPLOY / "grafana" / "provisioning"
    [datasource] = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["type"] == "prometheus"
    [provider] = yaml.safe_load((provisioning / "dashboards" / "qwenstack.yml").read_text())[
        "providers"
    ]
    assert provider["type"] == "file"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> dict[str, set[str]]:
    """Every sample name on a live gateway's /metrics page, vLLM's included, with its labels."""
    gateway = start_gateway(tmp_path_factory.mktemp("deploy"), engine_url)
    try:
        # One answered stream, so that every labelled histogram has a series.
        body = {"model": "tiny-qwen3", "prompt": "Hi", "max_tokens": 4, "stream": True}
        with httpx.stream("POST", f"{gateway.url}/v1/completions", json=body, timeout=60) as rsp:
            rsp.read()
        page = httpx.get(f"{gateway.url}/metrics", timeout=10).text
    finally:
        gateway.stop()
    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(page):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    return labels


@pytest.mark.parametrize("source", ["dashboard", "alerts", "autoscaling"])
def test_every_queried_metric_and_label_is_exported(exported: dict[str, set[str]], source: str):
    if source == "dashboard":
        queries = list(_dashboard_queries(json.loads(DASHBOARD.read_text())))
    elif source == "alerts":
        queries = list(_alert_queries(yaml.safe_load(ALERTS.read_text())))
    else:
        queries = [rule["metricsQuery"].replace("<<.LabelMatchers>>", "")
                   for rule in adapter_rules(by_kind(render_chart(ENGINE_AUTOSCALING)))]
    known = {**ELSEWHERE, **exported}
    queried = set().union(*(metric_names(q) for q in queries))
    assert queried, "no metric found in the queries"
    assert queried - known.keys() == set()
    for query in queries:
        # A label an expression matches or groups by must be on one of the metrics it reads.
        available = set().union(*(known[name] for name in metric_names(query)))
        assert label_names(query) <= available, query
    # And the file reads some of each kind: the gateway's own, and the engines' via the gateway.
    if source != "autoscaling":  # only the engines' there
        assert any(name.startswith("qwenstack_") and name in exported for name in queried)
    assert any(name.startswith("vllm:") and name in exported for name in queried)


def test_compose_file_brings_up_the_whole_stack():
    # Docker does not run here: the file is checked by parsing, not by deploying.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) >= {"engine", "gateway", "ui", "redis", "postgres", "milvus",
                             "prometheus", "grafana"}
    stages = set(re.findall(r"^FROM \S+ AS (\w+)$", (DEPLOY / "Dockerfile").read_text(), re.M))
    for name in ("gateway", "ui"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
        assert build["target"] in stages
    engine = services["engine"]
    assert engine["image"].startswith("vllm/vllm-openai:")
    assert "--enable-prefix-caching" in engine["command"]
    assert "ports" not in engine  # vLLM's unauthenticated endpoints stay inside the network
    gateway = services["gateway"]["environment"]
    assert gateway["QWENSTACK_ENGINE__DISCOVERY_DNS"] == "engine"
    # Qwen3-Instruct-2507's parsers, as `up` picks them, and the gateway told the same.
    assert {"--enable-auto-tool-choice", "--tool-call-parser=hermes"} <= set(engine["command"])
    assert not any(arg.startswith("--reasoning-parser") for arg in engine["command"])
    assert (gateway["QWENSTACK_ENGINE__TOOL_CALL_PARSER"],
            gateway["QWENSTACK_ENGINE__REASONING_PARSER"]) == ("hermes", "none")
    assert gateway["QWENSTACK_RAG__MILVUS_URI"] == "http://milvus:19530"
    assert gateway["QWENSTACK_DATABASE_URL"].startswith("postgresql+psycopg://")
    assert services["ui"]["environment"]["QWENSTACK_UI__GATEWAY_URL"] == "http://gateway:8000"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DEPLOY / source).exists(), source
            assert source.startswith(".") or source in compose["volumes"], source
        for dependency in service.get("depends_on", []):
            assert dependency in services
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [target] = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "gateway:8000"  # the compose service


def test_compose_models_file_adds_an_engine_per_model_the_gateway_is_told_of():
    """compose.models.yaml laid over compose.yaml (Compose merges a service's maps key by key):
    every model the gateway is told of has a vLLM service serving it under that name, in its
    role's flags as `up` gives them, found by the gateway's DNS names, each on a GPU of its own;
    the knowledge bases' embedder and reranker are two of them."""
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    extra = yaml.safe_load((DEPLOY / "compose.models.yaml").read_text())
    services = compose["services"]
    for name, service in extra["services"].items():
        merged = services.setdefault(name, {})
        for field, value in service.items():
            merged[field] = {**merged.get(field, {}), **value} if isinstance(value, dict) \
                and field in ("environment", "depends_on") else value
    gateway = services["gateway"]["environment"]
    engines = {name: service for name, service in services.items()
               if service.get("image", "").startswith("vllm/vllm-openai:")}
    assert set(gateway["QWENSTACK_ENGINE__DISCOVERY_DNS"].split()) == set(engines)
    assert set(services["gateway"]["depends_on"]) >= set(engines)
    served = EngineSettings(models=json.loads(gateway["QWENSTACK_ENGINE__MODELS"])).served()

    def serving(model: str) -> list[str]:
        [command] = [service["command"] for service in engines.values()
                     if f"--served-model-name={model}" in service["command"]]
        return command

    for entry in served:
        command = " ".join(serving(entry.served_model_name or ""))
        if entry.role == "chat":
            assert "--runner" not in command
            continue
        conversion = roles.POOLING_CONVERSION[entry.role]
        assert f"--runner=pooling --convert={conversion}" in command
    overrides = next(arg for arg in serving("Qwen3-Reranker-0.6B")
                     if arg.startswith("--hf-overrides="))
    assert json.loads(overrides.partition("=")[2]) == roles.QWEN3_RERANKER_OVERRIDES
    roles_of = {entry.served_model_name: entry.role for entry in served}
    assert roles_of[gateway["QWENSTACK_RAG__EMBEDDING_MODEL"]] == "embed"
    assert roles_of[gateway["QWENSTACK_RAG__RERANK_MODEL"]] == "rerank"
    gpus = [device["device_ids"] for name in extra["services"] if name in engines
            for device in engines[name]["deploy"]["resources"]["reservations"]["devices"]]
    assert len(gpus) == 2 and "0" not in sum(gpus, []) and gpus[0] != gpus[1]


def test_compose_keeps_limits_unevictable_and_monitoring_on_this_host():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    gateway = services["gateway"]["environment"]
    # Limits in a Redis of their own that never evicts; cache pressure cannot reset them.
    limits_host = gateway["QWENSTACK_LIMITS__REDIS_URL"].split("//")[1].split(":")[0]
    cache_host = gateway["QWENSTACK_CACHE__REDIS_URL"].split("//")[1].split(":")[0]
    assert limits_host != cache_host
    command = services[limits_host]["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
    assert limits_host in services["gateway"]["depends_on"]
    # Prometheus and Grafana: loopback only, Grafana with no default password.
    for name in ("prometheus", "grafana"):
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)
    password = services["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    assert re.fullmatch(r"\$\{GRAFANA_ADMIN_PASSWORD:\?[^}]+\}", password)
    # Prometheus reads its gateway key from the compose secret prometheus.yml names.
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    key_file = prometheus["scrape_configs"][0]["authorization"]["credentials_file"]
    [secret] = services["prometheus"]["secrets"]
    assert key_file == f"/run/secrets/{secret}" and secret in compose["secrets"]


CHART = DEPLOY / "helm" / "qwenstack"
CHART_SECRETS = {"secrets": {"pepper": "pepper", "uiAuthSecret": "ui"},
                 "postgresql": {"password": "pw"}}


def render_chart(values: dict) -> list[dict]:
    """The chart rendered by Helm's own template engine (its Go SDK, from the PyPI package
    helm-python-sdk), as manifests validated against the Kubernetes schemas (strict: unknown
    fields are errors) shipped by the PyPI package kubernetes-validate."""
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(values, name="qs", namespace="ai")
    manifests = [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]
    for manifest in manifests:
        kubernetes_validate.validate(manifest, "1.33", strict=True)
    return manifests


def by_kind(manifests: list[dict]) -> dict[tuple[str, str], dict]:
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def admitted(policy: dict, labels: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy lets a pod of the same namespace with these labels in on `port`
    (the rule forms the chart uses: podSelector.matchLabels and TCP ports)."""
    for rule in policy["spec"]["ingress"]:
        sources = rule.get("from", [])
        ports = {p["port"] for p in rule.get("ports", [])}
        if (not sources or any(s["podSelector"]["matchLabels"].items() <= labels.items()
                               for s in sources)) and (not ports or port in ports):
            return True
    return False


def test_helm_chart_renders_valid_manifests_that_fit_together():
    assert helm.lint(str(CHART))["errors"] == []
    manifests = by_kind(render_chart(CHART_SECRETS))
    engine = manifests["Deployment", "qs-engine"]["spec"]["template"]["spec"]["containers"][0]
    assert engine["image"].startswith("vllm/vllm-openai:")
    assert engine["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert engine["readinessProbe"]["httpGet"]["path"] == "/health"
    assert "--enable-prefix-caching" in engine["args"]
    assert {"--enable-auto-tool-choice", "--tool-call-parser=hermes"} <= set(engine["args"])
    assert not any(arg.startswith("--reasoning-parser") for arg in engine["args"])
    headless = manifests["Service", "qs-engine"]["spec"]
    assert headless["clusterIP"] == "None"
    config = manifests["ConfigMap", "qs-gateway"]["data"]
    assert config["QWENSTACK_ENGINE__DISCOVERY_DNS"] == "qs-engine.ai.svc.cluster.local"
    assert config["QWENSTACK_ENGINE__DISCOVERY_PORT"] == str(headless["ports"][0]["port"])
    assert (config["QWENSTACK_ENGINE__TOOL_CALL_PARSER"],
            config["QWENSTACK_ENGINE__REASONING_PARSER"]) == ("hermes", "none")
    gateway = manifests["Deployment", "qs-gateway"]
    hpa = manifests["HorizontalPodAutoscaler", "qs-gateway"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == "qs-gateway" and "replicas" not in gateway["spec"]
    # Every Secret key a pod reads exists, and the gateways share limits, keys and the pepper.
    secret = manifests["Secret", "qs-secrets"]["stringData"]
    for manifest in manifests.values():
        if manifest["kind"] in ("Deployment", "StatefulSet"):
            for container in manifest["spec"]["template"]["spec"]["containers"]:
                for env in container.get("env", []):
                    if "secretKeyRef" in env.get("valueFrom", {}):
                        assert env["valueFrom"]["secretKeyRef"]["key"] in secret, env
    env = {e["name"] for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert {"QWENSTACK_AUTH__PEPPER", "QWENSTACK_DATABASE_URL",
            "QWENSTACK_LIMITS__REDIS_URL"} <= env
    assert secret["database-url"] == (
        "postgresql+psycopg://qwenstack:pw@qs-postgresql:5432/qwenstack")
    assert secret["redis-url"] == "redis://qs-redis:6379/0"
    # The limiter's Redis is its own, and never evicts.
    limits_env = next(e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]
                      if e["name"] == "QWENSTACK_LIMITS__REDIS_URL")
    assert limits_env["valueFrom"]["secretKeyRef"]["key"] == "limiter-redis-url"
    assert secret["limiter-redis-url"] == "redis://qs-limiter-redis:6379/0"
    for name, policy in (("qs-limiter-redis", "noeviction"), ("qs-redis", "allkeys-lru")):
        args = manifests["Deployment", name]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert args[args.index("--maxmemory-policy") + 1] == policy
    # Prometheus's scrape job sends the key from the Secret.
    [job] = yaml.safe_load(manifests["ConfigMap", "qs-prometheus-scrape"]["data"][
        "scrape-configs.yaml"])
    key_file = job["authorization"]["credentials_file"]
    assert key_file == "/etc/prometheus/secrets/qs-secrets/metrics-key" and "metrics-key" in secret
    # Every Service selects pods some workload makes.
    pod_labels = [m["spec"]["template"]["metadata"]["labels"] for m in manifests.values()
                  if m["kind"] in ("Deployment", "StatefulSet")]
    for service in (m for m in manifests.values() if m["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= labels.items() for labels in pod_labels), service["metadata"]
    # Only gateway pods reach the engines (and the Redis pods); every other pod is kept out.
    for component, port in (("engine", 8000), ("redis", 6379), ("limiter-redis", 6379)):
        policy = manifests["NetworkPolicy", f"qs-{component}"]
        [target] = [labels for labels in pod_labels
                    if policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()]
        assert target["app.kubernetes.io/component"] == component
        for labels in pod_labels:
            expected = labels["app.kubernetes.io/component"] == "gateway"
            assert admitted(policy, labels, port) == expected, (component, labels)


def test_helm_chart_with_external_services_and_fixed_gateways():
    manifests = by_kind(render_chart({
        "secrets": {"pepper": "pepper"},
        "redis": {"deploy": False, "url": "redis://r.example:6379/0"},
        "limiterRedis": {"deploy": False, "url": "redis://limits.example:6379/0"},
        "postgresql": {"deploy": False, "url": "postgresql+psycopg://u:p@pg.example/q"},
        "milvus": {"uri": "http://milvus.example:19530"},
        "gateway": {"autoscaling": {"enabled": False}, "replicas": 3},
        "ui": {"enabled": False},
        "engine": {"model": "Qwen/Qwen3-4B-Thinking-2507", "reasoningParser": "qwen3"},
    }))
    kinds = {kind for kind, _ in manifests}
    assert "StatefulSet" not in kinds and "HorizontalPodAutoscaler" not in kinds
    assert ("Deployment", "qs-redis") not in manifests
    assert ("Deployment", "qs-limiter-redis") not in manifests
    # External Redis: no policy for pods that are not here; the engines keep theirs.
    assert {name for kind, name in manifests if kind == "NetworkPolicy"} == {"qs-engine"}
    assert ("Deployment", "qs-ui") not in manifests
    assert manifests["Deployment", "qs-gateway"]["spec"]["replicas"] == 3
    secret = manifests["Secret", "qs-secrets"]["stringData"]
    assert secret["redis-url"] == "redis://r.example:6379/0"
    assert secret["limiter-redis-url"] == "redis://limits.example:6379/0"
    config = manifests["ConfigMap", "qs-gateway"]["data"]
    assert config["QWENSTACK_RAG__MILVUS_URI"] == "http://milvus.example:19530"
    # A thinking Qwen3: its engines parse reasoning, and the gateways know it.
    engine = manifests["Deployment", "qs-engine"]["spec"]["template"]["spec"]["containers"][0]
    assert "--reasoning-parser=qwen3" in engine["args"]
    assert config["QWENSTACK_ENGINE__REASONING_PARSER"] == "qwen3"


ENGINE_AUTOSCALING = {**CHART_SECRETS, "engine": {"autoscaling": {"enabled": True}}}


def adapter_rules(manifests: dict[tuple[str, str], dict]) -> list[dict]:
    return yaml.safe_load(manifests["ConfigMap", "qs-prometheus-adapter-rules"]["data"][
        "external-rules.yaml"])


def test_helm_chart_scales_engines_on_their_queue_and_kv_cache_when_asked():
    fixed = by_kind(render_chart(CHART_SECRETS))
    assert ("HorizontalPodAutoscaler", "qs-engine") not in fixed  # off by default
    assert fixed["Deployment", "qs-engine"]["spec"]["replicas"] == 2
    manifests = by_kind(render_chart(ENGINE_AUTOSCALING))
    engine = manifests["Deployment", "qs-engine"]
    assert "replicas" not in engine["spec"]  # the HPA's to set
    hpa = manifests["HorizontalPodAutoscaler", "qs-engine"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                     "name": "qs-engine"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (1, 8)
    targets = {m["external"]["metric"]["name"]: m["external"]["target"] for m in hpa["metrics"]}
    assert targets == {"qwenstack_engine_requests_waiting": {"type": "Value", "value": "4"},
                       "qwenstack_engine_kv_cache_usage": {"type": "Value", "value": "0.8"}}
    # prometheus-adapter serves each of them, averaged per engine, from what the scrape job
    # reads (the gateways' pages, labelled with their namespace for the rules' matchers).
    rules = {rule["name"]["as"]: rule for rule in adapter_rules(manifests)}
    assert rules.keys() == targets.keys()
    assert {metric_names(rule["metricsQuery"].replace("<<.LabelMatchers>>", "")).pop()
            for rule in rules.values()} == {"vllm:num_requests_waiting",
                                            "vllm:kv_cache_usage_perc"}
    assert all(rule["metricsQuery"].startswith("avg(") for rule in rules.values())
    [job] = yaml.safe_load(manifests["ConfigMap", "qs-prometheus-scrape"]["data"][
        "scrape-configs.yaml"])
    assert {"source_labels": ["__meta_kubernetes_namespace"],
            "target_label": "namespace"} in job["relabel_configs"]
    # Scale-in drains: the grace period holds the preStop's whole wait, plus vLLM's exit.
    pod = engine["spec"]["template"]["spec"]
    command = pod["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    port, out_of_dns_s, max_s = (int(arg) for arg in command[3:])
    assert port == pod["containers"][0]["ports"][0]["containerPort"]
    vllm_drain_s = next(int(arg.split("=")[1]) for arg in pod["containers"][0]["args"]
                        if arg.startswith("--shutdown-timeout="))
    assert pod["terminationGracePeriodSeconds"] > out_of_dns_s + max_s + vllm_drain_s
    assert hpa["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": pod["terminationGracePeriodSeconds"]}]


@pytest.mark.engine_exclusive  # "nothing runs" is the whole engine's state
def test_engine_drain_waits_for_the_requests_it_runs(engine_url: str):
    """The engines' preStop, run against a real vLLM: it returns at once when nothing runs,
    and only after the last answer when one does."""
    engine = by_kind(render_chart(CHART_SECRETS))["Deployment", "qs-engine"]
    command = engine["spec"]["template"]["spec"]["containers"][0]["lifecycle"]["preStop"][
        "exec"]["command"]
    port = engine_url.rsplit(":", 1)[1]
    drain = [sys.executable, *command[1:3], port, "0", "120"]
    started = time.monotonic()
    subprocess.run(drain, check=True, timeout=60)
    assert time.monotonic() - started < 10
    body = {"model": "tiny-qwen3", "prompt": "Hi", "max_tokens": 800, "ignore_eos": True,
            "stream": True}

    def drained_at() -> float:
        subprocess.run(drain, check=True, timeout=150)
        return time.monotonic()

    with ThreadPoolExecutor(1) as pool, httpx.stream(
            "POST", f"{engine_url}/v1/completions", json=body, timeout=120) as answer:
        lines = answer.iter_lines()
        next(lines)  # running now
        draining = pool.submit(drained_at)
        events = sum(1 for line in lines if line.startswith("data: "))
        finished = time.monotonic()
        drained = draining.result()
    assert events > 100  # the whole answer came while the drain waited
    assert finished - 1 < drained < finished + 5


@pytest.mark.parametrize("values, message", [
    ({"postgresql": {"password": "pw"}}, "secrets.pepper is required"),
    ({"secrets": {"pepper": "p"}}, "postgresql.password is required"),
    ({**CHART_SECRETS, "redis": {"deploy": False}}, "redis.url, or redis.deploy, is required"),
    ({**CHART_SECRETS, "limiterRedis": {"deploy": False}},
     "limiterRedis.url, or limiterRedis.deploy, is required"),
])
def test_helm_chart_refuses_to_render_without_what_replicas_must_share(values, message):
    with helm.Chart.load(CHART) as chart, pytest.raises(Exception, match=message):
        chart.render(values, name="qs", namespace="ai")


def test_engine_stream_interval_is_a_chart_value_and_a_compose_variable():
    def engine_args(values: dict) -> list[str]:
        manifests = by_kind(render_chart(values))
        return manifests["Deployment", "qs-engine"]["spec"]["template"]["spec"]["containers"][
            0]["args"]

    assert "--stream-interval=1" in engine_args(CHART_SECRETS)
    assert "--stream-interval=4" in engine_args({**CHART_SECRETS, "engine": {"streamInterval": 4}})
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert "--stream-interval=${QWENSTACK_STREAM_INTERVAL:-1}" in compose["services"]["engine"][
        "command"]


def test_helm_chart_gives_each_model_its_deployment_and_service():
    from qwenstack.engine import roles

    reranker = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"}
    manifests = by_kind(render_chart({**CHART_SECRETS, "engine": {"models": [
        {"name": "chat", "model": "Qwen/Qwen3-4B-Instruct-2507", "replicas": 2},
        {"name": "embed", "model": "Qwen/Qwen3-Embedding-0.6B", "role": "embed", "replicas": 1,
         "args": ["--max-model-len=8192"]},
        {"name": "rerank", "model": "Qwen/Qwen3-Reranker-0.6B", "role": "rerank",
         "hfOverrides": roles.QWEN3_RERANKER_OVERRIDES},
    ]}}))
    engines = {name: m for (kind, name), m in manifests.items()
               if kind == "Deployment" and name.startswith("qs-engine")}
    assert set(engines) == {"qs-engine-chat", "qs-engine-embed", "qs-engine-rerank"}
    assert [engines[f"qs-engine-{n}"]["spec"]["replicas"] for n in ("chat", "embed", "rerank")] \
        == [2, 1, 2]  # a replica count left out is engine.replicas
    args = {name.removeprefix("qs-engine-"): m["spec"]["template"]["spec"]["containers"][0][
        "args"] for name, m in engines.items()}
    assert args["chat"][:2] == ["Qwen/Qwen3-4B-Instruct-2507",
                                "--served-model-name=Qwen/Qwen3-4B-Instruct-2507"]
    assert "--tool-call-parser=hermes" in args["chat"]

    # The roles' flags are the ones `up` gives (engine/roles.py).
    def read(flags: dict[str, str]) -> dict[str, object]:
        return {flag: json.loads(value) if flag == "--hf-overrides" else value
                for flag, value in flags.items()}

    for role, config in (("embed", {}), ("rerank", reranker)):
        flags = roles.flags(role, config)
        given = dict(arg.split("=", 1) for arg in args[role] if "=" in arg)
        role_flags = {flag: value for flag, value in given.items()
                      if flag in (*roles.ROLE_FLAGS, "--hf-overrides")}
        assert read(role_flags) == read(dict(zip(flags[::2], flags[1::2], strict=True)))
        assert "--tool-call-parser" not in given and "--enable-auto-tool-choice" not in args[role]
    assert args["embed"][-1] == "--max-model-len=8192"
    # Each Service selects its model's pods only; the engines' policy covers them all.
    pods = {name: m["spec"]["template"]["metadata"]["labels"] for name, m in engines.items()}
    for name in engines:
        selector = manifests["Service", name]["spec"]["selector"].items()
        assert [pod for pod, labels in pods.items() if selector <= labels.items()] == [name]
        policy = manifests["NetworkPolicy", "qs-engine"]["spec"]["podSelector"]["matchLabels"]
        assert policy.items() <= pods[name].items()
    config = manifests["ConfigMap", "qs-gateway"]["data"]
    assert config["QWENSTACK_ENGINE__DISCOVERY_DNS"].split() == [
        f"qs-engine-{n}.ai.svc.cluster.local" for n in ("chat", "embed", "rerank")]
    described = json.loads(config["QWENSTACK_ENGINE__MODELS"])
    assert [(m["served_model_name"], m["role"], m["tool_call_parser"]) for m in described] == [
        ("Qwen/Qwen3-4B-Instruct-2507", "chat", "hermes"),
        ("Qwen/Qwen3-Embedding-0.6B", "embed", "none"),
        ("Qwen/Qwen3-Reranker-0.6B", "rerank", "none")]
    # What the gateway reads of it: the settings load, and name the same models.
    from qwenstack.settings import load_settings
    settings = load_settings(**{"engine.models": described,
                                "engine.discovery_dns": config[
                                    "QWENSTACK_ENGINE__DISCOVERY_DNS"]})
    assert [m.role for m in settings.engine.served()] == ["chat", "embed", "rerank"]
