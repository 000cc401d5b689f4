"""The engines behind the gateway: which are up, what they serve, which takes the next request.

Besides the health checks, each engine has a circuit breaker: an engine that fails requests
`failures_to_open` times in a row (5xx answers, broken connections, timeouts) while its /health
still answers is taken out of rotation for `cooldown_s`; then one request probes it, and its
outcome closes the circuit or opens it for another cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from prometheus_client import Gauge

from qwenstack.gateway.errors import GatewayError

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=3)
# A busy engine can be slow to answer /health (on a CPU its API server shares the cores with the
# model), so only this many timed-out checks in a row take it down; a refused connection does
# at once.
HEALTH_TIMEOUTS_TO_DOWN = 3
# Seconds a client is told to wait when no engine can take its request.
RETRY_AFTER_S = 5

CIRCUIT_OPEN = Gauge(
    "qwenstack_engine_circuit_open",
    "1 while an engine is out of rotation after repeated failures (or being probed).",
    ["replica"],
    multiprocess_mode="livemax",  # each worker process has its circuits: open in any
)
IN_FLIGHT = Gauge(
    "qwenstack_requests_in_flight",
    "Requests forwarded to engines and not yet answered.",
    ["model"],
    multiprocess_mode="livesum",
)


@dataclass(eq=False)
class Replica:
    url: str
    up: bool = False
    models: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    index: int = 0
    failures_to_open: int = 5
    cooldown_s: float = 30.0
    failures: int = 0  # consecutive failed requests
    open_until: float = 0.0  # circuit open until this time.monotonic(); 0: closed
    health_timeouts: int = 0  # consecutive /health checks that timed out
    # From the engine's /metrics, read with each health check: requests running plus waiting
    # (from every gateway), KV-cache usage (0..1), and this gateway's in_flight at that moment.
    engine_queue: int = 0
    kv_cache_usage: float = 0.0
    in_flight_at_poll: int = 0
    # Its model's series of qwenstack_requests_in_flight, looked up once its models are read
    # (not per request).
    in_flight_gauge: Gauge | None = None

    def load(self) -> int:
        """Requests outstanding at the engine: its last reported queue, corrected by what this
        gateway has sent or finished since (the report is up to a health interval old); never
        below this gateway's own in-flight count."""
        return max(self.in_flight, self.engine_queue + self.in_flight - self.in_flight_at_poll)

    def read_metrics(self, page: bytes) -> None:
        """Load figures from a vLLM /metrics page: a line scan, no full parse."""
        queue, usage = 0.0, 0.0
        for line in page.splitlines():
            if line.startswith((b"vllm:num_requests_running{", b"vllm:num_requests_waiting{")):
                queue += float(line.rsplit(b" ", 1)[1])
            elif line.startswith(b"vllm:kv_cache_usage_perc{"):
                usage = max(usage, float(line.rsplit(b" ", 1)[1]))
        self.engine_queue, self.kv_cache_usage = int(queue), usage
        self.in_flight_at_poll = self.in_flight

    def admits(self, now: float) -> bool:
        """The circuit is closed, or its cool-down is over and no request (probe) is under way:
        half-open, it takes one request at a time until one succeeds."""
        return not self.open_until or (now >= self.open_until and not self.in_flight)

    def record_outcome(self, ok: bool) -> None:
        if ok:
            if self.open_until:
                log.info("Engine %s answered its probe; back in rotation", self.url)
                CIRCUIT_OPEN.labels(str(self.index)).set(0)
            self.failures, self.open_until = 0, 0.0
            return
        self.failures += 1
        if self.open_until or self.failures >= self.failures_to_open:
            log.warning("Engine %s failed %d requests in a row; out of rotation for %g s",
                        self.url, self.failures, self.cooldown_s)
            self.open_until = time.monotonic() + self.cooldown_s
            CIRCUIT_OPEN.labels(str(self.index)).set(1)

    def serves(self, model: str) -> bool:
        return any(card.get("id") == model for card in self.models)

    def lease(self) -> Lease:
        """Count a request in `in_flight` until the lease is released (or its `with` ends)."""
        return Lease(self)

    def mark_down(self, reason: str) -> None:
        if self.up:
            log.warning("Engine %s is down: %s", self.url, reason)
        self.up = False


class Lease:
    """One request's hold on a replica, in its `in_flight` count from taking to release; a
    stream's lease outlives the call that took it, so release is explicit and idempotent."""

    __slots__ = ("replica", "_held", "_gauge")

    def __init__(self, replica: Replica) -> None:
        replica.in_flight += 1
        self.replica = replica
        self._held = True
        self._gauge = replica.in_flight_gauge or IN_FLIGHT.labels("-")
        self._gauge.inc()

    def release(self) -> None:
        if self._held:
            self._held = False
            self.replica.in_flight -= 1
            self._gauge.dec()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


