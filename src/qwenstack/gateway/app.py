"""The gateway's ASGI app: OpenAI-compatible routes in front of the engines.

Only the routes below (and pooling.py's) are forwarded; everything else vLLM exposes
(tokenize, LoRA loading, sleep/wake, ...) stays unreachable from clients: admins load LoRA
adapters through the gateway's own route (lora.py). The parts the handlers use are one
`Resources` object (resources.py), opened with the app and closed after its last request; what
every request passes through is in middleware.py; an inference request's path is inference.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from qwenstack.gateway import admin, inference, knowledge_bases, lora, metrics, pooling, quota
from qwenstack.gateway.errors import GatewayError, error_response
from qwenstack.gateway.exchange import CLIENT_CLOSED
from qwenstack.gateway.middleware import Authentication, BodyLimit, RequestContext
from qwenstack.gateway.protocol import CHAT, COMPLETIONS, RERANK_UNVERSIONED, RESPONSES
from qwenstack.gateway.resources import Resources, resources
from qwenstack.gateway.responses import NO_STATE
from qwenstack.settings import Settings

log = logging.getLogger("qwenstack.gateway")


def create_app(settings: Settings) -> FastAPI:
    tracer = None
    if settings.observability.otlp_endpoint:
        from qwenstack.gateway.tracing import RequestTracer  # the optional `otel` extra

        tracer = RequestTracer(settings.observability.otlp_endpoint,
                               settings.observability.service_name)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.resources = await Resources.open(settings)
        try:
            yield
        finally:
            if tracer:
                tracer.shutdown()
            await app.state.resources.close()

    app = FastAPI(title="qwenstack gateway", version="0.1.0", lifespan=lifespan)
    # Innermost of the three: a body is judged only once its sender may send it at all.
    app.add_middleware(BodyLimit, max_body_bytes=settings.validation.max_body_bytes,
                       max_upload_bytes=settings.rag.max_upload_bytes)
    protected = (*ADMIN_ONLY, "/v1/", RERANK_UNVERSIONED,
                 *(("/metrics",) if settings.auth.protect_metrics else ()))
    app.add_middleware(Authentication, protected=protected, admin_only=ADMIN_ONLY)
    # Outermost: refusals get a request id and a log line too.
    app.add_middleware(RequestContext, tracer=tracer)
    app.include_router(admin.router)
    app.include_router(lora.router)
    app.include_router(knowledge_bases.router)
    app.include_router(quota.router)
    app.include_router(pooling.router)
    app.include_router(router)
    for error_type, handler in ERROR_HANDLERS.items():
        app.add_exception_handler(error_type, handler)
    return app


# The API description names every route and field: admins only, like /admin itself.
ADMIN_ONLY = ("/admin/", "/docs", "/redoc", "/openapi.json")


# --- errors, all in OpenAI's shape ----------------------------------------------------------


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def invalid_fields(request: Request, exc: Exception) -> Response:
    # FastAPI's own 422 body is not OpenAI's shape; the admin API's JSON bodies land here.
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0]
    if first["type"] == "json_invalid":
        return error_response(GatewayError(400, "The request body is not valid JSON."))
    param = ".".join(str(part) for part in first["loc"][1:]) or None
    return error_response(GatewayError(400, f"{param or 'body'}: {first['msg']}", param=param))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, GatewayError):  # FastAPI's body parsing wraps BodyLimit's 413
        return error_response(exc.__cause__)
    return error_response(GatewayError(exc.status_code, str(exc.detail)))


async def client_gone(request: Request, exc: Exception) -> Response:
    # The client left (or was dropped as too slow) while sending its body: nobody reads this,
    # and the request's log line says so.
    return error_response(GatewayError(CLIENT_CLOSED, "The client left mid-body."))


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("Unhandled error in request %s", request.state.request_id)
    return error_response(GatewayError(
        500, f"Internal error; quote request id {request.state.request_id}.", code="internal_error"
    ))


ERROR_HANDLERS = {
    GatewayError: gateway_error,
    RequestValidationError: invalid_fields,
    HTTPException: http_error,
    ClientDisconnect: client_gone,
    Exception: unexpected_error,
}


# --- routes ---------------------------------------------------------------------------------


router = APIRouter()


@router.post(CHAT)
async def chat_completions(request: Request) -> Response:
    return await inference.serve(request, CHAT)


@router.post(COMPLETIONS)
async def completions(request: Request) -> Response:
    return await inference.serve(request, COMPLETIONS)


@router.post(RESPONSES)
async def responses(request: Request) -> Response:
    return await inference.serve(request, RESPONSES)


@router.api_route(RESPONSES + "/{response_id:path}", methods=["GET", "POST", "DELETE"])
async def stored_responses(request: Request) -> Response:
    """vLLM's routes to read, cancel or delete a stored response: no engine keeps any here
    (responses.py), so none is forwarded."""
    raise GatewayError(404, NO_STATE, code="not_found")


@router.get("/v1/models")
async def models(request: Request) -> dict[str, object]:
    """The served models, each with its `role` (chat, embed, rerank) and `capabilities`: what
    its engines' parsers let a client use (tool calling: `tools` with tool_choice auto;
    reasoning: a separate `reasoning` field); then the aliases (catalogue.py)."""
    allowed = request.state.caller.models  # a key scoped to some models sees only those
    return {"object": "list", "data": resources(request).catalogue.cards(allowed)}


@router.get("/metrics")
async def prometheus_metrics(request: Request) -> Response:
    """The gateway's metrics and, labelled by replica, each up engine's vLLM metrics.

    Protected (auth.protect_metrics), they are for admins and observability.metrics_readers
    only: their labels name every caller."""
    held = resources(request)
    caller = getattr(request.state, "caller", None)  # set when protected
    readers = held.settings.observability.metrics_readers
    if (caller is not None and held.settings.auth.enabled
            and not (caller.admin or caller.name in readers)):
        raise GatewayError(403, "/metrics is for admin keys and the keys named in "
                           "observability.metrics_readers.", code="metrics_readers_only")
    page = await held.exposition.render()
    return Response(page, media_type=metrics.CONTENT_TYPE)


@router.get("/health")
async def health() -> dict[str, str]:
    """The gateway process lives."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> Response:
    """An engine can serve. Counts for anyone; each engine's detail (its URL among it) only for
    an admin key, or when auth is off."""
    held = resources(request)
    up = held.pool.any_up
    body: dict[str, object] = {
        "status": "ready" if up else "unavailable",
        "engines_up": sum(r.up for r in held.pool.replicas),
        "engines_total": len(held.pool.replicas),
        "queued": held.admission.queued,
    }
    if await _admin_or_open(request):
        body["engines"] = [
            {"url": r.url, "up": r.up, "in_flight": r.in_flight, "load": r.load(),
             "kv_cache_usage": r.kv_cache_usage, "circuit_open": bool(r.open_until)}
            for r in held.pool.replicas
        ]
    return JSONResponse(body, status_code=200 if up else 503)


async def _admin_or_open(request: Request) -> bool:
    """True for an admin's credential, or any request when auth is off; /ready stays open to
    probes that send none, so a bad credential only means less detail."""
    held = resources(request)
    if not held.settings.auth.enabled:
        return True
    authorization = request.headers.get("authorization")
    if authorization is None:
        return False
    try:
        caller = await held.authenticator.authenticate(authorization.encode("latin-1"))
    except GatewayError:
        return False
    return caller.admin
