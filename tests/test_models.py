"""Several models behind one gateway, from one `engine.models` list: the tiny Qwen3 and the
bundled SmolLM2 as chat models, and the tiny Qwen3 again as an embedding model (vLLM's pooling
runner), each with an engine of its own. Each chat model answers through the gateway what its
engine answers; keys are scoped per model; an alias answers as its model; a fallback serves
while the first model's engine is stopped, and the usage row says which model served.

This module's stack is its own (three vLLM boots): the shared stack serves one model.
"""

from __future__ import annotations

import json
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from helpers import Stack, create_key, metric, start_gateway, start_stack, usage_rows, wait_for
from ui_browser import Chat, running_chat_ui

TINY, SMOL, EMBED = "tiny-qwen3", "smollm2", "tiny-embed"
ALIAS = "gpt-4o-mini"  # what an application might hard-code
CHAT = {"messages": [{"role": "user", "content": "Name a colour."}], "temperature": 0,
        "max_tokens": 8}
# Three boots on two shared cores, the bundled model prepared first if no earlier test did.
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory, tiny_qwen3: Path) -> Iterator[Stack]:
    models = [
        {"model": str(tiny_qwen3), "served_model_name": TINY},
        # No model: on a CPU, the bundled SmolLM2, as `up` serves it by default.
        {"served_model_name": SMOL},
        {"model": str(tiny_qwen3), "served_model_name": EMBED, "role": "embed"},
    ]
    stack = start_stack(
        tmp_path_factory.mktemp("models"), "--max-model-len", "1024", "--kv-cache-gib", "0.25",
        env={"QWENSTACK_ENGINE__MODELS": json.dumps(models),
             # The engines must answer, not the answer cache.
             "QWENSTACK_CACHE__ENABLED": "false",
             "QWENSTACK_GATEWAY__MODEL_ALIASES": json.dumps({ALIAS: TINY}),
             "QWENSTACK_GATEWAY__MODEL_FALLBACKS": json.dumps({SMOL: [TINY]})},
    )
    yield stack
    assert stack.stop() == 0, stack.log.read_text()[-5000:]


def _engine(stack: Stack, model: str) -> dict:
    [engine] = [e for e in stack.engine_state() if e["model"] == model]
    return engine


def _chat(url: str, model: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "model": model},
                      headers={"x-request-id": uuid.uuid4().hex, **(headers or {})}, timeout=120)


def _answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def _database(stack: Stack) -> str:
    return f"sqlite:///{stack.home / 'qwenstack.db'}"


def test_each_model_answers_through_the_gateway_what_its_engine_answers(two_models: Stack):
    state = two_models.engine_state()
    assert [(e["model"], e["state"]) for e in state] == [
        (TINY, "ready"), (SMOL, "ready"), (EMBED, "ready")]
    assert len({e["url"] for e in state}) == 3  # ports assigned without collision
    answers = {}
    for engine in state[:2]:
        direct = _answer(_chat(engine["url"], engine["model"]))
        through = _answer(_chat(two_models.gateway, engine["model"], two_models.auth))
        assert through == direct
        answers[engine["model"]] = through
    assert answers[TINY] != answers[SMOL]  # two models, not one engine twice

    client = openai.OpenAI(base_url=f"{two_models.gateway}/v1", api_key=two_models.key)
    cards = {card.id: card.model_dump() for card in client.models.list().data}
    assert set(cards) == {TINY, SMOL, EMBED, ALIAS}
    assert cards[TINY]["role"] == cards[SMOL]["role"] == "chat"
    assert cards[EMBED]["role"] == "embed"
    assert cards[EMBED]["capabilities"] == {"tool_calling": False, "reasoning": False}
    # Each its own parsers: hermes for the Qwen3, none for SmolLM2's family.
    assert cards[TINY]["capabilities"]["tool_calling"] is True
    assert cards[SMOL]["capabilities"]["tool_calling"] is False
    assert cards[ALIAS]["alias_of"] == TINY


def test_an_embedding_role_engine_embeds(two_models: Stack):
    """Its role's flags (`--runner pooling --convert embed`) make vLLM serve embeddings, and no
    chat parser (the gateway's /v1/embeddings route is the pooling work's)."""
    engine = _engine(two_models, EMBED)
    argv = Path(f"/proc/{engine['pid']}/cmdline").read_bytes().decode().split("\0")
    assert argv[argv.index("--runner") + 1] == "pooling" and "--tool-call-parser" not in argv
    answer = httpx.post(f"{engine['url']}/v1/embeddings",
                        json={"model": EMBED, "input": ["one", "two"]}, timeout=60)
    assert answer.status_code == 200, answer.text
    vectors = [item["embedding"] for item in answer.json()["data"]]
    assert len(vectors) == 2 and len(vectors[0]) == len(vectors[1]) > 0