@dataclass(frozen=True)
class ServedModel:
    """A model some engine serves, as its /v1/models card describes it."""

    name: str
    max_model_len: int | None  # the context window, prompt included (None: not reported)


@dataclass
class DnsDiscovery:
    """Engines as the A/AAAA records of names, e.g. Kubernetes headless Services' (one per
    model), whose DNS answers with the addresses of their ready pods. A name that does not
    resolve keeps the engines it had (their health checks still run), so a DNS hiccup, or a
    model with no ready pod for a while, does not take the other models' engines with it."""

    names: tuple[str, ...]
    port: int
    interval_s: float
    _last: dict[str, list[str]] = field(default_factory=dict)

    async def urls(self) -> list[str]:
        found: set[str] = set()
        for name in self.names:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    name, self.port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                log.warning("Engine discovery: %s did not resolve (%s); keeping its %d engines",
                            name, exc, len(self._last.get(name, ())))
            else:
                hosts = {str(info[4][0]) for info in infos}
                self._last[name] = [f"http://{f'[{h}]' if ':' in h else h}:{self.port}"
                                    for h in hosts]
            found.update(self._last.get(name, ()))
        return sorted(found)


class ReplicaPool:
    def __init__(
        self,
        urls: list[str],
        session: aiohttp.ClientSession,
        interval_s: float,
        failures_to_open: int = 5,
        cooldown_s: float = 30.0,
        discovery: DnsDiscovery | None = None,
    ) -> None:
        self.replicas: list[Replica] = []
        self._cards: dict[str, dict[str, Any]] | None = None  # built when first asked for
        self._failures_to_open = failures_to_open
        self._cooldown_s = cooldown_s
        self.set_urls(urls)
        self._session = session
        self._interval_s = interval_s
        self._discovery = discovery
        self._tasks: list[asyncio.Task[None]] = []

    def set_urls(self, urls: list[str]) -> None:
        """Make the pool these engines: known ones keep their state (and index, the `replica`
        label), new ones start down until their health check passes, others leave. A request
        under way on one that left still finishes: it holds its replica."""
        known = {replica.url: replica for replica in self.replicas}
        if set(urls) == set(known):
            return
        kept = [known[url] for url in urls if url in known]
        free = (i for i in itertools.count() if i not in {r.index for r in kept})
        added = [
            Replica(url, index=next(free), failures_to_open=self._failures_to_open,
                    cooldown_s=self._cooldown_s)
            for url in urls if url not in known
        ]
        for replica in added:
            CIRCUIT_OPEN.labels(str(replica.index)).set(0)
        if self.replicas:
            log.info("Engines now %s", urls)
        self.replicas = sorted(kept + added, key=lambda replica: replica.index)
        self._cards = None

    async def start(self) -> None:
        if self._discovery:
            await self.discover()
            self._tasks.append(asyncio.create_task(self._discover_forever(self._discovery)))
        await self.check_all()
        self._tasks.append(asyncio.create_task(self._check_forever()))

    async def discover(self) -> None:
        """Refresh the engines from DNS (DnsDiscovery keeps what a failed lookup had)."""
        assert self._discovery
        self.set_urls(await self._discovery.urls())

    async def _discover_forever(self, discovery: DnsDiscovery) -> None:
        while True:
            await asyncio.sleep(discovery.interval_s)
            await self.discover()

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def any_up(self) -> bool:
        return any(r.up for r in self.replicas)

    def model_cards(self) -> list[dict[str, Any]]:
        """Every model some engine has served, once each, as /v1/models lists them."""
        if self._cards is None:
            cards: dict[str, dict[str, Any]] = {}
            for replica in self.replicas:
                for card in replica.models:
                    cards.setdefault(card["id"], card)
            self._cards = cards
        return list(self._cards.values())

    def resolve(self, model: str | None) -> ServedModel:
        """The model a request names (none: the first served): 404 for one nobody serves, 503
        while no replica of it can take a request (so a request that cannot be served now is
        refused before it costs its caller any budget). Which replica takes it is decided when
        it is sent (`candidates`, ordered by the routing policy)."""
        self.model_cards()
        assert self._cards is not None
        if model is None:
            if not self._cards:
                raise _unavailable()
            model = next(iter(self._cards))
        card = self._cards.get(model)
        if card is None:
            if not self._cards:
                raise _unavailable()
            raise GatewayError(
                404,
                f"The model `{model}` does not exist. Served: {', '.join(self._cards)}.",
                code="model_not_found",
                param="model",
            )
        self.candidates(model)
        # A LoRA adapter's card names its base model as `parent`, and no context window: the
        # base model's is the adapter's.
        parent = self._cards.get(card.get("parent") or "", {})
        return ServedModel(model, card.get("max_model_len") or parent.get("max_model_len"))

    def candidates(self, model: str) -> list[Replica]:
        """The replicas that can take a request for `model` now (the routing policy orders them),
        or 503 with the wait until the first circuit's cool-down ends."""
        serving = [r for r in self.replicas if r.up and r.serves(model)]
        now = time.monotonic()
        candidates = [r for r in serving if r.admits(now)]
        if not candidates:
            if serving:  # all out of rotation: retry when the first cool-down ends
                raise _unavailable(math.ceil(min(r.open_until for r in serving) - now))
            raise _unavailable()
        return candidates

    def urls_serving(self, model: str) -> list[str]:
        """The replicas that can take a request for `model` now, least loaded first ([]: none),
        for the knowledge bases' embedder and reranker (which call from worker threads: this
        only reads)."""
        try:
            return [r.url for r in sorted(self.candidates(model), key=Replica.load)]
        except GatewayError:
            return []

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(r) for r in self.replicas))

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.check_all()

    async def _check(self, replica: Replica) -> None:
        try:
            async with self._session.get(f"{replica.url}/health", timeout=HEALTH_TIMEOUT) as health:
                if health.status != 200:
                    replica.mark_down(f"/health answered {health.status}")
                    return
            if not replica.up:
                await self._read_models(replica)
                log.info("Engine %s is up, serving %s", replica.url,
                         [c["id"] for c in replica.models])
                replica.up = True
            replica.health_timeouts = 0
        except TimeoutError:
            replica.health_timeouts += 1
            if replica.health_timeouts >= HEALTH_TIMEOUTS_TO_DOWN:
                replica.mark_down(f"/health timed out {replica.health_timeouts} times in a row")
            return
        except (aiohttp.ClientError, KeyError, ValueError) as exc:
            replica.mark_down(f"{type(exc).__name__}: {exc}")
            return
        await self._read_load(replica)

    async def _read_models(self, replica: Replica) -> None:
        async with self._session.get(f"{replica.url}/v1/models", timeout=HEALTH_TIMEOUT) as resp:
            resp.raise_for_status()
            replica.models = (await resp.json())["data"]
        self._cards = None
        # An engine serves one model (its first card; adapters follow it): its series, from 0
        # before its first request.
        if replica.models:
            replica.in_flight_gauge = IN_FLIGHT.labels(replica.models[0]["id"])

    async def refresh_models(self, replicas: list[Replica]) -> None:
        """Read again what these replicas serve (after a LoRA adapter was loaded or unloaded);
        one that cannot say is marked down, and read again when its health check passes."""
        async def refresh(replica: Replica) -> None:
            try:
                await self._read_models(replica)
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError) as exc:
                replica.mark_down(f"/v1/models unreadable: {exc!r}")

        await asyncio.gather(*map(refresh, replicas))

    async def _read_load(self, replica: Replica) -> None:
        """Refresh the engine's load figures; an unreadable page keeps the last ones (routing
        then leans on the gateway's own in-flight count), it does not take the engine down."""
        try:
            url = f"{replica.url}/metrics"
            async with self._session.get(url, timeout=HEALTH_TIMEOUT) as page:
                page.raise_for_status()
                replica.read_metrics(await page.read())
        except (aiohttp.ClientError, TimeoutError, ValueError, IndexError) as exc:
            log.debug("Load of engine %s not read: %r", replica.url, exc)


def engine_failure(exc: BaseException, replica: Replica) -> GatewayError:
    """A request that failed at `replica` (counted against its circuit), as the client's error."""
    replica.record_outcome(False)
    if isinstance(exc, TimeoutError):
        return GatewayError(504, "The engine did not answer in time.", code="engine_timeout")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionError):
        replica.mark_down(str(exc))
        return GatewayError(
            503, "The engine went away during the request.", code="engine_unavailable",
            retry_after_s=RETRY_AFTER_S,
        )
    return GatewayError(502, f"Bad answer from the engine: {exc}", code="engine_error")


def _unavailable(retry_after_s: int = RETRY_AFTER_S) -> GatewayError:
    return GatewayError(
        503,
        "No engine is ready to serve this model; it may be starting or restarting.",
        code="engine_unavailable",
        retry_after_s=max(1, retry_after_s),
    )
