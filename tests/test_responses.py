"""The Responses API through the gateway (issue 13, point 5): a round trip with the OpenAI SDK,
accounted as chat is (usage row, metrics, limits), and what vLLM's implementation would do for
a tenant that the gateway refuses: stored responses, built-in tools, internal fields, media."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from helpers import Gateway, create_key, metric, start_gateway, usage_rows

from qwenstack.gateway.protocol import InferenceRequest

MODEL = "tiny-qwen3"  # max_model_len 1024
TOKENS = 8
URL = "/v1/responses"
# With ignore_eos the answer is exactly max_output_tokens long.
BODY = {"model": MODEL, "input": "Hi", "max_output_tokens": TOKENS, "ignore_eos": True}
MAX_BODY_BYTES = 65536
MAX_ITEMS = 8
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"]}}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("responses"), engine_url, auth=True, env={
        "QWENSTACK_VALIDATION__MAX_BODY_BYTES": str(MAX_BODY_BYTES),
        "QWENSTACK_VALIDATION__MAX_MESSAGES": str(MAX_ITEMS),
    })
    yield gateway
    assert gateway.stop() == 0


@pytest.fixture(scope="module")
def tenant(gateway: Gateway) -> str:
    """An ordinary key, for the requests that are refused before anything counts them."""
    return new_key(gateway)[1]


def new_key(gateway: Gateway, *options: str) -> tuple[str, str]:
    """A key of the test's own (name, secret): its usage rows and metric series start empty."""
    name = f"responses-{time.monotonic_ns()}"
    return name, create_key(gateway.home, "--name", name, *options)


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def sdk(gateway: Gateway, secret: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=secret, max_retries=0)


def database(gateway: Gateway) -> str:
    return f"sqlite:///{gateway.home / 'qwenstack.db'}"


def engine_requests(engine_url: str) -> float:
    """Requests the engine has finished (vLLM's own counter), whatever their end."""
    return metric(engine_url, {}, "vllm:request_success_total")


def test_round_trip_with_the_sdk_is_accounted_as_chat(gateway: Gateway):
    name, secret = new_key(gateway)
    admin = bearer(new_key(gateway, "--admin")[1])
    client = sdk(gateway, secret)

    answer = client.responses.create(
        model=MODEL, input="Hi", max_output_tokens=TOKENS, extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": f"{name}-plain"},
    )
    assert answer.object == "response" and answer.output[0].type == "message"
    assert answer.usage is not None and answer.usage.output_tokens == TOKENS

    with client.responses.create(
        model=MODEL, input=[{"role": "user", "content": "Hi"}], instructions="Be brief.",
        max_output_tokens=TOKENS, stream=True, extra_body={"ignore_eos": True},
        extra_headers={"x-request-id": f"{name}-stream"},
    ) as stream:
        events = list(stream)
    # Relayed unchanged: every event of the engine, in order, the usage event included.
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    streamed = events[-1].response
    assert streamed.usage is not None and streamed.usage.output_tokens == TOKENS

    rows = usage_rows(database(gateway), {f"{name}-plain", f"{name}-stream"})
    for request_id, usage, stream in ((f"{name}-plain", answer.usage, False),
                                      (f"{name}-stream", streamed.usage, True)):
        row = rows[request_id]
        assert (row.route, row.caller, row.model, row.status) == (URL, name, MODEL, 200)
        assert (row.prompt_tokens, row.completion_tokens) == (usage.input_tokens, TOKENS)
        assert (row.ttft_ms is not None) == stream
    assert metric(gateway.url, admin, "qwenstack_requests_total", route=URL, key=name,
                  status="200") == 2
    assert metric(gateway.url, admin, "qwenstack_completion_tokens_total", key=name) == 2 * TOKENS
    assert metric(gateway.url, admin, "qwenstack_prompt_tokens_total", key=name) == \
        answer.usage.input_tokens + streamed.usage.input_tokens


