"""Forwarding one inference request to an engine, and its answer back, untouched.

The request body goes upstream as the bytes the client sent and the answer comes back as the
bytes the engine sent: no per-chunk JSON parsing, so the gateway's cost does not grow with the
number of tokens. A client that goes away closes the upstream connection, which makes vLLM
abort the request and free its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from qwenstack.gateway.errors import GatewayError, error_body
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange
from qwenstack.gateway.replicas import Replica, ReplicaPool
from qwenstack.gateway.routing import SESSION_HEADER, RoutingPolicy

log = logging.getLogger(__name__)

T = TypeVar("T")

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Run `work`, cancelling it if the client disconnects first."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(_wait_for_disconnect(receive))
    try:
        await asyncio.wait((work_task, watch_task), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work_task, watch_task):
            task.cancel()
    if work_task.done() and not work_task.cancelled():
        return work_task.result()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await work_task
    raise ClientGone


def parse_body(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, with the fields the gateway itself relies on checked."""
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise GatewayError(400, "The request body must be a JSON object.")
    if not isinstance(payload.get("model", ""), str):
        raise GatewayError(400, "`model` must be a string.", param="model")
    if not isinstance(payload.get("stream", False), bool):
        raise GatewayError(400, "`stream` must be true or false.", param="stream")
    return payload


def upstream_body(exchange: Exchange) -> bytes:
    """The body for the engine: the client's bytes, unless a stream needs its usage turned on.

    The gateway accounts tokens for every request, so a stream always asks vLLM for the final
    usage chunk; the relay strips that chunk again for a client that did not ask for it.
    """
    if not exchange.stream or exchange.client_wants_usage:
        return exchange.body
    options = exchange.payload.get("stream_options")
    options = {**options} if isinstance(options, dict) else {}
    options["include_usage"] = True
    return orjson.dumps({**exchange.payload, "stream_options": options})


