"""Which served model takes a request, and how /v1/models describes each.

- An alias (`gateway.model_aliases`) is another name of a served model, taken for that model
  from the first step on: scopes, limits, the answer cache's key, the usage row's `model` and
  the body sent to the engine all see the served name. /v1/models lists an alias beside its
  model, for the callers it lists that model to, as a copy of its card with `alias_of`.
- A fallback (`gateway.model_fallbacks`) serves a request while no engine of the model asked
  for is ready (none up, all out of rotation, or none seen yet): the first of its list that the
  caller's key may use and that has a ready engine. It is chosen before the limits, the answer
  cache and the engine see the request, so nothing was sent yet. A caller whose key may not use
  the model asked for gets 403 as without fallbacks, never another model instead.
- A request without `model` gets the first chat model of `engine.models`.
- Each card says the model's `role` (chat, embed or rerank) and `capabilities`, from the
  models this gateway started (`up`); for remote engines, from the `engine` settings.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter

from qwenstack.callers import Caller
from qwenstack.gateway.auth import check_model
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.exchange import Exchange
from qwenstack.gateway.replicas import ReplicaPool, ServedModel
from qwenstack.settings import Settings
from qwenstack.settings.engine import ServedModelSettings

# Bounded: only models named in gateway.model_fallbacks get here.
FALLBACKS = Counter(
    "qwenstack_model_fallbacks",
    "Requests served by a fallback model while no engine of the model asked for was ready.",
    ["requested", "served"],
)
# Why a model cannot take a request now, and a fallback may: nobody serves it (yet), or no
# engine of it is ready.
UNAVAILABLE = (404, 503)


class ModelCatalogue:
    def __init__(self, settings: Settings, pool: ReplicaPool) -> None:
        self.pool = pool
        self.aliases = settings.gateway.model_aliases
        self.fallbacks = settings.gateway.model_fallbacks
        self._engine = settings.engine
        self._described = {model.served_model_name: model for model in settings.engine.served()
                           if model.served_model_name}
        self._default = next((model.served_model_name for model in settings.engine.chat_models()
                              if model.served_model_name), None)

    def describe(self, name: str) -> ServedModelSettings:
        """The served model's settings; for one not started here, the `engine` section's."""
        return self._described.get(name, self._engine)

    def resolve(self, exchange: Exchange) -> ServedModel:
        """The model that serves the exchange (see the module's doc), named in its body;
        404 and 503 as ReplicaPool.resolve says when neither it nor a fallback can."""
        asked = exchange.request.model
        name = self._default if asked is None else self.aliases.get(asked, asked)
        try:
            served = self.pool.resolve(name)
        except GatewayError as refusal:
            if refusal.status not in UNAVAILABLE or name is None or name not in self.fallbacks:
                raise
            check_model(exchange.caller, name)
            served = self._fallback(exchange.caller, name, refusal)
            FALLBACKS.labels(name, served.name).inc()
        if asked is not None and asked != served.name:
            exchange.requested_model = asked
        if asked != served.name:
            exchange.request.set("model", served.name)
        return served

    def _fallback(self, caller: Caller, name: str, refusal: GatewayError) -> ServedModel:
        for fallback in self.fallbacks[name]:
            fallback = self.aliases.get(fallback, fallback)
            if caller.models is not None and fallback not in caller.models:
                continue
            try:
                return self.pool.resolve(fallback)
            except GatewayError as exc:
                if exc.status not in UNAVAILABLE:
                    raise
        raise refusal

    def cards(self, allowed: frozenset[str] | set[str] | None) -> list[dict[str, Any]]:
        """/v1/models' list for a caller who may use `allowed` (None: every model)."""
        listed: dict[str, dict[str, Any]] = {}
        for card in self.pool.model_cards():
            if allowed is None or card["id"] in allowed:
                described = self.describe(card["id"])
                listed[card["id"]] = {**card, "role": described.role,
                                      "capabilities": described.capabilities}
        aliases = [{**listed[model], "id": alias, "alias_of": model}
                   for alias, model in self.aliases.items()
                   if model in listed and alias not in listed]
        return [*listed.values(), *aliases]
