"""The gateway's HTTP client to the engines: every call to an engine goes through here.

A request goes to the replicas its routing policy lists, in order, holding a lease on the
one it is at (the replica's in-flight count) and telling the replica's circuit breaker how it
went. Token counting (vLLM's /tokenize) takes the same path, so it too is counted and breaks
circuits. A client that goes away closes the upstream connection, which makes vLLM abort the
request and free its KV cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import orjson
from starlette.requests import Request
from starlette.responses import Response

from qwenstack.gateway import responses
from qwenstack.gateway.disconnect import ClientGone, until_disconnect
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange
from qwenstack.gateway.protocol import CHAT, RESPONSES
from qwenstack.gateway.relay import (
    JSON,
    EngineStream,
    engine_at_fault,
    opening,
    stream_error,
    whole_answer,
)
from qwenstack.gateway.replicas import Lease, Replica, ReplicaPool, engine_failure
from qwenstack.gateway.routing import RoutingPolicy

log = logging.getLogger(__name__)

# What vLLM's /tokenize needs of a chat request to count its templated prompt.
CHAT_TOKENIZE_FIELDS = ("messages", "tools", "chat_template_kwargs", "add_generation_prompt")


class Upstream:
    def __init__(
        self, pool: ReplicaPool, session: aiohttp.ClientSession, policy: RoutingPolicy
    ) -> None:
        self.pool = pool
        self.session = session
        self.policy = policy
        self._specials: dict[str, int] = {}  # served model -> special tokens per prompt

    async def forward(self, request: Request, exchange: Exchange) -> Response:
        """Send the exchange to an engine; a stream's response finishes the exchange itself."""
        replicas = self.policy.order(self.pool.candidates(exchange.model), exchange)
        headers = {"content-type": JSON, "x-request-id": exchange.request_id}
        # The gateway accounts tokens for every request, so a stream always asks vLLM for the
        # final usage event; the relay strips it again for a client that did not ask for it.
        body = exchange.request.to_bytes(include_usage=True)
        try:
            lease, upstream = await until_disconnect(
                request.receive, self._send(replicas, exchange, body, headers)
            )
        except ClientGone:
            return Response(status_code=CLIENT_CLOSED)
        replica = lease.replica
        exchange.replica = replica.index
        streamed = upstream.status == 200 and exchange.stream
        content = await self._read(request, upstream, lease, streamed)
        if content is None:
            return Response(status_code=CLIENT_CLOSED)
        status, media_type = upstream.status, upstream.content_type
        if streamed:
            exchange.first_chunk_s = time.perf_counter() - exchange.started_s
            error = stream_error(content)
            if error is None:
                return EngineStream(upstream, lease, exchange, content)
            (status, content), media_type = error, JSON
            upstream.close()
        lease.release()
        if engine_at_fault(exchange, status):
            if streamed:  # a plain 5xx was counted when it arrived (_send)
                replica.record_outcome(False)
        elif status < 500:
            replica.record_outcome(True)
        return whole_answer(exchange, status, content, media_type)

    @staticmethod
    async def _read(
        request: Request, upstream: aiohttp.ClientResponse, lease: Lease, streamed: bool
    ) -> bytes | None:
        """The engine's whole answer or, `streamed`, its opening (relay.opening): read before
        the response starts, so that a request the engine fails at its first token (vLLM then
        streams the error, e.g. for a JSON schema it cannot compile) is answered with the
        error's status, as it would be without streaming. None: the client left first. On any
        failure the lease is released and the connection dropped (vLLM then aborts it)."""
        try:
            return await until_disconnect(
                request.receive, opening(upstream) if streamed else upstream.read())
        except BaseException as exc:
            lease.release()
            upstream.close()
            if isinstance(exc, ClientGone):
                return None
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise engine_failure(exc, lease.replica) from None
            raise

    async def count_prompt_tokens(self, exchange: Exchange) -> int:
        """The prompt length, from the engine's tokenizer (its /tokenize applies the chat
        template), in one /tokenize call per request. A few ms, paid only by callers with a
        token limit.

        vLLM's /tokenize takes one prompt, so a batch of texts is counted as one text, joined
        by newlines, plus the special tokens (a BOS) each further prompt would add, learnt once
        per model. A merge across a joint can shift the count by a token or so per prompt;
        the newline's own token is left in as a margin, and the reservation is replaced by the
        engine's real usage when the request ends."""
        request = exchange.request
        if request.route == CHAT:
            body = {"model": exchange.model,
                    **{k: request.get(k) for k in CHAT_TOKENIZE_FIELDS if k in request}}
            return await self._tokenize(exchange, body, "messages")
        if request.route == RESPONSES:
            body = {"model": exchange.model, **responses.tokenize_fields(request)}
            return await self._tokenize(exchange, body, "input")
        prompts = request.prompts
        counted = sum(len(p) for p in prompts if isinstance(p, list))  # token ids already
        texts = [p for p in prompts if isinstance(p, str)]
        if not texts:
            return counted
        joined = await self._tokenize(
            exchange, {"model": exchange.model, "prompt": "\n".join(texts)}, "prompt"
        )
        if len(texts) > 1:
            joined += (len(texts) - 1) * await self._special_tokens(exchange)
        return counted + joined

    async def _special_tokens(self, exchange: Exchange) -> int:
        """Tokens the model's tokenizer adds to every prompt (its BOS), asked once per model."""
        known = self._specials.get(exchange.model)
        if known is None:
            known = self._specials[exchange.model] = await self._tokenize(
                exchange, {"model": exchange.model, "prompt": ""}, "prompt"
            )
        return known

    async def _tokenize(self, exchange: Exchange, body: dict[str, Any], param: str) -> int:
        replica = min(self.pool.candidates(exchange.model), key=Replica.load)
        headers = {"content-type": JSON, "x-request-id": exchange.request_id}
        try:
            with replica.lease():
                async with self.session.post(f"{replica.url}/tokenize", data=orjson.dumps(body),
                                             headers=headers) as response:
                    answer = orjson.loads(await response.read())
        except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
            if not isinstance(exc, orjson.JSONDecodeError):
                engine_failure(exc, replica)
            raise GatewayError(503, f"Could not count the prompt's tokens: {exc}",
                               code="engine_unavailable", retry_after_s=1) from None
        if response.status != 200:
            error = answer.get("error", answer) if isinstance(answer, dict) else {}
            message = error.get("message") if isinstance(error, dict) else None
            raise GatewayError(400, f"Invalid prompt: {message or answer}", param=param)
        return int(answer["count"])

    async def _send(
        self, replicas: list[Replica], exchange: Exchange, body: bytes, headers: dict[str, str]
    ) -> tuple[Lease, aiohttp.ClientResponse]:
        """Send to the replicas in order until one answers.

        A replica that refuses the connection saw nothing, so the next one is tried, however
        many refuse. A request that failed before its first byte came back (a dropped
        connection, a 5xx answer) may have reached its engine, so it goes to another replica
        only once: the client then sees at most two attempts' delay, never a cascade. A timeout
        is not retried: the engine may still be working on it, and the wait was long already.
        Nor is an answer that is the request's fault (relay.engine_at_fault).
        """
        retried = False
        for position, replica in enumerate(replicas):
            last = position == len(replicas) - 1
            lease = replica.lease()
            try:
                upstream = await self._post(replica.url + exchange.route, body, headers)
            except aiohttp.ClientConnectorError as exc:
                lease.release()
                replica.mark_down(str(exc))
                replica.record_outcome(False)
                continue
            except BaseException as exc:
                lease.release()
                if not isinstance(exc, aiohttp.ClientError | TimeoutError):
                    raise
                error = engine_failure(exc, replica)
                if retried or last or isinstance(exc, TimeoutError):
                    raise error from None
                log.warning("Retrying on another engine after %s: %r", replica.url, exc)
                retried = True
                continue
            if engine_at_fault(exchange, upstream.status):
                replica.record_outcome(False)
                if not (retried or last):
                    log.warning("Retrying on another engine after %s answered %d",
                                replica.url, upstream.status)
                    upstream.release()
                    lease.release()
                    retried = True
                    continue
            return lease, upstream
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
