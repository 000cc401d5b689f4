"""Several models behind one gateway, from one `engine.models` list: the shared stack's
(conftest.py) tiny Qwen3 and bundled SmolLM2 as chat models, the tiny Qwen3 again as an
embedding model and as a reranker, each with engines of their own. Each chat model answers
through the gateway what its engine answers; keys are scoped per model; an alias answers as its
model; a fallback serves while the first model's engine is stopped, and the usage row says which
model served.

`up` resolves each model's parsers itself: the shared stack's own gateway shows them. Aliases,
fallbacks and keys are a gateway's: this module's gateway, in front of the stack's engines and
told what they serve by engine.models (as Compose and Helm tell theirs), has them.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from helpers import (
    ADAPTER,
    EMBED,
    RERANK,
    SMOLLM2,
    TINY,
    Gateway,
    Stack,
    create_key,
    metric,
    start_gateway,
    usage_rows,
    wait_for,
)
from ui_browser import Chat, running_chat_ui

ALIAS = "gpt-4o-mini"  # what an application might hard-code
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
        "max_tokens": 8}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, stack: Stack) -> Iterator[Gateway]:
    first, *rest = [engine["url"] for engine in stack.engine_state()]
    described = [{"served_model_name": TINY, "replicas": 2, "tool_call_parser": "hermes"},
                 {"served_model_name": SMOLLM2, "tool_call_parser": "none"},
                 {"served_model_name": EMBED, "role": "embed"},
                 {"served_model_name": RERANK, "role": "rerank"}]
    gateway = start_gateway(
        tmp_path_factory.mktemp("models-gateway"), first,
        *[arg for url in rest for arg in ("--engine-url", url)], auth=True,
        env={"QWENSTACK_ENGINE__MODELS": json.dumps(described),
             "QWENSTACK_GATEWAY__MODEL_ALIASES": json.dumps({ALIAS: TINY}),
             "QWENSTACK_GATEWAY__MODEL_FALLBACKS": json.dumps({SMOLLM2: [TINY]})})
    yield gateway
    assert gateway.stop() == 0


@pytest.fixture(scope="module")
def admin(gateway: Gateway) -> dict[str, str]:
    key = create_key(gateway.home, "--name", "models-admin", "--admin")
    return {"authorization": f"Bearer {key}"}


def _engine(stack: Stack, model: str) -> dict:
    return next(e for e in stack.engine_state() if e["model"] == model)


def _chat(url: str, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model},
                      headers={"x-request-id": uuid.uuid4().hex, **(headers or {})}, timeout=120)


def _answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _database(gateway: Gateway) -> str:
    return f"sqlite:///{gateway.home / 'qwenstack.db'}"


def test_each_model_answers_through_the_gateway_what_its_engine_answers(
    stack: Stack, gateway: Gateway, admin: dict[str, str]
):
    state = stack.engine_state()
    assert [(e["model"], e["state"]) for e in state] == [
        (TINY, "ready"), (TINY, "ready"), (SMOLLM2, "ready"), (EMBED, "ready"),
        (RERANK, "ready")]
    assert len({e["url"] for e in state}) == 5  # ports assigned without collision
    answers = {}
    for model in (TINY, SMOLLM2):
        direct = _answer(_chat(_engine(stack, model)["url"], model))
        for url, auth in ((stack.gateway, stack.auth), (gateway.url, admin)):
            assert _answer(_chat(url, model, auth)) == direct
        answers[model] = direct
    assert answers[TINY] != answers[SMOLLM2]  # two models, not one engine twice

    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.key)
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert set(cards) == {TINY, SMOLLM2, ADAPTER, EMBED, RERANK}
    assert cards[TINY]["role"] == cards[SMOLLM2]["role"] == "chat"
    assert (cards[EMBED]["role"], cards[RERANK]["role"]) == ("embed", "rerank")
    assert cards[EMBED]["capabilities"] == {"tool_calling": False, "reasoning": False}
    # Each its own parsers, as `up` picks them: hermes for the Qwen3, none for SmolLM2's family.
    assert cards[TINY]["capabilities"]["tool_calling"] is True
    assert cards[SMOLLM2]["capabilities"]["tool_calling"] is False
    argv = Path(f"/proc/{_engine(stack, SMOLLM2)['pid']}/cmdline").read_bytes().decode()
    assert "--tool-call-parser" not in argv.split("\0")
    listed = httpx.get(f"{gateway.url}/v1/models", headers=admin, timeout=30).json()["data"]
    assert {card["id"]: card.get("alias_of") for card in listed}[ALIAS] == TINY


def test_the_bundled_cpu_model_has_no_tools_but_holds_json_to_a_schema(stack: Stack):
    """README "The bundled CPU model": SmolLM2's engine runs no tool-call parser, so `tools`
    (tool_choice `auto` by default) is vLLM's 400, relayed in OpenAI's error shape, and
    `tool_choice: none` answers; a `json_schema` response format holds its output to the
    schema (guided decoding), whatever a 135M model puts there."""
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.key, max_retries=0)
    question = [{"role": "user", "content": "What is the capital of France?"}]
    tool = {"type": "function", "function": {
        "name": "capital", "parameters": {"type": "object", "properties": {}}}}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=SMOLLM2, messages=question, tools=[tool],
                                       max_tokens=8)
    assert "tool-call-parser" in refused.value.message
    plain = client.chat.completions.create(model=SMOLLM2, messages=question, tools=[tool],
                                           tool_choice="none", max_tokens=8)
    assert plain.choices[0].message.content and not plain.choices[0].message.tool_calls
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 24}},
              "required": ["capital"], "additionalProperties": False}
    answer = client.chat.completions.create(
        model=SMOLLM2, messages=question, max_tokens=64, temperature=0,
        response_format={"type": "json_schema", "json_schema": {
            "name": "answer", "schema": schema, "strict": True}},
    )
    jsonschema.validate(json.loads(answer.choices[0].message.content or ""), schema)


def test_an_embedding_role_engine_embeds(stack: Stack):
    """Its role's flags (`--runner pooling --convert embed`) make vLLM serve embeddings, and no
    chat parser (the gateway's /v1/embeddings route is the pooling work's)."""
    engine = _engine(stack, EMBED)
    argv = Path(f"/proc/{engine['pid']}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--runner") + 1] == "pooling" and "--tool-call-parser" not in argv
    answer = httpx.post(f"{engine['url']}/v1/embeddings",
                        json={"model": EMBED, "input": ["one", "two"]}, timeout=60)
    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0


def test_a_key_scoped_to_one_model_gets_403_for_the_other(gateway: Gateway):
    key = create_key(gateway.home, "--name", "smol-only", "--models", SMOLLM2)
    auth = {"authorization": f"Bearer {key}"}
    listed = httpx.get(f"{gateway.url}/v1/models", headers=auth, timeout=30).json()
    # Nor the alias of the other, nor SmolLM2's adapter: a model of its own.
    assert [card["id"] for card in listed["data"]] == [SMOLLM2]
    _answer(_chat(gateway.url, SMOLLM2, auth))
    for other in (TINY, ALIAS):  # an alias is its model: the same scope
        refused = _chat(gateway.url, other, auth)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "model_not_allowed"


def test_an_alias_answers_as_its_model(stack: Stack, gateway: Gateway, admin: dict[str, str]):
    direct = _answer(_chat(_engine(stack, TINY)["url"], TINY))
    response = _chat(gateway.url, ALIAS, admin)
    assert _answer(response) == direct
    assert response.json()["model"] == TINY
    request_id = response.headers["x-request-id"]
    row = usage_rows(_database(gateway), {request_id})[request_id]
    assert (row.model, row.requested_model) == (TINY, ALIAS)
    # Resolved before the answer cache keys it: asked by either name, one answer is kept.
    body = {**CHAT, "messages": [{"role": "user", "content": f"Name a colour, {uuid.uuid4()}."}]}
    served = [httpx.post(f"{gateway.url}/v1/chat/completions", json={**body, "model": model},
                         headers=admin, timeout=120) for model in (ALIAS, TINY)]
    assert [answer.headers["x-qwenstack-cache"] for answer in served] == ["miss", "hit"]
    assert _answer(served[0]) == _answer(served[1])


def _up_in_gateway(url: str, auth: dict[str, str], engine: str) -> bool:
    """Whether the gateway at `url` has `engine` in rotation (/ready's detail, for admins)."""
    engines = httpx.get(f"{url}/ready", headers=auth, timeout=30).json()
    return next(e["up"] for e in engines["engines"] if e["url"] == engine)


@pytest.mark.engine_exclusive  # stops the SmolLM2 engine the other tests share
def test_a_fallback_serves_while_the_first_models_engine_is_stopped(
    stack: Stack, gateway: Gateway, admin: dict[str, str]
):
    """SmolLM2's engine is stopped (SIGSTOP: it neither exits nor restarts; its health checks
    time out until the gateway takes it out), so requests for it go to its fallback, the tiny
    Qwen3, until it runs again; a key that may not use the fallback gets the 503 it would get
    without one."""
    key = create_key(gateway.home, "--name", "smol-only-2", "--models", SMOLLM2)
    smol_only = {"authorization": f"Bearer {key}"}
    direct = _answer(_chat(_engine(stack, TINY)["url"], TINY))
    smol = _engine(stack, SMOLLM2)
    before = metric(gateway.url, admin, "qwenstack_model_fallbacks_total",
                    requested=SMOLLM2, served=TINY)
    os.killpg(smol["pid"], signal.SIGSTOP)  # its own process group (processes.py)
    try:
        wait_for(lambda: not _up_in_gateway(gateway.url, admin, smol["url"]),
                 "SmolLM2's engine taken out by the gateway", timeout_s=60, interval_s=1)
        refused = _chat(gateway.url, SMOLLM2, smol_only)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "engine_unavailable"
        response = _chat(gateway.url, SMOLLM2, admin)
        assert _answer(response) == direct
        assert response.json()["model"] == TINY
    finally:
        os.killpg(smol["pid"], signal.SIGCONT)
    request_id = response.headers["x-request-id"]
    row = usage_rows(_database(gateway), {request_id})[request_id]
    assert (row.model, row.requested_model, row.status) == (TINY, SMOLLM2, 200)
    assert metric(gateway.url, admin, "qwenstack_model_fallbacks_total",
                  requested=SMOLLM2, served=TINY) == before + 1
    # Running again, SmolLM2 serves its own requests once the gateways see it up (the shared
    # stack's too, before the other tests have the engines again).
    for url, auth in ((gateway.url, admin), (stack.gateway, stack.auth)):
        wait_for(lambda url=url, auth=auth: _up_in_gateway(url, auth, smol["url"]),
                 "SmolLM2 back", timeout_s=120, interval_s=1)
    assert _chat(gateway.url, SMOLLM2, smol_only).json()["model"] == SMOLLM2


def test_the_chat_uis_model_list_is_the_chat_models_of_the_users_key(
    gateway: Gateway, browser: object, tmp_path: Path
):
    """The settings panel offers the chat models and the adapter, not the embedder, the
    reranker nor the alias. Last in the module: the UI's block stops the module's gateway."""
    with running_chat_ui(gateway, tmp_path, {"ann": "ann-password-1"}, {}) as ui:
        ann = Chat(browser, ui, "ann")
        ann.wait_for_text("Welcome to the")
        ann.page.locator("#chat-settings-open-modal").click()
        ann.page.locator("#model").click()
        options = ann.page.locator("[role=option]")
        options.first.wait_for()
        assert sorted(options.all_inner_texts()) == sorted([TINY, SMOLLM2, ADAPTER])
        ann.close()