def test_function_tools_and_their_results_pass(gateway: Gateway):
    """A whole tool loop's items go through: the call the model made, the client's result."""
    _, secret = new_key(gateway)
    answer = sdk(gateway, secret).responses.create(
        model=MODEL, tools=[TOOL], tool_choice="auto", max_output_tokens=TOKENS,
        input=[
            {"role": "user", "content": [{"type": "input_text", "text": "Weather in Paris?"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": json.dumps({"city": "Paris"})},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny, 21 C"},
        ],
    )
    assert answer.status in ("completed", "incomplete") and answer.usage is not None


def test_function_calls_are_counted_as_the_answer_lists_them(gateway: Gateway):
    """A usage row's and the metric's tool calls are the answer's `function_call` items, whole
    or streamed: not the tool definitions a response echoes back (one per event of a stream
    that carries the whole response). A named function makes vLLM call it (`required` gave
    no output item at all with the tiny model)."""
    name, secret = new_key(gateway)
    admin = bearer(new_key(gateway, "--admin")[1])
    client = sdk(gateway, secret)
    ask = {"model": MODEL, "tools": [TOOL, {**TOOL, "name": "get_time"}],
           "tool_choice": {"type": "function", "name": "get_weather"},
           "input": "Weather in Paris?", "max_output_tokens": 64}
    answer = client.responses.create(**ask, extra_headers={"x-request-id": f"{name}-plain"})
    with client.responses.create(**ask, stream=True,
                                 extra_headers={"x-request-id": f"{name}-stream"}) as stream:
        streamed = [event for event in stream if event.type == "response.completed"][0].response

    calls = [sum(item.type == "function_call" for item in response.output)
             for response in (answer, streamed)]
    assert calls == [1, 1]
    rows = usage_rows(database(gateway), {f"{name}-plain", f"{name}-stream"})
    assert [rows[f"{name}-{kind}"].tool_calls for kind in ("plain", "stream")] == calls
    assert metric(gateway.url, admin, "qwenstack_tool_calls_total", key=name) == sum(calls)


def test_another_key_cannot_read_a_response(gateway: Gateway, engine_url: str):
    """Nothing is stored, so there is nothing to read, cancel or continue from: not through the
    gateway (no such routes) and not even at the engine itself."""
    _, owner = new_key(gateway)
    _, attacker = new_key(gateway)
    response_id = sdk(gateway, owner).responses.create(
        model=MODEL, input="Hi", max_output_tokens=TOKENS).id
    with httpx.Client(base_url=gateway.url, headers=bearer(attacker), timeout=60) as client:
        for method, path in (("GET", ""), ("DELETE", ""), ("POST", "/cancel"),
                             ("GET", "/input_items")):
            answer = client.request(method, f"{URL}/{response_id}{path}")
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["code"] == "not_found"
        answer = client.post(URL, json={**BODY, "previous_response_id": response_id})
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == "previous_response_id"
    assert httpx.get(f"{engine_url}{URL}/{response_id}", timeout=30).status_code == 404


@pytest.mark.engine_exclusive  # reads the engine's request counter
def test_limits_refuse_before_the_engine_sees_the_request(gateway: Gateway, engine_url: str):
    name, small = new_key(gateway, "--tpm", "100")
    _, one_a_minute = new_key(gateway, "--rpm", "1")
    before = engine_requests(engine_url)
    with httpx.Client(base_url=gateway.url, timeout=60) as client:
        too_large = client.post(URL, json={**BODY, "max_output_tokens": 200},
                                headers={**bearer(small), "x-request-id": f"{name}-large"})
        assert too_large.status_code == 429, too_large.text
        assert "Request too large" in too_large.json()["error"]["message"]
        first = client.post(URL, json=BODY, headers=bearer(one_a_minute))
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-remaining-requests"] == "0"
        second = client.post(URL, json=BODY, headers=bearer(one_a_minute))
        assert second.status_code == 429 and "retry-after" in second.headers
    assert engine_requests(engine_url) == before + 1  # the one answered
    row = usage_rows(database(gateway), {f"{name}-large"})[f"{name}-large"]
    assert (row.route, row.status, row.error_code) == (URL, 429, "rate_limit_exceeded")


def parts(*content: dict) -> list[dict]:
    return [{"role": "user", "content": [{"type": "input_text", "text": "What is this?"},
                                         *content]}]


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


REFUSED = [
    # State the engine would keep, readable by anyone who knows its id.
    ("store", {"store": True}, "store"),
    ("background", {"background": True}, "background"),
    ("previous_response_id", {"previous_response_id": "resp_0123"}, "previous_response_id"),
    # Built-in tools: the engine would reach out or run code.
    *((f"built-in tool {kind}", {"tools": [tool]}, "tools") for kind, tool in (
        ("web_search", {"type": "web_search"}),
        ("web_search_preview", {"type": "web_search_preview"}),
        ("code_interpreter", {"type": "code_interpreter", "container": {"type": "auto"}}),
        ("mcp", {"type": "mcp", "server_label": "x", "server_url": "http://169.254.169.254/"}),
        ("file_search", {"type": "file_search", "vector_store_ids": ["vs_1"]}),
        ("computer", {"type": "computer_use_preview", "display_width": 1, "display_height": 1,
                      "environment": "linux"}),
        ("custom", {"type": "custom", "name": "x"}),
        ("namespace", {"type": "namespace", "name": "n", "tools": [TOOL]}),
    )),
    ("a built-in tool_choice", {"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}},
     "tool_choice"),
    # vLLM's internal fields, and ones the gateway sets itself.
    *((field, {field: value}, field) for field, value in (
        ("request_id", "resp_another-tenants"), ("session_id", "s"), ("priority", -100),
        ("cache_salt", "another-tenant"), ("kv_transfer_params", {"do_remote_prefill": True}),
        ("ec_transfer_params", {}), ("vllm_xargs", {"a": 1}), ("mm_processor_kwargs", {"a": 1}),
        ("media_io_kwargs", {"image": {}}), ("previous_input_messages", [{"role": "user"}]),
        ("enable_response_messages", True), ("prompt", {"id": "pmpt_1"}),
        ("conversation", "conv_1"), ("chat_template", "{{ 7 * 7 }}"), ("temprature", 0),
    )),
    ("chat_template_kwargs", {"chat_template_kwargs": {"template_vars": 1}},
     "chat_template_kwargs"),
    # Input items vLLM cannot render for a chat model, or that point at stored state.
    *((f"input item {kind}", {"input": [{"type": kind, "id": "x"}]}, "input")
      for kind in ("item_reference", "web_search_call", "file_search_call",
                   "computer_call_output", "mcp_call", "image_generation_call")),
    ("a message without a role", {"input": [{"type": "message", "content": "Hi"}]}, "input"),
    # vLLM answers these with a 500 (its IndexError, AttributeError), which would also count
    # against the engine's circuit breaker.
    ("an assistant message without parts", {"input": [
        {"type": "message", "role": "assistant", "content": []}]}, "input"),
    ("an assistant message opening with a refusal", {"input": [
        {"type": "message", "role": "assistant", "content": [
            {"type": "refusal", "refusal": "No."}]}]}, "input"),
    ("an empty input", {"input": []}, "input"),
    ("input neither text nor items", {"input": {"role": "user"}}, "input"),
    ("too many input items", {"input": [{"role": "user", "content": "Hi"}] * (MAX_ITEMS + 1)},
     "input"),
    # Media: only data: URLs and allowed domains (none here), as on chat; no files.
    ("an image the engine would fetch", {"input": parts(
        {"type": "input_image", "image_url": "http://169.254.169.254/latest/meta-data/"})},
     "input"),
    ("an uploaded file's id", {"input": parts({"type": "input_image", "file_id": "file-1"})},
     "input"),
    ("a file", {"input": parts({"type": "input_file", "file_url": "https://example.com/a.pdf"})},
     "input"),
    ("image embeddings", {"input": parts({"type": "image_embeds", "image_embeds": "AAAA"})},
     "input"),
    ("image embeddings behind a text part's uuid", {"input": parts(
        {"type": "input_text", "text": "x", "uuid": "u", "image_embeds": "AAAA"})}, "input"),
    ("media in a function call's output", {"input": [
        {"type": "function_call_output", "call_id": "c", "output": [
            {"type": "input_image", "image_url": "https://attacker.example/a.png"}]}]}, "input"),
    # Types and bounds, as on chat.
    ("max_output_tokens beyond the context window", {"max_output_tokens": 1024},
     "max_output_tokens"),
    ("max_output_tokens zero", {"max_output_tokens": 0}, "max_output_tokens"),
    ("instructions not text", {"instructions": ["Be brief."]}, "instructions"),
    # Output formats are bounded as chat's response_format is (schemas.py).
    ("an output schema nested 40 deep", {"text": {"format": {
        "type": "json_schema", "name": "deep", "schema": _nested(40)}}}, "text"),
]


@pytest.mark.parametrize(("change", "param"), [case[1:] for case in REFUSED],
                         ids=[case[0] for case in REFUSED])
def test_refused_at_the_gateway(gateway: Gateway, tenant: str, change: dict, param: str):
    answer = httpx.post(f"{gateway.url}{URL}", json={**BODY, **change}, headers=bearer(tenant),
                        timeout=60)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


def test_a_thousand_times_the_input_items_is_refused_as_it_arrives(gateway: Gateway,
                                                                   tenant: str):
    items = [{"role": "user", "content": "Hi"}] * (MAX_ITEMS * 1000)
    answer = httpx.post(f"{gateway.url}{URL}", json={**BODY, "input": items},
                        headers=bearer(tenant), timeout=60)
    assert answer.status_code == 413, answer.text
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


def test_input_over_the_body_limit_is_refused_as_it_arrives(gateway: Gateway, tenant: str):
    answer = httpx.post(f"{gateway.url}{URL}", json={**BODY, "input": "x" * MAX_BODY_BYTES},
                        headers=bearer(tenant), timeout=60)
    assert answer.status_code == 413 and answer.json()["error"]["code"] == "request_too_large"


def test_a_conversation_routes_alike_through_chat_and_responses():
    """Prefix-aware routing reads the same conversation start either way, so a conversation that
    goes on through /v1/responses lands where its earlier turns left their KV cache."""
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": "Bye"}]
    chat = InferenceRequest.parse("/v1/chat/completions", json.dumps({
        "model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, *turns]},
    ).encode())
    responses = InferenceRequest.parse(URL, json.dumps(
        {"model": MODEL, "instructions": "Be brief.", "input": turns}).encode())
    assert responses.conversation_start(256, 16_384) == chat.conversation_start(256, 16_384)
    assert InferenceRequest.parse(URL, json.dumps({"input": "Hi"}).encode()).conversation_start(
        256, 16_384) == InferenceRequest.parse("/v1/chat/completions", json.dumps(
            {"messages": turns[:1]}).encode()).conversation_start(256, 16_384)
