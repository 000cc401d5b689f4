"""Input validation at the gateway: each bad request gets its status in OpenAI's error shape."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from helpers import Gateway, start_gateway

MODEL = "tiny-qwen3"  # max_model_len 1024
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
COMPLETION = {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
CHAT_URL, COMPLETION_URL = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, engine_url: str) -> Iterator[Gateway]:
    gateway = start_gateway(tmp_path_factory.mktemp("validation"), engine_url, env={
        "QWENSTACK_VALIDATION__MAX_N": "4",
        "QWENSTACK_VALIDATION__MAX_TOKENS_CAP": "2000",
        "QWENSTACK_VALIDATION__MAX_BODY_BYTES": "65536",
        "QWENSTACK_VALIDATION__MAX_HEADER_BYTES": "8192",
        "QWENSTACK_VALIDATION__MAX_MESSAGES": "8",
        "QWENSTACK_VALIDATION__MAX_PROMPTS": "8",
    })
    yield gateway
    gateway.stop()


def _assert_error(
    response: httpx.Response, status: int, code: str | None, param: str | None
) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["code"], error["param"]) == (code, param)


CASES = [
    ("malformed JSON", CHAT_URL, b'{"model": "tiny-qwen3", "messages": [', 400, None, None),
    ("not an object", CHAT_URL, [1, 2], 400, None, None),
    # JSON the gateway reads (orjson: 1024 levels) but could not write back (254): was a 500.
    ("nested 300 levels deep", CHAT_URL, b'{"model": "tiny-qwen3", "messages": [{"role": '
     b'"user", "content": "Hi"}], "stream_options": {"a": ' + b"[" * 300 + b"]" * 300 + b"}}",
     400, None, None),
    ("messages not a list", CHAT_URL, {**CHAT, "messages": "Hi"}, 400, "invalid_type", "messages"),
    ("message without role", CHAT_URL, {**CHAT, "messages": [{"content": "Hi"}]}, 400,
     "invalid_type", "messages"),
    ("no prompt", COMPLETION_URL, {"model": MODEL}, 400, "invalid_type", "prompt"),
    ("max_tokens a string", CHAT_URL, {**CHAT, "max_tokens": "10"}, 400, "invalid_type",
     "max_tokens"),
    ("max_tokens zero", COMPLETION_URL, {**COMPLETION, "max_tokens": 0}, 400, "invalid_type",
     "max_tokens"),
    ("temperature a string", CHAT_URL, {**CHAT, "temperature": "hot"}, 400, "invalid_type",
     "temperature"),
    ("n a float", CHAT_URL, {**CHAT, "n": 1.5}, 400, "invalid_type", "n"),
    ("stream not a bool", CHAT_URL, {**CHAT, "stream": "yes"}, 400, None, "stream"),
    ("n over the cap (CVE-2026-34756)", CHAT_URL, {**CHAT, "n": 5}, 400,
     "integer_above_max_value", "n"),
    ("best_of over the cap", COMPLETION_URL, {**COMPLETION, "best_of": 100}, 400,
     "integer_above_max_value", "best_of"),
    ("max_tokens over the cap", COMPLETION_URL, {**COMPLETION, "max_tokens": 2001}, 400,
     "integer_above_max_value", "max_tokens"),
    ("max_tokens beyond the context window", CHAT_URL, {**CHAT, "max_tokens": 1500}, 400,
     "context_length_exceeded", "max_tokens"),
    ("max_completion_tokens beyond the context window", CHAT_URL,
     {**CHAT, "max_completion_tokens": 1024}, 400, "context_length_exceeded",
     "max_completion_tokens"),
    ("chat_template (CVE-2025-61620)", CHAT_URL, {**CHAT, "chat_template": "{{ 7 * 7 }}"}, 400,
     "invalid_request", "chat_template"),
    # enable_thinking is the one key any client may set (tests/test_qwen3_api.py).
    ("chat_template_kwargs beyond enable_thinking", CHAT_URL,
     {**CHAT, "chat_template_kwargs": {"enable_thinking": True, "documents": []}},
     400, "invalid_request", "chat_template_kwargs"),
    ("unknown model", CHAT_URL, {**CHAT, "model": "gpt-9"}, 404, "model_not_found", "model"),
    ("oversized body", COMPLETION_URL, {**COMPLETION, "prompt": "x" * 70_000}, 413,
     "request_too_large", None),
    ("too many messages", CHAT_URL, {**CHAT, "messages": CHAT["messages"] * 9}, 400,
     "array_above_max_length", "messages"),
    ("too many prompts", COMPLETION_URL, {**COMPLETION, "prompt": ["Hi"] * 9}, 400,
     "array_above_max_length", "prompt"),
    # A list is judged by its length before any check reads its items: a long list of anything
    # is refused for its count (a 16 MiB body holds millions of items), not walked item by item.
    ("too many messages, none of them one", CHAT_URL, {**CHAT, "messages": [None] * 9}, 400,
     "array_above_max_length", "messages"),
    ("too many prompts, none of them one", COMPLETION_URL, {**COMPLETION, "prompt": [None] * 9},
     400, "array_above_max_length", "prompt"),
    ("a prompt of token ids longer than the context window", COMPLETION_URL,
     {**COMPLETION, "prompt": [9707] * 1025}, 400, "context_length_exceeded", "prompt"),
    ("too many documents, none of them text", "/v1/rerank",
     {"model": MODEL, "query": "q", "documents": [None] * 257}, 400, "array_above_max_length",
     "documents"),
    ("too many score texts, none of them text", "/v1/score",
     {"model": MODEL, "text_1": "q", "text_2": [None] * 257}, 400, "array_above_max_length",
     "text_2"),
    # Fields of vLLM's that no client may set; and one the gateway sets itself (cache_salt).
    *((f"{field} on {route}", route, {**(CHAT if route == CHAT_URL else COMPLETION),
                                      field: value}, 400, "unsupported_parameter", field)
      for field, value in (("kv_transfer_params", {"do_remote_prefill": True}),
                           ("priority", -100), ("prompt_embeds", "AAAA"),
                           ("logits_processors", ["os.system"]), ("vllm_xargs", {"a": 1}),
                           ("mm_processor_kwargs", {"a": 1}), ("media_io_kwargs", {"a": 1}),
                           ("cache_salt", "another-tenant"), ("request_id", "x"))
      for route in (CHAT_URL, COMPLETION_URL)),
    ("an unknown field", CHAT_URL, {**CHAT, "temprature": 0}, 400, "unsupported_parameter",
     "temprature"),
    # vLLM's completions read only max_tokens: a second name there would pass a cap unread.
    ("max_completion_tokens on completions", COMPLETION_URL,
     {**COMPLETION, "max_completion_tokens": 1, "max_tokens": 700}, 400,
     "unsupported_parameter", "max_completion_tokens"),
    ("max_tokens over the cap beside a small max_completion_tokens", CHAT_URL,
     {**CHAT, "max_completion_tokens": 1, "max_tokens": 2001}, 400, "integer_above_max_value",
     "max_tokens"),
    ("max_tokens beyond the window beside a small max_completion_tokens", CHAT_URL,
     {**CHAT, "max_completion_tokens": 1, "max_tokens": 1500}, 400, "context_length_exceeded",
     "max_tokens"),
    # Media the engine would fetch (SSRF): only from allowed domains (none here).
    *((f"{kind} at {url}", CHAT_URL,
       {**CHAT, "messages": [{"role": "user", "content": [
           {"type": "text", "text": "What is this?"}, {"type": kind, kind: {"url": url}}]}]},
       400, "invalid_request", "messages")
      for kind, url in (("image_url", "http://169.254.169.254/latest/meta-data/"),
                        ("audio_url", "https://attacker.example/a.wav"),
                        ("video_url", "file:///etc/passwd"))),
    ("an image given as embeddings", CHAT_URL,
     {**CHAT, "messages": [{"role": "user", "content": [
         {"type": "image_embeds", "image_embeds": "AAAA"}]}]}, 400, "invalid_request", "messages"),
    # With a uuid, vLLM reads a part by its keys, whatever its type says.
    ("image embeddings behind a text part's uuid", CHAT_URL,
     {**CHAT, "messages": [{"role": "user", "content": [
         {"type": "text", "text": "x", "uuid": "u", "image_embeds": "AAAA"}]}]}, 400,
     "invalid_request", "messages"),
    ("a part whose type is not a string", CHAT_URL,
     {**CHAT, "messages": [{"role": "user", "content": [{"type": ["text"]}]}]}, 400,
     "invalid_request", "messages"),
]


@pytest.mark.parametrize(("route", "body", "status", "code", "param"),
                         [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_bad_request_is_refused_at_the_gateway(
    gateway: Gateway, route: str, body: object, status: int, code: str | None, param: str | None
):
    if isinstance(body, bytes):
        response = httpx.post(gateway.url + route, content=body,
                              headers={"content-type": "application/json"}, timeout=30)
    else:
        response = httpx.post(gateway.url + route, json=body, timeout=30)
    _assert_error(response, status, code, param)


def test_body_over_the_limit_without_length_is_cut_off_at_413(gateway: Gateway):
    def chunks() -> Iterator[bytes]:  # chunked transfer: no content-length to refuse up front
        yield b'{"model": "tiny-qwen3", "prompt": "'
        for _ in range(100):
            yield b"x" * 1024
        yield b'"}'

    response = httpx.post(gateway.url + COMPLETION_URL, content=chunks(), timeout=30)
    _assert_error(response, 413, "request_too_large", None)


def test_oversized_headers_get_431_before_the_app(gateway: Gateway):
    response = httpx.post(
        gateway.url + CHAT_URL, json=CHAT, headers={"x-filler": "a" * 9000}, timeout=30
    )
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"


def test_megabytes_of_header_are_refused_without_being_buffered(gateway: Gateway):
    # Sent raw and never finished: the gateway answers once the limit is passed, not at the end.
    address = urlsplit(gateway.url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\nx-filler: ")
        with pytest.raises(OSError):  # the gateway closes the connection mid-header
            for _ in range(10_000):
                sock.sendall(b"a" * 1024)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_headers_under_the_limit_and_valid_requests_pass(gateway: Gateway):
    ok = httpx.post(gateway.url + CHAT_URL, json={**CHAT, "n": 4}, headers={"x-filler": "a" * 4000},
                    timeout=60)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 4
    # A list of token ids is one prompt, however many more ids than max_prompts it holds.
    token_ids = httpx.post(
        gateway.url + COMPLETION_URL, json={**COMPLETION, "prompt": [9707, 1052] * 10}, timeout=60
    )
    assert token_ids.status_code == 200, token_ids.text


def test_vllm_sampling_extras_pass(gateway: Gateway):
    extras = {"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "min_tokens": 2,
              "ignore_eos": True, "stop_token_ids": [151643], "skip_special_tokens": True}
    for route, body in ((CHAT_URL, CHAT), (COMPLETION_URL, COMPLETION)):
        answer = httpx.post(gateway.url + route, json={**body, **extras}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["completion_tokens"] == 4


def test_max_tokens_cap_applies_when_the_request_sets_none(tmp_path: Path, engine_url: str):
    gateway = start_gateway(tmp_path, engine_url, env={"QWENSTACK_VALIDATION__MAX_TOKENS_CAP": "3"})
    try:
        answer = httpx.post(gateway.url + COMPLETION_URL,
                            json={"model": MODEL, "prompt": "Hi", "ignore_eos": True}, timeout=60)
    finally:
        gateway.stop()
    assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 3


def test_media_from_an_allowed_domain_passes_the_gateway(tmp_path: Path, engine_url: str):
    gateway = start_gateway(tmp_path, engine_url, env={
        "QWENSTACK_VALIDATION__ALLOWED_MEDIA_DOMAINS": "img.example.com",
    })
    image = {"type": "image_url", "image_url": {"url": "https://img.example.com/panda.png"}}
    body = {**CHAT, "messages": [{"role": "user", "content": [image]}]}
    other = {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://img.example.com.evil.test/x.png"}}]}]}
    try:
        allowed = httpx.post(gateway.url + CHAT_URL, json=body, timeout=60)
        refused = httpx.post(gateway.url + CHAT_URL, json=other, timeout=60)
    finally:
        gateway.stop()
    # The engine has the last word (the tiny model reads no images): the gateway let it through.
    assert "allowed media domains" not in allowed.text
    _assert_error(refused, 400, "invalid_request", "messages")
    assert "allowed media domains" in refused.text
