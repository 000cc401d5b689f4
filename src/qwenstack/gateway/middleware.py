"""The gateway's ASGI middleware: what every request passes through, whatever its route.

`RequestContext` (outermost) gives each request an id, returns it, and logs one line per
request (and makes its span, when tracing); `Authentication` turns the bearer credential of a
protected path into a `Caller`, and refuses non-admins on admin paths, before any handler, and so
before any body is read; `BodyLimit` then refuses a body over its route's limit as it arrives.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qwenstack.gateway.auth import Authenticator
from qwenstack.gateway.errors import GatewayError, error_response
from qwenstack.gateway.exchange import Exchange

if TYPE_CHECKING:
    from qwenstack.gateway.tracing import RequestTracer

log = logging.getLogger("qwenstack.gateway")

# A client's own request id is kept when it is short and plain, so it can go into logs as is.
CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
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


class Authentication:
    """ASGI middleware: authenticates the protected paths and puts the caller in request.state;
    on `admin_only` paths (all protected too) anyone but an admin gets a 403."""

    def __init__(
        self, app: ASGIApp, protected: tuple[str, ...], admin_only: tuple[str, ...]
    ) -> None:
        self.app = app
        self.protected = protected
        self.admin_only = admin_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.protected):
            await self.app(scope, receive, send)
            return
        authenticator: Authenticator = scope["app"].state.resources.authenticator
        authorization = next(
            (value for name, value in scope["headers"] if name == b"authorization"), None
        )
        try:
            caller = await authenticator.authenticate(authorization)
            scope.setdefault("state", {})["caller"] = caller
            if not caller.admin and scope["path"].startswith(self.admin_only):
                raise GatewayError(403, "This route needs an admin key.", code="admin_only")
        except GatewayError as exc:
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


# The one route whose limit is rag.max_upload_bytes (all its files) instead of
# validation.max_body_bytes.
UPLOAD_PATH = re.compile(r"/v1/knowledge_bases/[^/]+/files")


class BodyLimit:
    """Refuses a request body over its route's limit without reading it: a Content-Length over
    the limit at once, any other body (chunked) as soon as the bytes received pass it.

    Every refusal is a 413 that closes the connection, so the rest of the body is never read.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_upload_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = scope["method"] == "POST" and UPLOAD_PATH.fullmatch(scope["path"])
        limit = self.max_upload_bytes if upload else self.max_body_bytes
        length = next((value for name, value in scope["headers"] if name == b"content-length"),
                      b"")
        if length.isdigit() and int(length) > limit:
            await error_response(body_too_large(limit))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # Raised into the handler reading the body; app.py answers it (FastAPI's body
                # parsing wraps it in an HTTPException whose cause it is).
                raise body_too_large(limit)
            return message

        await self.app(scope, limited_receive, send)


def body_too_large(max_bytes: int) -> GatewayError:
    return GatewayError(
        413, f"The request body is over {max_bytes} bytes.", code="request_too_large",
        headers={"connection": "close"},
    )
