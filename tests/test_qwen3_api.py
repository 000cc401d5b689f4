"""Qwen3 as applications use it, through the gateway: tools, thinking, structured outputs.

The tiny random-weight Qwen3 says nothing sensible, but where vLLM guides decoding (tool_choice
required or named, a JSON response_format) what it says must parse and fit the schema: these
tests check that, through a gateway and against the engine called directly, greedy. The stack's
guided-decoding settings are in conftest.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import pytest
import sqlalchemy as sa
from helpers import Gateway, Stack, create_key, request_log, start_gateway, wait_for
from prometheus_client.parser import text_string_to_metric_families

from qwenstack.callers import Caller
from qwenstack.gateway import protocol, validation
from qwenstack.settings.gateway import ValidationSettings

MODEL = "tiny-qwen3"
README = Path(__file__).resolve().parent.parent / "README.md"
CHAT_URL = "/v1/chat/completions"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather forecast for a city.",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 24},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    }, "required": ["city", "unit", "days"], "additionalProperties": False},
}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "description": "The time now in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string",
                                                            "enum": ["UTC", "CET"]}},
                   "required": ["zone"], "additionalProperties": False},
}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK = [{"role": "user", "content": "Will it rain in Paris this week?"}]
# Required calls are one at a time: random weights would otherwise add calls until max_tokens.
TOOL_CHOICES = {
    "required": {"tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
}
CITY = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 30},
    "capital": {"type": "boolean"},
    "continent": {"type": "string", "enum": ["Africa", "Asia", "Europe", "America", "Oceania"]},
}, "required": ["city", "capital", "continent"], "additionalProperties": False}


def chat(**fields: object) -> dict:
    return {"model": MODEL, "messages": ASK, "max_tokens": 120, "temperature": 0, **fields}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    """A gateway with keys (SQLite in its home), told the engine's tool-call parser."""
    gateway = start_gateway(tmp_path_factory.mktemp("qwen3-api"), engine_url, auth=True, env={
        "QWENSTACK_ENGINE__TOOL_CALL_PARSER": "hermes", "QWENSTACK_CACHE__ENABLED": "false",
    })
    yield gateway
    gateway.stop()


@pytest.fixture(scope="module")
def key(gateway: Gateway) -> str:
    return create_key(gateway.home, "--name", f"qwen3-api-{time.monotonic_ns()}", "--admin")