class Upstream:
    """The pooled HTTP client that talks to the engines."""

    def __init__(
        self, pool: ReplicaPool, session: aiohttp.ClientSession, policy: RoutingPolicy
    ) -> None:
        self.pool = pool
        self.session = session
        self.policy = policy

    async def forward(self, request: Request, exchange: Exchange) -> Response:
        """Send the exchange to an engine; a stream's response finishes the exchange itself."""
        model, candidates = self.pool.route(exchange.payload.get("model"))
        exchange.model = model
        exchange.session = request.headers.get(SESSION_HEADER)
        replicas = self.policy.order(candidates, exchange)
        headers = {"content-type": "application/json", "x-request-id": exchange.request_id}
        try:
            replica, upstream = await until_disconnect(
                request.receive, self._send(replicas, exchange.route, upstream_body(exchange), headers)
            )
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        exchange.replica = replica.index
        if upstream.status < 500:
            self.policy.placed(exchange, replica)
        if upstream.status == 200 and exchange.stream:
            return EngineStream(upstream, replica, exchange)
        try:
            content = await until_disconnect(request.receive, upstream.read())
        except ClientGone:
            upstream.close()
            return Response(status_code=CLIENT_CLOSED)
        except (aiohttp.ClientError, TimeoutError) as exc:
            upstream.close()
            raise _upstream_failure(exc, replica) from None
        finally:
            replica.in_flight -= 1
        if upstream.status < 500:
            replica.record_outcome(True)
        media_type = upstream.content_type
        if upstream.status >= 500 and media_type != "application/json":
            content = error_body(502, f"The engine answered {upstream.status}.", "engine_error")
            return Response(content, status_code=502, media_type="application/json")
        if upstream.status == 200:
            if exchange.capture is not None:
                exchange.capture += content
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
                exchange.record_usage(orjson.loads(content)["usage"])
        return Response(content, status_code=upstream.status, media_type=media_type)

    async def _send(
        self, replicas: list[Replica], path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[Replica, aiohttp.ClientResponse]:
        """Send to the replicas in order until one answers.

        A replica that refuses the connection saw nothing, so the next one is tried, however
        many refuse. A request that failed before its first byte came back (a dropped
        connection, a 5xx answer) may have reached its engine, so it goes to another replica
        only once: the client then sees at most two attempts' delay, never a cascade. A timeout
        is not retried: the engine may still be working on it, and the wait was long already.
        """
        retried = False
        for position, replica in enumerate(replicas):
            last = position == len(replicas) - 1
            replica.in_flight += 1
            try:
                upstream = await self._post(replica.url + path, body, headers)
            except aiohttp.ClientConnectorError as exc:
                replica.in_flight -= 1
                replica.mark_down(str(exc))
                replica.record_outcome(False)
                continue
            except BaseException as exc:
                replica.in_flight -= 1
                if not isinstance(exc, aiohttp.ClientError | TimeoutError):
                    raise
                error = _upstream_failure(exc, replica)
                if retried or last or isinstance(exc, TimeoutError):
                    raise error from None
                log.warning("Retrying on another engine after %s: %r", replica.url, exc)
                retried = True
                continue
            if upstream.status >= 500:
                replica.record_outcome(False)
                if not (retried or last):
                    log.warning("Retrying on another engine after %s answered %d",
                                replica.url, upstream.status)
                    upstream.release()
                    replica.in_flight -= 1
                    retried = True
                    continue
            return replica, upstream
        raise GatewayError(
            503, "No engine is reachable right now.", code="engine_unavailable", retry_after_s=5
        )

    async def _post(self, url: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        try:
            return await self.session.post(url, data=body, headers=headers)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise
            # A pooled keep-alive connection that the engine closed just before we wrote on it
            # ("Can not write request body", disconnected before any answer): the request got no
            # answer, so it goes once more, on a fresh connection.
            log.debug("Resending to %s on a fresh connection: %r", url, exc)
            return await self.session.post(url, data=body, headers=headers)


def _upstream_failure(exc: BaseException, replica: Replica) -> GatewayError:
    replica.record_outcome(False)
    if isinstance(exc, TimeoutError):
        return GatewayError(504, "The engine did not answer in time.", code="engine_timeout")
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionError):
        replica.mark_down(str(exc))
        return GatewayError(
            503, "The engine went away during the request.", code="engine_unavailable",
            retry_after_s=5,
        )
    return GatewayError(502, f"Bad answer from the engine: {exc}", code="engine_error")


class EngineStream(Response):
    """Relays an engine's server-sent events as they arrive, and finishes the exchange.

    Bytes pass through untouched, except the final usage event: it is read for accounting, and
    dropped when the client did not ask for it. Only the events that contain `"usage":{` are
    parsed, so the per-chunk cost is a byte search.
    """

    def __init__(self, upstream: aiohttp.ClientResponse, replica: Replica, exchange: Exchange) -> None:
        # Not Response.__init__: it would render an empty body and announce content-length 0.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(SSE_HEADERS)
        self.upstream = upstream
        self.replica = replica
        self.exchange = exchange

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = CLIENT_CLOSED
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await until_disconnect(receive, self._relay(send))
            status = 200
        except ClientGone:
            pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are out: report the failure the way vLLM does mid-stream, as an event.
            error = _upstream_failure(exc, self.replica)
            status = error.status
            event = b"data: " + error_body(error.status, error.message, error.code) + b"\n\n"
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            self.replica.in_flight -= 1
            if status == 200:
                self.replica.record_outcome(True)
                self.upstream.release()
            else:
                # Dropping the connection is how vLLM learns to abort the request.
                self.upstream.close()
            await self.exchange.finish(status)

    async def _relay(self, send: Send) -> None:
        exchange = self.exchange
        partial = b""  # an event cut by a chunk boundary, held back until its end arrives
        capture = exchange.capture  # None unless the answer cache keeps this answer
        async for chunk in self.upstream.content.iter_any():
            if capture is not None:
                capture += chunk
            if exchange.first_chunk_s is None:
                exchange.first_chunk_s = time.perf_counter() - exchange.started_s
            events = partial + chunk if partial else chunk
            end = events.rfind(b"\n\n") + 2  # 1 when there is no complete event yet
            if end == 1:
                end = 0
            events, partial = events[:end], events[end:]
            if b'"usage":{' in events:
                events = take_usage(events, exchange)
            if exchange.final_event and b"data: [DONE]" in events:
                events = events.replace(b"data: [DONE]", exchange.final_event + b"data: [DONE]", 1)
            if events:
                await send({"type": "http.response.body", "body": events, "more_body": True})
        await send({"type": "http.response.body", "body": partial, "more_body": False})


def take_usage(events: bytes, exchange: Exchange) -> bytes:
    """Record the usage event's token counts; drop that event unless the client asked for it."""
    kept = []
    for event in events.split(b"\n\n")[:-1]:
        if b'"usage":{' in event and event.startswith(b"data: {"):
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError):
                chunk = orjson.loads(event[6:])
                exchange.record_usage(chunk["usage"])
                if not chunk.get("choices") and not exchange.client_wants_usage:
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept)