def test_a_key_scoped_to_one_model_gets_403_for_the_other(two_models: Stack):
    key = create_key(two_models.home, "--name", "smol-only", "--models", SMOL)
    auth = {"authorization": f"Bearer {key}"}
    listed = httpx.get(f"{two_models.gateway}/v1/models", headers=auth, timeout=30).json()
    assert [card["id"] for card in listed["data"]] == [SMOL]  # nor the alias of the other
    _answer(_chat(two_models.gateway, SMOL, auth))
    for other in (TINY, ALIAS):  # an alias is its model: the same scope
        refused = _chat(two_models.gateway, other, auth)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "model_not_allowed"


def test_the_chat_uis_model_list_is_the_chat_models_of_the_users_key(
    two_models: Stack, browser: object, tmp_path: Path
):
    """A gateway in front of the three engines started elsewhere, told what they serve by
    engine.models (as Compose and Helm tell theirs), and an alias: the settings panel offers
    the two chat models, not the embedder nor the alias."""
    engines = {e["model"]: e["url"] for e in two_models.engine_state()}
    described = [{"served_model_name": TINY, "tool_call_parser": "hermes"},
                 {"served_model_name": SMOL, "tool_call_parser": "none"},
                 {"served_model_name": EMBED, "role": "embed"}]
    gateway = start_gateway(
        tmp_path, engines[TINY], "--engine-url", engines[SMOL], "--engine-url", engines[EMBED],
        auth=True,
        env={"QWENSTACK_ENGINE__MODELS": json.dumps(described),
             "QWENSTACK_GATEWAY__MODEL_ALIASES": json.dumps({ALIAS: TINY})})
    with running_chat_ui(gateway, tmp_path, {"ann": "ann-password-1"}, {}) as ui:
        ann = Chat(browser, ui, "ann")
        ann.wait_for_text("Welcome to the")
        ann.page.locator("#chat-settings-open-modal").click()
        ann.page.locator("#model").click()
        options = ann.page.locator("[role=option]")
        options.first.wait_for()
        assert sorted(options.all_inner_texts()) == sorted([TINY, SMOL])
        ann.close()


def test_an_alias_answers_as_its_model(two_models: Stack):
    direct = _answer(_chat(_engine(two_models, TINY)["url"], TINY))
    response = _chat(two_models.gateway, ALIAS, two_models.auth)
    assert _answer(response) == direct
    assert response.json()["model"] == TINY
    request_id = response.headers["x-request-id"]
    row = usage_rows(_database(two_models), {request_id})[request_id]
    assert (row.model, row.requested_model) == (TINY, ALIAS)


def _up_in_gateway(stack: Stack, url: str) -> bool:
    """Whether the gateway has the engine at `url` in rotation (/ready's detail, for admins)."""
    engines = httpx.get(f"{stack.gateway}/ready", headers=stack.auth, timeout=30).json()
    return next(engine["up"] for engine in engines["engines"] if engine["url"] == url)


def test_a_fallback_serves_while_the_first_models_engine_is_stopped(two_models: Stack):
    """SmolLM2's engine is stopped (SIGSTOP: it neither exits nor restarts; its health checks
    time out until the gateway takes it out), so requests for it go to its fallback, the tiny
    Qwen3, until it runs again; a key that may not use the fallback gets the 503 it would get
    without one."""
    key = create_key(two_models.home, "--name", "smol-only-2", "--models", SMOL)
    smol_only = {"authorization": f"Bearer {key}"}
    direct = _answer(_chat(_engine(two_models, TINY)["url"], TINY))
    smol = _engine(two_models, SMOL)
    before = metric(two_models.gateway, two_models.auth, "qwenstack_model_fallbacks_total",
                    requested=SMOL, served=TINY)
    os.killpg(smol["pid"], signal.SIGSTOP)  # its own process group (processes.py)
    try:
        wait_for(lambda: not _up_in_gateway(two_models, smol["url"]),
                 "SmolLM2's engine taken out by the gateway", timeout_s=60, interval_s=1)
        refused = _chat(two_models.gateway, SMOL, smol_only)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "engine_unavailable"
        response = _chat(two_models.gateway, SMOL, two_models.auth)
        assert _answer(response) == direct
        assert response.json()["model"] == TINY
    finally:
        os.killpg(smol["pid"], signal.SIGCONT)
    request_id = response.headers["x-request-id"]
    row = usage_rows(_database(two_models), {request_id})[request_id]
    assert (row.model, row.requested_model, row.status) == (TINY, SMOL, 200)
    assert metric(two_models.gateway, two_models.auth, "qwenstack_model_fallbacks_total",
                  requested=SMOL, served=TINY) == before + 1
    # Running again, SmolLM2 serves its own requests once the gateway sees it up.
    wait_for(lambda: _up_in_gateway(two_models, smol["url"]), "SmolLM2 back", timeout_s=120,
             interval_s=1)
    assert _chat(two_models.gateway, SMOL, smol_only).json()["model"] == SMOL
