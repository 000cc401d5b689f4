"""The Prometheus and Grafana files parse, and query only metrics the stack exports."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_gateway
from qwenstack.gateway import gpu

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
    **{name: {"gpu"} for name in gpu.METRICS},
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


def test_alert_rules_cover_what_the_issue_asks_for():
    rules = yaml.safe_load(ALERTS.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
    for name in (
        "QwenstackHighErrorRatio",
        "QwenstackHighLatencyP95",
        "QwenstackEngineDown",
        "QwenstackKvCacheNearFull",
        "QwenstackEngineQueueGrowing",
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


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_queried_metric_and_label_is_exported(exported: dict[str, set[str]], source: str):
    if source == "dashboard":
        queries = list(_dashboard_queries(json.loads(DASHBOARD.read_text())))
    else:
        queries = list(_alert_queries(yaml.safe_load(ALERTS.read_text())))
    known = {**ELSEWHERE, **exported}
    queried = set().union(*(metric_names(q) for q in queries))
    assert queried, "no metric found in the queries"
    assert queried - known.keys() == set()
    for query in queries:
        # A label an expression matches or groups by must be on one of the metrics it reads.
        available = set().union(*(known[name] for name in metric_names(query)))
        assert label_names(query) <= available, query
    # And the file reads some of each kind: the gateway's own, and the engines' via the gateway.
    assert any(name.startswith("qwenstack_") and name in exported for name in queried)
    assert any(name.startswith("vllm:") and name in exported for name in queried)


def test_compose_and_helm_files_parse_and_fit_together():
    # Docker and Helm do not run here: these files are checked by parsing, not by deploying.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"qwenstack", "redis", "postgres", "prometheus", "grafana"} <= set(services)
    build = services["qwenstack"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert not source.startswith(".") or (DEPLOY / source).exists(), source
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [target] = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert target == "qwenstack:8000"  # the compose service
    chart = DEPLOY / "helm" / "qwenstack"
    assert yaml.safe_load((chart / "Chart.yaml").read_text())["apiVersion"] == "v2"
    values = yaml.safe_load((chart / "values.yaml").read_text())
    assert values["service"]["port"] == 8000
    for template in (chart / "templates").glob("*.yaml"):
        text = template.read_text()
        assert text.count("{{") == text.count("}}"), template
