"""Metrics, logs and traces of a real gateway process in front of the real tiny-qwen3 engine."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from helpers import Gateway, free_port, request_log, start_gateway
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qwenstack.gateway import gpu_metrics
from qwenstack.gateway.metrics import relabel_engine_metrics

MODEL = "tiny-qwen3"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}
COMPLETION = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(page: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(page)
        for s in family.samples
    }


def scrape(gateway: Gateway) -> tuple[str, Samples]:
    response = httpx.get(f"{gateway.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return response.text, parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("metrics"), engine_url)
    yield gateway
    assert gateway.stop() == 0


def test_counters_and_histograms_move_by_the_requests_made(gateway: Gateway):
    _, before = scrape(gateway)
    chat = "/v1/chat/completions"
    usage = []
    for _ in range(2):
        answer = httpx.post(f"{gateway.url}{chat}", json=CHAT, timeout=60)
        assert answer.status_code == 200
        usage.append(answer.json()["usage"])
    answer = httpx.post(f"{gateway.url}/v1/completions", json=COMPLETION, timeout=60)
    usage.append(answer.json()["usage"])
    stream = {**COMPLETION, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{gateway.url}/v1/completions", json=stream, timeout=60) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: {")]
    usage.append(json.loads(events[-1].removeprefix("data: "))["usage"])
    unknown = httpx.post(
        f"{gateway.url}{chat}", json={**CHAT, "model": "no-such-model-xyz"}, timeout=10
    )
    assert unknown.status_code == 404
    assert httpx.post(f"{gateway.url}{chat}", content=b"{not json", timeout=10).status_code == 400
    text, after = scrape(gateway)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "qwenstack_requests_total"
    anonymous = {"key": "anonymous"}
    assert delta(requests, route=chat, model=MODEL, status="200", **anonymous) == 2
    assert delta(requests, route="/v1/completions", model=MODEL, status="200", **anonymous) == 2
    # An unknown model never becomes a label value: the 404 and the 400 count under model="-".
    assert delta(requests, route=chat, model="-", status="404", **anonymous) == 1
    assert delta(requests, route=chat, model="-", status="400", **anonymous) == 1
    assert "no-such-model-xyz" not in text

    tokens = {"model": MODEL, **anonymous}
    assert delta("qwenstack_prompt_tokens_total", **tokens) == sum(
        u["prompt_tokens"] for u in usage
    )
    assert delta("qwenstack_completion_tokens_total", **tokens) == sum(
        u["completion_tokens"] for u in usage
    )

    # Latency of answers only (refusals are counted, not timed); TTFT and TPOT of streams only.
    duration = "qwenstack_request_duration_seconds"
    assert delta(f"{duration}_count", route=chat, model=MODEL) == 2
    assert delta(f"{duration}_count", route="/v1/completions", model=MODEL) == 2
    assert delta(f"{duration}_bucket", route=chat, model=MODEL, le="+Inf") == 2
    assert 0 < delta(f"{duration}_sum", route=chat, model=MODEL) < 120
    assert delta("qwenstack_time_to_first_token_seconds_count", model=MODEL) == 1
    assert delta("qwenstack_time_per_output_token_seconds_count", model=MODEL) == 1
    ttft = delta("qwenstack_time_to_first_token_seconds_sum", model=MODEL)
    assert 0 < ttft <= delta(f"{duration}_sum", route="/v1/completions", model=MODEL)


def test_engine_state_and_vllm_metrics_are_on_the_gateway_page(gateway: Gateway):
    text, samples = scrape(gateway)
    assert value(samples, "qwenstack_engine_up", replica="0") == 1
    assert ("qwenstack_requests_in_flight", frozenset({("model", MODEL)})) in samples
    vllm = {name: dict(labels) for (name, labels) in samples if name.startswith("vllm:")}
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "vllm:time_to_first_token_seconds_bucket",
    ):
        assert vllm[name]["replica"] == "0", name
    # One header per family: the engine's process_* and python_* metrics are not copied over.
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))


def test_two_engines_pages_merge_under_one_header_each(engine_url: str):
    page = httpx.get(f"{engine_url}/metrics", timeout=10).text
    merged = relabel_engine_metrics([("0", page), ("1", page)]).decode()
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert all(name.startswith("vllm:") for name in families)
    running = [s for s in families["vllm:num_requests_running"].samples]
    assert sorted(s.labels["replica"] for s in running) == ["0", "1"]
    assert merged.count("# TYPE vllm:num_requests_running gauge") == 1
    assert families["vllm:time_to_first_token_seconds"].type == "histogram"


def test_an_engine_that_is_down_is_reported_and_left_out(tmp_path: Path, engine_url: str):
    dead = f"http://127.0.0.1:{free_port()}"
    gateway = start_gateway(tmp_path, engine_url, "--engine-url", dead)
    try:
        _, samples = scrape(gateway)
    finally:
        gateway.stop()
    assert value(samples, "qwenstack_engine_up", replica="0") == 1
    assert value(samples, "qwenstack_engine_up", replica="1") == 0
    replicas = {dict(labels)["replica"] for (name, labels) in samples if name.startswith("vllm:")}
    assert replicas == {"0"}


class EngineWithBrokenMetrics(BaseHTTPRequestHandler):
    """Stands in for an engine that is up but whose /metrics fails, which a real vLLM cannot be
    made to do on demand."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        status, body = {
            "/health": (200, b""),
            "/v1/models": (200, json.dumps({"data": [{"id": MODEL, "object": "model"}]}).encode()),
        }.get(self.path, (500, b"broken"))
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_engine_whose_metrics_fail_is_counted_and_skipped(tmp_path: Path, engine_url: str):
    broken = ThreadingHTTPServer(("127.0.0.1", 0), EngineWithBrokenMetrics)
    threading.Thread(target=broken.serve_forever, daemon=True).start()
    try:
        gateway = start_gateway(
            tmp_path, engine_url, "--engine-url", f"http://127.0.0.1:{broken.server_port}"
        )
        try:
            scrape(gateway)
            _, samples = scrape(gateway)
        finally:
            gateway.stop()
    finally:
        broken.shutdown()
    assert value(samples, "qwenstack_engine_up", replica="1") == 1
    assert value(samples, "qwenstack_engine_scrape_errors_total", replica="1") == 2
    assert value(samples, "qwenstack_engine_scrape_errors_total", replica="0") == 0
    replicas = {dict(labels)["replica"] for (name, labels) in samples if name.startswith("vllm:")}
    assert replicas == {"0"}


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU")
def test_no_gpu_metrics_without_a_gpu(gateway: Gateway):
    # NVML is only reachable on a GPU machine, so the metrics' presence cannot be tested here.
    text, _ = scrape(gateway)
    assert not any(name in text for name in gpu_metrics.METRICS)


