"""The gateway's ASGI app: OpenAI-compatible routes in front of the engines.

Only the routes below are forwarded; everything else vLLM exposes (tokenize, LoRA loading,
sleep/wake, ...) stays unreachable from clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import aiohttp
from fastapi import FastAPI, Request
from prometheus_client import REGISTRY
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenstack.gateway import admin, inference, knowledge, metrics
from qwenstack.gateway.admission import Admission
from qwenstack.gateway.cache import AnswerCache
from qwenstack.gateway.errors import GatewayError, error_response
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.gpu_metrics import GpuCollector
from qwenstack.gateway.limits import Limiter
from qwenstack.gateway.auth import Authentication, Authenticator
from qwenstack.keys import KeyStore
from qwenstack.gateway.proxy import Upstream
from qwenstack.gateway.replicas import DnsDiscovery, ReplicaPool
from qwenstack.gateway.routing import make_policy
from qwenstack.gateway.usage import UsageRecorder
from qwenstack.settings import Settings

if TYPE_CHECKING:
    from qwenstack.gateway.tracing import RequestTracer

log = logging.getLogger("qwenstack.gateway")

REQUEST_ID_HEADER = "x-request-id"
# A client's own request id is kept when it is short and plain, so it can go into logs as is.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Idle pooled connections to an engine are dropped before vLLM drops them (its uvicorn closes
# them after VLLM_HTTP_TIMEOUT_KEEP_ALIVE, 5 s by default), so a request rarely meets a closed one.
ENGINE_KEEPALIVE_S = 4
# Polled every few seconds by load balancers and Prometheus: logged at debug, not info.
PROBE_PATHS = frozenset({"/health", "/ready", "/metrics"})


class RequestContext:
    """Gives every request an id (the client's or a new one), returns it, logs one line per request
    (and makes its span, when tracing)."""

    def __init__(self, app: ASGIApp, tracer: RequestTracer | None = None) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                candidate = value.decode("latin-1")
                if CLIENT_REQUEST_ID.fullmatch(candidate):
                    request_id = candidate
                break
        request_id = request_id or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500
        started = time.perf_counter()
        started_ns = time.time_ns()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", ()), (b"x-request-id", request_id.encode())
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            exchange: Exchange | None = state.get("exchange")
            latency_s = time.perf_counter() - started
            fields: dict[str, object] = {
                "request_id": request_id, "method": scope["method"], "path": scope["path"],
                "status": status, "latency_ms": round(latency_s * 1000, 1),
            }
            if "caller" in state:  # set by auth.Authentication, refusals included
                fields["key"] = state["caller"].name
            if exchange:
                # Names and counts only: prompts, completions and credentials stay out of logs.
                fields |= {
                    "model": exchange.model,
                    "prompt_tokens": exchange.prompt_tokens,
                    "completion_tokens": exchange.completion_tokens,
                }
                if exchange.replica is not None:
                    fields["replica"] = exchange.replica
                if exchange.error_code:
                    fields["error_code"] = exchange.error_code
                if exchange.first_chunk_s is not None:
                    fields["ttft_ms"] = round(exchange.first_chunk_s * 1000, 1)
            level = logging.DEBUG if scope["path"] in PROBE_PATHS else logging.INFO
            log.log(level, "request", extra={"fields": fields})
            if self.tracer and scope["path"] not in PROBE_PATHS:
                ended_ns = started_ns + int(latency_s * 1e9)
                self.tracer.record(scope, request_id, status, started_ns, ended_ns, exchange)


def create_app(settings: Settings) -> FastAPI:
    gateway = settings.gateway
    observability = settings.observability
    tracer = None
    if observability.otlp_endpoint:
        from qwenstack.gateway.tracing import RequestTracer  # the optional `otel` extra

        tracer = RequestTracer(observability.otlp_endpoint, observability.service_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        keys = await asyncio.to_thread(KeyStore.open, settings)
        app.state.keys = keys
        app.state.authenticator = Authenticator(settings.auth, keys)
        app.state.usage = UsageRecorder(keys.engine)
        await app.state.usage.start()
        connector = aiohttp.TCPConnector(
            limit=0, limit_per_host=gateway.max_connections_per_engine,
            keepalive_timeout=ENGINE_KEEPALIVE_S,
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=gateway.connect_timeout_s, sock_read=gateway.read_timeout_s
        )
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            engine = settings.engine
            pool = ReplicaPool(
                engine.replica_urls(), session, gateway.health_interval_s,
                settings.admission.circuit_failures, settings.admission.circuit_cooldown_s,
                discovery=DnsDiscovery(
                    engine.discovery_dns, engine.discovery_port, engine.discovery_interval_s
                ) if engine.discovery_dns else None,
            )
            await pool.start()
            app.state.pool = pool
            app.state.upstream = Upstream(pool, session, make_policy(settings.routing))
            app.state.metrics = metrics.Exposition(
                pool, session, engine_metrics=observability.engine_metrics,
                timeout_s=observability.engine_metrics_timeout_s,
            )
            engines = metrics.PoolCollector(pool)
            REGISTRY.register(engines)
            gpus = GpuCollector.start()
            if gpus:
                REGISTRY.register(gpus)
            app.state.cache = await AnswerCache.open(settings.cache, settings.rag)
            app.state.validation = settings.validation
            app.state.limiter = Limiter(settings.limits, session)
            app.state.admission = Admission(settings.admission)
            app.state.knowledge = knowledge.Knowledge(settings)
            try:
                yield
            finally:
                app.state.knowledge.close()
                await app.state.cache.close()
                REGISTRY.unregister(engines)
                if gpus:
                    REGISTRY.unregister(gpus)
                    gpus.stop()
                if tracer:
                    tracer.shutdown()
                await pool.stop()
                await app.state.limiter.close()
                await app.state.usage.stop()  # after the last request: none goes unrecorded
                keys.engine.dispose()

    app = FastAPI(
        title="qwenstack gateway",
        version="0.1.0",
        lifespan=lifespan,
    )
    protected = ("/v1/", "/admin/", *(("/metrics",) if settings.auth.protect_metrics else ()))
    app.add_middleware(Authentication, protected=protected)
    app.add_middleware(RequestContext, tracer=tracer)  # outermost: refusals get a request id and a log line too
    app.include_router(admin.router)
    app.include_router(knowledge.router)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_fields(request: Request, exc: RequestValidationError) -> Response:
        # FastAPI's own 422 body is not OpenAI's shape; the admin API's JSON bodies land here.
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            return error_response(GatewayError(400, "The request body is not valid JSON."))
        param = ".".join(str(part) for part in first["loc"][1:]) or None
        return error_response(GatewayError(400, f"{param or 'body'}: {first['msg']}", param=param))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(GatewayError(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception) -> Response:
        log.exception("Unhandled error in request %s", request.state.request_id)
        return error_response(GatewayError(
            500, f"Internal error; quote request id {request.state.request_id}.", code="internal_error"
        ))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await inference.serve(request, "/v1/chat/completions")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await inference.serve(request, "/v1/completions")

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, object]:
        allowed = request.state.caller.models  # a key scoped to some models sees only those
        cards = request.app.state.pool.model_cards()
        if allowed is not None:
            cards = [card for card in cards if card["id"] in allowed]
        return {"object": "list", "data": cards}

    @app.get("/metrics")
    async def prometheus_metrics(request: Request) -> Response:
        """The gateway's metrics and, labelled by replica, each up engine's vLLM metrics."""
        return Response(await request.app.state.metrics.render(), media_type=metrics.CONTENT_TYPE)

    @app.get("/health")
    async def health() -> dict[str, str]:
        """The gateway process lives."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready(request: Request) -> Response:
        """An engine can serve."""
        pool: ReplicaPool = request.app.state.pool
        engines = [
            {"url": r.url, "up": r.up, "in_flight": r.in_flight, "load": r.load(),
             "kv_cache_usage": r.kv_cache_usage, "circuit_open": bool(r.open_until)}
            for r in pool.replicas
        ]
        return JSONResponse(
            {"status": "ready" if pool.any_up else "unavailable", "engines": engines,
             "queued": request.app.state.admission.queued},
            status_code=200 if pool.any_up else 503,
        )

    return app