def post(base_url: str, body: dict, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(base_url + CHAT_URL, json=body, headers=headers, timeout=120)


def streamed(base_url: str, body: dict, key: str | None = None) -> list[dict]:
    """A stream's chunks (the events before `data: [DONE]`), checked to end with it."""
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", base_url + CHAT_URL, json={**body, "stream": True},
                      headers=headers, timeout=120) as response:
        assert response.status_code == 200, response.read()
        events = [line.removeprefix("data: ") for line in response.iter_lines()
                  if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    return [json.loads(event) for event in events[:-1]]


def whole_calls(answer: httpx.Response) -> list[tuple[str, str]]:
    assert answer.status_code == 200, answer.text
    calls = answer.json()["choices"][0]["message"].get("tool_calls") or []
    return [(call["function"]["name"], call["function"]["arguments"]) for call in calls]


def streamed_calls(chunks: list[dict]) -> list[tuple[str, str]]:
    """Tool calls put together from their deltas, as a client does."""
    calls: dict[int, list[str]] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls") or []:
                call = calls.setdefault(delta["index"], ["", ""])
                call[0] += delta["function"].get("name") or ""
                call[1] += delta["function"].get("arguments") or ""
    return [(name, arguments) for name, arguments in (calls[i] for i in sorted(calls))]


def tool_deltas(chunks: list[dict]) -> list[dict]:
    return [delta for chunk in chunks for choice in chunk["choices"]
            for delta in choice["delta"].get("tool_calls") or []]


def content(chunks: list[dict]) -> str:
    return "".join(choice["delta"].get("content") or "" for chunk in chunks
                   for choice in chunk["choices"])


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", sorted(TOOL_CHOICES))
def test_tool_calls_fit_their_schema_and_match_the_engine(
    gateway: Gateway, key: str, engine_url: str, choice: str, stream: bool
):
    body = chat(tools=TOOLS, **TOOL_CHOICES[choice])
    if stream:
        chunks = streamed(gateway.url, body, key)
        calls = streamed_calls(chunks)
        # How the engine splits the arguments into deltas varies with timing; what they add up
        # to does not.
        assert calls == streamed_calls(streamed(engine_url, body))
        first = tool_deltas(chunks)[0]  # as OpenAI's clients expect it
        assert first["id"] and first["type"] == "function" and first["function"]["name"]
    else:
        calls = whole_calls(post(gateway.url, body, key))
        assert calls == whole_calls(post(engine_url, body))
    assert len(calls) == 1
    name, arguments = calls[0]
    if choice == "named":
        assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


def test_tools_without_tool_choice_are_answered(gateway: Gateway, key: str):
    """`tools` alone means tool_choice auto: vLLM refused that (400) before its engines ran a
    tool-call parser; and the model may answer with text, as this one does."""
    answer = post(gateway.url, chat(tools=TOOLS, max_tokens=8), key)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["role"] == "assistant"
    assert post(gateway.url, chat(tools=TOOLS, tool_choice="none", max_tokens=8),
                key).status_code == 200


def test_a_tool_result_goes_back_to_the_model(gateway: Gateway, key: str):
    [(name, arguments)] = whole_calls(post(gateway.url, chat(
        tools=TOOLS, **TOOL_CHOICES["named"]), key))
    messages = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call-1", "type": "function", "function": {"name": name, "arguments": arguments}}
    ]}, {"role": "tool", "tool_call_id": "call-1", "content": '{"rain": false}'}]
    answer = post(gateway.url, chat(messages=messages, tools=TOOLS, max_tokens=8), key)
    assert answer.status_code == 200, answer.text
    # The template wrote the call and its result into the prompt: it is longer than the question.
    asked = post(gateway.url, chat(tools=TOOLS, max_tokens=8), key).json()["usage"]
    assert answer.json()["usage"]["prompt_tokens"] > asked["prompt_tokens"] + 10


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_answers_validate(gateway: Gateway, key: str, engine_url: str, stream: bool):
    body = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "city", "strict": True, "schema": CITY}})
    if stream:
        text = content(streamed(gateway.url, body, key))
        assert text == content(streamed(engine_url, body))
    else:
        answer = post(gateway.url, body, key)
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["message"]["content"]
        assert text == post(engine_url, body).json()["choices"][0]["message"]["content"]
    jsonschema.validate(json.loads(text), CITY)
    anything = post(gateway.url, chat(response_format={"type": "json_object"}), key)
    assert isinstance(json.loads(anything.json()["choices"][0]["message"]["content"]), dict)


def _assert_refused(answer: httpx.Response, code: str | int | None = None) -> dict:
    """A 400 in OpenAI's error shape (the engine's own errors give `code` as the status)."""
    assert answer.status_code == 400, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()["error"]
    assert {"message", "type", "param", "code"} <= set(error) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_vllms_structured_output_extras_hold_the_answer(gateway: Gateway, key: str,
                                                        engine_url: str):
    """vLLM's own `structured_outputs` (the allowlist admits them; a structural tag it does
    not): a choice and a regular expression, each answer the engine's own and inside them."""
    choices = ["yes", "no", "maybe"]
    for constraint, holds in (({"choice": choices}, choices.__contains__),
                              ({"regex": "[0-9]{3}-[a-z]{2}"},
                               re.compile("[0-9]{3}-[a-z]{2}").fullmatch)):
        body = chat(structured_outputs=constraint, max_tokens=16)
        answer = post(gateway.url, body, key)
        assert answer.status_code == 200, answer.text
        text = answer.json()["choices"][0]["message"]["content"]
        assert holds(text), (constraint, text)
        assert text == post(engine_url, body).json()["choices"][0]["message"]["content"]


