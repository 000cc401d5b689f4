"""The gateway in front of a real vLLM engine serving the tiny Qwen3 model."""

from __future__ import annotations

import httpx
import openai
import pytest
from helpers import ADAPTER, EMBED, RERANK, SMOLLM2, Stack, request_log, wait_for

MODEL = "tiny-qwen3"
CHAT = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "Tell me about Paris."}],
    "temperature": 0,
    "max_tokens": 24,
}
COMPLETION = {
    "model": MODEL, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 24
}


def _without_ids(answer: dict) -> dict:
    return {k: v for k, v in answer.items() if k not in ("id", "created", "system_fingerprint")}


def _sse_events(response: httpx.Response) -> list[str]:
    return [
        line.removeprefix("data: ")
        for line in response.iter_lines() if line.startswith("data: ")
    ]


def _engine_metric(url: str, name: str) -> float:
    """Sum of one vLLM metric over its label sets, read from the engine's own /metrics."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines()
        if line.startswith((f"{name}{{", f"{name} "))
    )


def _streamed_text(events: list[str]) -> str:
    chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


def test_models_lists_served_names(stack: Stack):
    """Served names, in engine.models' order (the first chat model is the default); a LoRA
    adapter after its base model."""
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.key)
    assert [m.id for m in client.models.list().data] == [MODEL, SMOLLM2, ADAPTER, EMBED, RERANK]


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)]
)
def test_greedy_output_equals_direct_engine(stack: Stack, path: str, body: dict):
    via_gateway = httpx.post(stack.gateway + path, json=body, headers=stack.auth, timeout=60)
    direct = httpx.post(stack.engine + path, json=body, timeout=60)
    assert via_gateway.status_code == direct.status_code == 200
    assert _without_ids(via_gateway.json()) == _without_ids(direct.json())
    assert via_gateway.json()["usage"]["completion_tokens"] == 24


def test_openai_sdk_chat_through_gateway(stack: Stack):
    client = openai.OpenAI(base_url=f"{stack.gateway}/v1", api_key=stack.key)
    answer = client.chat.completions.create(**CHAT)
    direct = httpx.post(f"{stack.engine}/v1/chat/completions", json=CHAT, timeout=60).json()
    assert answer.choices[0].message.content == direct["choices"][0]["message"]["content"]


def test_stream_arrives_as_events_with_usage(stack: Stack):
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream(
        "POST", f"{stack.gateway}/v1/chat/completions", json=body, headers=stack.auth, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-request-id"]
        events = _sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [httpx.Response(200, content=e).json() for e in events[:-1]]
    # Several events; how many tokens each carries depends on how busy the engine is.
    assert len(chunks) > 1
    assert chunks[-1]["usage"]["completion_tokens"] == 24
    streamed = _streamed_text(events)
    whole = httpx.post(
        f"{stack.gateway}/v1/chat/completions", json=CHAT, headers=stack.auth, timeout=60
    ).json()
    assert streamed == whole["choices"][0]["message"]["content"]


def test_stream_without_usage_option_is_the_engines_stream_but_still_counted(stack: Stack):
    body = {**CHAT, "stream": True}
    with httpx.stream(
        "POST", f"{stack.gateway}/v1/chat/completions", json=body, headers=stack.auth, timeout=60
    ) as response:
        via_gateway = _sse_events(response)
        request_id = response.headers["x-request-id"]
    with httpx.stream(
        "POST", f"{stack.engine}/v1/chat/completions", json=body, timeout=60
    ) as response:
        direct = _sse_events(response)
    # The gateway asks the engine for usage to account tokens, and strips that chunk again. The
    # text is compared, not the events: a busy engine may put two tokens in one event.
    assert _streamed_text(via_gateway) == _streamed_text(direct)
    assert via_gateway[-1] == direct[-1] == "[DONE]"
    assert all('"choices":[]' not in event for event in via_gateway)
    assert request_log(stack.log, request_id)["completion_tokens"] == 24


@pytest.mark.engine_exclusive  # reads the engine's counters
def test_closing_a_stream_early_frees_the_engine(stack: Stack):
    """A client that closes its stream stops the engine's work: it stops short of max_tokens
    and ends with nothing running. The model is the bundled SmolLM2, which decodes about 20
    tokens a second on this CPU, so 900 take most of a minute; the tiny Qwen3 decoded all 900
    into socket buffers before a busy test process closed, three tries in a row, in a run of
    three test processes."""
    engine = stack.engine_of(SMOLLM2)
    body = {**COMPLETION, "model": SMOLLM2, "max_tokens": 900, "ignore_eos": True,
            "stream": True}
    generated_before = _engine_metric(engine, "vllm:generation_tokens_total")
    with httpx.stream(
        "POST", f"{stack.gateway}/v1/completions", json=body, headers=stack.auth, timeout=60
    ) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    wait_for(lambda: _engine_metric(engine, "vllm:num_requests_running") == 0,
             "no request running", 10)
    generated = _engine_metric(engine, "vllm:generation_tokens_total") - generated_before
    assert 0 < generated < 900, f"the engine generated {generated} tokens: the close didn't stop it"


def test_prompt_longer_than_context_is_400_naming_the_limit(stack: Stack):
    body = {**COMPLETION, "prompt": "hello " * 3000}
    response = httpx.post(
        f"{stack.gateway}/v1/completions", json=body, headers=stack.auth, timeout=60
    )
    assert response.status_code == 400
    assert "1024" in response.json()["error"]["message"]


def test_bad_requests_get_openai_errors(stack: Stack):
    url = f"{stack.gateway}/v1/chat/completions"
    not_json = httpx.post(
        url, content=b"{not json", headers={"content-type": "application/json", **stack.auth}
    )
    assert not_json.status_code == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.post(url, json={**CHAT, "model": "gpt-9"}, headers=stack.auth)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    wrong_type = httpx.post(url, json={**CHAT, "stream": "yes"}, headers=stack.auth)
    assert wrong_type.status_code == 400 and wrong_type.json()["error"]["param"] == "stream"
    # vLLM's other endpoints are not reachable through the gateway.
    for path in ("/tokenize", "/v1/load_lora_adapter", "/metrics/../tokenize"):
        hidden = httpx.post(f"{stack.gateway}{path}", json={"prompt": "x"}, headers=stack.auth)
        assert hidden.status_code == 404 and "error" in hidden.json()


def test_request_id_is_returned_and_logged(stack: Stack):
    mine = httpx.post(
        f"{stack.gateway}/v1/completions", json=COMPLETION,
        headers={"x-request-id": "trace-123", **stack.auth}, timeout=60,
    )
    assert mine.headers["x-request-id"] == "trace-123"
    fresh = httpx.get(f"{stack.gateway}/health")
    assert len(fresh.headers["x-request-id"]) == 32
    assert request_log(stack.log, "trace-123")["path"] == "/v1/completions"
