"""The path of an inference request through the gateway, step by step.

    authenticate (middleware.Authentication, before this) -> read + parse (protocol) -> take
    knowledge bases (grounding) -> validate (schemas too) -> resolve the model (catalogue:
    aliases, fallbacks; replicas) ->
    check the caller's scope and thinking policy -> ground -> limits reserve -> answer cache
    lookup -> admission queue -> forward (upstream: route, send, retry) -> relay (relay:
    stream or whole answer) -> finish (accounting, usage record, tool calls, cache store)

Each step raises a GatewayError to refuse; whatever happens, the exchange is finished once.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from qwenstack.callers import Caller
from qwenstack.gateway import cache, grounding, metrics, tool_calls, validation
from qwenstack.gateway.auth import check_model
from qwenstack.gateway.disconnect import ClientGone, until_disconnect
from qwenstack.gateway.exchange import CLIENT_CLOSED, Exchange, finished_on_error
from qwenstack.gateway.protocol import RESPONSES, InferenceRequest, Route
from qwenstack.gateway.relay import EngineStream
from qwenstack.gateway.resources import Resources, resources
from qwenstack.gateway.routing import SESSION_HEADER


async def serve(request: Request, route: Route) -> Response:
    held = resources(request)
    settings = held.settings
    raw = await request.body()  # bounded as it arrives, by middleware.BodyLimit
    exchange = Exchange(
        request.state.request_id, InferenceRequest(route, {}, raw),  # until parsed, below
        caller=request.state.caller,  # authenticated before routing, by the middleware
        session=request.headers.get(SESSION_HEADER),
    )
    request.state.exchange = exchange
    metrics.track(exchange)
    exchange.on_finish(held.usage.finisher)
    async with finished_on_error(exchange):
        exchange.request = InferenceRequest.parse(route, raw)  # a malformed one is counted too
        knowledge_bases = grounding.take_knowledge_bases(exchange.request)  # a `+kb:` alias too
        validation.check(exchange.request, settings.validation, settings.rag)
        validation.check_pooling(exchange.request, settings.rag)
        model = held.catalogue.resolve(exchange)  # an alias or a fallback named here
        exchange.model = model.name
        validation.check_fits(exchange.request, model)
        check_model(exchange.caller, exchange.model)
        validation.hold_thinking(exchange.request, exchange.caller, settings.validation)
        if knowledge_bases:
            # After the checks (retrieval costs), before the limits (they count its context).
            await grounding.ground(exchange, knowledge_bases, held.knowledge)
        rate_headers = await held.limiter.reserve(
            exchange, lambda: held.upstream.count_prompt_tokens(exchange), model.max_model_len
        )
        # A grounded answer's citations are added after the engine answers, and a replay from
        # the cache would lack them; a Responses answer names its response and items by ids
        # all through its events, which a replay would repeat: such requests skip the cache.
        skip_cache = knowledge_bases or exchange.route == RESPONSES
        cache_control = "no-store" if skip_cache else request.headers.get("cache-control")
        response = await held.cache.lookup(exchange, cache_control)
        if response is None and not held.admission.admit_now(exchange):
            try:
                await until_disconnect(request.receive, held.admission.wait(exchange))
            except ClientGone:
                response = Response(status_code=CLIENT_CLOSED)
        if response is None:
            if settings.validation.prefix_cache_per_caller:
                exchange.request.set("cache_salt", cache_salt(held, exchange.caller))
            # A Responses answer's calls are its output items, counted with its usage (exchange).
            if exchange.request.get("tools") and exchange.route != RESPONSES:
                tool_calls.count_relayed(exchange)
            response = await held.upstream.forward(request, exchange)
        cache.label(response, exchange)
    response.raw_headers.extend(rate_headers)
    if not isinstance(response, EngineStream):  # a stream finishes when its last byte is out
        await exchange.finish(response.status_code)
    return response


def cache_salt(held: Resources, caller: Caller) -> str:
    """vLLM's `cache_salt` for the caller: its prefix-cache blocks match only requests with the
    same salt, so one tenant cannot learn from timing whether another sent a prompt. An HMAC
    under the server's pepper: stable per caller (or per configured group), not guessable."""
    group = held.settings.validation.prefix_cache_groups.get(caller.name)
    scope = f"group\0{group}" if group is not None else f"caller\0{caller.name}"
    return held.keys.digest(f"cache_salt\0{scope}".encode())[:32]
