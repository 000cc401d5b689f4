"""Loading LoRA adapters into running engines: an admin route of the gateway, never the
engines' own.

vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (open on an engine started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING: engine.lora.runtime_loading) take any folder on the engine's
host and have no authentication; engines listen on loopback and the gateway forwards neither,
so tenants cannot reach them. Admins load an adapter here on every up replica of its base
model; the pool then reads those replicas' /v1/models again, so the adapter is listed, routed
and scoped by keys like any model. An adapter loaded here lasts until its engine restarts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from qwenstack.gateway.admin import require_admin
from qwenstack.gateway.errors import GatewayError
from qwenstack.gateway.relay import JSON
from qwenstack.gateway.replicas import Replica
from qwenstack.gateway.resources import resources
from qwenstack.settings.engine import ADAPTER_NAME

router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)])


class NewAdapter(BaseModel):
    name: str = Field(pattern=f"^{ADAPTER_NAME}$", description="The model name clients send.")
    path: str = Field(min_length=1, max_length=4096,
                      description="The adapter's folder on the engines' host, or a hub id.")
    model: str | None = Field(
        None, description="Its base model: the served model whose replicas load it. Unset: the "
        "first served model.",
    )


@router.post("/lora_adapters")
async def load_adapter(body: NewAdapter, request: Request) -> dict[str, Any]:
    """Load an adapter on every up replica serving `model`; 502 naming the replicas that
    refused (vLLM's message: LoRA not enabled, runtime loading off, a bad folder, a rank above
    --max-lora-rank), the others keep it."""
    pool = resources(request).pool
    base = pool.resolve(body.model)  # 404 unknown, 503 none up
    if body.name in {card["id"] for card in pool.model_cards()}:
        raise GatewayError(409, f"A model named {body.name!r} is served already.",
                           code="model_exists", param="name")
    replicas = [r for r in pool.replicas if r.up and r.serves(base.name)]
    payload = {"lora_name": body.name, "lora_path": body.path}
    return await _on_replicas(request, replicas, "/v1/load_lora_adapter", payload, body.name)


@router.delete("/lora_adapters/{name:path}")  # an adapter's name may hold `/` (org/adapter)
async def unload_adapter(name: str, request: Request) -> dict[str, Any]:
    pool = resources(request).pool
    # Only an adapter (a card with a parent): a base model's name is no adapter to unload.
    is_adapter = any(card["id"] == name and card.get("parent") for card in pool.model_cards())
    replicas = [r for r in pool.replicas if r.up and r.serves(name)] if is_adapter else []
    if not replicas:
        raise GatewayError(404, f"No engine serves an adapter named {name!r}.",
                           code="model_not_found", param="name")
    return await _on_replicas(request, replicas, "/v1/unload_lora_adapter", {"lora_name": name},
                              name)


async def _on_replicas(
    request: Request, replicas: list[Replica], path: str, payload: dict[str, str], name: str
) -> dict[str, Any]:
    held = resources(request)
    session = held.upstream.session

    async def call(replica: Replica) -> dict[str, Any]:
        try:
            async with session.post(replica.url + path, data=orjson.dumps(payload),
                                    headers={"content-type": JSON}) as answer:
                text = (await answer.read()).decode(errors="replace")
                return {"replica": replica.index, "status": answer.status,
                        "message": _message(text)}
        except (aiohttp.ClientError, TimeoutError) as exc:
            return {"replica": replica.index, "status": 503, "message": repr(exc)}

    outcomes = await asyncio.gather(*map(call, replicas))
    await held.pool.refresh_models(replicas)
    failed = [outcome for outcome in outcomes if outcome["status"] != 200]
    if failed:
        detail = "; ".join(f"replica {o['replica']}: {o['status']} {o['message']}"
                           for o in failed)
        raise GatewayError(502, f"{path.rsplit('/', 1)[1]} of {name!r} failed on "
                           f"{len(failed)} of {len(outcomes)} replicas: {detail}"[:2000],
                           code="lora_adapter_failed")
    return {"object": "lora_adapter", "name": name, "replicas": outcomes}


def _message(text: str) -> str:
    """vLLM's answer: an error's message, or its plain text."""
    try:
        answer = orjson.loads(text)
    except orjson.JSONDecodeError:
        return text[:500]
    error = answer.get("error", answer) if isinstance(answer, dict) else answer
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or text)[:500]