BAD_SCHEMAS = {
    "unknown type": {"type": "nonsense"},  # vLLM cannot compile it: its 400
    "dangling $ref": {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
    # Compiles, but admits no token at all: vLLM fails the request with a 500 (it blames
    # itself), which must neither reach the client nor count against the engine.
    "only itself": {"$ref": "#"},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("schema", sorted(BAD_SCHEMAS))
def test_a_schema_the_engine_cannot_use_is_a_400(gateway: Gateway, key: str, schema: str,
                                                 stream: bool):
    body = chat(stream=stream, response_format={"type": "json_schema", "json_schema": {
        "name": "bad", "schema": BAD_SCHEMAS[schema]}})
    error = _assert_refused(post(gateway.url, body, key))
    assert "schema" in error["message"]
    if schema != "only itself":  # in a tool's parameters, "#" is where vLLM puts them: fine
        tool = {"type": "function", "function": {"name": "bad",
                                                 "parameters": BAD_SCHEMAS[schema]}}
        _assert_refused(post(gateway.url, chat(stream=stream, tools=[tool],
                                               tool_choice="required"), key))


def test_refused_schemas_leave_the_engine_in_rotation(gateway: Gateway, key: str):
    body = chat(response_format={"type": "json_schema", "json_schema": {
        "name": "itself", "schema": BAD_SCHEMAS["only itself"]}})
    for _ in range(6):  # more than admission.circuit_failures
        _assert_refused(post(gateway.url, body, key), "invalid_output_constraints")
    ready = httpx.get(f"{gateway.url}/ready", headers={"authorization": f"Bearer {key}"},
                      timeout=30).json()
    assert [engine["circuit_open"] for engine in ready["engines"]] == [False]
    assert post(gateway.url, chat(max_tokens=2), key).status_code == 200


def test_thinking_switch_accepted_other_template_arguments_refused(gateway: Gateway, key: str):
    for enable in (False, True):
        answer = post(gateway.url, chat(chat_template_kwargs={"enable_thinking": enable},
                                        max_tokens=4), key)
        assert answer.status_code == 200, answer.text
    error = _assert_refused(post(gateway.url, chat(
        chat_template_kwargs={"enable_thinking": False, "tools_in_user_message": True}), key),
        "invalid_request")
    assert error["param"] == "chat_template_kwargs" and "enable_thinking" in error["message"]
    _assert_refused(post(gateway.url, chat(chat_template_kwargs={"enable_thinking": "no"}), key),
                    "invalid_type")
    _assert_refused(post(gateway.url, chat(chat_template="{{ messages }}"), key),
                    "invalid_request")


def test_reasoning_switch_passes(gateway: Gateway, key: str):
    """vLLM's include_reasoning (false drops `reasoning` from answers) is a field clients may
    set; `reasoning` itself comes back as the engine writes it, streamed or not."""
    answer = post(gateway.url, chat(include_reasoning=False, max_tokens=4), key)
    assert answer.status_code == 200, answer.text
    _assert_refused(post(gateway.url, chat(include_reasoning="no"), key), "invalid_type")


HOSTILE = {
    "1000 tools": ({"tools": [{**CLOCK, "function": {**CLOCK["function"], "name": f"t{i}"}}
                              for i in range(1000)]}, "array_above_max_length", "tools"),
    "a schema 200 levels deep": ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "deep", "schema": json.loads('{"items":' * 200 + "{}" + "}" * 200)}}},
        "schema_too_deep", "response_format"),
    "an enum of 20,000 values": ({"tools": [{"type": "function", "function": {
        "name": "pick", "parameters": {"type": "object", "properties": {"n": {
            "enum": list(range(20_000))}}}}}], "tool_choice": "required"},
        "enum_above_max_length", "tools"),
    "a megabyte of schema": ({"tools": [{"type": "function", "function": {
        "name": "big", "description": "x" * 1_000_000}}]}, "schema_too_large", "tools"),
    "vLLM's structural tags": ({"response_format": {"type": "structural_tag", "format": {}}},
                               "invalid_value", "response_format"),
    "template arguments with 50,000 keys": (
        {"chat_template_kwargs": {f"k{i}": 1 for i in range(50_000)}}, "invalid_request",
        "chat_template_kwargs"),
    "structured_outputs with a structural tag": (
        {"structured_outputs": {"structural_tag": "{}"}}, "unsupported_parameter",
        "structured_outputs"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tools_and_schemas_are_refused_before_the_engine(
    gateway: Gateway, key: str, case: str
):
    fields, code, param = HOSTILE[case]
    answer = post(gateway.url, chat(**fields), key)
    error = _assert_refused(answer, code)
    assert error["param"] == param
    # Refused by the gateway's checks, before anything counted its tokens or reached an engine.
    line = request_log(gateway.log, answer.headers["x-request-id"])
    assert line["prompt_tokens"] == 0 and "replica" not in line
    assert httpx.get(f"{gateway.url}/health", timeout=5).status_code == 200


def test_tools_count_in_the_token_reservation(gateway: Gateway):
    """The reservation is the prompt as the engine's chat template writes it, tools included."""
    secret = create_key(gateway.home, "--name", f"qwen3-tpm-{time.monotonic_ns()}",
                        "--tpm", "400")
    big_tool = {"type": "function", "function": {
        "name": "lookup", "description": "Looks up a word. " * 150, "parameters": CITY}}
    assert post(gateway.url, chat(max_tokens=8), secret).status_code == 200
    refused = post(gateway.url, chat(tools=[big_tool], max_tokens=8), secret)
    assert refused.status_code == 429, refused.text
    assert "Request too large" in refused.json()["error"]["message"]


def _metric(gateway: Gateway, secret: str, name: str, **labels: str) -> float:
    page = httpx.get(f"{gateway.url}/metrics", headers={"authorization": f"Bearer {secret}"},
                     timeout=30).text
    return sum(sample.value for family in text_string_to_metric_families(page)
               for sample in family.samples
               if sample.name == name and labels.items() <= sample.labels.items())


def test_tool_calls_are_counted_in_usage_rows_and_metrics(gateway: Gateway):
    name = f"qwen3-calls-{time.monotonic_ns()}"
    secret = create_key(gateway.home, "--name", name, "--admin")
    body = chat(tools=TOOLS, **TOOL_CHOICES["named"])
    answers = [post(gateway.url, body, secret), post(gateway.url, chat(max_tokens=4), secret)]
    chunks = streamed(gateway.url, body, secret)
    assert len(streamed_calls(chunks)) == 1 and len(whole_calls(answers[0])) == 1
    assert _metric(gateway, secret, "qwenstack_tool_calls_total", key=name) == 2
    database = sa.create_engine(f"sqlite:///{gateway.home / 'qwenstack.db'}")
    query = sa.text("SELECT tool_calls FROM usage_records WHERE caller = :name ORDER BY id")

    def rows() -> list[int]:
        with database.connect() as connection:
            return [row[0] for row in connection.execute(query, {"name": name})]

    try:
        wait_for(lambda: len(rows()) == 3, "three usage rows written", timeout_s=10)
        assert rows() == [1, 0, 1]
    finally:
        database.dispose()


def test_thinking_off_for_the_whole_server(tmp_path: Path, engine_url: str):
    """validation.allow_thinking false: every chat request goes with enable_thinking false.
    The tiny model's template reads no such switch, so the answer cache tells: a request
    asking to think gets the answer stored for one that did not."""
    gateway = start_gateway(tmp_path, engine_url, env={
        "QWENSTACK_VALIDATION__ALLOW_THINKING": "false"})
    try:
        results = [post(gateway.url, chat(chat_template_kwargs={"enable_thinking": enable},
                                          max_tokens=4)).headers["x-qwenstack-cache"]
                   for enable in (False, True)]
        unasked = post(gateway.url, chat(max_tokens=4)).headers["x-qwenstack-cache"]
    finally:
        gateway.stop()
    assert results == ["miss", "hit"] and unasked == "hit"


@pytest.mark.parametrize("route, body", [
    (protocol.CHAT, {"messages": [{"role": "user", "content": "Hi"}]}),
    (protocol.RESPONSES, {"input": "Hi"}),
])
@pytest.mark.parametrize("caller_thinks, server_allows", [(False, True), (True, False)])
def test_thinking_is_held_off_on_both_routes_that_render_the_chat_template(
    route: protocol.Route, body: dict, caller_thinks: bool, server_allows: bool
):
    """A --no-thinking key, or a server without thinking, cannot think through /v1/responses
    either: it renders the same chat template. (What the engine is sent; the tiny model's
    template reads no switch, so its answer cannot tell, as the cache does for chat above.)"""
    request = protocol.InferenceRequest(route, {
        "model": MODEL, **body, "chat_template_kwargs": {"enable_thinking": True}})
    validation.hold_thinking(request, Caller("no-thinker", thinking=caller_thinks),
                             ValidationSettings(allow_thinking=server_allows))
    assert request.get("chat_template_kwargs") == {"enable_thinking": False}


def test_models_report_what_the_engines_parsers_allow(gateway: Gateway, key: str,
                                                      tmp_path: Path, engine_url: str):
    cards = httpx.get(f"{gateway.url}/v1/models", headers={"authorization": f"Bearer {key}"},
                      timeout=30).json()["data"]
    assert cards[0]["capabilities"] == {"tool_calling": True, "reasoning": False}
    # A remote engine whose parsers nobody named: not known, so not claimed.
    unknown = start_gateway(tmp_path, engine_url)
    try:
        cards = httpx.get(f"{unknown.url}/v1/models", timeout=30).json()["data"]
    finally:
        unknown.stop()
    assert cards[0]["capabilities"] == {"tool_calling": False, "reasoning": False}


def test_up_starts_qwen3_engines_with_their_parsers(stack: Stack):
    """The tiny Qwen3's template writes `<tool_call>` blocks and never opens `<think>` (as
    Qwen3-Instruct-2507's): `up` gives it the hermes tool parser by itself; the session stack
    adds the reasoning parser by setting (conftest.py). /v1/models says both."""
    for url in stack.engines:
        argv = Path(f"/proc/{stack.pid(url)}/cmdline").read_bytes().decode().split("\0")
        assert argv[argv.index("--tool-call-parser") + 1] == "hermes"
        assert argv[argv.index("--reasoning-parser") + 1] == "qwen3"
        assert "--enable-auto-tool-choice" in argv
    cards = httpx.get(f"{stack.gateway}/v1/models", headers=stack.auth, timeout=30).json()["data"]
    assert cards[0]["capabilities"] == {"tool_calling": True, "reasoning": True}


def test_reasoning_comes_apart_from_the_answer_streamed_or_not(stack: Stack):
    """With thinking on, the qwen3 parser gives the random model's text as `reasoning` (no
    `</think>` ever comes), and the gateway passes it on as the engine wrote it."""
    body = chat(max_tokens=6, chat_template_kwargs={"enable_thinking": True})
    message = post(stack.gateway, body, stack.key).json()["choices"][0]["message"]
    assert message["reasoning"] and not message["content"]
    chunks = streamed(stack.gateway, body, stack.key)
    assert "".join(choice["delta"].get("reasoning") or "" for chunk in chunks
                   for choice in chunk["choices"]) == message["reasoning"]
    quiet = post(stack.gateway, {**body, "include_reasoning": False}, stack.key).json()
    assert not quiet["choices"][0]["message"].get("reasoning")


def readme_example(first_line: str) -> str:
    """The README's Python example that starts with `first_line`, as written there."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return next(block for block in blocks if block.startswith(first_line))


@pytest.mark.parametrize(("example", "printed"), [
    ("# Tools:", "called GetWeather"),  # the call made, its arguments parsed, the answer asked
    ("# Structured output:", "is_capital="),  # the City the SDK parsed
    ("# The Responses API", "tokens"),  # the streamed second turn's usage line
    ("# Thinking,", "without thinking:"),  # three answers that set no length (see below)
])
def test_the_readme_examples_run_against_up(stack: Stack, engine_url: str, tmp_path: Path,
                                            example: str, printed: str):
    script = tmp_path / "example.py"
    script.write_text(readme_example(example))
    capped = None
    if example == "# Thinking,":
        # Its answers set no length, as a thinking model's should not: the tiny model runs each
        # to the end of its context (116 s for the three on a busy box). A server-wide cap
        # bounds them, as an operator would (validation.max_tokens_cap).
        capped = start_gateway(tmp_path, engine_url,
                               env={"QWENSTACK_VALIDATION__MAX_TOKENS_CAP": "64"})
    url, key = (capped.url, "any") if capped else (stack.gateway, stack.key)
    env = {**os.environ, "OPENAI_BASE_URL": f"{url}/v1", "OPENAI_API_KEY": key}
    try:
        for _ in range(3):
            run = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                                 text=True, timeout=240, check=False)
            # xgrammar's JSON grammar lets a string hold raw control characters, which JSON
            # (and so the SDK's parse) does not; random weights sometimes write one. Sampled
            # anew.
            if "control character" not in run.stderr:
                break
    finally:
        if capped:
            capped.stop()
    assert run.returncode == 0, run.stderr[-3000:]
    assert printed in run.stdout, run.stdout
