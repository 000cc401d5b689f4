"""The path of an inference request through the gateway, step by step.

    authenticate (auth.Authentication, before this) -> read + parse -> validate -> route
    (model scope) -> ground (when knowledge bases are named) -> limits reserve -> answer cache
    lookup -> admission queue -> forward (or stream) -> finish (accounting, usage record, cache
    store)

Each step raises a GatewayError to refuse; whatever happens, the exchange is finished once.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from qwenstack.gateway import cache, knowledge, metrics, validation
from qwenstack.gateway.auth import check_model
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange
from qwenstack.gateway.proxy import ClientGone, EngineStream, parse_body, until_disconnect


async def serve(request: Request, route: str) -> Response:
    state = request.app.state
    body = await validation.read_body(request, state.validation.max_body_bytes)
    exchange = Exchange(
        request.state.request_id, route, body, {},
        caller=request.state.caller,  # authenticated before routing, by auth.Authentication
    )
    request.state.exchange = exchange
    metrics.track(exchange)
    exchange.on_finish(state.usage.finisher)
    try:
        exchange.payload = parse_body(body)  # inside: a malformed request is counted too
        knowledge_bases = knowledge.take_knowledge_bases(exchange)  # resolves a `+kb:` alias
        cards = state.pool.model_cards()
        validation.check(exchange, state.validation, cards)
        # The engine is chosen again when forwarding (after any queueing); this resolves the
        # model and finds an engine to count prompt tokens with.
        exchange.model, replicas = state.pool.route(exchange.payload.get("model"))
        check_model(exchange.caller, exchange.model)
        if knowledge_bases:
            # After the checks (retrieval costs), before the limits (they count its context).
            await knowledge.ground(request, exchange, knowledge_bases)
        rate_headers = await state.limiter.reserve(
            exchange, replicas[0], validation.context_window(exchange.model, cards)
        )
        # A grounded answer's citations are added after the engine answers, and a replay from
        # the cache would lack them: such requests skip the cache.
        cache_control = "no-store" if exchange.citations is not None else request.headers.get(
            "cache-control")
        response = await state.cache.lookup(exchange, cache_control)
        if response is None and not state.admission.admit_now(exchange):
            try:
                await until_disconnect(request.receive, state.admission.wait(exchange))
            except ClientGone:
                response = Response(status_code=CLIENT_CLOSED)
        if response is None:
            response = await state.upstream.forward(request, exchange)
        response = knowledge.attach_citations(response, exchange)
        cache.label(response, exchange)
    except GatewayError as exc:
        await exchange.finish(exc.status, exc.code)
        raise
    except BaseException:
        await exchange.finish(500, "internal_error")
        raise
    response.raw_headers.extend(rate_headers)
    if not isinstance(response, EngineStream):  # a stream finishes when its last byte is out
        await exchange.finish(response.status_code)
    return response
