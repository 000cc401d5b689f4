"""An engine's answer on its way back to the client: relayed as the engine's bytes.

No per-chunk JSON parsing, so the gateway's cost does not grow with the number of tokens: a
stream's events pass through untouched except the final usage event, which is read for
accounting (and dropped when the client did not ask for it); only events that contain
`"usage":{` are parsed, so the per-chunk cost is a byte search. What other concerns add to an
answer (the cache's copy, grounded chat's citations) comes through the exchange's
`AnswerHooks`, so this module does not know them.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from qwenstack.gateway.disconnect import ClientGone, until_disconnect
from qwenstack.gateway.errors import error_body
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange
from qwenstack.gateway.replicas import Lease, engine_failure

SSE_HEADERS = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
)
DONE = b"data: [DONE]"
# How vLLM starts a stream it fails before the first token (it writes JSON with spaces).
ERROR_EVENT = b'data: {"error"'
JSON = "application/json"


def engine_at_fault(exchange: Exchange, status: int) -> bool:
    """A 5xx answer counts against the engine, but a 500 to a guided request: vLLM answers 500
    when the request's grammar admits no token at all (`{"$ref": "#"}`, a schema that never
    ends), the request's fault; else one tenant could take every engine out of rotation."""
    return status >= 500 and not (status == 500 and exchange.request.guided)


def whole_answer(exchange: Exchange, status: int, content: bytes, media_type: str) -> Response:
    """A complete (not streamed) engine answer as the client gets it."""
    if status == 500 and not engine_at_fault(exchange, status):
        content = error_body(
            400, "The engine could not generate under this request's output constraints "
            "(response_format, structured_outputs or the tools' parameters): no output can "
            "satisfy them, e.g. a schema whose required properties refer back to themselves.",
            "invalid_output_constraints")
        return Response(content, status_code=400, media_type=JSON)
    if status >= 500 and media_type != "application/json":
        content = error_body(502, f"The engine answered {status}.", "engine_error")
        return Response(content, status_code=502, media_type=JSON)
    if status == 200:
        for see in exchange.answer.taps:
            see(content)
        with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError, ValueError,
                                 KeyError):
            answer = orjson.loads(content)
            exchange.record_usage(answer)
            if exchange.answer.amendments:
                for change in exchange.answer.amendments:
                    change(answer)
                content = orjson.dumps(answer)
    return Response(content, status_code=status, media_type=media_type)


async def opening(upstream: aiohttp.ClientResponse) -> bytes:
    """A stream's bytes up to the end of its first event that says more than the answer's role
    (vLLM announces the role as the first token comes, and may fail the request just after),
    or of the stream."""
    received = b""
    while True:
        events = received.split(b"\n\n")[:-1]  # the complete ones
        if events and not all(_announces_role(event) for event in events):
            return received
        chunk = await upstream.content.readany()
        if not chunk:
            return received
        received += chunk


def _announces_role(event: bytes) -> bool:
    """A chat chunk whose choices carry nothing but the role (and empty content)."""
    try:
        chunk = orjson.loads(event.removeprefix(b"data: "))
        return bool(chunk["choices"]) and all(
            not choice.get("finish_reason") and set(choice["delta"]) <= {"role", "content"}
            and not choice["delta"].get("content") for choice in chunk["choices"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return False


def stream_error(opening: bytes) -> tuple[int, bytes] | None:
    """A stream that opens with vLLM's error event (after role announcements, if any), as the
    status and JSON body the engine would have answered without streaming (the event's `code`
    is that status); None for any other stream."""
    events = opening.split(b"\n\n")
    error = next((event for event in events if event.startswith(ERROR_EVENT)), None)
    if error is None:
        return None
    try:
        body = orjson.loads(error[len(b"data: "):])["error"]
        code = body["code"]
    except (ValueError, KeyError, TypeError):
        return 502, error_body(502, "The engine's stream began with an unreadable error.",
                               "engine_error")
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    return status, orjson.dumps({"error": body})


class EngineStream(Response):
    """Relays an engine's server-sent events as they arrive, and finishes the exchange (with
    the replica's lease) when the last byte is out or the client is gone. `first`: what was
    read of the stream already (its opening, see upstream.Upstream._read)."""

    def __init__(
        self, upstream: aiohttp.ClientResponse, lease: Lease, exchange: Exchange, first: bytes
    ) -> None:
        # Not Response.__init__: it would render an empty body and announce content-length 0.
        self.status_code = 200
        self.background = None
        self.raw_headers = list(SSE_HEADERS)
        self.upstream = upstream
        self.lease = lease
        self.exchange = exchange
        self.first = first

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = CLIENT_CLOSED
        replica = self.lease.replica
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await until_disconnect(receive, self._relay(send))
            status = 200
        except ClientGone:
            pass
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Headers are out: report the failure the way vLLM does mid-stream, as an event.
            error = engine_failure(exc, replica)
            status = error.status
            event = b"data: " + error_body(error.status, error.message, error.code) + b"\n\n"
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": event, "more_body": False})
        finally:
            self.lease.release()
            if status == 200:
                replica.record_outcome(True)
                self.upstream.release()
            else:
                # Dropping the connection is how vLLM learns to abort the request.
                self.upstream.close()
            await self.exchange.finish(status)

    async def _relay(self, send: Send) -> None:
        exchange = self.exchange
        taps = exchange.answer.taps
        trailer = exchange.answer.trailer
        partial = b""  # an event cut by a chunk boundary, held back until its end arrives
        async for chunk in self._chunks():
            for see in taps:
                see(chunk)
            if exchange.first_chunk_s is None:
                exchange.first_chunk_s = time.perf_counter() - exchange.started_s
            events = partial + chunk if partial else chunk
            end = events.rfind(b"\n\n") + 2  # 1 when there is no complete event yet
            if end == 1:
                end = 0
            events, partial = events[:end], events[end:]
            if b'"usage":{' in events:
                events = take_usage(events, exchange)
            if trailer and DONE in events:
                events = events.replace(DONE, trailer + DONE, 1)
            if events:
                await send({"type": "http.response.body", "body": events, "more_body": True})
        await send({"type": "http.response.body", "body": partial, "more_body": False})

    async def _chunks(self) -> AsyncIterator[bytes]:
        if self.first:
            yield self.first
        async for chunk in self.upstream.content.iter_any():
            yield chunk


def take_usage(events: bytes, exchange: Exchange) -> bytes:
    """Record the usage event's token counts; drop that event unless the client asked for it.
    An event is its `data:` line, after an `event:` line on the Responses route."""
    kept = []
    for event in events.split(b"\n\n")[:-1]:
        data = event.partition(b"data: ")[2] if b'"usage":{' in event else b""
        if data.startswith(b"{"):
            with contextlib.suppress(orjson.JSONDecodeError, KeyError, TypeError, ValueError,
                                     AttributeError):
                chunk = orjson.loads(data)
                exchange.record_usage(chunk)
                if not chunk.get("choices") and not exchange.request.wants_usage:
                    continue
        kept.append(event + b"\n\n")
    return b"".join(kept)