def test_gpu_collector_reports_utilisation_as_a_ratio_and_memory_in_bytes():
    # NVML answers only on a GPU machine; this stand-in answers as nvidia-ml-py does for one GPU.
    nvml = SimpleNamespace(
        nvmlDeviceGetUtilizationRates=lambda handle: SimpleNamespace(gpu=37, memory=5),
        nvmlDeviceGetMemoryInfo=lambda handle: SimpleNamespace(used=12 * 2**30, total=80 * 2**30),
    )
    samples = parse(generate_latest(gpu_metrics.GpuCollector(nvml, ["handle-0"])).decode())
    assert value(samples, gpu_metrics.UTILIZATION, gpu="0") == 0.37
    assert value(samples, gpu_metrics.MEMORY_USED, gpu="0") == 12 * 2**30
    assert value(samples, gpu_metrics.MEMORY_TOTAL, gpu="0") == 80 * 2**30


SECRET = "sk-do-not-log-4711"
PROMPT = "purple elephants dance at midnight"


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_request_log_line_has_the_facts_and_no_secrets(
    tmp_path: Path, engine_url: str, log_format: str
):
    gateway = start_gateway(
        tmp_path, engine_url, env={"QWENSTACK_OBSERVABILITY__LOG_FORMAT": log_format}
    )
    try:
        body = {**CHAT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 16}
        answer = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            json=body,
            timeout=60,
            headers={"authorization": f"Bearer {SECRET}", "x-request-id": "log-check-1"},
        )
        assert answer.status_code == 200
    finally:
        gateway.stop()
    log = gateway.log.read_text()
    expected = {
        "request_id": "log-check-1",
        "path": "/v1/chat/completions",
        "model": MODEL,
        "key": "anonymous",
        "status": 200,
        "completion_tokens": answer.json()["usage"]["completion_tokens"],
        "prompt_tokens": answer.json()["usage"]["prompt_tokens"],
    }
    if log_format == "json":
        entry = request_log(gateway.log, "log-check-1")
        assert entry["message"] == "request" and entry["level"] == "info"
        assert {k: entry[k] for k in expected} == expected
        assert entry["latency_ms"] > 0
    else:
        line = next(line for line in log.splitlines() if "request_id=log-check-1" in line)
        assert all(f"{k}={v}" in line.split() for k, v in expected.items())
    completion = answer.json()["choices"][0]["message"]["content"]
    assert SECRET not in log and PROMPT not in log
    assert len(completion) < 12 or completion not in log


class OtlpReceiver(BaseHTTPRequestHandler):
    """Stands in for an OpenTelemetry collector (none runs here): keeps what is POSTed."""

    received: list[tuple[str, bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["content-length"]))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_each_request_becomes_a_span_at_the_otlp_endpoint(tmp_path: Path, engine_url: str):
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), OtlpReceiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        gateway = start_gateway(
            tmp_path,
            engine_url,
            env={
                "QWENSTACK_OBSERVABILITY__OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_port}",
            },
        )
        try:
            answer = httpx.post(
                f"{gateway.url}/v1/completions",
                json=COMPLETION,
                timeout=60,
                headers={
                    "x-request-id": "span-check-1",
                    "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                },
            )
        finally:
            assert gateway.stop() == 0  # shutdown flushes the spans still buffered
    finally:
        receiver.shutdown()
    spans = []
    for path, body in OtlpReceiver.received:
        assert path == "/v1/traces"
        request = ExportTraceServiceRequest.FromString(body)
        spans += [
            span for rs in request.resource_spans for ss in rs.scope_spans for span in ss.spans
        ]
    span = next(
        s
        for s in spans
        if {"key": "qwenstack.request_id", "value": "span-check-1"}
        in [{"key": a.key, "value": a.value.string_value} for a in s.attributes]
    )
    attributes = {a.key: a.value for a in span.attributes}
    assert span.name == "POST /v1/completions"
    assert span.trace_id.hex() == trace_id  # the client's trace continues through the gateway
    assert attributes["gen_ai.request.model"].string_value == MODEL
    assert (
        attributes["gen_ai.usage.output_tokens"].int_value
        == answer.json()["usage"]["completion_tokens"]
    )
    assert attributes["http.response.status_code"].int_value == 200
    assert span.end_time_unix_nano > span.start_time_unix_nano
