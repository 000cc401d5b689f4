"""The gateway's Prometheus metrics, and the /metrics page that adds the engines' own.

Request metrics are recorded once per request by an exchange finisher, so streaming costs no
per-chunk work. Whether each engine is up is read from the replica pool when Prometheus
scrapes; requests in flight are counted by each request's lease (replicas.py). Each up engine's
vLLM metrics are fetched at scrape time and re-exposed with a `replica` label, so one Prometheus
job sees the whole stack.

Labels stay bounded: `model` is a served model name (or "-" when none was routed to, e.g. an
unknown model's 404), `key` the caller's key name, `replica` the engine's index.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable, Iterator

import aiohttp
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.replicas import ReplicaPool

log = logging.getLogger(__name__)

# The classic text format, which every Prometheus version reads; `generate_latest` writes it for
# names like these (colons included). Newer prometheus-clients would announce version 1.0.0.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REQUESTS = Counter(
    "qwenstack_requests",
    "Inference requests, by how they ended.",
    ["route", "model", "status", "key"],
)
REQUEST_DURATION = Histogram(
    "qwenstack_request_duration_seconds",
    "End-to-end time of answered (200) inference requests, to the last byte.",
    ["route", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
)
TIME_TO_FIRST_TOKEN = Histogram(
    "qwenstack_time_to_first_token_seconds",
    "Time from request to the first streamed bytes of an answered stream.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TIME_PER_OUTPUT_TOKEN = Histogram(
    "qwenstack_time_per_output_token_seconds",
    "Mean time between tokens of an answered stream, after the first.",
    ["model"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5),
)
PROMPT_TOKENS = Counter(
    "qwenstack_prompt_tokens",
    "Prompt tokens engines processed (cache hits excluded).",
    ["model", "key"],
)
COMPLETION_TOKENS = Counter(
    "qwenstack_completion_tokens",
    "Completion tokens engines generated (cache hits excluded).",
    ["model", "key"],
)
TOOL_CALLS = Counter(
    "qwenstack_tool_calls",
    "Tool calls in the answers clients got (cache hits included).",
    ["model", "key"],
)
ENGINE_SCRAPE_ERRORS = Counter(
    "qwenstack_engine_scrape_errors",
    "Times an up engine's /metrics could not be read; its vLLM metrics were left out.",
    ["replica"],
)


async def _record(exchange: Exchange) -> None:
    model, key, status = exchange.model, exchange.caller.metric_label, exchange.status
    REQUESTS.labels(exchange.route, model, str(status), key).inc()
    if exchange.tool_calls:
        TOOL_CALLS.labels(model, key).inc(exchange.tool_calls)
    if exchange.cache != "hit":  # an answer from the cache cost the engines no tokens
        if exchange.prompt_tokens:
            PROMPT_TOKENS.labels(model, key).inc(exchange.prompt_tokens)
        if exchange.completion_tokens:
            COMPLETION_TOKENS.labels(model, key).inc(exchange.completion_tokens)
    if status != 200 or exchange.finished_s is None:
        # Refusals and failures are fast or slow for reasons of their own; they would skew the
        # latency of answers, and they are counted above.
        return
    REQUEST_DURATION.labels(exchange.route, model).observe(exchange.finished_s)
    if exchange.stream and exchange.first_chunk_s is not None:
        TIME_TO_FIRST_TOKEN.labels(model).observe(exchange.first_chunk_s)
        if exchange.completion_tokens > 1:
            TIME_PER_OUTPUT_TOKEN.labels(model).observe(
                (exchange.finished_s - exchange.first_chunk_s) / (exchange.completion_tokens - 1)
            )


def track(exchange: Exchange) -> None:
    """Record the exchange's metrics when it finishes."""
    exchange.on_finish(_record)


class PoolCollector:
    """Engine state as Prometheus reads it at scrape time: nothing is kept per request."""

    def __init__(self, pool: ReplicaPool) -> None:
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "qwenstack_engine_up",
            "1 while the engine answers its health check.",
            labels=["replica"],
        )
        for replica in self.pool.replicas:
            up.add_metric([str(replica.index)], 1.0 if replica.up else 0.0)
        yield up


def registry() -> CollectorRegistry:
    """What /metrics renders: this process's metrics or, with several worker processes
    (workers.py sets prometheus_client's multiprocess folder), every worker's, summed."""
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return REGISTRY
    summed = CollectorRegistry()
    multiprocess.MultiProcessCollector(summed)
    return summed


class _Families:
    """Metric families already collected, in the shape `generate_latest` renders."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


def relabel_engine_metrics(pages: list[tuple[str, str]]) -> bytes:
    """Several engines' /metrics pages as one, each sample labelled with its engine's `replica`.

    Parsed and re-rendered rather than edited as text: a family may appear once per page, so the
    samples of every engine have to be merged under one HELP/TYPE header. Only `vllm:` families
    are kept; the engines' process_* and python_* metrics would collide with the gateway's own.
    """
    merged: dict[str, Metric] = {}
    for replica, page in pages:
        try:
            families = [
                f for f in text_string_to_metric_families(page) if f.name.startswith("vllm:")
            ]
        except ValueError as exc:
            ENGINE_SCRAPE_ERRORS.labels(replica).inc()
            log.warning(
                "Replica %s: /metrics unparsable (%s); its metrics are left out", replica, exc
            )
            continue
        for family in families:
            target = merged.get(family.name)
            if target is None:
                target = merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            target.samples.extend(
                sample._replace(labels={**sample.labels, "replica": replica})
                for sample in family.samples
            )
    return generate_latest(_Families(merged.values()))


class Exposition:
    """The /metrics page: the gateway's registry, then every up engine's vLLM metrics."""

    def __init__(
        self,
        pool: ReplicaPool,
        session: aiohttp.ClientSession,
        registry: CollectorRegistry,
        *,
        engine_metrics: bool,
        timeout_s: float,
    ) -> None:
        self.pool = pool
        self.registry = registry
        self.session = session
        self.engine_metrics = engine_metrics
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        for index in range(len(pool.replicas)):
            ENGINE_SCRAPE_ERRORS.labels(str(index))  # a series from 0, so increase() sees the first

    async def render(self) -> bytes:
        if not self.engine_metrics:
            return generate_latest(self.registry)
        fetched = await asyncio.gather(
            *(
                self._fetch(str(replica.index), replica.url)
                for replica in self.pool.replicas
                if replica.up
            )
        )
        pages = [page for page in fetched if page is not None]
        # Parsing ~50 kB per engine takes milliseconds: off the event loop, which serves requests.
        engines = await asyncio.to_thread(relabel_engine_metrics, pages) if pages else b""
        # Rendered last, so the scrape-error counter already counts this scrape's failures.
        return generate_latest(self.registry) + engines

    async def _fetch(self, replica: str, url: str) -> tuple[str, str] | None:
        try:
            # identity: the shared session does not decompress, and vLLM gzips when allowed to.
            async with self.session.get(
                f"{url}/metrics", timeout=self.timeout, headers={"accept-encoding": "identity"}
            ) as response:
                response.raise_for_status()
                return replica, await response.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            ENGINE_SCRAPE_ERRORS.labels(replica).inc()
            log.warning("Engine %s: /metrics unreadable (%s); its metrics are left out", url, exc)
            return None
